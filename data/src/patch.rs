//! Training crops and whole-volume padding, the last step before voxels become tensors.
//!
//! Crops follow SuPreM's MONAI pipeline: `SpatialPadd` to the patch size, then
//! `RandCropByPosNegLabeld(pos=2, neg=1, image_threshold=0)`: the centre is a foreground voxel
//! (any class) with probability pos/(pos+neg), else a background voxel (no class and image > 0,
//! MONAI's `image_threshold=0`), then `RandRotate90d` and `RandShiftIntensityd` (see
//! `crate::augment`). Every draw comes from the caller's rng in a fixed order, so a sample keyed
//! by its global index always yields the same patch.
//!
//! Outputs are flat buffers ready for burn: the image is `[P0, P1, P2]` and the labels are
//! channel-major `[NUM_CLASSES, P0, P1, P2]`, both in the `[z, y, x]` layout of `CaseVolume`.

use protocol::classes::NUM_CLASSES;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::augment::{rot90_yx, shift_intensity};
use crate::volume::{CaseVolume, dequantise};

/// The random crop and its augmentations. `CropConfig::suprem` holds SuPreM's values; the
/// integrator fills these from the run spec's `[preprocess]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CropConfig {
    /// Patch size `[z, y, x]`.
    pub patch: [usize; 3],
    /// Foreground : background centre ratio (MONAI's `pos`, `neg`).
    pub pos: u32,
    pub neg: u32,
    /// Probability of a quarter-turn rotation in the (y, x) plane, k uniform in 1..=3.
    pub rot90_prob: f64,
    /// Probability of an intensity shift, offset uniform in `[-shift_offset, shift_offset)`.
    pub shift_prob: f64,
    pub shift_offset: f32,
}

impl CropConfig {
    /// A run's crops: its `train.patch` and the knobs of its `[preprocess]` table.
    pub fn from_run_spec(spec: &protocol::spec::RunSpec) -> Self {
        let p = &spec.preprocess;
        CropConfig {
            patch: spec.train.patch.map(|n| n as usize),
            pos: p.pos,
            neg: p.neg,
            rot90_prob: p.rot90_prob,
            shift_prob: p.shift_prob,
            shift_offset: p.shift_offset as f32,
        }
    }

    /// SuPreM's recipe: pos 2, neg 1, rot90 p = 0.1, shift ±0.1 with p = 0.2.
    pub fn suprem(patch: [usize; 3]) -> Self {
        CropConfig {
            patch,
            pos: 2,
            neg: 1,
            rot90_prob: 0.1,
            shift_prob: 0.2,
            shift_offset: 0.1,
        }
    }

    /// Plain crops: no rotation, no shift (evaluation-like inputs, tests).
    pub fn without_augmentation(mut self) -> Self {
        self.rot90_prob = 0.0;
        self.shift_prob = 0.0;
        self
    }

    pub fn voxels(&self) -> usize {
        self.patch.iter().product()
    }
}

/// One training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// `P0 * P1 * P2` windowed intensities; 0.0 where the patch hangs over the volume's edge
    /// (before any intensity shift, which moves padding too, as MONAI's does).
    pub image: Vec<f32>,
    /// `NUM_CLASSES * P0 * P1 * P2` targets, 0.0 or 1.0, channel-major.
    pub labels: Vec<f32>,
}

/// What a sample drew, for statistics and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Flat voxel index of the crop centre before the shift that keeps the crop inside.
    pub centre: usize,
    /// Whether the centre is a labelled voxel.
    pub foreground: bool,
    /// Quarter turns applied (0 when none).
    pub rot90: u8,
    /// Intensity offset applied, if any.
    pub shift: Option<f32>,
}

/// Uniform background draws before the deterministic scan takes over. A background share of 5%
/// still finds one in 64 draws with probability 96%.
const BACKGROUND_TRIES: usize = 64;

fn is_background(vol: &CaseVolume, i: usize) -> bool {
    vol.labels()[i] == 0 && vol.image()[i] > 0
}

/// A background voxel (no label, image > 0): uniform by rejection sampling, then, if that found
/// none, the first one at or after a random start (wrapping), so the result stays a function of
/// the rng. `None` when the volume has no background at all.
fn background_voxel(vol: &CaseVolume, n: usize, rng: &mut ChaCha8Rng) -> Option<usize> {
    for _ in 0..BACKGROUND_TRIES {
        let i = rng.random_range(0..n);
        if is_background(vol, i) {
            return Some(i);
        }
    }
    let start = rng.random_range(0..n);
    (start..n).chain(0..start).find(|&i| is_background(vol, i))
}

/// Draws the crop centre as a flat voxel index and whether it is foreground. As in MONAI, a
/// volume without foreground takes background centres and one without background takes
/// foreground ones; with neither (an empty image), the middle voxel.
pub(crate) fn choose_centre(vol: &CaseVolume, cfg: &CropConfig, rng: &mut ChaCha8Rng) -> Option<(usize, bool)> {
    let n = vol.voxel_count().min(vol.image().len()).min(vol.labels().len());
    if n == 0 {
        return None;
    }
    let fg = vol.foreground();
    let pick_fg = |rng: &mut ChaCha8Rng| {
        let i = fg[rng.random_range(0..fg.len())] as usize;
        (i < n).then_some((i, true))
    };
    let total = (cfg.pos + cfg.neg).max(1);
    let want_fg = rng.random_range(0..total) < cfg.pos;
    if want_fg && !fg.is_empty() {
        return pick_fg(rng);
    }
    if let Some(i) = background_voxel(vol, n, rng) {
        return Some((i, false));
    }
    if !fg.is_empty() {
        return pick_fg(rng);
    }
    Some((n / 2, false))
}

/// Samples a crop of `cfg.patch` (`[z, y, x]`) and augments it. Along an axis where the volume
/// is at least as long as the patch, the crop is centred on the chosen voxel and shifted to stay
/// inside the volume. Along an axis where the volume is shorter, the whole axis is taken and
/// zero-padded symmetrically (extra voxel at the far end), like MONAI's `SpatialPad`. A volume
/// with no voxels yields an all-zero patch.
pub fn sample_patch(vol: &CaseVolume, cfg: &CropConfig, rng: &mut ChaCha8Rng) -> Patch {
    sample_patch_with_draw(vol, cfg, rng).0
}

/// `sample_patch`, also saying what was drawn. Draw order (fixed, so a seed always replays the
/// same patch): centre (fg/bg choice, then the voxel), rotate?, k, shift?, offset. The last four
/// are always drawn, applied or not, so the centre's draws never shift the augmentation stream's
/// meaning.
pub fn sample_patch_with_draw(vol: &CaseVolume, cfg: &CropConfig, rng: &mut ChaCha8Rng) -> (Patch, Draw) {
    let patch = cfg.patch;
    let centre = choose_centre(vol, cfg, rng);
    let rotate = rng.random::<f64>() < cfg.rot90_prob;
    let k = rng.random_range(1..=3u8);
    let shift = rng.random::<f64>() < cfg.shift_prob;
    // Uniform in [-offset, offset), one draw whatever the offset (0 included).
    let offset = cfg.shift_offset * (2.0 * rng.random::<f32>() - 1.0);

    let (mut image, mut bits, centre, foreground) = match centre {
        Some((centre, foreground)) => {
            let c = vol.coords(centre);
            let start = [0, 1, 2].map(|a| crop_start(c[a], vol.shape[a], patch[a]));
            let (image, bits) = crop_compact(vol, start, patch);
            (image, bits, centre, foreground)
        }
        None => {
            let n = cfg.voxels();
            (vec![0.0; n], vec![0u32; n], 0, false)
        }
    };
    // Odd turns of a non-square (y, x) plane would change the patch's shape: skipped.
    let k = if rotate && (k == 2 || patch[1] == patch[2]) {
        k
    } else {
        0
    };
    rot90_yx(&mut image, patch, k);
    rot90_yx(&mut bits, patch, k);
    let shift = shift.then_some(offset);
    if let Some(offset) = shift {
        shift_intensity(&mut image, offset);
    }
    let labels = expand_labels(&bits);
    let draw = Draw {
        centre,
        foreground,
        rot90: k,
        shift,
    };
    (Patch { image, labels }, draw)
}

fn crop_start(centre: usize, len: usize, size: usize) -> isize {
    if len >= size {
        (centre as isize - (size / 2) as isize).clamp(0, (len - size) as isize)
    } else {
        -(((size - len) / 2) as isize)
    }
}

/// The whole volume zero-padded at the far end of each axis up to a multiple of `multiple` (a
/// network with k stride-2 stages needs 2^k). Returns the image, channel-major labels and the
/// padded shape. Padding is only ever appended, so voxel `(z, y, x)` of the result is voxel
/// `(z, y, x)` of the volume, and predictions map back by cropping `[0..D, 0..H, 0..W]` with
/// `vol.shape`. `multiple` 0 is treated as 1 (no padding).
pub fn whole_volume(vol: &CaseVolume, multiple: usize) -> (Vec<f32>, Vec<f32>, [usize; 3]) {
    let m = multiple.max(1);
    let padded = vol.shape.map(|d| d.div_ceil(m) * m);
    let (image, bits) = crop_compact(vol, [0, 0, 0], padded);
    (image, expand_labels(&bits), padded)
}

/// Bitmask labels to channel-major 0/1 targets.
fn expand_labels(bits: &[u32]) -> Vec<f32> {
    let plane = bits.len();
    let mut labels = vec![0.0f32; NUM_CLASSES * plane];
    for (i, &b) in bits.iter().enumerate() {
        let mut b = b;
        while b != 0 {
            let c = b.trailing_zeros() as usize;
            b &= b - 1;
            if c < NUM_CLASSES {
                labels[c * plane + i] = 1.0;
            }
        }
    }
    labels
}

/// Copies the box starting at `start` (may be negative or run past the end) of size `size`:
/// dequantised intensities and bitmask labels, zeros wherever the box lies outside the volume.
/// Reads x-runs straight from the volume's (possibly mapped) arrays.
fn crop_compact(vol: &CaseVolume, start: [isize; 3], size: [usize; 3]) -> (Vec<f32>, Vec<u32>) {
    let [pd, ph, pw] = size;
    let plane = pd * ph * pw;
    let mut image = vec![0.0f32; plane];
    let mut bits = vec![0u32; plane];
    let [d, h, w] = vol.shape;
    let (src_image, src_labels) = (vol.image(), vol.labels());
    if src_image.len() < d * h * w || src_labels.len() < d * h * w {
        return (image, bits);
    }
    // The x-run overlapping the volume is the same for every row.
    let x0 = start[2].max(0) as usize;
    let x1 = (start[2] + pw as isize).clamp(0, w as isize) as usize;
    if x0 >= x1 {
        return (image, bits);
    }
    let px0 = (x0 as isize - start[2]) as usize;
    let run = x1 - x0;
    for pz in 0..pd {
        let z = start[0] + pz as isize;
        if z < 0 || z >= d as isize {
            continue;
        }
        for py in 0..ph {
            let y = start[1] + py as isize;
            if y < 0 || y >= h as isize {
                continue;
            }
            let src = (z as usize * h + y as usize) * w;
            let dst = (pz * ph + py) * pw + px0;
            for (o, &q) in image[dst..dst + run].iter_mut().zip(&src_image[src + x0..src + x1]) {
                *o = dequantise(q);
            }
            bits[dst..dst + run].copy_from_slice(&src_labels[src + x0..src + x1]);
        }
    }
    (image, bits)
}

#[cfg(test)]
#[path = "patch_tests.rs"]
mod tests;
