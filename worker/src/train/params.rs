//! The bridge between burn modules and the data-parallel machinery, which only knows flat `f32`
//! buffers: gradients out to a flat vector and back, a checksum of the weights that ranks
//! compare, and a seeded initialisation that makes every rank start bit-identical.
//!
//! Everything walks float params in the module's visit order (struct field order, recursively).
//! That order depends only on the architecture, not on `ParamId`s (which are random per process),
//! so the i-th float of one rank's buffer is the same weight on every rank.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("flat gradient has {got} values, the model has {expected} float parameters")]
    LengthMismatch { expected: usize, got: usize },
    #[error("cannot reseed parameter `{path}` of module type `{container}`: no seeded-init rule for it")]
    UnsupportedModule { path: String, container: String },
}

/// Number of float parameter values, i.e. the length of [`flatten_grads`]'s output.
pub fn flat_len<B: Backend, M: Module<B>>(model: &M) -> usize {
    param_lens(model).iter().sum()
}

/// The number of values of each float param, in visit order: the layout of the flat buffer.
pub fn param_lens<B: Backend, M: Module<B>>(model: &M) -> Vec<usize> {
    struct Lens(Vec<usize>);
    impl<B: Backend> ModuleVisitor<B> for Lens {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().shape().num_elements());
        }
    }
    let mut lens = Lens(vec![]);
    model.visit(&mut lens);
    lens.0
}

pub(crate) fn to_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

/// Whether a float tensor of an autodiff module is a buffer (BatchNorm's running statistics,
/// burn's `RunningState`) rather than a trained parameter: buffers never require a gradient.
/// (A frozen parameter counts as one too, which is what it should get: rank 0's value.)
fn is_buffer<B: AutodiffBackend, const D: usize>(param: &Param<Tensor<B, D>>) -> bool {
    !param.val().is_require_grad()
}

/// Concatenates every float param's gradient, in visit order, as `f32`. A param without a
/// gradient (frozen, or unused by this batch's graph) contributes zeros, so the layout is the
/// same on every rank whatever its batch did; so do buffers (see [`exchange_buffer`]).
pub fn flatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> Vec<f32> {
    flatten(model, grads, false)
}

/// What one rank contributes to a step's sum all-reduce: [`flatten_grads`]'s layout, except that
/// buffer slots carry the buffer's values on rank 0 and zeros on every other rank. After the
/// sum, buffer slots hold rank 0's values exactly (`x + 0 + ... + 0 = x`) on every rank, which is
/// what PyTorch DDP's default buffer broadcast gives, at no extra round trip. See
/// [`finish_exchange`].
///
/// Syncs the module's running states first: burn applies a forward pass's running-statistics
/// update lazily, and a visitor reads the value from before it.
pub fn exchange_buffer<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
    is_rank_zero: bool,
) -> Vec<f32> {
    // `valid()` syncs every RunningState (shared with `model`); the inner copy is dropped.
    drop(model.valid());
    flatten(model, grads, is_rank_zero)
}

fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
    buffer_values: bool,
) -> Vec<f32> {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        buffer_values: bool,
        flat: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            push_slot(param, self.grads, self.buffer_values, &mut self.flat);
        }
    }
    let mut visitor = Flatten {
        grads,
        buffer_values,
        flat: Vec::with_capacity(flat_len::<B, M>(model)),
    };
    model.visit(&mut visitor);
    visitor.flat
}

/// Appends `param`'s slot of the exchange buffer to `out`: its gradient (zeros without one), or
/// for a buffer its values when `buffer_values` (rank 0) and zeros otherwise. Returns the slot's
/// length.
pub(crate) fn push_slot<B: AutodiffBackend, const D: usize>(
    param: &Param<Tensor<B, D>>,
    grads: &GradientsParams,
    buffer_values: bool,
    out: &mut Vec<f32>,
) -> usize {
    let len = param.val().shape().num_elements();
    if is_buffer(param) {
        if buffer_values {
            out.extend_from_slice(&to_f32(param.val().inner()));
        } else {
            out.resize(out.len() + len, 0.0);
        }
        return len;
    }
    match grads.get::<B::InnerBackend, D>(param.id) {
        Some(grad) => {
            let values = to_f32(grad);
            assert_eq!(values.len(), len, "gradient shape differs from its param");
            out.extend_from_slice(&values);
        }
        None => out.resize(out.len() + len, 0.0),
    }
    len
}

/// The inverse of [`flatten_grads`]: a gradient for every trained float param of `model` (same
/// order and shapes), on that param's device. Zeros that stood for "no gradient" come back as
/// zero gradients, which AdamW still applies (moment decay, weight decay) — identically on every
/// rank. Buffer slots are skipped: a gradient registered for a buffer would let the optimiser
/// decay BatchNorm's running statistics.
pub fn unflatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    flat: &[f32],
) -> Result<GradientsParams, ParamsError> {
    let expected = flat_len::<B, M>(model);
    if flat.len() != expected {
        return Err(ParamsError::LengthMismatch {
            expected,
            got: flat.len(),
        });
    }
    struct Unflatten<'a> {
        flat: &'a [f32],
        offset: usize,
        grads: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val().inner();
            let shape = value.shape();
            let end = self.offset + shape.num_elements();
            if !is_buffer(param) {
                let data = TensorData::new(self.flat[self.offset..end].to_vec(), shape);
                self.grads
                    .register::<B::InnerBackend, D>(param.id, Tensor::from_data(data, &value.device()));
            }
            self.offset = end;
        }
    }
    let mut visitor = Unflatten {
        flat,
        offset: 0,
        grads: GradientsParams::new(),
    };
    model.visit(&mut visitor);
    Ok(visitor.grads)
}

/// Takes the summed [`exchange_buffer`] of all `world` ranks: scales the gradient slots to the
/// mean (as the mean all-reduce did: times `1 / world` in f32), writes the buffer slots (rank 0's
/// values) into the model's running states, and returns the model with its gradients.
pub fn finish_exchange<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: M,
    summed: &mut [f32],
    world: u32,
) -> Result<(M, GradientsParams), ParamsError> {
    let expected = flat_len::<B, M>(&model);
    if summed.len() != expected {
        return Err(ParamsError::LengthMismatch {
            expected,
            got: summed.len(),
        });
    }
    struct Buffers<'a> {
        flat: &'a mut [f32],
        offset: usize,
        scale: f32,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Buffers<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let buffer = is_buffer(&param);
            let dims = param.val().dims();
            let end = self.offset + dims.iter().product::<usize>();
            let slots = &mut self.flat[self.offset..end];
            self.offset = end;
            if !buffer {
                slots.iter_mut().for_each(|g| *g *= self.scale);
                return param;
            }
            let values = TensorData::new(slots.to_vec(), dims);
            param.map(|tensor| Tensor::from_data(values, &tensor.device()))
        }
    }
    let mut mapper = Buffers {
        flat: summed,
        offset: 0,
        scale: 1.0 / world as f32,
    };
    let model = model.map(&mut mapper);
    let grads = unflatten_grads(&model, summed)?;
    Ok((model, grads))
}

/// The buffers' values (BatchNorm's running statistics), in visit order: what a forward pass
/// changes besides the graph. See [`restore_buffers`].
pub fn buffer_values<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Vec<f32> {
    struct Buffers(Vec<f32>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Buffers {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if is_buffer(param) {
                self.0.extend_from_slice(&to_f32(param.val().inner()));
            }
        }
    }
    // Applies any running-statistics update still pending from a forward pass.
    drop(model.valid());
    let mut visitor = Buffers(Vec::new());
    model.visit(&mut visitor);
    visitor.0
}

/// Puts back buffer values [`buffer_values`] took from this model's architecture.
///
/// # Panics
/// If `values` was taken from another architecture (a different buffer count).
pub fn restore_buffers<B: AutodiffBackend, M: AutodiffModule<B>>(model: M, values: &[f32]) -> M {
    struct Restore<'a> {
        values: &'a [f32],
        offset: usize,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Restore<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if !is_buffer(&param) {
                return param;
            }
            let dims = param.val().dims();
            let end = self.offset + dims.iter().product::<usize>();
            let data = TensorData::new(self.values[self.offset..end].to_vec(), dims);
            self.offset = end;
            param.map(|tensor| Tensor::from_data(data, &tensor.device()))
        }
    }
    // Pending updates would otherwise be applied over the restored values.
    drop(model.valid());
    let mut mapper = Restore { values, offset: 0 };
    let model = model.map(&mut mapper);
    assert_eq!(mapper.offset, values.len(), "buffer values of another architecture");
    model
}

/// SHA-256 over every float param's values as little-endian `f32` bytes, in visit order,
/// hex-encoded. Bit-identical weights give the same string on every rank and platform.
pub fn weights_checksum<B: Backend, M: Module<B>>(model: &M) -> String {
    struct Hash(Sha256);
    impl<B: Backend> ModuleVisitor<B> for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let values = to_f32(param.val());
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for value in values {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            self.0.update(&bytes);
        }
    }
    let mut hash = Hash(Sha256::new());
    model.visit(&mut hash);
    hex::encode(hash.0.finalize())
}

/// Overwrites every randomly initialised param with values drawn from a ChaCha8 stream seeded by
/// `seed`, so the weights depend on the seed and the architecture only.
///
/// Why not `B::seed` + `init`: burn's init is lazy (a param draws from the backend's global RNG
/// when first touched), so the weights would depend on the order params are first used, on any
/// other thread drawing random numbers meanwhile, and on how each backend implements `seed`
/// (Flex keeps one global `StdRng`, CubeCL seeds its own kernels). A host-side ChaCha stream
/// (specified bit for bit) avoids all three.
///
/// Conv and transposed-conv weights and biases get burn's default distribution,
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` with `fan_in = prod(weight.shape[1..])`; norm params
/// keep their constant init (ones and zeros). `Linear` weights and biases get the same
/// distribution with `fan_in = in_features` (burn stores the weight `[in, out]`): that is
/// PyTorch's `nn.Linear` default, which MONAI's SwinUNETR keeps (unlike timm's Swin, it does
/// not redraw its linears from trunc_normal(0.02)). Swin's `relative_position_bias_table`
/// (a direct param of `WindowAttention`) gets MONAI's `trunc_normal_(std=0.02)`, cut at
/// [-2, 2]. Any other module type is an error rather than a silently unseeded weight: add a
/// rule here when a backbone needs one.
pub fn reseed<B: Backend, M: Module<B>>(module: M, seed: u64) -> Result<M, ParamsError> {
    let mut mapper = Reseed {
        rng: ChaCha8Rng::seed_from_u64(seed),
        path: Vec::new(),
        fan_in: None,
        error: None,
    };
    let module = module.map(&mut mapper);
    match mapper.error {
        Some(err) => Err(err),
        None => Ok(module),
    }
}

struct Reseed {
    rng: ChaCha8Rng,
    /// (field name, type of the struct holding it) from the root down.
    path: Vec<(String, String)>,
    /// Fan-in of the weight last drawn; a conv's bias comes right after its weight.
    fan_in: Option<usize>,
    error: Option<ParamsError>,
}

const CONV_TYPES: &[&str] = &[
    "Struct:Conv1d",
    "Struct:Conv2d",
    "Struct:Conv3d",
    "Struct:ConvTranspose1d",
    "Struct:ConvTranspose2d",
    "Struct:ConvTranspose3d",
];
const LINEAR_TYPE: &str = "Struct:Linear";
/// (container, field) of a param drawn from trunc_normal(0, 0.02) cut at [-2, 2].
const TRUNC_NORMAL_PARAMS: &[(&str, &str)] = &[("Struct:WindowAttention", "relative_position_bias_table")];
const CONSTANT_INIT_TYPES: &[&str] = &[
    "Struct:InstanceNorm",
    "Struct:GroupNorm",
    "Struct:LayerNorm",
    "Struct:BatchNorm",
    // model::batchnorm: PyTorch-exact BatchNorm (weight 1, bias 0, running stats 0 / 1).
    "Struct:BatchNorm3d",
];

impl Reseed {
    /// `U(-bound, bound)` from 24 random bits per value, computed in plain f32 so the result is
    /// the same everywhere.
    fn uniform(&mut self, len: usize, bound: f32) -> Vec<f32> {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        (0..len)
            .map(|_| ((self.rng.next_u32() >> 8) as f32 * SCALE * 2.0 - 1.0) * bound)
            .collect()
    }

    /// `N(mean, std)` cut at `[low, high]` by rejection (as MONAI's `trunc_normal_` draws it),
    /// from Marsaglia's polar method. Only IEEE basic arithmetic and `sqrt` (both exactly
    /// rounded) plus [`ln_exact_ops`]: no platform libm, so every machine draws the same bits.
    fn trunc_normal(&mut self, len: usize, mean: f64, std: f64, low: f64, high: f64) -> Vec<f32> {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let u = (self.rng.next_u64() >> 11) as f64 * SCALE * 2.0 - 1.0;
            let v = (self.rng.next_u64() >> 11) as f64 * SCALE * 2.0 - 1.0;
            let s = u * u + v * v;
            if s >= 1.0 || s == 0.0 {
                continue;
            }
            let factor = (-2.0 * ln_exact_ops(s) / s).sqrt();
            for z in [u * factor, v * factor] {
                let value = mean + std * z;
                if out.len() < len && (low..=high).contains(&value) {
                    out.push(value as f32);
                }
            }
        }
        out
    }

    fn unsupported(&self, container: &str) -> ParamsError {
        ParamsError::UnsupportedModule {
            path: self
                .path
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join("."),
            container: container.to_string(),
        }
    }

    /// Fresh values for the param at the current path, `None` to keep its constant init.
    fn values(&mut self, dims: &[usize]) -> Result<Option<Vec<f32>>, ParamsError> {
        let (field, container) = self.path.last().cloned().unwrap_or_default();
        if CONSTANT_INIT_TYPES.contains(&container.as_str()) {
            return Ok(None);
        }
        let len = dims.iter().product();
        if TRUNC_NORMAL_PARAMS.contains(&(container.as_str(), field.as_str())) {
            return Ok(Some(self.trunc_normal(len, 0.0, 0.02, -2.0, 2.0)));
        }
        let linear = container == LINEAR_TYPE;
        if !linear && !CONV_TYPES.contains(&container.as_str()) {
            return Err(self.unsupported(&container));
        }
        let fan_in = match field.as_str() {
            "weight" => {
                let fan_in = if linear {
                    dims[0]
                } else {
                    dims[1..].iter().product::<usize>()
                };
                self.fan_in = Some(fan_in);
                fan_in
            }
            "bias" => match self.fan_in.take() {
                Some(fan_in) => fan_in,
                None => return Err(self.unsupported(&container)),
            },
            _ => return Err(self.unsupported(&container)),
        };
        Ok(Some(self.uniform(len, 1.0 / (fan_in.max(1) as f32).sqrt())))
    }
}

/// Natural log of a positive finite `x` from `+ - * /` only: `x = m * 2^e` with `m` in
/// `[sqrt(1/2), sqrt(2))`, then `ln m = 2 atanh(t)`, `t = (m - 1) / (m + 1)`, `|t| < 0.172`, whose
/// series converges below f64 precision in 16 terms.
fn ln_exact_ops(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        exponent += 1;
    }
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut term = t;
    let mut sum = 0.0;
    for k in 0..16 {
        sum += term / (2 * k + 1) as f64;
        term *= t2;
    }
    exponent as f64 * LN_2 + 2.0 * sum
}

impl<B: Backend> ModuleMapper<B> for Reseed {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        // Materialises burn's lazy init first (one wasted draw per param): Param exposes no way
        // to swap the value of a still-lazy param while keeping its id and mappers.
        param.map(|tensor| {
            let dims = tensor.dims();
            match self.values(&dims) {
                Ok(Some(values)) => {
                    let require_grad = tensor.is_require_grad();
                    let fresh = Tensor::from_data(TensorData::new(values, dims), &tensor.device());
                    if require_grad { fresh.require_grad() } else { fresh }
                }
                Ok(None) => tensor,
                Err(err) => {
                    self.error = Some(err);
                    tensor
                }
            }
        })
    }
}

#[cfg(test)]
#[path = "params_tests.rs"]
mod tests;
