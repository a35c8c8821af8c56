//! PyTorch interoperability: load a PyTorch state dict (MONAI's models, SuPreM's released files)
//! into a [`Backbone`], and write a backbone's weights under PyTorch's key names.
//!
//! Each architecture maps only its module paths ([`ArchConfig::torch_module_path`]); what differs
//! between burn and PyTorch leaf by leaf is handled once, here:
//! - norm layers call their affine parameters `gamma`/`beta` in burn, `weight`/`bias` in PyTorch;
//! - burn's `Linear` stores its weight `[in, out]`, PyTorch `[out, in]`;
//! - BatchNorm's `num_batches_tracked` has no burn counterpart: ignored on import, written as 0
//!   on export (it only matters to PyTorch when momentum is None).
//!
//! Checkpoints wrap the state dict in different ways: weights under `net` (SuPreM),
//! `state_dict` (MONAI bundles, Lightning) or `model`, or at the top level; keys prefixed by
//! `module.` (DataParallel/DDP) and `backbone.` (SuPreM's wrapper). All of them are accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_store::TensorSnapshot;
use burn_store::pytorch::PytorchReader;

use super::{Backbone, ModelConfig};

#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    #[error("{file}: cannot read as a PyTorch checkpoint: {message}")]
    Read { file: String, message: String },
    #[error("{file}: no tensors found (looked under `net`, `state_dict`, `model` and the top level)")]
    Empty { file: String },
    #[error(
        "{source_name}: the {arch} model needs {} tensor(s) the checkpoint lacks, e.g. {}",
        missing.len(),
        missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
    )]
    Missing {
        source_name: String,
        arch: &'static str,
        missing: Vec<String>,
    },
    #[error("{source_name}: tensor `{key}` has shape {found:?}, the {arch} model expects {expected:?}")]
    Shape {
        source_name: String,
        arch: &'static str,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{source_name}: tensor `{key}`: {message}")]
    Data {
        source_name: String,
        key: String,
        message: String,
    },
    #[error("{file}: cannot write: {message}")]
    Write { file: String, message: String },
    /// What the file claims does not match what it holds (see [`super::pth_audit`]).
    #[error("{file}: {source}")]
    Audit {
        file: String,
        source: super::pth_audit::AuditError,
    },
    #[error(
        "{source_name}: tensor `{key}` holds {count} non-finite value(s) (NaN or infinite) of {total}: \
         these weights cannot be trained from; take them from a checkpoint saved before they diverged"
    )]
    NonFinite {
        source_name: String,
        key: String,
        count: usize,
        total: usize,
    },
}

/// A PyTorch state dict, keys normalised (wrapper prefixes stripped), tensors read lazily.
pub struct TorchStateDict {
    /// Where it came from, for error messages.
    pub source_name: String,
    tensors: HashMap<String, TensorSnapshot>,
}

/// Wrapper keys checkpoints keep the weights under, tried in this order before the top level.
const WRAPPER_KEYS: [&str; 3] = ["net", "state_dict", "model"];
/// Key prefixes added by DataParallel/DDP and by SuPreM's model wrapper.
const KEY_PREFIXES: [&str; 2] = ["module.", "backbone."];

impl TorchStateDict {
    /// Reads a `.pth`/`.pt` file written by `torch.save`.
    pub fn read_pth(path: &Path) -> Result<Self, InteropError> {
        let file = path.display().to_string();
        let mut last_error = None;
        let mut found = None;
        for key in WRAPPER_KEYS {
            match PytorchReader::with_top_level_key(path, key) {
                Ok(reader) if !reader.is_empty() => {
                    found = Some(reader.into_tensors());
                    break;
                }
                Ok(_) => {}
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        let tensors = match found {
            Some(t) => t,
            None => match PytorchReader::new(path) {
                Ok(reader) => reader.into_tensors(),
                Err(e) => {
                    return Err(InteropError::Read {
                        file,
                        message: last_error.map_or(e.to_string(), |l| format!("{e} ({l})")),
                    });
                }
            },
        };
        if tensors.is_empty() {
            return Err(InteropError::Empty { file });
        }
        // burn-store reads a short or missing storage as zeros: refuse such a file outright.
        super::pth_audit::audit_pth(path).map_err(|source| InteropError::Audit {
            file: file.clone(),
            source,
        })?;
        Ok(Self::from_tensors(file, tensors))
    }

    /// Wraps tensors already read; keys are normalised here.
    pub fn from_tensors(source_name: String, tensors: HashMap<String, TensorSnapshot>) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(key, snapshot)| (normalise_key(&key), snapshot))
            .collect();
        Self { source_name, tensors }
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor of the dict as `f32` (fp16/bf16/f64 converted), with its shape.
    pub fn float(&self, key: &str) -> Result<Option<TensorData>, InteropError> {
        let Some(snapshot) = self.tensors.get(key) else {
            return Ok(None);
        };
        snapshot
            .to_data()
            .map(|d| Some(d.convert::<f32>()))
            .map_err(|e| InteropError::Data {
                source_name: self.source_name.clone(),
                key: key.to_string(),
                message: format!("{e:?}"),
            })
    }
}

fn normalise_key(key: &str) -> String {
    let mut key = key;
    loop {
        match KEY_PREFIXES.iter().find_map(|p| key.strip_prefix(p)) {
            Some(rest) => key = rest,
            None => return key.to_string(),
        }
    }
}

/// What [`load_torch_state_dict`] did besides loading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportReport {
    /// Tensors loaded into the model.
    pub loaded: usize,
    /// Keys of the state dict nothing in the model took (sorted), e.g. a wrapper's extra heads.
    pub unused: Vec<String>,
}

const NORM_TYPES: [&str; 4] = [
    "Struct:BatchNorm",
    "Struct:GroupNorm",
    "Struct:LayerNorm",
    "Struct:InstanceNorm",
];

/// Where one burn tensor lives in a PyTorch state dict.
struct TorchSlot {
    key: String,
    /// burn `Linear` weights are stored transposed.
    transposed: bool,
}

/// Tracks the module path while a visitor or mapper walks a [`Backbone`].
#[derive(Default)]
struct PathTracker {
    /// (field name, type of the struct holding it), from the root down.
    path: Vec<(String, String)>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        self.path.push((name.to_string(), container.to_string()));
    }

    fn exit(&mut self) {
        self.path.pop();
    }

    /// The PyTorch slot of the tensor at the current path; `None` if PyTorch has none. The first
    /// path segment is the [`Backbone`] variant.
    fn slot(&self, config: &ModelConfig) -> Option<TorchSlot> {
        let (leaf, container) = self.path.last()?;
        let modules: Vec<&str> = self.path[1..self.path.len() - 1]
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        let module = config.torch_module_path(&modules.join("."))?;
        let is_norm = NORM_TYPES.contains(&container.as_str());
        let leaf = match leaf.as_str() {
            "gamma" if is_norm => "weight",
            "beta" if is_norm => "bias",
            other => other,
        };
        Some(TorchSlot {
            key: if module.is_empty() {
                leaf.to_string()
            } else {
                format!("{module}.{leaf}")
            },
            transposed: container == "Struct:Linear" && leaf == "weight",
        })
    }

    fn is_batch_norm(&self) -> bool {
        self.path
            .last()
            // BatchNorm3d: model::batchnorm's PyTorch-exact BatchNorm (the U-Net's).
            .is_some_and(|(_, container)| matches!(container.as_str(), "Struct:BatchNorm" | "Struct:BatchNorm3d"))
    }
}

/// Loads every tensor of `model` from `dict`. Every tensor must be present with the expected
/// shape and finite values (a NaN weight trains on silently: ReLU and max-pooling can hide it
/// from the loss); keys the model does not use are returned in the report (SuPreM's files carry heads of
/// their training wrapper), never an error.
pub fn load_torch_state_dict<B: Backend>(
    model: Backbone<B>,
    config: &ModelConfig,
    dict: &TorchStateDict,
) -> Result<(Backbone<B>, ImportReport), InteropError> {
    struct Load<'a> {
        config: &'a ModelConfig,
        dict: &'a TorchStateDict,
        tracker: PathTracker,
        used: HashSet<String>,
        missing: Vec<String>,
        error: Option<InteropError>,
    }
    impl Load<'_> {
        /// The values for the tensor at the current path, in burn's layout.
        fn values(&mut self, dims: &[usize], int: bool) -> Option<TensorData> {
            if self.error.is_some() {
                return None;
            }
            let slot = self.tracker.slot(self.config)?;
            let source_name = &self.dict.source_name;
            let data = match self.dict.tensors.get(&slot.key) {
                None => {
                    self.missing.push(slot.key);
                    return None;
                }
                Some(snapshot) => match snapshot.to_data() {
                    Ok(d) => d,
                    Err(e) => {
                        self.error = Some(InteropError::Data {
                            source_name: source_name.clone(),
                            key: slot.key,
                            message: format!("{e:?}"),
                        });
                        return None;
                    }
                },
            };
            let mut expected = dims.to_vec();
            if slot.transposed {
                expected.reverse();
            }
            if data.shape.as_slice() != expected.as_slice() {
                self.error = Some(InteropError::Shape {
                    source_name: source_name.clone(),
                    arch: self.config.arch(),
                    key: slot.key,
                    found: data.shape.to_vec(),
                    expected,
                });
                return None;
            }
            let data = if int {
                data.convert::<i64>()
            } else {
                data.convert::<f32>()
            };
            let count = if int { 0 } else { count_non_finite(&data) };
            if count > 0 {
                self.error = Some(InteropError::NonFinite {
                    source_name: source_name.clone(),
                    key: slot.key,
                    count,
                    total: data.num_elements(),
                });
                return None;
            }
            self.used.insert(slot.key);
            Some(if slot.transposed { transpose_2d(data) } else { data })
        }
    }
    impl<B: Backend> ModuleMapper<B> for Load<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.tracker.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|tensor| match self.values(&tensor.dims(), false) {
                Some(values) => {
                    let require_grad = tensor.is_require_grad();
                    let loaded = Tensor::from_data(values, &tensor.device());
                    if require_grad { loaded.require_grad() } else { loaded }
                }
                None => tensor,
            })
        }
        fn map_int<const D: usize>(&mut self, param: Param<Tensor<B, D, Int>>) -> Param<Tensor<B, D, Int>> {
            param.map(|tensor| match self.values(&tensor.dims(), true) {
                Some(values) => Tensor::from_data(values, &tensor.device()),
                None => tensor,
            })
        }
    }

    let mut load = Load {
        config,
        dict,
        tracker: PathTracker::default(),
        used: HashSet::new(),
        missing: Vec::new(),
        error: None,
    };
    let model = model.map(&mut load);
    if let Some(err) = load.error {
        return Err(err);
    }
    if !load.missing.is_empty() {
        return Err(InteropError::Missing {
            source_name: dict.source_name.clone(),
            arch: config.arch(),
            missing: load.missing,
        });
    }
    let mut unused: Vec<String> = dict
        .keys()
        .filter(|k| !load.used.contains(*k) && !k.ends_with("num_batches_tracked"))
        .map(str::to_string)
        .collect();
    unused.sort();
    Ok((
        model,
        ImportReport {
            loaded: load.used.len(),
            unused,
        },
    ))
}

/// NaNs and infinities in an `f32` tensor.
fn count_non_finite(data: &TensorData) -> usize {
    let count = |values: &[f32]| values.iter().filter(|v| !v.is_finite()).count();
    match data.as_slice::<f32>() {
        Ok(values) => count(values),
        // Bytes not aligned for f32: count over a copy.
        Err(_) => count(&data.to_vec::<f32>().expect("converted to f32")),
    }
}

fn transpose_2d(data: TensorData) -> TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    match data.dtype {
        DType::I64 => {
            let v = data.to_vec::<i64>().expect("converted to i64");
            TensorData::new(transposed(&v, rows, cols), [cols, rows])
        }
        _ => {
            let v = data.to_vec::<f32>().expect("converted to f32");
            TensorData::new(transposed(&v, rows, cols), [cols, rows])
        }
    }
}

fn transposed<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
        .collect()
}

/// The model's tensors under PyTorch's key names and layouts, sorted by key, with BatchNorm's
/// `num_batches_tracked` (int64 scalar 0) added, as `model.state_dict()` would hold them.
pub fn torch_state_dict<B: Backend>(model: &Backbone<B>, config: &ModelConfig) -> BTreeMap<String, TensorData> {
    struct Export<'a> {
        config: &'a ModelConfig,
        tracker: PathTracker,
        out: BTreeMap<String, TensorData>,
    }
    impl Export<'_> {
        fn put(&mut self, data: TensorData) {
            let Some(slot) = self.tracker.slot(self.config) else {
                return;
            };
            if self.tracker.is_batch_norm()
                && let Some(module) = slot.key.rsplit_once('.').map(|(m, _)| m.to_string())
            {
                self.out.insert(
                    format!("{module}.num_batches_tracked"),
                    TensorData::new(vec![0i64], Vec::<usize>::new()),
                );
            }
            let data = if slot.transposed { transpose_2d(data) } else { data };
            self.out.insert(slot.key, data);
        }
    }
    impl<B: Backend> ModuleVisitor<B> for Export<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.tracker.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.put(param.val().into_data().convert::<f32>());
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
            self.put(param.val().into_data().convert::<i64>());
        }
    }
    let mut export = Export {
        config,
        tracker: PathTracker::default(),
        out: BTreeMap::new(),
    };
    model.visit(&mut export);
    export.out
}

/// Writes tensors (f32 or i64) as a safetensors file, the format `safetensors.torch.load_file`
/// reads into a state dict that `model.load_state_dict` accepts. It writes `path` itself: the
/// caller picks a temporary name and renames it (`coordinator model export` does, and cleans up).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    metadata: HashMap<String, String>,
) -> Result<(), InteropError> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(key, data)| {
            let dtype = match data.dtype {
                DType::I64 => safetensors::Dtype::I64,
                DType::F32 => safetensors::Dtype::F32,
                other => unreachable!("torch_state_dict converts every tensor to f32 or i64, got {other:?}"),
            };
            let view = safetensors::tensor::TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
                .expect("a TensorData's bytes match its shape and dtype");
            (key.clone(), view)
        })
        .collect();
    let write_err = |message: String| InteropError::Write {
        file: path.display().to_string(),
        message,
    };
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn small() -> ModelConfig {
        let spec = protocol::spec::ModelSpec::Unet(protocol::spec::UnetSpec {
            base_width: Some(2),
            depth: Some(2),
            ..Default::default()
        });
        ModelConfig::from_spec(&spec, 3).unwrap()
    }

    #[test]
    fn prefixes_are_stripped_in_any_combination() {
        assert_eq!(normalise_key("module.backbone.down.0.weight"), "down.0.weight");
        assert_eq!(normalise_key("module.conv.bias"), "conv.bias");
        assert_eq!(normalise_key("backbone.x"), "x");
        assert_eq!(normalise_key("modules.x"), "modules.x");
    }

    #[test]
    fn export_then_import_round_trips_and_names_torch_leaves() {
        let config = small();
        let device = Default::default();
        let a: Backbone<Cpu> = config.init_seeded(&device, 1).unwrap();
        let dict = torch_state_dict(&a, &config);
        assert!(
            dict.keys().all(|k| !k.contains("gamma") && !k.contains("beta")),
            "{:?}",
            dict.keys()
        );
        let snapshots: HashMap<String, TensorSnapshot> = dict
            .iter()
            .map(|(k, d)| {
                (
                    format!("module.{k}"),
                    TensorSnapshot::from_data(d.clone(), vec![k.clone()], vec![], burn::module::ParamId::new()),
                )
            })
            .collect();
        let dict = TorchStateDict::from_tensors("mem".into(), snapshots);
        let b: Backbone<Cpu> = config.init_seeded(&device, 2).unwrap();
        assert_ne!(
            crate::train::params::weights_checksum(&a),
            crate::train::params::weights_checksum(&b)
        );
        let (b, report) = load_torch_state_dict(b, &config, &dict).unwrap();
        assert_eq!(
            crate::train::params::weights_checksum(&a),
            crate::train::params::weights_checksum(&b)
        );
        assert!(report.unused.is_empty(), "{:?}", report.unused);
    }

    #[test]
    fn a_missing_or_misshapen_tensor_is_an_error_naming_it() {
        let config = small();
        let device = Default::default();
        let model: Backbone<Cpu> = config.init(&device);
        let mut dict = torch_state_dict(&model, &config);
        let (key, data) = dict.pop_first().unwrap();
        let to_dict = |d: &BTreeMap<String, TensorData>| {
            TorchStateDict::from_tensors(
                "f.pth".into(),
                d.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            TensorSnapshot::from_data(v.clone(), vec![k.clone()], vec![], burn::module::ParamId::new()),
                        )
                    })
                    .collect(),
            )
        };
        let err = load_torch_state_dict(config.init::<Cpu>(&device), &config, &to_dict(&dict)).unwrap_err();
        assert!(
            err.to_string().contains(&key) && err.to_string().contains("f.pth"),
            "{err}"
        );
        let n = data.num_elements();
        // [n, 1] is misshapen whatever the first tensor is (a 1-D bias included).
        dict.insert(key.clone(), TensorData::new(vec![0f32; n], [n, 1]));
        let err = load_torch_state_dict(config.init::<Cpu>(&device), &config, &to_dict(&dict)).unwrap_err();
        assert!(
            matches!(err, InteropError::Shape { .. }) && err.to_string().contains(&key),
            "{err}"
        );
    }
}
