//! Where a rank's volumes come from: the node-wide cache (`data::cache`), and on a miss the
//! dataset's object store, decoded and prepared. The feed and the evaluation both read through
//! `CaseSource`, so tests can put any volumes (or failures) behind it.

use std::sync::Arc;

use data::cache::{Prepared, Source, VolumeCache};
use data::{CaseVolume, DataError};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;

/// How a worker process reads data, shared by its runs: the node-wide cache (its in-process
/// part bounded to a few open volumes) and the prefetch's threads and byte budget.
#[derive(Clone)]
pub struct DataPlane {
    pub cache: Arc<VolumeCache>,
    pub prefetch_threads: usize,
    pub prefetch_bytes: usize,
}

impl DataPlane {
    /// No disk cache, two loader threads, 512 MiB ahead: for tests and tools.
    pub fn in_memory() -> Self {
        DataPlane {
            cache: Arc::new(VolumeCache::disabled(data::cache::DEFAULT_OPEN_VOLUMES)),
            prefetch_threads: 2,
            prefetch_bytes: 512 << 20,
        }
    }
}

/// Volumes by case id.
pub trait CaseSource: Send + Sync {
    /// The volume of `case_id`, and where it came from (a cache hit or a preparation).
    fn volume(&self, case_id: &str) -> Result<(Arc<CaseVolume>, Source), DataError>;
}

/// Names the preparation a cached volume went through. The integrator replaces `PREPARATION`
/// with the `[preprocess]` section's hash once the SuPreM pipeline produces the volumes.
const PREPARATION: &str = "load_case: HU window -175..250 to 0..1, labels as a bitmask; no resampling";

/// Reads through the cache; a miss loads the case from the dataset's store.
pub struct StoreSource {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    url: String,
    cache: Arc<VolumeCache>,
    runtime: tokio::runtime::Handle,
}

impl StoreSource {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        root: ObjectPath,
        url: &str,
        cache: Arc<VolumeCache>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        StoreSource {
            store,
            root,
            url: url.to_string(),
            cache,
            runtime,
        }
    }

    /// The cache key's config part: the preparation, the dataset URL (two datasets may share case
    /// ids), and the CT object's size and version (a dataset rewritten in place, as demos do,
    /// must not hit stale volumes). One HEAD per read: a stat on local disks, hidden by the
    /// prefetch on buckets. Masks edited in place under an unchanged CT are not noticed.
    fn config_hash(&self, case_id: &str) -> Result<String, DataError> {
        data::validate_case_id(case_id)?;
        let key = data::ids::ct_key(&self.root, case_id);
        let meta = self
            .runtime
            .block_on(self.store.head(&key))
            .map_err(|source| match source {
                object_store::Error::NotFound { .. } => DataError::Missing { key: key.to_string() },
                source => DataError::Store {
                    key: key.to_string(),
                    source,
                },
            })?;
        Ok(format!(
            "{PREPARATION}|{}|{}|{}|{}",
            self.url,
            meta.size,
            meta.e_tag.unwrap_or_default(),
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
        ))
    }
}

impl CaseSource for StoreSource {
    fn volume(&self, case_id: &str) -> Result<(Arc<CaseVolume>, Source), DataError> {
        let hash = self.config_hash(case_id)?;
        self.cache
            .get_or_prepare(case_id, &hash, || -> Result<Prepared, DataError> {
                self.runtime
                    .block_on(data::loader::load_case_parts(self.store.as_ref(), &self.root, case_id))
            })
    }
}
