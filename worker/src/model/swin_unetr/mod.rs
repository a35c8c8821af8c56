//! Swin UNETR, the largest SuPreM backbone: MONAI's `SwinUNETR` with `use_v2=False` (Hatamizadeh
//! et al., 2022): a Swin transformer encoder (shifted 7^3 windows, relative-position bias,
//! patch merging v1) whose five normalised hidden states feed a convolutional U-Net decoder.
//!
//! Field names mirror MONAI's attributes, so a burn module path is the PyTorch one except for
//! the root `swin_vit` (MONAI's `swinViT`); see [`SwinUnetrConfig::torch_module_path`].
//!
//! The SuPreM preset (feature size 48, depths 2,2,2,2, heads 3,6,12,24) has 62,187,835
//! parameters with 25 outputs, as PyTorch counts them (the int `relative_position_index`
//! buffers are not parameters).

pub mod attention;
pub mod decoder;
pub mod transformer;
pub mod windows;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::model::{ArchConfig, ModelConfigError, Segmenter, StageSummary};
use decoder::{UnetOutBlock, UnetrBasicBlock, UnetrUpBlock};
use transformer::{EncoderShape, SwinTransformer};

/// MONAI's MLP width ratio (`mlp_ratio=4.0`).
const MLP_RATIO: usize = 4;
/// Patch embedding then four patch mergings halve the grid five times.
const DOWNSAMPLINGS: u32 = 5;

/// Hyper-parameters of [`SwinUnetr`]; defaults are the SuPreM preset.
#[derive(Config, Debug, PartialEq, Eq)]
pub struct SwinUnetrConfig {
    #[config(default = 1)]
    pub in_channels: usize,
    /// One sigmoid logit per class (25 SuPreM classes).
    #[config(default = 25)]
    pub out_channels: usize,
    /// Embedding width; stage `i` works at `feature_size * 2^i`. MONAI requires a multiple of 12.
    #[config(default = 48)]
    pub feature_size: usize,
    /// Swin blocks per stage (alternately unshifted and shifted).
    #[config(default = "[2, 2, 2, 2]")]
    pub depths: [usize; 4],
    /// Attention heads per stage; each must divide that stage's width.
    #[config(default = "[3, 6, 12, 24]")]
    pub num_heads: [usize; 4],
    /// Cubic attention window (clamped per axis where a stage's grid is smaller).
    #[config(default = 7)]
    pub window_size: usize,
    /// Cubic patch of the embedding; only MONAI's default 2 is supported.
    #[config(default = 2)]
    pub patch_size: usize,
}

impl SwinUnetrConfig {
    /// SuPreM's Swin UNETR: MONAI defaults at feature size 48 (62,187,835 parameters).
    pub fn suprem() -> Self {
        Self::new()
    }

    /// CPU preset for tests and demos: MONAI's smallest width (feature size 12), same topology
    /// (4,078,363 parameters with 25 outputs). See the module tests for its step time.
    pub fn tiny() -> Self {
        Self::new().with_feature_size(12)
    }

    fn err(field: &'static str, reason: impl Into<String>) -> ModelConfigError {
        ModelConfigError::new(field, reason)
    }

    fn encoder_shape(&self) -> EncoderShape {
        EncoderShape {
            in_channels: self.in_channels,
            embed_dim: self.feature_size,
            patch: self.patch_size,
            window: [self.window_size; 3],
            depths: self.depths,
            heads: self.num_heads,
            mlp_ratio: MLP_RATIO,
        }
    }
}

impl ArchConfig for SwinUnetrConfig {
    type Model<B: Backend> = SwinUnetr<B>;

    fn validate(&self) -> Result<(), ModelConfigError> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("window_size", self.window_size),
        ] {
            if value == 0 {
                return Err(Self::err(field, "must be at least 1"));
            }
        }
        if self.feature_size == 0 || !self.feature_size.is_multiple_of(12) {
            return Err(Self::err(
                "feature_size",
                format!(
                    "must be a positive multiple of 12 (MONAI's rule), got {}",
                    self.feature_size
                ),
            ));
        }
        if self.feature_size > 1 << 16 {
            return Err(Self::err(
                "feature_size",
                format!("{} is unreasonably wide", self.feature_size),
            ));
        }
        if self.window_size > 64 {
            return Err(Self::err(
                "window_size",
                format!("must be at most 64, got {}", self.window_size),
            ));
        }
        if self.patch_size != 2 {
            return Err(Self::err(
                "patch_size",
                format!("only 2 is supported, got {}", self.patch_size),
            ));
        }
        if let Some(depth) = self.depths.iter().find(|&&d| d == 0 || d > 64) {
            return Err(Self::err(
                "depths",
                format!("each stage needs 1 to 64 blocks, got {depth}"),
            ));
        }
        for (stage, &heads) in self.num_heads.iter().enumerate() {
            let width = self.feature_size << stage;
            if heads == 0 || !width.is_multiple_of(heads) {
                return Err(Self::err(
                    "num_heads",
                    format!("stage {stage} has width {width}, which {heads} heads do not divide"),
                ));
            }
        }
        Ok(())
    }

    /// # Panics
    /// If [`validate`](ArchConfig::validate) fails.
    fn init<B: Backend>(&self, device: &B::Device) -> SwinUnetr<B> {
        if let Err(err) = self.validate() {
            panic!("{err}");
        }
        let f = self.feature_size;
        SwinUnetr {
            swin_vit: SwinTransformer::new(&self.encoder_shape(), device),
            encoder1: UnetrBasicBlock::new(self.in_channels, f, device),
            encoder2: UnetrBasicBlock::new(f, f, device),
            encoder3: UnetrBasicBlock::new(2 * f, 2 * f, device),
            encoder4: UnetrBasicBlock::new(4 * f, 4 * f, device),
            encoder10: UnetrBasicBlock::new(16 * f, 16 * f, device),
            decoder5: UnetrUpBlock::new(16 * f, 8 * f, device),
            decoder4: UnetrUpBlock::new(8 * f, 4 * f, device),
            decoder3: UnetrUpBlock::new(4 * f, 2 * f, device),
            decoder2: UnetrUpBlock::new(2 * f, f, device),
            decoder1: UnetrUpBlock::new(f, f, device),
            out: UnetOutBlock::new(f, self.out_channels, device),
            in_channels: self.in_channels,
            size_multiple: self.size_multiple(),
        }
    }

    fn size_multiple(&self) -> usize {
        self.patch_size.pow(DOWNSAMPLINGS)
    }

    /// Identity but for the encoder's root, which MONAI names `swinViT`.
    fn torch_module_path(burn_path: &str) -> Option<String> {
        Some(match burn_path.strip_prefix("swin_vit") {
            Some(rest) if rest.is_empty() || rest.starts_with('.') => format!("swinViT{rest}"),
            _ => burn_path.to_string(),
        })
    }
}

/// Swin UNETR producing one logit per class and voxel.
#[derive(Module, Debug)]
pub struct SwinUnetr<B: Backend> {
    pub swin_vit: SwinTransformer<B>,
    pub encoder1: UnetrBasicBlock<B>,
    pub encoder2: UnetrBasicBlock<B>,
    pub encoder3: UnetrBasicBlock<B>,
    pub encoder4: UnetrBasicBlock<B>,
    pub encoder10: UnetrBasicBlock<B>,
    pub decoder5: UnetrUpBlock<B>,
    pub decoder4: UnetrUpBlock<B>,
    pub decoder3: UnetrUpBlock<B>,
    pub decoder2: UnetrUpBlock<B>,
    pub decoder1: UnetrUpBlock<B>,
    pub out: UnetOutBlock<B>,
    in_channels: usize,
    size_multiple: usize,
}

impl<B: Backend> Segmenter<B> for SwinUnetr<B> {
    /// # Panics
    /// If [`check_input_shape`](Segmenter::check_input_shape) rejects the input.
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        if let Err(err) = self.check_input_shape(x.dims()) {
            panic!("SwinUnetr::forward: {err}");
        }
        let [h0, h1, h2, h3, h4] = self.swin_vit.forward(x.clone());
        let enc0 = self.encoder1.forward(x);
        let enc1 = self.encoder2.forward(h0);
        let enc2 = self.encoder3.forward(h1);
        let enc3 = self.encoder4.forward(h2);
        let dec4 = self.encoder10.forward(h4);
        let dec3 = self.decoder5.forward(dec4, h3);
        let dec2 = self.decoder4.forward(dec3, enc3);
        let dec1 = self.decoder3.forward(dec2, enc2);
        let dec0 = self.decoder2.forward(dec1, enc1);
        self.out.forward(self.decoder1.forward(dec0, enc0))
    }

    fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        crate::model::check_input(dims, self.in_channels, self.size_multiple)
    }

    fn stages(&self, input: [usize; 5]) -> Vec<StageSummary> {
        let [n, _, d, h, w] = input;
        let f = self.encoder2.layer.conv1.conv.weight.dims()[0];
        let out_channels = self.out.conv.conv.weight.dims()[0];
        let shape = |channels: usize, level: u32| vec![n, channels, d >> level, h >> level, w >> level];
        let row = |name: &str, output: Vec<usize>, params: usize| StageSummary {
            name: name.to_string(),
            output,
            params,
        };
        let mut rows = vec![row(
            "swinViT.patch_embed",
            shape(f, 1),
            self.swin_vit.patch_embed.num_params(),
        )];
        for (i, stage) in self.swin_vit.stages().into_iter().enumerate() {
            let level = i as u32 + 2;
            rows.push(row(
                &format!("swinViT.layers{}", i + 1),
                shape(f << (i + 1), level),
                stage.num_params(),
            ));
        }
        for (name, block, channels, level) in [
            ("encoder1", &self.encoder1, f, 0),
            ("encoder2", &self.encoder2, f, 1),
            ("encoder3", &self.encoder3, 2 * f, 2),
            ("encoder4", &self.encoder4, 4 * f, 3),
            ("encoder10", &self.encoder10, 16 * f, 5),
        ] {
            rows.push(row(name, shape(channels, level), block.num_params()));
        }
        for (name, block, channels, level) in [
            ("decoder5", &self.decoder5, 8 * f, 4),
            ("decoder4", &self.decoder4, 4 * f, 3),
            ("decoder3", &self.decoder3, 2 * f, 2),
            ("decoder2", &self.decoder2, f, 1),
            ("decoder1", &self.decoder1, f, 0),
        ] {
            rows.push(row(name, shape(channels, level), block.num_params()));
        }
        rows.push(row("out", shape(out_channels, 0), self.out.num_params()));
        rows
    }
}

#[cfg(test)]
mod tests;
