//! The checkpoint manager: `save` and `load` mirror each other over the same named parts, so a
//! part added to one cannot be forgotten by the other.
//!
//! Parts: `model.bin` (weights and param ids), `optimizer.bin` (AdamW moments and step counts per
//! param) and `state.json` (step, samples consumed, world size, batch, seed, the RNG scheme and
//! schedule position, the weights hash). Each part's bytes are a function of the training state
//! alone (see `codec`), so the same state always gives the same files and the same hashes. Objects are written with create-only puts under a
//! prefix that names the run, the step and the attempt, so no object is ever overwritten; the
//! coordinator verifies them by hash before it commits the checkpoint, and `load` checks every
//! part against the hashes the coordinator verified before decoding it.

use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::optim::AdamW;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::tensor::backend::AutodiffBackend;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions};
use protocol::ids::checkpoint_prefix;
use protocol::pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::train::codec::{self, CodecError};
use crate::train::params;

/// Bumped when `state.json` changes meaning; older versions are refused by name.
const STATE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint part `{key}`: {message}")]
    Part { key: String, message: String },
    #[error("checkpoint part `{key}`: {source}")]
    Codec { key: String, source: CodecError },
    #[error("checkpoint at `{prefix}` lacks part `{name}`")]
    Missing { prefix: String, name: &'static str },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

/// Where the loop stands, beyond the weights and the optimiser: enough to take the next step
/// exactly as an uninterrupted run would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub format: u32,
    /// Steps completed; also the learning-rate schedule's position.
    pub step: u64,
    /// Global samples consumed: every rank's data cursor (see `train::order`).
    pub samples_consumed: u64,
    /// World size and per-rank batch of the attempt that wrote it, for the record; a resume may
    /// use others.
    pub world_size: u32,
    pub per_rank_batch: u32,
    /// Crop and augmentation randomness is derived per sample from (seed, global sample index),
    /// so this seed is the whole RNG state.
    pub seed: u64,
    pub rng: String,
    /// Next global sample each rank of the writing attempt would have read.
    pub rank_cursors: Vec<u64>,
    pub weights_sha256: String,
}

impl LoopState {
    pub fn fresh(seed: u64, world_size: u32, per_rank_batch: u32) -> Self {
        let mut state = LoopState {
            format: STATE_FORMAT,
            step: 0,
            samples_consumed: 0,
            world_size,
            per_rank_batch,
            seed,
            rng: "ChaCha8 per sample, keyed by (seed, global sample index)".into(),
            rank_cursors: vec![],
            weights_sha256: String::new(),
        };
        state.set_cursors();
        state
    }

    fn set_cursors(&mut self) {
        self.rank_cursors = (0..self.world_size)
            .map(|r| self.samples_consumed + (r * self.per_rank_batch) as u64)
            .collect();
    }

    /// Records a completed step that consumed one batch on every rank.
    pub fn advance(&mut self) {
        self.step += 1;
        self.samples_consumed += (self.world_size * self.per_rank_batch) as u64;
        self.set_cursors();
    }

    /// Continues at `world_size` ranks of `per_rank_batch` from where this state stands.
    pub fn rescale(&mut self, world_size: u32, per_rank_batch: u32) {
        self.world_size = world_size;
        self.per_rank_batch = per_rank_batch;
        self.set_cursors();
    }
}

pub type Optim<B, M> = OptimizerAdaptor<AdamW, M, B>;

/// What a load gives back: the model, its optimiser, and where the loop stands.
pub type Restored<B, M> = (M, Optim<B, M>, LoopState);

/// The checkpoint's named parts, in the order they are written and listed.
const MODEL: &str = "model.bin";
const OPTIMIZER: &str = "optimizer.bin";
const STATE: &str = "state.json";
const PARTS: [&str; 3] = [MODEL, OPTIMIZER, STATE];

/// What a save wrote: its files with their hashes, for the coordinator to verify, and the hash of
/// the weights they hold (`params::weights_checksum`), for the checkpoint's record.
#[derive(Debug, Clone)]
pub struct Saved {
    pub files: Vec<pb::CheckpointFile>,
    pub weights_sha256: String,
}

pub struct CheckpointManager {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    run_id: String,
    attempt: u32,
}

impl CheckpointManager {
    pub fn new(store: Arc<dyn ObjectStore>, root: ObjectPath, run_id: &str, attempt: u32) -> Self {
        CheckpointManager {
            store,
            root,
            run_id: run_id.to_string(),
            attempt,
        }
    }

    fn location(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}/{key}", self.root).trim_start_matches('/'))
    }

    /// Encodes every part and writes it, create-only, under this attempt's prefix for
    /// `state.step`.
    pub async fn save<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        optim: &Optim<B, M>,
        state: &LoopState,
    ) -> Result<Saved, CheckpointError> {
        let prefix = checkpoint_prefix(&self.run_id, state.step, self.attempt);
        let (parts, weights_sha256) = encode_hashed(model, optim, state)?;
        let mut files = vec![];
        for (name, bytes) in parts {
            let key = format!("{prefix}{name}");
            let sha256 = hex::encode(Sha256::digest(&bytes));
            let size = bytes.len() as u64;
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            self.store.put_opts(&self.location(&key), bytes.into(), create).await?;
            files.push(pb::CheckpointFile {
                key,
                sha256,
                bytes: size,
            });
        }
        Ok(Saved { files, weights_sha256 })
    }

    /// Reads every part of the checkpoint at `prefix`, checks each against the hash in `files`,
    /// and decodes them into `model` and `optim` (freshly built for the same spec).
    pub async fn load<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        prefix: &str,
        files: &[pb::CheckpointFile],
        model: M,
        optim: Optim<B, M>,
        device: &B::Device,
    ) -> Result<Restored<B, M>, CheckpointError> {
        let mut parts = vec![];
        for name in PARTS {
            parts.push((name.to_string(), self.read_part(prefix, files, name).await?));
        }
        decode_parts(prefix, &parts, model, optim, device)
    }

    async fn read_part(
        &self,
        prefix: &str,
        files: &[pb::CheckpointFile],
        name: &'static str,
    ) -> Result<Vec<u8>, CheckpointError> {
        let key = format!("{prefix}{name}");
        let file = files.iter().find(|f| f.key == key).ok_or(CheckpointError::Missing {
            prefix: prefix.to_string(),
            name,
        })?;
        let bad = |message: String| CheckpointError::Part {
            key: key.clone(),
            message,
        };
        let bytes = self
            .store
            .get(&self.location(&key))
            .await
            .map_err(|e| bad(format!("cannot read it: {e}")))?
            .bytes()
            .await
            .map_err(|e| bad(format!("cannot read it: {e}")))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        if bytes.len() as u64 != file.bytes || sha != file.sha256 {
            return Err(bad(format!(
                "holds {} bytes with SHA-256 {sha}; the committed checkpoint says {} bytes with {}",
                bytes.len(),
                file.bytes,
                file.sha256
            )));
        }
        Ok(bytes.to_vec())
    }
}

/// The parts of a training state, as a checkpoint stores them and a survivor serves them.
pub fn encode_parts<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    optim: &Optim<B, M>,
    state: &LoopState,
) -> Result<Parts, CheckpointError> {
    encode_hashed(model, optim, state).map(|(parts, _)| parts)
}

/// A checkpoint's parts as (file name, bytes).
type Parts = Vec<(String, Vec<u8>)>;

/// [`encode_parts`], and the weights hash that `state.json` records.
fn encode_hashed<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    optim: &Optim<B, M>,
    state: &LoopState,
) -> Result<(Parts, String), CheckpointError> {
    let codec_err = |name: &str| {
        let key = name.to_string();
        move |source| CheckpointError::Codec { key, source }
    };
    let mut state = state.clone();
    state.weights_sha256 = params::weights_checksum(model);
    let parts = vec![
        (MODEL.into(), codec::model_to_bytes(model).map_err(codec_err(MODEL))?),
        (
            OPTIMIZER.into(),
            codec::optimizer_to_bytes(optim, model).map_err(codec_err(OPTIMIZER))?,
        ),
        (
            STATE.into(),
            serde_json::to_vec_pretty(&state).expect("loop state serialises"),
        ),
    ];
    Ok((parts, state.weights_sha256))
}

/// The mirror of [`encode_parts`]: rebuilds the model, the optimiser and the loop state, and
/// checks that the loaded weights hash to what the writer recorded. `origin` names where the
/// parts came from, for errors.
pub fn decode_parts<B: AutodiffBackend, M: AutodiffModule<B>>(
    origin: &str,
    parts: &[(String, Vec<u8>)],
    model: M,
    optim: Optim<B, M>,
    device: &B::Device,
) -> Result<Restored<B, M>, CheckpointError> {
    let key = |name: &str| format!("{origin}{name}");
    let part = |name: &'static str| {
        parts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, bytes)| bytes.as_slice())
            .ok_or(CheckpointError::Missing {
                prefix: origin.to_string(),
                name,
            })
    };
    let state: LoopState = serde_json::from_slice(part(STATE)?).map_err(|e| CheckpointError::Part {
        key: key(STATE),
        message: format!("not a loop state: {e}"),
    })?;
    if state.format != STATE_FORMAT {
        return Err(CheckpointError::Part {
            key: key(STATE),
            message: format!("format {} (this worker reads {STATE_FORMAT})", state.format),
        });
    }
    let model = codec::model_from_bytes(model, part(MODEL)?, device).map_err(|source| CheckpointError::Codec {
        key: key(MODEL),
        source,
    })?;
    let optim = codec::optimizer_from_bytes(optim, part(OPTIMIZER)?, &model, device).map_err(|source| {
        CheckpointError::Codec {
            key: key(OPTIMIZER),
            source,
        }
    })?;
    let loaded = params::weights_checksum(&model);
    if loaded != state.weights_sha256 {
        return Err(CheckpointError::Part {
            key: key(MODEL),
            message: format!(
                "weights hash to {loaded} once loaded, the writer recorded {}",
                state.weights_sha256
            ),
        });
    }
    Ok((model, optim, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuTrain;
    use crate::model::{Backbone, test_unet};

    #[test]
    fn the_same_training_state_encodes_to_the_same_parts() {
        // Two builds, as two processes would do them: burn gives their params different ids.
        let build = || {
            let model = test_unet(2, 4, 2)
                .init_seeded::<CpuTrain>(&Default::default(), 3)
                .unwrap();
            let optim: Optim<CpuTrain, Backbone<CpuTrain>> = crate::train::optimizer::adamw(1e-5).init();
            (model, optim)
        };
        let ((a, a_optim), (b, b_optim)) = (build(), build());
        let state = LoopState::fresh(3, 2, 1);
        let parts = encode_parts(&a, &a_optim, &state).unwrap();
        assert_eq!(parts, encode_parts(&b, &b_optim, &state).unwrap());
        let (_, weights_sha256) = encode_hashed(&a, &a_optim, &state).unwrap();
        assert_eq!(weights_sha256, params::weights_checksum(&a));
    }

    #[test]
    fn cursors_follow_the_global_sample_count_across_world_sizes() {
        let mut s = LoopState::fresh(7, 3, 2);
        assert_eq!(s.rank_cursors, [0, 2, 4]);
        s.advance();
        assert_eq!(
            (s.step, s.samples_consumed, s.rank_cursors.clone()),
            (1, 6, vec![6, 8, 10])
        );
        s.rescale(2, 3);
        assert_eq!(s.rank_cursors, [6, 9]);
        s.advance();
        assert_eq!(s.samples_consumed, 12);
    }
}
