//! Workers joining, beating and taking their assignments: registration (a worker keeps its id
//! across reconnects), heartbeats (which carry stop and pause orders back), and the long-poll
//! that hands an assignment out and records that its rank started.

use std::time::Duration;

use protocol::pb;

use super::model::Model;
use super::{CoordError, Coordinator, Result};
use crate::records::*;

impl Coordinator {
    /// A worker that names an id this coordinator knows keeps it (a reconnect after a restart
    /// or a blip); a dead one is revived under the same id.
    pub async fn register(&self, req: pb::RegisterRequest) -> Result<WorkerRecord> {
        let worker = {
            let mut m = self.lock();
            let now = now_unix_ms();
            let known = match req.worker_id.as_str() {
                "" => None,
                id => m.worker(id).cloned(),
            };
            let worker = match known {
                Some(mut w) => {
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
                    w
                }
                None => WorkerRecord {
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
                },
            };
            m.put_worker(&self.store, worker.clone())?;
            m.seen(&worker.id);
            worker
        };
        self.store.durable().await?;
        self.schedule().await?;
        Ok(worker)
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
                Some(run) if still_ours && run.state.is_active() && run.attempt == req.attempt => {
                    resp.pause_run = run.pause_requested && run.workers.first() == Some(&worker.id);
                }
                Some(run) if run.attempt != req.attempt => {
                    resp.stop_run = true;
                    resp.stop_reason = format!(
                        "attempt {} of run {} is over (the run is on attempt {}, {})",
                        req.attempt, run.id, run.attempt, run.state
                    );
                }
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
        let mut events = vec![];
        if run.state == RunState::Assigned && run.started_ranks.len() == run.world_size as usize {
            run.state = RunState::Running;
            events.push(RunEvent::new(
                "running",
                run.resume_step.unwrap_or(0),
                format!("attempt {}: all {} ranks started", run.attempt, run.world_size),
            ));
        }
        run.updated_unix_ms = now_unix_ms();
        m.put_transition(&self.store, run, &[], &events)
    }

    /// The frozen case list an assignment names.
    pub fn manifest(&self, manifest_id: &str) -> Result<ManifestRecord> {
        self.store.manifest(manifest_id)?.ok_or_else(|| CoordError::NotFound {
            what: "manifest",
            id: manifest_id.into(),
        })
    }
}
