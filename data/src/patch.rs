//! Training crops and whole-volume padding, the last step before voxels become tensors.
//!
//! Crops follow SuPreM: a 96³-style patch centred on a foreground voxel with probability 2/3 and
//! on any voxel otherwise, so rare organs are seen far more often than their volume share.
//! Outputs are flat buffers ready for burn: the image is `[P0, P1, P2]` and the labels are
//! channel-major `[NUM_CLASSES, P0, P1, P2]`, both in the `[z, y, x]` layout of `CaseVolume`.

use protocol::classes::NUM_CLASSES;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::volume::CaseVolume;

/// One training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// `P0 * P1 * P2` windowed intensities; 0.0 where the patch hangs over the volume's edge.
    pub image: Vec<f32>,
    /// `NUM_CLASSES * P0 * P1 * P2` targets, 0.0 or 1.0, channel-major.
    pub labels: Vec<f32>,
}

/// Draws the crop centre as a flat voxel index: foreground with probability 2/3 (when the volume
/// has any), uniform otherwise. Integer draws keep it exactly reproducible from the rng state.
pub(crate) fn choose_centre(vol: &CaseVolume, rng: &mut ChaCha8Rng) -> Option<usize> {
    let n = vol.voxel_count().min(vol.image.len()).min(vol.labels.len());
    if n == 0 {
        return None;
    }
    let foreground = rng.random_range(0..3u32) < 2;
    if foreground && !vol.foreground.is_empty() {
        let i = vol.foreground[rng.random_range(0..vol.foreground.len())] as usize;
        if i < n {
            return Some(i);
        }
    }
    Some(rng.random_range(0..n))
}

/// Samples a crop of size `patch` (`[z, y, x]`). Along an axis where the volume is at least as
/// long as the patch, the crop is centred on the chosen voxel and shifted to stay inside the
/// volume. Along an axis where the volume is shorter, the whole axis is taken and zero-padded
/// symmetrically (extra voxel at the far end), like MONAI's `SpatialPad` in SuPreM's pipeline.
/// A volume with no voxels yields an all-zero patch.
pub fn sample_patch(vol: &CaseVolume, patch: [usize; 3], rng: &mut ChaCha8Rng) -> Patch {
    let Some(centre) = choose_centre(vol, rng) else {
        let n = patch.iter().product::<usize>();
        return Patch {
            image: vec![0.0; n],
            labels: vec![0.0; NUM_CLASSES * n],
        };
    };
    let c = vol.coords(centre);
    let start = [0, 1, 2].map(|a| crop_start(c[a], vol.shape[a], patch[a]));
    let (image, labels) = crop(vol, start, patch);
    Patch { image, labels }
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
    let (image, labels) = crop(vol, [0, 0, 0], padded);
    (image, labels, padded)
}

/// Copies the box starting at `start` (may be negative or run past the end) of size `size`,
/// filling whatever lies outside the volume with zeros.
fn crop(vol: &CaseVolume, start: [isize; 3], size: [usize; 3]) -> (Vec<f32>, Vec<f32>) {
    let [pd, ph, pw] = size;
    let plane = pd * ph * pw;
    let mut image = vec![0.0f32; plane];
    let mut labels = vec![0.0f32; NUM_CLASSES * plane];
    let [d, h, w] = vol.shape;
    if vol.image.len() < d * h * w || vol.labels.len() < d * h * w {
        return (image, labels);
    }
    // The x-run overlapping the volume is the same for every row.
    let x0 = start[2].max(0) as usize;
    let x1 = (start[2] + pw as isize).clamp(0, w as isize) as usize;
    if x0 >= x1 {
        return (image, labels);
    }
    let px0 = (x0 as isize - start[2]) as usize;
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
            let run = x1 - x0;
            image[dst..dst + run].copy_from_slice(&vol.image[src + x0..src + x1]);
            for (k, &bits) in vol.labels[src + x0..src + x1].iter().enumerate() {
                let mut bits = bits;
                while bits != 0 {
                    let c = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if c < NUM_CLASSES {
                        labels[c * plane + dst + k] = 1.0;
                    }
                }
            }
        }
    }
    (image, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A volume whose image value encodes the voxel index, with a few labelled voxels.
    fn volume(shape: [usize; 3], labelled: &[(usize, u32)]) -> CaseVolume {
        let n = shape.iter().product::<usize>();
        let image = (0..n).map(|i| i as f32 + 1.0).collect();
        let mut labels = vec![0u32; n];
        for &(i, bits) in labelled {
            labels[i] = bits;
        }
        CaseVolume::new("t".into(), shape, image, labels)
    }

    #[test]
    fn foreground_centres_about_two_thirds_of_draws() {
        // 8 foreground voxels in 32768: uniform draws almost never hit them, so the fraction of
        // 1x1x1 patches that are foreground measures the foreground-centre probability.
        let fg: Vec<(usize, u32)> = (0..8).map(|i| (1000 + i * 37, 1 << 4)).collect();
        let vol = volume([32, 32, 32], &fg);
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let draws = 3000;
        let hits = (0..draws)
            .filter(|_| sample_patch(&vol, [1, 1, 1], &mut rng).labels[4] == 1.0)
            .count();
        let fraction = hits as f64 / draws as f64;
        assert!((0.55..=0.78).contains(&fraction), "foreground fraction {fraction}");
    }

    #[test]
    fn no_foreground_samples_uniformly() {
        let vol = volume([4, 4, 4], &[]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen = [false; 64];
        for _ in 0..2000 {
            let i = choose_centre(&vol, &mut rng).expect("non-empty");
            seen[i] = true;
        }
        assert!(seen.iter().all(|s| *s), "every voxel is a possible centre");
    }

    #[test]
    fn crops_stay_inside_a_large_volume_and_are_deterministic() {
        let vol = volume([20, 20, 20], &[(0, 1), (7999, 2)]);
        let mut a = ChaCha8Rng::seed_from_u64(9);
        let mut b = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..200 {
            let p = sample_patch(&vol, [8, 6, 4], &mut a);
            assert_eq!(p, sample_patch(&vol, [8, 6, 4], &mut b));
            assert_eq!(p.image.len(), 8 * 6 * 4);
            assert_eq!(p.labels.len(), NUM_CLASSES * 8 * 6 * 4);
            // Never padded: every image value is a real voxel (index + 1 > 0), and rows are
            // contiguous x-runs of the source.
            assert!(p.image.iter().all(|v| *v > 0.0));
            assert_eq!(p.image[1] - p.image[0], 1.0);
            assert_eq!(p.image[4] - p.image[0], 20.0);
            assert_eq!(p.image[24] - p.image[0], 400.0);
        }
        // The corner voxels are reachable: a corner-centred crop clamps to the corner.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let corner = (0..200)
            .map(|_| sample_patch(&vol, [8, 6, 4], &mut rng))
            .find(|p| p.labels[0] == 1.0);
        assert_eq!(corner.expect("corner crop").image[0], 1.0);
    }

    #[test]
    fn small_volume_is_zero_padded_symmetrically() {
        // 2 x 3 x 4 volume in a 4 x 4 x 8 patch: pads (1,1), (0,1), (2,2).
        let vol = volume([2, 3, 4], &[(0, 1 << 3), (23, 1)]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let p = sample_patch(&vol, [4, 4, 8], &mut rng);
        let at = |z: usize, y: usize, x: usize| p.image[(z * 4 + y) * 8 + x];
        let plane = 4 * 4 * 8;
        assert_eq!(at(0, 0, 2), 0.0, "z padding");
        assert_eq!(at(1, 0, 2), 1.0, "voxel (0,0,0)");
        assert_eq!(at(2, 2, 5), 24.0, "voxel (1,2,3)");
        assert_eq!(at(1, 3, 2), 0.0, "y padding at the far end");
        assert_eq!(at(1, 0, 1), 0.0, "x padding");
        assert_eq!(at(1, 0, 6), 0.0, "x padding");
        assert_eq!(p.image.iter().filter(|v| **v != 0.0).count(), 24);
        assert_eq!(p.labels[3 * plane + 4 * 8 + 2], 1.0);
        assert_eq!(p.labels[(2 * 4 + 2) * 8 + 5], 1.0);
        assert_eq!(p.labels.iter().filter(|v| **v != 0.0).count(), 2);
    }

    #[test]
    fn whole_volume_pads_at_the_far_end() {
        let vol = volume([3, 5, 8], &[(vol_index(2, 4, 7), 1 << 24)]);
        let (image, labels, shape) = whole_volume(&vol, 4);
        assert_eq!(shape, [4, 8, 8]);
        let plane = 4 * 8 * 8;
        assert_eq!(image.len(), plane);
        assert_eq!(labels.len(), NUM_CLASSES * plane);
        for z in 0..4 {
            for y in 0..8 {
                for x in 0..8 {
                    let v = image[(z * 8 + y) * 8 + x];
                    if z < 3 && y < 5 {
                        assert_eq!(v, vol.image[vol.index(z, y, x)]);
                    } else {
                        assert_eq!(v, 0.0);
                    }
                }
            }
        }
        assert_eq!(labels[24 * plane + (2 * 8 + 4) * 8 + 7], 1.0);
        assert_eq!(whole_volume(&vol, 0).2, [3, 5, 8]);
        assert_eq!(whole_volume(&vol, 1).0, vol.image);
    }

    fn vol_index(z: usize, y: usize, x: usize) -> usize {
        (z * 5 + y) * 8 + x
    }
}
