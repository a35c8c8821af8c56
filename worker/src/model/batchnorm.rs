//! BatchNorm over `[N, C, D, H, W]` that matches PyTorch's `nn.BatchNorm3d` exactly, running
//! statistics included.
//!
//! burn's `BatchNorm` updates `running_var` with the biased batch variance; PyTorch uses the
//! unbiased one (`n / (n - 1)` times larger, `n` = voxels per channel in the batch). At the U-Net's
//! coarsest level a 96^3 crop leaves 12^3 voxels, so after a SuPreM checkpoint is fine-tuned here
//! its statistics would drift from PyTorch's. This module also normalises in two full-tensor ops
//! (`centered * scale + shift`) instead of burn's four.
//!
//! Fields are named like PyTorch's (`weight`, `bias`, `running_mean`, `running_var`), so the
//! state-dict keys need no renaming. Training mode is burn's convention: batch statistics (and a
//! running-statistics update) on an autodiff backend. In evaluation (the inner backend, after
//! `model.valid()`) it normalises with the running statistics, like `nn.BatchNorm3d.eval()`,
//! unless built with `batch_stats_in_eval`: SuPreM's U-Net uses Models Genesis'
//! `ContBatchNorm3d`, which calls `F.batch_norm(..., training=True)` in every mode, so its
//! released weights were trained and are evaluated with batch statistics.

use burn::module::{Module, Param, RunningState};
use burn::tensor::{Tensor, backend::Backend};

/// PyTorch's defaults for `nn.BatchNorm3d`.
const EPSILON: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// Batch normalisation per channel of a 5D tensor (PyTorch's `BatchNorm3d`, affine, tracking
/// running statistics, eps 1e-5, momentum 0.1).
#[derive(Module, Debug)]
pub struct BatchNorm3d<B: Backend> {
    /// Per-channel scale (burn's `gamma`).
    pub weight: Param<Tensor<B, 1>>,
    /// Per-channel shift (burn's `beta`).
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    /// Updated with the unbiased batch variance, as PyTorch does.
    pub running_var: RunningState<Tensor<B, 1>>,
    /// Normalise with batch statistics in evaluation too (`ContBatchNorm3d`).
    pub batch_stats_in_eval: bool,
}

impl<B: Backend> BatchNorm3d<B> {
    /// Weight 1, bias 0, running mean 0, running variance 1 (PyTorch's init). See
    /// [`BatchNorm3d::batch_stats_in_eval`].
    pub fn new(channels: usize, batch_stats_in_eval: bool, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            batch_stats_in_eval,
        }
    }

    /// `[N, C, D, H, W]` -> same shape. Batch statistics when autodiff is on, else running ones.
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let dims = x.dims();
        let [n, c, d, h, w] = dims;
        // [N, C, V] is a free view of a contiguous NCDHW tensor; reductions run over N and V.
        let x = x.reshape([n, c, d * h * w]);
        let y = if B::ad_enabled(&x.device()) {
            self.forward_train(x)
        } else if self.batch_stats_in_eval {
            // No running-statistics update: this module is an evaluation copy.
            let (_, centered, var) = batch_statistics(x);
            let scale = self.weight.val().reshape([1, c, 1]).div(var.add_scalar(EPSILON).sqrt());
            centered.mul(scale).add(self.bias.val().reshape([1, c, 1]))
        } else {
            let mean = self.running_mean.value().reshape([1, c, 1]);
            let var = self.running_var.value().reshape([1, c, 1]);
            let scale = self.weight.val().reshape([1, c, 1]).div(var.add_scalar(EPSILON).sqrt());
            let shift = self.bias.val().reshape([1, c, 1]).sub(mean.mul(scale.clone()));
            x.mul(scale).add(shift)
        };
        y.reshape(dims)
    }

    fn forward_train(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, c, v] = x.dims();
        let count = n * v;
        let (mean, centered, var) = batch_statistics(x);

        let unbiased = if count > 1 {
            var.clone().detach().mul_scalar(count as f64 / (count - 1) as f64)
        } else {
            var.clone().detach()
        };
        let running_mean = self.running_mean.value_sync().mul_scalar(1.0 - MOMENTUM);
        let running_var = self.running_var.value_sync().mul_scalar(1.0 - MOMENTUM);
        self.running_mean.update(
            running_mean
                .add(mean.detach().reshape([c]).mul_scalar(MOMENTUM))
                .detach(),
        );
        self.running_var
            .update(running_var.add(unbiased.reshape([c]).mul_scalar(MOMENTUM)).detach());

        let scale = self.weight.val().reshape([1, c, 1]).div(var.add_scalar(EPSILON).sqrt());
        centered.mul(scale).add(self.bias.val().reshape([1, c, 1]))
    }
}

/// The mean, `x - mean` and the biased variance, per channel over N and the voxels of
/// `[N, C, V]`.
fn batch_statistics<B: Backend>(x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
    let [n, _, v] = x.dims();
    let count = (n * v) as f64;
    let mean = x.clone().sum_dim(2).sum_dim(0).div_scalar(count);
    let centered = x.sub(mean.clone());
    let var = centered.clone().square().sum_dim(2).sum_dim(0).div_scalar(count);
    (mean, centered, var)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuTrain};
    use burn::module::AutodiffModule;
    use burn::tensor::{Distribution, TensorData};

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    #[test]
    fn training_normalises_with_batch_statistics_and_updates_running_ones_like_pytorch() {
        let device = Default::default();
        // Channel 0: values 1..=4 over N=2, V=2; channel 1: all 5.
        let x = Tensor::<CpuTrain, 5>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 5.0, 5.0, 3.0, 4.0, 5.0, 5.0], [2, 2, 1, 1, 2]),
            &device,
        );
        let bn = BatchNorm3d::<CpuTrain>::new(2, false, &device);
        let y = values(bn.forward(x));
        // Channel 0: mean 2.5, biased var 1.25.
        let s = (1.25f32 + 1e-5).sqrt();
        let expected = [-1.5 / s, -0.5 / s, 0.0, 0.0, 0.5 / s, 1.5 / s, 0.0, 0.0];
        for (got, want) in y.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{y:?}");
        }
        // PyTorch: running_mean = 0.9 * 0 + 0.1 * 2.5; running_var = 0.9 * 1 + 0.1 * (5/3), the
        // unbiased variance of 1..=4.
        let mean = values(bn.running_mean.value_sync());
        let var = values(bn.running_var.value_sync());
        assert!(
            (mean[0] - 0.25).abs() < 1e-6 && (mean[1] - 0.5).abs() < 1e-6,
            "{mean:?}"
        );
        assert!(
            (var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6 && (var[1] - 0.9).abs() < 1e-6,
            "{var:?}"
        );
    }

    #[test]
    fn inference_uses_running_statistics() {
        let device = Default::default();
        let bn = BatchNorm3d::<CpuTrain>::new(3, false, &device);
        let x = Tensor::<CpuTrain, 5>::random([2, 3, 2, 3, 4], Distribution::Normal(1.0, 2.0), &device);
        let _ = bn.forward(x.clone());
        let bn: BatchNorm3d<Cpu> = bn.valid();
        let (mean, var) = (bn.running_mean.value(), bn.running_var.value());
        let x = x.inner();
        let expected = x
            .clone()
            .sub(mean.reshape([1, 3, 1, 1, 1]))
            .div(var.add_scalar(EPSILON).sqrt().reshape([1, 3, 1, 1, 1]));
        let diff: f32 = bn.forward(x).sub(expected).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn running_statistics_are_not_counted_as_parameters() {
        let bn = BatchNorm3d::<Cpu>::new(7, false, &Default::default());
        assert_eq!(bn.num_params(), 28);
        assert_eq!(crate::model::param_count(&bn), 14);
    }
}
