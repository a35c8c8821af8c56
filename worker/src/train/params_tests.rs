//! Tests of [`super`]: gradient flattening, the BatchNorm broadcast, seeded init, checksums.
use super::*;
use crate::backend::{Cpu, CpuTrain};
use crate::model::{Backbone, ModelConfig, test_unet};
use crate::train::loss::bce_dice_loss;
use burn::optim::Optimizer;

use crate::train::optimizer::adamw;

fn small() -> ModelConfig {
    test_unet(3, 4, 2)
}

/// Random image and a labelled cube, deterministic in `seed`.
fn batch(seed: u64) -> (Tensor<CpuTrain, 5>, Tensor<CpuTrain, 5>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shape = [1, 1, 8, 8, 8];
    let image: Vec<f32> = (0..512).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect();
    let mut labels = vec![0.0f32; 3 * 512];
    let class = (seed % 3) as usize;
    for i in 0..512 {
        if image[i] > 0.5 {
            labels[class * 512 + i] = 1.0;
        }
    }
    let device = Default::default();
    (
        Tensor::from_data(TensorData::new(image, shape), &device),
        Tensor::from_data(TensorData::new(labels, [1, 3, 8, 8, 8]), &device),
    )
}

fn grads_for(model: &Backbone<CpuTrain>, seed: u64) -> GradientsParams {
    let (x, y) = batch(seed);
    let loss = bce_dice_loss(model.forward(x), y).total;
    GradientsParams::from_grads(loss.backward(), model)
}

#[test]
fn seeded_init_is_reproducible_and_seed_dependent() {
    let device = Default::default();
    let a = small().init_seeded::<Cpu>(&device, 7).unwrap();
    // Touch the backend RNG in between: seeded init must not depend on it.
    let _noise = Tensor::<Cpu, 1>::random([10], burn::tensor::Distribution::Default, &device);
    let b = small().init_seeded::<Cpu>(&device, 7).unwrap();
    let c = small().init_seeded::<Cpu>(&device, 8).unwrap();
    assert_eq!(weights_checksum(&a), weights_checksum(&b));
    assert_ne!(weights_checksum(&a), weights_checksum(&c));
    // Same weights whether or not the model carries autodiff.
    let d = small().init_seeded::<CpuTrain>(&device, 7).unwrap();
    assert_eq!(weights_checksum(&a), weights_checksum(&d));
}

#[test]
fn seeded_init_keeps_burns_distribution() {
    let model = small().init_seeded::<Cpu>(&Default::default(), 1).unwrap();
    struct Check(Vec<(Vec<usize>, f32, f32)>);
    impl ModuleVisitor<Cpu> for Check {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Cpu, D>>) {
            let v = to_f32(param.val());
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            self.0.push((param.val().dims().to_vec(), max, mean));
        }
    }
    let mut check = Check(Vec::new());
    model.visit(&mut check);
    // First conv: weight [4, 1, 3, 3, 3] (fan_in 27) and bias, then its norm's gamma (ones), beta.
    let (dims, max, _) = &check.0[0];
    assert_eq!(dims, &vec![4, 1, 3, 3, 3]);
    assert!(*max <= 1.0 / 27f32.sqrt() && *max > 0.1, "{max}");
    assert!(check.0[1].1 <= 1.0 / 27f32.sqrt() && check.0[1].1 > 0.0);
    assert_eq!(check.0[2].1, 1.0);
    assert_eq!(check.0[2].2, 1.0);
    assert_eq!(check.0[3].1, 0.0);
}

#[test]
fn reseed_refuses_unknown_modules() {
    let embedding = burn::nn::EmbeddingConfig::new(3, 2).init::<Cpu>(&Default::default());
    let err = reseed(embedding, 0).unwrap_err();
    assert!(matches!(err, ParamsError::UnsupportedModule { .. }), "{err}");
    assert!(err.to_string().contains("Embedding"), "{err}");
}

#[test]
fn ln_from_basic_ops_matches_libm() {
    for x in [1e-300, 1e-9, 0.01, 0.5, 0.72, 1.0, 1.5, 2.0, 10.0, 1e12] {
        let (got, want) = (ln_exact_ops(x), x.ln());
        assert!(
            (got - want).abs() <= 4.0 * f64::EPSILON * want.abs().max(1.0),
            "ln({x}): {got} vs {want}"
        );
    }
}

#[test]
fn linear_and_bias_table_rules() {
    let device = Default::default();
    // Linear: U(+-1/sqrt(in)) for weight and bias, in = 64 (burn's weight is [in, out]).
    let linear = burn::nn::LinearConfig::new(64, 500).init::<Cpu>(&device);
    let linear = reseed(linear, 4).unwrap();
    for values in [to_f32(linear.weight.val()), to_f32(linear.bias.unwrap().val())] {
        let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max <= 0.125 && max > 0.12, "{max}");
    }
    // Bias table: mean 0, std 0.02.
    let attn = crate::model::swin_unetr::attention::WindowAttention::<Cpu>::new(12, 3, [7, 7, 7], &device);
    let attn = reseed(attn, 4).unwrap();
    let table = to_f32(attn.relative_position_bias_table.val());
    let n = table.len() as f64;
    let mean = table.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (table.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        mean.abs() < 0.002 && (std - 0.02).abs() < 0.001,
        "mean {mean} std {std}"
    );
}

#[test]
fn flatten_unflatten_round_trips_exactly() {
    let model = small().init_seeded::<CpuTrain>(&Default::default(), 3).unwrap();
    let grads = grads_for(&model, 1);
    let flat = flatten_grads(&model, &grads);
    assert_eq!(flat.len(), flat_len(&model));
    assert_eq!(flat.len(), model.num_params(), "every float tensor, buffers included");
    assert!(flat.iter().any(|g| *g != 0.0));
    let back = unflatten_grads(&model, &flat).unwrap();
    let again = flatten_grads(&model, &back);
    assert_eq!(
        flat.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|g| g.to_bits()).collect::<Vec<_>>()
    );
    // Missing gradients flatten to zeros.
    let none = flatten_grads(&model, &GradientsParams::new());
    assert_eq!(none.len(), flat.len());
    assert!(none.iter().all(|g| *g == 0.0));
}

#[test]
fn unflatten_rejects_wrong_length() {
    let model = small().init_seeded::<CpuTrain>(&Default::default(), 3).unwrap();
    let n = flat_len(&model);
    let err = unflatten_grads(&model, &vec![0.0; n - 1]).unwrap_err();
    assert_eq!(
        err,
        ParamsError::LengthMismatch {
            expected: n,
            got: n - 1
        }
    );
}

#[test]
fn checksum_sees_a_single_weight_change() {
    let model = small().init_seeded::<Cpu>(&Default::default(), 3).unwrap();
    let before = weights_checksum(&model);
    assert_eq!(before.len(), 64);
    assert_eq!(before, weights_checksum(&model));
    struct Nudge(bool);
    impl ModuleMapper<Cpu> for Nudge {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<Cpu, D>>) -> Param<Tensor<Cpu, D>> {
            if std::mem::replace(&mut self.0, true) {
                return param;
            }
            param.map(|t| {
                let dims = t.dims();
                let mut v = to_f32(t.clone());
                v[0] = f32::from_bits(v[0].to_bits() ^ 1);
                Tensor::from_data(TensorData::new(v, dims), &t.device())
            })
        }
    }
    let nudged = model.map(&mut Nudge(false));
    assert_ne!(before, weights_checksum(&nudged));
}

/// The trainer's exchange: gradients averaged, BatchNorm running statistics (which follow each
/// rank's own batch) replaced by rank 0's.
#[test]
fn averaged_gradients_keep_ranks_identical() {
    let device = Default::default();
    let config = small();
    // Separate inits, as separate processes would do them (their ParamIds differ).
    let mut ranks: Vec<Backbone<CpuTrain>> = (0..2).map(|_| config.init_seeded(&device, 42).unwrap()).collect();
    let mut optims: Vec<_> = (0..2).map(|_| adamw(1e-5).init()).collect();
    for step in 0..3u64 {
        let flats: Vec<Vec<f32>> = ranks
            .iter()
            .enumerate()
            .map(|(rank, model)| exchange_buffer(model, &grads_for(model, 100 * step + rank as u64), rank == 0))
            .collect();
        assert_ne!(flats[0], flats[1], "ranks saw different batches");
        // Fixed reduction order, as the ring all-reduce guarantees.
        let sum: Vec<f32> = flats[0].iter().zip(&flats[1]).map(|(a, b)| a + b).collect();
        for (model, optim) in ranks.iter_mut().zip(optims.iter_mut()) {
            let (synced, grads) = finish_exchange(model.clone(), &mut sum.clone(), 2).unwrap();
            *model = optim.step(1e-3, synced, grads);
        }
        assert_eq!(weights_checksum(&ranks[0]), weights_checksum(&ranks[1]));
    }
    let start: Backbone<CpuTrain> = config.init_seeded(&device, 42).unwrap();
    assert_ne!(weights_checksum(&start), weights_checksum(&ranks[0]));
}

/// A conv and a BatchNorm: the smallest module with running statistics.
#[derive(burn::module::Module, Debug)]
struct ConvNorm<B: Backend> {
    conv: burn::nn::conv::Conv3d<B>,
    norm: burn::nn::BatchNorm<B>,
}

impl<B: Backend> ConvNorm<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            conv: burn::nn::conv::Conv3dConfig::new([1, 3], [1, 1, 1]).init(device),
            norm: burn::nn::BatchNormConfig::new(3).init(device),
        }
    }
}

fn running_mean<B: AutodiffBackend>(model: &ConvNorm<B>) -> Vec<f32> {
    to_f32(model.valid().norm.running_mean.value())
}

/// One step of two ranks on different batches; `exchange` chooses the buffer broadcast
/// (what the trainer does) or the plain gradient mean.
fn two_rank_step(
    ranks: &mut [ConvNorm<CpuTrain>],
    optims: &mut [impl Optimizer<ConvNorm<CpuTrain>, CpuTrain>],
    step: u64,
    exchange: bool,
) {
    let flats: Vec<Vec<f32>> = ranks
        .iter()
        .enumerate()
        .map(|(rank, model)| {
            let (x, _) = batch(100 * step + rank as u64);
            let loss = model.norm.forward(model.conv.forward(x)).powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), model);
            if exchange {
                exchange_buffer(model, &grads, rank == 0)
            } else {
                flatten_grads(model, &grads)
            }
        })
        .collect();
    // Fixed reduction order, as the ring all-reduce guarantees.
    let sum: Vec<f32> = flats[0].iter().zip(&flats[1]).map(|(a, b)| a + b).collect();
    for (model, optim) in ranks.iter_mut().zip(optims.iter_mut()) {
        let (stepped, grads) = if exchange {
            finish_exchange(model.clone(), &mut sum.clone(), 2).expect("same layout")
        } else {
            let mean: Vec<f32> = sum.iter().map(|g| g / 2.0).collect();
            (model.clone(), unflatten_grads(model, &mean).unwrap())
        };
        *model = optim.step(1e-2, stepped, grads);
    }
}

#[test]
fn batch_norm_buffers_are_broadcast_from_rank_zero() {
    let device = Default::default();
    let init = || reseed(ConvNorm::<CpuTrain>::new(&device), 5).unwrap();
    let mut ranks = vec![init(), init()];
    let mut optims: Vec<_> = (0..2).map(|_| adamw(1e-5).init()).collect();
    for step in 0..4 {
        two_rank_step(&mut ranks, &mut optims, step, true);
        assert_eq!(weights_checksum(&ranks[0]), weights_checksum(&ranks[1]), "step {step}");
        assert_eq!(running_mean(&ranks[0]), running_mean(&ranks[1]));
    }
    assert!(
        running_mean(&ranks[0]).iter().any(|m| *m != 0.0),
        "the statistics moved"
    );
    // Every rank ends a step with rank 0's statistics: after the first step (identical
    // weights before it), rank 1 holds what rank 0's batch alone gives.
    let mut first = vec![init(), init()];
    let mut optims: Vec<_> = (0..2).map(|_| adamw(1e-5).init()).collect();
    let lone = init();
    let (x, _) = batch(0);
    drop(lone.norm.forward(lone.conv.forward(x)));
    two_rank_step(&mut first, &mut optims, 0, true);
    assert_eq!(running_mean(&first[1]), running_mean(&lone));

    // Without the broadcast the ranks drift apart at once: the test above can fail.
    let mut drifting = vec![init(), init()];
    let mut optims: Vec<_> = (0..2).map(|_| adamw(1e-5).init()).collect();
    two_rank_step(&mut drifting, &mut optims, 0, false);
    two_rank_step(&mut drifting, &mut optims, 1, false);
    assert_ne!(weights_checksum(&drifting[0]), weights_checksum(&drifting[1]));
}

#[test]
fn buffers_get_no_gradient_so_the_optimiser_leaves_them_alone() {
    let device = Default::default();
    let model = reseed(ConvNorm::<CpuTrain>::new(&device), 5).unwrap();
    let flat = vec![1.0f32; flat_len(&model)];
    let grads = unflatten_grads(&model, &flat).unwrap();
    // conv weight + bias, norm gamma + beta; not running_mean / running_var.
    assert_eq!(grads.len(), 4);
}

#[test]
fn restored_buffers_undo_a_forward_pass() {
    let device = Default::default();
    let model = reseed(ConvNorm::<CpuTrain>::new(&device), 5).unwrap();
    let before = buffer_values(&model);
    let (x, _) = batch(1);
    drop(model.norm.forward(model.conv.forward(x)));
    assert_ne!(buffer_values(&model), before, "the forward pass moved the statistics");
    let model = restore_buffers(model, &before);
    assert_eq!(buffer_values(&model), before);
    assert_eq!(running_mean(&model), before[..3].to_vec());
}
