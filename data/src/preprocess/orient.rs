//! Reorientation to RAS, SuPreM's `Orientationd(axcodes="RAS")`.
//!
//! Scanners write whatever voxel order they acquire in (LPS for most CT); the model is trained on
//! volumes whose voxel axes run to the patient's right, anterior and superior. This is nibabel's
//! `as_closest_canonical`: voxel axes are permuted and flipped (never interpolated), and the affine
//! is updated so every voxel keeps its world position. Flipping axis `j` of length `n` moves the
//! origin to the old last voxel, i.e. by `(n - 1)` times column `j`.

use crate::geometry::{Affine, Volume, orientation};

/// For each output (RAS) axis `a`: the input voxel axis that runs along world axis `a`, and
/// whether it runs towards the negative end (so must be flipped). `None` where the affine has a
/// degenerate axis and no orientation exists.
pub(crate) fn ras_plan(affine: &Affine) -> Option<[(usize, bool); 3]> {
    let mut plan = [None; 3];
    for (j, axis) in orientation(affine).into_iter().enumerate() {
        let (world, positive) = axis?;
        plan[world] = Some((j, !positive));
    }
    Some([plan[0]?, plan[1]?, plan[2]?])
}

/// Permutes and flips the voxel axes so that `axcodes` becomes `R, A, S`, updating the affine as
/// nibabel's `as_closest_canonical` does. A volume that is already RAS (including a slightly
/// oblique one) comes back unchanged, as in nibabel. A volume whose affine has a degenerate axis
/// has no orientation and also comes back unchanged; `prepare` rejects such affines before
/// calling this.
pub fn orient_ras<T: Copy>(vol: Volume<T>) -> Volume<T> {
    let Some(plan) = ras_plan(&vol.affine) else {
        return vol;
    };
    if plan == [(0, false), (1, false), (2, false)] {
        return vol;
    }
    // NIfTI axis lengths (i, j, k) = (W, H, D) and the flat strides of each input axis.
    let [d, h, w] = vol.shape;
    let n_in = [w, h, d];
    let stride_in = [1isize, w as isize, (w * h) as isize];
    let n_out = plan.map(|(j, _)| n_in[j]);
    let mut base = 0isize;
    let mut stride = [0isize; 3];
    let mut affine = vol.affine;
    for (a, &(j, flip)) in plan.iter().enumerate() {
        let sign = if flip { -1.0 } else { 1.0 };
        for (row, old) in affine.iter_mut().zip(&vol.affine).take(3) {
            row[a] = old[j] * sign;
        }
        if flip {
            base += (n_in[j] as isize - 1) * stride_in[j];
            stride[a] = -stride_in[j];
            let steps = (n_in[j] - 1) as f64;
            for (row, old) in affine.iter_mut().zip(&vol.affine).take(3) {
                row[3] += steps * old[j];
            }
        } else {
            stride[a] = stride_in[j];
        }
    }
    if plan.iter().enumerate().all(|(a, &(j, _))| a == j) {
        let flips = plan.map(|(_, flip)| flip);
        return Volume {
            shape: vol.shape,
            data: flip_in_place(vol.data, vol.shape, flips),
            affine,
        };
    }
    let mut data = Vec::with_capacity(vol.data.len());
    for z in 0..n_out[2] {
        for y in 0..n_out[1] {
            let row = base + z as isize * stride[2] + y as isize * stride[1];
            // The two cases real scanners produce, RAS rows and LPS (reversed) rows, as slices.
            if stride[0] == 1 {
                let start = row as usize;
                data.extend_from_slice(&vol.data[start..start + n_out[0]]);
            } else if stride[0] == -1 {
                let end = row as usize + 1;
                data.extend(vol.data[end - n_out[0]..end].iter().rev());
            } else {
                data.extend((0..n_out[0]).map(|x| vol.data[(row + x as isize * stride[0]) as usize]));
            }
        }
    }
    Volume {
        shape: [n_out[2], n_out[1], n_out[0]],
        data,
        affine,
    }
}

/// Flips without a permutation (LPS and the like, what nearly every scanner writes), done in the
/// buffer itself: one pass that swaps each row with its mirror row (reversing both when x flips),
/// with no second volume-sized allocation to fault in, which is most of the cost of a copy.
/// `flips` is `[x, y, z]`.
fn flip_in_place<T: Copy>(mut data: Vec<T>, shape: [usize; 3], flips: [bool; 3]) -> Vec<T> {
    let [d, h, w] = shape;
    let [fx, fy, fz] = flips;
    for r in 0..d * h {
        let (z, y) = (r / h, r % h);
        let mirror = (if fz { d - 1 - z } else { z }) * h + if fy { h - 1 - y } else { y };
        if mirror < r {
            continue; // Already swapped from the other side.
        }
        if mirror == r {
            if fx {
                data[r * w..(r + 1) * w].reverse();
            }
            continue;
        }
        let (low, high) = data.split_at_mut(mirror * w);
        let (a, b) = (&mut low[r * w..(r + 1) * w], &mut high[..w]);
        a.swap_with_slice(b);
        if fx {
            a.reverse();
            b.reverse();
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::axcodes;

    fn numbered(shape: [usize; 3], affine: Affine) -> Volume<u32> {
        let n = shape.iter().product::<usize>();
        Volume {
            shape,
            data: (0..n as u32).collect(),
            affine,
        }
    }

    /// World position of voxel `(i, j, k)`.
    fn world(a: &Affine, v: [usize; 3]) -> [f64; 3] {
        [0, 1, 2].map(|r| a[r][0] * v[0] as f64 + a[r][1] * v[1] as f64 + a[r][2] * v[2] as f64 + a[r][3])
    }

    /// Every voxel keeps its value at its world position: the defining property of reorientation.
    fn assert_world_preserved(before: &Volume<u32>, after: &Volume<u32>) {
        let [d, h, w] = before.shape;
        let mut seen = std::collections::HashMap::new();
        for k in 0..d {
            for j in 0..h {
                for i in 0..w {
                    let p = world(&before.affine, [i, j, k]).map(|c| (c * 1e6).round() as i64);
                    seen.insert(p, before.data[(k * h + j) * w + i]);
                }
            }
        }
        let [d2, h2, w2] = after.shape;
        for k in 0..d2 {
            for j in 0..h2 {
                for i in 0..w2 {
                    let p = world(&after.affine, [i, j, k]).map(|c| (c * 1e6).round() as i64);
                    assert_eq!(
                        seen.get(&p),
                        Some(&after.data[(k * h2 + j) * w2 + i]),
                        "voxel {i},{j},{k}"
                    );
                }
            }
        }
    }

    #[test]
    fn lps_flips_x_and_y_and_moves_the_origin() {
        let lps = [
            [-0.8, 0.0, 0.0, 10.0],
            [0.0, -0.8, 0.0, 20.0],
            [0.0, 0.0, 2.5, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let vol = numbered([2, 3, 4], lps);
        let ras = orient_ras(vol.clone());
        assert_eq!(axcodes(&ras.affine), ['R', 'A', 'S']);
        assert_eq!(ras.shape, [2, 3, 4]);
        // RAS voxel (0, 0, 0) is LPS voxel (3, 2, 0).
        assert_eq!(ras.data[0], vol.data[2 * 4 + 3]);
        assert_eq!(ras.affine[0], [0.8, 0.0, 0.0, 10.0 - 3.0 * 0.8]);
        assert_eq!(ras.affine[1], [0.0, 0.8, 0.0, 20.0 - 2.0 * 0.8]);
        assert_eq!(ras.affine[2], lps[2]);
        assert_world_preserved(&vol, &ras);
    }

    #[test]
    fn permuted_and_flipped_axes_come_back_ras() {
        // i runs along A, j along I, k along L: axcodes A, I, L.
        let a = [
            [0.0, 0.0, -2.0, 5.0],
            [1.0, 0.0, 0.0, -7.0],
            [0.0, -3.0, 0.0, 11.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let vol = numbered([5, 3, 4], a);
        assert_eq!(axcodes(&a), ['A', 'I', 'L']);
        let ras = orient_ras(vol.clone());
        assert_eq!(axcodes(&ras.affine), ['R', 'A', 'S']);
        // Output (x, y, z) lengths are the input k, i, j lengths: 5, 4, 3.
        assert_eq!(ras.shape, [3, 4, 5]);
        assert_world_preserved(&vol, &ras);
        assert_eq!(orient_ras(ras.clone()), ras, "RAS is a fixed point");
    }

    #[test]
    fn flips_without_permutation_keep_every_voxel_in_place_in_the_world() {
        // Every combination of flipped axes, with odd and even lengths (odd ones have a middle
        // row or slice that mirrors onto itself).
        for flips in 0..8u32 {
            let sign = |bit: u32| if flips >> bit & 1 == 1 { -1.0 } else { 1.0 };
            let a = [
                [0.8 * sign(0), 0.0, 0.0, 10.0],
                [0.0, 0.9 * sign(1), 0.0, -20.0],
                [0.0, 0.0, 2.5 * sign(2), 30.0],
                [0.0, 0.0, 0.0, 1.0],
            ];
            for shape in [[3, 5, 4], [4, 2, 5], [1, 1, 3]] {
                let vol = numbered(shape, a);
                let ras = orient_ras(vol.clone());
                assert_eq!(axcodes(&ras.affine), ['R', 'A', 'S'], "flips {flips:03b}");
                assert_eq!(ras.shape, shape);
                assert_world_preserved(&vol, &ras);
            }
        }
    }

    #[test]
    fn ras_input_is_returned_unchanged() {
        let t: f64 = 0.1;
        let oblique = [
            [1.5 * t.cos(), -1.5 * t.sin(), 0.0, 1.0],
            [1.5 * t.sin(), 1.5 * t.cos(), 0.0, 2.0],
            [0.0, 0.0, 1.5, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let vol = numbered([2, 2, 3], oblique);
        assert_eq!(orient_ras(vol.clone()), vol);
    }
}
