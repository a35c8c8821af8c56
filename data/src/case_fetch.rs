//! One case's raw inputs, fetched as SuPreM's preprocessing wants them: the CT in Hounsfield
//! units and the 25 class masks folded into one bitmask volume, both with their affines. The CT
//! and the masks stream and decode concurrently; a class whose mask file is absent is an empty
//! mask (AbdomenAtlas leaves out structures a scan does not show, and the dataset scan records
//! which ones exist).

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use protocol::classes::CLASSES;

use crate::DataError;
use crate::geometry::Volume;
use crate::ids::{ct_key, mask_key, validate_case_id};
use crate::nifti_read::fetch_volume;
use crate::preprocess::{Prepared, PreprocessConfig, prepare};

/// Masks in flight at once: enough to hide bucket latency, few enough that the decoded masks of a
/// full-resolution case (one byte a voxel each) stay small next to the CT.
const MASK_CONCURRENCY: usize = 4;

/// The CT (values as stored, after `scl_slope`/`scl_inter`) and the label bitmask (bit `c` =
/// class `c` of `protocol::classes::CLASSES`), on the CT's grid. A mask on another grid is a
/// `ShapeMismatch` naming the mask; its affine is checked against the CT's by the preprocessing.
pub async fn fetch_case(
    store: &dyn ObjectStore,
    root: &Path,
    case_id: &str,
) -> Result<(Volume<f32>, Volume<u32>), DataError> {
    validate_case_id(case_id)?;
    let key = ct_key(root, case_id);
    let ct = fetch_volume::<f32>(store, &key).await?;
    if ct.voxel_count() > u32::MAX as usize {
        return Err(DataError::Corrupt {
            key: key.to_string(),
            reason: format!("{} voxels exceed the u32 index space", ct.voxel_count()),
        });
    }
    let mut labels = Volume {
        shape: ct.shape,
        data: vec![0u32; ct.voxel_count()],
        affine: ct.affine,
    };
    // Each fetch owns its key: futures built from borrowed iterator items are not provably
    // `Send` (rust-lang/rust#102211), and workers run case loads on tokio tasks.
    let keys: Vec<(usize, Path)> = (0..CLASSES.len())
        .map(|c| (c, mask_key(root, case_id, CLASSES[c])))
        .collect();
    let fetches = keys.into_iter().map(|(c, key)| async move {
        match fetch_volume::<u8>(store, &key).await {
            Ok(mask) => Ok(Some((c, key, mask))),
            Err(DataError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    });
    let mut masks = std::pin::pin!(futures::stream::iter(fetches).buffered(MASK_CONCURRENCY));
    while let Some(found) = masks.try_next().await? {
        let Some((c, key, mask)) = found else { continue };
        if mask.shape != ct.shape {
            return Err(DataError::ShapeMismatch {
                key: key.to_string(),
                expected: ct.shape,
                found: mask.shape,
            });
        }
        if !same_grid(&mask.affine, &ct.affine) {
            return Err(DataError::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "its affine {:?} places it elsewhere than the CT's {:?}",
                    mask.affine, ct.affine
                ),
            });
        }
        let bit = 1u32 << c;
        for (l, &m) in labels.data.iter_mut().zip(&mask.data) {
            if m != 0 {
                *l |= bit;
            }
        }
    }
    Ok((ct, labels))
}

/// Masks share the CT's grid when their affines agree to well under a voxel: 1e-3 mm covers the
/// float32 rounding of the header fields that different writers introduce.
fn same_grid(a: &crate::geometry::Affine, b: &crate::geometry::Affine) -> bool {
    a.iter()
        .zip(b)
        .all(|(ra, rb)| ra.iter().zip(rb).all(|(x, y)| (x - y).abs() <= 1e-3))
}

/// Fetches and preprocesses one case. The preprocessing is CPU work of a second or more for a
/// full-resolution CT, so callers on an async runtime run this from a blocking thread, with
/// `handle` the runtime that does the I/O.
pub fn fetch_prepared(
    handle: &tokio::runtime::Handle,
    store: &dyn ObjectStore,
    root: &Path,
    case_id: &str,
    cfg: &PreprocessConfig,
) -> Result<Prepared, DataError> {
    let (ct, labels) = handle.block_on(fetch_case(store, root, case_id))?;
    prepare(case_id, ct, labels, cfg)
}

#[cfg(test)]
mod tests {
    use object_store::local::LocalFileSystem;

    use super::*;
    use crate::synth::{SynthOptions, write_phantom_dataset};

    fn phantom(dir: &std::path::Path) -> LocalFileSystem {
        let opts = SynthOptions {
            cases: 1,
            seed: 5,
            shape: [24, 24, 24],
            ..Default::default()
        };
        write_phantom_dataset(dir, &opts).expect("phantom");
        LocalFileSystem::new_with_prefix(dir).expect("store")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_lps_phantom_comes_out_ras_at_the_training_spacing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = phantom(dir.path());
        let (ct, labels) = fetch_case(&store, &Path::default(), "BDMAP_00000001")
            .await
            .expect("fetch");
        assert_eq!(crate::geometry::axcodes(&ct.affine), ['L', 'P', 'S']);
        assert!(labels.data.iter().any(|&l| l != 0));
        let cfg = PreprocessConfig {
            patch: [16, 16, 16],
            ..Default::default()
        };
        let prepared = prepare("BDMAP_00000001", ct, labels, &cfg).expect("prepare");
        assert_eq!(prepared.spacing, [1.5; 3]);
        // Cropped to the body, never past the 24³ field of view, padded to at least the patch.
        assert!(
            prepared.shape.iter().all(|&n| (16..=24).contains(&n)),
            "{:?}",
            prepared.shape
        );
        assert!(prepared.image.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(prepared.labels.iter().any(|&l| l != 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_absent_mask_is_empty_and_an_absent_ct_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = phantom(dir.path());
        let case = dir.path().join("BDMAP_00000001");
        let liver = CLASSES.iter().position(|c| *c == "liver").expect("liver");
        let (_, full) = fetch_case(&store, &Path::default(), "BDMAP_00000001")
            .await
            .expect("fetch");
        assert!(full.data.iter().any(|l| l & (1 << liver) != 0));
        std::fs::remove_file(case.join("segmentations/liver.nii.gz")).expect("rm mask");
        let (_, without) = fetch_case(&store, &Path::default(), "BDMAP_00000001")
            .await
            .expect("fetch");
        assert!(without.data.iter().all(|l| l & (1 << liver) == 0));
        std::fs::remove_file(case.join("ct.nii.gz")).expect("rm ct");
        let err = fetch_case(&store, &Path::default(), "BDMAP_00000001")
            .await
            .unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("BDMAP_00000001/ct.nii.gz"), "{err}");
    }
}
