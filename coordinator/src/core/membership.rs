//! Workers joining, beating and taking their assignments: registration (a worker keeps its id
//! across reconnects), heartbeats (which carry stop and pause orders back), and the long-poll
//! that hands an assignment out and records that its rank started.

use std::time::Duration;

use protocol::pb;

use super::{CoordError, Coordinator, Result};
use crate::records::*;

impl Coordinator {
    /// A worker that names an id this coordinator knows and has not declared dead keeps it (a
    /// reconnect after a restart or a blip); a dead one is revived under the same id.
    pub async fn register(&self, req: pb::RegisterRequest) -> Result<WorkerRecord> {
        let mut live = self.live.lock().await;
        let now = now_unix_ms();
        let known = match req.worker_id.as_str() {
            "" => None,
            id => self.store.worker(id)?,
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
        self.store.put_worker(&worker).await?;
        live.seen(&worker.id);
        drop(live);
        self.schedule().await?;
        Ok(worker)
    }

    pub async fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        let mut live = self.live.lock().await;
        let known = self.store.worker(&req.worker_id)?;
        let Some(worker) = known.filter(|w| w.state != WorkerState::Dead) else {
            // Whatever run it thinks it is on was interrupted when it was declared dead.
            return Ok(pb::HeartbeatResponse {
                reregister: true,
                stop_run: !req.run_id.is_empty(),
                stop_reason: format!("the coordinator no longer counts worker {} as alive", req.worker_id),
                ..Default::default()
            });
        };
        live.seen(&worker.id);
        let mut resp = pb::HeartbeatResponse {
            shutdown: live.shutting_down,
            coordinator_going_away: live.going_away,
            ..Default::default()
        };
        if !req.run_id.is_empty() {
            let still_ours = worker.run_id.as_deref() == Some(req.run_id.as_str());
            match self.store.run(&req.run_id)? {
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
                live.seen(worker_id);
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
        self.store.put_transition(&run, &[], &events).await?;
        self.bump_progress();
        Ok(())
    }
}
