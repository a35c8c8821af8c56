//! Gang scheduling, first in first out: the oldest queued run starts as soon as `world_size`
//! idle workers exist, and no younger run overtakes it (a small run slipping past a large one
//! forever would starve the large one).
//!
//! A gang is drawn from workers of one numeric fingerprint only: ranks whose kernels sum in a
//! different order would drift apart bit by bit, and the weight checksums would fail the run.

use crate::records::{RunRecord, RunState, WorkerRecord, WorkerState};

pub struct Placement {
    pub run: RunRecord,
    /// Index = rank.
    pub workers: Vec<WorkerRecord>,
}

/// Decides which queued runs start now and on which workers. Pure: the caller records it.
pub fn place(runs: &[RunRecord], workers: &[WorkerRecord]) -> Vec<Placement> {
    // Idle workers by fingerprint, each group in id order.
    let mut idle: std::collections::BTreeMap<&str, Vec<WorkerRecord>> = Default::default();
    for w in workers.iter().filter(|w| w.state == WorkerState::Idle) {
        idle.entry(w.numeric_fingerprint.as_str()).or_default().push(w.clone());
    }
    for group in idle.values_mut() {
        group.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let mut queued: Vec<&RunRecord> = runs.iter().filter(|r| r.state == RunState::Queued).collect();
    queued.sort_by(|a, b| (a.submitted_unix_ms, &a.id).cmp(&(b.submitted_unix_ms, &b.id)));
    let mut placements = vec![];
    for run in queued {
        let need = run.world_size as usize;
        // The largest group that fits keeps small groups free for small runs.
        let Some(group) = idle.values_mut().filter(|g| g.len() >= need).max_by_key(|g| g.len()) else {
            break;
        };
        let gang: Vec<WorkerRecord> = group.drain(..need).collect();
        placements.push(Placement {
            run: run.clone(),
            workers: gang,
        });
    }
    placements
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, world: u32, t: i64) -> RunRecord {
        RunRecord {
            id: id.into(),
            name: id.into(),
            spec_toml: String::new(),
            state: RunState::Queued,
            world_size: world,
            total_steps: 1,
            step: 0,
            message: String::new(),
            submitted_unix_ms: t,
            updated_unix_ms: t,
            workers: vec![],
            started_ranks: vec![],
            train_cases: vec![],
            eval_cases: vec![],
            artifacts_url: String::new(),
            finished: Default::default(),
            final_checkpoint: None,
            attempt: 0,
            max_retries: 3,
            interruptions: vec![],
            resume_step: None,
            pause_requested: false,
            live_state: None,
            recovering_live: false,
        }
    }

    fn worker(id: &str, state: WorkerState) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            host: "h".into(),
            peer_address: format!("{id}:1"),
            device_kind: "cpu".into(),
            device_memory_bytes: 0,
            registered_unix_ms: 0,
            last_heartbeat_unix_ms: 0,
            state,
            run_id: None,
            numeric_fingerprint: "x86_64+avx2".into(),
        }
    }

    #[test]
    fn waits_for_a_whole_gang() {
        let runs = [run("run-000001", 3, 1)];
        let two = [
            worker("w1", WorkerState::Idle),
            worker("w2", WorkerState::Idle),
            worker("w3", WorkerState::Dead),
        ];
        assert!(place(&runs, &two).is_empty());
        let three = [
            worker("w1", WorkerState::Idle),
            worker("w2", WorkerState::Idle),
            worker("w3", WorkerState::Idle),
        ];
        let p = place(&runs, &three);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
            ["w1", "w2", "w3"]
        );
    }

    #[test]
    fn first_in_first_out_without_overtaking() {
        let runs = [run("run-000002", 1, 2), run("run-000001", 2, 1)];
        let one = [worker("w1", WorkerState::Idle), worker("w2", WorkerState::Busy)];
        assert!(
            place(&runs, &one).is_empty(),
            "the younger 1-worker run must not overtake"
        );
        let two = [
            worker("w1", WorkerState::Idle),
            worker("w2", WorkerState::Idle),
            worker("w3", WorkerState::Idle),
        ];
        let p = place(&runs, &two);
        assert_eq!(
            p.iter().map(|p| p.run.id.as_str()).collect::<Vec<_>>(),
            ["run-000001", "run-000002"]
        );
    }

    #[test]
    fn a_gang_never_mixes_numeric_fingerprints() {
        let runs = [run("run-000001", 2, 1)];
        let mut other = worker("w2", WorkerState::Idle);
        other.numeric_fingerprint = "x86_64+avx512f".into();
        let mixed = [worker("w1", WorkerState::Idle), other.clone()];
        assert!(
            place(&runs, &mixed).is_empty(),
            "two idle workers, but of different kernels"
        );
        let mut third = other.clone();
        third.id = "w3".into();
        let p = place(&runs, &[worker("w1", WorkerState::Idle), other, third]);
        assert_eq!(
            p[0].workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
            ["w2", "w3"]
        );
    }
}
