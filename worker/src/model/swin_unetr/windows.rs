//! Host-side geometry of (shifted) window attention: which token lands where when a grid is
//! padded to whole windows, rolled by the shift and cut into windows, and which tokens of a
//! window come from different regions of the rolled grid (MONAI's `compute_mask`).
//!
//! MONAI pads, rolls and partitions with three copies of the activations and reverses them
//! with three more. Here each direction is one gather: the permutation is computed once per
//! block and forward call from the grid shape alone (a few hundred thousand integers at most,
//! microseconds), and the device does a single `select` over whole channel rows.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

/// MONAI's `get_window_size`: an axis no longer than the window gets one window spanning it
/// and no shift.
pub fn clamp_window(grid: [usize; 3], window: [usize; 3], shift: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let mut window = window;
    let mut shift = shift;
    for axis in 0..3 {
        if grid[axis] <= window[axis] {
            window[axis] = grid[axis];
            shift[axis] = 0;
        }
    }
    (window, shift)
}

/// One block's window layout over a `grid` of tokens (row-major `d, h, w`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPlan {
    pub grid: [usize; 3],
    /// Window after clamping to the grid.
    pub window: [usize; 3],
    /// Shift after clamping; all zero for the unshifted block.
    pub shift: [usize; 3],
    /// Grid rounded up to whole windows (MONAI pads with zeros after `norm1`).
    pub padded: [usize; 3],
}

impl WindowPlan {
    pub fn new(grid: [usize; 3], window: [usize; 3], shift: [usize; 3]) -> Self {
        let (window, shift) = clamp_window(grid, window, shift);
        let padded = [0, 1, 2].map(|a| grid[a].div_ceil(window[a]) * window[a]);
        Self {
            grid,
            window,
            shift,
            padded,
        }
    }

    /// Tokens per window.
    pub fn tokens(&self) -> usize {
        self.window.iter().product()
    }

    pub fn num_windows(&self) -> usize {
        (0..3).map(|a| self.padded[a] / self.window[a]).product()
    }

    pub fn is_padded(&self) -> bool {
        self.padded != self.grid
    }

    pub fn is_shifted(&self) -> bool {
        self.shift.iter().any(|&s| s > 0)
    }

    /// Padded coordinates in window order: window-major (d, h, w), then token-major inside the
    /// window, exactly MONAI's `window_partition` order.
    fn window_order(&self) -> impl Iterator<Item = [usize; 3]> + '_ {
        let [wd, wh, ww] = self.window;
        let counts = [0, 1, 2].map(|a| self.padded[a] / self.window[a]);
        (0..counts[0]).flat_map(move |bd| {
            (0..counts[1]).flat_map(move |bh| {
                (0..counts[2]).flat_map(move |bw| {
                    (0..wd).flat_map(move |td| {
                        (0..wh).flat_map(move |th| (0..ww).map(move |tw| [bd * wd + td, bh * wh + th, bw * ww + tw]))
                    })
                })
            })
        })
    }

    /// For each token of the rolled, partitioned grid (window order), the row of its source
    /// in the unpadded grid, or `grid volume` for a padding token (the caller appends one
    /// zero row there). `torch.roll(x, -shift)` reads `x[(p + shift) % padded]`.
    pub fn partition_index(&self) -> Vec<i64> {
        let volume = self.grid.iter().product::<usize>() as i64;
        self.window_order()
            .map(|p| {
                let src = [0, 1, 2].map(|a| (p[a] + self.shift[a]) % self.padded[a]);
                if (0..3).any(|a| src[a] >= self.grid[a]) {
                    volume
                } else {
                    ((src[0] * self.grid[1] + src[1]) * self.grid[2] + src[2]) as i64
                }
            })
            .collect()
    }

    /// For each token of the unpadded grid (row-major), its position in window order: the
    /// inverse of [`partition_index`](Self::partition_index) restricted to real tokens, which
    /// reverses the partition, the roll and the padding in one gather.
    pub fn reverse_index(&self) -> Vec<i64> {
        let mut reverse = vec![0i64; self.grid.iter().product()];
        for (position, src) in self.partition_index().into_iter().enumerate() {
            if let Some(slot) = reverse.get_mut(src as usize) {
                *slot = position as i64;
            }
        }
        reverse
    }

    /// MONAI's region label of each token in window order: along a shifted axis the rolled
    /// grid has three regions (`[0, P - w)`, `[P - w, P - s)`, `[P - s, P)`); along an
    /// unshifted axis MONAI's last slice covers everything, so the label is constant. Tokens
    /// whose labels differ must not attend to each other.
    pub fn region_labels(&self) -> Vec<f32> {
        let region = |axis: usize, p: usize| -> usize {
            let (len, w, s) = (self.padded[axis], self.window[axis], self.shift[axis]);
            if s == 0 {
                2
            } else if p < len - w {
                0
            } else if p < len - s {
                1
            } else {
                2
            }
        };
        self.window_order()
            .map(|p| (9 * region(0, p[0]) + 3 * region(1, p[1]) + region(2, p[2])) as f32)
            .collect()
    }

    /// Additive attention mask `[num_windows, n, n]`: -100 between tokens of different
    /// regions (MONAI's value), 0 elsewhere. Built on the device from `num_windows * n` labels.
    pub fn attention_mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3> {
        let (nw, n) = (self.num_windows(), self.tokens());
        let labels = Tensor::<B, 2>::from_data(TensorData::new(self.region_labels(), [nw, n]), device);
        let diff = labels.clone().reshape([nw, n, 1]) - labels.reshape([nw, 1, n]);
        diff.not_equal_elem(0.0).float().mul_scalar(-100.0)
    }
}

/// Uploads an index vector as a 1-D int tensor.
pub fn index_tensor<B: Backend>(index: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let len = index.len();
    Tensor::from_data(TensorData::new(index, [len]), device)
}

/// Offsets a per-sample index to rows of a `[batch * rows, C]` tensor whose extra last row
/// (`batch * rows`) is the zero padding row: sample `b`'s real rows start at `b * rows`.
pub fn batched_index(index: &[i64], batch: usize, rows: usize, has_pad_row: bool) -> Vec<i64> {
    let pad_row = (batch * rows) as i64;
    let mut out = Vec::with_capacity(index.len() * batch);
    for b in 0..batch {
        let offset = (b * rows) as i64;
        out.extend(index.iter().map(|&i| {
            if has_pad_row && i == rows as i64 {
                pad_row
            } else {
                i + offset
            }
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_like_monai() {
        assert_eq!(clamp_window([16, 4, 8], [7, 7, 7], [3, 3, 3]), ([7, 4, 7], [3, 0, 3]));
        assert_eq!(clamp_window([7, 2, 8], [7, 7, 7], [0, 0, 0]), ([7, 2, 7], [0, 0, 0]));
    }

    #[test]
    fn partition_and_reverse_are_inverse_on_real_tokens() {
        for shift in [[0, 0, 0], [3, 3, 3]] {
            let plan = WindowPlan::new([8, 16, 4], [7, 7, 7], shift);
            assert_eq!(plan.window, [7, 7, 4]);
            assert_eq!(plan.padded, [14, 21, 4]);
            let forward = plan.partition_index();
            assert_eq!(forward.len(), plan.num_windows() * plan.tokens());
            let volume = 8 * 16 * 4;
            assert_eq!(
                forward.iter().filter(|&&i| i == volume).count(),
                14 * 21 * 4 - volume as usize
            );
            let reverse = plan.reverse_index();
            for (row, &pos) in reverse.iter().enumerate() {
                assert_eq!(forward[pos as usize], row as i64);
            }
        }
    }

    #[test]
    fn unshifted_unpadded_partition_of_one_window_is_identity() {
        let plan = WindowPlan::new([2, 4, 2], [7, 7, 7], [3, 3, 3]);
        assert!(!plan.is_shifted() && !plan.is_padded());
        assert_eq!(plan.partition_index(), (0..16).collect::<Vec<i64>>());
    }

    #[test]
    fn labels_follow_monai_regions() {
        // One shifted axis of padded length 14 (window 7, shift 3): regions [0,7), [7,11), [11,14).
        let plan = WindowPlan::new([1, 1, 8], [7, 7, 7], [3, 3, 3]);
        assert_eq!(plan.shift, [0, 0, 3]);
        let labels = plan.region_labels();
        let expected: Vec<f32> = (0..14)
            .map(|w| {
                24.0 + if w < 7 {
                    0.0
                } else if w < 11 {
                    1.0
                } else {
                    2.0
                }
            })
            .collect();
        assert_eq!(labels, expected);
    }

    #[test]
    fn batched_index_keeps_the_pad_row_shared() {
        assert_eq!(batched_index(&[0, 2, 1, 3], 2, 3, true), vec![0, 2, 1, 6, 3, 5, 4, 6]);
    }
}
