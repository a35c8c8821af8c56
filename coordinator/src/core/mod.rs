//! The coordinator's state machine: registration, gang scheduling, assignment hand-off, progress,
//! checkpoint commits, interruptions and resumes, sweeps, and the end of runs. Both gRPC services
//! are thin shells over this.
//!
//! Decisions are made from an in-memory model (`model`) under one plain mutex, never held across
//! an await. Every change is written to the store under that lock and made durable after it is
//! released, before the caller answers or anything acts on it: an assignment is handed out only
//! after the run and its workers are recorded as Assigned and flushed. Object-store reads
//! (checkpoint verification, dataset listing) happen outside the lock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::manifest::ManifestError;
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
    /// The caller could not prove it is who it says: a worker id without that worker's secret.
    #[error("{0}")]
    Denied(String),
}

pub type Result<T> = std::result::Result<T, CoordError>;

/// A refused move is answered as any other rejected request, with the same words.
impl From<TransitionError> for CoordError {
    fn from(e: TransitionError) -> Self {
        CoordError::Rejected(e.to_string())
    }
}

mod datasets;
mod membership;
mod model;
mod placement;
mod resume;
pub use resume::best_checkpoint;
mod run_progress;
mod submission;
#[cfg(test)]
mod transition_tests;

pub use datasets::{ScanOutcome, name_from_url};
pub use submission::SweepView;

use model::Model;

#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is dead and its run interrupted.
    pub dead_after: Duration,
    /// A dead worker is forgotten (its record deleted) this long after its last sign of life.
    pub forget_dead_after: Duration,
}

impl Timing {
    /// Heartbeats come at least four times per `dead_after`, so one late beat never kills a
    /// healthy worker.
    pub fn with_dead_after(dead_after: Duration) -> Self {
        Timing {
            heartbeat_interval: (dead_after / 4).min(Duration::from_secs(2)),
            dead_after,
            forget_dead_after: Duration::from_secs(3600).max(dead_after * 10),
        }
    }

    /// A worker silent this long gets no new assignment, though it is not dead yet: two and a
    /// half missed beats.
    pub fn stale_after(&self) -> Duration {
        self.heartbeat_interval * 5 / 2
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::with_dead_after(Duration::from_secs(10))
    }
}

/// Runs for a listing, newest first, and why each queued one waits.
pub struct RunListing {
    pub runs: Vec<Arc<RunRecord>>,
    pub waiting: HashMap<String, scheduler::Waiting>,
}

pub struct Coordinator {
    store: Store,
    model: Mutex<Model>,
    /// Serialises submissions: a dataset is listed and its manifest frozen once, even when two
    /// submits for a new dataset race.
    submitting: tokio::sync::Mutex<()>,
    assignments_changed: Notify,
    /// Per-run wake-ups for metric followers: a report wakes only the followers of its own run.
    followers: Mutex<HashMap<String, watch::Sender<u64>>>,
    pub timing: Timing,
}

impl Coordinator {
    /// Opens the store, loads the model and takes over from whatever the last process left.
    /// Running runs are adopted: their workers keep training while the coordinator is away and
    /// reattach with their own ids; any that do not come back within `dead_after` are reaped as
    /// usual. Assignments live only in memory, so runs caught between assignment and start go
    /// back to the queue without spending their retry budget.
    pub async fn open(data_dir: &Path, timing: Timing) -> Result<Arc<Self>> {
        let store = Store::open(data_dir)?;
        let mut model = Model::load(&store)?;
        for state in [RunState::Assigned, RunState::Running] {
            let runs: Vec<RunRecord> = model.runs_in(state).into_iter().cloned().collect();
            for mut run in runs {
                if state == RunState::Assigned {
                    let freed = model.release_workers(&run.id);
                    let cause = Cause::at(
                        run.step,
                        "the coordinator restarted before every rank picked up its assignment",
                    );
                    run.transition(RunState::Queued, cause)?;
                    model.put_transition(&store, run, &freed, &[])?;
                } else {
                    let message = format!(
                        "coordinator restarted; adopting the run from its {} ranks as they reattach",
                        run.world_size
                    );
                    let event = RunEvent::new("adopting", run.step, message);
                    model.put_transition(&store, run, &[], &[event])?;
                }
            }
        }
        store.durable().await?;
        Ok(Arc::new(Coordinator {
            store,
            model: Mutex::new(model),
            submitting: tokio::sync::Mutex::new(()),
            assignments_changed: Notify::new(),
            followers: Mutex::new(HashMap::new()),
            timing,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The model. A panic while it was held leaves it as the last completed write made it (every
    /// change is applied only after its store write), so a poisoned lock is taken over.
    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes for every change of `run_id`'s metrics or state.
    pub fn follow(&self, run_id: &str) -> watch::Receiver<u64> {
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        followers
            .entry(run_id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn touch(&self, run_id: &str) {
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = followers.get(run_id) {
            if tx.receiver_count() == 0 {
                followers.remove(run_id);
            } else {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    /// Makes the writes so far durable, then wakes what they concern.
    async fn settle(&self, touched: &[&str], placed: bool) -> Result<()> {
        self.store.durable().await?;
        for run_id in touched {
            self.touch(run_id);
        }
        if placed {
            self.assignments_changed.notify_waiters();
        }
        Ok(())
    }

    // ---- CLI side ---------------------------------------------------------------------------

    pub async fn cancel(&self, run_id: &str) -> Result<RunRecord> {
        let run = {
            let mut m = self.lock();
            let run = m.run(run_id)?.clone();
            if run.state().is_terminal() {
                return Err(CoordError::Rejected(format!(
                    "run {run_id} already ended: {}",
                    run.state()
                )));
            }
            self.end_run(&mut m, run, RunState::Cancelled, "cancelled by user".into())?;
            m.run(run_id)?.clone()
        };
        self.settle(&[run_id], false).await?;
        self.schedule().await?;
        Ok(run)
    }

    pub fn get_run(&self, run_id: &str) -> Result<RunRecord> {
        self.lock().run(run_id).cloned()
    }

    /// A run's current attempt and world size, without copying its record (checked on every
    /// report).
    pub fn attempt_and_world(&self, run_id: &str) -> Result<(u32, u32)> {
        let m = self.lock();
        let run = m.run(run_id)?;
        Ok((run.attempt, run.world_size))
    }

    /// The runs a listing asks for (only `sweep_id`'s children, only those in `state`), newest
    /// first, with why each queued one waits. The lock is held only to take shared handles; the
    /// queue is explained after it is released, so listing ten thousand runs does not stall
    /// heartbeats. The caller renders and pages them (see `service::control_api`).
    pub fn list_runs(&self, sweep_id: Option<&str>, state: Option<RunState>) -> Result<RunListing> {
        let (mut runs, queue, workers) = {
            let m = self.lock();
            let runs = match sweep_id {
                None => m.snapshot(None::<std::iter::Empty<&str>>),
                Some(id) => {
                    let sweep = m.sweeps.get(id).ok_or_else(|| CoordError::NotFound {
                        what: "sweep",
                        id: id.into(),
                    })?;
                    m.snapshot(Some(sweep.children.iter().map(|c| c.run_id.as_str())))
                }
            };
            (runs, m.queue_snapshot(), self.worker_pools(&m))
        };
        runs.retain(|r| state.is_none_or(|s| r.state() == s));
        runs.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let waiting = workers
            .plan(queue.iter().map(|r| &**r), true)
            .waiting
            .into_iter()
            .map(|w| (w.run_id.clone(), w))
            .collect();
        Ok(RunListing { runs, waiting })
    }

    /// Why a queued run waits, and its place in the queue; None for any other run.
    pub fn why_waiting(&self, run: &RunRecord) -> Option<scheduler::Waiting> {
        if run.state() != RunState::Queued {
            return None;
        }
        let (queue, workers) = {
            let m = self.lock();
            (m.queue_snapshot(), self.worker_pools(&m))
        };
        let plan = workers.plan(queue.iter().map(|r| &**r), true);
        plan.waiting.into_iter().find(|w| w.run_id == run.id)
    }

    /// Workers with the wall-clock time of their last sign of life filled in.
    pub fn workers(&self) -> Vec<WorkerRecord> {
        let m = self.lock();
        m.workers()
            .map(|w| {
                let mut w = w.clone();
                if let Some((_, unix_ms)) = m.last_seen.get(&w.id) {
                    w.last_heartbeat_unix_ms = *unix_ms;
                }
                w
            })
            .collect()
    }

    /// Stops handing out work: idle workers are told to exit at their next poll.
    pub async fn begin_shutdown(&self) {
        self.lock().shutting_down = true;
        self.assignments_changed.notify_waiters();
    }

    /// The coordinator is stopping but will be back (SIGTERM): stop placing runs, tell workers
    /// at their next heartbeat, and make every write durable. Running runs are left as they are,
    /// for the next process to adopt.
    pub async fn begin_going_away(&self) -> Result<usize> {
        let running = {
            let mut m = self.lock();
            m.going_away = true;
            m.pending.clear();
            m.runs_in(RunState::Running).len()
        };
        self.store.durable().await?;
        self.assignments_changed.notify_waiters();
        Ok(running)
    }

    /// Moves a run to a final, Paused or Interrupted state and frees its workers, in one write.
    /// An interruption past the retry budget fails the run instead, listing every cause.
    fn end_run(&self, m: &mut Model, run: RunRecord, state: RunState, message: String) -> Result<()> {
        let ending = ending(m, run, state, message)?;
        m.put_transition(&self.store, ending.run, &ending.freed, &[])
    }

    /// Declares silent workers dead, and forgets those dead for `forget_dead_after`. A run that
    /// loses a worker is interrupted, unless that worker never picked its assignment up: then
    /// the run simply goes back to the queue, at no cost to its retry budget.
    pub async fn reap_dead_workers(&self) -> Result<()> {
        let touched = {
            let mut m = self.lock();
            self.reap_locked(&mut m)?
        };
        self.settle(&touched.iter().map(String::as_str).collect::<Vec<_>>(), false)
            .await?;
        self.schedule().await
    }

    fn reap_locked(&self, m: &mut Model) -> Result<Vec<String>> {
        let now = Instant::now();
        let dead_after = self.timing.dead_after;
        // The check runs at least once a heartbeat interval. A longer gap in its own clock means
        // this process was not running (SIGSTOP, a VM or GC pause, a stalled disk): its workers'
        // heartbeats went unheard, not unsent. Every worker gets a fresh grace period, as after a
        // restart, instead of its run being charged with the coordinator's silence.
        if let Some(gap) = m.last_liveness_check.replace(now).map(|t| now.duration_since(t))
            && gap > self.timing.heartbeat_interval
        {
            let alive: Vec<String> = m
                .workers()
                .filter(|w| w.state != WorkerState::Dead)
                .map(|w| w.id.clone())
                .collect();
            tracing::warn!(
                ?gap,
                workers = alive.len(),
                "the coordinator was unresponsive for {gap:?} (longer than the heartbeat interval {:?}); \
                 giving every worker a fresh grace period instead of declaring it dead",
                self.timing.heartbeat_interval
            );
            for id in alive {
                let wall = m.last_seen.get(&id).map_or_else(now_unix_ms, |(_, unix_ms)| *unix_ms);
                m.last_seen.insert(id, (now, wall));
            }
        }
        let forget_before = now_unix_ms() - self.timing.forget_dead_after.as_millis() as i64;
        let silent: Vec<WorkerRecord> = m
            .workers()
            .filter(|w| w.state != WorkerState::Dead)
            .filter(|w| {
                m.last_seen
                    .get(&w.id)
                    .is_none_or(|(t, _)| now.duration_since(*t) > dead_after)
            })
            .cloned()
            .collect();
        let forgotten: Vec<String> = m
            .workers()
            .filter(|w| w.state == WorkerState::Dead && w.last_heartbeat_unix_ms < forget_before)
            .map(|w| w.id.clone())
            .collect();
        for id in forgotten {
            tracing::info!(worker = %id, "forgetting a worker dead for longer than {:?}", self.timing.forget_dead_after);
            m.forget_worker(&self.store, &id)?;
        }
        let mut touched = vec![];
        for mut w in silent {
            tracing::warn!(worker = %w.id, "worker missed its heartbeats; declaring it dead");
            let run_id = w.run_id.take();
            w.state = WorkerState::Dead;
            if let Some((_, unix_ms)) = m.last_seen.remove(&w.id) {
                w.last_heartbeat_unix_ms = unix_ms;
            }
            let never_started = m.pending.remove(&w.id).is_some();
            m.suspects.remove(&w.id);
            m.put_worker(&self.store, w.clone())?;
            let Some(run) = run_id
                .and_then(|id| m.run(&id).ok().cloned())
                .filter(|r| r.state().is_active())
            else {
                continue;
            };
            touched.push(run.id.clone());
            if never_started && run.state() == RunState::Assigned {
                self.requeue_unstarted(m, run, &w.id)?;
            } else {
                let message = format!("worker {} missed its heartbeats for {:?}", w.id, dead_after);
                self.end_run(m, run, RunState::Interrupted, message)?;
            }
        }
        Ok(touched)
    }

    fn requeue_unstarted(&self, m: &mut Model, run: RunRecord, worker_id: &str) -> Result<()> {
        let message = format!(
            "worker {worker_id} died before picking up rank {} of attempt {}; back in the queue",
            run.workers.iter().position(|w| w == worker_id).unwrap_or(0),
            run.attempt
        );
        let freed = m.release_workers(&run.id);
        let from = run.resume_step;
        self.requeue(m, run, from, message, &freed)
    }
}

/// A run's end, as records to write: the run (carrying the events of its transitions) and the
/// workers it frees.
struct Ending {
    run: RunRecord,
    freed: Vec<WorkerRecord>,
}

/// The writes that end a run, for the caller to make (alone, or with a checkpoint commit). An
/// interruption is a transition of its own, followed by a pause when one was pending, or by the
/// run's failure when it spends the retry budget.
fn ending(m: &mut Model, mut run: RunRecord, state: RunState, message: String) -> Result<Ending> {
    let from = run.state();
    run.transition(state, Cause::at(run.step, message.clone()))?;
    let message = if state != RunState::Interrupted {
        message
    } else if run.pause_requested {
        // The user's pause outlives the fault: the run stops here instead of resuming.
        let message = format!(
            "paused: a pause was pending when the run was interrupted ({message}); \
             `coordinator resume {}` continues it from its newest checkpoint",
            run.id
        );
        run.transition(RunState::Paused, Cause::at(run.step, message.clone()))?;
        message
    } else if run.charge_interruption(message.clone()) {
        let causes: Vec<String> = run
            .interruptions
            .iter()
            .enumerate()
            .map(|(i, cause)| format!("{}) {cause}", i + 1))
            .collect();
        let message = format!(
            "interrupted {} times in a row without getting past step {}, more than max_retries = {}: {}",
            run.interruptions.len(),
            run.step,
            run.max_retries,
            causes.join("; ")
        );
        run.transition(RunState::Failed, Cause::at(run.step, message.clone()))?;
        message
    } else {
        message
    };
    tracing::info!(run = %run.id, %from, to = %run.state(), %message, "run transition");
    run.message = message;
    run.pause_requested = false;
    run.updated_unix_ms = now_unix_ms();
    let freed = m.release_workers(&run.id);
    Ok(Ending { run, freed })
}

#[cfg(test)]
mod tests {
    use protocol::pb;

    use super::*;

    fn register_request(peer: &str) -> pb::RegisterRequest {
        pb::RegisterRequest {
            host: "h".into(),
            peer_address: peer.into(),
            device_kind: "cpu".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn silent_workers_die_and_are_forgotten_later() {
        let dir = tempfile::tempdir().unwrap();
        let timing = Timing {
            heartbeat_interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(250),
            forget_dead_after: Duration::from_millis(600),
        };
        let coord = Coordinator::open(dir.path(), timing).await.unwrap();
        let quiet = coord.register(register_request("127.0.0.1:1")).await.unwrap();
        let chatty = coord.register(register_request("127.0.0.1:2")).await.unwrap();
        let state = |id: &str| coord.workers().into_iter().find(|w| w.id == id).map(|w| w.state);
        let beat = || {
            let req = pb::HeartbeatRequest {
                worker_id: chatty.id.clone(),
                ..Default::default()
            };
            coord.heartbeat(req).unwrap();
        };
        // The liveness check ticks well within a heartbeat interval, as the server's does.
        for tick in 0..40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if tick % 5 == 0 {
                beat();
            }
            coord.reap_dead_workers().await.unwrap();
        }
        assert_eq!(state(&quiet.id), Some(WorkerState::Dead));
        assert_eq!(state(&chatty.id), Some(WorkerState::Idle));
        // Forgotten once dead for `forget_dead_after`, while the live one stays.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while state(&quiet.id).is_some() {
            assert!(tokio::time::Instant::now() < deadline, "never forgotten");
            tokio::time::sleep(Duration::from_millis(10)).await;
            beat();
            coord.reap_dead_workers().await.unwrap();
        }
        assert!(coord.store().worker(&quiet.id).unwrap().is_none(), "and in the store");
        assert_eq!(state(&chatty.id), Some(WorkerState::Idle));
    }

    #[tokio::test]
    async fn a_stalled_coordinator_gives_its_workers_a_fresh_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let timing = Timing {
            heartbeat_interval: Duration::from_millis(50),
            dead_after: Duration::from_millis(200),
            forget_dead_after: Duration::from_secs(60),
        };
        let coord = Coordinator::open(dir.path(), timing).await.unwrap();
        let a = coord.register(register_request("127.0.0.1:1")).await.unwrap();
        let b = coord.register(register_request("127.0.0.1:2")).await.unwrap();
        let state = |id: &str| coord.workers().into_iter().find(|w| w.id == id).map(|w| w.state);
        coord.reap_dead_workers().await.unwrap();
        // The coordinator hears nothing and checks nothing for three times `dead_after`, as when
        // it is SIGSTOPped: the silence is its own, so nobody dies of it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        coord.reap_dead_workers().await.unwrap();
        assert_eq!(state(&a.id), Some(WorkerState::Idle));
        assert_eq!(state(&b.id), Some(WorkerState::Idle));
        // The grace period is fresh, not endless: workers that then stay silent while the
        // coordinator runs are declared dead as usual.
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            coord.reap_dead_workers().await.unwrap();
            if state(&a.id) == Some(WorkerState::Dead) && state(&b.id) == Some(WorkerState::Dead) {
                break;
            }
        }
        assert_eq!(state(&a.id), Some(WorkerState::Dead));
        assert_eq!(state(&b.id), Some(WorkerState::Dead));
    }
}
