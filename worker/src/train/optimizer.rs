//! The optimiser as SuPreM configures it: PyTorch's `torch.optim.AdamW` with weight decay 1e-5.
//!
//! burn's `AdamWConfig` defaults differ from PyTorch's: epsilon 1e-5 instead of 1e-8. That is
//! not a rounding detail. Where a parameter's gradients are small (attention and the deep
//! stages of a transformer, whose gradients sit around 1e-6), the update `m / (sqrt(v) + eps)`
//! shrinks by an order of magnitude, and a tiny Swin UNETR that PyTorch fits in a few hundred
//! steps stays at the all-positive plateau. Every place that builds the optimiser goes through
//! here so that the trainer, the tests and the benchmarks step the same way.

use burn::optim::AdamWConfig;

/// PyTorch's default, which SuPreM keeps.
pub const ADAMW_EPSILON: f32 = 1e-8;

/// AdamW with PyTorch's betas (0.9, 0.999) and epsilon, and the given decoupled weight decay.
pub fn adamw(weight_decay: f64) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(ADAMW_EPSILON)
        .with_weight_decay(weight_decay as f32)
}
