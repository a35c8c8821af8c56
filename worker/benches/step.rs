//! Times one training step (forward, backward, AdamW) of a U-Net on the CPU backend, the number
//! that sizes the `tiny` preset and tells whether a CPU-only demo run is practical.
//!
//! `cargo bench -p worker --bench step -- [--width W] [--depth D] [--patch P] [--steps N]`
//! (defaults: the `tiny` preset, patch 32, 5 timed steps after one warm-up step). Set
//! `RAYON_NUM_THREADS` to fix the core count. The last line is machine-readable:
//! `RESULT tiny_unet_step_ms=<ms> params=<n>`.

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use worker::backend::CpuTrain;
use worker::model::{param_count, tiny};
use worker::train::loss::bce_dice_loss;

fn arg(args: &[String], name: &str) -> Option<usize> {
    let at = args.iter().position(|a| a == name)?;
    let value = args.get(at + 1).unwrap_or_else(|| panic!("{name} needs a value"));
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: not a number: {value}")),
    )
}

fn main() {
    // cargo passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args().collect();
    let mut config = tiny();
    if let Some(width) = arg(&args, "--width") {
        config = config.with_base_width(width);
    }
    if let Some(depth) = arg(&args, "--depth") {
        config = config.with_depth(depth);
    }
    let patch = arg(&args, "--patch").unwrap_or(32);
    let steps = arg(&args, "--steps").unwrap_or(5).max(1);
    config.validate().expect("valid config");

    let device = Default::default();
    let mut model = config.init_seeded::<CpuTrain>(&device, 0).expect("seeded init");
    let mut optim = AdamWConfig::new().with_weight_decay(1e-5).init();
    let params = param_count(&model);
    let classes = config.out_channels;
    let x = Tensor::<CpuTrain, 5>::random(
        [1, config.in_channels, patch, patch, patch],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let y = Tensor::<CpuTrain, 5>::random([1, classes, patch, patch, patch], Distribution::Bernoulli(0.1), &device);

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "U-Net base_width={} depth={} classes={classes} patch={patch}^3 params={params} \
         threads={threads}",
        config.base_width, config.depth
    );
    let mut times = Vec::with_capacity(steps);
    for step in 0..=steps {
        let start = Instant::now();
        let loss = bce_dice_loss(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        model = optim.step(1e-4, model, grads);
        // Reading the loss forces any lazy work to finish inside the timed region.
        let parts = loss.parts();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        println!("step {step}: {ms:.1} ms  loss {:.4}", parts.total);
        if step > 0 {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("median {median:.1} ms/step over {steps} steps (after 1 warm-up)");
    println!("RESULT tiny_unet_step_ms={median:.1} params={params}");
}
