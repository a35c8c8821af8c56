//! The coordinator's in-memory model of runs, workers, sweeps and the queue, loaded once at
//! start-up and written through to sled, the way quickwit's control plane keeps its model.
//! Decisions (scheduling, membership checks, heartbeats) read only this; the store is read back
//! only for history (events, metrics, checkpoints) and written on every change.
//!
//! Rule: a change is written to the store first and applied here only if that write succeeded,
//! so the model never holds a state the store lacks. Durability (the flush) comes after the lock
//! is released; see `store::Store::durable`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio::time::Instant;

use protocol::pb;

use super::{CoordError, Result};
use crate::records::*;
use crate::store::Store;

/// Placement order of a queued run: higher priority first, then first in, first out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    priority: std::cmp::Reverse<i32>,
    seq: u64,
    run_id: String,
}

impl QueueKey {
    fn of(run: &RunRecord) -> Self {
        QueueKey {
            priority: std::cmp::Reverse(run.priority),
            seq: run.seq,
            run_id: run.id.clone(),
        }
    }
}

#[derive(Default)]
pub(super) struct Model {
    /// Shared, so a listing can take a snapshot under the lock and render it after.
    runs: HashMap<String, Arc<RunRecord>>,
    queue: BTreeSet<QueueKey>,
    /// Interrupted runs waiting for their automatic resume, keyed as the queue is: they keep
    /// their place in it, so the workers they freed are held for them, not given to a run
    /// queued behind them (see `queue_with_resuming`).
    resuming: BTreeSet<QueueKey>,
    /// Shared like `runs`: a scheduling pass or a listing takes handles, not copies.
    workers: BTreeMap<String, Arc<WorkerRecord>>,
    pub sweeps: BTreeMap<String, SweepRecord>,
    /// Last sign of life per worker: monotonic for the liveness check, wall clock for display.
    /// Kept in memory: flushing sled on every heartbeat would buy nothing. A restarted
    /// coordinator starts every known worker's clock afresh, and reaps those that stay silent.
    pub last_seen: HashMap<String, (Instant, i64)>,
    pub pending: HashMap<String, pb::Assignment>,
    /// Demo teardown: idle workers are told to exit.
    pub shutting_down: bool,
    /// SIGTERM: workers are told the coordinator will be back, and keep training.
    pub going_away: bool,
    /// Workers a peer saw vanish (their ring link closed). Left out of new gangs until they show
    /// a sign of life, so a re-formed ring does not wait `dead_after` on a dead process.
    pub suspects: HashSet<String>,
    /// When the liveness check last ran: a gap longer than a heartbeat interval means the
    /// coordinator itself was stalled (SIGSTOP, a VM pause, a slow disk), not its workers.
    pub last_liveness_check: Option<Instant>,
}

impl Model {
    pub fn load(store: &Store) -> Result<Self> {
        let mut model = Model::default();
        for run in store.runs()? {
            model.apply_run(run);
        }
        let now = (Instant::now(), now_unix_ms());
        for w in store.workers()? {
            if w.state != WorkerState::Dead {
                model.last_seen.insert(w.id.clone(), now);
            }
            model.workers.insert(w.id.clone(), Arc::new(w));
        }
        for sweep in store.sweeps()? {
            model.sweeps.insert(sweep.id.clone(), sweep);
        }
        Ok(model)
    }

    pub fn seen(&mut self, worker_id: &str) {
        self.last_seen
            .insert(worker_id.to_string(), (Instant::now(), now_unix_ms()));
        self.suspects.remove(worker_id);
    }

    // ---- runs -------------------------------------------------------------------------------

    pub fn run(&self, run_id: &str) -> Result<&RunRecord> {
        self.runs.get(run_id).map(|r| &**r).ok_or_else(|| CoordError::NotFound {
            what: "run",
            id: run_id.into(),
        })
    }

    pub fn runs_in(&self, state: RunState) -> Vec<&RunRecord> {
        if state == RunState::Queued {
            return self.queued().collect();
        }
        let mut runs: Vec<&RunRecord> = self
            .runs
            .values()
            .map(|r| &**r)
            .filter(|r| r.state() == state)
            .collect();
        runs.sort_by_key(|r| r.seq);
        runs
    }

    /// Shared handles to `runs` (all, in submission order) or to some of them by id, for
    /// rendering outside the lock.
    pub fn snapshot<'a>(&self, ids: Option<impl Iterator<Item = &'a str>>) -> Vec<Arc<RunRecord>> {
        match ids {
            Some(ids) => ids.filter_map(|id| self.runs.get(id).cloned()).collect(),
            None => {
                let mut runs: Vec<Arc<RunRecord>> = self.runs.values().cloned().collect();
                runs.sort_by_key(|r| r.seq);
                runs
            }
        }
    }

    /// The queue, as shared handles in placement order.
    pub fn queue_snapshot(&self) -> Vec<Arc<RunRecord>> {
        self.queue
            .iter()
            .filter_map(|k| self.runs.get(&k.run_id).cloned())
            .collect()
    }

    /// Queued runs in placement order.
    pub fn queued(&self) -> impl Iterator<Item = &RunRecord> {
        self.queue.iter().filter_map(|k| self.runs.get(&k.run_id).map(|r| &**r))
    }

    /// Queued runs and the interrupted runs about to be resumed, merged in queue order: what a
    /// scheduling pass walks, so that an interrupted run holds its place (and its workers) for
    /// the moment between its interruption and its automatic resume.
    pub fn queue_with_resuming(&self) -> Box<dyn Iterator<Item = &RunRecord> + '_> {
        let record = |k: &QueueKey| self.runs.get(&k.run_id).map(|r| &**r);
        if self.resuming.is_empty() {
            // The common case walks the queue lazily: a pass stops once no worker is idle.
            return Box::new(self.queue.iter().filter_map(record));
        }
        let mut keys: Vec<&QueueKey> = self.queue.iter().chain(&self.resuming).collect();
        keys.sort();
        Box::new(keys.into_iter().filter_map(record))
    }

    fn apply_run(&mut self, run: RunRecord) {
        if let Some(old) = self.runs.get(&run.id) {
            self.queue.remove(&QueueKey::of(old));
            self.resuming.remove(&QueueKey::of(old));
        }
        match run.state() {
            RunState::Queued => {
                self.queue.insert(QueueKey::of(&run));
            }
            RunState::Interrupted => {
                self.resuming.insert(QueueKey::of(&run));
            }
            _ => {}
        }
        self.runs.insert(run.id.clone(), Arc::new(run));
    }

    fn apply_workers(&mut self, workers: &[WorkerRecord]) {
        for w in workers {
            self.workers.insert(w.id.clone(), Arc::new(w.clone()));
        }
    }

    /// Writes a run change with the workers it touches and the events that explain it (the
    /// events of the run's transitions among them; see `RunRecord::transition`).
    pub fn put_transition(
        &mut self,
        store: &Store,
        mut run: RunRecord,
        workers: &[WorkerRecord],
        events: &[RunEvent],
    ) -> Result<()> {
        store.put_transition(&mut run, workers, events)?;
        self.apply_workers(workers);
        self.apply_run(run);
        Ok(())
    }

    /// As `put_transition`, committing a checkpoint in the same write.
    pub fn put_checkpoint(
        &mut self,
        store: &Store,
        ckpt: &CheckpointRecord,
        mut run: RunRecord,
        workers: &[WorkerRecord],
        events: &[RunEvent],
    ) -> Result<()> {
        store.put_checkpoint(ckpt, &mut run, workers, events)?;
        self.apply_workers(workers);
        self.apply_run(run);
        Ok(())
    }

    /// New runs (a submit or a whole sweep) with the manifests they froze, in one write.
    pub fn put_submission(
        &mut self,
        store: &Store,
        manifests: &[ManifestRecord],
        sweep: Option<SweepRecord>,
        mut runs: Vec<(RunRecord, RunEvent)>,
    ) -> Result<()> {
        store.put_submission(manifests, sweep.as_ref(), &mut runs)?;
        if let Some(sweep) = sweep {
            self.sweeps.insert(sweep.id.clone(), sweep);
        }
        for (run, _) in runs {
            self.apply_run(run);
        }
        Ok(())
    }

    /// Records a run's step after its report was written by `Store::record_report`. Reports of
    /// several ranks arrive in any order; the step only moves forward.
    pub fn note_step(&mut self, run_id: &str, step: u64, unix_ms: i64) {
        if let Some(run) = self.runs.get_mut(run_id).filter(|r| step > r.step) {
            let run = Arc::make_mut(run);
            run.step = step;
            run.updated_unix_ms = unix_ms;
        }
    }

    // ---- workers ----------------------------------------------------------------------------

    pub fn worker(&self, worker_id: &str) -> Option<&WorkerRecord> {
        self.workers.get(worker_id).map(|w| &**w)
    }

    /// Workers in id order.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values().map(|w| &**w)
    }

    /// Shared handles to every worker, in id order.
    pub fn worker_handles(&self) -> impl Iterator<Item = &Arc<WorkerRecord>> {
        self.workers.values()
    }

    pub fn put_worker(&mut self, store: &Store, worker: WorkerRecord) -> Result<()> {
        store.put_worker(&worker)?;
        self.workers.insert(worker.id.clone(), Arc::new(worker));
        Ok(())
    }

    pub fn forget_worker(&mut self, store: &Store, worker_id: &str) -> Result<()> {
        store.delete_worker(worker_id)?;
        self.workers.remove(worker_id);
        self.last_seen.remove(worker_id);
        self.suspects.remove(worker_id);
        self.pending.remove(worker_id);
        Ok(())
    }

    /// The workers `run_id` holds, set back to idle (dead ones stay dead), for the caller to
    /// write with the run's change. Their undelivered assignments are dropped.
    pub fn release_workers(&mut self, run_id: &str) -> Vec<WorkerRecord> {
        let freed: Vec<WorkerRecord> = self
            .workers()
            .filter(|w| w.run_id.as_deref() == Some(run_id))
            .map(|w| {
                let mut w = w.clone();
                w.run_id = None;
                if w.state == WorkerState::Busy {
                    w.state = WorkerState::Idle;
                }
                w
            })
            .collect();
        for w in &freed {
            self.pending.remove(&w.id);
        }
        freed
    }
}

/// Run counts per state, for sweep listings.
pub(super) fn count_states<'a>(runs: impl Iterator<Item = &'a RunRecord>) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for run in runs {
        *counts.entry(run.state().to_string()).or_insert(0) += 1;
    }
    counts
}
