//! Segmentation backbones. Each is generic over `B: Backend` so the same code trains on the CPU
//! and on CUDA; the concrete backend is picked in [`crate::backend`].

pub mod batchnorm;
pub mod pool;
pub mod unet;

pub use unet::{ModelConfigError, UNet, UNet3d, UNet3dConfig, UNetConfig, param_count, tiny};
