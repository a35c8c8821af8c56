//! MONAI's `WindowAttention`: multi-head self-attention inside each window, with a learned
//! relative-position bias per head and, for shifted windows, an additive mask.
//!
//! All windows of all samples go through one batched matmul; the bias table is gathered with
//! one `select` per call. `relative_position_index` is MONAI's int64 buffer, kept as an int
//! `Param` under the same name so that it is part of the state dict on import and export; it is
//! always built for the configured (unclamped) window, and a clamped window of `n` tokens uses
//! its top-left `n x n` corner, as MONAI does.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

#[derive(Module, Debug)]
pub struct WindowAttention<B: Backend> {
    /// `[(2wd-1)(2wh-1)(2ww-1), heads]`.
    pub relative_position_bias_table: Param<Tensor<B, 2>>,
    /// `[wd*wh*ww, wd*wh*ww]` rows of the table for each (query, key) pair.
    pub relative_position_index: Param<Tensor<B, 2, Int>>,
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub num_heads: usize,
}

/// MONAI's `relative_position_index` for a window, row-major over (query, key) tokens.
pub fn relative_position_index(window: [usize; 3]) -> Vec<i64> {
    let [wd, wh, ww] = window.map(|w| w as i64);
    let coords: Vec<[i64; 3]> = (0..wd)
        .flat_map(|d| (0..wh).flat_map(move |h| (0..ww).map(move |w| [d, h, w])))
        .collect();
    let mut index = Vec::with_capacity(coords.len() * coords.len());
    for q in &coords {
        for k in &coords {
            let rel = [q[0] - k[0] + wd - 1, q[1] - k[1] + wh - 1, q[2] - k[2] + ww - 1];
            index.push(rel[0] * (2 * wh - 1) * (2 * ww - 1) + rel[1] * (2 * ww - 1) + rel[2]);
        }
    }
    index
}

impl<B: Backend> WindowAttention<B> {
    pub fn new(dim: usize, num_heads: usize, window: [usize; 3], device: &B::Device) -> Self {
        let table_rows = window.iter().map(|w| 2 * w - 1).product::<usize>();
        let n = window.iter().product::<usize>();
        let index = Tensor::from_data(TensorData::new(relative_position_index(window), [n, n]), device);
        Self {
            // MONAI draws it from trunc_normal(std 0.02); `params::reseed` does the same.
            relative_position_bias_table: Param::from_tensor(Tensor::zeros([table_rows, num_heads], device)),
            relative_position_index: Param::initialized(ParamId::new(), index),
            // MONAI's SwinUNETR builds its qkv with bias (qkv_bias=True is its default).
            qkv: LinearConfig::new(dim, 3 * dim).init(device),
            proj: LinearConfig::new(dim, dim).init(device),
            num_heads,
        }
    }

    /// `[heads, n, n]` bias for windows of `n` tokens.
    fn position_bias(&self, n: usize) -> Tensor<B, 3> {
        let index = self.relative_position_index.val().slice([0..n, 0..n]).reshape([n * n]);
        let heads = self.num_heads;
        self.relative_position_bias_table
            .val()
            .select(0, index)
            .reshape([n, n, heads])
            .permute([2, 0, 1])
    }

    /// `x`: `[batch * windows, n, C]` (sample-major). `mask`: `[windows, n, n]` for shifted
    /// windows.
    pub fn forward(&self, x: Tensor<B, 3>, mask: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let [bw, n, c] = x.dims();
        let heads = self.num_heads;
        let head_dim = c / heads;
        // [bw, n, 3, heads, hd] -> [3, bw, heads, n, hd]
        let qkv = self
            .qkv
            .forward(x)
            .reshape([bw, n, 3, heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.clone().narrow(0, 0, 1).reshape([bw, heads, n, head_dim]);
        let k = qkv.clone().narrow(0, 1, 1).reshape([bw, heads, n, head_dim]);
        let v = qkv.narrow(0, 2, 1).reshape([bw, heads, n, head_dim]);
        let scale = (head_dim as f64).powf(-0.5);
        let attn = (q * scale).matmul(k.swap_dims(2, 3));
        let attn = attn + self.position_bias(n).unsqueeze::<4>();
        let attn = match mask {
            Some(mask) => {
                let nw = mask.dims()[0];
                let attn = attn.reshape([bw / nw, nw, heads, n, n]) + mask.reshape([1, nw, 1, n, n]);
                attn.reshape([bw, heads, n, n])
            }
            None => attn,
        };
        let out = softmax(attn, 3).matmul(v).swap_dims(1, 2).reshape([bw, n, c]);
        self.proj.forward(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_monai_corners() {
        // MONAI, window 7^3: index[0, 0] = 1098 (the centre of the 13^3 table), index[0, 342]
        // = 0 (query at the origin, key at the far corner), index[342, 0] = 2196.
        let index = relative_position_index([7, 7, 7]);
        assert_eq!(index.len(), 343 * 343);
        assert_eq!(index[0], 1098);
        assert_eq!(index[342], 0);
        assert_eq!(index[342 * 343], 2196);
        assert_eq!(*index.iter().max().unwrap(), 2196);
    }
}
