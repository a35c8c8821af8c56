//! What the coordinator remembers: runs, workers and checkpoints. Plain data, serialised as JSON
//! into sled by `store`. The run state machine, the one way a run's state changes, is
//! `lifecycle`.
//!
//! Every field added after the first release carries `#[serde(default)]`, so a store written by
//! an older build stays readable; `store::SCHEMA_VERSION` guards against newer ones.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

mod lifecycle;
#[cfg(test)]
pub(crate) use lifecycle::tests::run_in;
pub use lifecycle::{Cause, RunState, TransitionError};

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
    /// Private: it changes only through `transition`, which checks the move and records it.
    state: RunState,
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
    /// The frozen case list the run trains on: its first `train_count` cases are the training
    /// subset, its last `eval_count` the held-out ones.
    #[serde(default)]
    pub manifest_id: String,
    #[serde(default)]
    pub train_count: u32,
    #[serde(default)]
    pub eval_count: u32,
    /// The dataset's quarantined cases at submit, which the workers slice the manifest around
    /// and skip. Frozen with the run, so every attempt and resume trains on the same cases in
    /// the same order (bit-identical resumes); a case found bad later is replaced per sample by
    /// the workers, the same way on every attempt.
    #[serde(default)]
    pub quarantined: Vec<String>,
    /// Case lists as schema 1 stored them in every run; read once to migrate them into a
    /// manifest (see `store::migrate`), never written again.
    #[serde(default, rename = "train_cases", skip_serializing)]
    pub legacy_train_cases: Vec<String>,
    #[serde(default, rename = "eval_cases", skip_serializing)]
    pub legacy_eval_cases: Vec<String>,
    pub artifacts_url: String,
    pub finished: BTreeMap<u32, FinishedRank>,
    pub final_checkpoint: Option<u64>,
    /// Placements so far; every assignment of the run bumps it (see `pb::Assignment::attempt`).
    #[serde(default)]
    pub attempt: u32,
    /// Automatic resume budget (from the spec) and the interruptions that spent it: those in
    /// a row with no new progress between them (see `RunRecord::charge_interruption`), since
    /// the last manual resume.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default)]
    pub interruptions: Vec<String>,
    /// The run's step when it was last interrupted: an interruption after the run got past it
    /// made progress, and starts the count of `interruptions` over.
    #[serde(default)]
    pub interrupted_at_step: Option<u64>,
    /// Every interruption since the last manual resume, progress or not, for `show`.
    #[serde(default)]
    pub total_interruptions: u32,
    /// Step of the checkpoint the next (or current) attempt starts from.
    #[serde(default)]
    pub resume_step: Option<u64>,
    #[serde(default)]
    pub pause_requested: bool,
    /// The newest training state a surviving rank kept when the run lost a peer (live recovery).
    #[serde(default)]
    pub live_state: Option<LiveState>,
    /// The current (or next) attempt starts from `live_state` rather than a checkpoint.
    #[serde(default)]
    pub recovering_live: bool,
    /// Queue order: higher priority first, then `seq` (the run counter), first in first out.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub seq: u64,
    /// `cuda` or `cpu` when the spec constrains the device kind.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub sweep_id: Option<String>,
    /// Events of the transitions made to this copy since it was read, not yet in the store. The
    /// store writes them in the transaction that writes the record, then clears them, so a new
    /// state never reaches the store without the event that records it.
    #[serde(skip)]
    unwritten: Vec<RunEvent>,
}

/// A data-scaling ablation (or any product of spec axes): the children it queued, and the axis
/// values of each. The children are ordinary runs that name the sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    pub id: String,
    pub name: String,
    pub priority: i32,
    pub source_name: String,
    /// The sweep file as submitted, base spec inlined.
    pub sweep_toml: String,
    /// Axis keys (TOML paths into the run spec), in file order.
    pub axes: Vec<String>,
    pub children: Vec<SweepChildRecord>,
    pub submitted_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepChildRecord {
    pub run_id: String,
    /// TOML literals, one per axis.
    pub values: Vec<String>,
}

/// A dataset's case list frozen once: the listing of `dataset_url`, sorted, then shuffled by
/// `order_seed`. Runs refer to it by id instead of carrying their own copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestRecord {
    pub id: String,
    pub dataset_url: String,
    pub order_seed: u64,
    pub cases: Vec<String>,
    pub frozen_unix_ms: i64,
    /// A case-id list's cases in the dataset's order (a subsequence of the full manifest of the
    /// same URL and seed); not indexed by URL and seed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub subset: bool,
}

/// One scanned dataset: every case folder found under `url` with its sizes and masks, the
/// names that were not case folders, and when. Keyed by `name` (a `protocol::ids` id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetRecord {
    pub name: String,
    pub url: String,
    pub scanned_unix_ms: i64,
    /// Sorted by id; a case with `ct_bytes: None` has no `ct.nii.gz` (and is quarantined).
    pub cases: Vec<data::scan::ScannedCase>,
    pub ignored: Vec<data::scan::IgnoredName>,
    pub objects: u64,
}

impl DatasetRecord {
    pub fn missing_ct(&self) -> Vec<String> {
        data::scan::missing_ct(&self.cases)
    }

    pub fn total_bytes(&self) -> u64 {
        data::scan::total_bytes(&self.cases)
    }
}

/// A case no run should read until an operator clears it, keyed by dataset URL and case id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuarantineRecord {
    pub dataset_url: String,
    pub case_id: String,
    pub error: String,
    pub unix_ms: i64,
    /// Empty when the scan quarantined it (a missing CT).
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub worker_id: String,
}

impl QuarantineRecord {
    /// The scan's own entries; a later scan lifts them when the CT is back.
    pub fn by_scan(&self) -> bool {
        self.run_id.is_empty()
    }
}

/// Where a survivor of a broken ring holds the whole training state, and after which step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    pub worker_id: String,
    pub peer_address: String,
    pub attempt: u32,
    pub step: u64,
}

fn default_max_retries() -> u32 {
    3
}

impl RunRecord {
    /// Automatic resumes already used.
    pub fn retries_used(&self) -> u32 {
        self.interruptions.len() as u32
    }

    /// Counts an interruption against the retry budget. The budget stops a crash loop, not a
    /// long run on churning nodes: an interruption after the run got past the step of the last
    /// one starts the count over, so only interruptions in a row with no new progress between
    /// them add up. Returns whether the budget is now spent.
    pub fn charge_interruption(&mut self, cause: String) -> bool {
        if self.interrupted_at_step.is_some_and(|at| self.step > at) {
            self.interruptions.clear();
        }
        self.interrupted_at_step = Some(self.step);
        self.total_interruptions += 1;
        self.interruptions.push(cause);
        self.retries_used() > self.max_retries
    }

    /// Starts the budget afresh (a manual resume).
    pub fn reset_retry_budget(&mut self) {
        self.interruptions.clear();
        self.interrupted_at_step = None;
        self.total_interruptions = 0;
    }

    /// How much of the retry budget is left, and why, in one line for `show`.
    pub fn retry_budget(&self) -> String {
        let left = self.max_retries.saturating_sub(self.retries_used());
        let mut text = format!("{left} of {} automatic resumes left", self.max_retries);
        match self.interrupted_at_step {
            None => text.push_str(" (never interrupted)"),
            Some(at) => text.push_str(&format!(
                " ({} interruption(s) in a row without getting past step {at}, {} in all; \
                 one after new progress starts the count over)",
                self.retries_used(),
                self.total_interruptions
            )),
        }
        text
    }
}

/// Something that happened to a run, kept for `coordinator show`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunEvent {
    pub unix_ms: i64,
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub step: u64,
}

impl RunEvent {
    pub fn new(kind: &str, step: u64, message: impl Into<String>) -> Self {
        RunEvent {
            unix_ms: now_unix_ms(),
            kind: kind.to_string(),
            message: message.into(),
            step,
        }
    }
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
    #[serde(default)]
    pub numeric_fingerprint: String,
    /// SHA-256 (hex) of the secret the worker was given at its first registration: the id
    /// belongs to the process that holds it (see `core::membership`). Empty in records written
    /// before secrets existed; the next registration under the id is then issued one.
    #[serde(default)]
    pub secret_sha256: String,
    /// The worker said it is going away (SIGTERM) while on a run: it gets no new work, and its
    /// run is checkpointed and put back in the queue.
    #[serde(default)]
    pub leaving: bool,
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
    #[serde(default)]
    pub attempt: u32,
    /// Why verification rejected it (missing or corrupt object); such a checkpoint is never
    /// resumed from.
    #[serde(default)]
    pub unusable: Option<String>,
    /// Mean held-out Dice at this step, when an evaluation ran there (for garbage collection).
    #[serde(default)]
    pub eval_dice: Option<f64>,
    /// The worker's hash of the weights it holds (`weights_checksum`); `None` when committed by
    /// a worker of an earlier release, or read from a store written by one.
    #[serde(default)]
    pub weights_sha256: Option<String>,
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
    #[test]
    fn records_written_by_the_spine_still_read() {
        // A run and a checkpoint exactly as the first release stored them.
        let run = r#"{"id":"run-000001","name":"demo","spec_toml":"","state":"Interrupted",
            "world_size":2,"total_steps":800,"step":40,"message":"","submitted_unix_ms":1,
            "updated_unix_ms":2,"workers":[],"started_ranks":[],"train_cases":["a"],
            "eval_cases":[],"artifacts_url":"/x","finished":{},"final_checkpoint":null}"#;
        let run: super::RunRecord = serde_json::from_str(run).unwrap();
        assert_eq!((run.attempt, run.max_retries, run.resume_step), (0, 3, None));
        assert!(run.interruptions.is_empty() && run.live_state.is_none());
        let ckpt = r#"{"run_id":"run-000001","step":20,"prefix":"runs/run-000001/checkpoints/20/",
            "files":[],"is_final":false,"committed_unix_ms":3}"#;
        let ckpt: super::CheckpointRecord = serde_json::from_str(ckpt).unwrap();
        assert_eq!(
            (ckpt.attempt, ckpt.unusable, ckpt.eval_dice, ckpt.weights_sha256),
            (0, None, None, None)
        );
    }
}
