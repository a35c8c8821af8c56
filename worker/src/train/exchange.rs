//! A step's gradient exchange, overlapped with flattening: the flat buffer (gradients, and
//! BatchNorm buffers from rank 0, see [`params::exchange_buffer`]) is cut into buckets at
//! parameter boundaries, and each bucket goes on the wire as soon as it is flattened, while the
//! training thread flattens the next. Buckets are reused from step to step.

use std::ops::Range;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use crate::collective::{CollectiveError, Ring, bucket_bounds};
use crate::train::params::{self, ParamsError};

pub struct Exchange {
    bounds: Vec<Range<usize>>,
    /// Each bucket's values, kept between steps (empty until the first step, and after a
    /// failed one).
    buckets: Vec<Vec<f32>>,
    /// The summed buffer in one piece, as the optimiser step reads it.
    flat: Vec<f32>,
}

impl Exchange {
    /// Buckets of `bucket_bytes` cut from `model`'s layout: the same on every rank.
    pub fn new<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, bucket_bytes: usize) -> Self {
        Exchange {
            bounds: bucket_bounds(&params::param_lens(model), bucket_bytes),
            buckets: vec![],
            flat: vec![],
        }
    }

    /// Sums this rank's gradients (and rank 0's buffers) with the other ranks, then hands the
    /// model back with the averaged gradients and rank 0's buffers, as
    /// [`params::finish_exchange`] does.
    pub fn run<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: M,
        grads: &GradientsParams,
        is_rank_zero: bool,
        ring: &mut Ring,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Result<(M, GradientsParams), ParamsError>, (M, CollectiveError)> {
        let reduce = {
            // Entered so the reduce can be spawned from this (blocking) training thread.
            let _runtime = runtime.enter();
            ring.start(self.bounds.clone())
        };
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.resize_with(self.bounds.len(), Vec::new);
        // `valid()` syncs BatchNorm's pending running-statistics update (see exchange_buffer).
        drop(model.valid());
        let mut visitor = Flatten {
            grads,
            buffer_values: is_rank_zero,
            bounds: &self.bounds,
            buckets: buckets.into_iter(),
            current: None,
            next: 0,
            at: 0,
            ready: |b: u32, values: Vec<f32>| reduce.submit(b, values),
        };
        model.visit(&mut visitor);
        let summed = match runtime.block_on(ring.finish(reduce)) {
            Ok(summed) => summed,
            Err(e) => return Err((model, e)),
        };
        self.flat.clear();
        summed.iter().for_each(|b| self.flat.extend_from_slice(b));
        self.buckets = summed;
        let world = ring.world_size();
        Ok(params::finish_exchange(model, &mut self.flat, world))
    }

    /// The last step's buffer once exchanged: averaged gradients, and rank 0's buffer values, in
    /// [`params::param_lens`] layout; the same on every rank.
    pub fn summed(&self) -> &[f32] {
        &self.flat
    }
}

/// Writes each float param's slot (its gradient, zeros, or rank 0's buffer values) in visit
/// order, handing over each bucket the moment its last param is written.
struct Flatten<'a, F: FnMut(u32, Vec<f32>)> {
    grads: &'a GradientsParams,
    buffer_values: bool,
    bounds: &'a [Range<usize>],
    buckets: std::vec::IntoIter<Vec<f32>>,
    current: Option<Vec<f32>>,
    next: u32,
    at: usize,
    ready: F,
}

impl<B: AutodiffBackend, F: FnMut(u32, Vec<f32>)> ModuleVisitor<B> for Flatten<'_, F> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let bucket = self.current.get_or_insert_with(|| {
            let mut reused = self.buckets.next().unwrap_or_default();
            reused.clear();
            reused
        });
        self.at += params::push_slot(param, self.grads, self.buffer_values, bucket);
        let bound = &self.bounds[self.next as usize];
        if self.at == bound.end {
            let values = self.current.take().expect("just filled");
            debug_assert_eq!(values.len(), bound.len());
            (self.ready)(self.next, values);
            self.next += 1;
        }
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
