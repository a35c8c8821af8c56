//! The run spec: what a user writes in `configs/*.toml`, what the coordinator stores, and what
//! every rank trains from.
//!
//! One schema on both sides of the wire: the CLI validates before it submits, the coordinator
//! validates again on receipt (a client may be older or hand-rolled), and workers parse the
//! canonical TOML the coordinator hands them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::validate_id;
pub use crate::model_spec::{KNOWN_ARCHS, ModelSpec, Preset, SegResNetSpec, SwinUnetrSpec, UnetSpec};

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

#[path = "collective_spec.rs"]
mod collective_spec;
pub use collective_spec::{COLLECTIVE_WIRES, CollectiveSpec, DEFAULT_SEND_BUFFER_KB};

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
    /// SuPreM's preprocessing and augmentation; an absent table means SuPreM's settings. Always
    /// written out in the canonical TOML, so a stored run keeps its settings if defaults change.
    #[serde(default)]
    pub preprocess: PreprocessSpec,
    /// Automatic resumes after an interruption (a lost worker, a lost coordinator) before the
    /// run is declared Failed. A manual `coordinator resume` gives the budget back.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Queue priority: higher runs first; first in, first out within a priority.
    #[serde(default)]
    pub priority: i32,
    /// Device kind every rank must have, `cuda` or `cpu`; absent means any (one ring never mixes
    /// the two either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// How ranks exchange gradients; absent means the defaults.
    #[serde(default, skip_serializing_if = "CollectiveSpec::is_default")]
    pub collective: CollectiveSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Object-store URL of the AbdomenAtlas-layout dataset (`file:///data/atlas`, a local path).
    /// Give this or `name`, not both; the coordinator resolves `name` to the scanned dataset's
    /// URL at submit, so the spec it stores and hands to workers always carries the URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Name of a dataset scanned with `coordinator dataset scan` (see `coordinator datasets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A case-id list file (one id a line, SuPreM's `dataset_list/*.txt`), relative to the spec
    /// file. The CLI reads it and sends its ids as `cases`; the coordinator never reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_list: Option<String>,
    /// Only these cases, in the dataset's seeded order (so subsets of one list nest too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cases: Option<Vec<String>>,
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
pub struct TrainSpec {
    pub steps: u64,
    /// Per-rank batch size. Give this or `global_batch`, not both; neither means 1 per rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Samples per step summed over all ranks; each rank takes global_batch / world_size. A run
    /// resumed at another world size then keeps the same optimisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch: Option<u32>,
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
    /// Newest checkpoints kept per run; older ones are deleted (objects first, then records).
    /// The final checkpoint and the one with the best held-out Dice are always kept.
    #[serde(default = "default_checkpoint_keep")]
    pub checkpoint_keep: u32,
    /// Compare weight checksums across ranks every this many steps.
    #[serde(default = "default_checksum_every")]
    pub checksum_every: u64,
    /// Send metrics to the coordinator every this many steps.
    #[serde(default = "default_metrics_every")]
    pub metrics_every: u64,
    /// Evaluate on the held-out cases before training and after it.
    #[serde(default = "default_true")]
    pub eval: bool,
    /// Also evaluate (and checkpoint, with the mean Dice) every this many steps; 0: only before
    /// and after training.
    #[serde(default)]
    pub eval_every: u64,
    /// Sliding-window size [D, H, W] of the held-out inference; `train.patch` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_window: Option<[u32; 3]>,
    /// Overlap of neighbouring evaluation windows, in [0, 1).
    #[serde(default = "default_eval_overlap")]
    pub eval_overlap: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsSpec {
    /// Object-store URL under which `runs/<run-id>/checkpoints/<step>/` is written.
    pub url: String,
}

/// `[preprocess]`: resampling, HU window and the crop/augmentation knobs, SuPreM's by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessSpec {
    /// Target voxel size along the RAS axes x, y, z, in mm.
    pub spacing_mm: [f64; 3],
    /// HU window clipped and scaled to 0..1.
    pub hu_min: f64,
    pub hu_max: f64,
    /// Crops centred on foreground : crops centred on background (RandCropByPosNegLabeld).
    pub pos: u32,
    pub neg: u32,
    /// Probability of a random rot90 of a crop.
    pub rot90_prob: f64,
    /// Probability of a random intensity shift, and its largest offset (on the 0..1 scale).
    pub shift_prob: f64,
    pub shift_offset: f64,
}

impl Default for PreprocessSpec {
    fn default() -> Self {
        PreprocessSpec {
            spacing_mm: [1.5, 1.5, 1.5],
            hu_min: -175.0,
            hu_max: 250.0,
            pos: 2,
            neg: 1,
            rot90_prob: 0.1,
            shift_prob: 0.2,
            shift_offset: 0.1,
        }
    }
}

/// Largest voxel size a run may resample to; beyond it no organ survives.
pub const MAX_SPACING_MM: f64 = 20.0;

impl PreprocessSpec {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(s) = self
            .spacing_mm
            .iter()
            .find(|s| !(s.is_finite() && **s > 0.0 && **s <= MAX_SPACING_MM))
        {
            return Err((
                "preprocess.spacing_mm",
                format!("every side must be in (0, {MAX_SPACING_MM}] mm, got {s}"),
            ));
        }
        if !self.hu_min.is_finite() {
            return Err(("preprocess.hu_min", format!("must be finite, got {}", self.hu_min)));
        }
        if !(self.hu_max.is_finite() && self.hu_max > self.hu_min) {
            return Err((
                "preprocess.hu_max",
                format!("must be finite and above hu_min ({}), got {}", self.hu_min, self.hu_max),
            ));
        }
        if self.pos + self.neg == 0 || self.pos > 100 || self.neg > 100 {
            return Err((
                "preprocess.pos",
                format!("pos and neg must be 0..=100, not both 0, got {}:{}", self.pos, self.neg),
            ));
        }
        for (field, p) in [
            ("preprocess.rot90_prob", self.rot90_prob),
            ("preprocess.shift_prob", self.shift_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err((field, format!("must be a probability in [0, 1], got {p}")));
            }
        }
        if !(0.0..=1.0).contains(&self.shift_offset) {
            return Err((
                "preprocess.shift_offset",
                format!("must be in [0, 1] (the window's 0..1 scale), got {}", self.shift_offset),
            ));
        }
        Ok(())
    }
}

fn default_max_retries() -> u32 {
    3
}
fn default_checkpoint_keep() -> u32 {
    3
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
fn default_eval_overlap() -> f64 {
    0.5
}
fn default_true() -> bool {
    true
}

/// Device kinds a run can ask for.
pub const DEVICE_KINDS: [&str; 2] = ["cuda", "cpu"];

/// The device class of a worker's `device_kind` (`cpu`, `cuda:0`, ...), as a run names it.
pub fn device_class(device_kind: &str) -> &'static str {
    if device_kind.starts_with("cuda") { "cuda" } else { "cpu" }
}

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
        self.dataset
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        self.model
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        let t = &self.train;
        if t.steps == 0 {
            return Err(invalid("train.steps", "must be at least 1".into()));
        }
        if let Some(b) = t.batch_size.filter(|b| *b == 0 || *b > 256) {
            return Err(invalid("train.batch_size", format!("must be 1..=256, got {b}")));
        }
        if t.batch_size.is_some() && t.global_batch.is_some() {
            return Err(invalid(
                "train.global_batch",
                "give either train.batch_size (per rank) or train.global_batch, not both".into(),
            ));
        }
        self.train
            .per_rank_batch(self.world_size)
            .map_err(|reason| invalid("train.global_batch", reason))?;
        if t.checkpoint_keep == 0 {
            return Err(invalid("train.checkpoint_keep", "must be at least 1".into()));
        }
        if self.max_retries > 100 {
            return Err(invalid(
                "max_retries",
                format!("must be 0..=100, got {}", self.max_retries),
            ));
        }
        let multiple = self.model.size_multiple();
        if let Some(bad) = t.patch.iter().find(|&&p| p == 0 || p % multiple != 0 || p > 512) {
            return Err(invalid(
                "train.patch",
                format!(
                    "every side must be a multiple of {multiple} (the {} backbone's downsampling) in 1..=512, got {bad}",
                    self.model.arch()
                ),
            ));
        }
        if let Some(bad) = t
            .eval_window
            .and_then(|w| w.into_iter().find(|&p| p == 0 || p % multiple != 0 || p > 512))
        {
            return Err(invalid(
                "train.eval_window",
                format!(
                    "every side must be a multiple of {multiple} (the {} backbone's downsampling) in 1..=512, got {bad}",
                    self.model.arch()
                ),
            ));
        }
        if !(0.0..1.0).contains(&t.eval_overlap) {
            return Err(invalid(
                "train.eval_overlap",
                format!("must be in [0, 1), got {}", t.eval_overlap),
            ));
        }
        if t.eval_every > 0 && !t.eval {
            return Err(invalid(
                "train.eval_every",
                "evaluates nothing while train.eval = false".into(),
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
        if let Some(device) = self.device.as_deref().filter(|d| !DEVICE_KINDS.contains(d)) {
            return Err(invalid(
                "device",
                format!("unknown device `{device}`; known: {}", DEVICE_KINDS.join(", ")),
            ));
        }
        if self.artifacts.url.trim().is_empty() {
            return Err(invalid("artifacts.url", "must not be empty".into()));
        }
        self.preprocess
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        self.collective
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        Ok(())
    }
}

impl DatasetSpec {
    /// Exactly one of `url` and `name`; `case_list` or `cases`, not both; valid ids.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        match (self.url.trim().is_empty(), &self.name) {
            (true, None) => {
                return Err((
                    "dataset.url",
                    "give dataset.url or dataset.name (a dataset scanned with `coordinator dataset scan`)".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(("dataset.name", "give dataset.url or dataset.name, not both".into()));
            }
            (true, Some(name)) => validate_id(name, "dataset name").map_err(|r| ("dataset.name", r))?,
            (false, None) => {}
        }
        if self.case_list.is_some() && self.cases.is_some() {
            return Err((
                "dataset.case_list",
                "give dataset.case_list or dataset.cases, not both".into(),
            ));
        }
        if let Some(list) = self.case_list.as_deref().filter(|l| l.trim().is_empty()) {
            return Err(("dataset.case_list", format!("`{list}` is not a file name")));
        }
        if let Some(cases) = &self.cases {
            if cases.is_empty() {
                return Err(("dataset.cases", "must list at least one case id".into()));
            }
            for id in cases {
                validate_id(id, "case id").map_err(|r| ("dataset.cases", r))?;
            }
        }
        Ok(())
    }
}

impl TrainSpec {
    /// The sliding window of held-out inference: `eval_window`, else the training patch.
    pub fn eval_window_or_patch(&self) -> [u32; 3] {
        self.eval_window.unwrap_or(self.patch)
    }

    /// Samples each rank draws per step at `world_size` ranks.
    pub fn per_rank_batch(&self, world_size: u32) -> Result<u32, String> {
        match (self.batch_size, self.global_batch) {
            (Some(b), _) => Ok(b),
            (None, None) => Ok(1),
            (None, Some(g)) if g == 0 || g > 256 * world_size => {
                Err(format!("must be 1..={}, got {g}", 256 * world_size))
            }
            (None, Some(g)) if g % world_size != 0 => {
                Err(format!("{g} samples do not split evenly over {world_size} ranks"))
            }
            (None, Some(g)) => Ok(g / world_size),
        }
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

    /// A minimal valid run spec; other spec modules' tests build on it too.
    pub(crate) const GOOD: &str = r#"
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
        assert_eq!(spec.train.per_rank_batch(2), Ok(1));
        assert_eq!(spec.max_retries, 3);
        assert_eq!(spec.train.checkpoint_keep, 3);
    }

    #[test]
    fn global_batch_splits_over_ranks_and_excludes_batch_size() {
        let global = GOOD.replace("lr = 0.001", "lr = 0.001\nglobal_batch = 6");
        let spec = RunSpec::from_toml(&global, "g.toml").unwrap();
        assert_eq!(spec.train.per_rank_batch(2), Ok(3));
        assert_eq!(spec.train.per_rank_batch(3), Ok(2));
        assert!(spec.train.per_rank_batch(4).unwrap_err().contains("evenly"));
        let both = global.replace("global_batch = 6", "global_batch = 6\nbatch_size = 2");
        let err = RunSpec::from_toml(&both, "b.toml").unwrap_err().to_string();
        assert!(err.contains("train.global_batch"), "{err}");
        let uneven = GOOD.replace("lr = 0.001", "lr = 0.001\nglobal_batch = 3");
        let err = RunSpec::from_toml(&uneven, "u.toml").unwrap_err().to_string();
        assert!(err.contains("train.global_batch") && err.contains("evenly"), "{err}");
    }

    #[test]
    fn dataset_is_named_by_url_or_name_and_cases_by_one_list() {
        let by_name = GOOD.replace("url = \"/tmp/x\"", "name = \"atlas\"");
        let spec = RunSpec::from_toml(&by_name, "n.toml").unwrap();
        assert_eq!(
            (spec.dataset.name.as_deref(), spec.dataset.url.as_str()),
            (Some("atlas"), "")
        );
        assert_eq!(RunSpec::from_toml(&spec.to_toml(), "c").unwrap(), spec);
        let both = GOOD.replace("url = \"/tmp/x\"", "url = \"/tmp/x\"\nname = \"atlas\"");
        let err = RunSpec::from_toml(&both, "b.toml").unwrap_err().to_string();
        assert!(err.contains("dataset.name") && err.contains("not both"), "{err}");
        let neither = GOOD.replace("url = \"/tmp/x\"", "");
        let err = RunSpec::from_toml(&neither, "e.toml").unwrap_err().to_string();
        assert!(err.contains("dataset.url"), "{err}");
        let bad_name = GOOD.replace("url = \"/tmp/x\"", "name = \"../x\"");
        let err = RunSpec::from_toml(&bad_name, "e.toml").unwrap_err().to_string();
        assert!(err.contains("dataset.name"), "{err}");
        let lists = GOOD.replace(
            "url = \"/tmp/x\"",
            "url = \"/tmp/x\"\ncase_list = \"l.txt\"\ncases = [\"a\"]",
        );
        let err = RunSpec::from_toml(&lists, "l.toml").unwrap_err().to_string();
        assert!(err.contains("dataset.case_list"), "{err}");
        let bad_case = GOOD.replace("url = \"/tmp/x\"", "url = \"/tmp/x\"\ncases = [\"a b\"]");
        let err = RunSpec::from_toml(&bad_case, "l.toml").unwrap_err().to_string();
        assert!(err.contains("dataset.cases"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = GOOD.replace("patch = [32, 32, 32]", "patch = [32, 30, 32]");
        let err = RunSpec::from_toml(&bad, "bad.toml").unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("train.patch"), "{err}");

        let unknown = GOOD.replace("lr = 0.001", "lr = 0.001\nlearning_rate = 1");
        let err = RunSpec::from_toml(&unknown, "u.toml").unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");

        for (line, field) in [
            ("eval_window = [32, 30, 32]", "train.eval_window"),
            ("eval_overlap = 1.0", "train.eval_overlap"),
            ("eval_every = 5\neval = false", "train.eval_every"),
        ] {
            let bad = GOOD.replace("lr = 0.001", &format!("lr = 0.001\n{line}"));
            let err = RunSpec::from_toml(&bad, "e.toml").unwrap_err().to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
        let spec = RunSpec::from_toml(GOOD, "good.toml").unwrap();
        assert_eq!(
            (spec.train.eval_every, spec.train.eval_window, spec.train.eval_overlap),
            (0, None, 0.5)
        );
        assert_eq!(spec.train.eval_window_or_patch(), [32, 32, 32]);

        let arch = GOOD.replace("\"unet\"", "\"resnet\"");
        let err = RunSpec::from_toml(&arch, "a.toml").unwrap_err().to_string();
        assert!(err.contains("arch = \"resnet\"") && err.contains("swinunetr"), "{err}");
    }

    #[test]
    fn preprocess_defaults_to_suprem_and_validates_by_field() {
        let spec = RunSpec::from_toml(GOOD, "good.toml").unwrap();
        assert_eq!(spec.preprocess, PreprocessSpec::default());
        assert_eq!(spec.preprocess.spacing_mm, [1.5, 1.5, 1.5]);
        assert_eq!((spec.preprocess.hu_min, spec.preprocess.hu_max), (-175.0, 250.0));
        assert!(
            spec.to_toml().contains("[preprocess]"),
            "canonical TOML pins the settings"
        );

        let partial = format!("{GOOD}[preprocess]\nspacing_mm = [0.8, 0.8, 2.5]\n");
        let spec = RunSpec::from_toml(&partial, "p.toml").unwrap();
        assert_eq!(spec.preprocess.spacing_mm, [0.8, 0.8, 2.5]);
        assert_eq!(spec.preprocess.pos, 2, "unset knobs keep SuPreM's values");
        assert_eq!(RunSpec::from_toml(&spec.to_toml(), "canonical").unwrap(), spec);

        for (line, field) in [
            ("spacing_mm = [1.5, 0.0, 1.5]", "preprocess.spacing_mm"),
            ("spacing_mm = [1.5, 25.0, 1.5]", "preprocess.spacing_mm"),
            ("hu_max = -200.0", "preprocess.hu_max"),
            ("pos = 0\nneg = 0", "preprocess.pos"),
            ("rot90_prob = 1.5", "preprocess.rot90_prob"),
            ("shift_prob = -0.1", "preprocess.shift_prob"),
            ("shift_offset = 2.0", "preprocess.shift_offset"),
            ("spacing = 1.5", "spacing"),
        ] {
            let text = format!("{GOOD}[preprocess]\n{line}\n");
            let err = RunSpec::from_toml(&text, "bad.toml").unwrap_err().to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
    }
}
