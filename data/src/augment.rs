//! SuPreM's patch augmentations after the crop: MONAI's `RandRotate90d(prob=0.1, max_k=3,
//! spatial_axes=(0, 1))` and `RandShiftIntensityd(offsets=0.1, prob=0.2)`.
//!
//! MONAI's arrays are `[C, x, y, z]` (RAS), so its spatial axes (0, 1) are x and y; ours are
//! `[z, y, x]`, so the same rotation turns every z-slice in its (y, x) plane. The direction is
//! numpy's: `np.rot90(a, k, axes=(x, y))` rotates from x towards y, which in our index terms is
//! `out[z][y'][x'] = in[z][N-1-x'][y']` for k = 1 (checked against numpy in the tests).

/// Rotates each z-slice of the `[d, n, n]` buffer `buf` by `k` quarter turns (0..=3) the way
/// `np.rot90(a, k, axes=(x, y))` does on MONAI's `[x, y, z]`. The (y, x) plane must be square
/// (`shape[1] == shape[2]`) for odd `k`; callers skip odd turns of non-square patches.
pub fn rot90_yx<T: Copy + Default>(buf: &mut [T], shape: [usize; 3], k: u8) {
    let [d, h, w] = shape;
    let k = k % 4;
    if k == 0 || buf.len() != d * h * w {
        return;
    }
    assert!(
        k == 2 || h == w,
        "odd quarter turns need a square (y, x) plane, got {h}x{w}"
    );
    let mut slice = vec![T::default(); h * w];
    for z in 0..d {
        let plane = &mut buf[z * h * w..(z + 1) * h * w];
        slice.copy_from_slice(plane);
        for y in 0..h {
            for x in 0..w {
                let (sy, sx) = match k {
                    1 => (h - 1 - x, y),
                    2 => (h - 1 - y, w - 1 - x),
                    _ => (x, w - 1 - y),
                };
                plane[y * w + x] = slice[sy * w + sx];
            }
        }
    }
}

/// Adds `offset` to every voxel of the patch image, padding included: MONAI shifts the whole
/// padded patch.
pub fn shift_intensity(image: &mut [f32], offset: f32) {
    for v in image {
        *v += offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{reference_python, run_reference};

    fn ramp(shape: [usize; 3]) -> Vec<u32> {
        (0..shape.iter().product::<usize>() as u32).collect()
    }

    #[test]
    fn four_quarter_turns_are_the_identity_and_two_are_a_half_turn() {
        let shape = [2, 5, 5];
        let start = ramp(shape);
        let mut a = start.clone();
        for _ in 0..4 {
            rot90_yx(&mut a, shape, 1);
        }
        assert_eq!(a, start);
        let (mut one_twice, mut two) = (start.clone(), start.clone());
        rot90_yx(&mut one_twice, shape, 1);
        rot90_yx(&mut one_twice, shape, 1);
        rot90_yx(&mut two, shape, 2);
        assert_eq!(one_twice, two);
        let mut three = start.clone();
        rot90_yx(&mut three, shape, 3);
        rot90_yx(&mut three, shape, 1);
        assert_eq!(three, start);
        // A half turn of a non-square plane is allowed.
        let mut rect = ramp([1, 2, 3]);
        rot90_yx(&mut rect, [1, 2, 3], 2);
        assert_eq!(rect, vec![5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn shift_adds_to_every_voxel() {
        let mut image = vec![0.0, 0.5, 1.0];
        shift_intensity(&mut image, -0.25);
        assert_eq!(image, vec![-0.25, 0.25, 0.75]);
    }

    /// Our (z, y, x) rotation against numpy's rot90 on MONAI's (x, y, z) array with axes (0, 1).
    #[test]
    #[ignore = "needs the Python reference (nibabel, scipy, numpy) named by VOXELFLEET_PYTHON; .ci/run provides it and runs this with --ignored"]
    fn rotation_matches_numpy_rot90_on_monai_axes() {
        let python = reference_python("rotation_matches_numpy_rot90_on_monai_axes");
        let shape = [3, 4, 4];
        let script = r#"
import sys, numpy as np
d, h, w, k = map(int, sys.argv[1:5])
zyx = np.arange(d * h * w, dtype=np.int64).reshape(d, h, w)
xyz = zyx.transpose(2, 1, 0)            # MONAI's spatial layout, channel dropped
rot = np.rot90(xyz, k, axes=(0, 1))     # RandRotate90d(spatial_axes=(0, 1))
print(" ".join(str(v) for v in rot.transpose(2, 1, 0).ravel()))
"#;
        for k in 1..=3u8 {
            let args = [shape[0], shape[1], shape[2], k as usize].map(|v| v.to_string());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_reference(&python, script, &args);
            let expected: Vec<u32> = out.split_whitespace().map(|v| v.parse().expect("int")).collect();
            let mut ours = ramp(shape);
            rot90_yx(&mut ours, shape, k);
            assert_eq!(ours, expected, "k = {k}");
        }
    }
}
