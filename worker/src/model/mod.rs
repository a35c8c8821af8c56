//! Segmentation backbones. Each is generic over `B: Backend` so the same code trains on the CPU
//! and on CUDA; the concrete backend is picked in [`crate::backend`].

pub mod swin_unetr;
pub mod unet;

pub use unet::{ModelConfigError, UNet3d, UNet3dConfig, param_count, tiny};
