//! Bringing runs back: pause on request, automatic resume of interrupted runs within their retry
//! budget, manual resume (at the same or another world size), the choice of the checkpoint a
//! resume starts from, and garbage collection of old checkpoints.
//!
//! A checkpoint is only ever resumed from after its objects have been read back and matched
//! against their committed hashes; one that fails is marked unusable, with an event saying why,
//! and the newest good one before it is taken instead.

use protocol::spec::RunSpec;

use super::model::Model;
use super::{CoordError, Coordinator, Result};
use crate::records::*;
use crate::verify;

impl Coordinator {
    /// A queued run pauses at once. A running one has rank 0 write a checkpoint at its next step
    /// boundary; committing it pauses the run and releases the workers.
    pub async fn pause(&self, run_id: &str) -> Result<RunRecord> {
        let run = {
            let mut m = self.lock();
            let mut run = m.run(run_id)?.clone();
            match run.state() {
                RunState::Queued => {
                    self.end_run(&mut m, run, RunState::Paused, "paused before it started".into())?;
                }
                RunState::Assigned | RunState::Running if !run.pause_requested => {
                    run.pause_requested = true;
                    run.updated_unix_ms = now_unix_ms();
                    let event = RunEvent::new(
                        "pause-requested",
                        run.step,
                        "rank 0 checkpoints at the next step boundary, then the run pauses",
                    );
                    m.put_transition(&self.store, run, &[], &[event])?;
                }
                RunState::Assigned | RunState::Running => {}
                state => {
                    return Err(CoordError::Rejected(format!(
                        "run {run_id} is {state}; only queued or running runs can be paused"
                    )));
                }
            }
            m.run(run_id)?.clone()
        };
        self.settle(&[run_id], false).await?;
        Ok(run)
    }

    /// Queues a Paused, Interrupted, Failed or Cancelled run again from its newest checkpoint
    /// that verifies, optionally at another world size. The retry budget starts over. A run that
    /// has trained but has no such checkpoint is refused, whatever its state, unless
    /// `from_scratch` says to throw its steps away.
    pub async fn resume(&self, run_id: &str, world_size: Option<u32>, from_scratch: bool) -> Result<RunRecord> {
        let run = self.get_run(run_id)?;
        if !run.state().is_resumable() {
            return Err(CoordError::Rejected(format!(
                "run {run_id} is {}; only Paused, Interrupted, Failed or Cancelled runs can be resumed",
                run.state()
            )));
        }
        let world = world_size.unwrap_or(run.world_size);
        check_world_size(&run, world)?;
        let checkpoint = self.choose_checkpoint(&run).await?;
        if checkpoint.is_none() && run.step > 0 && !from_scratch {
            return Err(CoordError::Rejected(format!(
                "run {run_id} reached step {} but has no committed checkpoint that verifies (see \
                 `coordinator checkpoints {run_id}`); resuming would start it over from step 0. \
                 Pass --from-scratch to do that, or submit its spec again",
                run.step
            )));
        }
        let run = {
            let mut m = self.lock();
            let mut run = m.run(run_id)?.clone();
            if !run.state().is_resumable() {
                return Err(CoordError::Rejected(format!(
                    "run {run_id} became {} meanwhile",
                    run.state()
                )));
            }
            let from = checkpoint.as_ref().map(|c| c.step);
            let message = format!(
                "resumed by the user at world size {world} (was {}) from {}",
                run.world_size,
                describe_start(from)
            );
            run.world_size = world;
            run.reset_retry_budget();
            run.live_state = None;
            run.recovering_live = false;
            self.requeue(&mut m, run, from, message, &[])?;
            m.run(run_id)?.clone()
        };
        self.settle(&[run_id], false).await?;
        self.schedule().await?;
        Ok(run)
    }

    /// Puts every Interrupted run back in the queue, from its newest checkpoint that verifies.
    /// The budget was charged when the run was interrupted (see `ending`).
    pub async fn resume_interrupted(&self) -> Result<()> {
        let interrupted: Vec<RunRecord> = self
            .lock()
            .runs_in(RunState::Interrupted)
            .into_iter()
            .cloned()
            .collect();
        if interrupted.is_empty() {
            return Ok(());
        }
        for run in interrupted {
            let checkpoint = self.choose_checkpoint(&run).await?;
            {
                let mut m = self.lock();
                let mut run = m.run(&run.id)?.clone();
                if run.state() != RunState::Interrupted {
                    continue;
                }
                let checkpoint_step = checkpoint.as_ref().map(|c| c.step);
                // Live recovery when a survivor kept a state newer than the last checkpoint and
                // is still alive to serve it.
                let survivor = match run.live_state.clone() {
                    Some(l) if checkpoint_step.is_none_or(|c| l.step > c) => m
                        .worker(&l.worker_id)
                        .filter(|w| w.state != WorkerState::Dead)
                        .map(|_| l),
                    _ => None,
                };
                run.recovering_live = survivor.is_some();
                let (from, start) = match &survivor {
                    Some(l) => (
                        Some(l.step),
                        format!("the state {} kept at step {} (live recovery)", l.worker_id, l.step),
                    ),
                    None => (checkpoint_step, describe_start(checkpoint_step)),
                };
                let message = format!(
                    "resumed automatically (retry {} of {}) at world size {} from {start}",
                    run.retries_used(),
                    run.max_retries,
                    run.world_size,
                );
                self.requeue(&mut m, run, from, message, &[])?;
            }
            self.settle(&[run.id.as_str()], false).await?;
        }
        self.schedule().await
    }

    /// Puts a run back in the queue to start from step `from` (a checkpoint or a live state),
    /// writing the workers it releases, if any, in the same transaction. Its event says
    /// `requeued` or `resumed`, as the state it leaves says (see `RunState`).
    pub(super) fn requeue(
        &self,
        m: &mut Model,
        mut run: RunRecord,
        from: Option<u64>,
        message: String,
        freed: &[WorkerRecord],
    ) -> Result<()> {
        tracing::info!(run = %run.id, "{message}");
        run.transition(RunState::Queued, Cause::at(from.unwrap_or(0), message.clone()))?;
        run.resume_step = from;
        run.message = message;
        run.workers.clear();
        run.started_ranks.clear();
        m.put_transition(&self.store, run, freed, &[])
    }

    /// The newest committed checkpoint whose objects still match their hashes. Each one that
    /// does not is marked unusable, with an event, and never tried again.
    pub(super) async fn choose_checkpoint(&self, run: &RunRecord) -> Result<Option<CheckpointRecord>> {
        let mut candidates = self.store.checkpoints(&run.id)?;
        candidates.retain(|c| c.unusable.is_none());
        let mut chosen = None;
        while let Some(candidate) = candidates.pop() {
            match verify::verify_committed(&run.artifacts_url, &candidate).await {
                Ok(()) => {
                    chosen = Some(candidate);
                    break;
                }
                Err(e) => {
                    let _model = self.lock();
                    self.mark_unusable(&run.id, candidate.step, &e.to_string())?;
                }
            }
        }
        self.store.durable().await?;
        Ok(chosen)
    }

    /// Call with the model locked, so the record is not rewritten by a concurrent commit.
    pub(super) fn mark_unusable(&self, run_id: &str, step: u64, why: &str) -> Result<()> {
        let Some(mut record) = self.store.checkpoints(run_id)?.into_iter().find(|c| c.step == step) else {
            return Ok(());
        };
        tracing::warn!(run = %run_id, step, "checkpoint unusable: {why}");
        record.unusable = Some(why.to_string());
        let event = RunEvent::new(
            "checkpoint-unusable",
            step,
            format!("the checkpoint at step {step} is unusable ({why}); resuming from an older one"),
        );
        self.store.update_checkpoint(&record, &[event])?;
        Ok(())
    }

    /// The checkpoint `coordinator checkpoints` marks: what a resume would take. Each candidate,
    /// newest first, is checked cheaply (every file exists with its committed size) rather than
    /// re-read; one found missing or resized is marked unusable as a resume would mark it, so
    /// the mark never points at a checkpoint that cannot load. The resume itself still hashes.
    pub async fn resume_candidate(&self, run_id: &str) -> Result<Option<u64>> {
        let run = self.get_run(run_id)?;
        let mut candidates = self.store.checkpoints(run_id)?;
        candidates.retain(|c| c.unusable.is_none());
        let mut marked = false;
        let mut chosen = None;
        while let Some(candidate) = candidates.pop() {
            match verify::check_present(&run.artifacts_url, &candidate).await {
                Ok(()) => {
                    chosen = Some(candidate.step);
                    break;
                }
                Err(e) if e.is_definitive() => {
                    let _model = self.lock();
                    self.mark_unusable(run_id, candidate.step, &e.to_string())?;
                    marked = true;
                }
                // The store did not answer: the listing cannot tell, so it marks nothing.
                Err(e) => {
                    tracing::warn!(run = %run_id, step = candidate.step, "cannot check the checkpoint: {e}");
                    break;
                }
            }
        }
        if marked {
            self.store.durable().await?;
        }
        Ok(chosen)
    }

    /// Keeps the newest `train.checkpoint_keep` usable checkpoints, the final one, the best by
    /// held-out Dice and the one the current attempt started from; deletes the rest, objects
    /// first and then records, so a crash in between leaves a record whose verification fails
    /// (and is skipped) rather than objects no record points to.
    pub(super) async fn collect_garbage(&self, run_id: &str) -> Result<()> {
        let run = self.get_run(run_id)?;
        let keep_newest = RunSpec::from_toml(&run.spec_toml, "stored spec")
            .map(|s| s.train.checkpoint_keep)
            .unwrap_or(3) as usize;
        let all = self.store.checkpoints(run_id)?;
        let doomed = garbage(&all, keep_newest, run.resume_step);
        if doomed.is_empty() {
            return Ok(());
        }
        for c in &doomed {
            verify::delete_checkpoint_objects(&run.artifacts_url, c).await?;
        }
        let steps: Vec<u64> = doomed.iter().map(|c| c.step).collect();
        let event = RunEvent::new(
            "gc",
            run.step,
            format!(
                "deleted the checkpoints at steps {steps:?} (keeping the newest {keep_newest}, the final and the best)"
            ),
        );
        {
            let _model = self.lock();
            self.store.delete_checkpoints(run_id, &steps, &[event])?;
        }
        self.store.durable().await?;
        Ok(())
    }
}

/// The checkpoints garbage collection deletes, given all of a run's, oldest first.
fn garbage(all: &[CheckpointRecord], keep_newest: usize, resume_step: Option<u64>) -> Vec<CheckpointRecord> {
    let usable: Vec<&CheckpointRecord> = all.iter().filter(|c| c.unusable.is_none()).collect();
    let newest: Vec<u64> = usable.iter().rev().take(keep_newest).map(|c| c.step).collect();
    let best = best_checkpoint(all);
    all.iter()
        .filter(|c| !(c.is_final || newest.contains(&c.step) || Some(c.step) == best || Some(c.step) == resume_step))
        .cloned()
        .collect()
}

/// The step of the best checkpoint by held-out mean Dice among the usable ones, given all of a
/// run's, oldest first; on a tie the later one (it has trained longer for the same Dice).
pub fn best_checkpoint(all: &[CheckpointRecord]) -> Option<u64> {
    all.iter()
        .filter(|c| c.unusable.is_none())
        .filter_map(|c| c.eval_dice.map(|d| (d, c.step)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, step)| step)
}

fn describe_start(from: Option<u64>) -> String {
    match from {
        Some(step) => format!("the checkpoint at step {step}"),
        None => "step 0 (no usable checkpoint)".into(),
    }
}

/// A world size the run's data and batch can take; errors name the option.
fn check_world_size(run: &RunRecord, world: u32) -> Result<()> {
    let bad = |why: String| CoordError::Rejected(format!("--world-size {world}: {why}"));
    if world == 0 || world > 1024 {
        return Err(bad("must be 1..=1024".into()));
    }
    if run.train_count < world {
        return Err(bad(format!("the run has only {} training cases", run.train_count)));
    }
    let spec = RunSpec::from_toml(&run.spec_toml, "stored spec")?;
    spec.train
        .per_rank_batch(world)
        .map_err(|why| bad(format!("train.global_batch {why}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64, dice: Option<f64>, is_final: bool) -> CheckpointRecord {
        CheckpointRecord {
            run_id: "r".into(),
            step,
            prefix: format!("runs/r/checkpoints/{step:010}-a1/"),
            files: vec![],
            is_final,
            committed_unix_ms: 0,
            attempt: 1,
            unusable: None,
            eval_dice: dice,
            weights_sha256: None,
        }
    }

    fn steps(cs: &[CheckpointRecord]) -> Vec<u64> {
        cs.iter().map(|c| c.step).collect()
    }

    #[test]
    fn gc_keeps_the_newest_the_final_the_best_and_the_resume_point() {
        let all = [
            ckpt(10, None, false),
            ckpt(20, Some(0.9), false),
            ckpt(30, None, false),
            ckpt(40, Some(0.5), false),
            ckpt(50, None, false),
            ckpt(60, None, false),
            ckpt(70, None, true),
        ];
        assert_eq!(steps(&garbage(&all, 2, None)), [10, 30, 40, 50]);
        assert_eq!(steps(&garbage(&all, 2, Some(30))), [10, 40, 50]);
        assert_eq!(steps(&garbage(&all, 10, None)), Vec::<u64>::new());
    }

    #[test]
    fn the_best_checkpoint_has_the_highest_dice_among_the_usable_ones() {
        let mut all = vec![
            ckpt(10, Some(0.2), false),
            ckpt(20, Some(0.7), false),
            ckpt(30, None, false),
            ckpt(40, Some(0.7), false),
            ckpt(50, Some(0.9), false),
            ckpt(60, Some(0.4), true),
        ];
        assert_eq!(best_checkpoint(&all), Some(50));
        all[4].unusable = Some("missing model.bin".into());
        assert_eq!(best_checkpoint(&all), Some(40), "ties go to the later step");
        assert_eq!(best_checkpoint(&[ckpt(10, None, true)]), None);
        // GC keeps it even when it is neither new nor final.
        assert!(!steps(&garbage(&all, 1, None)).contains(&40));
    }

    #[test]
    fn gc_does_not_count_unusable_checkpoints_as_kept() {
        let mut bad = ckpt(30, None, false);
        bad.unusable = Some("missing".into());
        let all = [ckpt(10, None, false), ckpt(20, None, false), bad];
        assert_eq!(steps(&garbage(&all, 2, None)), [30]);
    }
}
