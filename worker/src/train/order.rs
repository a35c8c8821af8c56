//! Which case every sample of a run reads, and the randomness of its crop.
//!
//! The order is a function of (seed, global sample index) alone: epoch e is a seeded permutation
//! of the training subset, and global sample g is position g mod n of epoch g div n. A step at
//! world size W with per-rank batch B reads the next W·B global samples, rank r its slice
//! r·B .. (r+1)·B. The crop randomness of a sample is keyed by its global index too. So every
//! rank's data cursor is the one number "samples consumed", and a run resumed from a checkpoint,
//! at the same or another world size, reads exactly the samples the uninterrupted run would
//! have read next: none skipped, none repeated.

use std::ops::Range;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

pub struct SampleOrder {
    cases: Vec<String>,
    seed: u64,
}

/// Mixes two words into a seed with SplitMix64's finaliser, so nearby (seed, index) pairs give
/// unrelated streams.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SampleOrder {
    /// `cases` must be the same list, in the same order, on every rank (the coordinator's).
    pub fn new(cases: Vec<String>, seed: u64) -> Self {
        assert!(!cases.is_empty(), "a sample order needs at least one case");
        SampleOrder { cases, seed }
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.cases.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.seed, epoch)));
        order
    }

    /// The cases of global samples `range`, in order.
    pub fn cases(&self, range: Range<u64>) -> Vec<&str> {
        let n = self.cases.len() as u64;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut epoch: Option<(u64, Vec<usize>)> = None;
        for g in range {
            let e = g / n;
            if epoch.as_ref().map(|(at, _)| *at) != Some(e) {
                epoch = Some((e, self.epoch_order(e)));
            }
            let order = &epoch.as_ref().expect("set above").1;
            out.push(self.cases[order[(g % n) as usize]].as_str());
        }
        out
    }

    /// The case that replaces a failed one for global sample `index`, attempt `attempt`: a seeded
    /// pick from the whole list, the same on every rank and every rerun. It may name a case that
    /// fails too; the caller then asks with the next attempt.
    pub fn substitute(&self, index: u64, attempt: u32) -> &str {
        let pick = mix(mix(self.seed ^ 0x005B_5717_u64, index), attempt as u64);
        &self.cases[(pick % self.cases.len() as u64) as usize]
    }

    /// Every case the run may read, for warming caches.
    pub fn all_cases(&self) -> &[String] {
        &self.cases
    }
}

/// Global samples rank `rank` reads in the step that starts after `consumed` samples.
pub fn rank_slice(consumed: u64, rank: u32, per_rank_batch: u32) -> Range<u64> {
    let first = consumed + rank as u64 * per_rank_batch as u64;
    first..first + per_rank_batch as u64
}

/// The crop (and later augmentation) randomness of global sample `index`.
pub fn sample_rng(seed: u64, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed ^ 0x5EED_C0DE, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: usize) -> SampleOrder {
        SampleOrder::new((0..n).map(|i| format!("c{i:03}")).collect(), 5)
    }

    #[test]
    fn every_epoch_is_a_permutation_and_epochs_differ() {
        let o = order(10);
        for epoch in 0..3u64 {
            let mut seen = o.cases(epoch * 10..epoch * 10 + 10);
            seen.sort();
            assert_eq!(seen, o.all_cases().iter().map(String::as_str).collect::<Vec<_>>());
        }
        assert_ne!(o.cases(0..10), o.cases(10..20));
    }

    #[test]
    fn the_sample_sequence_does_not_depend_on_the_world_size() {
        let o = order(7);
        let (steps, total) = (6u64, 24u64);
        for (world, batch) in [(1u32, 4u32), (2, 2), (4, 1)] {
            let mut read = vec![];
            let mut consumed = 0;
            for _ in 0..steps {
                for rank in 0..world {
                    read.extend(o.cases(rank_slice(consumed, rank, batch)));
                }
                consumed += (world * batch) as u64;
            }
            assert_eq!(read, o.cases(0..total), "world {world}");
        }
    }

    #[test]
    fn resuming_at_another_world_size_continues_the_sequence() {
        // Three steps at W=3, B=1, then W=2, B=1: samples 0..3·3, then 9 onwards.
        let mut indices = vec![];
        let mut consumed = 0;
        for _ in 0..3 {
            for rank in 0..3 {
                indices.extend(rank_slice(consumed, rank, 1));
            }
            consumed += 3;
        }
        for _ in 0..3 {
            for rank in 0..2 {
                indices.extend(rank_slice(consumed, rank, 1));
            }
            consumed += 2;
        }
        assert_eq!(indices, (0..15).collect::<Vec<u64>>());
    }

    #[test]
    fn crop_randomness_is_keyed_by_the_sample() {
        use rand::Rng;
        let a: u64 = sample_rng(1, 42).random();
        assert_eq!(a, sample_rng(1, 42).random::<u64>());
        assert_ne!(a, sample_rng(1, 43).random::<u64>());
        assert_ne!(a, sample_rng(2, 42).random::<u64>());
    }
}
