//! What one process group runs: each buffer size with its warm-up and timed iteration counts,
//! in a form that travels on a child's command line, and the bus-bandwidth convention both sides
//! are scored by.

use anyhow::{Context, bail};

/// One buffer size of the sweep and how many all-reduces it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizePlan {
    /// Buffer size in MiB of f32 (the tables say "MB", as the issue does).
    pub mib: usize,
    /// Untimed all-reduces first; the first also checks the sum. At least 1.
    pub warmup: usize,
    /// Timed all-reduces, back to back after a barrier; their mean is the point's time.
    pub iters: usize,
}

impl SizePlan {
    pub fn bytes(&self) -> usize {
        self.mib << 20
    }

    pub fn floats(&self) -> usize {
        self.bytes() / 4
    }
}

/// The timed iterations for a buffer when none are given: about 2 GiB reduced per point, at
/// least 5 and at most 30, so the full table stays within minutes and small buffers still get
/// enough repetitions to average out scheduling noise.
pub fn default_iters(mib: usize) -> usize {
    (2048 / mib.max(1)).clamp(5, 30)
}

/// The plan for `sizes_mib`, each with `warmup` untimed iterations and `iters` timed ones (or
/// [`default_iters`]).
pub fn plan(sizes_mib: &[usize], warmup: usize, iters: Option<usize>) -> anyhow::Result<Vec<SizePlan>> {
    if sizes_mib.is_empty() {
        bail!("--sizes-mb: give at least one size");
    }
    if let Some(&zero) = sizes_mib.iter().find(|&&m| m == 0) {
        bail!("--sizes-mb: sizes must be at least 1 MiB (got {zero})");
    }
    if iters == Some(0) {
        bail!("--iters: must be at least 1");
    }
    Ok(sizes_mib
        .iter()
        .map(|&mib| SizePlan {
            mib,
            warmup: warmup.max(1),
            iters: iters.unwrap_or_else(|| default_iters(mib)),
        })
        .collect())
}

/// `mib:warmup:iters` items, comma-separated: how the plan reaches a rank process.
pub fn encode(plan: &[SizePlan]) -> String {
    plan.iter()
        .map(|p| format!("{}:{}:{}", p.mib, p.warmup, p.iters))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn decode(text: &str) -> anyhow::Result<Vec<SizePlan>> {
    text.split(',')
        .map(|item| {
            let nums: Vec<usize> = item
                .split(':')
                .map(|n| n.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("plan item {item:?}: not mib:warmup:iters"))?;
            match nums[..] {
                [mib, warmup, iters] if mib > 0 && warmup > 0 && iters > 0 => Ok(SizePlan { mib, warmup, iters }),
                _ => bail!("plan item {item:?}: want mib:warmup:iters, each at least 1"),
            }
        })
        .collect()
}

/// Bus bandwidth in GB/s (1e9 bytes): what each link carries in a ring all-reduce, 2(N-1)/N of
/// the buffer, per second of one operation (NCCL's convention, so any N compares).
pub fn bus_bandwidth_gbps(bytes: usize, world: usize, seconds: f64) -> f64 {
    let world = world as f64;
    bytes as f64 * 2.0 * (world - 1.0) / world / seconds / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_survives_the_command_line() {
        let p = plan(&[4, 64, 256], 2, None).unwrap();
        assert_eq!(decode(&encode(&p)).unwrap(), p);
        assert_eq!(p[0].floats(), 1 << 20);
    }

    #[test]
    fn default_iterations_shrink_with_the_buffer_within_bounds() {
        assert_eq!(default_iters(4), 30);
        assert_eq!(default_iters(256), 8);
        assert_eq!(default_iters(4096), 5);
    }

    #[test]
    fn bad_plans_are_refused_with_the_item() {
        assert!(plan(&[], 1, None).is_err());
        assert!(plan(&[0], 1, None).is_err());
        assert!(plan(&[4], 1, Some(0)).is_err());
        let err = decode("4:1:3,64:x:2").unwrap_err().to_string();
        assert!(err.contains("64:x:2"), "{err}");
        assert!(decode("4:0:3").is_err());
    }

    #[test]
    fn warmup_is_at_least_the_checking_iteration() {
        assert_eq!(plan(&[4], 0, Some(3)).unwrap()[0].warmup, 1);
    }

    #[test]
    fn bus_bandwidth_follows_the_ring_convention() {
        // Two ranks carry the whole buffer once per link; four carry 1.5 times it.
        assert!((bus_bandwidth_gbps(1_000_000_000, 2, 1.0) - 1.0).abs() < 1e-12);
        assert!((bus_bandwidth_gbps(1_000_000_000, 4, 0.5) - 3.0).abs() < 1e-12);
    }
}
