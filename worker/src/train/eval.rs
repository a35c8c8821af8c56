//! Held-out evaluation: whole-volume inference and per-class hard Dice, aggregated over cases
//! (sum of intersections over sum of sizes, so big and small cases weigh by their voxels).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use protocol::classes::{CLASSES, LARGE_ORGANS, NUM_CLASSES};

use crate::model::Backbone;
use crate::train::loss::dice_counts;
use data::{CaseVolume, whole_volume};

#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Dice per class, `None` where no held-out case contains the class.
    pub per_class: Vec<Option<f64>>,
    pub cases: usize,
}

impl EvalReport {
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

/// Runs `model` over each whole volume (padded at the far end to `multiple`, the padding cut
/// off again before scoring) and aggregates Dice.
pub fn evaluate<B: Backend>(
    model: &Backbone<B>,
    cases: &[&CaseVolume],
    multiple: usize,
    device: &B::Device,
) -> EvalReport {
    let mut totals = vec![[0.0f64; 3]; NUM_CLASSES];
    for vol in cases {
        let (image, labels, padded) = whole_volume(vol, multiple);
        let [d, h, w] = padded;
        let x = Tensor::<B, 5>::from_data(TensorData::new(image, [1, 1, d, h, w]), device);
        let y = Tensor::<B, 5>::from_data(TensorData::new(labels, [1, NUM_CLASSES, d, h, w]), device);
        let [od, oh, ow] = vol.shape;
        let logits = model.forward(x).slice([0..1, 0..NUM_CLASSES, 0..od, 0..oh, 0..ow]);
        let y = y.slice([0..1, 0..NUM_CLASSES, 0..od, 0..oh, 0..ow]);
        for (total, counts) in totals.iter_mut().zip(dice_counts(logits, y)) {
            for k in 0..3 {
                total[k] += counts[k];
            }
        }
    }
    let per_class = totals
        .iter()
        .map(|[inter, pred, target]| (*target > 0.0).then(|| 2.0 * inter / (pred + target)))
        .collect();
    EvalReport {
        per_class,
        cases: cases.len(),
    }
}
