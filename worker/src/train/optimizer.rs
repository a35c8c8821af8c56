//! The optimiser as SuPreM configures it: PyTorch's `torch.optim.AdamW` with weight decay 1e-5.
//!
//! burn's `AdamWConfig` defaults differ from PyTorch's: epsilon 1e-5 instead of 1e-8. The update
//! is `m / (sqrt(v) + eps)`, so wherever a parameter's gradients are not far above 1e-5 the larger
//! epsilon damps its steps, and a run stops being the recipe it claims to be. With 1e-8, eight
//! AdamW steps of the Swin UNETR parity fixture give PyTorch's losses to six digits. Every place
//! that builds the optimiser goes through here, so the trainer, the tests and the benchmarks step
//! the same way.

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
