//! A plain 3D U-Net: the first SuPreM backbone, and the one small enough to train on CPUs in
//! tests and demos.
//!
//! burn 0.21 has no 3D pooling, so the encoder downsamples with a stride-2 2x2x2 convolution (a
//! learned pooling) and the decoder upsamples with a stride-2 2x2x2 transposed convolution.
//! Normalisation is InstanceNorm: BatchNorm's running statistics would drift apart across
//! data-parallel ranks unless they were synchronised every step, which the all-reduce does not do
//! yet; instance statistics are per sample, so ranks stay identical for free.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::{InstanceNorm, InstanceNormConfig, PaddingConfig3d};
use burn::tensor::activation::relu;
use burn::tensor::{Tensor, backend::Backend};

use super::{ArchConfig, ModelConfigError, Segmenter, StageSummary};

/// Hyper-parameters of [`UNet3d`]. Serialisable, so a checkpoint can carry the config that
/// rebuilds the module its weights belong to.
#[derive(Config, Debug, PartialEq, Eq)]
pub struct UNet3dConfig {
    /// Input channels (1 for CT).
    #[config(default = 1)]
    pub in_channels: usize,
    /// Output channels: one sigmoid logit per class (25 SuPreM classes).
    #[config(default = 25)]
    pub out_channels: usize,
    /// Channels at the finest level; level `i` has `base_width * 2^i`.
    #[config(default = 32)]
    pub base_width: usize,
    /// Number of resolution levels (1 means no downsampling at all).
    #[config(default = 4)]
    pub depth: usize,
}

/// Preset for CPU demos and tests: the default topology (four levels) at a quarter of the width.
/// One training step (batch 1, patch 32^3, 25 classes, forward + backward + AdamW) measured
/// ~0.42 s on one core and ~0.32 s on two (`benches/step.rs`). Three levels cost the same (the
/// fourth works at 4^3) with a quarter of the parameters and half the receptive field; width 16
/// roughly doubles the step time.
pub fn tiny() -> UNet3dConfig {
    UNet3dConfig::new().with_base_width(8).with_depth(4)
}

// Beyond this the coarsest level of any realistic patch is below one voxel.
const MAX_DEPTH: usize = 8;

impl UNet3dConfig {
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
        if self
            .base_width
            .checked_mul(1 << (self.depth - 1))
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

    fn width(&self, level: usize) -> usize {
        self.base_width << level
    }

    /// Builds the network with burn's default (Kaiming-uniform) initialisation, drawn from the
    /// backend's global RNG. Ranks that must start identical use [`init_seeded`](Self::init_seeded).
    ///
    /// # Panics
    /// If [`validate`](Self::validate) fails.
    pub fn init<B: Backend>(&self, device: &B::Device) -> UNet3d<B> {
        if let Err(err) = self.validate() {
            panic!("{err}");
        }
        let mut encoders = Vec::with_capacity(self.depth);
        let mut downs = Vec::with_capacity(self.depth - 1);
        let mut ups = Vec::with_capacity(self.depth - 1);
        let mut decoders = Vec::with_capacity(self.depth - 1);
        let mut channels = self.in_channels;
        for level in 0..self.depth {
            let width = self.width(level);
            encoders.push(DoubleConv::new(channels, width, device));
            channels = width;
            if level + 1 < self.depth {
                downs.push(
                    Conv3dConfig::new([width, width], [2, 2, 2])
                        .with_stride([2, 2, 2])
                        .init(device),
                );
            }
        }
        // Decoder modules are stored coarsest first, the order forward uses them.
        for level in (0..self.depth - 1).rev() {
            let width = self.width(level);
            ups.push(
                ConvTranspose3dConfig::new([self.width(level + 1), width], [2, 2, 2])
                    .with_stride([2, 2, 2])
                    .init(device),
            );
            decoders.push(DoubleConv::new(2 * width, width, device));
        }
        let head = Conv3dConfig::new([self.width(0), self.out_channels], [1, 1, 1]).init(device);
        UNet3d {
            encoders,
            downs,
            ups,
            decoders,
            head,
            in_channels: self.in_channels,
            size_multiple: self.size_multiple(),
        }
    }
}

/// Conv 3x3x3 → InstanceNorm → ReLU.
#[derive(Module, Debug)]
pub struct ConvBlock<B: Backend> {
    conv: Conv3d<B>,
    norm: InstanceNorm<B>,
}

impl<B: Backend> ConvBlock<B> {
    fn new(in_channels: usize, out_channels: usize, device: &B::Device) -> Self {
        Self {
            conv: Conv3dConfig::new([in_channels, out_channels], [3, 3, 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                // The norm subtracts the per-channel mean, so a bias here would be dead weight.
                .with_bias(false)
                .init(device),
            norm: InstanceNormConfig::new(out_channels).with_affine(true).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        relu(self.norm.forward(self.conv.forward(x)))
    }
}

/// The two conv blocks of one U-Net level.
#[derive(Module, Debug)]
pub struct DoubleConv<B: Backend> {
    first: ConvBlock<B>,
    second: ConvBlock<B>,
}

impl<B: Backend> DoubleConv<B> {
    fn new(in_channels: usize, out_channels: usize, device: &B::Device) -> Self {
        Self {
            first: ConvBlock::new(in_channels, out_channels, device),
            second: ConvBlock::new(out_channels, out_channels, device),
        }
    }

    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        self.second.forward(self.first.forward(x))
    }
}

/// 3D U-Net producing one logit per class and voxel.
#[derive(Module, Debug)]
pub struct UNet3d<B: Backend> {
    /// One per level, finest first.
    encoders: Vec<DoubleConv<B>>,
    /// `downs[i]` takes level `i` to level `i + 1`.
    downs: Vec<Conv3d<B>>,
    /// Coarsest first: `ups[j]` and `decoders[j]` rebuild level `depth - 2 - j`.
    ups: Vec<ConvTranspose3d<B>>,
    decoders: Vec<DoubleConv<B>>,
    head: Conv3d<B>,
    in_channels: usize,
    size_multiple: usize,
}

impl<B: Backend> UNet3d<B> {
    /// Why `forward` would reject an input of this shape, if it would.
    pub fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        let [_, channels, d, h, w] = dims;
        if channels != self.in_channels {
            return Err(format!(
                "input has {channels} channels, the model expects {}",
                self.in_channels
            ));
        }
        if [d, h, w].iter().any(|&s| s == 0 || s % self.size_multiple != 0) {
            return Err(format!(
                "spatial dims {d}x{h}x{w} must be positive multiples of {}",
                self.size_multiple
            ));
        }
        Ok(())
    }

    /// `[N, C_in, D, H, W]` → logits `[N, C_out, D, H, W]`.
    ///
    /// # Panics
    /// If [`check_input_shape`](Self::check_input_shape) rejects the input.
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        if let Err(err) = self.check_input_shape(x.dims()) {
            panic!("UNet3d::forward: {err}");
        }
        let mut skips = Vec::with_capacity(self.downs.len());
        let mut x = x;
        for (level, encoder) in self.encoders.iter().enumerate() {
            x = encoder.forward(x);
            if let Some(down) = self.downs.get(level) {
                skips.push(x.clone());
                x = down.forward(x);
            }
        }
        for (up, decoder) in self.ups.iter().zip(&self.decoders) {
            let skip = skips.pop().expect("one skip per upsampling step");
            x = decoder.forward(Tensor::cat(vec![up.forward(x), skip], 1));
        }
        self.head.forward(x)
    }
}

impl ArchConfig for UNet3dConfig {
    type Model<B: Backend> = UNet3d<B>;

    fn validate(&self) -> Result<(), ModelConfigError> {
        UNet3dConfig::validate(self)
    }

    fn init<B: Backend>(&self, device: &B::Device) -> UNet3d<B> {
        UNet3dConfig::init(self, device)
    }

    fn size_multiple(&self) -> usize {
        UNet3dConfig::size_multiple(self)
    }

    fn torch_module_path(burn_path: &str) -> Option<String> {
        Some(burn_path.to_string())
    }
}

impl<B: Backend> Segmenter<B> for UNet3d<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        UNet3d::forward(self, x)
    }

    fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        UNet3d::check_input_shape(self, dims)
    }

    fn stages(&self, input: [usize; 5]) -> Vec<StageSummary> {
        vec![StageSummary {
            name: "unet".into(),
            output: input.to_vec(),
            params: super::param_count(self),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::model::param_count;

    #[test]
    fn forward_keeps_spatial_shape() {
        let device = Default::default();
        let config = UNet3dConfig::new()
            .with_in_channels(2)
            .with_out_channels(3)
            .with_base_width(4)
            .with_depth(3);
        let model = config.init::<Cpu>(&device);
        let x = Tensor::<Cpu, 5>::zeros([2, 2, 8, 12, 16], &device);
        assert_eq!(model.forward(x).dims(), [2, 3, 8, 12, 16]);
    }

    #[test]
    fn depth_one_has_no_resampling() {
        let device = Default::default();
        let model = UNet3dConfig::new()
            .with_base_width(2)
            .with_depth(1)
            .init::<Cpu>(&device);
        let x = Tensor::<Cpu, 5>::zeros([1, 1, 3, 5, 7], &device);
        assert_eq!(model.forward(x).dims(), [1, 25, 3, 5, 7]);
    }

    #[test]
    fn validation_names_the_field() {
        for (config, field) in [
            (UNet3dConfig::new().with_depth(0), "depth"),
            (UNet3dConfig::new().with_depth(9), "depth"),
            (UNet3dConfig::new().with_base_width(0), "base_width"),
            (UNet3dConfig::new().with_in_channels(0), "in_channels"),
            (UNet3dConfig::new().with_out_channels(0), "out_channels"),
            (UNet3dConfig::new().with_base_width(usize::MAX / 2), "base_width"),
        ] {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains(field));
        }
        assert_eq!(UNet3dConfig::new().validate(), Ok(()));
        assert_eq!(UNet3dConfig::new().with_base_width(8).validate(), Ok(()));
    }

    #[test]
    fn bad_input_shape_is_reported() {
        let model = UNet3dConfig::new().with_base_width(8).init::<Cpu>(&Default::default());
        assert!(model.check_input_shape([1, 1, 32, 32, 32]).is_ok());
        assert!(model.check_input_shape([1, 1, 36, 32, 32]).is_err());
        assert!(model.check_input_shape([1, 2, 32, 32, 32]).is_err());
    }

    #[test]
    fn param_counts_match_the_architecture() {
        // Hand count for width 8, three levels: 3x3x3 convs without bias, affine norms (2 params
        // per channel), 2x2x2 resampling convs with bias, 1x1x1 head with bias.
        let conv = |i: usize, o: usize| 27 * i * o + 2 * o;
        let (w0, w1, w2) = (8, 16, 32);
        let encoders = conv(1, w0) + conv(w0, w0) + conv(w0, w1) + conv(w1, w1) + conv(w1, w2) + conv(w2, w2);
        let downs = (8 * w0 * w0 + w0) + (8 * w1 * w1 + w1);
        let ups = (8 * w2 * w1 + w1) + (8 * w1 * w0 + w0);
        let decoders = conv(2 * w1, w1) + conv(w1, w1) + conv(2 * w0, w0) + conv(w0, w0);
        let head = w0 * 25 + 25;
        let model = UNet3dConfig::new()
            .with_base_width(8)
            .with_depth(3)
            .init::<Cpu>(&Default::default());
        assert_eq!(param_count(&model), encoders + downs + ups + decoders + head);
    }
}
