//! What the coordinator remembers: runs, workers and checkpoints, and the legal moves of the run
//! state machine. Plain data, serialised as JSON into sled by `store`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Queued,
    /// A gang of workers is reserved; they have not all picked the assignment up yet.
    Assigned,
    Running,
    Completed,
    Failed,
    Cancelled,
    /// Lost its workers or its coordinator mid-flight; resumable from its newest checkpoint.
    Interrupted,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(self, RunState::Completed | RunState::Failed | RunState::Cancelled)
    }

    /// Holds workers: the run is between assignment and its end.
    pub fn is_active(self) -> bool {
        matches!(self, RunState::Assigned | RunState::Running)
    }

    /// The state machine of DESIGN.md; anything else is a bug or a stale message.
    pub fn can_move_to(self, next: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, next),
            (Queued, Assigned)
                | (Queued, Cancelled)
                | (Assigned, Running)
                | (Running, Completed)
                | (Assigned | Running, Failed | Cancelled | Interrupted)
                | (Interrupted, Queued | Cancelled)
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishedRank {
    pub final_step: u64,
    pub weights_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub name: String,
    /// Canonical TOML of the validated spec.
    pub spec_toml: String,
    pub state: RunState,
    pub world_size: u32,
    pub total_steps: u64,
    /// Newest step any rank reported.
    pub step: u64,
    pub message: String,
    pub submitted_unix_ms: i64,
    pub updated_unix_ms: i64,
    /// Worker id per rank while assigned.
    pub workers: Vec<String>,
    /// Ranks that have fetched their assignment.
    pub started_ranks: Vec<u32>,
    pub train_cases: Vec<String>,
    pub eval_cases: Vec<String>,
    pub artifacts_url: String,
    pub finished: BTreeMap<u32, FinishedRank>,
    pub final_checkpoint: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    Idle,
    Busy,
    Dead,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub host: String,
    pub peer_address: String,
    pub device_kind: String,
    pub device_memory_bytes: u64,
    pub registered_unix_ms: i64,
    pub last_heartbeat_unix_ms: i64,
    pub state: WorkerState,
    pub run_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointFileRecord {
    pub key: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub run_id: String,
    pub step: u64,
    /// Object prefix under the artifacts root: `runs/<run>/checkpoints/<step>/`.
    pub prefix: String,
    pub files: Vec<CheckpointFileRecord>,
    pub is_final: bool,
    pub committed_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricRecord {
    pub rank: u32,
    pub step: u64,
    pub name: String,
    pub value: f64,
    pub unix_ms: i64,
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::RunState::*;

    #[test]
    fn terminal_states_are_final() {
        for s in [Completed, Failed, Cancelled] {
            for n in [Queued, Assigned, Running, Completed, Failed, Cancelled, Interrupted] {
                assert!(!s.can_move_to(n), "{s} -> {n}");
            }
        }
        assert!(Queued.can_move_to(Assigned));
        assert!(!Queued.can_move_to(Running));
        assert!(Running.can_move_to(Interrupted));
        assert!(Interrupted.can_move_to(Queued));
    }
}
