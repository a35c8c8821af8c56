//! SuPreM's preprocessing, in Rust, one tested function per step:
//!
//! 1. `orient_ras`: `Orientationd(axcodes="RAS")`;
//! 2. `resample_linear` / `resample_nearest`: `Spacingd(pixdim=1.5 mm, mode=("bilinear",
//!    "nearest"))` (see `resample` for the exact MONAI convention);
//! 3. `window`: `ScaleIntensityRanged(-175, 250, 0, 1, clip=True)`;
//! 4. `foreground_bounds` + `crop` + `pad_to`: `CropForegroundd(source_key="image")`, then
//!    `SpatialPadd(patch)`.
//!
//! [`prepare`] runs them in that order on one case after checking that its geometry is sane,
//! because every later stage trusts it: a header that claims 0.001 mm voxels would otherwise make
//! the resampler allocate terabytes, and a NaN would smear across its neighbours. The random crops
//! and augmentations that follow live in `patch`.

mod foreground;
mod intensity;
mod orient;
mod resample;

pub use foreground::{Bounds, crop, foreground_bounds, pad_before, pad_to};
pub use intensity::{SUPREM_HU_WINDOW, window, window_hu, window_in_place};
pub use orient::orient_ras;
pub use resample::{resample_linear, resample_nearest, resampled_affine, resampled_len, resampled_shape};

use sha2::{Digest, Sha256};

use crate::DataError;
use crate::geometry::{Affine, Volume};

/// Voxel sizes beyond this are not CT: a header claiming them is corrupt.
pub const MAX_SPACING_MM: f64 = 20.0;
/// Longest side a resampled volume may have: 4096 voxels at 1.5 mm is six metres.
pub const MAX_RESAMPLED_SIDE: usize = 4096;
/// Most voxels a resampled volume may have (1 GiB of f32), against headers that would make the
/// resampler allocate without bound. A 512² × 1000-slice scan at 1.5 mm has about 5·10⁷.
pub const MAX_RESAMPLED_VOXELS: usize = 1 << 28;

/// What the preprocessing does; everything but `threads` changes its output, and so the cache key.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Target voxel size along the RAS axes x, y, z, in mm.
    pub spacing_mm: [f64; 3],
    /// HU window mapped to 0..1.
    pub hu_min: f32,
    pub hu_max: f32,
    /// Patch size `[D, H, W]`: volumes smaller than this are padded up to it.
    pub patch: [usize; 3],
    /// Threads one `prepare` call may use (results are identical for any value).
    pub threads: usize,
}

impl Default for PreprocessConfig {
    /// SuPreM's settings, on one thread (a loader runs several cases at once).
    fn default() -> Self {
        PreprocessConfig {
            spacing_mm: [1.5; 3],
            hu_min: SUPREM_HU_WINDOW.0,
            hu_max: SUPREM_HU_WINDOW.1,
            patch: [96; 3],
            threads: 1,
        }
    }
}

impl PreprocessConfig {
    /// The run's preprocessing: its `[preprocess]` table and its `train.patch`.
    pub fn from_run_spec(spec: &protocol::spec::RunSpec) -> Self {
        let p = &spec.preprocess;
        PreprocessConfig {
            spacing_mm: p.spacing_mm,
            hu_min: p.hu_min as f32,
            hu_max: p.hu_max as f32,
            patch: spec.train.patch.map(|s| s as usize),
            threads: 1,
        }
    }

    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |reason: String| Err(DataError::InvalidPreprocess { reason });
        if self
            .spacing_mm
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0 && *s <= MAX_SPACING_MM))
        {
            return bad(format!(
                "spacing_mm {:?}: every side must be in (0, {MAX_SPACING_MM}] mm",
                self.spacing_mm
            ));
        }
        if !(self.hu_min.is_finite() && self.hu_max.is_finite() && self.hu_min < self.hu_max) {
            return bad(format!(
                "HU window {}..{} must be finite with hu_min < hu_max",
                self.hu_min, self.hu_max
            ));
        }
        if self.patch.iter().any(|&p| p == 0 || p > 1024) {
            return bad(format!("patch {:?}: every side must be in 1..=1024", self.patch));
        }
        Ok(())
    }

    /// The encoding the cache key hashes: versioned, fixed field order, shortest round-trip
    /// float formatting, so equal configs hash equally on every platform and build.
    pub fn canonical(&self) -> String {
        let [x, y, z] = self.spacing_mm;
        let [d, h, w] = self.patch;
        format!(
            "voxelfleet-preprocess/1;spacing_mm={x:?},{y:?},{z:?};hu={:?},{:?};patch={d},{h},{w}",
            self.hu_min, self.hu_max
        )
    }

    /// Cache key of this config: the first 16 hex digits of the SHA-256 of [`Self::canonical`].
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        hex::encode(&digest[..8])
    }
}

/// A case after preprocessing, in the `[D, H, W]` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub shape: [usize; 3],
    /// Windowed intensities, 0..1.
    pub image: Vec<f32>,
    /// Per-voxel class bitmask.
    pub labels: Vec<u32>,
    /// Voxel size along x, y, z in mm: the config's target spacing.
    pub spacing: [f64; 3],
}

/// Runs the whole preprocessing on one case: orient → resample → window → crop foreground → pad.
/// `case` names the case in every error.
pub fn prepare(
    case: &str,
    ct: Volume<f32>,
    labels: Volume<u32>,
    cfg: &PreprocessConfig,
) -> Result<Prepared, DataError> {
    let resampled = prepare_uncropped(case, ct, labels, cfg)?;
    crop_and_pad(case, resampled, cfg.patch)
}

/// The first half of [`prepare`]: orient, resample and window, without cropping, which is the
/// stage a case cache stores.
pub fn prepare_uncropped(
    case: &str,
    ct: Volume<f32>,
    labels: Volume<u32>,
    cfg: &PreprocessConfig,
) -> Result<Prepared, DataError> {
    cfg.validate()?;
    check_case(case, &ct, &labels, cfg)?;
    let threads = cfg.threads.max(1);
    let ct = orient_ras(ct);
    let labels = orient_ras(labels);
    let mut image = resample_linear(&ct, cfg.spacing_mm, threads);
    drop(ct);
    let labels = resample_nearest(&labels, cfg.spacing_mm, threads);
    window_in_place(&mut image.data, cfg.hu_min, cfg.hu_max);
    Ok(Prepared {
        shape: image.shape,
        image: image.data,
        labels: labels.data,
        spacing: cfg.spacing_mm,
    })
}

/// The second half of [`prepare`]: crop image and labels to the image's foreground, then pad both
/// to `patch`. A case with no voxel above the window floor is an error rather than MONAI's empty
/// crop padded with zeros: such a "CT" holds no tissue, and training on blank patches would hide
/// the broken file instead of quarantining it.
pub fn crop_and_pad(case: &str, p: Prepared, patch: [usize; 3]) -> Result<Prepared, DataError> {
    let Some(bounds) = foreground_bounds(&p.image, p.shape) else {
        return Err(corrupt(
            case,
            "no CT voxel lies above the HU window floor (no foreground)".into(),
        ));
    };
    let image = crop(&p.image, p.shape, bounds);
    let labels = crop(&p.labels, p.shape, bounds);
    let (image, shape) = pad_to(image, bounds.shape(), patch, 0.0);
    let (labels, _) = pad_to(labels, bounds.shape(), patch, 0);
    Ok(Prepared {
        shape,
        image,
        labels,
        spacing: p.spacing,
    })
}

fn corrupt(case: &str, reason: String) -> DataError {
    DataError::Corrupt {
        key: case.to_string(),
        reason,
    }
}

/// Rejects what would make the pipeline produce garbage or allocate without bound.
///
/// Non-finite CT voxels are rejected, not replaced: a NaN has no Hounsfield value to stand for,
/// trilinear resampling would spread it to every output voxel that touches it, and any replacement
/// (air? water?) invents anatomy. A file holding them is corrupt and belongs in quarantine.
fn check_case(case: &str, ct: &Volume<f32>, labels: &Volume<u32>, cfg: &PreprocessConfig) -> Result<(), DataError> {
    if labels.shape != ct.shape {
        return Err(DataError::ShapeMismatch {
            key: format!("{case} labels"),
            expected: ct.shape,
            found: labels.shape,
        });
    }
    let voxels = ct.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if voxels.is_none_or(|n| n == 0 || n != ct.data.len() || n != labels.data.len()) {
        return Err(corrupt(
            case,
            format!(
                "shape {:?} does not match {} CT and {} label voxels",
                ct.shape,
                ct.data.len(),
                labels.data.len()
            ),
        ));
    }
    check_affine(case, "CT", &ct.affine)?;
    if !affines_agree(&ct.affine, &labels.affine) {
        return Err(corrupt(
            case,
            format!(
                "the masks' affine {:?} differs from the CT's {:?}",
                labels.affine, ct.affine
            ),
        ));
    }
    let Some(plan) = orient::ras_plan(&ct.affine) else {
        return Err(corrupt(case, format!("CT affine {:?} has no orientation", ct.affine)));
    };
    // The output size is independent of the axis order: input axis j becomes RAS axis a.
    let spacing = ct.spacing();
    let n_in = [ct.shape[2], ct.shape[1], ct.shape[0]];
    let mut total = 1.0f64;
    for (a, &(j, _)) in plan.iter().enumerate() {
        let len = (n_in[j] as f64 - 1.0) * spacing[j] / cfg.spacing_mm[a] + 1.0;
        if len > MAX_RESAMPLED_SIDE as f64 {
            return Err(corrupt(
                case,
                format!(
                    "{} voxels of {} mm along axis {j} would resample to {len:.0} > {MAX_RESAMPLED_SIDE}",
                    n_in[j], spacing[j]
                ),
            ));
        }
        total *= len.round();
    }
    if total > MAX_RESAMPLED_VOXELS as f64 {
        return Err(corrupt(
            case,
            format!("would resample to {total:.0} voxels, more than {MAX_RESAMPLED_VOXELS}"),
        ));
    }
    if let Some(i) = ct.data.iter().position(|v| !v.is_finite()) {
        return Err(corrupt(
            case,
            format!("CT voxel {i} is {} (not a number of HU)", ct.data[i]),
        ));
    }
    Ok(())
}

fn check_affine(case: &str, what: &str, affine: &Affine) -> Result<(), DataError> {
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(corrupt(case, format!("{what} affine {affine:?} is not finite")));
    }
    let spacing = crate::geometry::spacing(affine);
    if spacing.iter().any(|s| !(*s > 0.0 && *s <= MAX_SPACING_MM)) {
        return Err(corrupt(
            case,
            format!("{what} voxel size {spacing:?} mm is outside (0, {MAX_SPACING_MM}]"),
        ));
    }
    Ok(())
}

/// Same grid within what float32 headers written by different tools can disagree by: 1e-4 mm in
/// the voxel axes, 1e-2 mm in the origin.
fn affines_agree(a: &Affine, b: &Affine) -> bool {
    (0..3).all(|r| (0..3).all(|c| (a[r][c] - b[r][c]).abs() <= 1e-4) && (a[r][3] - b[r][3]).abs() <= 1e-2)
}

#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
