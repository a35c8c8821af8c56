//! Checkpoint (de)serialisation of the model and the optimiser state to bytes; the caller puts
//! the bytes in the object store and verifies them by hash.
//!
//! burn's `NamedMpkBytesRecorder` does the tensor encoding (full f32 precision). It is chosen
//! over `BinBytesRecorder` because the latter `unwrap()`s its decode and would panic on a
//! truncated blob. burn's `load_record` itself panics or silently misloads when the record was
//! written for another architecture, so each blob starts with a small header recording what it
//! is and, for models, the layout (param shapes) it was written for; loading checks the header
//! first and returns an error instead.
//!
//! The bytes are a function of the weights and the optimiser state: param ids are written as
//! their module paths give them (see `train::path_ids`), and the optimiser state in the order of
//! those ids. The layout is burn's either way, so the decoders read blobs written with burn's
//! random ids (before that) unchanged, and the magic stays at version 1.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::Optimizer;
use burn::optim::SimpleOptimizer;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::record::{BurnRecord, FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

use crate::train::path_ids;

type BytesRecorder = NamedMpkBytesRecorder<FullPrecisionSettings>;

const MODEL_MAGIC: &[u8; 8] = b"VFMODEL1";
const OPTIM_MAGIC: &[u8; 8] = b"VFOPTIM1";
/// Magic, then tensor count (u64 LE), value count (u64 LE), SHA-256 of the shape list.
const MODEL_HEADER_LEN: usize = 8 + 8 + 8 + 32;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a {expected} blob (bad magic or truncated header)")]
    BadHeader { expected: &'static str },
    #[error(
        "checkpoint was written for a model with {saved_tensors} float tensors / {saved_values} \
         values, this model has {tensors} / {values}{layout}"
    )]
    LayoutMismatch {
        saved_tensors: u64,
        saved_values: u64,
        tensors: u64,
        values: u64,
        layout: &'static str,
    },
    #[error(
        "optimiser state refers to {unknown} parameter(s) this model does not have; load the \
         model from the same checkpoint first"
    )]
    ForeignOptimizerState { unknown: usize },
    #[error("record encoding failed: {0}")]
    Encode(String),
    #[error("record decoding failed: {0}")]
    Decode(String),
}

/// Shapes of the float params in visit order, and a digest of them.
struct Layout {
    tensors: u64,
    values: u64,
    digest: [u8; 32],
}

fn layout<B: Backend, M: Module<B>>(model: &M) -> Layout {
    struct Shapes {
        hash: Sha256,
        tensors: u64,
        values: u64,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let dims = param.val().dims();
            self.tensors += 1;
            self.values += dims.iter().product::<usize>() as u64;
            self.hash.update((D as u64).to_le_bytes());
            for dim in dims {
                self.hash.update((dim as u64).to_le_bytes());
            }
        }
    }
    let mut shapes = Shapes {
        hash: Sha256::new(),
        tensors: 0,
        values: 0,
    };
    model.visit(&mut shapes);
    Layout {
        tensors: shapes.tensors,
        values: shapes.values,
        digest: shapes.hash.finalize().into(),
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Serialises the model's weights, with param ids derived from their paths (the optimiser
/// state is keyed by them).
pub fn model_to_bytes<B: Backend, M: Module<B>>(model: &M) -> Result<Vec<u8>, CodecError> {
    let renames = path_ids::renames(model).map_err(CodecError::Encode)?;
    let mut body = BytesRecorder::default()
        .record(model.clone().into_record(), ())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    path_ids::rename_in_record(&mut body, &renames).map_err(CodecError::Encode)?;
    Ok(with_model_header(model, &body))
}

/// The header [`model_from_bytes`] checks, then `body`.
fn with_model_header<B: Backend, M: Module<B>>(model: &M, body: &[u8]) -> Vec<u8> {
    let layout = layout::<B, M>(model);
    let mut bytes = Vec::with_capacity(MODEL_HEADER_LEN + body.len());
    bytes.extend_from_slice(MODEL_MAGIC);
    bytes.extend_from_slice(&layout.tensors.to_le_bytes());
    bytes.extend_from_slice(&layout.values.to_le_bytes());
    bytes.extend_from_slice(&layout.digest);
    bytes.extend_from_slice(body);
    bytes
}

/// Loads weights written by [`model_to_bytes`] into `model`, a freshly initialised module of
/// the same config (it supplies the structure and the device). Refuses blobs written for a
/// different architecture.
pub fn model_from_bytes<B: Backend, M: Module<B>>(model: M, bytes: &[u8], device: &B::Device) -> Result<M, CodecError> {
    if bytes.len() < MODEL_HEADER_LEN || &bytes[..8] != MODEL_MAGIC {
        return Err(CodecError::BadHeader { expected: "model" });
    }
    let expected = layout::<B, M>(&model);
    let (saved_tensors, saved_values) = (u64_at(bytes, 8), u64_at(bytes, 16));
    let same_counts = saved_tensors == expected.tensors && saved_values == expected.values;
    if !same_counts || bytes[24..MODEL_HEADER_LEN] != expected.digest {
        return Err(CodecError::LayoutMismatch {
            saved_tensors,
            saved_values,
            tensors: expected.tensors,
            values: expected.values,
            layout: if same_counts {
                " (same sizes, different shapes)"
            } else {
                ""
            },
        });
    }
    let record = BytesRecorder::default()
        .load(bytes[MODEL_HEADER_LEN..].to_vec(), device)
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(model.load_record(record))
}

/// Serialises an optimiser's state (AdamW moments and step counts per param) for `model`, the
/// module it steps: keyed by the ids [`model_to_bytes`] writes for `model`'s params, sorted by
/// them (burn's own record is a hash map, whose order changes from one process to the next).
pub fn optimizer_to_bytes<B, M, O>(optim: &OptimizerAdaptor<O, M, B>, model: &M) -> Result<Vec<u8>, CodecError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: SimpleOptimizer<B::InnerBackend>,
{
    let renames = path_ids::renames(model).map_err(CodecError::Encode)?;
    let record = optim.to_record();
    let unknown = record.keys().filter(|id| !renames.contains_key(id)).count();
    if unknown > 0 {
        return Err(CodecError::ForeignOptimizerState { unknown });
    }
    let items: BTreeMap<String, _> = record
        .into_iter()
        .map(|(id, state)| (renames[&id].serialize(), state.into_item::<FullPrecisionSettings>()))
        .collect();
    let recorder = BytesRecorder::default();
    let body = Recorder::<B>::save_item(&recorder, BurnRecord::<_, B>::new::<BytesRecorder>(items), ())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut bytes = Vec::with_capacity(OPTIM_MAGIC.len() + body.len());
    bytes.extend_from_slice(OPTIM_MAGIC);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Loads state written by [`optimizer_to_bytes`] into `optim`. The state is keyed by param id,
/// so `model` must be the one loaded from the same checkpoint (its ids come from the blob); a
/// state naming params `model` lacks is refused rather than silently ignored.
pub fn optimizer_from_bytes<B, M, O>(
    optim: OptimizerAdaptor<O, M, B>,
    bytes: &[u8],
    model: &M,
    device: &B::Device,
) -> Result<OptimizerAdaptor<O, M, B>, CodecError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: SimpleOptimizer<B::InnerBackend>,
{
    let Some(body) = bytes.strip_prefix(OPTIM_MAGIC.as_slice()) else {
        return Err(CodecError::BadHeader { expected: "optimizer" });
    };
    let record: <OptimizerAdaptor<O, M, B> as Optimizer<M, B>>::Record = BytesRecorder::default()
        .load(body.to_vec(), device)
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    let known: HashSet<ParamId> = burn::module::list_param_ids(model).into_iter().collect();
    let unknown = record.keys().filter(|id| !known.contains(id)).count();
    if unknown > 0 {
        return Err(CodecError::ForeignOptimizerState { unknown });
    }
    Ok(optim.load_record(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuTrain};
    use crate::model::{Backbone, ModelConfig, test_unet};
    use crate::train::loss::bce_dice_loss;
    use crate::train::params::weights_checksum;
    use burn::module::list_param_ids;
    use burn::optim::{AdamW, GradientsParams};
    use burn::tensor::TensorData;

    fn small() -> ModelConfig {
        test_unet(2, 4, 2)
    }

    type Optim = OptimizerAdaptor<AdamW, Backbone<CpuTrain>, CpuTrain>;

    fn step(model: Backbone<CpuTrain>, optim: &mut Optim, seed: u64) -> Backbone<CpuTrain> {
        let device = Default::default();
        let image: Vec<f32> = (0..512)
            .map(|i| ((i as u64 * 2654435761 + seed) % 97) as f32 / 97.0)
            .collect();
        let labels: Vec<f32> = image.iter().chain(&image).map(|v| (*v > 0.6) as u8 as f32).collect();
        let x = Tensor::from_data(TensorData::new(image, [1, 1, 8, 8, 8]), &device);
        let y = Tensor::from_data(TensorData::new(labels, [1, 2, 8, 8, 8]), &device);
        let loss = bce_dice_loss(model.forward(x), y).total;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(1e-3, model, grads)
    }

    /// What a process holds after building the model from `seed` and taking two steps: the
    /// weights and the optimiser, under that process's random param ids.
    fn trained(seed: u64) -> (Backbone<CpuTrain>, Optim) {
        let mut optim: Optim = crate::train::optimizer::adamw(1e-5).init();
        let mut model = small().init_seeded::<CpuTrain>(&Default::default(), seed).unwrap();
        for s in 0..2 {
            model = step(model, &mut optim, s);
        }
        (model, optim)
    }

    #[test]
    fn the_same_weights_and_optimiser_state_encode_to_the_same_bytes() {
        let device = Default::default();
        // Built twice, as two processes would: the same values under different random ids
        // (BatchNorm's running statistics included).
        let (a, a_optim) = trained(5);
        let (b, b_optim) = trained(5);
        assert_eq!(weights_checksum(&a), weights_checksum(&b));
        assert_ne!(list_param_ids::<_, CpuTrain>(&a), list_param_ids::<_, CpuTrain>(&b));
        let bytes = model_to_bytes(&a).unwrap();
        assert_eq!(bytes, model_to_bytes(&b).unwrap());
        let optim_bytes = optimizer_to_bytes(&a_optim, &a).unwrap();
        assert_eq!(optim_bytes, optimizer_to_bytes(&b_optim, &b).unwrap());

        // Loaded back, they encode to the bytes they came from.
        let loaded = model_from_bytes(small().init::<CpuTrain>(&device), &bytes, &device).unwrap();
        let adamw = crate::train::optimizer::adamw(1e-5);
        let loaded_optim: Optim = optimizer_from_bytes(adamw.init(), &optim_bytes, &loaded, &device).unwrap();
        assert_eq!(model_to_bytes(&loaded).unwrap(), bytes);
        assert_eq!(optimizer_to_bytes(&loaded_optim, &loaded).unwrap(), optim_bytes);

        // Other weights, other bytes.
        let (c, c_optim) = trained(6);
        assert_ne!(model_to_bytes(&c).unwrap(), bytes);
        assert_ne!(optimizer_to_bytes(&c_optim, &c).unwrap(), optim_bytes);
    }

    /// `model.bin` and `optimizer.bin` as the previous release wrote them: burn's records as they
    /// come, under the process's random param ids, the optimiser state in hash-map order.
    fn legacy_bytes(model: &Backbone<CpuTrain>, optim: &Optim) -> (Vec<u8>, Vec<u8>) {
        let body = BytesRecorder::default()
            .record(model.clone().into_record(), ())
            .unwrap();
        let optim_body = BytesRecorder::default().record(optim.to_record(), ()).unwrap();
        (
            with_model_header(model, &body),
            [OPTIM_MAGIC.as_slice(), optim_body.as_slice()].concat(),
        )
    }

    #[test]
    fn blobs_written_under_random_ids_still_load_and_resume_exactly() {
        let device = Default::default();
        let adamw = crate::train::optimizer::adamw(1e-5);
        let (model, mut optim) = trained(5);
        let (model_bytes, optim_bytes) = legacy_bytes(&model, &optim);
        assert_ne!(
            model_bytes,
            model_to_bytes(&model).unwrap(),
            "the legacy writer keeps burn's ids"
        );

        let resumed_model = model_from_bytes(small().init::<CpuTrain>(&device), &model_bytes, &device).unwrap();
        let mut resumed_optim: Optim =
            optimizer_from_bytes(adamw.init(), &optim_bytes, &resumed_model, &device).unwrap();
        // The next save writes the bytes the state itself gives.
        assert_eq!(model_to_bytes(&resumed_model).unwrap(), model_to_bytes(&model).unwrap());
        assert_eq!(
            optimizer_to_bytes(&resumed_optim, &resumed_model).unwrap(),
            optimizer_to_bytes(&optim, &model).unwrap()
        );
        // And the optimiser state applies: the next step is the uninterrupted one.
        let continued = step(model, &mut optim, 2);
        let resumed = step(resumed_model, &mut resumed_optim, 2);
        assert_eq!(weights_checksum(&continued), weights_checksum(&resumed));
    }

    #[test]
    fn model_round_trip_keeps_the_checksum() {
        let device = Default::default();
        let model = small().init_seeded::<Cpu>(&device, 1).unwrap();
        let bytes = model_to_bytes(&model).unwrap();
        let fresh = small().init_seeded::<Cpu>(&device, 2).unwrap();
        assert_ne!(weights_checksum(&model), weights_checksum(&fresh));
        let loaded = model_from_bytes(fresh, &bytes, &device).unwrap();
        assert_eq!(weights_checksum(&model), weights_checksum(&loaded));
    }

    #[test]
    fn model_from_bytes_refuses_other_layouts_and_garbage() {
        let device = Default::default();
        let bytes = model_to_bytes(&small().init::<Cpu>(&device)).unwrap();
        let wider = test_unet(2, 8, 2).init::<Cpu>(&device);
        let err = model_from_bytes(wider, &bytes, &device).unwrap_err();
        assert!(matches!(err, CodecError::LayoutMismatch { .. }), "{err}");
        let deeper = test_unet(2, 4, 3).init::<Cpu>(&device);
        assert!(model_from_bytes(deeper, &bytes, &device).is_err());

        let model = small().init::<Cpu>(&device);
        let err = model_from_bytes(model.clone(), &bytes[..20], &device).unwrap_err();
        assert!(matches!(err, CodecError::BadHeader { .. }), "{err}");
        let err = model_from_bytes(model.clone(), &bytes[..bytes.len() / 2], &device).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err}");
        let err = model_from_bytes(model, b"VFOPTIM1 not a model at all, not at all....", &device).unwrap_err();
        assert!(matches!(err, CodecError::BadHeader { .. }), "{err}");
    }

    #[test]
    fn optimizer_round_trip_resumes_exactly() {
        let device = Default::default();
        let config = small();
        let adamw = crate::train::optimizer::adamw(1e-5);
        let mut optim: Optim = adamw.init();
        let mut model = config.init_seeded::<CpuTrain>(&device, 5).unwrap();
        for seed in 0..2 {
            model = step(model, &mut optim, seed);
        }
        let model_bytes = model_to_bytes(&model).unwrap();
        let optim_bytes = optimizer_to_bytes(&optim, &model).unwrap();

        // Uninterrupted run.
        let continued = step(model, &mut optim, 2);

        // Resumed run: a fresh process builds a model and optimiser, then loads both blobs.
        let resumed_model = model_from_bytes(config.init::<CpuTrain>(&device), &model_bytes, &device).unwrap();
        let mut resumed_optim: Optim =
            optimizer_from_bytes(adamw.init(), &optim_bytes, &resumed_model, &device).unwrap();
        let resumed = step(resumed_model, &mut resumed_optim, 2);
        assert_eq!(weights_checksum(&continued), weights_checksum(&resumed));

        // Without the optimiser state the next step differs (AdamW's moments matter).
        let resumed_model = model_from_bytes(config.init::<CpuTrain>(&device), &model_bytes, &device).unwrap();
        let mut fresh_optim: Optim = adamw.init();
        let cold = step(resumed_model, &mut fresh_optim, 2);
        assert_ne!(weights_checksum(&continued), weights_checksum(&cold));
    }

    #[test]
    fn optimizer_state_for_other_params_is_refused() {
        let device = Default::default();
        let adamw = crate::train::optimizer::adamw(0.0);
        let mut optim: Optim = adamw.init();
        let model = step(small().init::<CpuTrain>(&device), &mut optim, 0);
        let bytes = optimizer_to_bytes(&optim, &model).unwrap();
        // A model initialised afresh has burn's random ids: the state would silently not apply.
        let other = small().init::<CpuTrain>(&device);
        let err = optimizer_from_bytes::<CpuTrain, _, _>(adamw.init(), &bytes, &other, &device)
            .err()
            .unwrap();
        assert!(matches!(err, CodecError::ForeignOptimizerState { .. }), "{err}");
        // The state is keyed by the ids the model's blob carries, so it applies to the model
        // loaded from that blob.
        let model = model_from_bytes(
            small().init::<CpuTrain>(&device),
            &model_to_bytes(&model).unwrap(),
            &device,
        )
        .unwrap();
        assert!(optimizer_from_bytes::<CpuTrain, _, _>(adamw.init(), &bytes, &model, &device).is_ok());
        let err = optimizer_from_bytes::<CpuTrain, _, _>(adamw.init(), b"VFMODEL1", &model, &device)
            .err()
            .unwrap();
        assert!(matches!(err, CodecError::BadHeader { .. }), "{err}");
    }
}
