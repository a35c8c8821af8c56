//! MONAI's `SegResNet` (Myronenko 2018, without the VAE branch): the second SuPreM backbone.
//!
//! A residual encoder (pre-activation ResBlocks: GroupNorm, ReLU, 3x3x3 conv, twice, plus the
//! identity), stride-2 3x3x3 convolutions between levels, and a light decoder: per level a 1x1x1
//! convolution halving the channels, trilinear x2 upsampling (MONAI's "nontrainable" mode,
//! `align_corners = false`), the encoder's skip *added*, and ResBlocks. A GroupNorm, ReLU and a
//! 1x1x1 convolution with bias make the logits.
//!
//! Fields are named like MONAI's attributes so that importing its state dicts is a name mapping
//! ([`SegResNetConfig::torch_module_path`]); the differences are MONAI's `nn.Sequential` indices
//! and the `Convolution` wrapper's `.conv`.

mod paths;
#[cfg(test)]
mod tests;

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig3d};
use burn::tensor::activation::relu;
use burn::tensor::{Tensor, backend::Backend};

use super::interpolate::{Interpolate3dMode, interpolate3d_scale};
use super::{ArchConfig, ModelConfigError, Segmenter, StageSummary};

/// Hyper-parameters of [`SegResNet`]; defaults are SuPreM's (MONAI's layout, 16 initial filters,
/// 25 classes).
#[derive(Config, Debug, PartialEq, Eq)]
pub struct SegResNetConfig {
    /// Input channels (1 for CT).
    #[config(default = 1)]
    pub in_channels: usize,
    /// Output channels: one sigmoid logit per class.
    #[config(default = 25)]
    pub out_channels: usize,
    /// Channels at full resolution; level `i` has `init_filters * 2^i`.
    #[config(default = 16)]
    pub init_filters: usize,
    /// ResBlocks per encoder level, finest first; its length is the number of levels.
    #[config(default = "vec![1, 2, 2, 4]")]
    pub blocks_down: Vec<usize>,
    /// ResBlocks per decoder level, coarsest first; one entry per level below the finest.
    #[config(default = "vec![1, 1, 1]")]
    pub blocks_up: Vec<usize>,
    /// GroupNorm groups; must divide `init_filters`.
    #[config(default = 8)]
    pub norm_groups: usize,
}

/// SuPreM's SegResNet: 4,701,305 parameters with 25 outputs (18,796,761 at `init_filters` 32).
pub fn suprem() -> SegResNetConfig {
    SegResNetConfig::new()
}

/// SuPreM's layout at half the width (8 filters, 8 groups: 1,176,393 parameters), for CPU tests
/// and demos. One forward + backward + AdamW step at batch 2, 32^3, 25 classes took 0.56-0.62 s
/// on the two (shared) cores of the dev machine (`bench-train-step --preset tiny` measures it).
pub fn tiny() -> SegResNetConfig {
    SegResNetConfig::new().with_init_filters(8)
}

// Beyond this the coarsest level of any realistic patch is below one voxel.
const MAX_LEVELS: usize = 8;
// The widest level allowed (init_filters * 2^(levels-1)); far beyond any real model.
const MAX_WIDTH: usize = 1 << 20;

impl SegResNetConfig {
    /// Checks every field; [`init`](ArchConfig::init) panics on what this rejects.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("init_filters", self.init_filters),
            ("norm_groups", self.norm_groups),
        ] {
            if value == 0 {
                return Err(ModelConfigError::new(field, "must be at least 1"));
            }
        }
        let levels = self.blocks_down.len();
        if levels == 0 || levels > MAX_LEVELS {
            return Err(ModelConfigError::new(
                "blocks_down",
                format!("must list 1 to {MAX_LEVELS} levels, got {levels}"),
            ));
        }
        if self.blocks_up.len() != levels - 1 {
            return Err(ModelConfigError::new(
                "blocks_up",
                format!(
                    "must have one entry per level below the finest ({}), got {}",
                    levels - 1,
                    self.blocks_up.len()
                ),
            ));
        }
        if !self.init_filters.is_multiple_of(self.norm_groups) {
            return Err(ModelConfigError::new(
                "norm_groups",
                format!(
                    "{} does not divide init_filters {}",
                    self.norm_groups, self.init_filters
                ),
            ));
        }
        if self
            .init_filters
            .checked_mul(1 << (levels - 1))
            .is_none_or(|w| w > MAX_WIDTH)
        {
            return Err(ModelConfigError::new(
                "init_filters",
                format!(
                    "{} is too wide for {levels} levels: the bottleneck would exceed 2^20 channels",
                    self.init_filters
                ),
            ));
        }
        Ok(())
    }

    fn levels(&self) -> usize {
        self.blocks_down.len()
    }

    fn width(&self, level: usize) -> usize {
        self.init_filters << level
    }

    fn group_norm<B: Backend>(&self, channels: usize, device: &B::Device) -> GroupNorm<B> {
        // MONAI's GroupNorm: eps 1e-5, affine.
        GroupNormConfig::new(self.norm_groups, channels)
            .with_epsilon(1e-5)
            .init(device)
    }

    fn res_block<B: Backend>(&self, channels: usize, device: &B::Device) -> ResBlock<B> {
        ResBlock {
            norm1: self.group_norm(channels, device),
            norm2: self.group_norm(channels, device),
            conv1: conv(channels, channels, 3, 1, device),
            conv2: conv(channels, channels, 3, 1, device),
        }
    }
}

/// MONAI's `get_conv_layer`: "same" padding, no bias.
fn conv<B: Backend>(input: usize, output: usize, kernel: usize, stride: usize, device: &B::Device) -> Conv3d<B> {
    let pad = (kernel - 1) / 2;
    Conv3dConfig::new([input, output], [kernel; 3])
        .with_stride([stride; 3])
        .with_padding(PaddingConfig3d::Explicit(pad, pad, pad))
        .with_bias(false)
        .init(device)
}

/// Pre-activation residual block: `x + conv2(relu(norm2(conv1(relu(norm1(x))))))`.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    norm1: GroupNorm<B>,
    norm2: GroupNorm<B>,
    conv1: Conv3d<B>,
    conv2: Conv3d<B>,
}

impl<B: Backend> ResBlock<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let y = self.conv1.forward(relu(self.norm1.forward(x.clone())));
        let y = self.conv2.forward(relu(self.norm2.forward(y)));
        y + x
    }
}

/// One encoder level: MONAI's `nn.Sequential(pre_conv, *ResBlocks)`, where `pre_conv` is an
/// `nn.Identity` at the finest level and a stride-2 3x3x3 convolution below it.
#[derive(Module, Debug)]
pub struct DownLayer<B: Backend> {
    pre_conv: Option<Conv3d<B>>,
    blocks: Vec<ResBlock<B>>,
}

impl<B: Backend> DownLayer<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let x = match &self.pre_conv {
            Some(conv) => conv.forward(x),
            None => x,
        };
        self.blocks.iter().fold(x, |x, block| block.forward(x))
    }
}

/// MONAI's `nn.Sequential(1x1x1 conv halving the channels, UpSample(trilinear x2))`.
#[derive(Module, Debug)]
pub struct UpSample<B: Backend> {
    conv: Conv3d<B>,
}

impl<B: Backend> UpSample<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        // nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False), as MONAI builds it.
        interpolate3d_scale(
            self.conv.forward(x),
            [2.0; 3],
            Interpolate3dMode::Trilinear { align_corners: false },
        )
    }
}

/// MONAI's `conv_final`: `nn.Sequential(GroupNorm, ReLU, 1x1x1 conv with bias)`.
#[derive(Module, Debug)]
pub struct FinalConv<B: Backend> {
    norm: GroupNorm<B>,
    conv: Conv3d<B>,
}

impl<B: Backend> FinalConv<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        self.conv.forward(relu(self.norm.forward(x)))
    }
}

/// MONAI's SegResNet (3D, no dropout, nontrainable upsampling), one logit per class and voxel.
#[derive(Module, Debug)]
pub struct SegResNet<B: Backend> {
    /// MONAI's `convInit`.
    conv_init: Conv3d<B>,
    /// Finest first.
    down_layers: Vec<DownLayer<B>>,
    /// Coarsest first: `up_samples[i]` then `up_layers[i]` rebuild level `levels - 2 - i`.
    up_layers: Vec<Vec<ResBlock<B>>>,
    up_samples: Vec<UpSample<B>>,
    conv_final: FinalConv<B>,
    in_channels: usize,
    out_channels: usize,
    init_filters: usize,
}

impl<B: Backend> SegResNet<B> {
    fn levels(&self) -> usize {
        self.down_layers.len()
    }

    fn size_multiple(&self) -> usize {
        1 << (self.levels() - 1)
    }
}

impl<B: Backend> Segmenter<B> for SegResNet<B> {
    /// # Panics
    /// If [`check_input_shape`](Segmenter::check_input_shape) rejects the input.
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        if let Err(err) = self.check_input_shape(x.dims()) {
            panic!("SegResNet::forward: {err}");
        }
        let mut x = self.conv_init.forward(x);
        let mut skips = Vec::with_capacity(self.levels());
        for down in &self.down_layers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        // The coarsest level's output is `x` itself, not a skip.
        skips.pop();
        for (up, blocks) in self.up_samples.iter().zip(&self.up_layers) {
            let skip = skips.pop().expect("one skip per decoder level");
            x = up.forward(x) + skip;
            x = blocks.iter().fold(x, |x, block| block.forward(x));
        }
        self.conv_final.forward(x)
    }

    fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        crate::model::check_input(dims, self.in_channels, self.size_multiple())
    }

    fn stages(&self, input: [usize; 5]) -> Vec<StageSummary> {
        let [n, _, d, h, w] = input;
        let levels = self.levels();
        // A stride-2 "same" convolution rounds up.
        let spatial = |level: usize| [d, h, w].map(|s| s.div_ceil(1 << level));
        let shape = |channels: usize, level: usize| {
            let mut shape = vec![n, channels];
            shape.extend(spatial(level));
            shape
        };
        let width = |level: usize| self.init_filters << level;
        let mut rows = vec![StageSummary {
            name: "convInit".into(),
            output: shape(width(0), 0),
            params: self.conv_init.num_params(),
        }];
        for (level, down) in self.down_layers.iter().enumerate() {
            rows.push(StageSummary {
                name: format!("down_layers.{level}"),
                output: shape(width(level), level),
                params: down.num_params(),
            });
        }
        for (i, (up, blocks)) in self.up_samples.iter().zip(&self.up_layers).enumerate() {
            let level = levels - 2 - i;
            rows.push(StageSummary {
                name: format!("up_samples.{i}"),
                output: shape(width(level), level),
                params: up.num_params(),
            });
            rows.push(StageSummary {
                name: format!("up_layers.{i}"),
                output: shape(width(level), level),
                params: blocks.num_params(),
            });
        }
        rows.push(StageSummary {
            name: "conv_final".into(),
            output: shape(self.out_channels, 0),
            params: self.conv_final.num_params(),
        });
        rows
    }
}

impl ArchConfig for SegResNetConfig {
    type Model<B: Backend> = SegResNet<B>;

    fn validate(&self) -> Result<(), ModelConfigError> {
        SegResNetConfig::validate(self)
    }

    /// # Panics
    /// If [`validate`](ArchConfig::validate) fails.
    fn init<B: Backend>(&self, device: &B::Device) -> SegResNet<B> {
        if let Err(err) = SegResNetConfig::validate(self) {
            panic!("{err}");
        }
        let levels = self.levels();
        let down_layers = self
            .blocks_down
            .iter()
            .enumerate()
            .map(|(level, &blocks)| DownLayer {
                pre_conv: (level > 0).then(|| conv(self.width(level - 1), self.width(level), 3, 2, device)),
                blocks: (0..blocks).map(|_| self.res_block(self.width(level), device)).collect(),
            })
            .collect();
        let mut up_layers = Vec::with_capacity(levels - 1);
        let mut up_samples = Vec::with_capacity(levels - 1);
        for (i, &blocks) in self.blocks_up.iter().enumerate() {
            let level = levels - 2 - i;
            up_samples.push(UpSample {
                conv: conv(self.width(level + 1), self.width(level), 1, 1, device),
            });
            up_layers.push((0..blocks).map(|_| self.res_block(self.width(level), device)).collect());
        }
        SegResNet {
            conv_init: conv(self.in_channels, self.init_filters, 3, 1, device),
            down_layers,
            up_layers,
            up_samples,
            conv_final: FinalConv {
                norm: self.group_norm(self.init_filters, device),
                conv: Conv3dConfig::new([self.init_filters, self.out_channels], [1, 1, 1]).init(device),
            },
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            init_filters: self.init_filters,
        }
    }

    fn size_multiple(&self) -> usize {
        1 << self.levels().saturating_sub(1)
    }

    fn torch_module_path(burn_path: &str) -> Option<String> {
        paths::torch_module_path(burn_path)
    }
}
