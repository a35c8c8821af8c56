//! Placing queued runs: one scheduling pass over the model (see `scheduler` for the rules),
//! recorded as Assigned runs and Busy workers, with each rank's assignment queued for its
//! long-poll. Also the snapshot of workers a pass sees, which listings reuse outside the lock.

use std::sync::Arc;
use tokio::time::Instant;

use protocol::pb;

use super::model::Model;
use super::{Coordinator, Result};
use crate::records::*;
use crate::scheduler;

impl Coordinator {
    /// Places queued runs, by priority and then first in first out, each on a gang of
    /// `world_size` idle workers of one pool (see `scheduler`). Every placement is a new attempt
    /// of the run.
    pub async fn schedule(&self) -> Result<()> {
        let placed = {
            let mut m = self.lock();
            self.schedule_locked(&mut m)?
        };
        self.settle(
            &placed.iter().map(String::as_str).collect::<Vec<_>>(),
            !placed.is_empty(),
        )
        .await
    }

    /// One pass of the scheduler over the model; `explain` fills in why each queued run waits.
    /// Interrupted runs about to be resumed take part where they stand in the queue, holding
    /// their workers (see `scheduler::plan`).
    pub(super) fn plan(&self, m: &Model, explain: bool) -> scheduler::Plan {
        self.worker_pools(m).plan(m.queue_with_resuming(), explain)
    }

    /// The workers a scheduling pass sees: those alive, and those of them that may take work now
    /// (idle, heartbeating, not suspected).
    pub(super) fn worker_pools(&self, m: &Model) -> WorkerPools {
        let now = Instant::now();
        let stale_after = self.timing.stale_after();
        let fresh = |w: &WorkerRecord| {
            !m.suspects.contains(&w.id)
                && m.last_seen
                    .get(&w.id)
                    .is_some_and(|(t, _)| now.duration_since(*t) <= stale_after)
        };
        let alive: Vec<Arc<WorkerRecord>> = m
            .worker_handles()
            // A worker leaving on SIGTERM takes no new work, not even its own run's next attempt.
            .filter(|w| w.state != WorkerState::Dead && !m.suspects.contains(&w.id) && !w.leaving)
            .cloned()
            .collect();
        let idle = alive
            .iter()
            .filter(|w| w.state == WorkerState::Idle && fresh(w))
            .cloned()
            .collect();
        WorkerPools { idle, alive }
    }

    /// Records this pass's placements and queues their assignments; returns the runs placed.
    pub(super) fn schedule_locked(&self, m: &mut Model) -> Result<Vec<String>> {
        if m.shutting_down || m.going_away {
            return Ok(vec![]);
        }
        let plan = self.plan(m, false);
        let mut placed = vec![];
        for (run_id, gang) in plan.placements {
            let mut run = m.run(&run_id)?.clone();
            let resume = match run.resume_step {
                Some(step) => self.store.checkpoints(&run.id)?.into_iter().find(|c| c.step == step),
                None => None,
            };
            run.attempt += 1;
            run.workers = gang.clone();
            run.started_ranks.clear();
            run.finished.clear();
            let reserved: Vec<WorkerRecord> = gang
                .iter()
                .filter_map(|id| m.worker(id).cloned())
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
            let cause = Cause::at(
                run.resume_step.unwrap_or(0),
                format!("attempt {} on {} ({from})", run.attempt, run.workers.join(", ")),
            );
            run.transition(RunState::Assigned, cause)?;
            tracing::info!(run = %run.id, attempt = run.attempt, workers = ?run.workers, "run assigned ({from})");
            let peers: Vec<String> = reserved.iter().map(|w| w.peer_address.clone()).collect();
            let assignments: Vec<(String, pb::Assignment)> = reserved
                .iter()
                .enumerate()
                .map(|(rank, w)| {
                    let mut a = assignment(&run, rank as u32, &peers, resume.as_ref());
                    if let Some(l) = &survivor {
                        a.resume_from.clear();
                        a.resume_files.clear();
                        a.resume_step = l.step;
                        a.recover_from_peer = l.peer_address.clone();
                        a.recover_attempt = l.attempt;
                    }
                    (w.id.clone(), a)
                })
                .collect();
            m.put_transition(&self.store, run, &reserved, &[])?;
            m.pending.extend(assignments);
            placed.push(run_id);
        }
        Ok(placed)
    }
}

/// The workers of one scheduling pass: shared handles, so a pass can outlive the lock.
pub(super) struct WorkerPools {
    idle: Vec<Arc<WorkerRecord>>,
    alive: Vec<Arc<WorkerRecord>>,
}

impl WorkerPools {
    pub(super) fn plan<'a>(&'a self, queue: impl IntoIterator<Item = &'a RunRecord>, explain: bool) -> scheduler::Plan {
        let idle: Vec<&WorkerRecord> = self.idle.iter().map(|w| &**w).collect();
        let alive: Vec<&WorkerRecord> = self.alive.iter().map(|w| &**w).collect();
        scheduler::plan(queue, &idle, &alive, explain)
    }
}

fn assignment(run: &RunRecord, rank: u32, peers: &[String], resume: Option<&CheckpointRecord>) -> pb::Assignment {
    pb::Assignment {
        run_id: run.id.clone(),
        rank,
        world_size: run.world_size,
        peers: peers.to_vec(),
        spec_toml: run.spec_toml.clone(),
        manifest_id: run.manifest_id.clone(),
        train_count: run.train_count,
        eval_count: run.eval_count,
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
        quarantined: run.quarantined.clone(),
    }
}
