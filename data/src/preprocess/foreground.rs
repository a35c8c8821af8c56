//! Crop to the body, then pad to the patch size: SuPreM's `CropForegroundd(source_key="image")`
//! followed by `SpatialPadd(spatial_size=patch, mode="constant")`.
//!
//! MONAI's rules, reproduced: the foreground is every voxel of the windowed image with `x > 0`
//! (its default `select_fn`), i.e. above the window floor, so the air around the patient goes; the
//! box is the tight bounding box of that set (margin 0) and the labels are cut with the image's
//! box. Padding adds `(target - size) / 2` voxels before and the rest after (the odd voxel goes at
//! the end) along every axis shorter than the patch, filled with 0 in the image and the labels.

/// Half-open `[start, end)` box in `[z, y, x]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: [usize; 3],
    pub end: [usize; 3],
}

impl Bounds {
    pub fn shape(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.end[a] - self.start[a])
    }
}

/// The tight box around every voxel with `image > 0`, or `None` if there is none.
pub fn foreground_bounds(image: &[f32], shape: [usize; 3]) -> Option<Bounds> {
    let [_, h, w] = shape;
    let mut start = [usize::MAX; 3];
    let mut end = [0usize; 3];
    for (r, row) in image.chunks_exact(w.max(1)).enumerate() {
        let Some(first) = row.iter().position(|v| *v > 0.0) else {
            continue;
        };
        let last = row.iter().rposition(|v| *v > 0.0).unwrap_or(first);
        let (z, y) = (r / h, r % h);
        start = [start[0].min(z), start[1].min(y), start[2].min(first)];
        end = [end[0].max(z + 1), end[1].max(y + 1), end[2].max(last + 1)];
    }
    (start[0] != usize::MAX).then_some(Bounds { start, end })
}

/// Copies the `bounds` box out of a `[z, y, x]` buffer of `shape`.
pub fn crop<T: Copy>(data: &[T], shape: [usize; 3], bounds: Bounds) -> Vec<T> {
    let [_, h, w] = shape;
    let [cd, ch, cw] = bounds.shape();
    let mut out = Vec::with_capacity(cd * ch * cw);
    for z in bounds.start[0]..bounds.end[0] {
        for y in bounds.start[1]..bounds.end[1] {
            let row = (z * h + y) * w;
            out.extend_from_slice(&data[row + bounds.start[2]..row + bounds.end[2]]);
        }
    }
    out
}

/// Voxels added before each axis when padding `shape` up to `target`: MONAI's symmetric split.
pub fn pad_before(shape: [usize; 3], target: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| target[a].saturating_sub(shape[a]) / 2)
}

/// Pads a `[z, y, x]` buffer with `fill` so every side is at least `target`; axes already long
/// enough are left alone. Returns the new buffer and shape.
pub fn pad_to<T: Copy>(data: Vec<T>, shape: [usize; 3], target: [usize; 3], fill: T) -> (Vec<T>, [usize; 3]) {
    let out_shape = [0, 1, 2].map(|a| shape[a].max(target[a]));
    if out_shape == shape {
        return (data, shape);
    }
    let before = pad_before(shape, target);
    let [d, h, w] = shape;
    let [_, oh, ow] = out_shape;
    let mut out = vec![fill; out_shape.iter().product()];
    for z in 0..d {
        for y in 0..h {
            let dst = ((z + before[0]) * oh + y + before[1]) * ow + before[2];
            out[dst..dst + w].copy_from_slice(&data[(z * h + y) * w..][..w]);
        }
    }
    (out, out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_tight_around_positive_voxels() {
        let shape = [4, 5, 6];
        let mut image = vec![0.0f32; 120];
        let at = |z: usize, y: usize, x: usize| (z * 5 + y) * 6 + x;
        image[at(1, 2, 3)] = 0.5;
        image[at(2, 4, 1)] = 1.0;
        image[at(3, 0, 0)] = -1.0; // Not foreground: MONAI selects x > 0.
        let b = foreground_bounds(&image, shape).expect("some foreground");
        assert_eq!(
            b,
            Bounds {
                start: [1, 2, 1],
                end: [3, 5, 4]
            }
        );
        let cropped = crop(&image, shape, b);
        assert_eq!(cropped.len(), 2 * 3 * 3);
        assert_eq!(cropped.iter().filter(|v| **v > 0.0).count(), 2);
        assert_eq!(foreground_bounds(&[0.0; 8], [2, 2, 2]), None);
    }

    #[test]
    fn padding_puts_the_odd_voxel_at_the_end() {
        let data: Vec<u32> = (1..=6).collect();
        let (out, shape) = pad_to(data, [1, 2, 3], [4, 2, 6], 0);
        assert_eq!(shape, [4, 2, 6]);
        assert_eq!(pad_before([1, 2, 3], [4, 2, 6]), [1, 0, 1]);
        // z: 1 before, 2 after; x: 1 before, 2 after.
        let plane = 12;
        assert!(out[..plane].iter().all(|v| *v == 0));
        assert_eq!(&out[plane..plane + 6], &[0, 1, 2, 3, 0, 0]);
        assert_eq!(&out[plane + 6..plane + 12], &[0, 4, 5, 6, 0, 0]);
        assert!(out[2 * plane..].iter().all(|v| *v == 0));
        let (same, s) = pad_to(vec![7u32; 8], [2, 2, 2], [1, 2, 2], 0);
        assert_eq!((same, s), (vec![7u32; 8], [2, 2, 2]));
    }
}
