//! One rank's training run, in the shape of burn's custom training loop: sample a batch, forward,
//! backward, average gradients with the other ranks, step the optimiser. Around it: metrics and
//! weight checksums to the coordinator, held-out evaluation before and after (rank 0), and
//! checkpoints (rank 0), from which a run resumes bit-identically.
//!
//! Generic over the autodiff backend, so the CPU and CUDA paths are the same code.

use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use protocol::classes::NUM_CLASSES;
use protocol::pb;

use crate::manifests::RunCases;
use protocol::spec::RunSpec;
use thiserror::Error;

use crate::collective::{CollectiveError, HeldState, Ring, fetch_state};
use crate::link::{LinkError, RunLink};
use crate::model::{Backbone, ModelConfig, ModelConfigError};
use crate::train::cases::{CaseSource, DataPlane, StoreSource};
use crate::train::checkpoint::{
    CheckpointError, CheckpointManager, LoopState, Optim, Restored, decode_parts, encode_parts,
};
use crate::train::eval::{EvalError, EvalReport, HeldOut};
use crate::train::exchange::Exchange;
use crate::train::feed::{BatchBuilder, Feed, FeedConfig, Substitute};
use crate::train::finite::{self, NonFinite};
use crate::train::init_from;
use crate::train::loss::bce_dice_loss;
use crate::train::optimizer;
use crate::train::order::{SampleOrder, rank_slice};
use crate::train::params::{self, ParamsError};
use crate::train::schedule::warmup_cosine;
use data::patch::CropConfig;
use data::preprocess::PreprocessConfig;
use data::{self, CaseVolume, DataError};

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("run spec from the coordinator: {0}")]
    Spec(#[from] protocol::spec::SpecError),
    #[error("model: {0}")]
    Model(#[from] ModelConfigError),
    #[error("data: {0}")]
    Data(#[from] DataError),
    /// A sample's case and all its substitutes failed: the message counts and names them.
    #[error("data: {0}")]
    CasesExhausted(String),
    #[error("gradient all-reduce: {0}")]
    Collective(#[from] CollectiveError),
    #[error("gradients: {0}")]
    Params(#[from] ParamsError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot resume: {0}")]
    Resume(CheckpointError),
    #[error("{0}")]
    InitFrom(#[from] crate::train::init_from::InitFromError),
    #[error("lost a ring peer after step {step}; holding the state for live recovery: {source}")]
    PeerLostHolding { step: u64, source: CollectiveError },
    #[error("coordinator: {0}")]
    Link(#[from] LinkError),
    #[error("assignment: {0}")]
    Assignment(String),
    /// The step cannot fit in this worker's memory: retrying elsewhere would not help.
    #[error("{0}")]
    Memory(#[from] crate::train::memory::MemoryError),
    #[error("stopped by the coordinator: {0}")]
    Stopped(String),
    #[error("evaluation: {0}")]
    Eval(EvalError),
    /// Weights, gradients or loss went NaN or infinite: retrying would only repeat it.
    #[error("{0}")]
    NonFinite(#[from] NonFinite),
}

impl From<EvalError> for TrainError {
    fn from(e: EvalError) -> Self {
        match e {
            EvalError::Collective(CollectiveError::Aborted { reason }) => TrainError::Stopped(reason),
            EvalError::Link(e) => TrainError::Link(e),
            e => TrainError::Eval(e),
        }
    }
}

/// How a finished run ended on this rank.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub final_step: u64,
    pub weights_sha256: String,
    pub eval_before: Option<EvalReport>,
    pub eval_after: Option<EvalReport>,
}

/// The backbone a spec describes, with one output per SuPreM class.
pub fn model_config(spec: &RunSpec) -> Result<ModelConfig, ModelConfigError> {
    ModelConfig::from_spec(&spec.model, NUM_CLASSES)
}

pub fn train_rank<B: AutodiffBackend>(
    device: B::Device,
    assignment: &pb::Assignment,
    cases: &RunCases,
    ring: &mut Ring,
    link: &mut RunLink,
    plane: &DataPlane,
) -> Result<RunSummary, TrainError> {
    let spec = RunSpec::from_toml(&assignment.spec_toml, "assignment")?;
    let t = &spec.train;
    let (rank, world) = (assignment.rank, assignment.world_size);
    let per_rank = t.per_rank_batch(world).map_err(TrainError::Assignment)?;
    if cases.train.is_empty() {
        return Err(TrainError::Assignment("no training cases".into()));
    }
    let config = model_config(&spec)?;
    let multiple = config.size_multiple();
    let mut model: Backbone<B> = config.init_seeded(&device, spec.seed)?;
    let mut optim: Optim<B, Backbone<B>> = optimizer::adamw(t.weight_decay).init::<B, Backbone<B>>();
    let (store, root) = data::store_from_url(&spec.dataset.url)?;
    let source: Arc<dyn CaseSource> = Arc::new(StoreSource::new(
        store,
        root,
        &spec.dataset.url,
        PreprocessConfig::from_run_spec(&spec),
        assignment.quarantined.iter().cloned(),
        plane.cache.clone(),
        tokio::runtime::Handle::current(),
    ));
    let (store, root) = data::store_from_url(&assignment.artifacts_url)?;
    let checkpoints = CheckpointManager::new(store, root, &assignment.run_id, assignment.attempt);
    let mut state = LoopState::fresh(spec.seed, world, per_rank);
    if !assignment.recover_from_peer.is_empty() {
        let (m, o, s) = recover_live(assignment, ring, model, optim, &device, link)?;
        (model, optim, state) = (m, o, s);
        state.rescale(world, per_rank);
        tracing::info!(run = %assignment.run_id, rank, step = state.step, from = %assignment.recover_from_peer, "recovered live from a surviving rank");
    } else if !assignment.resume_from.is_empty() {
        let (m, o, s) = link
            .block_on(checkpoints.load(&assignment.resume_from, &assignment.resume_files, model, optim, &device))
            .map_err(TrainError::Resume)?;
        (model, optim, state) = (m, o, s);
        state.rescale(world, per_rank);
        tracing::info!(run = %assignment.run_id, rank, step = state.step, samples = state.samples_consumed, "resumed from checkpoint");
    } else if let Some(url) = spec.model.init_from() {
        let source = link.block_on(init_from::fetch(url))?;
        model = init_from::apply(&source, model, &config, &device)?;
        // Step 0's checksum: the coordinator checks every rank loaded the same weights.
        link.checksum(0, finite::checked_checksum(&model, 0)?);
        tracing::info!(run = %assignment.run_id, rank, %url, "initialised from model.init_from");
    }
    let start_step = state.step;
    let order = Arc::new(SampleOrder::new(cases.train.clone(), spec.seed));
    let patch = t.patch.map(|p| p as usize);
    let batch = per_rank as usize;
    // Every rank evaluates its share of the held-out cases.
    let evaluating = t.eval && !cases.eval.is_empty();
    let held_out = HeldOut::from_spec(&spec, rank, world, per_rank).map_err(EvalError::from)?;
    if let Some(bad) = held_out.window.roi.iter().find(|&&side| side % multiple != 0) {
        return Err(TrainError::Assignment(format!(
            "train.eval_window side {bad} is not a multiple of {multiple}, which the model needs"
        )));
    }

    // The feed starts before the first evaluation, so its prefetch overlaps it.
    let substitute: Substitute = {
        let order = order.clone();
        Arc::new(move |index, attempt| Some(order.substitute(index, attempt).to_string()))
    };
    let mut feed = Feed::start(BatchBuilder {
        order: order.clone(),
        source: source.clone(),
        substitute: Some(substitute),
        config: FeedConfig {
            seed: spec.seed,
            rank,
            per_rank_batch: per_rank,
            samples_per_step: world as u64 * per_rank as u64,
            first_consumed: state.samples_consumed,
            batches: t.steps.saturating_sub(start_step),
            crop: CropConfig::from_run_spec(&spec),
            threads: plane.prefetch_threads,
            max_ahead_bytes: plane.prefetch_bytes,
            max_substitutions: 8,
        },
    });

    let mut bad_cases = BadCases::default();
    let eval_at = |model: &Backbone<B>,
                   step: u64,
                   link: &mut RunLink,
                   ring: &mut Ring,
                   bad_cases: &mut BadCases|
     -> Result<EvalReport, TrainError> {
        // This rank's share, mapped from the node's cache, held only for this evaluation. A bad
        // held-out case is reported and left out: the report names how many cases it averaged.
        let mine = held_out.my_cases(&cases.eval);
        let mut held: Vec<Arc<CaseVolume>> = Vec::with_capacity(mine.len());
        for id in mine {
            match source.volume(id) {
                Ok((vol, _)) => held.push(vol),
                Err(e) if e.is_case_fault() => bad_cases.report(link, id, &e),
                Err(e) => return Err(e.into()),
            }
        }
        let vols: Vec<&CaseVolume> = held.iter().map(Arc::as_ref).collect();
        let model = model.valid();
        Ok(held_out.run(|x| model.forward(x), &vols, step, ring, link, &device)?)
    };
    // A resumed run has done this already.
    let eval_before = if evaluating && start_step == 0 {
        Some(eval_at(&model, 0, link, ring, &mut bad_cases)?)
    } else {
        None
    };

    let mut window = LossWindow::default();
    let mut exchange = Exchange::new(&model, spec.collective.bucket_bytes());
    let slots = finite::slot_names(&model);
    for step in start_step..t.steps {
        if let Some(reason) = link.stop.raised() {
            return Err(TrainError::Stopped(reason));
        }
        let started = Instant::now();
        // The forward pass moves BatchNorm's running statistics; a step lost to a peer must not.
        let buffers_before = params::buffer_values(&model);
        let samples = rank_slice(state.samples_consumed, rank, per_rank);
        let ready = feed
            .next_batch()
            .ok_or_else(|| TrainError::Assignment(format!("the data feed ended before step {step}")))?
            .map_err(|failure| match failure.exhausted_message() {
                Some(message) => TrainError::CasesExhausted(message),
                None => TrainError::Data(*failure.error),
            })?;
        if ready.samples != samples {
            return Err(TrainError::Assignment(format!(
                "the data feed built samples {:?} for step {step}, which reads {samples:?}",
                ready.samples
            )));
        }
        for failure in &ready.failures {
            bad_cases.report(link, &failure.case_id, &failure.error);
        }
        let [d, h, w] = patch;
        let x = Tensor::<B, 5>::from_data(TensorData::new(ready.images, [batch, 1, d, h, w]), &device);
        let y = Tensor::<B, 5>::from_data(TensorData::new(ready.labels, [batch, NUM_CLASSES, d, h, w]), &device);

        let loss = bce_dice_loss(model.forward(x), y);
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        let (stepped, grads) = match exchange.run(model, &grads, rank == 0, ring, link.runtime()) {
            Ok(done) => done?,
            Err((_, CollectiveError::Aborted { reason })) => return Err(TrainError::Stopped(reason)),
            // This rank's weights and optimiser are untouched by the failed step, and its
            // BatchNorm statistics go back to where the step found them: keep that state for the
            // re-formed ring, so the run loses only the step in flight.
            Err((model, e)) if e.is_peer_loss() => {
                let model = params::restore_buffers(model, &buffers_before);
                let parts = encode_parts(&model, &optim, &state)?;
                ring.hub().hold_state(HeldState::new(
                    assignment.run_id.clone(),
                    assignment.attempt,
                    state.step,
                    parts,
                ));
                return Err(TrainError::PeerLostHolding {
                    step: state.step,
                    source: e,
                });
            }
            Err((_, e)) => return Err(e.into()),
        };
        // Before the optimiser applies them. The gradients are the same on every rank; the loss
        // is this rank's (read back here anyway, the backward pass has synced).
        finite::check_exchange(step + 1, exchange.summed(), &slots)?;
        let parts = loss.parts();
        finite::check_loss(step + 1, &parts)?;
        let lr = warmup_cosine(t.lr, step, t.warmup_steps, t.steps);
        model = optim.step(lr, stepped, grads);
        state.advance();

        let done = state.step;
        let last = done == t.steps;
        window.add(parts, started.elapsed().as_secs_f64());
        // The per-step record of which global samples each rank read: resumes are checked
        // against it for gaps and repeats.
        link.metric(done, "data/first_sample", samples.start as f64);
        link.metric(done, "data/samples", per_rank as f64);
        if done.is_multiple_of(t.metrics_every) || last {
            window.report(link, done, lr, batch);
            let data = feed.take_metrics();
            link.metric(done, "data/cases_per_second", data.cases_per_second);
            link.metric(done, "data/cache_hit_rate", data.cache_hit_rate);
            link.metric(done, "data/wait_seconds", data.wait_seconds);
            if data.case_failures > 0 {
                link.metric(done, "data/case_failures", data.case_failures as f64);
            }
        }
        // Weights are checked where they are read back anyway, and before every checkpoint.
        let mut weights_checked = false;
        if done.is_multiple_of(t.checksum_every) || last {
            link.checksum(done, finite::checked_checksum(&model, done)?);
            weights_checked = true;
        }
        if done.is_multiple_of(t.metrics_every) || done.is_multiple_of(t.checksum_every) || last {
            link.flush()?;
        }
        // Periodic evaluation; each one's checkpoint carries its mean Dice, so the coordinator
        // can mark and keep the best.
        let dice = if evaluating && !last && t.eval_every > 0 && done.is_multiple_of(t.eval_every) {
            Some(eval_at(&model, done, link, ring, &mut bad_cases)?.mean())
        } else {
            None
        };
        let periodic = t.checkpoint_every > 0 && done.is_multiple_of(t.checkpoint_every);
        // A pause is honoured at the next boundary with a checkpoint, which the coordinator
        // turns into Paused when it commits it.
        if rank == 0 && !last && (periodic || dice.is_some() || link.pause_requested()) {
            if !weights_checked {
                finite::checked_checksum(&model, done)?;
            }
            let saved = link.block_on(checkpoints.save(&model, &optim, &state))?;
            link.commit_checkpoint(done, saved.files, saved.weights_sha256, false, dice)?;
        }
    }

    drop(feed);
    let weights_sha256 = finite::checked_checksum(&model, state.step)?;
    let eval_after = if evaluating && start_step < t.steps {
        Some(eval_at(&model, t.steps, link, ring, &mut bad_cases)?)
    } else {
        None
    };
    if rank == 0 && start_step < t.steps {
        let saved = link.block_on(checkpoints.save(&model, &optim, &state))?;
        let dice = eval_after.as_ref().map(EvalReport::mean);
        link.commit_checkpoint(t.steps, saved.files, saved.weights_sha256, true, dice)?;
    }
    Ok(RunSummary {
        final_step: t.steps,
        weights_sha256,
        eval_before,
        eval_after,
    })
}

/// Live recovery: takes the state a surviving rank kept when the old ring broke, from this
/// worker's own hub when it is that survivor, or over the survivor's collective endpoint.
fn recover_live<B: AutodiffBackend>(
    assignment: &pb::Assignment,
    ring: &Ring,
    model: Backbone<B>,
    optim: Optim<B, Backbone<B>>,
    device: &B::Device,
    link: &RunLink,
) -> Result<Restored<B, Backbone<B>>, TrainError> {
    let (run_id, attempt, step) = (&assignment.run_id, assignment.recover_attempt, assignment.resume_step);
    // The holder decodes its own copy in place; everyone else fetches one.
    let parts = match ring.hub().held_state(run_id, attempt, step) {
        Some(held) => held.parts,
        None => link
            .block_on(fetch_state(
                &ring.hub().token,
                &assignment.recover_from_peer,
                run_id,
                attempt,
                step,
                std::time::Duration::from_secs(120),
            ))
            .map_err(|e| {
                TrainError::Resume(CheckpointError::Part {
                    key: format!("live state at step {step}"),
                    message: e.to_string(),
                })
            })
            .map(Arc::new)?,
    };
    let origin = format!("live state of {} at step {step}: ", assignment.recover_from_peer);
    decode_parts(&origin, &parts, model, optim, device).map_err(TrainError::Resume)
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

/// Bad cases this rank has met, so each is reported to the coordinator once per run. A case the
/// assignment already names as quarantined is known there and never reported again.
#[derive(Default)]
struct BadCases(std::collections::HashSet<String>);

impl BadCases {
    fn report(&mut self, link: &RunLink, case_id: &str, error: &DataError) {
        if matches!(error, DataError::Quarantined { .. }) || !self.0.insert(case_id.to_string()) {
            return;
        }
        link.report_bad_case(case_id, &error.to_string());
    }
}
