//! Reading AbdomenAtlas cases through `object_store`, so the same code serves local disks in tests
//! and buckets in production.
//!
//! Keys are only ever built from validated case ids (DESIGN: "object keys are built from validated
//! IDs, never from raw user strings"), and every failure names the object it came from, so a bad
//! case can be quarantined and reported by key.

use std::path::PathBuf;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use protocol::classes::CLASSES;

use super::DataError;
use super::nifti_io::decode;
use super::volume::{CaseVolume, window_hu};

/// How many objects of one case are in flight at once: enough to hide bucket latency, few enough
/// that compressed masks of a full-resolution case stay small in memory.
const FETCH_CONCURRENCY: usize = 8;

/// Case folder names like `BDMAP_00000001`, by the one id rule every voxelfleet id follows
/// (`protocol::ids::validate_id`): ASCII letters, digits, `_`, `.` and `-`, at most 128 of them,
/// not starting with `.` and never containing `..`. Only the error type is the data plane's own.
pub fn validate_case_id(id: &str) -> Result<(), DataError> {
    protocol::ids::validate_id(id, "case id").map_err(|reason| DataError::InvalidCaseId {
        id: id.to_string(),
        reason,
    })
}

fn ct_key(root: &Path, case_id: &str) -> Path {
    root.child(case_id).child("ct.nii.gz")
}

fn mask_key(root: &Path, case_id: &str, class: &str) -> Path {
    root.child(case_id)
        .child("segmentations")
        .child(format!("{class}.nii.gz"))
}

async fn fetch(store: &dyn ObjectStore, key: &Path) -> Result<bytes::Bytes, DataError> {
    let result = store.get(key).await.map_err(|e| DataError::store(key, e))?;
    result.bytes().await.map_err(|e| DataError::store(key, e))
}

/// Loads one case: the CT windowed to 0..1 and the 25 masks folded into a bitmask per voxel, all
/// in `[z, y, x]` order (NIfTI's `x, y, z` axes reversed; no reorientation or resampling is done
/// here, the files are expected to be RAS at the training spacing already).
pub async fn load_case(store: &dyn ObjectStore, root: &Path, case_id: &str) -> Result<CaseVolume, DataError> {
    validate_case_id(case_id)?;
    let key = ct_key(root, case_id);
    let bytes = fetch(store, &key).await?;
    let ct = decode::<f32>(&bytes, key.as_ref())?;
    drop(bytes);
    let voxels = ct.shape.iter().product::<usize>();
    if voxels > u32::MAX as usize {
        return Err(DataError::Corrupt {
            key: key.to_string(),
            reason: format!("{voxels} voxels exceed the u32 index space"),
        });
    }
    let image: Vec<f32> = ct.data.into_iter().map(window_hu).collect();
    let mut labels = vec![0u32; voxels];

    // Each fetch owns its key and the closure takes only owned items: futures built from borrowed
    // iterator items are not provably `Send` (rust-lang/rust#102211), and workers spawn case
    // loads onto tokio tasks.
    let keys: Vec<(usize, Path)> = (0..CLASSES.len())
        .map(|c| (c, mask_key(root, case_id, CLASSES[c])))
        .collect();
    let fetches = keys
        .into_iter()
        .map(|(c, key)| async move { fetch(store, &key).await.map(|bytes| (c, key, bytes)) });
    let mut masks = std::pin::pin!(futures::stream::iter(fetches).buffered(FETCH_CONCURRENCY));
    while let Some((c, key, bytes)) = masks.try_next().await? {
        let mask = decode::<u8>(&bytes, key.as_ref())?;
        if mask.shape != ct.shape {
            return Err(DataError::ShapeMismatch {
                key: key.to_string(),
                expected: ct.shape,
                found: mask.shape,
            });
        }
        let bit = 1u32 << c;
        for (l, &m) in labels.iter_mut().zip(&mask.data) {
            if m != 0 {
                *l |= bit;
            }
        }
    }
    Ok(CaseVolume::new(case_id.to_string(), ct.shape, image, labels))
}

/// Lists the case folders directly under `root` that hold a `ct.nii.gz`, sorted. Folder names that
/// are not valid case ids (hidden staging folders, stray names) are skipped rather than failing
/// the listing. An empty result is `DataError::NoCases`, since no caller can train on nothing and
/// an empty listing almost always means a wrong URL.
pub async fn list_cases(store: &dyn ObjectStore, root: &Path) -> Result<Vec<String>, DataError> {
    let listing = store
        .list_with_delimiter(Some(root))
        .await
        .map_err(|e| DataError::store(root, e))?;
    let candidates: Vec<String> = listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .filter(|name| validate_case_id(name).is_ok())
        .collect();
    let checks = futures::stream::iter(candidates.into_iter().map(|id| async move {
        let key = ct_key(root, &id);
        match store.head(&key).await {
            Ok(_) => Ok(Some(id)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(DataError::store(&key, e)),
        }
    }))
    .buffer_unordered(32);
    let mut cases: Vec<String> = checks.try_filter_map(|id| async move { Ok(id) }).try_collect().await?;
    if cases.is_empty() {
        return Err(DataError::NoCases { url: root.to_string() });
    }
    cases.sort();
    Ok(cases)
}

/// Opens a dataset URL: `file:///abs/path` or a plain local path (relative ones resolve against
/// the current directory). The directory is created if missing, and the store is a
/// `LocalFileSystem` rooted *at that directory* with an empty prefix, so keys are dataset-relative
/// (`BDMAP_00000001/ct.nii.gz`) and cannot reach outside it.
pub fn store_from_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), DataError> {
    let dir = local_dir_from_url(url)?;
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| DataError::Store {
        key: dir.display().to_string(),
        source: e,
    })?;
    Ok((Arc::new(store), Path::default()))
}

/// The local directory a store URL names, without touching the file system, so a caller can
/// check it before [`store_from_url`] creates it.
///
/// `object_store::parse_url` is not used because for `file://` it keeps percent-escapes of the URL
/// path in the object path and roots the store at `/`; `url::Url::to_file_path` decodes correctly.
/// Other schemes (`s3://`, `gs://`, …) are refused by name: this build has only the `fs` feature.
pub fn local_dir_from_url(url: &str) -> Result<PathBuf, DataError> {
    let invalid = |reason: String| DataError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    match url::Url::parse(url) {
        // One-letter "schemes" are Windows drive letters, i.e. plain paths.
        Ok(parsed) if parsed.scheme().len() > 1 => {
            if parsed.scheme() != "file" {
                return Err(DataError::UnsupportedScheme {
                    url: url.to_string(),
                    scheme: parsed.scheme().to_string(),
                });
            }
            parsed
                .to_file_path()
                .map_err(|()| invalid("not an absolute local path".into()))
        }
        _ => {
            if url.is_empty() {
                return Err(invalid("empty".into()));
            }
            let path = PathBuf::from(url);
            if path.is_absolute() {
                Ok(path)
            } else {
                Ok(std::env::current_dir().map_err(|e| DataError::io(".", e))?.join(path))
            }
        }
    }
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
