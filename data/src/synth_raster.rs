//! Rasterising the phantom's primitives (lobulated ellipsoids, tubes) and its noise.
//!
//! Split from `synth_anatomy` so the anatomy table reads as anatomy. Shapes are given in
//! physical units (voxels of the training grid, 1.5 mm, `[z, y, x]`) and sampled at the centres
//! of the file's own, usually anisotropic, voxels, so a phantom written at 0.8 × 0.8 × 2.5 mm
//! resamples back to the anatomy it was designed as. Only a primitive's bounding box is visited,
//! which is what keeps 24 cases well under a second.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The file's voxel grid: `dims` in `[z, y, x]`, and `step`, the size of one file voxel in
/// physical (training-grid) units along each axis. File voxel `i` sits at `i * step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Grid {
    pub dims: [usize; 3],
    pub step: [f32; 3],
}

impl Grid {
    /// A grid whose voxels are the physical units themselves.
    #[cfg(test)]
    pub fn unit(dims: [usize; 3]) -> Self {
        Grid { dims, step: [1.0; 3] }
    }

    /// File voxels along `axis` whose centres may lie within `c ± r` (physical units).
    fn span(&self, axis: usize, c: f32, r: f32) -> std::ops::Range<usize> {
        span(c / self.step[axis], r / self.step[axis], self.dims[axis])
    }

    pub fn pos(&self, axis: usize, i: usize) -> f32 {
        i as f32 * self.step[axis]
    }

    pub fn index(&self, z: usize, y: usize, x: usize) -> usize {
        (z * self.dims[1] + y) * self.dims[2] + x
    }

    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Voxel index range `[lo, hi)` along an axis of length `len` covering `c ± r`.
pub(super) fn span(c: f32, r: f32, len: usize) -> std::ops::Range<usize> {
    let lo = (c - r).floor().max(0.0) as usize;
    let hi = ((c + r).ceil() + 1.0).clamp(0.0, len as f32) as usize;
    lo.min(hi)..hi
}

pub(super) fn paint_blob(
    grid: Grid,
    c: [f32; 3],
    r: [f32; 3],
    yaw: f32,
    wobble: f32,
    phase: f32,
    set: &mut impl FnMut(usize),
) {
    let reach = 1.0 + wobble;
    let lateral = r[1].max(r[2]) * reach;
    let (sin, cos) = yaw.sin_cos();
    for z in grid.span(0, c[0], r[0] * reach) {
        let dz = grid.pos(0, z) - c[0];
        for y in grid.span(1, c[1], lateral) {
            let dy = grid.pos(1, y) - c[1];
            for x in grid.span(2, c[2], lateral) {
                let dx = grid.pos(2, x) - c[2];
                let rx = (cos * dx + sin * dy) / r[2];
                let ry = (-sin * dx + cos * dy) / r[1];
                let rz = dz / r[0];
                let rho = (rx * rx + ry * ry + rz * rz).sqrt();
                let limit = 1.0 + wobble * (3.0 * ry.atan2(rx) + phase).sin() * (1.0 - rz.abs().min(1.0) * 0.5);
                if rho <= limit {
                    set(grid.index(z, y, x));
                }
            }
        }
    }
}

pub(super) fn paint_segment(grid: Grid, a: [f32; 3], b: [f32; 3], r: f32, set: &mut impl FnMut(usize)) {
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let len2 = ab.iter().map(|v| v * v).sum::<f32>().max(1e-6);
    let lo = [0, 1, 2].map(|k| a[k].min(b[k]));
    let hi = [0, 1, 2].map(|k| a[k].max(b[k]));
    let range = |k: usize| grid.span(k, (lo[k] + hi[k]) / 2.0, (hi[k] - lo[k]) / 2.0 + r);
    for z in range(0) {
        for y in range(1) {
            for x in range(2) {
                let p = [grid.pos(0, z) - a[0], grid.pos(1, y) - a[1], grid.pos(2, x) - a[2]];
                let t = ((p[0] * ab[0] + p[1] * ab[1] + p[2] * ab[2]) / len2).clamp(0.0, 1.0);
                let d2: f32 = (0..3).map(|k| (p[k] - t * ab[k]).powi(2)).sum();
                if d2 <= r * r {
                    set(grid.index(z, y, x));
                }
            }
        }
    }
}

/// A standard normal sample (Box–Muller); rand_distr is not a dependency and this is all the
/// noise model needs.
pub(super) fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = rng.random_range(f32::MIN_POSITIVE..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(grid: Grid, paint: impl FnOnce(&mut dyn FnMut(usize))) -> usize {
        let mut hit = vec![false; grid.len()];
        paint(&mut |i| hit[i] = true);
        hit.iter().filter(|h| **h).count()
    }

    #[test]
    fn a_ball_has_about_its_volume_in_voxels() {
        let unit = Grid::unit([32, 32, 32]);
        let n = count(unit, |set| {
            paint_blob(unit, [16.0; 3], [6.0; 3], 0.0, 0.0, 0.0, &mut |i| set(i))
        });
        let expected = 4.0 / 3.0 * std::f32::consts::PI * 216.0;
        assert!((n as f32 - expected).abs() < 0.05 * expected, "{n} vs {expected}");
        // On a grid of 0.5 x 0.5 x 2 units per voxel, the same ball has the same physical volume.
        let aniso = Grid {
            dims: [16, 64, 64],
            step: [2.0, 0.5, 0.5],
        };
        let n = count(aniso, |set| {
            paint_blob(aniso, [16.0; 3], [6.0; 3], 0.0, 0.0, 0.0, &mut |i| set(i))
        });
        let physical = n as f32 * 2.0 * 0.5 * 0.5;
        assert!(
            (physical - expected).abs() < 0.05 * expected,
            "{physical} vs {expected}"
        );
    }

    #[test]
    fn a_tube_covers_its_length_and_clips_at_the_border() {
        let unit = Grid::unit([32, 32, 32]);
        let inside = count(unit, |set| {
            paint_segment(unit, [4.0, 16.0, 16.0], [24.0, 16.0, 16.0], 2.0, &mut |i| set(i))
        });
        // A 20-voxel cylinder of radius 2 plus two hemispherical caps.
        let expected = std::f32::consts::PI * 4.0 * 20.0 + 4.0 / 3.0 * std::f32::consts::PI * 8.0;
        assert!(
            (inside as f32 - expected).abs() < 0.15 * expected,
            "{inside} vs {expected}"
        );
        let clipped = count(unit, |set| {
            paint_segment(unit, [-10.0, 0.0, 0.0], [40.0, 0.0, 0.0], 1.5, &mut |i| set(i))
        });
        assert!(clipped > 32, "the in-volume part is still painted: {clipped}");
    }

    #[test]
    fn noise_is_standard_normal() {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let xs: Vec<f32> = (0..20_000).map(|_| gaussian(&mut rng)).collect();
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
