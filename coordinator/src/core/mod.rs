//! The coordinator's state machine: registration, gang scheduling, assignment hand-off, progress,
//! checkpoint commits and the end of runs. Both gRPC services are thin shells over this.
//!
//! Rule: every transition is written to the store (and flushed) before anything acts on it: the
//! assignment is handed out only after the run and its workers are recorded as Assigned.
//! All transitions run under one async mutex; the coordinator's state is small and this keeps
//! the reasoning simple.

use std::collections::HashMap;
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
}

pub type Result<T> = std::result::Result<T, CoordError>;

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
    /// Kept in memory: flushing sled on every heartbeat would buy nothing, since a restarted
    /// coordinator makes every worker register again anyway.
    last_seen: HashMap<String, (Instant, i64)>,
    pending: HashMap<String, pb::Assignment>,
    shutting_down: bool,
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
    /// Opens the store and recovers from whatever the last process left: runs that were in
    /// flight are Interrupted (their workers cannot be trusted to still hold them) and every
    /// worker must register again.
    pub async fn open(data_dir: &Path, timing: Timing) -> Result<Arc<Self>> {
        let store = Store::open(data_dir)?;
        for mut run in store.runs()? {
            if run.state.is_active() {
                run.state = RunState::Interrupted;
                run.message = "coordinator restarted while the run was in flight".into();
                run.updated_unix_ms = now_unix_ms();
                store.put_run(&run).await?;
            }
        }
        for mut w in store.workers()? {
            if w.state != WorkerState::Dead {
                w.state = WorkerState::Dead;
                w.run_id = None;
                store.put_worker(&w).await?;
            }
        }
        Ok(Arc::new(Coordinator {
            store,
            live: Mutex::new(Live::default()),
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
        };
        self.store.put_run(&run).await?;
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

    // ---- worker side ------------------------------------------------------------------------

    pub async fn register(&self, req: pb::RegisterRequest) -> Result<WorkerRecord> {
        let mut live = self.live.lock().await;
        let now = now_unix_ms();
        let worker = WorkerRecord {
            id: self.store.next_worker_id()?,
            host: req.host,
            peer_address: req.peer_address,
            device_kind: req.device_kind,
            device_memory_bytes: req.device_memory_bytes,
            registered_unix_ms: now,
            last_heartbeat_unix_ms: now,
            state: WorkerState::Idle,
            run_id: None,
        };
        self.store.put_worker(&worker).await?;
        live.last_seen.insert(worker.id.clone(), (Instant::now(), now));
        drop(live);
        self.schedule().await?;
        Ok(worker)
    }

    pub async fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        let mut live = self.live.lock().await;
        let known = self.store.worker(&req.worker_id)?;
        let Some(worker) = known.filter(|w| w.state != WorkerState::Dead) else {
            // Whatever run it thinks it is on was interrupted when it was forgotten.
            return Ok(pb::HeartbeatResponse {
                reregister: true,
                stop_run: !req.run_id.is_empty(),
                stop_reason: format!("the coordinator no longer counts worker {} as alive", req.worker_id),
                ..Default::default()
            });
        };
        live.last_seen
            .insert(worker.id.clone(), (Instant::now(), now_unix_ms()));
        let mut resp = pb::HeartbeatResponse {
            shutdown: live.shutting_down,
            ..Default::default()
        };
        if !req.run_id.is_empty() {
            let still_ours = worker.run_id.as_deref() == Some(req.run_id.as_str());
            let run = self.store.run(&req.run_id)?;
            match run {
                Some(run) if still_ours && run.state.is_active() => {}
                Some(run) => {
                    resp.stop_run = true;
                    resp.stop_reason = format!("run {} is {}: {}", run.id, run.state, run.message);
                }
                None => {
                    resp.stop_run = true;
                    resp.stop_reason = format!("run {} is unknown to the coordinator", req.run_id);
                }
            }
        }
        Ok(resp)
    }

    /// Long-poll for work. Resolves with an assignment, a shutdown order, or idle after `wait`.
    pub async fn await_assignment(&self, worker_id: &str, wait: Duration) -> Result<pb::AwaitAssignmentResponse> {
        use pb::await_assignment_response::Outcome;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.assignments_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut live = self.live.lock().await;
                let known = self
                    .store
                    .worker(worker_id)?
                    .is_some_and(|w| w.state != WorkerState::Dead);
                if !known {
                    return Err(CoordError::NotFound {
                        what: "worker (register again)",
                        id: worker_id.into(),
                    });
                }
                live.last_seen
                    .insert(worker_id.to_string(), (Instant::now(), now_unix_ms()));
                if let Some(assignment) = live.pending.remove(worker_id) {
                    self.mark_started(&assignment).await?;
                    return Ok(pb::AwaitAssignmentResponse {
                        outcome: Some(Outcome::Assignment(assignment)),
                    });
                }
                if live.shutting_down {
                    let reason = "coordinator is shutting down".to_string();
                    return Ok(pb::AwaitAssignmentResponse {
                        outcome: Some(Outcome::Shutdown(pb::Shutdown { reason })),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(pb::AwaitAssignmentResponse {
                    outcome: Some(Outcome::Idle(pb::Idle {})),
                });
            }
        }
    }

    async fn mark_started(&self, assignment: &pb::Assignment) -> Result<()> {
        let mut run = self.run_or_not_found(&assignment.run_id)?;
        if !run.started_ranks.contains(&assignment.rank) {
            run.started_ranks.push(assignment.rank);
        }
        if run.state == RunState::Assigned && run.started_ranks.len() == run.world_size as usize {
            run.state = RunState::Running;
        }
        run.updated_unix_ms = now_unix_ms();
        self.store.put_run(&run).await?;
        self.bump_progress();
        Ok(())
    }

    /// Moves a run to a final (or Interrupted) state and frees its workers, in one write.
    async fn end_run(&self, live: &mut Live, mut run: RunRecord, state: RunState, message: String) -> Result<()> {
        if !run.state.can_move_to(state) {
            return Err(CoordError::Rejected(format!(
                "run {} cannot go from {} to {state}",
                run.id, run.state
            )));
        }
        tracing::info!(run = %run.id, from = %run.state, to = %state, %message, "run transition");
        run.state = state;
        run.message = message;
        run.updated_unix_ms = now_unix_ms();
        let mut freed = vec![];
        for mut w in self.store.workers()? {
            if w.run_id.as_deref() == Some(run.id.as_str()) {
                live.pending.remove(&w.id);
                w.run_id = None;
                if w.state == WorkerState::Busy {
                    w.state = WorkerState::Idle;
                }
                freed.push(w);
            }
        }
        self.store.put_run_and_workers(&run, &freed).await?;
        self.bump_progress();
        Ok(())
    }

    /// Places queued runs, first in first out, each on a gang of `world_size` idle workers.
    pub async fn schedule(&self) -> Result<()> {
        let mut live = self.live.lock().await;
        if live.shutting_down {
            return Ok(());
        }
        let runs = self.store.runs()?;
        let workers = self.store.workers()?;
        let mut placed = false;
        for placement in scheduler::place(&runs, &workers) {
            let mut run = placement.run;
            run.state = RunState::Assigned;
            run.workers = placement.workers.iter().map(|w| w.id.clone()).collect();
            run.started_ranks.clear();
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
            self.store.put_run_and_workers(&run, &reserved).await?;
            tracing::info!(run = %run.id, workers = ?run.workers, "run assigned");
            let peers: Vec<String> = reserved.iter().map(|w| w.peer_address.clone()).collect();
            for (rank, w) in reserved.iter().enumerate() {
                live.pending.insert(
                    w.id.clone(),
                    pb::Assignment {
                        run_id: run.id.clone(),
                        rank: rank as u32,
                        world_size: run.world_size,
                        peers: peers.clone(),
                        spec_toml: run.spec_toml.clone(),
                        train_cases: run.train_cases.clone(),
                        eval_cases: run.eval_cases.clone(),
                        artifacts_url: run.artifacts_url.clone(),
                        resume_from: String::new(),
                    },
                );
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

    /// Declares silent workers dead and interrupts the runs they held. Called periodically.
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
            live.pending.remove(&w.id);
            live.last_seen.remove(&w.id);
            self.store.put_worker(&w).await?;
            let held = run_id.map(|id| self.store.run(&id)).transpose()?.flatten();
            if let Some(run) = held.filter(|r| r.state.is_active()) {
                let message = format!("worker {} missed its heartbeats for {:?}", w.id, dead_after);
                self.end_run(&mut live, run, RunState::Interrupted, message).await?;
            }
        }
        drop(live);
        self.schedule().await
    }
}
