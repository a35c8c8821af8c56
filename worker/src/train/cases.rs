//! Where a rank's volumes come from: the node-wide cache (`data::cache`), and on a miss the
//! dataset's object store, decoded and prepared. The feed and the evaluation both read through
//! `CaseSource`, so tests can put any volumes (or failures) behind it.

use std::collections::HashSet;
use std::sync::Arc;

use data::cache::{Prepared, Source, VolumeCache};
use data::case_fetch::fetch_prepared;
use data::preprocess::PreprocessConfig;
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

/// Tries of a read that failed for a reason other than the case itself (a flaky store), before
/// the step fails; spaced by `TRANSIENT_BACKOFF` times the attempt.
const TRANSIENT_TRIES: u32 = 3;
const TRANSIENT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);

/// Reads through the cache; a miss fetches the case from the dataset's store and runs SuPreM's
/// preprocessing on it. Cases the run's assignment names as quarantined are refused without a
/// read, so they are replaced exactly as they were when first found bad.
pub struct StoreSource {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    url: String,
    preprocess: PreprocessConfig,
    quarantined: HashSet<String>,
    cache: Arc<VolumeCache>,
    runtime: tokio::runtime::Handle,
}

impl StoreSource {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        root: ObjectPath,
        url: &str,
        preprocess: PreprocessConfig,
        quarantined: impl IntoIterator<Item = String>,
        cache: Arc<VolumeCache>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        StoreSource {
            store,
            root,
            url: url.to_string(),
            preprocess,
            quarantined: quarantined.into_iter().collect(),
            cache,
            runtime,
        }
    }

    /// The cache key's config part: the preprocessing's hash, the dataset URL (two datasets may share case
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
            "{}|{}|{}|{}|{}",
            self.preprocess.hash(),
            self.url,
            meta.size,
            meta.e_tag.unwrap_or_default(),
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
        ))
    }
}

impl StoreSource {
    fn read(&self, case_id: &str) -> Result<(Arc<CaseVolume>, Source), DataError> {
        let hash = self.config_hash(case_id)?;
        self.cache
            .get_or_prepare(case_id, &hash, || -> Result<Prepared, DataError> {
                let p = fetch_prepared(
                    &self.runtime,
                    self.store.as_ref(),
                    &self.root,
                    case_id,
                    &self.preprocess,
                )?;
                Ok((p.shape, p.image, p.labels))
            })
    }
}

impl CaseSource for StoreSource {
    fn volume(&self, case_id: &str) -> Result<(Arc<CaseVolume>, Source), DataError> {
        if self.quarantined.contains(case_id) {
            return Err(DataError::Quarantined {
                case: case_id.to_string(),
            });
        }
        let mut attempt = 1;
        loop {
            match self.read(case_id) {
                Err(e) if !e.is_case_fault() && attempt < TRANSIENT_TRIES => {
                    tracing::warn!(case = case_id, attempt, "reading the case failed, retrying: {e}");
                    std::thread::sleep(TRANSIENT_BACKOFF * attempt);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
