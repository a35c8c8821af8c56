//! The layout of a model checkpoint directory, the contract between its writer (`coordinator model
//! import`), the coordinator (which checks `model.init_from` at submit) and the worker (which
//! starts a run from it).
//!
//! Such a directory holds the model blob in the encoding run checkpoints use, under the same name,
//! so a run's own checkpoint prefix is a valid `model.init_from` too; an imported one adds a small
//! JSON manifest saying what the blob is and where it came from.

use serde::{Deserialize, Serialize};

use crate::model_spec::ModelSpec;

/// The model blob (`worker::train::codec::model_to_bytes`), named as in a run checkpoint.
pub const MODEL_FILE: &str = "model.bin";
/// A run checkpoint's loop state (`worker::train::checkpoint::LoopState`), which records the
/// weights' checksum; absent from an imported directory.
pub const STATE_FILE: &str = "state.json";
/// The manifest of an imported directory; absent from a run checkpoint.
pub const MANIFEST_FILE: &str = "voxelfleet-model.json";
/// Bumped when the manifest changes meaning.
pub const MANIFEST_FORMAT: u32 = 1;

/// What an imported model directory holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub format: u32,
    /// `model.arch`, repeated here so a reader need not understand the whole spec table.
    pub arch: String,
    /// The `[model]` table the blob's backbone was built from.
    pub model: ModelSpec,
    /// Output channels (classes) of the backbone.
    pub out_channels: u32,
    /// Parameters, counted as PyTorch counts them.
    pub params: u64,
    /// `worker::train::params::weights_checksum` of the weights in the blob.
    pub weights_sha256: String,
    /// The PyTorch file the weights came from.
    pub source: ManifestSource,
    /// State-dict tensors loaded into the model.
    pub loaded: u64,
    /// State-dict keys the model did not use (e.g. heads of a training wrapper).
    pub unused: Vec<String>,
    pub created_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestSource {
    /// File name, without its directory.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}
