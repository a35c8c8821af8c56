//! Failure-path and format tests for the loader, kept out of `loader.rs` so the module itself
//! stays readable. The happy path against the phantom lives in `synth`'s tests.

use std::fs;
use std::io::Read;

use object_store::local::LocalFileSystem;
use protocol::classes::{CLASSES, NUM_CLASSES};

use super::*;
use crate::nifti_write::{HeaderInfo, Voxels, write_gz};
use crate::store::store_from_url;
use crate::synth::{SynthOptions, write_phantom_dataset};

fn root() -> Path {
    Path::default()
}

fn phantom(dir: &std::path::Path, cases: usize) -> LocalFileSystem {
    let opts = SynthOptions {
        cases,
        seed: 3,
        shape: [16, 20, 24],
        // At the training spacing in RAS the files are exactly `shape`, which these tests rely on.
        spacing_mm: [1.5; 3],
        orientation: crate::synth::PhantomOrientation::Ras,
    };
    write_phantom_dataset(dir, &opts).expect("write phantom");
    LocalFileSystem::new_with_prefix(dir).expect("store")
}

fn hu_at(z: usize, y: usize, x: usize) -> f32 {
    (z * 100 + y * 10 + x) as f32 - 150.0
}

/// A case written by the `nifti` crate straight from an `[x, y, z]` ndarray, independent of our
/// writer, so the axis-order conversion is checked against the format rather than against itself.
fn write_float_case(dir: &std::path::Path, id: &str, shape: [usize; 3]) {
    let [d, h, w] = shape;
    let case = dir.join(id);
    fs::create_dir_all(case.join("segmentations")).expect("mkdir");
    let ct = ndarray::Array3::from_shape_fn((w, h, d), |(x, y, z)| hu_at(z, y, x));
    nifti::writer::WriterOptions::new(case.join("ct.nii.gz"))
        .write_nifti(&ct)
        .expect("ct");
    for (c, class) in CLASSES.iter().enumerate() {
        // Class c covers exactly the voxel (z=0, y=c/w, x=c%w) plus, for class 0, one far corner.
        let mask = ndarray::Array3::from_shape_fn((w, h, d), |(x, y, z)| {
            let hit = (z == 0 && y * w + x == c) || (c == 0 && (z, y, x) == (d - 1, h - 1, w - 1));
            u8::from(hit)
        });
        let path = case.join("segmentations").join(format!("{class}.nii.gz"));
        nifti::writer::WriterOptions::new(path)
            .write_nifti(&mask)
            .expect("mask");
    }
}

#[tokio::test]
async fn float_ct_decodes_in_z_y_x_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = [3, 5, 7];
    write_float_case(dir.path(), "case_a", shape);
    let store = LocalFileSystem::new_with_prefix(dir.path()).expect("store");
    let vol = load_case(&store, &root(), "case_a").await.expect("load");
    assert_eq!(vol.shape, shape);
    for z in 0..3 {
        for y in 0..5 {
            for x in 0..7 {
                // Stored as u16: within half a quantisation step.
                let stored = vol.intensity(vol.index(z, y, x));
                let expected = window_hu(hu_at(z, y, x));
                assert!((stored - expected).abs() <= 0.5 / 65535.0 + 1e-7, "({z},{y},{x})");
            }
        }
    }
    for c in 0..NUM_CLASSES {
        assert_ne!(vol.labels()[c] & (1 << c), 0, "class {c} at flat index {c}");
    }
    assert_eq!(vol.labels()[vol.index(2, 4, 6)], 1);
    assert_eq!(vol.class_voxels(0), 2);
    assert_eq!(vol.foreground().len(), NUM_CLASSES + 1);
}

#[tokio::test]
async fn uncompressed_nifti_with_scaling_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 1);
    let before = load_case(&store, &root(), "BDMAP_00000001").await.expect("load");

    // Inflate the CT and set scl_slope = 0.5, scl_inter = -20 (bytes 112..120 of the header),
    // then store it uncompressed under the same .nii.gz key: the loader goes by magic, not name.
    let path = dir.path().join("BDMAP_00000001/ct.nii.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&fs::read(&path).expect("read")[..])
        .read_to_end(&mut raw)
        .expect("gunzip");
    raw[112..116].copy_from_slice(&0.5f32.to_le_bytes());
    raw[116..120].copy_from_slice(&(-20.0f32).to_le_bytes());
    fs::write(&path, &raw).expect("write");

    let after = load_case(&store, &root(), "BDMAP_00000001").await.expect("load scaled");
    assert_eq!(after.labels(), before.labels());
    let hu = |v: f32| v * 425.0 - 175.0;
    // Compare where the original is unclipped, so the window is invertible.
    let mut checked = 0;
    let dequantised = |v: &CaseVolume| (0..v.voxel_count()).map(|i| v.intensity(i)).collect::<Vec<f32>>();
    for (a, b) in dequantised(&after).iter().zip(&dequantised(&before)) {
        if *b > 0.0 && *b < 1.0 {
            let expected = window_hu(hu(*b) * 0.5 - 20.0);
            assert!((a - expected).abs() < 1e-4, "{a} vs {expected}");
            checked += 1;
        }
    }
    assert!(checked > 1000);
}

#[tokio::test]
async fn truncated_ct_names_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 1);
    let path = dir.path().join("BDMAP_00000001/ct.nii.gz");
    let bytes = fs::read(&path).expect("read");
    fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = load_case(&store, &root(), "BDMAP_00000001")
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, DataError::Corrupt { .. } | DataError::Nifti { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("BDMAP_00000001/ct.nii.gz"), "{err}");

    // Garbage that is not gzip either fails as NIfTI, still naming the key.
    fs::write(&path, b"definitely not a nifti file").expect("garbage");
    let err = load_case(&store, &root(), "BDMAP_00000001")
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("BDMAP_00000001/ct.nii.gz"), "{err}");
}

#[tokio::test]
async fn inconsistent_bitpix_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 1);
    let path = dir.path().join("BDMAP_00000001/ct.nii.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&fs::read(&path).expect("read")[..])
        .read_to_end(&mut raw)
        .expect("gunzip");
    raw[72..74].copy_from_slice(&8i16.to_le_bytes());
    fs::write(&path, &raw).expect("write");
    let err = load_case(&store, &root(), "BDMAP_00000001")
        .await
        .expect_err("must fail");
    assert!(
        matches!(&err, DataError::Corrupt { key, .. } if key.ends_with("ct.nii.gz")),
        "{err:?}"
    );
}

#[tokio::test]
async fn mismatched_mask_shape_names_the_mask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 1);
    let path = dir.path().join("BDMAP_00000001/segmentations/spleen.nii.gz");
    let info = HeaderInfo {
        affine: crate::nifti_write::centred_ras_affine([16, 20, 23], [1.5; 3]),
        description: "wrong",
        is_label: true,
    };
    write_gz(&path, [16, 20, 23], Voxels::U8(&vec![0u8; 16 * 20 * 23]), &info).expect("write");
    match load_case(&store, &root(), "BDMAP_00000001").await {
        Err(DataError::ShapeMismatch { key, expected, found }) => {
            assert_eq!(key, "BDMAP_00000001/segmentations/spleen.nii.gz");
            assert_eq!((expected, found), ([16, 20, 24], [16, 20, 23]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_mask_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 1);
    fs::remove_file(dir.path().join("BDMAP_00000001/segmentations/rectum.nii.gz")).expect("rm");
    match load_case(&store, &root(), "BDMAP_00000001").await {
        Err(DataError::Missing { key }) => {
            assert_eq!(key, "BDMAP_00000001/segmentations/rectum.nii.gz")
        }
        other => panic!("expected Missing, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_case_ids_are_rejected_before_any_key_is_built() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 1);
    for bad in [
        "",
        "..",
        "../etc",
        "a/b",
        ".hidden",
        "a..b",
        "BDMAP 1",
        "é",
        "a\\b",
        &"x".repeat(129),
    ] {
        let err = load_case(&store, &root(), bad).await.expect_err(bad);
        assert!(matches!(err, DataError::InvalidCaseId { .. }), "{bad:?}: {err:?}");
    }
    for good in ["BDMAP_00000001", "case-1.v2", "A"] {
        validate_case_id(good).expect(good);
    }
}

#[tokio::test]
async fn listing_skips_hidden_and_incomplete_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phantom(dir.path(), 2);
    fs::create_dir_all(dir.path().join(".tmp-BDMAP_00000009-1/segmentations")).expect("staging");
    fs::copy(
        dir.path().join("BDMAP_00000001/ct.nii.gz"),
        dir.path().join(".tmp-BDMAP_00000009-1/ct.nii.gz"),
    )
    .expect("copy");
    fs::create_dir_all(dir.path().join("BDMAP_00000005/segmentations")).expect("no ct");
    fs::write(dir.path().join("README.txt"), b"not a case").expect("file");
    let cases = list_cases(&store, &root()).await.expect("list");
    assert_eq!(cases, vec!["BDMAP_00000001", "BDMAP_00000002"]);

    let empty = tempfile::tempdir().expect("empty");
    let store = LocalFileSystem::new_with_prefix(empty.path()).expect("store");
    assert!(matches!(
        list_cases(&store, &root()).await,
        Err(DataError::NoCases { .. })
    ));
}

#[tokio::test]
async fn store_from_url_accepts_file_urls_and_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("atlas dir");
    phantom(&data, 1);
    let url = url::Url::from_directory_path(&data).expect("url").to_string();
    assert!(url.contains("%20"), "{url}");
    for spec in [url.as_str(), data.to_str().expect("utf8")] {
        let (store, prefix) = store_from_url(spec).expect(spec);
        assert_eq!(
            list_cases(store.as_ref(), &prefix).await.expect("list"),
            vec!["BDMAP_00000001"]
        );
        load_case(store.as_ref(), &prefix, "BDMAP_00000001")
            .await
            .expect("load");
    }
    let fresh = dir.path().join("new/nested");
    store_from_url(fresh.to_str().expect("utf8")).expect("creatable");
    assert!(fresh.is_dir());

    match store_from_url("ftp://host/AbdomenAtlas1.1/") {
        Err(e @ DataError::UnsupportedScheme { .. }) => {
            assert!(
                e.to_string().contains("file://") && e.to_string().contains("s3://"),
                "{e}"
            )
        }
        other => panic!("expected UnsupportedScheme, got {:?}", other.map(|_| ())),
    }
}

/// Workers spawn case loads onto tokio tasks, which needs `Send` futures.
#[allow(dead_code)]
fn loader_futures_are_send(store: &'static dyn ObjectStore, root: &'static Path) {
    fn send<T: Send>(_: T) {}
    send(load_case(store, root, "BDMAP_00000001"));
    send(list_cases(store, root));
}
