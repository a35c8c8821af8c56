//! What ranks tell the coordinator while a run is under way: metrics and weight checksums,
//! checkpoint commits, the end of their work, and failures. Split from `mod.rs` to keep the
//! state machine's two halves (placing runs, following them) each readable on its own.
//!
//! Every report names the attempt it belongs to; one from an older placement of the run is
//! stale and gets a stop order back instead of being recorded.

use protocol::pb;

use super::model::Model;
use super::{CoordError, Coordinator, Result, ending};
use crate::records::*;
use crate::store::{ChecksumReport, PreparedReport, Recorded};
use crate::verify;

impl Coordinator {
    /// Checks that `worker_id` holds `rank` of the current attempt of an active run. A stale or
    /// foreign report gets the reason back, so the worker stops.
    pub(super) fn check_member(
        &self,
        run: &RunRecord,
        worker_id: &str,
        rank: u32,
        attempt: u32,
    ) -> std::result::Result<(), String> {
        if !run.state().is_active() {
            return Err(format!("run {} is {}: {}", run.id, run.state(), run.message));
        }
        if run.attempt != attempt {
            return Err(format!(
                "attempt {attempt} of run {} is over; the run is on attempt {}",
                run.id, run.attempt
            ));
        }
        if run.workers.get(rank as usize).map(String::as_str) != Some(worker_id) {
            return Err(format!(
                "worker {worker_id} does not hold rank {rank} of run {}",
                run.id
            ));
        }
        Ok(())
    }

    /// Stores the points, the checksums and the run's progress in one write, then fails the run
    /// if the ranks' weights diverged. The write touches only report trees (metrics, latest
    /// values, checksums, progress), never the run record, so it is made outside the model lock,
    /// by the store's report writer, batched with other ranks' reports into one transaction and
    /// one flush: a thousand ranks reporting do not hold up heartbeats and placements.
    pub async fn report_metrics(&self, req: pb::ReportMetricsRequest) -> Result<pb::ReportMetricsResponse> {
        let stop = |reason: String| pb::ReportMetricsResponse {
            stop_run: true,
            stop_reason: reason,
            ..Default::default()
        };
        let (stopped, world_size) = {
            let m = self.lock();
            let run = m.run(&req.run_id)?;
            let stopped = self.check_member(run, &req.worker_id, req.rank, req.attempt).err();
            // A rank of the attempt that just ended (paused, interrupted) may still be
            // delivering the steps it completed: those happened, so they are recorded, and the
            // rank is told to stop. Reports from anyone else, or an older attempt, are not.
            let late_but_ours = run.attempt == req.attempt
                && run.workers.get(req.rank as usize) == Some(&req.worker_id)
                && !run.state().is_active()
                && run.state() != RunState::Queued;
            match stopped {
                Some(reason) if !late_but_ours => return Ok(stop(reason)),
                stopped => (stopped, run.world_size),
            }
        };
        let points: Vec<MetricRecord> = req
            .metrics
            .iter()
            .map(|p| MetricRecord {
                rank: req.rank,
                step: p.step,
                name: p.name.clone(),
                value: p.value,
                unix_ms: p.unix_ms,
            })
            .collect();
        let checksums: Vec<ChecksumReport> = req
            .checksums
            .iter()
            .map(|c| ChecksumReport {
                step: c.step,
                rank: req.rank,
                attempt: req.attempt,
                sha256: c.sha256.clone(),
            })
            .collect();
        let newest = points.iter().map(|p| p.step).max().filter(|_| stopped.is_none());
        let report = PreparedReport::new(&req.run_id, newest, &points, checksums, world_size);
        let Recorded { known, .. } = self.store.record_report(report).await?;
        let (resp, ended) = {
            let mut m = self.lock();
            if let Some(step) = newest {
                m.note_step(&req.run_id, step, now_unix_ms());
            }
            let run = m.run(&req.run_id)?.clone();
            let diverged = known.iter().find_map(|(step, all)| divergence(all, world_size, *step));
            match (stopped, diverged) {
                (Some(reason), _) => (stop(reason), false),
                // The run may have ended meanwhile; only the attempt that diverged is failed.
                (None, Some(reason)) if run.state().is_active() && run.attempt == req.attempt => {
                    self.end_run(&mut m, run, RunState::Failed, reason.clone())?;
                    (stop(reason), true)
                }
                (None, Some(reason)) => (stop(reason), false),
                (None, None) => (
                    pb::ReportMetricsResponse {
                        pause_run: (run.pause_requested || super::membership::draining(&m, &run)) && req.rank == 0,
                        ..Default::default()
                    },
                    false,
                ),
            }
        };
        self.settle(&[req.run_id.as_str()], false).await?;
        if ended {
            self.schedule().await?;
        }
        Ok(resp)
    }

    /// Verifies every file of the checkpoint in the object store against its hash, then commits
    /// it. Only rank 0 writes checkpoints. A commit while a pause is requested pauses the run.
    pub async fn commit_checkpoint(&self, req: pb::CommitCheckpointRequest) -> Result<pb::CommitCheckpointResponse> {
        let run = self.get_run(&req.run_id)?;
        self.check_member(&run, &req.worker_id, 0, req.attempt)
            .map_err(CoordError::Rejected)?;
        let prefix = verify::checkpoint_prefix(&run.id, req.step, req.attempt);
        let files = verify::verify_files(&run.artifacts_url, &prefix, &req.files).await?;
        let (resp, replaced, run_artifacts) = {
            let mut m = self.lock();
            let mut run = m.run(&req.run_id)?.clone();
            self.check_member(&run, &req.worker_id, 0, req.attempt)
                .map_err(CoordError::Rejected)?;
            let run_artifacts = run.artifacts_url.clone();
            let record = CheckpointRecord {
                run_id: run.id.clone(),
                step: req.step,
                prefix,
                files,
                is_final: req.is_final,
                committed_unix_ms: now_unix_ms(),
                attempt: req.attempt,
                unusable: None,
                eval_dice: req.has_eval_dice.then_some(req.eval_dice),
                weights_sha256: (!req.weights_sha256.is_empty()).then(|| req.weights_sha256.clone()),
            };
            if req.is_final {
                run.final_checkpoint = Some(req.step);
            }
            // Metrics may trail the checkpoint (they are batched): a run paused at this step
            // shows this step, not the last one reported.
            run.step = run.step.max(req.step);
            run.updated_unix_ms = now_unix_ms();
            let kind = if req.is_final { "final checkpoint" } else { "checkpoint" };
            let mut events = vec![RunEvent::new(
                "checkpoint",
                req.step,
                format!("{kind} committed at {}", record.prefix),
            )];
            let mut existing = self.store.checkpoints(&run.id)?;
            // A resumed attempt that re-reaches a step replaces the older attempt's record
            // there; that record's objects are deleted once the new one is committed.
            let replaced = existing
                .iter()
                .find(|c| c.step == req.step && c.prefix != record.prefix)
                .cloned();
            // The commit that takes the lead by held-out Dice says so in the run's record.
            if let Some(dice) = record.eval_dice {
                existing.retain(|c| c.step != req.step);
                existing.push(record.clone());
                existing.sort_by_key(|c| c.step);
                if super::best_checkpoint(&existing) == Some(req.step) {
                    events.push(RunEvent::new(
                        "best-checkpoint",
                        req.step,
                        format!("best checkpoint so far by held-out mean Dice ({dice:.4})"),
                    ));
                }
            }
            if let Some(old) = &replaced {
                events.push(RunEvent::new(
                    "checkpoint-replaced",
                    req.step,
                    format!("replaces {} (attempt {})", old.prefix, old.attempt),
                ));
            }
            // A commit while a pause is requested pauses the run, in the same write.
            let mut resp = pb::CommitCheckpointResponse::default();
            let mut freed = vec![];
            if run.pause_requested && !req.is_final && run.state() == RunState::Running {
                let message = format!("paused at step {} on request", req.step);
                run.resume_step = Some(req.step);
                let ending = ending(&mut m, run, RunState::Paused, message.clone())?;
                (run, freed) = (ending.run, ending.freed);
                resp = pb::CommitCheckpointResponse {
                    stop_run: true,
                    stop_reason: message,
                };
            } else if !req.is_final
                && let Some(drained) = super::membership::drained(&mut m, &run, req.step)?
            {
                // A worker of the run is leaving on SIGTERM: this checkpoint is where it resumes.
                resp.stop_run = true;
                resp.stop_reason = drained.run.message.clone();
                (run, freed) = (drained.run, drained.freed);
            }
            m.put_checkpoint(&self.store, &record, run, &freed, &events)?;
            (resp, replaced, run_artifacts)
        };
        self.settle(&[req.run_id.as_str()], false).await?;
        if let Some(old) = replaced
            && let Err(e) = verify::delete_checkpoint_objects(&run_artifacts, &old).await
        {
            tracing::warn!(run = %req.run_id, "could not delete the replaced checkpoint's objects: {e}");
        }
        if let Err(e) = self.collect_garbage(&req.run_id).await {
            tracing::warn!(run = %req.run_id, "checkpoint garbage collection failed: {e}");
        }
        if resp.stop_run {
            self.schedule().await?;
        }
        Ok(resp)
    }

    pub async fn finish_run(&self, req: pb::FinishRunRequest) -> Result<()> {
        let ended = {
            let mut m = self.lock();
            let mut run = m.run(&req.run_id)?.clone();
            self.check_member(&run, &req.worker_id, req.rank, req.attempt)
                .map_err(CoordError::Rejected)?;
            run.finished.insert(
                req.rank,
                FinishedRank {
                    final_step: req.final_step,
                    weights_sha256: req.weights_sha256.clone(),
                },
            );
            if run.finished.len() < run.world_size as usize {
                run.updated_unix_ms = now_unix_ms();
                m.put_transition(&self.store, run, &[], &[])?;
                false
            } else {
                let checksums: Vec<(u32, String)> = run
                    .finished
                    .iter()
                    .map(|(r, f)| (*r, f.weights_sha256.clone()))
                    .collect();
                let (state, message) = if let Some(reason) = divergence(&checksums, run.world_size, req.final_step) {
                    (RunState::Failed, reason)
                } else if run.final_checkpoint.is_none() {
                    (
                        RunState::Failed,
                        "all ranks finished but no final checkpoint was committed".to_string(),
                    )
                } else {
                    (RunState::Completed, String::new())
                };
                run.step = run.step.max(req.final_step);
                self.end_run(&mut m, run, state, message)?;
                true
            }
        };
        self.settle(&[req.run_id.as_str()], false).await?;
        if ended {
            self.schedule().await?;
        }
        Ok(())
    }

    /// A rank gave up. A lost peer or a coordinator that stayed away interrupts the run (it is
    /// resumable); a checkpoint that would not load is marked unusable and interrupts it too, so
    /// the resume takes an older one; anything else fails it.
    pub async fn report_failure(&self, req: pb::ReportFailureRequest) -> Result<()> {
        let ended = {
            let mut m = self.lock();
            self.record_failure(&mut m, &req)?
        };
        self.settle(&[req.run_id.as_str()], false).await?;
        if ended {
            self.schedule().await?;
        }
        Ok(())
    }

    fn record_failure(&self, m: &mut Model, req: &pb::ReportFailureRequest) -> Result<bool> {
        let mut run = m.run(&req.run_id)?.clone();
        if req.holds_state {
            self.note_live_state(m, &mut run, req)?;
        }
        if self.check_member(&run, &req.worker_id, req.rank, req.attempt).is_err() {
            return Ok(false); // that attempt already ended; a late report changes nothing
        }
        if req.names_lost_rank
            && let Some(lost) = run.workers.get(req.lost_rank as usize)
            && *lost != req.worker_id
        {
            m.suspects.insert(lost.clone());
        }
        let who = format!("rank {} ({})", req.rank, req.worker_id);
        let (state, message) = if req.checkpoint_unusable {
            if run.recovering_live {
                // The survivor's state could not be had: fall back to checkpoints.
                run.live_state = None;
                run.recovering_live = false;
            } else if let Some(step) = run.resume_step {
                self.mark_unusable(&run.id, step, &req.message)?;
            }
            (
                RunState::Interrupted,
                format!("{who} could not load its checkpoint: {}", req.message),
            )
        } else if req.peer_lost {
            (
                RunState::Interrupted,
                format!("{who} lost a ring peer: {}", req.message),
            )
        } else if req.coordinator_lost {
            (
                RunState::Interrupted,
                format!("{who} gave the run up while the coordinator was away: {}", req.message),
            )
        } else {
            (RunState::Failed, format!("{who} failed: {}", req.message))
        };
        self.end_run(m, run, state, message)?;
        Ok(true)
    }

    /// Remembers the newest state a rank of the current attempt kept when its ring broke; the
    /// automatic resume starts from it when it is newer than the last checkpoint. Reports that
    /// arrive after the run was interrupted still count: every survivor holds a state.
    fn note_live_state(&self, m: &mut Model, run: &mut RunRecord, req: &pb::ReportFailureRequest) -> Result<()> {
        let ours = run.attempt == req.attempt
            && (run.state().is_active() || run.state() == RunState::Interrupted)
            && run.workers.get(req.rank as usize) == Some(&req.worker_id);
        let newer = run
            .live_state
            .as_ref()
            .is_none_or(|l| l.attempt < req.attempt || l.step < req.held_step);
        let Some(worker) = m.worker(&req.worker_id).cloned() else {
            return Ok(());
        };
        if ours && newer {
            run.live_state = Some(LiveState {
                worker_id: worker.id,
                peer_address: worker.peer_address,
                attempt: req.attempt,
                step: req.held_step,
            });
            m.put_transition(&self.store, run.clone(), &[], &[])?;
        }
        Ok(())
    }
}

/// A failure message when the ranks that reported a checksum for `step` disagree. Silent until
/// every rank has reported.
fn divergence(checksums: &[(u32, String)], world_size: u32, step: u64) -> Option<String> {
    if checksums.len() < world_size as usize {
        return None;
    }
    let (_, first) = checksums.first()?;
    if checksums.iter().all(|(_, c)| c == first) {
        return None;
    }
    let listing: Vec<String> = checksums
        .iter()
        .map(|(r, c)| format!("rank {r}: {}", c.chars().take(16).collect::<String>()))
        .collect();
    Some(format!(
        "weights diverged across ranks at step {step} ({})",
        listing.join(", ")
    ))
}
