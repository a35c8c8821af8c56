//! Workers joining, beating, taking their assignments and leaving: registration (a worker keeps
//! its id across reconnects, and proves it holds it), heartbeats (which carry stop and pause
//! orders back), the long-poll that hands an assignment out and records that its rank started,
//! and deregistration on SIGTERM, which drains the worker's run into the queue.
//!
//! An id that is alive belongs to the process holding it. Its first registration gets a random
//! secret back, of which the store keeps only the SHA-256 (it survives a coordinator restart, so
//! workers reattach as before); re-registering or deregistering under the id takes the secret.

use std::time::Duration;

use protocol::pb;
use sha2::{Digest, Sha256};

use super::model::Model;
use super::{CoordError, Coordinator, Ending, Result};
use crate::records::*;

/// A registered worker and the secret it proves its id with from now on.
pub struct Admitted {
    pub worker: WorkerRecord,
    pub secret: String,
}

/// What a caller naming a known worker id showed.
#[derive(Debug, PartialEq)]
enum Proof {
    /// The secret matches the record's.
    Holds,
    /// The record predates secrets: accepted once, and the worker is issued one.
    Legacy,
    /// No secret, or another one.
    Wrong,
}

fn proof(worker: &WorkerRecord, secret: &str) -> Proof {
    if worker.secret_sha256.is_empty() {
        Proof::Legacy
    } else if !secret.is_empty() && digest(secret) == worker.secret_sha256 {
        // Comparing digests, not secrets: what a timing difference could reveal is a prefix of
        // the hash of the caller's own guess, which says nothing about the secret.
        Proof::Holds
    } else {
        Proof::Wrong
    }
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// 128 random bits as 32 hex characters, from the thread's CSPRNG.
fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Whether a worker of `run` is leaving on SIGTERM: rank 0 then checkpoints at its next step
/// boundary, as for a pause.
pub(super) fn draining(m: &Model, run: &RunRecord) -> bool {
    run.workers.iter().any(|id| m.worker(id).is_some_and(|w| w.leaving))
}

/// The writes that put a draining run back in the queue at the checkpoint rank 0 just wrote at
/// `step` (committed in the same write): no retry is spent, since nothing failed, and the
/// leaving workers stay out of its next gang. None when no worker of the run is leaving.
pub(super) fn drained(m: &mut Model, run: &RunRecord, step: u64) -> Result<Option<Ending>> {
    if !draining(m, run) || run.state() != RunState::Running {
        return Ok(None);
    }
    let leaving: Vec<String> = run
        .workers
        .iter()
        .filter(|id| m.worker(id).is_some_and(|w| w.leaving))
        .cloned()
        .collect();
    let message = format!(
        "back in the queue from the checkpoint at step {step}: {} left on SIGTERM (no retry spent)",
        leaving.join(", ")
    );
    tracing::info!(run = %run.id, "{message}");
    let mut run = run.clone();
    run.transition(RunState::Queued, Cause::at(step, message.clone()))?;
    run.resume_step = Some(step);
    run.message = message;
    run.workers.clear();
    run.started_ranks.clear();
    run.live_state = None;
    run.recovering_live = false;
    let freed = m.release_workers(&run.id);
    Ok(Some(Ending { run, freed }))
}

impl Coordinator {
    /// As `admit`, without the secret (for callers inside the coordinator and its tests).
    pub async fn register(&self, req: pb::RegisterRequest) -> Result<WorkerRecord> {
        Ok(self.admit(req).await?.worker)
    }

    /// A worker that names an id this coordinator knows, with that id's secret, keeps it (a
    /// reconnect after a restart or a blip); a dead one is revived under the same id. Without
    /// the secret, a live id is refused and a dead one is not revived: the caller gets a fresh
    /// id, as a process that never had one would (the dead id's process may still hold state a
    /// run recovers from, so it must not be handed to another).
    pub async fn admit(&self, req: pb::RegisterRequest) -> Result<Admitted> {
        let admitted = {
            let mut m = self.lock();
            let now = now_unix_ms();
            let known = match req.worker_id.as_str() {
                "" => None,
                id => m.worker(id).cloned(),
            };
            let known = match known.map(|w| (proof(&w, &req.worker_secret), w)) {
                Some((Proof::Wrong, w)) if w.state != WorkerState::Dead => {
                    tracing::warn!(worker = %w.id, peer = %req.peer_address, "refused a registration under a live worker's id without its secret");
                    return Err(CoordError::Denied(format!(
                        "worker id {} belongs to a live worker ({}, peer {}); registering under it takes the \
                         worker_secret the coordinator gave that worker at its first registration. Leave \
                         worker_id empty to register as a new worker",
                        w.id, w.state, w.peer_address
                    )));
                }
                Some((Proof::Wrong, w)) => {
                    tracing::warn!(worker = %w.id, "a registration named a dead worker's id without its secret; giving it a fresh id");
                    None
                }
                known => known,
            };
            let (worker, secret) = match known {
                Some((proof, mut w)) => {
                    tracing::info!(worker = %w.id, was = %w.state, "worker reattached under its id");
                    w.host = req.host;
                    w.peer_address = req.peer_address;
                    w.device_kind = req.device_kind;
                    w.device_memory_bytes = req.device_memory_bytes;
                    w.numeric_fingerprint = req.numeric_fingerprint;
                    w.last_heartbeat_unix_ms = now;
                    if w.state == WorkerState::Dead {
                        w.state = WorkerState::Idle;
                        w.run_id = None;
                    }
                    let secret = if proof == Proof::Holds {
                        req.worker_secret
                    } else {
                        let secret = new_secret();
                        w.secret_sha256 = digest(&secret);
                        secret
                    };
                    (w, secret)
                }
                None => {
                    let secret = new_secret();
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
                        numeric_fingerprint: req.numeric_fingerprint,
                        secret_sha256: digest(&secret),
                        leaving: false,
                    };
                    (worker, secret)
                }
            };
            m.put_worker(&self.store, worker.clone())?;
            m.seen(&worker.id);
            Admitted { worker, secret }
        };
        self.store.durable().await?;
        self.schedule().await?;
        Ok(admitted)
    }

    /// A worker going away (SIGTERM). Idle, it is forgotten at once, so it is offered no more
    /// work. Training the run it names, it is marked leaving and the run drains: rank 0
    /// checkpoints at its next step boundary and the commit puts the run back in the queue (see
    /// `drained`); the answer is then true, and the worker deregisters again once stopped. A
    /// worker the coordinator has on a run it does not name gives that run up: an attempt not
    /// yet running goes back to the queue at no cost, a running one is interrupted.
    pub async fn deregister(&self, req: pb::DeregisterRequest) -> Result<bool> {
        let (touched, draining) = {
            let mut m = self.lock();
            let Some(mut worker) = m.worker(&req.worker_id).cloned() else {
                // Forgotten already (a repeated deregistration): nothing left to do.
                return Ok(false);
            };
            if proof(&worker, &req.worker_secret) == Proof::Wrong {
                return Err(CoordError::Denied(format!(
                    "worker {}: deregistering takes the worker_secret the coordinator gave it at registration",
                    worker.id
                )));
            }
            let reason = if req.reason.is_empty() {
                "deregistered"
            } else {
                req.reason.as_str()
            };
            let held = worker
                .run_id
                .as_ref()
                .and_then(|id| m.run(id).ok().cloned())
                .filter(|r| r.state().is_active());
            match held {
                Some(run) if run.id == req.run_id && run.attempt == req.attempt && run.state() == RunState::Running => {
                    if !worker.leaving {
                        let rank = run.workers.iter().position(|w| *w == worker.id).unwrap_or(0);
                        let message = format!(
                            "worker {} (rank {rank}) is leaving ({reason}): rank 0 checkpoints at the next step \
                             boundary, then the run goes back to the queue without spending a retry",
                            worker.id
                        );
                        tracing::info!(run = %run.id, "{message}");
                        worker.leaving = true;
                        let event = RunEvent::new("leaving", run.step, message);
                        m.put_transition(&self.store, run.clone(), &[worker], &[event])?;
                    }
                    (vec![run.id], true)
                }
                Some(run) => {
                    let run_id = run.id.clone();
                    let rank = run.workers.iter().position(|w| *w == worker.id).unwrap_or(0);
                    if run.state() == RunState::Assigned {
                        let message = format!(
                            "worker {} left ({reason}) before attempt {} started; back in the queue",
                            worker.id, run.attempt
                        );
                        let freed = m.release_workers(&run.id);
                        let from = run.resume_step;
                        self.requeue(&mut m, run, from, message, &freed)?;
                    } else {
                        let message = format!("worker {} left ({reason}) while holding rank {rank}", worker.id);
                        self.end_run(&mut m, run, RunState::Interrupted, message)?;
                    }
                    tracing::info!(worker = %worker.id, %reason, "worker deregistered; forgetting it");
                    m.forget_worker(&self.store, &worker.id)?;
                    (vec![run_id], false)
                }
                None => {
                    tracing::info!(worker = %worker.id, %reason, "worker deregistered; forgetting it");
                    m.forget_worker(&self.store, &worker.id)?;
                    (vec![], false)
                }
            }
        };
        self.settle(&touched.iter().map(String::as_str).collect::<Vec<_>>(), false)
            .await?;
        self.schedule().await?;
        Ok(draining)
    }

    /// Answers from memory alone: a heartbeat writes nothing and reads nothing from the store.
    pub fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        let mut m = self.lock();
        let Some(worker) = m
            .worker(&req.worker_id)
            .filter(|w| w.state != WorkerState::Dead)
            .cloned()
        else {
            // Whatever run it thinks it is on was interrupted when it was declared dead.
            return Ok(pb::HeartbeatResponse {
                reregister: true,
                stop_run: !req.run_id.is_empty(),
                stop_reason: format!("the coordinator no longer counts worker {} as alive", req.worker_id),
                ..Default::default()
            });
        };
        m.seen(&worker.id);
        let mut resp = pb::HeartbeatResponse {
            shutdown: m.shutting_down,
            coordinator_going_away: m.going_away,
            ..Default::default()
        };
        if !req.run_id.is_empty() {
            let still_ours = worker.run_id.as_deref() == Some(req.run_id.as_str());
            match m.run(&req.run_id).ok() {
                Some(run) if still_ours && run.state().is_active() && run.attempt == req.attempt => {
                    resp.pause_run =
                        (run.pause_requested || draining(&m, run)) && run.workers.first() == Some(&worker.id);
                }
                Some(run) if run.attempt != req.attempt => {
                    resp.stop_run = true;
                    resp.stop_reason = format!(
                        "attempt {} of run {} is over (the run is on attempt {}, {})",
                        req.attempt,
                        run.id,
                        run.attempt,
                        run.state()
                    );
                }
                Some(run) => {
                    resp.stop_run = true;
                    resp.stop_reason = format!("run {} is {}: {}", run.id, run.state(), run.message);
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
            let outcome = {
                let mut m = self.lock();
                if !m.worker(worker_id).is_some_and(|w| w.state != WorkerState::Dead) {
                    return Err(CoordError::NotFound {
                        what: "worker (register again)",
                        id: worker_id.into(),
                    });
                }
                m.seen(worker_id);
                if let Some(assignment) = m.pending.remove(worker_id) {
                    self.mark_started(&mut m, &assignment)?;
                    Some(Outcome::Assignment(assignment))
                } else if m.shutting_down {
                    let reason = "coordinator is shutting down".to_string();
                    Some(Outcome::Shutdown(pb::Shutdown { reason }))
                } else {
                    None
                }
            };
            if let Some(outcome) = outcome {
                // The assignment was recorded before it was queued; this flush also covers the
                // rank's start, written just now.
                if let Outcome::Assignment(a) = &outcome {
                    self.settle(&[a.run_id.as_str()], false).await?;
                }
                return Ok(pb::AwaitAssignmentResponse { outcome: Some(outcome) });
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(pb::AwaitAssignmentResponse {
                    outcome: Some(Outcome::Idle(pb::Idle {})),
                });
            }
        }
    }

    fn mark_started(&self, m: &mut Model, assignment: &pb::Assignment) -> Result<()> {
        let mut run = m.run(&assignment.run_id)?.clone();
        if !run.started_ranks.contains(&assignment.rank) {
            run.started_ranks.push(assignment.rank);
        }
        run.updated_unix_ms = now_unix_ms();
        if run.state() == RunState::Assigned && run.started_ranks.len() == run.world_size as usize {
            let cause = Cause::at(
                run.resume_step.unwrap_or(0),
                format!("attempt {}: all {} ranks started", run.attempt, run.world_size),
            );
            run.transition(RunState::Running, cause)?;
        }
        m.put_transition(&self.store, run, &[], &[])
    }

    /// The frozen case list an assignment names.
    pub fn manifest(&self, manifest_id: &str) -> Result<ManifestRecord> {
        self.store.manifest(manifest_id)?.ok_or_else(|| CoordError::NotFound {
            what: "manifest",
            id: manifest_id.into(),
        })
    }
}

#[cfg(test)]
pub(super) mod tests;
