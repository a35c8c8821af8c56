//! Synthetic AbdomenAtlas 1.1 datasets: real gzip NIfTI-1 files with phantom anatomy.
//!
//! Tests, demos and CI need a dataset that exercises the exact production path (object store →
//! gunzip → NIfTI decode → masks) and that a small model can visibly learn, without shipping
//! gigabytes of CT. The anatomy lives in `synth_anatomy`; this module owns options, determinism
//! and the on-disk layout.
//!
//! Like real scans, the files are anisotropic (0.8 × 0.8 × 2.5 mm by default) and in the LPS voxel
//! order CT scanners write, so every demo runs SuPreM's reorientation and resampling. The anatomy
//! is rendered in physical space, so after `preprocess` resamples a case to 1.5 mm it is the
//! phantom of `SynthOptions::shape` voxels the generator was designed for.

use std::fs;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use protocol::classes::CLASSES;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::DataError;
use crate::geometry::Affine;
use crate::nifti_write::{HeaderInfo, Voxels, centred_ras_affine, write_gz};
use crate::synth_anatomy::render;
use crate::synth_raster::Grid;

/// The voxel size (mm, every axis) the phantom anatomy is designed at: SuPreM's training spacing.
pub const TRAINING_SPACING_MM: f32 = 1.5;

/// The voxel axis order of the written files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhantomOrientation {
    /// Voxel axes run to the patient's left, posterior, superior: what CT scanners write
    /// (affine diagonal `(-sx, -sy, sz)`).
    Lps,
    /// Voxel axes run right, anterior, superior: already SuPreM's orientation.
    Ras,
}

/// What to generate. Case `i` is a pure function of `(seed, i)` and the geometry options, so a
/// worker and a test can regenerate the same dataset independently.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub cases: usize,
    pub seed: u64,
    /// `[D, H, W]` = `[z, y, x]` of a case once resampled to [`TRAINING_SPACING_MM`]: the field
    /// of view is `(shape - 1) × 1.5 mm` between the outer voxel centres. The files themselves
    /// have [`SynthOptions::file_shape`].
    pub shape: [usize; 3],
    /// Voxel size of the written files along x, y, z, in mm.
    pub spacing_mm: [f32; 3],
    pub orientation: PhantomOrientation,
}

impl Default for SynthOptions {
    /// 24 cases that resample to 64³, written at 0.8 × 0.8 × 2.5 mm in LPS (119 × 119 × 39).
    fn default() -> Self {
        SynthOptions {
            cases: 24,
            seed: 0,
            shape: [64, 64, 64],
            spacing_mm: [0.8, 0.8, 2.5],
            orientation: PhantomOrientation::Lps,
        }
    }
}

impl SynthOptions {
    /// `[D, H, W]` of the written files: the field of view of `shape` at `spacing_mm`, so that
    /// MONAI-style resampling to 1.5 mm gives back `shape` (within a voxel where the spacings do
    /// not divide evenly).
    pub fn file_shape(&self) -> [usize; 3] {
        let [x, y, z] = self.spacing_mm;
        let along = |n: usize, s: f32| ((n as f32 - 1.0) * TRAINING_SPACING_MM / s).round() as usize + 1;
        [
            along(self.shape[0], z),
            along(self.shape[1], y),
            along(self.shape[2], x),
        ]
    }

    /// The affine written into every file of a case: volume centre at the world origin.
    pub fn affine(&self) -> Affine {
        let file_shape = self.file_shape();
        let mut affine = centred_ras_affine(file_shape, self.spacing_mm.map(f64::from));
        if self.orientation == PhantomOrientation::Lps {
            // Same world positions, x and y voxel axes reversed: negate those columns and
            // move the origin to the old last voxel, which for a centred volume is the mirror.
            for (j, row) in affine.iter_mut().enumerate().take(2) {
                row[j] = -row[j];
                row[3] = -row[3];
            }
        }
        affine
    }
}

/// The smallest grid on which every structure, including the adrenals, still gets voxels.
const MIN_SIDE: usize = 16;
/// Mask labels are painted as u8 and indices must fit u32; 1024³ is far beyond any phantom use.
const MAX_SIDE: usize = 1024;
/// A written file may not exceed this many voxels (1 GiB as f32) however fine its spacing.
const MAX_FILE_VOXELS: usize = 1 << 28;

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
    if opts
        .spacing_mm
        .iter()
        .any(|s| !(s.is_finite() && *s >= 0.05 && *s <= 20.0))
    {
        return bad(format!(
            "spacing_mm {:?}: every side must be in 0.05..=20 mm",
            opts.spacing_mm
        ));
    }
    let file_shape = opts.file_shape();
    if file_shape.contains(&1) || file_shape.iter().product::<usize>() > MAX_FILE_VOXELS {
        return bad(format!(
            "shape {:?} at {:?} mm gives files of {file_shape:?} voxels: each side needs 2 or more, \
             and at most {MAX_FILE_VOXELS} voxels in all",
            opts.shape, opts.spacing_mm
        ));
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
    let file_shape = opts.file_shape();
    let [sx, sy, sz] = opts.spacing_mm;
    let grid = Grid {
        dims: file_shape,
        step: [sz, sy, sx].map(|s| s / TRAINING_SPACING_MM),
    };
    let mut phantom = render(opts.shape, grid, &mut case_rng(opts.seed, index));
    if opts.orientation == PhantomOrientation::Lps {
        flip_x_and_y(&mut phantom.hu, file_shape);
        flip_x_and_y(&mut phantom.label, file_shape);
    }
    let pid = std::process::id();
    let staging = out_dir.join(format!(".tmp-{id}-{pid}"));
    remove_if_present(&staging)?;
    let seg_dir = staging.join("segmentations");
    fs::create_dir_all(&seg_dir).map_err(|e| DataError::io(&seg_dir, e))?;

    let description = format!("voxelfleet phantom seed={} case={id}", opts.seed);
    let ct_info = HeaderInfo {
        affine: opts.affine(),
        description: &description,
        is_label: false,
    };
    write_gz(
        &staging.join("ct.nii.gz"),
        file_shape,
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
            file_shape,
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

/// Reverses the x and y voxel axes of a `[z, y, x]` buffer: RAS voxel order to LPS.
fn flip_x_and_y<T>(data: &mut [T], shape: [usize; 3]) {
    let [_, h, w] = shape;
    for slice in data.chunks_exact_mut(h * w) {
        // Reversing a whole slice reverses both its rows and the order of its rows.
        slice.reverse();
    }
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
    use crate::geometry::{Volume, axcodes};
    use crate::loader::{list_cases, load_case};
    use crate::nifti_read::decode;
    use crate::preprocess::{PreprocessConfig, prepare, prepare_uncropped};
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
            // The loader does not resample: it sees the files' own LPS grid.
            assert_eq!(vol.shape, [39, 119, 119]);
            assert_eq!(vol.shape, opts.file_shape());
            assert_eq!(vol.image().len(), 39 * 119 * 119);
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

    /// Reads a written case back as the preprocessing takes it: volumes with their affines.
    fn read_case(case: &Path) -> (Volume<f32>, Volume<u32>) {
        use nifti::NiftiObject;
        let read = |path: &Path| {
            let bytes = fs::read(path).expect("read");
            let header = nifti::ReaderOptions::new()
                .read_file(path)
                .expect("header")
                .header()
                .clone();
            let rows = [header.srow_x, header.srow_y, header.srow_z];
            let mut affine = crate::geometry::identity();
            for (r, row) in rows.iter().enumerate() {
                affine[r] = row.map(f64::from);
            }
            (bytes, affine)
        };
        let (bytes, affine) = read(&case.join("ct.nii.gz"));
        let ct = decode::<f32>(&bytes, "ct").expect("ct");
        let mut labels = vec![0u32; ct.data.len()];
        for (c, class) in CLASSES.iter().enumerate() {
            let (bytes, mask_affine) = read(&case.join("segmentations").join(format!("{class}.nii.gz")));
            assert_eq!(mask_affine, affine, "{class}");
            let mask = decode::<u8>(&bytes, class).expect("mask");
            for (l, m) in labels.iter_mut().zip(mask.data) {
                *l |= u32::from(m != 0) << c;
            }
        }
        let labels = Volume {
            shape: ct.shape,
            data: labels,
            affine,
        };
        let ct = Volume {
            shape: ct.shape,
            data: ct.data,
            affine,
        };
        (ct, labels)
    }

    #[test]
    fn phantoms_resample_to_the_anatomy_they_were_designed_as() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = small(2, 9);
        write_phantom_dataset(dir.path(), &opts).expect("write");
        let cfg = PreprocessConfig::default();
        for index in 0..2 {
            let (ct, labels) = read_case(&dir.path().join(case_id(index)));
            assert_eq!(axcodes(&ct.affine), ['L', 'P', 'S']);
            let p = prepare_uncropped("phantom", ct, labels, &cfg).expect("prepare");
            assert_eq!(p.shape, [64, 64, 64]);
            // The same case rendered straight onto the 1.5 mm grid, in RAS.
            let designed = render(opts.shape, Grid::unit(opts.shape), &mut case_rng(opts.seed, index));
            let agree = p
                .labels
                .iter()
                .zip(&designed.label)
                .filter(|(l, d)| **l == if **d == 0 { 0 } else { 1 << (**d - 1) })
                .count();
            let fraction = agree as f64 / p.labels.len() as f64;
            assert!(
                fraction > 0.97,
                "case {index}: {fraction} of voxels carry the designed label"
            );
            let liver = 1 + class_index("liver").expect("liver") as u8;
            let (mut both, mut ours, mut theirs) = (0, 0, 0);
            for (l, d) in p.labels.iter().zip(&designed.label) {
                let (a, b) = (*l == 1 << (liver - 1), *d == liver);
                both += usize::from(a && b);
                ours += usize::from(a);
                theirs += usize::from(b);
            }
            let dice = 2.0 * both as f64 / (ours + theirs) as f64;
            // Painted-over vessels and 2.5 mm slices through a lobulated outline cost a little.
            assert!(dice > 0.9, "case {index}: liver Dice {dice}");
            // Windowed HU agree too, up to noise (sigma <= 25 HU, smoothed by the resampling).
            let hu: Vec<f32> = designed.hu.iter().map(|v| window_hu(*v as f32)).collect();
            let mean_abs = p.image.iter().zip(&hu).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / hu.len() as f64;
            assert!(mean_abs < 0.05, "case {index}: mean |windowed difference| {mean_abs}");

            let (ct, labels) = read_case(&dir.path().join(case_id(index)));
            let cropped = prepare(
                "phantom",
                ct,
                labels,
                &PreprocessConfig {
                    patch: [32; 3],
                    ..cfg.clone()
                },
            )
            .expect("prepare");
            // Air goes: the body spans the full height but not the full width.
            assert_eq!(cropped.shape[0], 64);
            assert!(cropped.shape[1] < 60 && cropped.shape[2] < 64, "{:?}", cropped.shape);
        }
    }

    #[test]
    fn ras_phantoms_at_the_training_spacing_are_written_as_designed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = SynthOptions {
            shape: [16, 20, 24],
            spacing_mm: [1.5; 3],
            orientation: PhantomOrientation::Ras,
            ..small(1, 4)
        };
        assert_eq!(opts.file_shape(), [16, 20, 24]);
        write_phantom_dataset(dir.path(), &opts).expect("write");
        let (ct, labels) = read_case(&dir.path().join(case_id(0)));
        assert_eq!(axcodes(&ct.affine), ['R', 'A', 'S']);
        let designed = render(opts.shape, Grid::unit(opts.shape), &mut case_rng(opts.seed, 0));
        let hu: Vec<f32> = designed.hu.iter().map(|v| *v as f32).collect();
        assert_eq!(ct.data, hu);
        let bits: Vec<u32> = designed
            .label
            .iter()
            .map(|d| if *d == 0 { 0 } else { 1 << (d - 1) })
            .collect();
        assert_eq!(labels.data, bits);
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
        assert_eq!(&h.dim[..4], &[3, 119, 119, 39]);
        assert_eq!(h.pixdim[..4], [1.0, 0.8, 0.8, 2.5]);
        assert_eq!(h.scl_slope, 1.0);
        // LPS, centred: x and y run towards the patient's left and back.
        assert_eq!(h.srow_x, [-0.8, 0.0, 0.0, 0.8 * 59.0]);
        assert_eq!(h.srow_y, [0.0, -0.8, 0.0, 0.8 * 59.0]);
        assert_eq!(h.srow_z, [0.0, 0.0, 2.5, -2.5 * 19.0]);
        // A 180° turn about z: quaternion (b, c, d) = (0, 0, 1).
        assert_eq!((h.quatern_b, h.quatern_c, h.quatern_d), (0.0, 0.0, 1.0));
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
        for spacing_mm in [[0.0, 0.8, 2.5], [0.8, f32::NAN, 2.5], [0.8, 0.8, 40.0]] {
            let bad = SynthOptions {
                spacing_mm,
                ..small(1, 0)
            };
            assert!(
                matches!(
                    write_phantom_dataset(dir.path(), &bad),
                    Err(DataError::InvalidOptions { .. })
                ),
                "{spacing_mm:?}"
            );
        }
        // 64³ at 1.5 mm written at 0.05 mm would be 1891³ voxels per file.
        let huge = SynthOptions {
            spacing_mm: [0.05; 3],
            ..small(1, 0)
        };
        let err = write_phantom_dataset(dir.path(), &huge).expect_err("too many voxels");
        assert!(err.to_string().contains("1891"), "{err}");
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
