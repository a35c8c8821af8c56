//! Segmentation backbones, and the one type the training loop knows them by.
//!
//! Each architecture lives in its own file with a config (implementing [`ArchConfig`]) and a
//! module (implementing [`Segmenter`]). [`Backbone`] is a burn `Module` enum with one variant per
//! architecture, so the trainer, evaluation, checkpoints and the all-reduce handle every backbone
//! through one type; [`ModelConfig`] builds it from the run spec's `[model]` table. A new backbone
//! is a new file plus one variant in each of the two enums below.
//!
//! Everything is generic over `B: Backend`, so the same code trains on the CPU and on CUDA.

pub mod batchnorm;
pub mod interop;
pub mod interpolate;
pub mod pool;
pub mod pth_audit;
mod pth_pickle;
pub mod segresnet;
pub mod swin_unetr;
pub mod unet;

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};
use protocol::spec::ModelSpec;

pub use segresnet::{SegResNet, SegResNetConfig};
pub use swin_unetr::{SwinUnetr, SwinUnetrConfig};
pub use unet::{UNet, UNetConfig};

/// One row of `coordinator model info`: a named stage, its output shape, its parameter count.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageSummary {
    pub name: String,
    pub output: Vec<usize>,
    pub params: usize,
}

/// What every backbone module provides.
pub trait Segmenter<B: Backend>: Module<B> {
    /// `[N, C_in, D, H, W]` → logits `[N, C_out, D, H, W]` (one sigmoid logit per class).
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5>;
    /// Why `forward` would reject an input of this shape, if it would.
    fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String>;
    /// torchinfo-like rows for an input of this shape, computed from the config (no forward).
    fn stages(&self, input: [usize; 5]) -> Vec<StageSummary>;
}

/// The per-architecture config, built from the run spec's resolved preset.
pub trait ArchConfig {
    type Model<B: Backend>: Segmenter<B>;
    /// Checks every field; the error names the field.
    fn validate(&self) -> Result<(), ModelConfigError>;
    /// Builds the module with burn's default init (see [`ModelConfig::init_seeded`]).
    fn init<B: Backend>(&self, device: &B::Device) -> Self::Model<B>;
    /// Every spatial input side must be a multiple of this.
    fn size_multiple(&self) -> usize;
    /// PyTorch state-dict module path for a burn module path (both dot-joined, from the
    /// backbone's root, without the leaf tensor name); `None` where PyTorch has no such module.
    fn torch_module_path(burn_path: &str) -> Option<String>;
}

/// A config that cannot build a network; names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model config: `{field}` {reason}")]
pub struct ModelConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl ModelConfigError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Any backbone. burn derives `Module` for the enum, so params, records, checkpoints, the
/// gradient flattening and the weight checksum work on it unchanged; module paths gain the
/// variant name as their first segment (`Unet.down_tr64...`).
// Swin UNETR's module tree (~20 KB of handles) dwarfs the U-Net's; burn modules cannot be boxed,
// and a model is moved once per step at most.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    Unet(UNet<B>),
    SegResNet(SegResNet<B>),
    SwinUnetr(SwinUnetr<B>),
}

impl<B: Backend> Backbone<B> {
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        match self {
            Backbone::Unet(m) => m.forward(x),
            Backbone::SegResNet(m) => m.forward(x),
            Backbone::SwinUnetr(m) => m.forward(x),
        }
    }

    pub fn check_input_shape(&self, dims: [usize; 5]) -> Result<(), String> {
        match self {
            Backbone::Unet(m) => m.check_input_shape(dims),
            Backbone::SegResNet(m) => m.check_input_shape(dims),
            Backbone::SwinUnetr(m) => m.check_input_shape(dims),
        }
    }

    pub fn stages(&self, input: [usize; 5]) -> Vec<StageSummary> {
        match self {
            Backbone::Unet(m) => m.stages(input),
            Backbone::SegResNet(m) => m.stages(input),
            Backbone::SwinUnetr(m) => m.stages(input),
        }
    }
}

/// The resolved config of any backbone.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Unet(UNetConfig),
    SegResNet(SegResNetConfig),
    SwinUnetr(SwinUnetrConfig),
}

impl ModelConfig {
    /// The backbone a run spec's `[model]` table describes, with `out_channels` outputs.
    pub fn from_spec(spec: &ModelSpec, out_channels: usize) -> Result<Self, ModelConfigError> {
        let config = match spec {
            ModelSpec::Unet(u) => ModelConfig::Unet(
                UNetConfig::new()
                    .with_out_channels(out_channels)
                    .with_base_width(u.resolved_base_width() as usize)
                    .with_depth(u.resolved_depth() as usize),
            ),
            ModelSpec::Segresnet(s) => ModelConfig::SegResNet(
                SegResNetConfig::new()
                    .with_out_channels(out_channels)
                    .with_init_filters(s.resolved_init_filters() as usize),
            ),
            ModelSpec::Swinunetr(s) => ModelConfig::SwinUnetr(
                SwinUnetrConfig::new()
                    .with_out_channels(out_channels)
                    .with_feature_size(s.resolved_feature_size() as usize),
            ),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Unet(_) => "unet",
            ModelConfig::SegResNet(_) => "segresnet",
            ModelConfig::SwinUnetr(_) => "swinunetr",
        }
    }

    pub fn validate(&self) -> Result<(), ModelConfigError> {
        match self {
            ModelConfig::Unet(c) => c.validate(),
            ModelConfig::SegResNet(c) => c.validate(),
            ModelConfig::SwinUnetr(c) => c.validate(),
        }
    }

    pub fn size_multiple(&self) -> usize {
        match self {
            ModelConfig::Unet(c) => c.size_multiple(),
            ModelConfig::SegResNet(c) => c.size_multiple(),
            ModelConfig::SwinUnetr(c) => c.size_multiple(),
        }
    }

    /// Builds the network with burn's default initialisation, drawn from the backend's global
    /// RNG. Ranks that must start identical use [`init_seeded`](Self::init_seeded).
    ///
    /// # Panics
    /// If [`validate`](Self::validate) fails.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Backbone<B> {
        if let Err(err) = self.validate() {
            panic!("{err}");
        }
        match self {
            ModelConfig::Unet(c) => Backbone::Unet(c.init(device)),
            ModelConfig::SegResNet(c) => Backbone::SegResNet(c.init(device)),
            ModelConfig::SwinUnetr(c) => Backbone::SwinUnetr(c.init(device)),
        }
    }

    /// Builds the network with weights that depend only on `seed`, not on the backend's RNG, so
    /// every data-parallel rank starts bit-identical. See [`crate::train::params::reseed`].
    pub fn init_seeded<B: Backend>(&self, device: &B::Device, seed: u64) -> Result<Backbone<B>, ModelConfigError> {
        self.validate()?;
        crate::train::params::reseed(self.init(device), seed)
            .map_err(|err| ModelConfigError::new("init", err.to_string()))
    }

    /// See [`ArchConfig::torch_module_path`]; `burn_path` starts below the variant name.
    pub fn torch_module_path(&self, burn_path: &str) -> Option<String> {
        match self {
            ModelConfig::Unet(_) => <UNetConfig as ArchConfig>::torch_module_path(burn_path),
            ModelConfig::SegResNet(_) => <SegResNetConfig as ArchConfig>::torch_module_path(burn_path),
            ModelConfig::SwinUnetr(_) => <SwinUnetrConfig as ArchConfig>::torch_module_path(burn_path),
        }
    }
}

/// Why a backbone taking `in_channels` channels, every side a multiple of `size_multiple`, would
/// reject an input of shape `dims`.
pub(crate) fn check_input(dims: [usize; 5], in_channels: usize, size_multiple: usize) -> Result<(), String> {
    let [_, channels, d, h, w] = dims;
    if channels != in_channels {
        return Err(format!(
            "input has {channels} channels, the model expects {in_channels}"
        ));
    }
    if [d, h, w].iter().any(|&s| s == 0 || s % size_multiple != 0) {
        return Err(format!(
            "spatial dims {d}x{h}x{w} must be positive multiples of {size_multiple}"
        ));
    }
    Ok(())
}

/// Parameter count of any module, as PyTorch counts it: every float parameter, but not
/// BatchNorm's running statistics (buffers in PyTorch, `RunningState` in burn, which burn's own
/// `num_params` includes).
pub fn param_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    use burn::module::{ModuleVisitor, Param};
    struct Count {
        path: Vec<String>,
        total: usize,
    }
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let leaf = self.path.last().map(String::as_str).unwrap_or("");
            if !matches!(leaf, "running_mean" | "running_var") {
                self.total += param.val().shape().num_elements();
            }
        }
    }
    let mut count = Count {
        path: Vec::new(),
        total: 0,
    };
    module.visit(&mut count);
    count.total
}

/// Tensor `key` of a PyTorch fixture, as f32 (the parity fixtures store fp16 weights and fp32
/// inputs and outputs alike).
#[cfg(test)]
pub(crate) fn fixture_tensor<B: Backend, const D: usize>(
    reader: &burn_store::pytorch::PytorchReader,
    key: &str,
) -> Tensor<B, D> {
    let data = reader
        .get(key)
        .unwrap_or_else(|| panic!("the fixture has no `{key}`"))
        .to_data()
        .unwrap_or_else(|e| panic!("fixture tensor `{key}`: {e:?}"));
    Tensor::from_data(data.convert::<f32>(), &Default::default())
}

/// A small U-Net for unit tests that need some backbone, not a particular one.
#[cfg(test)]
pub(crate) fn test_unet(out_channels: usize, base_width: u32, depth: u32) -> ModelConfig {
    let spec = ModelSpec::Unet(protocol::spec::UnetSpec {
        base_width: Some(base_width),
        depth: Some(depth),
        ..Default::default()
    });
    ModelConfig::from_spec(&spec, out_channels).expect("a valid test config")
}
