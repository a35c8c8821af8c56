//! Stops a run whose numbers stop being numbers, before it checkpoints them.
//!
//! A NaN weight trains on without complaint (ReLU and max-pooling can keep it out of the loss),
//! and every checkpoint after it carries it on. So each step checks its loss and its averaged
//! gradients, and the weights are checked wherever they are read back anyway (their checksum)
//! and before every checkpoint. The gradient check reads the all-reduced buffer, the same on
//! every rank, so every rank stops at the same step with the same cause.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sha2::{Digest, Sha256};

use crate::train::loss::LossParts;
use crate::train::params::to_f32;

const STOPPED: &str = "the run is stopped before it checkpoints them: if it started from model.init_from, \
                       check those weights; otherwise lower train.lr";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NonFinite {
    #[error("step {step}: the loss is not finite (total {total}, bce {bce}, dice {dice}); {STOPPED}")]
    Loss { step: u64, total: f32, bce: f32, dice: f32 },
    #[error("step {step}: {kind} `{tensor}` holds {count} non-finite value(s) (NaN or infinite) of {len}; {STOPPED}")]
    Tensor {
        step: u64,
        /// "weight" or "averaged gradient".
        kind: &'static str,
        tensor: String,
        count: usize,
        len: usize,
    },
}

/// A step's loss, as this rank computed it.
pub fn check_loss(step: u64, parts: &LossParts) -> Result<(), NonFinite> {
    if parts.total.is_finite() && parts.bce.is_finite() && parts.dice.is_finite() {
        return Ok(());
    }
    Err(NonFinite::Loss {
        step,
        total: parts.total,
        bce: parts.bce,
        dice: parts.dice,
    })
}

/// Each float param's module path and length, in visit order: the layout of the exchange buffer
/// (see [`crate::train::params::param_lens`]).
pub fn slot_names<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    model.visit(&mut Named {
        path: Vec::new(),
        visit: |name: String, param_len: usize, _: &dyn Fn() -> Vec<f32>| out.push((name, param_len)),
    });
    out
}

/// The summed-and-averaged exchange buffer of a step (gradients, and rank 0's BatchNorm buffers).
pub fn check_exchange(step: u64, flat: &[f32], slots: &[(String, usize)]) -> Result<(), NonFinite> {
    if all_finite(flat) {
        return Ok(());
    }
    let mut start = 0;
    for (name, len) in slots {
        let values = &flat[start.min(flat.len())..(start + len).min(flat.len())];
        let count = values.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            return Err(NonFinite::Tensor {
                step,
                kind: "averaged gradient",
                tensor: name.clone(),
                count,
                len: *len,
            });
        }
        start += len;
    }
    Err(NonFinite::Tensor {
        step,
        kind: "averaged gradient",
        tensor: "(beyond the model's layout)".into(),
        count: flat.iter().filter(|v| !v.is_finite()).count(),
        len: flat.len(),
    })
}

/// [`crate::train::params::weights_checksum`] (the same string), read in the same pass that
/// checks every weight is finite; the error names the first tensor that is not.
pub fn checked_checksum<B: Backend, M: Module<B>>(model: &M, step: u64) -> Result<String, NonFinite> {
    let mut hash = Sha256::new();
    let mut first_bad: Option<NonFinite> = None;
    model.visit(&mut Named {
        path: Vec::new(),
        visit: |name: String, len: usize, values: &dyn Fn() -> Vec<f32>| {
            let values = values();
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for value in &values {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            hash.update(&bytes);
            if first_bad.is_none() && !all_finite(&values) {
                first_bad = Some(NonFinite::Tensor {
                    step,
                    kind: "weight",
                    tensor: name,
                    count: values.iter().filter(|v| !v.is_finite()).count(),
                    len,
                });
            }
        },
    });
    match first_bad {
        Some(bad) => Err(bad),
        None => Ok(hex::encode(hash.finalize())),
    }
}

/// Whether every value is finite: `v * 0` is zero for a finite `v` and NaN otherwise, and NaN
/// survives a sum. Sixteen lanes, so the compiler vectorises it: this runs over every gradient of
/// every step.
fn all_finite(values: &[f32]) -> bool {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v * 0.0;
        }
    }
    acc.iter().all(|a| *a == 0.0) && rest.iter().all(|v| v.is_finite())
}

/// Visits float params with their module path (`down.0.conv1.weight`; an enum's variant name,
/// such as the backbone's, is left out). The values are read only if the callback asks.
struct Named<F> {
    path: Vec<Option<String>>,
    visit: F,
}

impl<B: Backend, F: FnMut(String, usize, &dyn Fn() -> Vec<f32>)> ModuleVisitor<B> for Named<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((!container_type.starts_with("Enum:")).then(|| name.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self.path.iter().flatten().cloned().collect::<Vec<_>>().join(".");
        let tensor = param.val();
        let len = tensor.shape().num_elements();
        (self.visit)(name, len, &|| to_f32(tensor.clone()));
    }
}

#[cfg(test)]
#[path = "finite_tests.rs"]
mod tests;
