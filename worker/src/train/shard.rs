//! Which case each rank reads at each step. Every epoch the training subset is permuted with
//! (seed, epoch) and cut into W contiguous shards; a rank walks its shard in order. The position
//! is a pure function of (seed, rank, world, step), so a resumed run reads exactly what the
//! uninterrupted one would have read, and the cursor a checkpoint records can be re-derived.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Index of the next sample within this rank's shard of `epoch`.
    pub position: u64,
}

pub struct ShardPlan {
    cases: Vec<String>,
    seed: u64,
    rank: usize,
    world: usize,
}

impl ShardPlan {
    /// `cases` must be the same list, in the same order, on every rank (the coordinator's).
    pub fn new(cases: Vec<String>, seed: u64, rank: u32, world: u32) -> Self {
        assert!(
            world > 0 && rank < world && cases.len() >= world as usize,
            "shard plan needs a case per rank"
        );
        ShardPlan {
            cases,
            seed,
            rank: rank as usize,
            world: world as usize,
        }
    }

    fn shard(&self, epoch: u64) -> Vec<&str> {
        let mut order: Vec<&str> = self.cases.iter().map(String::as_str).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        let n = order.len();
        order[self.rank * n / self.world..(self.rank + 1) * n / self.world].to_vec()
    }

    /// The cases of the next `batch` samples from `cursor`, and the cursor after them.
    pub fn next_batch(&self, cursor: Cursor, batch: usize) -> (Vec<String>, Cursor) {
        let mut cursor = cursor;
        let mut shard = self.shard(cursor.epoch);
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if cursor.position as usize >= shard.len() {
                cursor = Cursor {
                    epoch: cursor.epoch + 1,
                    position: 0,
                };
                shard = self.shard(cursor.epoch);
            }
            out.push(shard[cursor.position as usize].to_string());
            cursor.position += 1;
        }
        (out, cursor)
    }

    /// Cases this rank may ever read, for warming its cache.
    pub fn cases(&self) -> &[String] {
        &self.cases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i:03}")).collect()
    }

    #[test]
    fn shards_partition_each_epoch() {
        let plans: Vec<ShardPlan> = (0..3).map(|r| ShardPlan::new(cases(10), 5, r, 3)).collect();
        for epoch in 0..3 {
            let mut all: Vec<&str> = plans.iter().flat_map(|p| p.shard(epoch)).collect();
            all.sort();
            assert_eq!(all, cases(10).iter().map(String::as_str).collect::<Vec<_>>());
        }
        assert_ne!(plans[0].shard(0), plans[0].shard(1), "epochs are reshuffled");
    }

    #[test]
    fn batches_roll_into_the_next_epoch() {
        let plan = ShardPlan::new(cases(4), 1, 0, 2);
        let (b, c) = plan.next_batch(Cursor { epoch: 0, position: 0 }, 3);
        assert_eq!(b.len(), 3);
        assert_eq!(c, Cursor { epoch: 1, position: 1 });
        let (again, _) = plan.next_batch(Cursor { epoch: 0, position: 0 }, 3);
        assert_eq!(b, again, "deterministic");
    }
}
