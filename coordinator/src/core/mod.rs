//! The coordinator's state machine: registration, gang scheduling, assignment hand-off, progress,
//! checkpoint commits, interruptions and resumes, and the end of runs. Both gRPC services are
//! thin shells over this.
//!
//! Rule: every transition is written to the store (and flushed) before anything acts on it: the
//! assignment is handed out only after the run and its workers are recorded as Assigned.
//! All transitions run under one async mutex; the coordinator's state is small and this keeps
//! the reasoning simple. Object-store reads (checkpoint verification) happen outside it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::pb;
use protocol::spec::RunSpec;
use thiserror::Error;
use tokio::sync::{Mutex, Notify, watch};

use crate::manifest::{self, ManifestError};
use crate::records::*;
use crate::scheduler;
use crate::store::{Store, StoreError};
use crate::verify::VerifyError;

#[derive(Debug, Error)]
pub enum CoordError {
    #[error("{0}")]
    InvalidSpec(#[from] protocol::spec::SpecError),
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Checkpoint(#[from] VerifyError),
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Probe(#[from] crate::probe::ProbeError),
}

pub type Result<T> = std::result::Result<T, CoordError>;

mod membership;
mod resume;
mod run_progress;

#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is dead and its run is interrupted.
    pub dead_after: Duration,
}

impl Timing {
    /// Heartbeats come at least four times per `dead_after`, so one late beat never kills a
    /// healthy worker.
    pub fn with_dead_after(dead_after: Duration) -> Self {
        Timing {
            heartbeat_interval: (dead_after / 4).min(Duration::from_secs(2)),
            dead_after,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::with_dead_after(Duration::from_secs(10))
    }
}

#[derive(Default)]
struct Live {
    /// Last sign of life per worker: monotonic for the liveness check, wall clock for display.
    /// Kept in memory: flushing sled on every heartbeat would buy nothing. A restarted
    /// coordinator starts every known worker's clock afresh, and reaps those that stay silent.
    last_seen: HashMap<String, (Instant, i64)>,
    pending: HashMap<String, pb::Assignment>,
    /// Demo teardown: idle workers are told to exit.
    shutting_down: bool,
    /// SIGTERM: workers are told the coordinator will be back, and keep training.
    going_away: bool,
    /// Workers a peer saw vanish (their ring link closed). Left out of new gangs until they show
    /// a sign of life, so a re-formed ring does not wait `dead_after` on a dead process.
    suspects: HashSet<String>,
}

impl Live {
    fn seen(&mut self, worker_id: &str) {
        self.last_seen
            .insert(worker_id.to_string(), (Instant::now(), now_unix_ms()));
        self.suspects.remove(worker_id);
    }
}

pub struct Coordinator {
    store: Store,
    live: Mutex<Live>,
    assignments_changed: Notify,
    /// Bumped whenever metrics or a run's state change, so followers re-read.
    progress: watch::Sender<u64>,
    pub timing: Timing,
}

impl Coordinator {
    /// Opens the store and takes over from whatever the last process left. Running runs are
    /// adopted: their workers keep training while the coordinator is away and reattach with
    /// their own ids; any that do not come back within `dead_after` are reaped as usual.
    /// Assignments live only in memory, so runs caught between assignment and start go back to
    /// the queue without spending their retry budget.
    pub async fn open(data_dir: &Path, timing: Timing) -> Result<Arc<Self>> {
        let store = Store::open(data_dir)?;
        let mut live = Live::default();
        let now = (Instant::now(), now_unix_ms());
        let workers = store.workers()?;
        for w in workers.iter().filter(|w| w.state != WorkerState::Dead) {
            live.last_seen.insert(w.id.clone(), now);
        }
        for mut run in store.runs()? {
            match run.state {
                RunState::Assigned => {
                    let freed = release_workers(&workers, &run.id);
                    let event = RunEvent::new(
                        "requeued",
                        run.step,
                        "the coordinator restarted before every rank picked up its assignment",
                    );
                    run.state = RunState::Queued;
                    run.updated_unix_ms = now_unix_ms();
                    store.put_transition(&run, &freed, &[event]).await?;
                }
                RunState::Running => {
                    let message = format!(
                        "coordinator restarted; adopting the run from its {} ranks as they reattach",
                        run.world_size
                    );
                    store
                        .put_transition(&run, &[], &[RunEvent::new("adopting", run.step, message)])
                        .await?;
                }
                _ => {}
            }
        }
        Ok(Arc::new(Coordinator {
            store,
            live: Mutex::new(live),
            assignments_changed: Notify::new(),
            progress: watch::channel(0).0,
            timing,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn subscribe_progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    fn bump_progress(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    fn run_or_not_found(&self, run_id: &str) -> Result<RunRecord> {
        self.store.run(run_id)?.ok_or_else(|| CoordError::NotFound {
            what: "run",
            id: run_id.into(),
        })
    }

    // ---- CLI side ---------------------------------------------------------------------------

    pub async fn submit(&self, spec_toml: &str, source_name: &str) -> Result<RunRecord> {
        let spec = RunSpec::from_toml(spec_toml, source_name)?;
        // submit-time probes (security branch)
        crate::probe::probe_dataset(&spec.dataset.url).await?;
        crate::probe::probe_artifacts(&spec.artifacts.url).await?;
        let plan = manifest::plan_cases(&spec).await?;
        if plan.train.len() < spec.world_size as usize {
            return Err(CoordError::Rejected(format!(
                "{source_name}: field `world_size`: {} ranks but only {} training cases",
                spec.world_size,
                plan.train.len()
            )));
        }
        // Held while the run is written, so no transition interleaves with its creation.
        let transition = self.live.lock().await;
        let now = now_unix_ms();
        let run = RunRecord {
            id: self.store.next_run_id()?,
            name: spec.name.clone(),
            spec_toml: spec.to_toml(),
            state: RunState::Queued,
            world_size: spec.world_size,
            total_steps: spec.train.steps,
            step: 0,
            message: String::new(),
            submitted_unix_ms: now,
            updated_unix_ms: now,
            workers: vec![],
            started_ranks: vec![],
            train_cases: plan.train,
            eval_cases: plan.eval,
            artifacts_url: spec.artifacts.url.clone(),
            finished: Default::default(),
            final_checkpoint: None,
            attempt: 0,
            max_retries: spec.max_retries,
            interruptions: vec![],
            resume_step: None,
            pause_requested: false,
            live_state: None,
            recovering_live: false,
        };
        let event = RunEvent::new(
            "submitted",
            0,
            format!("from {source_name}, {} workers", spec.world_size),
        );
        self.store.put_transition(&run, &[], &[event]).await?;
        drop(transition);
        self.schedule().await?;
        self.bump_progress();
        self.run_or_not_found(&run.id)
    }

    pub async fn cancel(&self, run_id: &str) -> Result<RunRecord> {
        let mut live = self.live.lock().await;
        let run = self.run_or_not_found(run_id)?;
        if run.state.is_terminal() {
            return Err(CoordError::Rejected(format!(
                "run {run_id} already ended: {}",
                run.state
            )));
        }
        self.end_run(&mut live, run, RunState::Cancelled, "cancelled by user".into())
            .await?;
        drop(live);
        self.schedule().await?;
        self.run_or_not_found(run_id)
    }

    pub fn get_run(&self, run_id: &str) -> Result<RunRecord> {
        self.run_or_not_found(run_id)
    }

    /// Workers with the wall-clock time of their last heartbeat filled in from memory.
    pub async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let live = self.live.lock().await;
        let mut workers = self.store.workers()?;
        for w in &mut workers {
            if let Some((_, unix_ms)) = live.last_seen.get(&w.id) {
                w.last_heartbeat_unix_ms = *unix_ms;
            }
        }
        Ok(workers)
    }

    /// Stops handing out work: idle workers are told to exit at their next poll.
    pub async fn begin_shutdown(&self) {
        self.live.lock().await.shutting_down = true;
        self.assignments_changed.notify_waiters();
    }

    /// The coordinator is stopping but will be back (SIGTERM): stop placing runs, tell workers
    /// at their next heartbeat, and make every write durable. Running runs are left as they are,
    /// for the next process to adopt.
    pub async fn begin_going_away(&self) -> Result<usize> {
        let mut live = self.live.lock().await;
        live.going_away = true;
        live.pending.clear();
        self.store.flush_all().await?;
        let running = self
            .store
            .runs()?
            .iter()
            .filter(|r| r.state == RunState::Running)
            .count();
        drop(live);
        self.assignments_changed.notify_waiters();
        Ok(running)
    }

    /// Moves a run to a final, Paused or Interrupted state and frees its workers, in one write.
    /// An interruption past the retry budget fails the run instead, listing every cause.
    async fn end_run(&self, live: &mut Live, run: RunRecord, state: RunState, message: String) -> Result<()> {
        let ending = self.ending(live, run, state, message)?;
        self.store
            .put_transition(&ending.run, &ending.freed, &ending.events)
            .await?;
        self.bump_progress();
        Ok(())
    }

    /// The writes that end a run, for the caller to make (alone, or with a checkpoint commit).
    fn ending(&self, live: &mut Live, mut run: RunRecord, state: RunState, message: String) -> Result<Ending> {
        if !run.state.can_move_to(state) {
            return Err(CoordError::Rejected(format!(
                "run {} cannot go from {} to {state}",
                run.id, run.state
            )));
        }
        let mut events = vec![];
        let (state, message) = if state == RunState::Interrupted {
            run.interruptions.push(message.clone());
            events.push(RunEvent::new("interrupted", run.step, message.clone()));
            if run.retries_used() > run.max_retries {
                let causes: Vec<String> = run
                    .interruptions
                    .iter()
                    .enumerate()
                    .map(|(i, cause)| format!("{}) {cause}", i + 1))
                    .collect();
                let message = format!(
                    "interrupted {} times, more than max_retries = {}: {}",
                    run.interruptions.len(),
                    run.max_retries,
                    causes.join("; ")
                );
                (RunState::Failed, message)
            } else {
                (state, message)
            }
        } else {
            (state, message)
        };
        tracing::info!(run = %run.id, from = %run.state, to = %state, %message, "run transition");
        if state != RunState::Interrupted {
            events.push(RunEvent::new(
                &state.to_string().to_lowercase(),
                run.step,
                message.clone(),
            ));
        }
        run.state = state;
        run.message = message;
        run.pause_requested = false;
        run.updated_unix_ms = now_unix_ms();
        let freed = release_workers(&self.store.workers()?, &run.id);
        for w in &freed {
            live.pending.remove(&w.id);
        }
        Ok(Ending { run, freed, events })
    }

    /// Places queued runs, first in first out, each on a gang of `world_size` idle workers of one
    /// numeric fingerprint. Every placement is a new attempt of the run.
    pub async fn schedule(&self) -> Result<()> {
        let mut live = self.live.lock().await;
        if live.shutting_down || live.going_away {
            return Ok(());
        }
        let runs = self.store.runs()?;
        let mut workers = self.store.workers()?;
        workers.retain(|w| !live.suspects.contains(&w.id));
        let mut placed = false;
        for placement in scheduler::place(&runs, &workers) {
            let mut run = placement.run;
            let resume = match run.resume_step {
                Some(step) => self.store.checkpoints(&run.id)?.into_iter().find(|c| c.step == step),
                None => None,
            };
            run.state = RunState::Assigned;
            run.attempt += 1;
            run.workers = placement.workers.iter().map(|w| w.id.clone()).collect();
            run.started_ranks.clear();
            run.finished.clear();
            run.updated_unix_ms = now_unix_ms();
            let reserved: Vec<WorkerRecord> = placement
                .workers
                .into_iter()
                .map(|mut w| {
                    w.state = WorkerState::Busy;
                    w.run_id = Some(run.id.clone());
                    w
                })
                .collect();
            let survivor = run.live_state.clone().filter(|_| run.recovering_live);
            let from = match (&survivor, &resume) {
                (Some(l), _) => format!("recovering live from the state {} kept at step {}", l.worker_id, l.step),
                (None, Some(c)) => format!("resuming from the checkpoint at step {}", c.step),
                (None, None) => "from step 0".to_string(),
            };
            let event = RunEvent::new(
                "assigned",
                run.resume_step.unwrap_or(0),
                format!("attempt {} on {} ({from})", run.attempt, run.workers.join(", ")),
            );
            self.store.put_transition(&run, &reserved, &[event]).await?;
            tracing::info!(run = %run.id, attempt = run.attempt, workers = ?run.workers, "run assigned ({from})");
            let peers: Vec<String> = reserved.iter().map(|w| w.peer_address.clone()).collect();
            for (rank, w) in reserved.iter().enumerate() {
                let mut a = assignment(&run, rank as u32, &peers, resume.as_ref());
                if let Some(l) = &survivor {
                    a.resume_from.clear();
                    a.resume_files.clear();
                    a.resume_step = l.step;
                    a.recover_from_peer = l.peer_address.clone();
                    a.recover_attempt = l.attempt;
                }
                live.pending.insert(w.id.clone(), a);
            }
            placed = true;
        }
        drop(live);
        if placed {
            self.assignments_changed.notify_waiters();
            self.bump_progress();
        }
        Ok(())
    }

    /// Declares silent workers dead. A run that loses a worker is interrupted, unless that
    /// worker never picked its assignment up: then the run simply goes back to the queue, at no
    /// cost to its retry budget.
    pub async fn reap_dead_workers(&self) -> Result<()> {
        let mut live = self.live.lock().await;
        let now = Instant::now();
        let dead_after = self.timing.dead_after;
        for mut w in self.store.workers()? {
            if w.state == WorkerState::Dead {
                continue;
            }
            let silent = live
                .last_seen
                .get(&w.id)
                .map(|(t, _)| now.duration_since(*t) > dead_after)
                .unwrap_or(true);
            if !silent {
                continue;
            }
            tracing::warn!(worker = %w.id, "worker missed its heartbeats; declaring it dead");
            let run_id = w.run_id.take();
            w.state = WorkerState::Dead;
            let never_started = live.pending.remove(&w.id).is_some();
            live.last_seen.remove(&w.id);
            live.suspects.remove(&w.id);
            self.store.put_worker(&w).await?;
            let held = run_id.map(|id| self.store.run(&id)).transpose()?.flatten();
            let Some(run) = held.filter(|r| r.state.is_active()) else {
                continue;
            };
            if never_started && run.state == RunState::Assigned {
                self.requeue_unstarted(&mut live, run, &w.id).await?;
            } else {
                let message = format!("worker {} missed its heartbeats for {:?}", w.id, dead_after);
                self.end_run(&mut live, run, RunState::Interrupted, message).await?;
            }
        }
        drop(live);
        self.schedule().await
    }

    async fn requeue_unstarted(&self, live: &mut Live, mut run: RunRecord, worker_id: &str) -> Result<()> {
        let message = format!(
            "worker {worker_id} died before picking up rank {} of attempt {}; back in the queue",
            run.workers.iter().position(|w| w == worker_id).unwrap_or(0),
            run.attempt
        );
        let freed = release_workers(&self.store.workers()?, &run.id);
        for w in &freed {
            live.pending.remove(&w.id);
        }
        let from = run.resume_step;
        self.requeue(&mut run, from, "requeued", message, &freed).await
    }
}

/// A run's end, as records to write: the run, the workers it frees, the events that say why.
struct Ending {
    run: RunRecord,
    freed: Vec<WorkerRecord>,
    events: Vec<RunEvent>,
}

/// The workers `run_id` holds, set back to idle (dead ones stay dead).
fn release_workers(workers: &[WorkerRecord], run_id: &str) -> Vec<WorkerRecord> {
    workers
        .iter()
        .filter(|w| w.run_id.as_deref() == Some(run_id))
        .map(|w| {
            let mut w = w.clone();
            w.run_id = None;
            if w.state == WorkerState::Busy {
                w.state = WorkerState::Idle;
            }
            w
        })
        .collect()
}

fn assignment(run: &RunRecord, rank: u32, peers: &[String], resume: Option<&CheckpointRecord>) -> pb::Assignment {
    pb::Assignment {
        run_id: run.id.clone(),
        rank,
        world_size: run.world_size,
        peers: peers.to_vec(),
        spec_toml: run.spec_toml.clone(),
        train_cases: run.train_cases.clone(),
        eval_cases: run.eval_cases.clone(),
        artifacts_url: run.artifacts_url.clone(),
        resume_from: resume.map(|c| c.prefix.clone()).unwrap_or_default(),
        attempt: run.attempt,
        resume_files: resume
            .map(|c| {
                c.files
                    .iter()
                    .map(|f| pb::CheckpointFile {
                        key: f.key.clone(),
                        sha256: f.sha256.clone(),
                        bytes: f.bytes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        resume_step: resume.map_or(0, |c| c.step),
        recover_from_peer: String::new(),
        recover_attempt: 0,
    }
}
