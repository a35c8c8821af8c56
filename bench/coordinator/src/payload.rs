//! What the simulated fleet sends: the run specs it queues, the metric batches its workers
//! report, and well-formed weight checksums. Kept apart from how the workers behave (`load`).

use std::time::{SystemTime, UNIX_EPOCH};

use protocol::pb;

/// Every worker shares these: its kernels must match for gangs to form.
pub const FINGERPRINT: &str = "bench-fingerprint-v1";
/// Metric names a report cycles through, one point per name per step.
const NAMES: [&str; 2] = ["train/loss", "train/lr"];

/// A run spec the coordinator accepts: world size 1, steps enough never to end on their own.
pub fn spec_toml(i: usize, dataset: &str, artifacts: &str) -> String {
    format!(
        r#"name = "bench-{i:05}"
world_size = 1
seed = {i}

[dataset]
url = '{dataset}'
eval_cases = 1

[model]
arch = "unet"
base_width = 4
depth = 2

[train]
steps = 1000000000
patch = [16, 16, 16]
lr = 0.01
checksum_every = 10
metrics_every = 1
eval = false

[artifacts]
url = '{artifacts}'
"#
    )
}

/// The points of one report, rebuilt in place: `points` points over consecutive steps, one per
/// name per step.
pub struct MetricBatch {
    points: Vec<pb::Metric>,
}

impl MetricBatch {
    pub fn new(points: usize) -> MetricBatch {
        let points = (0..points)
            .map(|j| pb::Metric {
                rank: 0,
                step: 0,
                name: NAMES[j % NAMES.len()].to_string(),
                value: 0.0,
                unix_ms: 0,
            })
            .collect();
        MetricBatch { points }
    }

    /// The points for the steps after `last_step`, and the newest step among them.
    pub fn next(&mut self, last_step: u64, worker: usize) -> (Vec<pb::Metric>, u64) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut newest = last_step;
        for (j, m) in self.points.iter_mut().enumerate() {
            let step = last_step + 1 + (j / NAMES.len()) as u64;
            m.step = step;
            m.unix_ms = now_ms;
            m.value = match j % NAMES.len() {
                0 => 2.0 / (1.0 + step as f64 * 1e-3) + (worker % 7) as f64 * 1e-3, // loss
                _ => 0.01,                                                          // lr
            };
            newest = step;
        }
        (self.points.clone(), newest)
    }
}

/// A well-formed weights checksum (64 lowercase hex digits), distinct per worker and step.
pub fn fake_sha256(worker: u64, step: u64) -> String {
    let mut x = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step;
    (0..4)
        .map(|_| {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            format!("{:016x}", z ^ (z >> 31))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_validate_and_checksums_are_hex() {
        let text = spec_toml(42, "/tmp/data", "/tmp/art");
        let spec = protocol::spec::RunSpec::from_toml(&text, "bench").unwrap();
        assert_eq!(spec.world_size, 1);
        let sum = fake_sha256(3, 17);
        assert_eq!(sum.len(), 64);
        assert!(sum.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(sum, fake_sha256(3, 18));
    }

    #[test]
    fn batches_cover_consecutive_steps() {
        let mut batch = MetricBatch::new(5);
        let (points, newest) = batch.next(10, 0);
        let steps: Vec<u64> = points.iter().map(|p| p.step).collect();
        assert_eq!(steps, [11, 11, 12, 12, 13]);
        assert_eq!(newest, 13);
        assert_eq!(points[1].name, "train/lr");
    }
}
