//! The Swin encoder of Swin UNETR (MONAI's `SwinTransformer`, v1 layout): a 2^3 patch
//! embedding, then four stages of Swin blocks (unshifted, shifted, ...) that each end with a
//! v1 patch merging.
//!
//! Inside a stage, activations stay as tokens `[batch, d*h*w, C]` (channels last, row-major
//! grid), which is what LayerNorm, the linears and the window gather want; they become NCDHW
//! only for the stage outputs the decoder reads.

use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Tensor, backend::Backend};

use super::attention::WindowAttention;
use super::windows::{WindowPlan, batched_index, index_tensor};

/// Tokens `[batch, d*h*w, C]` with their grid.
#[derive(Debug, Clone)]
pub struct Tokens<B: Backend> {
    pub x: Tensor<B, 3>,
    pub grid: [usize; 3],
}

impl<B: Backend> Tokens<B> {
    pub fn from_ncdhw(x: Tensor<B, 5>) -> Self {
        let [b, c, d, h, w] = x.dims();
        Self {
            x: x.reshape([b, c, d * h * w]).swap_dims(1, 2),
            grid: [d, h, w],
        }
    }

    pub fn to_ncdhw(&self) -> Tensor<B, 5> {
        let [b, _, c] = self.x.dims();
        let [d, h, w] = self.grid;
        self.x.clone().swap_dims(1, 2).reshape([b, c, d, h, w])
    }
}

/// The parameter-free LayerNorm over channels MONAI applies to each stage output
/// (`proj_out` with `normalize=True`; eps 1e-5 as `F.layer_norm`).
pub fn channel_layer_norm<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean).div(var.add_scalar(1e-5).sqrt())
}

/// MONAI's `PatchEmbed` without norm (`patch_norm=False`): a strided conv.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv3d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    pub fn new(in_channels: usize, embed_dim: usize, patch: usize, device: &B::Device) -> Self {
        Self {
            proj: Conv3dConfig::new([in_channels, embed_dim], [patch; 3])
                .with_stride([patch; 3])
                .init(device),
        }
    }
}

/// MONAI's `MLPBlock` in "swin" mode without dropout: Linear -> exact GELU -> Linear.
#[derive(Module, Debug)]
pub struct MlpBlock<B: Backend> {
    pub linear1: Linear<B>,
    pub linear2: Linear<B>,
}

#[derive(Module, Debug)]
pub struct SwinTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: WindowAttention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: MlpBlock<B>,
    /// Configured window and shift (before clamping to the grid); the shift is zero for the
    /// even blocks of a stage.
    pub window_size: [usize; 3],
    pub shift_size: [usize; 3],
}

impl<B: Backend> SwinTransformerBlock<B> {
    fn new(
        dim: usize,
        heads: usize,
        window: [usize; 3],
        shift: [usize; 3],
        mlp_ratio: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: LayerNormConfig::new(dim).init(device),
            attn: WindowAttention::new(dim, heads, window, device),
            norm2: LayerNormConfig::new(dim).init(device),
            mlp: MlpBlock {
                linear1: LinearConfig::new(dim, dim * mlp_ratio).init(device),
                linear2: LinearConfig::new(dim * mlp_ratio, dim).init(device),
            },
            window_size: window,
            shift_size: shift,
        }
    }

    pub fn plan(&self, grid: [usize; 3]) -> WindowPlan {
        WindowPlan::new(grid, self.window_size, self.shift_size)
    }

    fn forward(&self, tokens: Tensor<B, 3>, plan: &WindowPlan) -> Tensor<B, 3> {
        let [batch, rows, c] = tokens.dims();
        let device = tokens.device();
        let h = self.norm1.forward(tokens.clone()).reshape([batch * rows, c]);
        // Padding tokens read one shared zero row appended after the last sample.
        let h = if plan.is_padded() {
            Tensor::cat(vec![h, Tensor::zeros([1, c], &device)], 0)
        } else {
            h
        };
        let (nw, n) = (plan.num_windows(), plan.tokens());
        let identity = !plan.is_padded() && !plan.is_shifted() && nw == 1;
        let windows = if identity {
            h
        } else {
            let index = batched_index(&plan.partition_index(), batch, rows, plan.is_padded());
            h.select(0, index_tensor(index, &device))
        };
        let mask = plan.is_shifted().then(|| plan.attention_mask::<B>(&device));
        let attended = self.attn.forward(windows.reshape([batch * nw, n, c]), mask);
        let attended = attended.reshape([batch * nw * n, c]);
        let attended = if identity {
            attended
        } else {
            let index = batched_index(&plan.reverse_index(), batch, nw * n, false);
            attended.select(0, index_tensor(index, &device))
        };
        let x = tokens + attended.reshape([batch, rows, c]);
        let y = self.mlp.linear1.forward(self.norm2.forward(x.clone()));
        x + self.mlp.linear2.forward(gelu(y))
    }
}

/// MONAI's `PatchMerging` (v1, "merging"): the eight 2x2x2 neighbours concatenated in MONAI's
/// order x0..x7, LayerNorm over 8C, then a bias-free Linear to 2C.
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub reduction: Linear<B>,
    pub norm: LayerNorm<B>,
}

/// MONAI's x0..x7 neighbour offsets (d, h, w), in its concatenation order.
const MERGE_OFFSETS: [[usize; 3]; 8] = [
    [0, 0, 0],
    [1, 0, 0],
    [0, 1, 0],
    [0, 0, 1],
    [1, 1, 0],
    [1, 0, 1],
    [0, 1, 1],
    [1, 1, 1],
];

/// For each merged token (batch-major, row-major grid) and each of its eight neighbours in
/// MONAI's order, the neighbour's row in `[batch * d*h*w, C]`: the whole 2x2x2 regrouping is
/// one gather of channel rows instead of an 8-D permute plus a reorder.
fn merge_index(batch: usize, grid: [usize; 3]) -> Vec<i64> {
    let [d, h, w] = grid;
    let rows = d * h * w;
    let mut index = Vec::with_capacity(batch * rows);
    for b in 0..batch {
        for od in 0..d / 2 {
            for oh in 0..h / 2 {
                for ow in 0..w / 2 {
                    for [dd, dh, dw] in MERGE_OFFSETS {
                        let row = ((2 * od + dd) * h + 2 * oh + dh) * w + 2 * ow + dw;
                        index.push((b * rows + row) as i64);
                    }
                }
            }
        }
    }
    index
}

impl<B: Backend> PatchMerging<B> {
    fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            reduction: LinearConfig::new(8 * dim, 2 * dim).with_bias(false).init(device),
            norm: LayerNormConfig::new(8 * dim).init(device),
        }
    }

    /// # Panics
    /// On an odd grid side (the model's input check rules them out).
    fn forward(&self, tokens: Tokens<B>) -> Tokens<B> {
        let [b, _, c] = tokens.x.dims();
        let [d, h, w] = tokens.grid;
        assert!(
            d % 2 == 0 && h % 2 == 0 && w % 2 == 0,
            "patch merging needs even grid sides, got {d}x{h}x{w}"
        );
        let grid = [d / 2, h / 2, w / 2];
        let rows = grid.iter().product::<usize>();
        let index = index_tensor(merge_index(b, tokens.grid), &tokens.x.device());
        let neighbours = tokens
            .x
            .reshape([b * 8 * rows, c])
            .select(0, index)
            .reshape([b, rows, 8 * c]);
        Tokens {
            x: self.reduction.forward(self.norm.forward(neighbours)),
            grid,
        }
    }
}

/// MONAI's `BasicLayer`: the blocks of one stage, then patch merging.
#[derive(Module, Debug)]
pub struct BasicLayer<B: Backend> {
    pub blocks: Vec<SwinTransformerBlock<B>>,
    pub downsample: PatchMerging<B>,
}

impl<B: Backend> BasicLayer<B> {
    fn new(dim: usize, depth: usize, heads: usize, window: [usize; 3], mlp_ratio: usize, device: &B::Device) -> Self {
        let shift = window.map(|w| w / 2);
        Self {
            blocks: (0..depth)
                .map(|i| {
                    let shift = if i % 2 == 0 { [0; 3] } else { shift };
                    SwinTransformerBlock::new(dim, heads, window, shift, mlp_ratio, device)
                })
                .collect(),
            downsample: PatchMerging::new(dim, device),
        }
    }

    fn forward(&self, tokens: Tokens<B>) -> Tokens<B> {
        let grid = tokens.grid;
        let mut x = tokens.x;
        for block in &self.blocks {
            x = block.forward(x, &block.plan(grid));
        }
        self.downsample.forward(Tokens { x, grid })
    }
}

/// MONAI's `SwinTransformer` (v1: no `layersNc` conv blocks). Each `layersN` is a one-element
/// list, as in MONAI (`layers1.0.blocks.0...`).
#[derive(Module, Debug)]
pub struct SwinTransformer<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub layers1: Vec<BasicLayer<B>>,
    pub layers2: Vec<BasicLayer<B>>,
    pub layers3: Vec<BasicLayer<B>>,
    pub layers4: Vec<BasicLayer<B>>,
}

/// Hyper-parameters the encoder needs (a subset of the model config).
pub struct EncoderShape {
    pub in_channels: usize,
    pub embed_dim: usize,
    pub patch: usize,
    pub window: [usize; 3],
    pub depths: [usize; 4],
    pub heads: [usize; 4],
    pub mlp_ratio: usize,
}

impl<B: Backend> SwinTransformer<B> {
    pub fn new(shape: &EncoderShape, device: &B::Device) -> Self {
        let layer = |i: usize| {
            vec![BasicLayer::new(
                shape.embed_dim << i,
                shape.depths[i],
                shape.heads[i],
                shape.window,
                shape.mlp_ratio,
                device,
            )]
        };
        Self {
            patch_embed: PatchEmbed::new(shape.in_channels, shape.embed_dim, shape.patch, device),
            layers1: layer(0),
            layers2: layer(1),
            layers3: layer(2),
            layers4: layer(3),
        }
    }

    pub fn stages(&self) -> [&BasicLayer<B>; 4] {
        [&self.layers1[0], &self.layers2[0], &self.layers3[0], &self.layers4[0]]
    }

    /// The five normalised hidden states (patch embedding, then each stage), NCDHW.
    pub fn forward(&self, x: Tensor<B, 5>) -> [Tensor<B, 5>; 5] {
        let mut tokens = Tokens::from_ncdhw(self.patch_embed.proj.forward(x));
        let normalised = |t: &Tokens<B>| {
            Tokens {
                x: channel_layer_norm(t.x.clone()),
                grid: t.grid,
            }
            .to_ncdhw()
        };
        let mut outs = Vec::with_capacity(5);
        outs.push(normalised(&tokens));
        for stage in self.stages() {
            tokens = stage.forward(tokens);
            outs.push(normalised(&tokens));
        }
        outs.try_into().expect("five hidden states")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_index_follows_monai_order() {
        // One 2x2x2 cube: x0..x7 are rows 0, 4 (d+1), 2 (h+1), 1 (w+1), 6, 5, 3, 7.
        assert_eq!(merge_index(1, [2, 2, 2]), vec![0, 4, 2, 1, 6, 5, 3, 7]);
        // Second sample, second merged token along w of a 2x2x4 grid.
        let index = merge_index(2, [2, 2, 4]);
        assert_eq!(&index[24..32], &[18, 26, 22, 19, 30, 27, 23, 31]);
    }
}
