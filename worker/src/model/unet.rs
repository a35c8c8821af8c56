//! The Models Genesis 3D U-Net that SuPreM trains (`model/Unet.py` in MrGiovanni/SuPreM): the
//! first SuPreM backbone, 19,075,225 parameters with 25 outputs.
//!
//! Level `i` (of `depth`) runs two 3x3x3 conv + BatchNorm + ReLU blocks, `width * 2^i` then
//! `width * 2^(i+1)` channels (the channels double inside each level: 1->32->64, 64->64->128, ...),
//! then a 2x2x2 max-pool unless it is the coarsest. Each decoder level upsamples with a 2x2x2
//! stride-2 transposed conv that keeps its channel count, concatenates the encoder's skip and runs
//! two conv blocks down to the skip's width. A 1x1x1 conv gives one logit per class.
//!
//! Module names mirror PyTorch's, so the state-dict mapping is mechanical: the level-`i`
//! transitions live in `down_tr[i]` / `up_tr[i]`, PyTorch's `down_tr{64 << i}` / `up_tr{64 << i}`
//! (names SuPreM derived from its width-32 channel counts; they stay the same at any width), and
//! everything below them (`ops.N.conv1`, `ops.N.bn1`, `up_conv`, `out_tr.final_conv`) is identical.
//!
//! SuPreM's `ContBatchNorm3d` normalises with batch statistics even in eval mode. Here BatchNorm
//! follows PyTorch's `nn.BatchNorm3d` and burn's convention: batch statistics while training,
//! running statistics on the inner backend (`model.valid()`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::PaddingConfig3d;
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Tensor, backend::Backend};

use super::batchnorm::BatchNorm3d;
use super::pool::max_pool3d;
use super::{ArchConfig, ModelConfigError, Segmenter, StageSummary, param_count};

/// Hyper-parameters of [`UNet`]. Serialisable, so a checkpoint can carry the config that rebuilds
/// the module its weights belong to.
#[derive(Config, Debug, PartialEq, Eq)]
pub struct UNetConfig {
    /// Input channels (1 for CT).
    #[config(default = 1)]
    pub in_channels: usize,
    /// Output channels: one sigmoid logit per class (25 SuPreM classes).
    #[config(default = 25)]
    pub out_channels: usize,
    /// Channels of the first conv; level `i` has `base_width * 2^i`, then `base_width * 2^(i+1)`.
    #[config(default = 32)]
    pub base_width: usize,
    /// Number of resolution levels (1 means no pooling at all).
    #[config(default = 4)]
    pub depth: usize,
    /// Normalise with batch statistics in evaluation too, as SuPreM's `ContBatchNorm3d` does (its
    /// released weights expect it); `false` gives `nn.BatchNorm3d`'s running statistics.
    #[config(default = true)]
    pub batch_stats_in_eval: bool,
}

/// The SuPreM preset: width 32, four levels, 25 classes (19,075,225 parameters).
pub fn suprem() -> UNetConfig {
    UNetConfig::new()
}

/// Preset for CPU tests and demos: SuPreM's topology at an eighth of the width (299,209 parameters
/// with 25 outputs). Forward + backward + AdamW at batch 2, 32^3, 25 classes: ~0.56 s on two
/// (shared) cores (`bench-train-step --preset tiny` measures it); at batch 1 and 2 classes it fits a noisy 32^3 sphere to an
/// eval-mode Dice above 0.9 in about 70 AdamW steps (lr 3e-3), ~20 s.
pub fn tiny() -> UNetConfig {
    UNetConfig::new().with_base_width(4)
}

// Beyond this the coarsest level of any realistic patch is below one voxel.
const MAX_DEPTH: usize = 8;

impl UNetConfig {
    /// Checks every field; [`init`](Self::init) panics on what this rejects.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("base_width", self.base_width),
            ("depth", self.depth),
        ] {
            if value == 0 {
                return Err(ModelConfigError::new(field, "must be at least 1"));
            }
        }
        if self.depth > MAX_DEPTH {
            return Err(ModelConfigError::new(
                "depth",
                format!("must be at most {MAX_DEPTH}, got {}", self.depth),
            ));
        }
        // The widest tensor is the coarsest level's output, base_width * 2^depth channels.
        if self
            .base_width
            .checked_mul(1 << self.depth)
            .is_none_or(|w| w > (1 << 20))
        {
            return Err(ModelConfigError::new(
                "base_width",
                format!(
                    "{} is too wide for depth {}: the bottleneck would exceed 2^20 channels",
                    self.base_width, self.depth
                ),
            ));
        }
        Ok(())
    }

    /// Every spatial dim of the input must be a multiple of this.
    pub fn size_multiple(&self) -> usize {
        1 << self.depth.saturating_sub(1)
    }

    /// Channels a level's encoder block outputs (its skip), and what its decoder block outputs.
    fn level_out(&self, level: usize) -> usize {
        self.base_width << (level + 1)
    }

    /// Builds the network with burn's default initialisation. Ranks that must start identical use
    /// [`super::ModelConfig::init_seeded`].
    ///
    /// # Panics
    /// If [`validate`](Self::validate) fails.
    pub fn init<B: Backend>(&self, device: &B::Device) -> UNet<B> {
        if let Err(err) = self.validate() {
            panic!("{err}");
        }
        let bn = self.batch_stats_in_eval;
        let down_tr = (0..self.depth)
            .map(|level| {
                let c_in = if level == 0 {
                    self.in_channels
                } else {
                    self.base_width << level
                };
                let mid = self.base_width << level;
                DownTransition {
                    ops: vec![
                        LUConv::new(c_in, mid, bn, device),
                        LUConv::new(mid, 2 * mid, bn, device),
                    ],
                }
            })
            .collect();
        let up_tr = (0..self.depth - 1)
            .map(|level| {
                let (below, skip) = (self.level_out(level + 1), self.level_out(level));
                UpTransition {
                    up_conv: ConvTranspose3dConfig::new([below, below], [2, 2, 2])
                        .with_stride([2, 2, 2])
                        .init(device),
                    ops: vec![
                        LUConv::new(below + skip, skip, bn, device),
                        LUConv::new(skip, skip, bn, device),
                    ],
                }
            })
            .collect();
        let out_tr = OutputTransition {
            final_conv: Conv3dConfig::new([self.level_out(0), self.out_channels], [1, 1, 1]).init(device),
        };
        UNet {
            down_tr,
            up_tr,
            out_tr,
            in_channels: self.in_channels,
            size_multiple: self.size_multiple(),
        }
    }
}

/// Conv 3x3x3 (with bias, as SuPreM has it) -> BatchNorm -> ReLU. PyTorch's `LUConv`.
#[derive(Module, Debug)]
pub struct LUConv<B: Backend> {
    pub conv1: Conv3d<B>,
    pub bn1: BatchNorm3d<B>,
}

impl<B: Backend> LUConv<B> {
    fn new(in_channels: usize, out_channels: usize, batch_stats_in_eval: bool, device: &B::Device) -> Self {
        Self {
            conv1: Conv3dConfig::new([in_channels, out_channels], [3, 3, 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .init(device),
            bn1: BatchNorm3d::new(out_channels, batch_stats_in_eval, device),
        }
    }

    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        relu(self.bn1.forward(self.conv1.forward(x)))
    }
}

fn run_ops<B: Backend>(ops: &[LUConv<B>], x: Tensor<B, 5>) -> Tensor<B, 5> {
    ops.iter().fold(x, |x, op| op.forward(x))
}

/// One encoder level's conv blocks (the pooling after them is parameter-free and done by
/// [`UNet::forward`]). PyTorch's `DownTransition`.
#[derive(Module, Debug)]
pub struct DownTransition<B: Backend> {
    pub ops: Vec<LUConv<B>>,
}

/// One decoder level: upsample, concatenate the skip, two conv blocks. PyTorch's `UpTransition`.
#[derive(Module, Debug)]
pub struct UpTransition<B: Backend> {
    pub up_conv: ConvTranspose3d<B>,
    pub ops: Vec<LUConv<B>>,
}

/// The 1x1x1 head. PyTorch's `OutputTransition` (whose sigmoid the loss applies).
#[derive(Module, Debug)]
pub struct OutputTransition<B: Backend> {
    pub final_conv: Conv3d<B>,
}

/// SuPreM's 3D U-Net producing one logit per class and voxel.
#[derive(Module, Debug)]
pub struct UNet<B: Backend> {
    /// Encoder levels, finest first (PyTorch `down_tr64`, `down_tr128`, ...).
    pub down_tr: Vec<DownTransition<B>>,
    /// `up_tr[i]` rebuilds level `i` (PyTorch `up_tr{64 << i}`); forward runs them coarsest first.
    pub up_tr: Vec<UpTransition<B>>,
    pub out_tr: OutputTransition<B>,
    in_channels: usize,
    size_multiple: usize,
}

impl<B: Backend> UNet<B> {
    /// Why `forward` would reject an input of this shape, if it would.
    pub fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        super::check_input(dims, self.in_channels, self.size_multiple)
    }

    /// `[N, C_in, D, H, W]` -> logits `[N, C_out, D, H, W]`.
    ///
    /// # Panics
    /// If [`check_input_shape`](Self::check_input_shape) rejects the input.
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        if let Err(err) = self.check_input_shape(x.dims()) {
            panic!("UNet::forward: {err}");
        }
        let mut skips = Vec::with_capacity(self.up_tr.len());
        let mut x = x;
        for (level, down) in self.down_tr.iter().enumerate() {
            x = run_ops(&down.ops, x);
            if level < self.up_tr.len() {
                skips.push(x.clone());
                x = max_pool3d(x, [2, 2, 2], [2, 2, 2]);
            }
        }
        for up in self.up_tr.iter().rev() {
            let skip = skips.pop().expect("one skip per decoder level");
            x = run_ops(&up.ops, Tensor::cat(vec![up.up_conv.forward(x), skip], 1));
        }
        self.out_tr.final_conv.forward(x)
    }

    /// torchinfo-like rows: each `down_tr` (output: what goes to the next level, i.e. pooled
    /// unless coarsest), each `up_tr` in forward order, `out_tr`. Params are PyTorch's count.
    pub fn stages(&self, input: [usize; 5]) -> Vec<StageSummary> {
        let [n, _, d, h, w] = input;
        let at = |level: usize, channels: usize| vec![n, channels, d >> level, h >> level, w >> level];
        let channels = |ops: &[LUConv<B>]| ops.last().map_or(0, |op| op.bn1.weight.dims()[0]);
        let mut rows = Vec::new();
        for (level, down) in self.down_tr.iter().enumerate() {
            let pooled = usize::from(level < self.up_tr.len());
            rows.push(StageSummary {
                name: format!("down_tr{}", 64 << level),
                output: at(level + pooled, channels(&down.ops)),
                params: param_count(down),
            });
        }
        for (level, up) in self.up_tr.iter().enumerate().rev() {
            rows.push(StageSummary {
                name: format!("up_tr{}", 64 << level),
                output: at(level, channels(&up.ops)),
                params: param_count(up),
            });
        }
        rows.push(StageSummary {
            name: "out_tr".into(),
            output: at(0, self.out_tr.final_conv.weight.dims()[0]),
            params: param_count(&self.out_tr),
        });
        rows
    }
}

/// PyTorch state-dict module path for a burn module path (see [`ArchConfig::torch_module_path`]):
/// `down_tr.{i}` / `up_tr.{i}` become `down_tr{64 << i}` / `up_tr{64 << i}`, the rest is kept.
pub fn torch_module_path(burn_path: &str) -> Option<String> {
    let (head, rest) = burn_path.split_once('.').unwrap_or((burn_path, ""));
    let renamed = match head {
        "down_tr" | "up_tr" => {
            let (index, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let level: u32 = index.parse().ok().filter(|&l| l < MAX_DEPTH as u32)?;
            return Some(join(&format!("{head}{}", 64u64 << level), rest));
        }
        "out_tr" => head.to_string(),
        _ => return None,
    };
    Some(join(&renamed, rest))
}

fn join(head: &str, rest: &str) -> String {
    if rest.is_empty() {
        head.to_string()
    } else {
        format!("{head}.{rest}")
    }
}

impl<B: Backend> Segmenter<B> for UNet<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        UNet::forward(self, x)
    }
    fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        UNet::check_input_shape(self, dims)
    }
    fn stages(&self, input: [usize; 5]) -> Vec<StageSummary> {
        UNet::stages(self, input)
    }
}

impl ArchConfig for UNetConfig {
    type Model<B: Backend> = UNet<B>;
    fn validate(&self) -> Result<(), ModelConfigError> {
        UNetConfig::validate(self)
    }
    fn init<B: Backend>(&self, device: &B::Device) -> UNet<B> {
        UNetConfig::init(self, device)
    }
    fn size_multiple(&self) -> usize {
        UNetConfig::size_multiple(self)
    }
    fn torch_module_path(burn_path: &str) -> Option<String> {
        torch_module_path(burn_path)
    }
}

#[cfg(test)]
#[path = "unet_tests.rs"]
mod tests;
