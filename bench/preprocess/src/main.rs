//! `bench-preprocess`: voxelfleet's preprocessing against the Python pipeline SuPreM trains with.
//!
//! Why it exists: AbdomenAtlas is 9,262 CT volumes, and every one of them goes through download,
//! decode, reorientation, resampling, windowing and cropping before a GPU sees it. SuPreM does
//! that with nibabel and MONAI's dictionary transforms; the data crate does it in Rust. This
//! program runs both on the same generated files, stage by stage, on one core and on all cores,
//! and ends with one machine-readable line:
//!
//! `RESULT ratio_vs_monai=X rust_s_per_volume=Y monai_s_per_volume=Z`
//!
//! where the seconds per volume are per core (one pinned core, process CPU seconds unless
//! `--wall`) and the ratio is MONAI's over Rust's. Target, for reading the figure (nothing asserts
//! it): at least 3.
//!
//! Fairness, in short (the README has the details): same files, same steps in the same order,
//! the same 96³ crop rule; an untimed warm-up pass for both; the page cache warmed before either
//! runs; per-core runs pinned to the same CPU with every helper thread of both sides confined to
//! it.

mod cpu;
mod monai;
mod rust_pipeline;
mod volumes;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use data::preprocess::PreprocessConfig;

use monai::MonaiRun;
use rust_pipeline::{CaseRun, STAGES, StageTimes};

/// Preprocessing benchmark: voxelfleet's Rust pipeline against SuPreM's MONAI pipeline.
///
/// Generates realistic CT cases (512x512x200 int16 at 0.8x0.8x2.5 mm in LPS, with organ masks)
/// with gen_volumes.py, sets up a venv with MONAI (setup_venv.sh; reused when present), then times
/// download, decode, reorientation to RAS, resampling to 1.5 mm, HU windowing, foreground crop +
/// pad and the random 96^3 crop, for both pipelines on the same files: per core (one pinned CPU)
/// and on all cores (volumes in parallel). The last line is
/// `RESULT ratio_vs_monai=X rust_s_per_volume=Y monai_s_per_volume=Z` (per-core seconds per
/// volume; ratio = MONAI / Rust; target >= 3).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Volumes to time (the warm-up pass is extra) [default: 4; --quick: 1].
    #[arg(long)]
    cases: Option<usize>,
    /// Smoke test: 64x64x32 volumes, 1 case; MONAI runs only if its venv already exists (it is
    /// never created in this mode).
    #[arg(long)]
    quick: bool,
    /// Time the Rust pipeline only; the RESULT line then carries nan for MONAI.
    #[arg(long)]
    skip_monai: bool,
    /// The MONAI venv [default: <cache>/venv].
    #[arg(long, env = "BENCH_PREPROCESS_VENV")]
    venv: Option<PathBuf>,
    /// Where the generated cases live [default: <cache>/volumes-XxYxZ-seedS].
    #[arg(long, env = "BENCH_PREPROCESS_DATA")]
    data_dir: Option<PathBuf>,
    /// A Python with numpy and nibabel, to generate volumes when there is no MONAI venv
    /// [default: python3].
    #[arg(long, env = "VOXELFLEET_PYTHON")]
    python: Option<PathBuf>,
    /// Volume size in voxels, NIfTI order [default: 512 512 200; --quick: 64 64 32].
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    shape: Option<Vec<usize>>,
    /// Seed of the generated anatomy and of the random crops.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Cores for the all-cores runs [default: the CPUs this process may use].
    #[arg(long)]
    cores: Option<usize>,
    /// Per-core figures in wall seconds instead of process CPU seconds (CPU seconds are the
    /// default because on a shared machine wall time also counts other tenants' turns).
    #[arg(long)]
    wall: bool,
}

/// `$XDG_CACHE_HOME/voxelfleet/bench-preprocess`, else under `~/.cache`, else the temp dir.
fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("voxelfleet").join("bench-preprocess")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn load() -> String {
    cpu::load_average().map_or("?".into(), |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = cache_root();
    let n = args.cases.unwrap_or(if args.quick { 1 } else { 4 }).max(1);
    let shape: [usize; 3] = match &args.shape {
        Some(s) => [s[0], s[1], s[2]],
        None if args.quick => [64, 64, 32],
        None => [512, 512, 200],
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        cache.join(format!(
            "volumes-{}x{}x{}-seed{}",
            shape[0], shape[1], shape[2], args.seed
        ))
    });
    let venv = args.venv.clone().unwrap_or_else(|| cache.join("venv"));
    let allowed = cpu::allowed_cpus();
    let cores = args.cores.unwrap_or(allowed.len()).max(1);
    println!(
        "bench-preprocess: {} ({} CPUs usable), load average {}",
        cpu_model(),
        allowed.len(),
        load()
    );

    // MONAI: never installed in quick mode, so CI does not download torch.
    let monai_python = if args.skip_monai {
        println!("MONAI: skipped (--skip-monai)");
        None
    } else if args.quick && !monai::imports(&monai::venv_python(&venv), "monai, nibabel, torch") {
        println!(
            "MONAI: skipped (--quick and no MONAI venv at {}; run without --quick once to create it)",
            venv.display()
        );
        None
    } else {
        Some(monai::ensure_venv(script_dir, &venv)?)
    };

    let gen_python = match &monai_python {
        Some(p) => p.clone(),
        None => args.python.clone().unwrap_or_else(|| PathBuf::from("python3")),
    };
    if !monai::imports(&gen_python, "numpy, nibabel") {
        anyhow::bail!(
            "{} cannot import numpy and nibabel, which gen_volumes.py needs; pass --python or set VOXELFLEET_PYTHON",
            gen_python.display()
        );
    }
    volumes::ensure(&gen_python, script_dir, &data_dir, n, shape, args.seed)?;
    let ids = volumes::case_ids(n);
    let files = volumes::files(&data_dir, &ids)?;
    let bytes = volumes::warm_page_cache(&files)?;
    println!(
        "page cache: read {} files, {:.1} MB, once before timing",
        files.len(),
        bytes as f64 / 1e6
    );

    let dir = data_dir
        .to_str()
        .context("the data directory is not UTF-8")?
        .to_string();
    let one_thread = PreprocessConfig {
        threads: 1,
        ..PreprocessConfig::default()
    };
    let results = cache.join("results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;

    // Per core: pin this thread, so the runtime, its blocking pool and the Python child all
    // inherit the one-CPU mask.
    let pinned = *allowed.first().unwrap_or(&0);
    let pin_note = match cpu::pin_to(&[pinned]) {
        Ok(()) => format!("pinned to CPU {pinned}"),
        Err(e) => format!("NOT pinned ({e})"),
    };
    println!("\n== per core ({pin_note}): Rust, 1 thread, {n} volumes after a warm-up pass");
    let rust_one = rust_pipeline::sequential(&dir, &ids, &one_thread, args.seed)?;
    for r in &rust_one {
        print_case(r);
    }
    let monai_one = match &monai_python {
        Some(py) => {
            println!("\n== per core ({pin_note}): MONAI, 1 thread, {n} volumes after a warm-up pass");
            Some(monai::run(
                py,
                script_dir,
                &data_dir,
                n,
                1,
                1,
                &results.join("monai-per-core.json"),
            )?)
        }
        None => None,
    };
    if !allowed.is_empty() {
        cpu::pin_to(&allowed).context("restoring the CPU mask")?;
    }

    println!("\n== all cores: Rust, {cores} threads, one volume each at a time");
    let (rust_all, rust_all_wall) = rust_pipeline::parallel(&dir, &ids, &one_thread, args.seed, cores)?;
    let procs = cores.min(n);
    let monai_all = match &monai_python {
        Some(py) => {
            println!("\n== all cores: MONAI, {procs} processes x 1 thread");
            Some(monai::run(
                py,
                script_dir,
                &data_dir,
                n,
                1,
                procs,
                &results.join("monai-all-cores.json"),
            )?)
        }
        None => None,
    };

    let r1 = StageTimes::mean(rust_one.iter().map(|r| &r.times));
    let ra = StageTimes::mean(rust_all.iter().map(|r| &r.times));
    let first = &rust_one[0];
    println!(
        "\nvolumes: {n} x {}x{}x{} (NIfTI x, y, z), {} class masks each; RAS+1.5 mm shape (z, y, x) {:?}, after fg crop + pad {:?}",
        shape[0], shape[1], shape[2], first.masks_found, first.shapes[1], first.shapes[2]
    );
    if let Some(m) = &monai_one {
        println!("MONAI side: {}", m.versions);
    }
    print_per_core(&r1, monai_one.as_ref(), n, &pin_note, args.wall);
    print_all_cores(&ra, rust_all_wall / n as f64, monai_all.as_ref(), n, cores);
    println!("load average at the end: {}", load());

    let pick = |t: &StageTimes| if args.wall { t.total_wall() } else { t.total_cpu() };
    let clock = if args.wall { "wall" } else { "process CPU" };
    let rust_s = pick(&r1);
    match &monai_one {
        Some(m) => {
            let monai_s = pick(&m.times);
            println!(
                "per core ({clock} seconds per volume): Rust {rust_s:.3}, MONAI {monai_s:.3}: Rust is {:.1}x MONAI (target 3x)",
                monai_s / rust_s
            );
            println!(
                "RESULT ratio_vs_monai={:.2} rust_s_per_volume={rust_s:.3} monai_s_per_volume={monai_s:.3}",
                monai_s / rust_s
            );
        }
        None => {
            println!("MONAI was SKIPPED: no comparison was made; the RESULT line carries nan for it.");
            println!("RESULT ratio_vs_monai=nan rust_s_per_volume={rust_s:.3} monai_s_per_volume=nan");
        }
    }
    Ok(())
}

fn print_case(r: &CaseRun) {
    let stages: Vec<String> = STAGES
        .iter()
        .zip(&r.times.wall)
        .map(|(s, w)| format!("{s} {w:.3}"))
        .collect();
    println!(
        "  {}: {:.3} s wall / {:.3} s CPU | {} | {:.1} MB, {} masks",
        r.case,
        r.times.total_wall(),
        r.times.total_cpu(),
        stages.join(", "),
        r.bytes as f64 / 1e6,
        r.masks_found
    );
}

fn per_s(s: f64) -> String {
    if s > 0.0 { format!("{:.2}", 1.0 / s) } else { "-".into() }
}

fn print_per_core(rust: &StageTimes, monai: Option<&MonaiRun>, n: usize, pin: &str, wall: bool) {
    println!(
        "\nPER CORE ({pin}; mean of {n} volumes; seconds per volume, volumes per second by the {} clock)",
        if wall { "wall" } else { "CPU" }
    );
    println!(
        "{:<14} {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8} | {:>10}",
        "stage", "Rust wall", "Rust CPU", "Rust v/s", "MONAI wall", "MONAI CPU", "MONAI v/s", "MONAI/Rust"
    );
    let pick = |t: &StageTimes, s: usize| if wall { t.wall[s] } else { t.cpu[s] };
    let row = |name: &str, rw: f64, rc: f64, rp: f64, m: Option<(f64, f64, f64)>| {
        let right = match m {
            Some((mw, mc, mp)) => format!("{mw:>10.3} {mc:>9.3} {:>8} | {:>9.1}x", per_s(mp), mp / rp),
            None => format!("{:>10} {:>9} {:>8} | {:>10}", "-", "-", "-", "-"),
        };
        println!("{name:<14} {rw:>9.3} {rc:>9.3} {:>8} | {right}", per_s(rp));
    };
    for (s, name) in STAGES.iter().enumerate() {
        row(
            name,
            rust.wall[s],
            rust.cpu[s],
            pick(rust, s),
            monai.map(|m| (m.times.wall[s], m.times.cpu[s], pick(&m.times, s))),
        );
    }
    let total = |t: &StageTimes| if wall { t.total_wall() } else { t.total_cpu() };
    row(
        "TOTAL",
        rust.total_wall(),
        rust.total_cpu(),
        total(rust),
        monai.map(|m| (m.times.total_wall(), m.times.total_cpu(), total(&m.times))),
    );
}

fn print_all_cores(rust: &StageTimes, rust_throughput: f64, monai: Option<&MonaiRun>, n: usize, cores: usize) {
    let monai_desc = monai.map_or("MONAI skipped".into(), |m| {
        format!("MONAI: {} processes x {} thread", m.procs, m.threads)
    });
    println!(
        "\nALL CORES ({n} volumes; Rust: {cores} threads, one volume each; {monai_desc}); wall seconds per volume inside a worker"
    );
    println!("{:<14} {:>9} | {:>10}", "stage", "Rust", "MONAI");
    for (s, name) in STAGES.iter().enumerate() {
        let m = monai.map_or(format!("{:>10}", "-"), |m| format!("{:>10.3}", m.times.wall[s]));
        println!("{name:<14} {:>9.3} | {m}", rust.wall[s]);
    }
    let m = monai.map_or(format!("{:>10}", "-"), |m| format!("{:>10.3}", m.times.total_wall()));
    println!("{:<14} {:>9.3} | {m}", "TOTAL", rust.total_wall());
    let mt = monai.map_or("-".into(), |m| {
        format!(
            "{:.3} s/volume = {} volumes/s over {} volumes",
            m.throughput_s_per_volume,
            per_s(m.throughput_s_per_volume),
            m.cases
        )
    });
    println!(
        "throughput (wall of the whole batch / volumes): Rust {rust_throughput:.3} s/volume = {} volumes/s; MONAI {mt}",
        per_s(rust_throughput)
    );
}
