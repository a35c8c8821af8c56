//! `bench-allreduce`: our gRPC ring all-reduce against torch.distributed's gloo backend, each as
//! N separate processes on loopback, same buffer sizes and iteration counts, in the same run.
//!
//! Our ranks are this executable re-run in a hidden `--rank-child` mode: each binds its
//! collective endpoint on 127.0.0.1:0, the parent hands every rank the full peer list, and the
//! ring forms as it does between workers. gloo's ranks are `gloo_allreduce.py` processes. Both
//! warm up (the first all-reduce checks the sum), meet at a barrier, time back-to-back
//! all-reduces and report their mean; the slowest rank's mean is the point's time. See README.md.
//!
//! `--step-time` measures something else: the demo model's training step at 1 and 2 real
//! workers (issue 9, exposed communication), see [`step_time`].
//!
//! The last line is machine-readable:
//! `RESULT ratio_vs_gloo_64MB_n2=X ratio_vs_gloo_256MB_n4=Y busbw_64MB_n2_GBps=Z`
//! (with `--step-time`: `RESULT step_time_ratio_2w_vs_1w=R ...`).

mod gloo;
mod ours;
mod plan;
mod ranks;
mod report;
mod step_time;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// The allocator the worker and coordinator processes run with (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, ValueEnum};

use ours::RingKnobs;
use plan::SizePlan;
use report::Row;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Wire {
    F32,
    Bf16,
}

#[derive(Parser, Debug)]
#[command(about = "All-reduce bus bandwidth: our gRPC ring against torch.distributed gloo, N processes on loopback")]
struct Args {
    /// Buffer sizes in MB (MiB of f32), comma-separated [default: 4,64,256; --quick: 4].
    #[arg(long, value_delimiter = ',')]
    sizes_mb: Vec<usize>,
    /// Process counts N, comma-separated [default: 2,3,4; --quick: 2,3].
    #[arg(long, value_delimiter = ',')]
    ranks: Vec<usize>,
    /// Untimed all-reduces per size before the timed ones; the first checks the sum
    /// [default: 2; --quick: 1].
    #[arg(long)]
    warmup: Option<usize>,
    /// Timed all-reduces per size [default: 2 GiB worth, between 5 and 30; --quick: 3].
    #[arg(long)]
    iters: Option<usize>,
    /// Parallel streams per link for our ring [default: the ring's].
    #[arg(long)]
    streams: Option<usize>,
    /// Bucket size in MiB for our ring [default: the ring's].
    #[arg(long)]
    bucket_mb: Option<f64>,
    /// Kernel send buffer (SO_SNDBUF) of our links in KiB, 0 for the kernel's autotuning
    /// [default: the ring's, 512].
    #[arg(long)]
    send_buffer_kb: Option<u32>,
    /// What our ring sends: f32, or bf16 with the sum kept in f32.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    wire: Wire,
    /// A rank that waits longer than this on a peer fails (both sides).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Time our ring only; the RESULT ratios are then `nan`.
    #[arg(long)]
    skip_gloo: bool,
    /// Python with torch (also `BENCH_ALLREDUCE_PYTHON`); otherwise the venv below, created with
    /// setup_venv.sh if needed (not in --quick mode).
    #[arg(long, env = "BENCH_ALLREDUCE_PYTHON")]
    python: Option<PathBuf>,
    /// The venv for the gloo side [default: ~/.cache/voxelfleet/bench-train-step/venv, shared
    /// with bench-train-step].
    #[arg(long)]
    venv: Option<PathBuf>,
    /// CI smoke test: 4 MB at N = 2 and 3, 1 warm-up + 3 timed all-reduces, real processes; gloo
    /// only if its venv exists (none is created).
    #[arg(long)]
    quick: bool,
    /// Instead of the all-reduce table: the demo model's step time at 1 and 2 workers.
    #[arg(long)]
    step_time: bool,
    #[command(flatten)]
    step: step_time::StepArgs,
    /// Internal: be one of our ranks (speaks the protocol of ranks.rs on stdin/stdout).
    #[arg(long, hide = true)]
    rank_child: bool,
    /// Internal (with --rank-child): the world size.
    #[arg(long, hide = true)]
    world: Option<usize>,
    /// Internal (with --rank-child): the sizes, as `mib:warmup:iters,...`.
    #[arg(long, hide = true)]
    plan: Option<String>,
}

impl Args {
    fn knobs(&self) -> RingKnobs {
        RingKnobs {
            timeout: Duration::from_secs(self.timeout_secs),
            streams: self.streams,
            bucket_mb: self.bucket_mb,
            send_buffer_kb: self.send_buffer_kb,
            bf16: self.wire == Wire::Bf16,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rank_child {
        let world = args.world.context("--rank-child needs --world")?;
        let plan = plan::decode(args.plan.as_deref().context("--rank-child needs --plan")?)?;
        return ours::rank_main(world, &plan, args.knobs());
    }
    if args.step_time {
        return step_time::run(&args.step, args.quick);
    }

    let sizes = if !args.sizes_mb.is_empty() {
        args.sizes_mb.clone()
    } else if args.quick {
        vec![4]
    } else {
        vec![4, 64, 256]
    };
    let worlds = if !args.ranks.is_empty() {
        args.ranks.clone()
    } else if args.quick {
        vec![2, 3]
    } else {
        vec![2, 3, 4]
    };
    if let Some(&bad) = worlds.iter().find(|&&n| n < 2) {
        bail!("--ranks: an all-reduce needs at least 2 processes (got {bad})");
    }
    let warmup = args.warmup.unwrap_or(if args.quick { 1 } else { 2 });
    let iters = args.iters.or(args.quick.then_some(3));
    let plan = plan::plan(&sizes, warmup, iters)?;
    let knobs = args.knobs();
    let python = if args.skip_gloo {
        None
    } else {
        gloo::python(args.python.clone(), args.venv.clone(), args.quick)?
    };
    println!(
        "bench-allreduce: sizes {sizes:?} MB, N {worlds:?}, plan {}; ours: {}; gloo: {}",
        plan::encode(&plan),
        knobs.describe(),
        python.as_ref().map_or("skipped".into(), |p| p.display().to_string())
    );
    println!("load average at start: {}", load_average());

    let mut rows = Vec::new();
    for &world in &worlds {
        let ours = ranks::run_group(our_commands(world, &plan, &knobs)?, true)
            .with_context(|| format!("our ring at N={world}"))?;
        let ours = ranks::combine(&ours);
        let gloo = match &python {
            Some(py) => Some(ranks::combine(
                &ranks::run_group(gloo::commands(py, world, &plan, args.timeout_secs)?, false)
                    .with_context(|| format!("gloo at N={world}"))?,
            )),
            None => None,
        };
        for p in &plan {
            let row = Row {
                mib: p.mib,
                world,
                ours: ours.get(&p.mib).copied(),
                gloo: gloo.as_ref().and_then(|g| g.get(&p.mib).copied()),
            };
            println!(
                "{:>4} MB N={world}: ours {} GB/s, gloo {} GB/s",
                p.mib,
                row.ours_gbps().map_or("-".into(), |v| format!("{v:.3}")),
                row.gloo_gbps().map_or("-".into(), |v| format!("{v:.3}")),
            );
            rows.push(row);
        }
    }
    println!("load average at end: {}", load_average());
    println!();
    report::print_table(&rows);
    println!("{}", report::result_line(&rows));
    Ok(())
}

/// Our N rank processes: this executable in `--rank-child` mode.
fn our_commands(world: usize, plan: &[SizePlan], knobs: &RingKnobs) -> anyhow::Result<Vec<Command>> {
    let exe = std::env::current_exe().context("finding this executable to start the ranks")?;
    Ok((0..world)
        .map(|_| {
            let mut cmd = Command::new(&exe);
            cmd.args([
                "--rank-child",
                "--world",
                &world.to_string(),
                "--plan",
                &plan::encode(plan),
            ])
            .args(knobs.args());
            cmd
        })
        .collect())
}

/// The 1/5/15-minute load averages, so a reader can tell a quiet run from a busy one.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
