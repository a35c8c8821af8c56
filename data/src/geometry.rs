//! Volumes with their place in the world: a voxel buffer, its shape and the NIfTI affine. The
//! reader produces them, the preprocessing reorients and resamples them, and everything in
//! between agrees on one convention, nibabel's.
//!
//! - `shape` is `[D, H, W]` = `[z, y, x]` and `data` is x fastest (NIfTI's on-disk order).
//! - `affine` is row-major and maps the NIfTI voxel index `(i, j, k, 1)` = `(x, y, z, 1)` to
//!   world RAS+ millimetres, exactly as nibabel's `img.affine`.

/// A row-major 4×4 affine from voxel `(i, j, k)` to world RAS+ mm.
pub type Affine = [[f64; 4]; 4];

/// A 3-D volume in the layout and convention above.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    pub shape: [usize; 3],
    pub data: Vec<T>,
    pub affine: Affine,
}

impl<T> Volume<T> {
    /// Voxel sizes along the NIfTI axes `(i, j, k)` = `(x, y, z)`: the column norms of the
    /// affine's 3×3 part, as nibabel's `header.get_zooms()` reports them for a consistent file.
    pub fn spacing(&self) -> [f64; 3] {
        spacing(&self.affine)
    }

    pub fn voxel_count(&self) -> usize {
        self.shape.iter().product()
    }
}

pub fn spacing(affine: &Affine) -> [f64; 3] {
    [0, 1, 2].map(|j| (0..3).map(|i| affine[i][j] * affine[i][j]).sum::<f64>().sqrt())
}

pub fn identity() -> Affine {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}

/// For each voxel axis `(i, j, k)`: the world axis it runs along (0 = x/R-L, 1 = y/A-P,
/// 2 = z/S-I) and whether it runs towards the positive end (R, A, S). Axes are matched greedily
/// by the largest remaining cosine, as nibabel's `io_orientation` does for the non-degenerate
/// affines real scanners write; a degenerate (zero) column is reported as `None`.
pub fn orientation(affine: &Affine) -> [Option<(usize, bool)>; 3] {
    let zooms = spacing(affine);
    let mut cos = [[0.0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            if zooms[j] > 0.0 {
                cos[i][j] = affine[i][j] / zooms[j];
            }
        }
    }
    let mut out = [None; 3];
    let (mut rows_used, mut cols_used) = ([false; 3], [false; 3]);
    for _ in 0..3 {
        let mut best: Option<(usize, usize, f64)> = None;
        for i in (0..3).filter(|&i| !rows_used[i]) {
            for j in (0..3).filter(|&j| !cols_used[j]) {
                let v = cos[i][j].abs();
                if v > 1e-12 && best.is_none_or(|(_, _, b)| v > b) {
                    best = Some((i, j, v));
                }
            }
        }
        let Some((i, j, _)) = best else { break };
        rows_used[i] = true;
        cols_used[j] = true;
        out[j] = Some((i, cos[i][j] > 0.0));
    }
    out
}

/// nibabel's `aff2axcodes`: the world direction each voxel axis points to, `R`/`L`, `A`/`P`,
/// `S`/`I`, or `?` for a degenerate axis. `['R', 'A', 'S']` is the orientation SuPreM trains in.
pub fn axcodes(affine: &Affine) -> [char; 3] {
    orientation(affine).map(|axis| match axis {
        Some((0, true)) => 'R',
        Some((0, false)) => 'L',
        Some((1, true)) => 'A',
        Some((1, false)) => 'P',
        Some((2, true)) => 'S',
        Some((2, false)) => 'I',
        _ => '?',
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(x: f64, y: f64, z: f64) -> Affine {
        [
            [x, 0.0, 0.0, 0.0],
            [0.0, y, 0.0, 0.0],
            [0.0, 0.0, z, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    #[test]
    fn axcodes_follow_signs_and_permutations() {
        assert_eq!(axcodes(&diag(1.5, 1.5, 1.5)), ['R', 'A', 'S']);
        assert_eq!(axcodes(&diag(-0.8, -0.8, 2.5)), ['L', 'P', 'S']);
        // Voxel i runs along world y, j along -z, k along x.
        let a = [
            [0.0, 0.0, 2.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, -3.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(axcodes(&a), ['A', 'I', 'R']);
        assert_eq!(spacing(&a), [1.0, 3.0, 2.0]);
        assert_eq!(axcodes(&diag(1.0, 0.0, 1.0)), ['R', '?', 'S']);
    }

    #[test]
    fn slightly_oblique_axes_take_the_nearest_world_axis() {
        let t: f64 = 0.2;
        let a = [
            [t.cos(), -t.sin(), 0.0, 0.0],
            [t.sin(), t.cos(), 0.0, 0.0],
            [0.0, 0.0, -1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(axcodes(&a), ['R', 'A', 'I']);
    }
}
