//! Resampling to the training spacing, SuPreM's `Spacingd(pixdim=(1.5, 1.5, 1.5),
//! mode=("bilinear", "nearest"))` with MONAI's defaults (`align_corners=False`,
//! `padding_mode="border"`, `diagonal=False`, `scale_extent=False`).
//!
//! # The convention, and why it is MONAI's
//!
//! MONAI's `Spacing` builds the output affine with `zoom_affine(affine, pixdim, diagonal=False)`:
//! the input's direction cosines are kept and only the voxel sizes change. It then takes the
//! output shape and origin from `compute_shape_offset`, which maps the centres of the input's
//! corner voxels into the output grid, and resamples with the voxel-to-voxel transform
//! `inv(src_affine) @ dst_affine`. For an affine without shear that transform is a pure per-axis
//! scaling, whatever the orientation, so along each NIfTI axis `j` (input length `n`, voxel size
//! `s_in`, target `s_out`):
//!
//! - output length `m = round((n - 1) * s_in / s_out + 1)` (numpy's round, ties to even);
//! - output voxel `k` samples the input at continuous voxel coordinate `k * s_out / s_in`, so the
//!   first voxel centres coincide and the output affine keeps the input origin, its columns
//!   scaled by `s_out / s_in`;
//! - coordinates past the last input voxel centre (the grid can overshoot by up to half an output
//!   voxel) are clamped to it, which is what `padding_mode="border"` does in `grid_sample`;
//! - with `align_corners=False` MONAI converts that voxel transform to `grid_sample`'s normalised
//!   coordinates and back without any half-voxel shift, so the mapping above is exact.
//!
//! Trilinear (`bilinear` in MONAI's 3-D naming) is the tensor product of linear interpolation
//! along each axis, so it is computed as three separable passes with precomputed per-axis taps:
//! the same value as the 8-corner weighted sum up to float rounding, at a fraction of the work.
//! Nearest rounds the continuous coordinate half to even, as `grid_sample`'s `nearbyint` does.
//! On a per-voxel class bitmask that is exactly nearest on every mask at once.
//!
//! Coordinates are computed in f64 (MONAI: f32 grid), weights and values in f32.

use crate::geometry::{Affine, Volume};

/// Output length along one axis, as MONAI's `compute_shape_offset` gives it.
pub fn resampled_len(n_in: usize, spacing_in: f64, spacing_out: f64) -> usize {
    if n_in == 0 {
        return 0;
    }
    ((n_in as f64 - 1.0) * spacing_in / spacing_out + 1.0).round_ties_even() as usize
}

/// The `[D, H, W]` shape a volume of `shape` at `spacing_in` (x, y, z mm) has at `spacing_out`.
/// The result is in f64 so a caller can reject absurd sizes before anything is allocated.
pub fn resampled_shape(shape: [usize; 3], spacing_in: [f64; 3], spacing_out: [f64; 3]) -> [usize; 3] {
    let [d, h, w] = shape;
    [
        resampled_len(d, spacing_in[2], spacing_out[2]),
        resampled_len(h, spacing_in[1], spacing_out[1]),
        resampled_len(w, spacing_in[0], spacing_out[0]),
    ]
}

/// The affine of the resampled grid: input origin, columns rescaled to the new voxel size.
pub fn resampled_affine(affine: &Affine, spacing_in: [f64; 3], spacing_out: [f64; 3]) -> Affine {
    let mut out = *affine;
    for j in 0..3 {
        let scale = spacing_out[j] / spacing_in[j];
        for row in out.iter_mut().take(3) {
            row[j] *= scale;
        }
    }
    out
}

/// Continuous input coordinate of output voxel `k`, clamped to the input's voxel centres.
fn source_coord(k: usize, ratio: f64, n_in: usize) -> f64 {
    (k as f64 * ratio).clamp(0.0, (n_in - 1) as f64)
}

/// Linear taps along one axis: lower input index and the weight of the upper one.
fn linear_taps(n_in: usize, n_out: usize, ratio: f64) -> Vec<(usize, f32)> {
    (0..n_out)
        .map(|k| {
            let c = source_coord(k, ratio, n_in);
            let i0 = (c.floor() as usize).min(n_in.saturating_sub(2));
            (i0, (c - i0 as f64) as f32)
        })
        .collect()
}

fn nearest_taps(n_in: usize, n_out: usize, ratio: f64) -> Vec<usize> {
    (0..n_out)
        .map(|k| (source_coord(k, ratio, n_in).round_ties_even() as usize).min(n_in - 1))
        .collect()
}

/// Splits `out` into `units` equal pieces of `unit_len` and hands contiguous runs of them to
/// `threads` scoped threads; `fill(u, piece)` writes piece `u`. Every output element is computed
/// the same way whatever the split, so results do not depend on `threads`.
fn par_units<T: Send>(out: &mut [T], unit_len: usize, threads: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    if unit_len == 0 || out.is_empty() {
        return;
    }
    let units = out.len() / unit_len;
    let threads = threads.clamp(1, units.max(1));
    let per = units.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, span) in out.chunks_mut(per * unit_len).enumerate() {
            let fill = &fill;
            let mut work = move || {
                for (u, piece) in span.chunks_mut(unit_len).enumerate() {
                    fill(t * per + u, piece);
                }
            };
            if threads == 1 {
                work();
            } else {
                scope.spawn(work);
            }
        }
    });
}

fn lerp_rows(out: &mut [f32], a: &[f32], b: &[f32], w: f32) {
    let v = 1.0 - w;
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * v + b * w;
    }
}

/// Where a resampling writes: the output shape and affine, and per axis the input step of one
/// output voxel (`spacing_out / spacing_in`).
struct OutputGrid {
    shape: [usize; 3],
    affine: Affine,
    ratios: [f64; 3],
}

/// The grid `vol` resamples onto at `spacing_out`.
fn output_grid<T>(vol: &Volume<T>, spacing_out: [f64; 3]) -> OutputGrid {
    let spacing_in = vol.spacing();
    OutputGrid {
        shape: resampled_shape(vol.shape, spacing_in, spacing_out),
        affine: resampled_affine(&vol.affine, spacing_in, spacing_out),
        ratios: [0, 1, 2].map(|j| spacing_out[j] / spacing_in[j]),
    }
}

impl OutputGrid {
    /// The result itself when an axis comes out empty: nothing to sample.
    fn empty<T>(&self) -> Option<Volume<T>> {
        self.shape.contains(&0).then(|| Volume {
            shape: self.shape,
            data: Vec::new(),
            affine: self.affine,
        })
    }
}

/// Trilinear resampling of a CT to `spacing_out` (x, y, z mm) on `threads` threads. The input's
/// spacing comes from its affine; see the module doc for the exact convention.
pub fn resample_linear(vol: &Volume<f32>, spacing_out: [f64; 3], threads: usize) -> Volume<f32> {
    let grid = output_grid(vol, spacing_out);
    if let Some(empty) = grid.empty() {
        return empty;
    }
    let OutputGrid {
        shape: out_shape,
        affine,
        ratios: r,
    } = grid;
    let [d, h, w] = vol.shape;
    let [od, oh, ow] = out_shape;
    let (tx, ty, tz) = (
        linear_taps(w, ow, r[0]),
        linear_taps(h, oh, r[1]),
        linear_taps(d, od, r[2]),
    );
    // A one-voxel axis has a single tap whose upper neighbour does not exist; its weight is 0.
    let up = |i0: usize, n: usize| (i0 + 1).min(n - 1);

    // Pass 1, along x: every input row shrinks (or grows) to `ow`.
    let mut along_x = vec![0.0f32; d * h * ow];
    par_units(&mut along_x, ow, threads, |row, out| {
        let src = &vol.data[row * w..(row + 1) * w];
        for (o, &(i0, wt)) in out.iter_mut().zip(&tx) {
            *o = src[i0] * (1.0 - wt) + src[up(i0, w)] * wt;
        }
    });
    // Pass 2, along y: whole rows of `ow` are blended, which vectorises.
    let mut along_y = vec![0.0f32; d * oh * ow];
    par_units(&mut along_y, oh * ow, threads, |z, out| {
        let slab = &along_x[z * h * ow..(z + 1) * h * ow];
        for (row, &(i0, wt)) in out.chunks_mut(ow).zip(&ty) {
            let (a, b) = (i0 * ow, up(i0, h) * ow);
            lerp_rows(row, &slab[a..a + ow], &slab[b..b + ow], wt);
        }
    });
    drop(along_x);
    // Pass 3, along z: whole slices are blended.
    let plane = oh * ow;
    let mut data = vec![0.0f32; od * plane];
    par_units(&mut data, plane, threads, |z, out| {
        let (i0, wt) = tz[z];
        let (a, b) = (i0 * plane, up(i0, d) * plane);
        lerp_rows(out, &along_y[a..a + plane], &along_y[b..b + plane], wt);
    });
    Volume {
        shape: out_shape,
        data,
        affine,
    }
}

/// Nearest-neighbour resampling (labels) to `spacing_out`, on the same grid as
/// [`resample_linear`] gives the CT of the same geometry.
pub fn resample_nearest<T: Copy + Default + Send + Sync>(
    vol: &Volume<T>,
    spacing_out: [f64; 3],
    threads: usize,
) -> Volume<T> {
    let grid = output_grid(vol, spacing_out);
    if let Some(empty) = grid.empty() {
        return empty;
    }
    let OutputGrid {
        shape: out_shape,
        affine,
        ratios: r,
    } = grid;
    let [d, h, w] = vol.shape;
    let [od, oh, ow] = out_shape;
    let (tx, ty, tz) = (
        nearest_taps(w, ow, r[0]),
        nearest_taps(h, oh, r[1]),
        nearest_taps(d, od, r[2]),
    );
    let mut data = vec![T::default(); od * oh * ow];
    par_units(&mut data, oh * ow, threads, |z, out| {
        for (row, &y) in out.chunks_mut(ow).zip(&ty) {
            let src = &vol.data[(tz[z] * h + y) * w..][..w];
            for (o, &x) in row.iter_mut().zip(&tx) {
                *o = src[x];
            }
        }
    });
    Volume {
        shape: out_shape,
        data,
        affine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::identity;

    fn diag(s: [f64; 3]) -> Affine {
        let mut a = identity();
        for j in 0..3 {
            a[j][j] = s[j];
        }
        a[0][3] = -12.0;
        a
    }

    #[test]
    fn shape_follows_monai_compute_shape_offset() {
        // The realistic case: 512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm.
        assert_eq!(
            resampled_shape([200, 512, 512], [0.8, 0.8, 2.5], [1.5; 3]),
            [333, 274, 274]
        );
        assert_eq!(resampled_len(1, 3.0, 1.5), 1);
        assert_eq!(resampled_len(64, 1.5, 1.5), 64);
        assert_eq!(resampled_len(3, 1.0, 2.0), 2);
    }

    #[test]
    fn a_linear_ramp_is_reproduced_exactly_inside_and_clamped_beyond() {
        // value = 2 * x_mm + 0.5 * y_mm - z_mm, sampled at 0.8 x 1.0 x 2.5 mm.
        let (s_in, shape) = ([0.8, 1.0, 2.5], [7usize, 9, 11]);
        let value = |x: f64, y: f64, z: f64| 2.0 * x + 0.5 * y - z;
        let mut data = Vec::new();
        for k in 0..shape[0] {
            for j in 0..shape[1] {
                for i in 0..shape[2] {
                    data.push(value(i as f64 * s_in[0], j as f64 * s_in[1], k as f64 * s_in[2]) as f32);
                }
            }
        }
        let vol = Volume {
            shape,
            data,
            affine: diag(s_in),
        };
        let out = resample_linear(&vol, [1.5; 3], 3);
        assert_eq!(out.shape, resampled_shape(shape, s_in, [1.5; 3]));
        assert_eq!(out.spacing(), [1.5; 3]);
        assert_eq!(out.affine[0][3], -12.0);
        let extent = [0, 1, 2].map(|j| (shape[2 - j] - 1) as f64 * s_in[j]);
        let [od, oh, ow] = out.shape;
        for k in 0..od {
            for j in 0..oh {
                for i in 0..ow {
                    let mm = [i, j, k].map(|v| v as f64 * 1.5);
                    let clamped = [0, 1, 2].map(|a| mm[a].min(extent[a]));
                    let expected = value(clamped[0], clamped[1], clamped[2]);
                    let got = out.data[(k * oh + j) * ow + i] as f64;
                    assert!((got - expected).abs() < 1e-4, "({i},{j},{k}): {got} vs {expected}");
                }
            }
        }
        // Threads change nothing.
        assert_eq!(resample_linear(&vol, [1.5; 3], 1), out);
    }

    #[test]
    fn nearest_picks_the_closest_voxel_and_breaks_ties_to_even() {
        // Along x: 1 mm in, 1.5 mm out, so output k sits at input 1.5 k: 0, 1.5, 3, 4.5 ...
        let vol = Volume {
            shape: [1, 1, 8],
            data: (10u32..18).collect(),
            affine: diag([1.0, 1.0, 1.0]),
        };
        let out = resample_nearest(&vol, [1.5, 1.0, 1.0], 1);
        assert_eq!(out.shape, [1, 1, 6]);
        // 0 -> 0, 1.5 -> 2, 3 -> 3, 4.5 -> 4, 6 -> 6, 7.5 -> 8 clamped to 7.
        assert_eq!(out.data, vec![10, 12, 13, 14, 16, 17]);
    }

    #[test]
    fn nearest_on_a_bitmask_is_nearest_on_each_mask() {
        let shape = [5, 6, 7];
        let n = 5 * 6 * 7;
        let bits: Vec<u32> = (0..n as u32).map(|i| (i * 2654435761) >> 27).collect();
        let vol = Volume {
            shape,
            data: bits.clone(),
            affine: diag([0.7, 1.1, 2.3]),
        };
        let out = resample_nearest(&vol, [1.5; 3], 2);
        for bit in 0..5 {
            let mask = Volume {
                shape,
                data: bits.iter().map(|b| u8::from(b >> bit & 1 == 1)).collect(),
                affine: vol.affine,
            };
            let per_mask = resample_nearest(&mask, [1.5; 3], 1);
            let from_bitmask: Vec<u8> = out.data.iter().map(|b| u8::from(b >> bit & 1 == 1)).collect();
            assert_eq!(per_mask.data, from_bitmask, "bit {bit}");
        }
    }
}
