//! Reading AbdomenAtlas cases through `object_store`, so the same code serves local disks in tests
//! and buckets in production.
//!
//! Keys are only ever built from validated case ids (DESIGN: "object keys are built from validated
//! IDs, never from raw user strings"), and every failure names the object it came from, so a bad
//! case can be quarantined and reported by key.

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use protocol::classes::CLASSES;

use crate::DataError;
use crate::cache::Prepared;
use crate::ids::{ct_key, mask_key, validate_case_id};
use crate::nifti_read::fetch_volume;
use crate::volume::{CaseVolume, window_hu};

/// How many objects of one case are in flight at once: enough to hide bucket latency, few enough
/// that compressed masks of a full-resolution case stay small in memory.
const FETCH_CONCURRENCY: usize = 8;

/// Loads one case: the CT windowed to 0..1 and the 25 masks folded into a bitmask per voxel, all
/// in `[z, y, x]` order (NIfTI's `x, y, z` axes reversed; no reorientation or resampling is done
/// here, the files are expected to be RAS at the training spacing already).
pub async fn load_case(store: &dyn ObjectStore, root: &Path, case_id: &str) -> Result<CaseVolume, DataError> {
    let (shape, image, labels) = load_case_parts(store, root, case_id).await?;
    Ok(CaseVolume::new(case_id.to_string(), shape, image, labels))
}

/// `load_case` before quantisation: what the node-wide cache's preparation closure returns.
pub async fn load_case_parts(store: &dyn ObjectStore, root: &Path, case_id: &str) -> Result<Prepared, DataError> {
    validate_case_id(case_id)?;
    let key = ct_key(root, case_id);
    let ct = fetch_volume::<f32>(store, &key).await?;
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
        .map(|(c, key)| async move { fetch_volume::<u8>(store, &key).await.map(|mask| (c, key, mask)) });
    let mut masks = std::pin::pin!(futures::stream::iter(fetches).buffered(FETCH_CONCURRENCY));
    while let Some((c, key, mask)) = masks.try_next().await? {
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
    Ok((ct.shape, image, labels))
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

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
