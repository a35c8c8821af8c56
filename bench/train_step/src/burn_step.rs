//! Our side: one backbone's training step (forward, loss, backward, AdamW) on burn's CPU backend,
//! timed phase by phase, in a process of its own.
//!
//! Every measurement runs in a fresh child process (the driver re-executes itself with
//! `--child`) for two reasons: rayon's global pool reads `RAYON_NUM_THREADS` once, when it is
//! first used, so a thread count can only be set per process; and the peak resident memory a
//! process reports is then the peak of that one step, which calibrates the worker's memory
//! estimate.

use std::time::Instant;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use protocol::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use worker::backend::CpuTrain;
use worker::model::{ModelConfig, param_count};
use worker::train::loss::bce_dice_loss;

/// SuPreM's optimiser settings, as the trainer uses them.
pub const LR: f64 = 1e-4;
pub const WEIGHT_DECAY: f32 = 1e-5;

/// What one side reports for one (backbone, size, threads) point. The Python side writes the
/// same fields, so both are read by one parser.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    /// Set instead of the timings when this side could not run the point.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub params: u64,
    /// Wall milliseconds of every timed step (warm-up excluded), in order.
    #[serde(default)]
    pub step_ms: Vec<f64>,
    /// Median milliseconds per phase over the timed steps: forward (the backbone), loss
    /// (BCE + Dice forward), backward, optimizer (AdamW).
    #[serde(default)]
    pub forward_ms: f64,
    #[serde(default)]
    pub loss_ms: f64,
    #[serde(default)]
    pub backward_ms: f64,
    #[serde(default)]
    pub optim_ms: f64,
    /// Peak resident set of the process, MiB (getrusage / resource.getrusage).
    #[serde(default)]
    pub peak_rss_mib: f64,
}

impl StepReport {
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Default::default()
        }
    }

    pub fn median_ms(&self) -> f64 {
        median(&self.step_ms)
    }
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Runs `warmup` untimed and `steps` timed training steps of `spec`'s backbone on a
/// `[batch, 1, patch^3]` input with 25 classes. A backbone this build lacks, or an input it
/// rejects, comes back as [`StepReport::error`].
pub fn run(spec: &ModelSpec, patch: usize, batch: usize, warmup: usize, steps: usize) -> StepReport {
    let classes = protocol::classes::NUM_CLASSES;
    let config = match ModelConfig::from_spec(spec, classes) {
        Ok(config) => config,
        Err(err) => return StepReport::failed(err.to_string()),
    };
    let device = Default::default();
    let mut model = match config.init_seeded::<CpuTrain>(&device, 0) {
        Ok(model) => model,
        Err(err) => return StepReport::failed(err.to_string()),
    };
    if let Err(err) = model.check_input_shape([batch, 1, patch, patch, patch]) {
        return StepReport::failed(err);
    }
    let params = param_count(&model) as u64;
    let mut optim = worker::train::optimizer::adamw(WEIGHT_DECAY as f64).init();
    let x = Tensor::<CpuTrain, 5>::random([batch, 1, patch, patch, patch], Distribution::Normal(0.0, 1.0), &device);
    let y = Tensor::<CpuTrain, 5>::random(
        [batch, classes, patch, patch, patch],
        Distribution::Bernoulli(0.1),
        &device,
    );

    let mut phases: [Vec<f64>; 5] = Default::default();
    for step in 0..warmup + steps {
        // Flex is an eager backend: each call below has finished its kernels when it returns,
        // so the phase boundaries are real.
        let t0 = Instant::now();
        let logits = model.forward(x.clone());
        let t1 = Instant::now();
        let loss = bce_dice_loss(logits, y.clone());
        let t2 = Instant::now();
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        let t3 = Instant::now();
        model = optim.step(LR, model, grads);
        let t4 = Instant::now();
        // A host read of the loss, as the trainer's logging does; it also proves the step ran.
        let total = loss.parts().total;
        assert!(total.is_finite(), "step {step}: loss {total}");
        if step >= warmup {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            for (phase, value) in phases
                .iter_mut()
                .zip([ms(t0, t4), ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4)])
            {
                phase.push(value);
            }
        }
    }
    let [step_ms, forward, loss, backward, optim] = phases;
    StepReport {
        error: None,
        params,
        forward_ms: median(&forward),
        loss_ms: median(&loss),
        backward_ms: median(&backward),
        optim_ms: median(&optim),
        step_ms,
        peak_rss_mib: peak_rss_mib(),
    }
}

/// This process's peak resident set so far, MiB (Linux reports `ru_maxrss` in KiB).
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0
}
