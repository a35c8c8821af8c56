//! Held-out evaluation: sliding-window inference over each whole preprocessed volume and per-class
//! hard Dice, aggregated over cases (sum of intersections over sum of sizes, so big and small
//! cases weigh by their voxels).
//!
//! Every rank evaluates its share of the held-out cases (rank r takes cases r, r+W, ...) and the
//! integer counts are summed exactly over the ring, so all ranks end with the same report as a
//! single rank evaluating every case would, and none sits idle meanwhile.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use protocol::classes::{CLASSES, LARGE_ORGANS, NUM_CLASSES};
use protocol::spec::RunSpec;
use thiserror::Error;

use crate::collective::{CollectiveError, Ring};
use crate::link::{LinkError, RunLink};
use crate::train::loss::dice_counts;
use crate::train::sliding_window::{SlidingWindow, SlidingWindowError};
use data::{CaseVolume, whole_volume};

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("{0}")]
    Window(#[from] SlidingWindowError),
    #[error("summing the Dice counts over the ranks: {0}")]
    Collective(#[from] CollectiveError),
    #[error("reporting the evaluation: {0}")]
    Link(#[from] LinkError),
}

/// Hard Dice counts of some cases, as exact integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiceCounts {
    /// `[intersection, predicted, target]` voxels, per class.
    pub per_class: Vec<[u64; 3]>,
    /// Cases counted.
    pub cases: u64,
}

impl Default for DiceCounts {
    fn default() -> Self {
        DiceCounts {
            per_class: vec![[0; 3]; NUM_CLASSES],
            cases: 0,
        }
    }
}

impl DiceCounts {
    fn add_case(&mut self, counts: &[[f64; 3]]) {
        for (total, case) in self.per_class.iter_mut().zip(counts) {
            // Voxel counts of one case: integers far below 2^53, so the f64 is exact.
            for k in 0..3 {
                total[k] += case[k] as u64;
            }
        }
        self.cases += 1;
    }

    /// Replaces these counts, on every rank, with their sum over all ranks of `ring`.
    pub async fn sum_over_ranks(&mut self, ring: &mut Ring) -> Result<(), CollectiveError> {
        let mut words: Vec<u64> = self.per_class.iter().flatten().copied().collect();
        words.push(self.cases);
        ring.all_reduce_sum_u64(&mut words).await?;
        self.cases = words.pop().expect("the case count was pushed");
        for (total, sum) in self.per_class.iter_mut().zip(words.chunks_exact(3)) {
            total.copy_from_slice(sum);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Dice per class, `None` where no held-out case contains the class.
    pub per_class: Vec<Option<f64>>,
    pub cases: usize,
    /// The counts the Dice values come from.
    pub counts: DiceCounts,
}

impl EvalReport {
    pub fn from_counts(counts: DiceCounts) -> Self {
        let per_class = counts
            .per_class
            .iter()
            .map(|&[inter, pred, target]| (target > 0).then(|| 2.0 * inter as f64 / (pred + target) as f64))
            .collect();
        EvalReport {
            per_class,
            cases: counts.cases as usize,
            counts,
        }
    }

    pub fn mean(&self) -> f64 {
        mean(self.per_class.iter().flatten().copied())
    }

    /// Mean Dice over liver, both lungs and both femurs: the organs any working path learns.
    pub fn large_organ_mean(&self) -> f64 {
        mean(LARGE_ORGANS.iter().filter_map(|name| {
            let c = protocol::classes::class_index(name)?;
            self.per_class[c]
        }))
    }

    /// (metric name, value) pairs as reported to the coordinator.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = CLASSES
            .iter()
            .zip(&self.per_class)
            .filter_map(|(name, d)| d.map(|d| (format!("eval/dice/{name}"), d)))
            .collect();
        out.push(("eval/mean_dice".into(), self.mean()));
        out.push(("eval/large_organ_dice".into(), self.large_organ_mean()));
        out
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The held-out cases rank `rank` of `world` evaluates: `rank`, `rank + world`, ...
pub fn shard<T>(items: &[T], rank: u32, world: u32) -> impl Iterator<Item = &T> {
    items.iter().skip(rank as usize).step_by(world.max(1) as usize)
}

/// Runs `predict` over each whole volume by sliding windows and counts Dice over the cases.
pub fn evaluate<B: Backend>(
    mut predict: impl FnMut(Tensor<B, 5>) -> Tensor<B, 5>,
    cases: &[&CaseVolume],
    window: &SlidingWindow,
    device: &B::Device,
) -> Result<DiceCounts, SlidingWindowError> {
    let mut counts = DiceCounts::default();
    for vol in cases {
        let (image, labels, [d, h, w]) = whole_volume(vol, 1);
        let x = Tensor::<B, 5>::from_data(TensorData::new(image, [1, 1, d, h, w]), device);
        let y = Tensor::<B, 5>::from_data(TensorData::new(labels, [1, NUM_CLASSES, d, h, w]), device);
        let logits = window.infer(x, &mut predict)?;
        counts.add_case(&dice_counts(logits, y));
    }
    Ok(counts)
}

/// How a run evaluates its held-out cases.
#[derive(Debug, Clone)]
pub struct HeldOut {
    pub window: SlidingWindow,
    pub rank: u32,
    pub world: u32,
}

impl HeldOut {
    /// `train.eval_window` (else the patch) windows at `train.eval_overlap`, Gaussian-blended,
    /// `per_rank_batch` windows per forward pass: a training step's batch fits, so this does.
    pub fn from_spec(spec: &RunSpec, rank: u32, world: u32, per_rank_batch: u32) -> Result<Self, SlidingWindowError> {
        let window = SlidingWindow {
            overlap: spec.train.eval_overlap,
            sw_batch_size: per_rank_batch.max(1) as usize,
            ..SlidingWindow::new(spec.train.eval_window_or_patch().map(|s| s as usize))
        };
        window.validate()?;
        Ok(HeldOut { window, rank, world })
    }

    /// This rank's share of `case_ids`.
    pub fn my_cases<'a>(&self, case_ids: &'a [String]) -> Vec<&'a String> {
        shard(case_ids, self.rank, self.world).collect()
    }

    /// Evaluates this rank's `volumes` (its share, as loaded), sums the counts over the ring and
    /// reports at `step`: every rank its own share (`eval/shard_cases`, `eval/shard_seconds`),
    /// rank 0 the run's metrics. Every rank of the ring must call this at the same point.
    pub fn run<B: Backend>(
        &self,
        predict: impl FnMut(Tensor<B, 5>) -> Tensor<B, 5>,
        volumes: &[&CaseVolume],
        step: u64,
        ring: &mut Ring,
        link: &mut RunLink,
        device: &B::Device,
    ) -> Result<EvalReport, EvalError> {
        let started = std::time::Instant::now();
        let mut counts = evaluate(predict, volumes, &self.window, device)?;
        link.metric(step, "eval/shard_cases", counts.cases as f64);
        link.metric(step, "eval/shard_seconds", started.elapsed().as_secs_f64());
        link.block_on(counts.sum_over_ranks(ring))?;
        let report = EvalReport::from_counts(counts);
        if self.rank == 0 {
            link.metric(step, "eval/cases", report.cases as f64);
            for (name, value) in report.metrics() {
                link.metric(step, &name, value);
            }
            link.metric(step, "eval/seconds", started.elapsed().as_secs_f64());
        }
        link.flush()?;
        Ok(report)
    }
}

#[cfg(test)]
#[path = "eval_tests.rs"]
mod tests;
