//! Sliding-window inference over a whole volume, with the semantics of MONAI's
//! `sliding_window_inference` (monai/inferers/utils.py, monai/data/utils.py), so that a Dice we
//! report means what SuPreM's evaluation means by it.
//!
//! What is matched, step by step:
//! - A side shorter than the window is padded with zeros, `diff / 2` before and the rest after
//!   (`F.pad` with MONAI's `pad_size`), and the output is cropped back to the input's shape.
//! - Window starts per axis: interval `int(roi * (1 - overlap))` (at least 1; the whole side when
//!   the padded side equals the window), `k * interval` for the first k windows that reach the
//!   end, the last one shifted back to end at the border (`dense_patch_slices`). Windows are
//!   visited D-major, W-minor, image after image, `sw_batch_size` per predictor call.
//! - Weights: `compute_importance_map`: ones (constant), or the separable Gaussian
//!   `exp(-x^2 / (2 sigma^2))` on `x = -(n-1)/2 ..= (n-1)/2`, `sigma = sigma_scale * n`, not
//!   normalised (its centre is 1 for even and odd sides alike), every value then raised to at
//!   least `max(min(map), 1e-3)`, so corner weights never vanish.
//! - Output: `sum_w(map * logits_w) / sum_w(map)` per voxel, summed in window order.
//!
//! The accumulators live on the predictor's device: one slice-add per window, no host copies.

use burn::tensor::backend::Backend;
use burn::tensor::ops::PadMode;
use burn::tensor::{Tensor, TensorData};
use std::ops::Range;
use thiserror::Error;

/// How overlapping windows are blended (MONAI's `BlendMode`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Blend {
    /// Every window voxel weighs 1.
    Constant,
    /// Window voxels weigh by a Gaussian of their distance from the window centre, with
    /// `sigma = sigma_scale * window side` per axis.
    Gaussian { sigma_scale: f64 },
}

/// MONAI's default for `mode="gaussian"`.
pub const DEFAULT_SIGMA_SCALE: f64 = 0.125;

/// A sliding-window inferer; build with [`SlidingWindow::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    /// Window size `[D, H, W]`.
    pub roi: [usize; 3],
    /// Fraction of a window shared with its neighbour along each axis, in `[0, 1)`.
    pub overlap: f64,
    pub blend: Blend,
    /// Windows per predictor call.
    pub sw_batch_size: usize,
}

#[derive(Debug, Error, PartialEq)]
pub enum SlidingWindowError {
    #[error("sliding window {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl SlidingWindow {
    /// Windows of `roi` with overlap 0.5, Gaussian blending (sigma scale 0.125), one window per
    /// predictor call: SuPreM's evaluation settings.
    pub fn new(roi: [usize; 3]) -> Self {
        SlidingWindow {
            roi,
            overlap: 0.5,
            blend: Blend::Gaussian {
                sigma_scale: DEFAULT_SIGMA_SCALE,
            },
            sw_batch_size: 1,
        }
    }

    pub fn validate(&self) -> Result<(), SlidingWindowError> {
        let invalid = |field, reason: String| Err(SlidingWindowError::Invalid { field, reason });
        if self.roi.contains(&0) {
            return invalid("roi", format!("every side must be at least 1, got {:?}", self.roi));
        }
        if !(0.0..1.0).contains(&self.overlap) {
            return invalid("overlap", format!("must be in [0, 1), got {}", self.overlap));
        }
        if let Blend::Gaussian { sigma_scale } = self.blend
            && !(sigma_scale.is_finite() && sigma_scale > 0.0)
        {
            return invalid("sigma_scale", format!("must be > 0, got {sigma_scale}"));
        }
        if self.sw_batch_size == 0 {
            return invalid("sw_batch_size", "must be at least 1".into());
        }
        Ok(())
    }

    /// Runs `predictor` over every window of `input` (`[N, C, D, H, W]`) and blends the window
    /// outputs into one `[N, C_out, D, H, W]` tensor on the input's device.
    ///
    /// # Panics
    /// If `predictor` returns a tensor that is not `[windows, C_out, roi...]`, or a different
    /// `C_out` from one call to the next.
    pub fn infer<B: Backend>(
        &self,
        input: Tensor<B, 5>,
        mut predictor: impl FnMut(Tensor<B, 5>) -> Tensor<B, 5>,
    ) -> Result<Tensor<B, 5>, SlidingWindowError> {
        self.validate()?;
        let device = input.device();
        let [n, c, d, h, w] = input.dims();
        let image = [d, h, w];
        let pad = symmetric_padding(image, self.roi);
        let input = if pad.iter().any(|&(a, b)| a + b > 0) {
            input.pad(pad.to_vec(), PadMode::Constant(0.0))
        } else {
            input
        };
        let padded: [usize; 3] = std::array::from_fn(|i| image[i] + pad[i].0 + pad[i].1);
        let windows = window_boxes(padded, self.roi, self.overlap);
        let [rd, rh, rw] = self.roi;
        let weights = Tensor::<B, 5>::from_data(
            TensorData::new(importance_map(self.roi, self.blend), [1, 1, rd, rh, rw]),
            &device,
        );

        let mut output: Option<Tensor<B, 5>> = None;
        let total = windows.len() * n;
        for first in (0..total).step_by(self.sw_batch_size) {
            let batch: Vec<(usize, &[Range<usize>; 3])> = (first..(first + self.sw_batch_size).min(total))
                .map(|i| (i / windows.len(), &windows[i % windows.len()]))
                .collect();
            let pieces: Vec<Tensor<B, 5>> = batch
                .iter()
                .map(|(img, [a, b, e])| {
                    input
                        .clone()
                        .slice([*img..*img + 1, 0..c, a.clone(), b.clone(), e.clone()])
                })
                .collect();
            let x = if pieces.len() == 1 {
                pieces.into_iter().next().expect("one piece")
            } else {
                Tensor::cat(pieces, 0)
            };
            let logits = predictor(x);
            let [k, out_c, od, oh, ow] = logits.dims();
            assert_eq!(
                [k, od, oh, ow],
                [batch.len(), rd, rh, rw],
                "sliding window: the predictor must return [windows, C, roi] for {} windows of {:?}",
                batch.len(),
                self.roi
            );
            let weighted = logits * weights.clone().expand([k, out_c, rd, rh, rw]);
            let mut acc = output
                .take()
                .unwrap_or_else(|| Tensor::zeros([n, out_c, padded[0], padded[1], padded[2]], &device));
            assert_eq!(
                acc.dims()[1],
                out_c,
                "sliding window: the predictor changed its channel count"
            );
            for (j, (img, [a, b, e])) in batch.iter().enumerate() {
                let at = [*img..*img + 1, 0..out_c, a.clone(), b.clone(), e.clone()];
                let sum =
                    acc.clone().slice(at.clone()) + weighted.clone().slice([j..j + 1, 0..out_c, 0..rd, 0..rh, 0..rw]);
                acc = acc.slice_assign(at, sum);
            }
            output = Some(acc);
        }
        let output = output.expect("every volume has at least one window");

        // The blended weight per voxel, as MONAI's count map: the same for every image and channel.
        let mut count = Tensor::<B, 5>::zeros([1, 1, padded[0], padded[1], padded[2]], &device);
        for [a, b, e] in &windows {
            let at = [0..1, 0..1, a.clone(), b.clone(), e.clone()];
            let sum = count.clone().slice(at.clone()) + weights.clone();
            count = count.slice_assign(at, sum);
        }
        let out_c = output.dims()[1];
        let blended = output / count.expand([n, out_c, padded[0], padded[1], padded[2]]);
        let crop: [Range<usize>; 3] = std::array::from_fn(|i| pad[i].0..pad[i].0 + image[i]);
        let [a, b, e] = crop;
        Ok(blended.slice([0..n, 0..out_c, a, b, e]))
    }
}

/// Padding `(before, after)` per spatial axis so every side is at least the window's: MONAI puts
/// `diff / 2` before and the odd voxel after.
pub fn symmetric_padding(image: [usize; 3], roi: [usize; 3]) -> [(usize, usize); 3] {
    std::array::from_fn(|i| {
        let diff = roi[i].saturating_sub(image[i]);
        (diff / 2, diff - diff / 2)
    })
}

/// Step between window starts along one axis (`_get_scan_interval`): the whole side when the
/// window spans it, else `int(roi * (1 - overlap))`, at least 1.
pub fn scan_interval(side: usize, roi: usize, overlap: f64) -> usize {
    if roi == side {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as usize).max(1)
    }
}

/// Window starts along one axis of a side at least as long as the window (`dense_patch_slices`):
/// multiples of the interval until a window reaches the end, that last one moved back to end
/// exactly at the border.
pub fn window_starts(side: usize, roi: usize, interval: usize) -> Vec<usize> {
    let roi = roi.min(side);
    let count = (0..side.div_ceil(interval))
        .find(|k| k * interval + roi >= side)
        .map_or(1, |k| k + 1);
    (0..count).map(|k| (k * interval).min(side - roi)).collect()
}

/// Every window of a (padded) volume, D-major then H then W, as MONAI enumerates them.
pub fn window_boxes(padded: [usize; 3], roi: [usize; 3], overlap: f64) -> Vec<[Range<usize>; 3]> {
    let starts: [Vec<usize>; 3] =
        std::array::from_fn(|i| window_starts(padded[i], roi[i], scan_interval(padded[i], roi[i], overlap)));
    let mut boxes = Vec::with_capacity(starts.iter().map(Vec::len).product());
    for &z in &starts[0] {
        for &y in &starts[1] {
            for &x in &starts[2] {
                boxes.push([z..z + roi[0], y..y + roi[1], x..x + roi[2]]);
            }
        }
    }
    boxes
}

/// MONAI's `compute_importance_map` for a window of `roi`, row-major `[D, H, W]`, in f32.
pub fn importance_map(roi: [usize; 3], blend: Blend) -> Vec<f32> {
    let len: usize = roi.iter().product();
    let sigma_scale = match blend {
        Blend::Constant => return vec![1.0; len],
        Blend::Gaussian { sigma_scale } => sigma_scale,
    };
    let axis = |n: usize| -> Vec<f32> {
        let sigma = n as f64 * sigma_scale;
        (0..n)
            .map(|i| {
                let x = i as f64 - (n as f64 - 1.0) / 2.0;
                (x * x / (-2.0 * sigma * sigma)).exp() as f32
            })
            .collect()
    };
    let (gd, gh, gw) = (axis(roi[0]), axis(roi[1]), axis(roi[2]));
    // Multiplied in MONAI's order, (d * h) * w, so the f32 products round alike.
    let mut map = Vec::with_capacity(len);
    for &a in &gd {
        for &b in &gh {
            let ab = a * b;
            map.extend(gw.iter().map(|&c| ab * c));
        }
    }
    let floor = map.iter().copied().fold(f32::INFINITY, f32::min).max(1e-3);
    map.iter_mut().for_each(|v| *v = v.max(floor));
    map
}

#[cfg(test)]
#[path = "sliding_window_tests.rs"]
mod tests;
