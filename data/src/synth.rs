//! Synthetic AbdomenAtlas 1.1 datasets: real gzip NIfTI-1 files with phantom anatomy.
//!
//! Tests, demos and CI need a dataset that exercises the exact production path (object store →
//! gunzip → NIfTI decode → masks) and that a small model can visibly learn, without shipping
//! gigabytes of CT. The anatomy lives in `synth_anatomy`; this module owns options, determinism
//! and the on-disk layout.

use std::fs;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use protocol::classes::CLASSES;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::DataError;
use crate::nifti_write::{HeaderInfo, Voxels, write_gz};
use crate::synth_anatomy::render;

/// What to generate. Case `i` is a pure function of `(seed, i, shape)`, so a worker and a test
/// can regenerate the same dataset independently.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub cases: usize,
    pub seed: u64,
    /// `[D, H, W]` = `[z, y, x]`, like every shape in `data`.
    pub shape: [usize; 3],
    pub spacing_mm: f32,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            cases: 24,
            seed: 0,
            shape: [64, 64, 64],
            spacing_mm: 1.5,
        }
    }
}

/// The smallest grid on which every structure, including the adrenals, still gets voxels.
const MIN_SIDE: usize = 16;
/// Mask labels are painted as u8 and indices must fit u32; 1024³ is far beyond any phantom use.
const MAX_SIDE: usize = 1024;

/// Case folder name of the zero-based case `index`: `BDMAP_00000001` for index 0.
pub fn case_id(index: usize) -> String {
    format!("BDMAP_{:08}", index + 1)
}

/// Writes `opts.cases` phantom cases under `out_dir` (created if needed) and returns their ids in
/// order. An existing case folder is replaced whole: each case is written into a hidden staging
/// folder and renamed into place, so a crash leaves either the old case, the new one, or (between
/// the two renames) no folder at all, never a half-written case that looks complete. Staging names
/// start with `.`, which `validate_case_id` rejects, so listings never pick them up.
pub fn write_phantom_dataset(out_dir: &Path, opts: &SynthOptions) -> Result<Vec<String>, DataError> {
    validate(opts)?;
    fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    let ids: Vec<String> = (0..opts.cases).map(case_id).collect();

    // Cases are independent, so generate them in parallel; results are identical either way.
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::<(usize, DataError)>::new());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(opts.cases.max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= opts.cases {
                        break;
                    }
                    if let Err(e) = write_case(out_dir, &ids[i], i, opts) {
                        errors.lock().unwrap_or_else(|p| p.into_inner()).push((i, e));
                    }
                }
            });
        }
    });
    let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    errors.sort_by_key(|(i, _)| *i);
    match errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(ids),
    }
}

fn validate(opts: &SynthOptions) -> Result<(), DataError> {
    let bad = |reason: String| Err(DataError::InvalidOptions { reason });
    if opts.shape.iter().any(|&d| !(MIN_SIDE..=MAX_SIDE).contains(&d)) {
        return bad(format!(
            "shape {:?}: every side must be in {MIN_SIDE}..={MAX_SIDE}",
            opts.shape
        ));
    }
    if !(opts.spacing_mm.is_finite() && opts.spacing_mm > 0.0) {
        return bad(format!("spacing_mm {} must be a positive number", opts.spacing_mm));
    }
    if opts.cases > 99_999_999 {
        return bad(format!("{} cases do not fit the 8-digit BDMAP ids", opts.cases));
    }
    Ok(())
}

/// The per-case generator: ChaCha's stream id separates cases, so case `i` does not depend on
/// how many cases come before it or on which thread renders it.
fn case_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

fn write_case(out_dir: &Path, id: &str, index: usize, opts: &SynthOptions) -> Result<(), DataError> {
    let phantom = render(opts.shape, &mut case_rng(opts.seed, index));
    let pid = std::process::id();
    let staging = out_dir.join(format!(".tmp-{id}-{pid}"));
    remove_if_present(&staging)?;
    let seg_dir = staging.join("segmentations");
    fs::create_dir_all(&seg_dir).map_err(|e| DataError::io(&seg_dir, e))?;

    let description = format!("voxelfleet phantom seed={} case={id}", opts.seed);
    let ct_info = HeaderInfo {
        spacing_mm: opts.spacing_mm,
        description: &description,
        is_label: false,
    };
    write_gz(
        &staging.join("ct.nii.gz"),
        opts.shape,
        Voxels::I16(&phantom.hu),
        &ct_info,
    )?;

    let mask_info = HeaderInfo {
        is_label: true,
        ..ct_info
    };
    let mut mask = vec![0u8; phantom.label.len()];
    for (c, class) in CLASSES.iter().enumerate() {
        let code = c as u8 + 1;
        for (m, &l) in mask.iter_mut().zip(&phantom.label) {
            *m = u8::from(l == code);
        }
        write_gz(
            &seg_dir.join(format!("{class}.nii.gz")),
            opts.shape,
            Voxels::U8(&mask),
            &mask_info,
        )?;
    }

    let target = out_dir.join(id);
    if target.exists() {
        let old = out_dir.join(format!(".old-{id}-{pid}"));
        remove_if_present(&old)?;
        fs::rename(&target, &old).map_err(|e| DataError::io(&target, e))?;
        fs::rename(&staging, &target).map_err(|e| DataError::io(&target, e))?;
        fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
    } else {
        fs::rename(&staging, &target).map_err(|e| DataError::io(&target, e))?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), DataError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{list_cases, load_case};
    use crate::volume::{CaseVolume, window_hu};
    use object_store::local::LocalFileSystem;
    use protocol::classes::class_index;

    fn small(cases: usize, seed: u64) -> SynthOptions {
        SynthOptions {
            cases,
            seed,
            ..SynthOptions::default()
        }
    }

    fn mean_inside(vol: &CaseVolume, class: &str) -> f32 {
        let bit = 1u32 << class_index(class).expect("known class");
        let (sum, n) = vol
            .labels()
            .iter()
            .enumerate()
            .filter(|(_, l)| **l & bit != 0)
            .fold((0.0f64, 0usize), |(s, n), (i, _)| (s + vol.intensity(i) as f64, n + 1));
        (sum / n.max(1) as f64) as f32
    }

    #[tokio::test]
    async fn phantom_round_trips_through_the_loader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = small(3, 11);
        let ids = write_phantom_dataset(dir.path(), &opts).expect("write");
        assert_eq!(ids, vec!["BDMAP_00000001", "BDMAP_00000002", "BDMAP_00000003"]);

        let store = LocalFileSystem::new_with_prefix(dir.path()).expect("store");
        let root = object_store::path::Path::default();
        assert_eq!(list_cases(&store, &root).await.expect("list"), ids);
        for id in &ids {
            let vol = load_case(&store, &root, id).await.expect("load");
            assert_eq!(vol.shape, [64, 64, 64]);
            assert_eq!(vol.image().len(), 64 * 64 * 64);
            for (c, class) in CLASSES.iter().enumerate() {
                let n = vol.class_voxels(c);
                assert!(n >= 30, "{id}: {class} has {n} voxels");
            }
            // One label per voxel: no voxel carries two classes.
            assert!(vol.labels().iter().all(|l| l.count_ones() <= 1));

            let (liver, spleen) = (mean_inside(&vol, "liver"), mean_inside(&vol, "spleen"));
            let lung = mean_inside(&vol, "lung_left").max(mean_inside(&vol, "lung_right"));
            let femur = mean_inside(&vol, "femur_left").min(mean_inside(&vol, "femur_right"));
            let kidney = mean_inside(&vol, "kidney_left").min(mean_inside(&vol, "kidney_right"));
            let aorta = mean_inside(&vol, "aorta");
            assert!((liver - window_hu(60.0)).abs() < 0.04, "{id}: liver {liver}");
            assert!((spleen - window_hu(50.0)).abs() < 0.04, "{id}: spleen {spleen}");
            assert!(lung < 0.02, "{id}: lungs {lung}");
            assert!(femur > 0.98, "{id}: femurs {femur}");
            assert!(kidney > liver + 0.15, "{id}: kidney {kidney} vs liver {liver}");
            assert!(aorta > liver + 0.2, "{id}: aorta {aorta} vs liver {liver}");
            // Outside the body is air, so the corner voxel windows to zero.
            assert_eq!(vol.image()[0], 0);
        }
    }

    #[test]
    fn files_are_gzip_int16_and_uint8_nifti() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_phantom_dataset(dir.path(), &small(1, 0)).expect("write");
        let case = dir.path().join("BDMAP_00000001");
        let ct = fs::read(case.join("ct.nii.gz")).expect("ct");
        assert_eq!(&ct[..2], &[0x1f, 0x8b]);
        let obj = nifti::ReaderOptions::new()
            .read_file(case.join("ct.nii.gz"))
            .expect("decode ct");
        use nifti::NiftiObject;
        let h = obj.header();
        assert_eq!(h.data_type().expect("datatype"), nifti::NiftiType::Int16);
        assert_eq!(&h.dim[..4], &[3, 64, 64, 64]);
        assert_eq!(h.pixdim[1..4], [1.5, 1.5, 1.5]);
        assert_eq!(h.scl_slope, 1.0);
        assert_eq!(h.srow_x[0], 1.5);
        assert_eq!((h.sform_code, h.qform_code), (1, 1));
        for class in CLASSES {
            let path = case.join("segmentations").join(format!("{class}.nii.gz"));
            let bytes = fs::read(&path).expect("mask");
            assert_eq!(&bytes[..2], &[0x1f, 0x8b], "{class}");
            let obj = nifti::ReaderOptions::new().read_file(&path).expect("decode mask");
            assert_eq!(obj.header().data_type().expect("datatype"), nifti::NiftiType::Uint8);
        }
        // Only finished cases are visible: no staging folders remain.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        assert_eq!(names, vec!["BDMAP_00000001"]);
    }

    #[test]
    fn generation_is_deterministic_per_seed_and_case() {
        let (a, b, c) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
            tempfile::tempdir().expect("c"),
        );
        write_phantom_dataset(a.path(), &small(2, 5)).expect("a");
        write_phantom_dataset(b.path(), &small(2, 5)).expect("b");
        write_phantom_dataset(c.path(), &small(2, 6)).expect("c");
        let ct = |d: &Path, id: &str| fs::read(d.join(id).join("ct.nii.gz")).expect("ct");
        assert_eq!(ct(a.path(), "BDMAP_00000001"), ct(b.path(), "BDMAP_00000001"));
        assert_eq!(ct(a.path(), "BDMAP_00000002"), ct(b.path(), "BDMAP_00000002"));
        assert_ne!(ct(a.path(), "BDMAP_00000001"), ct(a.path(), "BDMAP_00000002"));
        assert_ne!(ct(a.path(), "BDMAP_00000001"), ct(c.path(), "BDMAP_00000001"));
    }

    #[test]
    fn rewriting_replaces_cases_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_phantom_dataset(dir.path(), &small(1, 1)).expect("first");
        let stray = dir.path().join("BDMAP_00000001").join("stray.txt");
        fs::write(&stray, b"left over").expect("stray");
        write_phantom_dataset(dir.path(), &small(1, 2)).expect("second");
        assert!(!stray.exists(), "the old folder was replaced, not merged into");
        let fresh = tempfile::tempdir().expect("fresh");
        write_phantom_dataset(fresh.path(), &small(1, 2)).expect("fresh");
        let ct = |d: &Path| fs::read(d.join("BDMAP_00000001").join("ct.nii.gz")).expect("ct");
        assert_eq!(ct(dir.path()), ct(fresh.path()));
    }

    #[test]
    fn rejects_unusable_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tiny = SynthOptions {
            shape: [8, 64, 64],
            ..small(1, 0)
        };
        assert!(matches!(
            write_phantom_dataset(dir.path(), &tiny),
            Err(DataError::InvalidOptions { .. })
        ));
        let flat = SynthOptions {
            spacing_mm: 0.0,
            ..small(1, 0)
        };
        assert!(matches!(
            write_phantom_dataset(dir.path(), &flat),
            Err(DataError::InvalidOptions { .. })
        ));
    }

    #[tokio::test]
    async fn twenty_four_default_cases_are_quick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = std::time::Instant::now();
        let ids = write_phantom_dataset(dir.path(), &SynthOptions::default()).expect("write");
        let generated = start.elapsed();
        assert_eq!(ids.len(), 24);
        assert_eq!(ids[23], "BDMAP_00000024");
        let store = LocalFileSystem::new_with_prefix(dir.path()).expect("store");
        let root = object_store::path::Path::default();
        let start = std::time::Instant::now();
        for id in &ids {
            load_case(&store, &root, id).await.expect("load");
        }
        let loaded = start.elapsed();
        eprintln!("24 cases at 64^3: generated in {generated:?}, loaded in {loaded:?}");
    }
}
