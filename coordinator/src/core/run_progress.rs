//! What ranks tell the coordinator while a run is under way: metrics and weight checksums,
//! checkpoint commits, the end of their work, and failures. Split from `mod.rs` to keep the
//! state machine's two halves (placing runs, following them) each readable on its own.

use protocol::pb;

use super::{CoordError, Coordinator, Result};
use crate::records::*;
use crate::verify;

impl Coordinator {
    /// Checks that `worker_id` holds `rank` of an active `run_id`. A stale or foreign report
    /// gets the run's end state back instead, so the worker stops.
    fn check_member(&self, run: &RunRecord, worker_id: &str, rank: u32) -> std::result::Result<(), String> {
        if !run.state.is_active() {
            return Err(format!("run {} is {}: {}", run.id, run.state, run.message));
        }
        if run.workers.get(rank as usize).map(String::as_str) != Some(worker_id) {
            return Err(format!(
                "worker {worker_id} does not hold rank {rank} of run {}",
                run.id
            ));
        }
        Ok(())
    }

    pub async fn report_metrics(&self, req: pb::ReportMetricsRequest) -> Result<pb::ReportMetricsResponse> {
        let mut live = self.live.lock().await;
        let mut run = self.run_or_not_found(&req.run_id)?;
        if let Err(reason) = self.check_member(&run, &req.worker_id, req.rank) {
            return Ok(pb::ReportMetricsResponse {
                stop_run: true,
                stop_reason: reason,
            });
        }
        let points: Vec<MetricRecord> = req
            .metrics
            .iter()
            .map(|m| MetricRecord {
                rank: req.rank,
                step: m.step,
                name: m.name.clone(),
                value: m.value,
                unix_ms: m.unix_ms,
            })
            .collect();
        self.store.append_metrics(&run.id, &points).await?;
        let newest = points.iter().map(|p| p.step).max().unwrap_or(0);
        if newest > run.step {
            run.step = newest;
            run.updated_unix_ms = now_unix_ms();
            self.store.put_run(&run).await?;
        }
        for c in &req.checksums {
            let all = self.store.put_checksum(&run.id, c.step, req.rank, &c.sha256).await?;
            if let Some(reason) = divergence(&all, run.world_size, c.step) {
                self.end_run(&mut live, run, RunState::Failed, reason.clone()).await?;
                drop(live);
                self.schedule().await?;
                return Ok(pb::ReportMetricsResponse {
                    stop_run: true,
                    stop_reason: reason,
                });
            }
        }
        self.bump_progress();
        Ok(pb::ReportMetricsResponse::default())
    }

    /// Verifies every file of the checkpoint in the object store against its hash, then commits
    /// it. Only rank 0 writes checkpoints.
    pub async fn commit_checkpoint(&self, req: pb::CommitCheckpointRequest) -> Result<CheckpointRecord> {
        let run = self.run_or_not_found(&req.run_id)?;
        self.check_member(&run, &req.worker_id, 0)
            .map_err(CoordError::Rejected)?;
        let prefix = verify::checkpoint_prefix(&run.id, req.step);
        let files = verify::verify_files(&run.artifacts_url, &prefix, &req.files).await?;
        let _transition = self.live.lock().await;
        let mut run = self.run_or_not_found(&req.run_id)?;
        self.check_member(&run, &req.worker_id, 0)
            .map_err(CoordError::Rejected)?;
        let record = CheckpointRecord {
            run_id: run.id.clone(),
            step: req.step,
            prefix,
            files,
            is_final: req.is_final,
            committed_unix_ms: now_unix_ms(),
        };
        self.store.put_checkpoint(&record).await?;
        if req.is_final {
            run.final_checkpoint = Some(req.step);
            run.updated_unix_ms = now_unix_ms();
            self.store.put_run(&run).await?;
        }
        self.bump_progress();
        Ok(record)
    }

    pub async fn finish_run(&self, req: pb::FinishRunRequest) -> Result<()> {
        let mut live = self.live.lock().await;
        let mut run = self.run_or_not_found(&req.run_id)?;
        self.check_member(&run, &req.worker_id, req.rank)
            .map_err(CoordError::Rejected)?;
        run.finished.insert(
            req.rank,
            FinishedRank {
                final_step: req.final_step,
                weights_sha256: req.weights_sha256,
            },
        );
        if run.finished.len() < run.world_size as usize {
            run.updated_unix_ms = now_unix_ms();
            self.store.put_run(&run).await?;
            return Ok(());
        }
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
        self.end_run(&mut live, run, state, message).await?;
        drop(live);
        self.schedule().await
    }

    pub async fn report_failure(&self, req: pb::ReportFailureRequest) -> Result<()> {
        let mut live = self.live.lock().await;
        let run = self.run_or_not_found(&req.run_id)?;
        if self.check_member(&run, &req.worker_id, req.rank).is_err() {
            return Ok(()); // the run already ended; a late report changes nothing
        }
        let (state, message) = if req.peer_lost {
            (
                RunState::Interrupted,
                format!(
                    "rank {} ({}) lost a ring peer: {}",
                    req.rank, req.worker_id, req.message
                ),
            )
        } else {
            (
                RunState::Failed,
                format!("rank {} ({}) failed: {}", req.rank, req.worker_id, req.message),
            )
        };
        self.end_run(&mut live, run, state, message).await?;
        drop(live);
        self.schedule().await
    }
}

/// A failure message when the ranks that reported a checksum for `step` disagree. Silent until
/// every rank has reported.
fn divergence(checksums: &[(u32, String)], world_size: u32, step: u64) -> Option<String> {
    if checksums.len() < world_size as usize {
        return None;
    }
    let first = &checksums[0].1;
    if checksums.iter().all(|(_, c)| c == first) {
        return None;
    }
    let listing: Vec<String> = checksums
        .iter()
        .map(|(r, c)| format!("rank {r}: {}", &c[..c.len().min(16)]))
        .collect();
    Some(format!(
        "weights diverged across ranks at step {step} ({})",
        listing.join(", ")
    ))
}
