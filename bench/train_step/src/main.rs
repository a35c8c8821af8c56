//! `bench-train-step`: one training step (forward + backward + AdamW, BCE + Dice over 25 sigmoid
//! classes) of each voxelfleet backbone on burn's CPU backend, against the same architecture in
//! PyTorch on the CPU, with the same input size and the same number of threads, in the same run.
//!
//! Each (backbone, thread count) point runs in fresh processes, ours then PyTorch's: the
//! benchmark re-executes itself with `--child` and `RAYON_NUM_THREADS=T` (rayon sizes its pool
//! once per process), and starts `train_step.py --threads T`. See README.md.
//!
//! The last line is machine-readable:
//! `RESULT ratio_vs_torch=X unet=… segresnet=… swinunetr=…`, each per-backbone value our median
//! step time over PyTorch's at the highest thread count, X their geometric mean.

mod burn_step;
mod report;
mod torch;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Parser;
use protocol::spec::{KNOWN_ARCHS, ModelSpec, Preset};

use burn_step::StepReport;

#[derive(Parser, Debug)]
#[command(about = "Training-step time of each backbone: voxelfleet (burn, CPU) against PyTorch (CPU)")]
struct Args {
    /// Backbones to time, comma-separated [default: every architecture the spec knows].
    #[arg(long, value_delimiter = ',')]
    archs: Vec<String>,
    /// Model preset (`tiny` trains on CPUs; `suprem` is the paper's size).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Cube side of the input: one number for every backbone, or `arch=N` pairs
    /// (comma-separated) over the defaults [default: unet=32,segresnet=32,swinunetr=64;
    /// --quick: unet=16,segresnet=16,swinunetr=32].
    #[arg(long, value_delimiter = ',')]
    patch: Vec<String>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Thread counts, comma-separated; the RESULT line uses the last [default: 1,2; --quick: 1].
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Untimed steps before the timed ones [default: 1].
    #[arg(long)]
    warmup: Option<usize>,
    /// Timed steps; the median is reported [default: 5; --quick: 1].
    #[arg(long)]
    steps: Option<usize>,
    /// Python with torch and MONAI (also `BENCH_TRAIN_STEP_PYTHON`); otherwise the venv below,
    /// created with setup_venv.sh if needed (not in --quick mode).
    #[arg(long, env = "BENCH_TRAIN_STEP_PYTHON")]
    python: Option<PathBuf>,
    /// The venv for the PyTorch side [default: ~/.cache/voxelfleet/bench-train-step/venv].
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Time our side only; the RESULT ratios are then `nan`.
    #[arg(long)]
    skip_torch: bool,
    /// CI smoke test: tiny inputs, 1 thread, 1 warm-up + 1 timed step; PyTorch only with
    /// --python (no venv is ever created).
    #[arg(long)]
    quick: bool,
    /// Also write every measurement as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one measurement of our side in this process and print it as JSON.
    #[arg(long, hide = true)]
    child: bool,
    /// Internal (with --child): the backbone.
    #[arg(long, hide = true)]
    arch: Option<String>,
}

/// One backbone at one thread count, both sides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub arch: String,
    pub patch: usize,
    pub threads: usize,
    pub ours: StepReport,
    pub torch: Option<StepReport>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let preset = Preset::parse(&args.preset).with_context(|| format!("--preset: unknown preset {}", args.preset))?;
    let warmup = args.warmup.unwrap_or(1);
    let steps = args.steps.unwrap_or(if args.quick { 1 } else { 5 }).max(1);
    if args.child {
        let arch = args.arch.as_deref().context("--child needs --arch")?;
        let spec = ModelSpec::preset(arch, preset).with_context(|| format!("unknown architecture {arch}"))?;
        let patch = patch_for(&args.patch, arch, args.quick)?;
        let report = burn_step::run(&spec, patch, args.batch, warmup, steps);
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }

    let archs: Vec<String> = if args.archs.is_empty() {
        KNOWN_ARCHS.iter().map(|a| a.to_string()).collect()
    } else {
        args.archs.clone()
    };
    let threads = if !args.threads.is_empty() {
        args.threads.clone()
    } else if args.quick {
        vec![1]
    } else {
        vec![1, 2]
    };
    if threads.contains(&0) {
        bail!("--threads: counts must be at least 1");
    }
    let python = if args.skip_torch {
        None
    } else {
        torch::python(args.python.clone(), args.venv.clone(), args.quick)?
    };
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!(
        "bench-train-step: preset {} batch {} threads {:?}, {warmup} warm-up + {steps} timed steps; PyTorch: {}",
        preset.name(),
        args.batch,
        threads,
        python.as_ref().map_or("skipped".into(), |p| p.display().to_string())
    );
    println!("load average at start: {}", report::load_average());

    let mut points = Vec::new();
    for arch in &archs {
        let spec = ModelSpec::preset(arch, preset).with_context(|| format!("--archs: unknown architecture {arch}"))?;
        let patch = patch_for(&args.patch, arch, args.quick)?;
        for &t in &threads {
            let ours = run_child(arch, &args, patch, t, warmup, steps);
            if let Some(err) = &ours.error {
                println!("{arch}: skipped ({err})");
                break;
            }
            let torch = python
                .as_ref()
                .map(|py| torch::run(py, script_dir, &spec, patch, args.batch, t, warmup, steps));
            println!("{}", report::progress_line(arch, patch, t, &ours, torch.as_ref()));
            points.push(Point {
                arch: arch.clone(),
                patch,
                threads: t,
                ours,
                torch,
            });
        }
    }
    println!("load average at end: {}", report::load_average());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!();
    report::print_tables(&points);
    println!(
        "{}",
        report::result_line(&points, &KNOWN_ARCHS, *threads.last().expect("one count"))
    );
    Ok(())
}

/// The cube side for `arch`: a plain number applies to every backbone; `arch=N` overrides one.
fn patch_for(given: &[String], arch: &str, quick: bool) -> anyhow::Result<usize> {
    let mut patch = match (arch, quick) {
        ("swinunetr", false) => 64,
        ("swinunetr", true) => 32,
        (_, false) => 32,
        (_, true) => 16,
    };
    for item in given {
        let (target, value) = match item.split_once('=') {
            Some((target, value)) => (Some(target.trim()), value),
            None => (None, item.as_str()),
        };
        if target.is_none_or(|t| t == arch) {
            patch = value
                .trim()
                .parse()
                .with_context(|| format!("--patch: not a number: {value}"))?;
        }
    }
    Ok(patch)
}

/// Our side of one point, in a fresh process with `RAYON_NUM_THREADS=threads`.
fn run_child(arch: &str, args: &Args, patch: usize, threads: usize, warmup: usize, steps: usize) -> StepReport {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => return StepReport::failed(format!("current_exe: {err}")),
    };
    let output = Command::new(exe)
        .args(["--child", "--arch", arch, "--preset", &args.preset])
        .args(["--patch", &patch.to_string(), "--batch", &args.batch.to_string()])
        .args(["--warmup", &warmup.to_string(), "--steps", &steps.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output();
    match output {
        Ok(out) => parse_report(&out.stdout, &out.stderr, out.status.success()),
        Err(err) => StepReport::failed(format!("starting the child: {err}")),
    }
}

/// The JSON line a side prints last, or an error carrying its stderr's tail.
pub fn parse_report(stdout: &[u8], stderr: &[u8], success: bool) -> StepReport {
    let stdout = String::from_utf8_lossy(stdout);
    let last = stdout.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match last.map(serde_json::from_str::<StepReport>) {
        Some(Ok(report)) if success || report.error.is_some() => report,
        _ => {
            let stderr = String::from_utf8_lossy(stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            StepReport::failed(format!(
                "no report (exit ok: {success}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    }
}
