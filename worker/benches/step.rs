//! Times one training step (forward, backward, AdamW) of a backbone on the CPU backend, the
//! number that sizes the `tiny` presets and tells whether a CPU-only demo run is practical.
//!
//! `cargo bench -p worker --bench step -- [--arch A] [--preset P] [--patch N] [--batch B] [--steps N]`
//! (defaults: the `tiny` U-Net, patch 32, batch 1, 5 timed steps after one warm-up step). Set
//! `RAYON_NUM_THREADS` to fix the core count. The last line is machine-readable:
//! `RESULT step_ms=<ms> params=<n>`.

use std::time::Instant;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use protocol::spec::{ModelSpec, Preset};
use worker::backend::CpuTrain;
use worker::model::{ModelConfig, param_count};
use worker::train::loss::bce_dice_loss;

fn text<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == name)?;
    Some(args.get(at + 1).unwrap_or_else(|| panic!("{name} needs a value")))
}

fn arg(args: &[String], name: &str) -> Option<usize> {
    let value = text(args, name)?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: not a number: {value}")),
    )
}

fn main() {
    // cargo passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args().collect();
    let arch = text(&args, "--arch").unwrap_or("unet");
    let preset = text(&args, "--preset").unwrap_or("tiny");
    let preset = Preset::parse(preset).unwrap_or_else(|| panic!("--preset: unknown preset {preset}"));
    let spec = ModelSpec::preset(arch, preset).unwrap_or_else(|| panic!("--arch: unknown architecture {arch}"));
    let classes = protocol::classes::NUM_CLASSES;
    let config = ModelConfig::from_spec(&spec, classes).expect("valid config");
    let patch = arg(&args, "--patch").unwrap_or(32);
    let batch = arg(&args, "--batch").unwrap_or(1);
    let steps = arg(&args, "--steps").unwrap_or(5).max(1);

    let device = Default::default();
    let mut model = config.init_seeded::<CpuTrain>(&device, 0).expect("seeded init");
    let mut optim = worker::train::optimizer::adamw(1e-5).init();
    let params = param_count(&model);
    let x = Tensor::<CpuTrain, 5>::random([batch, 1, patch, patch, patch], Distribution::Normal(0.0, 1.0), &device);
    let y = Tensor::<CpuTrain, 5>::random(
        [batch, classes, patch, patch, patch],
        Distribution::Bernoulli(0.1),
        &device,
    );

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "{arch} preset={} classes={classes} patch={patch}^3 batch={batch} params={params} threads={threads}",
        preset.name()
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
    println!("RESULT step_ms={median:.1} params={params}");
}
