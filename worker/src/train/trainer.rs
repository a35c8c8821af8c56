//! One rank's training run, in the shape of burn's custom training loop: sample a batch, forward,
//! backward, average gradients with the other ranks, step the optimiser. Around it: metrics and
//! weight checksums to the coordinator, held-out evaluation before and after (rank 0), and
//! checkpoints (rank 0).
//!
//! Generic over the autodiff backend, so the CPU and CUDA paths are the same code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use protocol::classes::NUM_CLASSES;
use protocol::pb;
use protocol::spec::RunSpec;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::checkpoint::write_checkpoint;
use crate::collective::{CollectiveError, Ring};
use crate::data::{self, CaseVolume, DataError, sample_patch};
use crate::link::RunLink;
use crate::model::unet::{ModelConfigError, UNet3d, UNet3dConfig};
use crate::train::codec::{self, CodecError};
use crate::train::eval::{EvalReport, evaluate};
use crate::train::loss::bce_dice_loss;
use crate::train::params::{self, ParamsError};
use crate::train::schedule::warmup_cosine;
use crate::train::shard::{Cursor, ShardPlan};

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("run spec from the coordinator: {0}")]
    Spec(#[from] protocol::spec::SpecError),
    #[error("model: {0}")]
    Model(#[from] ModelConfigError),
    #[error("data: {0}")]
    Data(#[from] DataError),
    #[error("gradient all-reduce: {0}")]
    Collective(#[from] CollectiveError),
    #[error("gradients: {0}")]
    Params(#[from] ParamsError),
    #[error("checkpoint encoding: {0}")]
    Codec(#[from] CodecError),
    #[error("checkpoint upload: {0}")]
    Upload(#[from] object_store::Error),
    #[error("coordinator: {0}")]
    Coordinator(#[from] tonic::Status),
    #[error("assignment: {0}")]
    Assignment(String),
    #[error("stopped by the coordinator: {0}")]
    Stopped(String),
}

/// How a finished run ended on this rank.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub final_step: u64,
    pub weights_sha256: String,
    pub eval_before: Option<EvalReport>,
    pub eval_after: Option<EvalReport>,
}

/// Builds the model a spec describes, with the seeded init every rank shares.
pub fn model_config(spec: &RunSpec) -> UNet3dConfig {
    UNet3dConfig::new()
        .with_out_channels(NUM_CLASSES)
        .with_base_width(spec.model.base_width as usize)
        .with_depth(spec.model.depth as usize)
}

/// Decoded volumes this rank has read. Kept in memory: the spine's datasets are small; the data
/// plane issue replaces this with a bounded on-disk cache.
struct CaseCache {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    cases: HashMap<String, CaseVolume>,
}

impl CaseCache {
    fn get(&mut self, link: &RunLink, id: &str) -> Result<&CaseVolume, DataError> {
        if !self.cases.contains_key(id) {
            let vol = link.block_on(data::load_case(self.store.as_ref(), &self.root, id))?;
            self.cases.insert(id.to_string(), vol);
        }
        Ok(&self.cases[id])
    }
}

fn sample_seed(seed: u64, rank: u32, step: u64) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

pub fn train_rank<B: AutodiffBackend>(
    device: B::Device,
    assignment: &pb::Assignment,
    ring: &mut Ring,
    link: &mut RunLink,
) -> Result<RunSummary, TrainError> {
    let spec = RunSpec::from_toml(&assignment.spec_toml, "assignment")?;
    let t = &spec.train;
    let (rank, world) = (assignment.rank, assignment.world_size);
    if assignment.train_cases.len() < world as usize {
        return Err(TrainError::Assignment(format!(
            "{} training cases for {world} ranks",
            assignment.train_cases.len()
        )));
    }
    let config = model_config(&spec);
    let multiple = config.size_multiple();
    let mut model: UNet3d<B> = config.init_seeded(&device, spec.seed)?;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(t.weight_decay as f32)
        .init::<B, UNet3d<B>>();
    let (store, root) = data::store_from_url(&spec.dataset.url)?;
    let mut cache = CaseCache {
        store,
        root,
        cases: HashMap::new(),
    };
    let (store, root) = data::store_from_url(&assignment.artifacts_url)?;
    let checkpoints = CheckpointSink {
        store,
        root,
        run_id: assignment.run_id.clone(),
    };
    let plan = ShardPlan::new(assignment.train_cases.clone(), spec.seed, rank, world);
    let patch = t.patch.map(|p| p as usize);
    let batch = t.batch_size as usize;
    let voxels: usize = patch.iter().product();
    let evaluating = rank == 0 && t.eval && !assignment.eval_cases.is_empty();

    let eval_at =
        |model: &UNet3d<B>, step: u64, link: &mut RunLink, cache: &mut CaseCache| -> Result<EvalReport, TrainError> {
            let started = Instant::now();
            for id in &assignment.eval_cases {
                cache.get(link, id)?;
            }
            let vols: Vec<&CaseVolume> = assignment.eval_cases.iter().map(|id| &cache.cases[id]).collect();
            let report = evaluate(&model.valid(), &vols, multiple, &device);
            for (name, value) in report.metrics() {
                link.metric(step, &name, value);
            }
            link.metric(step, "eval/seconds", started.elapsed().as_secs_f64());
            link.flush()?;
            Ok(report)
        };
    let eval_before = if evaluating {
        Some(eval_at(&model, 0, link, &mut cache)?)
    } else {
        None
    };

    let mut cursor = Cursor { epoch: 0, position: 0 };
    let mut window = LossWindow::default();
    for step in 0..t.steps {
        if let Some(reason) = link.stop.raised() {
            return Err(TrainError::Stopped(reason));
        }
        let started = Instant::now();
        let (ids, next) = plan.next_batch(cursor, batch);
        cursor = next;
        let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(spec.seed, rank, step));
        let mut images = Vec::with_capacity(batch * voxels);
        let mut labels = Vec::with_capacity(batch * NUM_CLASSES * voxels);
        for id in &ids {
            let p = sample_patch(cache.get(link, id)?, patch, &mut rng);
            images.extend_from_slice(&p.image);
            labels.extend_from_slice(&p.labels);
        }
        let [d, h, w] = patch;
        let x = Tensor::<B, 5>::from_data(TensorData::new(images, [batch, 1, d, h, w]), &device);
        let y = Tensor::<B, 5>::from_data(TensorData::new(labels, [batch, NUM_CLASSES, d, h, w]), &device);

        let loss = bce_dice_loss(model.forward(x), y);
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        let mut flat = params::flatten_grads(&model, &grads);
        match link.block_on(ring.all_reduce_mean(&mut flat)) {
            Err(CollectiveError::Aborted { reason }) => return Err(TrainError::Stopped(reason)),
            other => other?,
        }
        let grads = params::unflatten_grads(&model, &flat)?;
        let lr = warmup_cosine(t.lr, step, t.warmup_steps, t.steps);
        model = optim.step(lr, model, grads);

        let done = step + 1;
        let last = done == t.steps;
        window.add(loss.parts(), started.elapsed().as_secs_f64());
        if done % t.metrics_every == 0 || last {
            window.report(link, done, lr, batch);
        }
        if done % t.checksum_every == 0 || last {
            link.checksum(done, params::weights_checksum(&model));
        }
        if done % t.metrics_every == 0 || done % t.checksum_every == 0 || last {
            link.flush()?;
        }
        if rank == 0 && t.checkpoint_every > 0 && done % t.checkpoint_every == 0 && !last {
            checkpoints.save(link, &model, &optim, &spec, done, cursor, false)?;
        }
    }

    let weights_sha256 = params::weights_checksum(&model);
    let eval_after = if evaluating {
        Some(eval_at(&model, t.steps, link, &mut cache)?)
    } else {
        None
    };
    if rank == 0 {
        checkpoints.save(link, &model, &optim, &spec, t.steps, cursor, true)?;
    }
    Ok(RunSummary {
        final_step: t.steps,
        weights_sha256,
        eval_before,
        eval_after,
    })
}

/// Where rank 0 writes checkpoints: the run's prefix in the artifacts store.
struct CheckpointSink {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    run_id: String,
}

impl CheckpointSink {
    /// Uploads the checkpoint's files, then has the coordinator verify and commit them.
    #[allow(clippy::too_many_arguments)] // each is one part of the checkpoint
    fn save<B: AutodiffBackend>(
        &self,
        link: &RunLink,
        model: &UNet3d<B>,
        optim: &OptimizerAdaptor<AdamW, UNet3d<B>, B>,
        spec: &RunSpec,
        step: u64,
        cursor: Cursor,
        is_final: bool,
    ) -> Result<(), TrainError> {
        let files = checkpoint_files(model, optim, spec, step, cursor)?;
        let written = link.block_on(write_checkpoint(
            self.store.as_ref(),
            &self.root,
            &self.run_id,
            step,
            files,
        ))?;
        link.commit_checkpoint(step, written, is_final)?;
        Ok(())
    }
}

/// What a checkpoint holds: weights, optimiser moments, and the state that makes the next step
/// reproducible (step, data cursor, seed; crops are re-derived from (seed, rank, step)).
fn checkpoint_files<B: AutodiffBackend>(
    model: &UNet3d<B>,
    optim: &OptimizerAdaptor<AdamW, UNet3d<B>, B>,
    spec: &RunSpec,
    step: u64,
    cursor: Cursor,
) -> Result<Vec<(&'static str, Vec<u8>)>, TrainError> {
    let state = serde_json::json!({
        "step": step,
        "cursor": cursor,
        "seed": spec.seed,
        "weights_sha256": params::weights_checksum(model),
        "spec": spec.to_toml(),
    });
    Ok(vec![
        ("model.bin", codec::model_to_bytes(model)?),
        ("optimizer.bin", codec::optimizer_to_bytes(optim)?),
        (
            "state.json",
            serde_json::to_vec_pretty(&state).expect("json value serialises"),
        ),
    ])
}

/// Loss and timing since the last report, averaged so one noisy step does not dominate.
#[derive(Default)]
struct LossWindow {
    total: f64,
    bce: f64,
    dice: f64,
    seconds: f64,
    steps: u64,
}

impl LossWindow {
    fn add(&mut self, parts: crate::train::loss::LossParts, seconds: f64) {
        self.total += parts.total as f64;
        self.bce += parts.bce as f64;
        self.dice += parts.dice as f64;
        self.seconds += seconds;
        self.steps += 1;
    }

    fn report(&mut self, link: &mut RunLink, step: u64, lr: f64, batch: usize) {
        let n = self.steps.max(1) as f64;
        link.metric(step, "train/loss", self.total / n);
        link.metric(step, "train/bce", self.bce / n);
        link.metric(step, "train/dice_loss", self.dice / n);
        link.metric(step, "train/lr", lr);
        link.metric(step, "train/step_seconds", self.seconds / n);
        link.metric(
            step,
            "train/samples_per_second",
            n * batch as f64 / self.seconds.max(1e-9),
        );
        *self = LossWindow::default();
    }
}
