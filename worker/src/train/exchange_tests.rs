//! Two in-process trainers exchanging over a real two-rank ring, against one trainer that takes
//! the same global batch (both samples' gradients, averaged) on its own.

use super::*;
use crate::backend::CpuTrain;
use crate::collective::{RingOptions, serve_loopback_ring};
use crate::model::{Backbone, test_unet};
use crate::train::loss::bce_dice_loss;
use crate::train::params::{buffer_values, exchange_buffer, finish_exchange, restore_buffers, to_f32};
use burn::module::Module;
use burn::optim::Optimizer;
use burn::tensor::TensorData;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

const STEPS: u64 = 20;

fn sample(seed: u64) -> (Tensor<CpuTrain, 5>, Tensor<CpuTrain, 5>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let image: Vec<f32> = (0..512).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect();
    let class = (seed % 3) as usize;
    let mut labels = vec![0.0f32; 3 * 512];
    (0..512)
        .filter(|&i| image[i] > 0.5)
        .for_each(|i| labels[class * 512 + i] = 1.0);
    let device = Default::default();
    (
        Tensor::from_data(TensorData::new(image, [1, 1, 8, 8, 8]), &device),
        Tensor::from_data(TensorData::new(labels, [1, 3, 8, 8, 8]), &device),
    )
}

fn grads(model: &Backbone<CpuTrain>, seed: u64) -> GradientsParams {
    let (x, y) = sample(seed);
    GradientsParams::from_grads(bce_dice_loss(model.forward(x), y).total.backward(), model)
}

/// Every float of every param, in visit order.
fn values(model: &Backbone<CpuTrain>) -> Vec<f32> {
    struct All(Vec<f32>);
    impl ModuleVisitor<CpuTrain> for All {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuTrain, D>>) {
            self.0.extend(to_f32(param.val().inner()));
        }
    }
    let mut all = All(vec![]);
    model.visit(&mut all);
    all.0
}

#[test]
fn twenty_steps_on_two_ranks_equal_one_rank_with_the_same_global_batch() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let token = protocol::auth::SharedToken::none();
    let (hubs, peers) = runtime.block_on(serve_loopback_ring(2, &token)).unwrap();
    let config = test_unet(3, 4, 2);
    // Step k: rank r trains on sample 2k + r; the lone rank on both.
    let ranks: Vec<_> = hubs
        .into_iter()
        .enumerate()
        .map(|(rank, hub)| {
            let (handle, peers, config) = (runtime.handle().clone(), peers.clone(), config.clone());
            std::thread::spawn(move || {
                // Small buckets: the exchange spans several of them.
                let options = RingOptions {
                    bucket_bytes: 4 << 10,
                    ..RingOptions::new(std::time::Duration::from_secs(60))
                };
                let mut ring = handle
                    .block_on(Ring::connect_with(
                        &hub,
                        "run-2v1",
                        rank as u32,
                        &peers,
                        options.clone(),
                    ))
                    .unwrap();
                let mut model: Backbone<CpuTrain> = config.init_seeded(&Default::default(), 42).unwrap();
                let mut optim = crate::train::optimizer::adamw(1e-5).init();
                let mut exchange = Exchange::new(&model, options.bucket_bytes);
                assert!(exchange.bounds.len() > 2, "the model spans several buckets");
                for step in 0..STEPS {
                    let g = grads(&model, 2 * step + rank as u64);
                    let (synced, g) = exchange
                        .run(model, &g, rank == 0, &mut ring, &handle)
                        .map_err(|(_, e)| e)
                        .unwrap()
                        .unwrap();
                    model = optim.step(1e-3, synced, g);
                }
                values(&model)
            })
        })
        .collect();
    let ranks: Vec<Vec<f32>> = ranks.into_iter().map(|t| t.join().unwrap()).collect();

    let mut alone: Backbone<CpuTrain> = config.init_seeded(&Default::default(), 42).unwrap();
    let mut optim = crate::train::optimizer::adamw(1e-5).init();
    for step in 0..STEPS {
        // BatchNorm's statistics follow rank 0's sample, as the ring's buffer broadcast does.
        let before = buffer_values(&alone);
        let second = exchange_buffer(&alone, &grads(&alone, 2 * step + 1), false);
        alone = restore_buffers(alone, &before);
        let first = exchange_buffer(&alone, &grads(&alone, 2 * step), true);
        let mut sum: Vec<f32> = first.iter().zip(&second).map(|(a, b)| a + b).collect();
        let (synced, g) = finish_exchange(alone, &mut sum, 2).unwrap();
        alone = optim.step(1e-3, synced, g);
    }
    let alone = values(&alone);

    assert_eq!(ranks[0], ranks[1], "the two ranks hold the same weights, bit for bit");
    let start = values(&config.init_seeded::<CpuTrain>(&Default::default(), 42).unwrap());
    assert!(
        start.iter().zip(&alone).any(|(a, b)| a != b),
        "training moved the weights"
    );
    for (i, (two, one)) in ranks[0].iter().zip(&alone).enumerate() {
        assert!(
            (two - one).abs() <= 1e-5 * one.abs().max(1.0),
            "weight {i}: two ranks {two}, one rank {one}"
        );
    }
}
