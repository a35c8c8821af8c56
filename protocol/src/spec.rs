//! The run spec: what a user writes in `configs/*.toml`, what the coordinator stores, and what
//! every rank trains from.
//!
//! One schema on both sides of the wire: the CLI validates before it submits, the coordinator
//! validates again on receipt (a client may be older or hand-rolled), and workers parse the
//! canonical TOML the coordinator hands them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::validate_id;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("{source_name}: {message}")]
    Parse { source_name: String, message: String },
    #[error("{source_name}: field `{field}`: {reason}")]
    Invalid {
        source_name: String,
        field: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Human-readable name; becomes part of the run listing, not of any object key.
    pub name: String,
    /// Number of workers the run needs at once (gang scheduled).
    pub world_size: u32,
    /// Seeds weight init, data order, crops and augmentation.
    #[serde(default)]
    pub seed: u64,
    pub dataset: DatasetSpec,
    pub model: ModelSpec,
    pub train: TrainSpec,
    pub artifacts: ArtifactsSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Object-store URL of the AbdomenAtlas-layout dataset (`file:///data/atlas`, a local path).
    pub url: String,
    /// Training subset size: a prefix of the dataset's seeded order, so smaller subsets nest
    /// inside larger ones. 0 means every case not held out.
    #[serde(default)]
    pub train_cases: u32,
    /// Held-out cases, taken from the end of the seeded order and never trained on.
    #[serde(default)]
    pub eval_cases: u32,
    /// Seed of the dataset order; shared by every run of a scaling sweep.
    #[serde(default)]
    pub order_seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Backbone. Only `unet` exists so far.
    pub arch: String,
    #[serde(default = "default_base_width")]
    pub base_width: u32,
    /// Number of resolution levels.
    #[serde(default = "default_depth")]
    pub depth: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub steps: u64,
    /// Per-rank batch size.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Crop size [D, H, W] in voxels.
    pub patch: [u32; 3],
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Write a checkpoint every this many steps (0: only the final one).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Compare weight checksums across ranks every this many steps.
    #[serde(default = "default_checksum_every")]
    pub checksum_every: u64,
    /// Send metrics to the coordinator every this many steps.
    #[serde(default = "default_metrics_every")]
    pub metrics_every: u64,
    /// Evaluate on the held-out cases before training and after it.
    #[serde(default = "default_true")]
    pub eval: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsSpec {
    /// Object-store URL under which `runs/<run-id>/checkpoints/<step>/` is written.
    pub url: String,
}

fn default_base_width() -> u32 {
    32
}
fn default_depth() -> u32 {
    4
}
fn default_batch() -> u32 {
    1
}
fn default_weight_decay() -> f64 {
    1e-5
}
fn default_checksum_every() -> u64 {
    10
}
fn default_metrics_every() -> u64 {
    10
}
fn default_true() -> bool {
    true
}

/// Architectures this build can train.
pub const KNOWN_ARCHS: [&str; 1] = ["unet"];

impl RunSpec {
    /// Parses and validates; `source_name` (a file name) prefixes every error.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, SpecError> {
        let spec: RunSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        spec.validate(source_name)?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("RunSpec always serialises")
    }

    pub fn validate(&self, source_name: &str) -> Result<(), SpecError> {
        let invalid = |field: &'static str, reason: String| SpecError::Invalid {
            source_name: source_name.to_string(),
            field,
            reason,
        };
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if self.world_size == 0 || self.world_size > 1024 {
            return Err(invalid(
                "world_size",
                format!("must be 1..=1024, got {}", self.world_size),
            ));
        }
        if self.dataset.url.trim().is_empty() {
            return Err(invalid("dataset.url", "must not be empty".into()));
        }
        if !KNOWN_ARCHS.contains(&self.model.arch.as_str()) {
            return Err(invalid(
                "model.arch",
                format!(
                    "unknown architecture `{}`; known: {}",
                    self.model.arch,
                    KNOWN_ARCHS.join(", ")
                ),
            ));
        }
        if self.model.base_width == 0 || self.model.base_width > 512 {
            return Err(invalid(
                "model.base_width",
                format!("must be 1..=512, got {}", self.model.base_width),
            ));
        }
        if self.model.depth == 0 || self.model.depth > 7 {
            return Err(invalid(
                "model.depth",
                format!("must be 1..=7, got {}", self.model.depth),
            ));
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(invalid("train.steps", "must be at least 1".into()));
        }
        if t.batch_size == 0 || t.batch_size > 256 {
            return Err(invalid(
                "train.batch_size",
                format!("must be 1..=256, got {}", t.batch_size),
            ));
        }
        let multiple = 1u32 << (self.model.depth - 1);
        if let Some(bad) = t.patch.iter().find(|&&p| p == 0 || p % multiple != 0 || p > 512) {
            return Err(invalid(
                "train.patch",
                format!("every side must be a multiple of {multiple} (2^(model.depth-1)) in 1..=512, got {bad}"),
            ));
        }
        if !(t.lr.is_finite() && t.lr > 0.0 && t.lr < 10.0) {
            return Err(invalid("train.lr", format!("must be in (0, 10), got {}", t.lr)));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(invalid(
                "train.weight_decay",
                format!("must be >= 0, got {}", t.weight_decay),
            ));
        }
        if t.warmup_steps >= t.steps {
            return Err(invalid(
                "train.warmup_steps",
                format!("must be less than train.steps ({}), got {}", t.steps, t.warmup_steps),
            ));
        }
        if t.checksum_every == 0 {
            return Err(invalid("train.checksum_every", "must be at least 1".into()));
        }
        if t.metrics_every == 0 {
            return Err(invalid("train.metrics_every", "must be at least 1".into()));
        }
        if self.artifacts.url.trim().is_empty() {
            return Err(invalid("artifacts.url", "must not be empty".into()));
        }
        Ok(())
    }
}

/// Validates a run id handed in from outside (CLI argument, RPC field) before it is used in a
/// store key or object path.
pub fn validate_run_id(id: &str) -> Result<(), String> {
    validate_id(id, "run id")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
world_size = 2
[dataset]
url = "/tmp/x"
[model]
arch = "unet"
base_width = 8
depth = 3
[train]
steps = 10
patch = [32, 32, 32]
lr = 0.001
[artifacts]
url = "/tmp/y"
"#;

    #[test]
    fn good_spec_round_trips_through_canonical_toml() {
        let spec = RunSpec::from_toml(GOOD, "good.toml").unwrap();
        let again = RunSpec::from_toml(&spec.to_toml(), "canonical").unwrap();
        assert_eq!(spec, again);
        assert_eq!(spec.train.batch_size, 1);
    }

    #[test]
    fn errors_name_the_field() {
        let bad = GOOD.replace("patch = [32, 32, 32]", "patch = [32, 30, 32]");
        let err = RunSpec::from_toml(&bad, "bad.toml").unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("train.patch"), "{err}");

        let unknown = GOOD.replace("lr = 0.001", "lr = 0.001\nlearning_rate = 1");
        let err = RunSpec::from_toml(&unknown, "u.toml").unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");

        let arch = GOOD.replace("\"unet\"", "\"resnet\"");
        let err = RunSpec::from_toml(&arch, "a.toml").unwrap_err().to_string();
        assert!(err.contains("model.arch") && err.contains("resnet"), "{err}");
    }
}
