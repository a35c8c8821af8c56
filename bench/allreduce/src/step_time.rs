//! Exposed communication (issue 9, item 8): the demo model's training step time at 1 and at 2
//! workers with the same per-worker batch, as real processes do it. A `coordinator serve` on
//! loopback, `coordinator worker` processes (`--max-runs 1`), configs/demo.toml submitted with
//! `world_size` 1 and then 2 (nothing else changed but the step count, evaluation and periodic
//! checkpoints off, and `metrics_every`), and the trainer's own `train/step_seconds` metric read
//! back with `coordinator metrics RUN --json`. That metric covers the whole step as the trainer
//! sees it: waiting for the batch, forward, backward, the gradient all-reduce and the optimiser.
//!
//! Every worker gets the same number of kernel threads (`RAYON_NUM_THREADS`, default 1) in both
//! runs, so the 2-worker run does not simply have half the cores per worker; on a machine with
//! fewer free cores than workers the two still compete for the CPU.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use protocol::auth::TOKEN_ENV;

const DEMO_SPEC: &str = include_str!("../../../configs/demo.toml");

#[derive(clap::Args, Debug)]
pub struct StepArgs {
    /// (--step-time) Training steps per run [default: 80; --quick: 20].
    #[arg(long)]
    pub steps: Option<u64>,
    /// (--step-time) Steps left out at the start of each run: the first pass over the 20 training
    /// cases fills the case cache [default: 20; --quick: 10].
    #[arg(long)]
    pub skip_steps: Option<u64>,
    /// (--step-time) The trainer averages `train/step_seconds` over this many steps.
    #[arg(long, default_value_t = 10)]
    pub metrics_every: u64,
    /// (--step-time) Kernel threads per worker (RAYON_NUM_THREADS), the same at 1 and 2 workers.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// (--step-time) The coordinator executable [default: next to this one, then
    /// $CARGO_TARGET_DIR/release/coordinator].
    #[arg(long)]
    pub coordinator_bin: Option<PathBuf>,
    /// (--step-time) Keep the scratch directory (dataset, store, worker logs) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

/// One run's step times: per rank, the mean of its measured windows.
#[derive(Debug)]
struct RunTimes {
    per_rank: Vec<f64>,
    data_wait: Vec<f64>,
}

impl RunTimes {
    fn mean(&self) -> f64 {
        self.per_rank.iter().sum::<f64>() / self.per_rank.len() as f64
    }
}

pub fn run(args: &StepArgs, quick: bool) -> anyhow::Result<()> {
    let steps = args.steps.unwrap_or(if quick { 20 } else { 80 });
    let skip = args.skip_steps.unwrap_or(if quick { 10 } else { 20 });
    if args.metrics_every == 0 || skip + args.metrics_every > steps {
        bail!(
            "--steps {steps} leaves no window of --metrics-every {} after --skip-steps {skip}",
            args.metrics_every
        );
    }
    let bin = coordinator_bin(args.coordinator_bin.as_deref())?;
    let scratch = tempfile::Builder::new().prefix("bench-step-time").tempdir()?;
    // Kept from the start, so a failed run leaves its worker logs behind too.
    let (_scratch, kept) = if args.keep_dir {
        (None, scratch.keep())
    } else {
        let path = scratch.path().to_path_buf();
        (Some(scratch), path)
    };
    let dir = kept.as_path();
    if args.keep_dir {
        println!("scratch directory (kept): {}", dir.display());
    }
    println!(
        "bench-allreduce --step-time: demo model (configs/demo.toml), {steps} steps per run, first {skip} left out, \
         {} kernel thread(s) per worker; coordinator {}",
        args.worker_threads,
        bin.display()
    );
    println!("load average at start: {}", crate::load_average());
    data::write_phantom_dataset(&dir.join("dataset"), &data::SynthOptions::default())
        .context("synthesising the demo phantoms")?;
    let token = format!("bench-step-time-{}-{}", std::process::id(), unix_nanos());

    let mut results = Vec::new();
    for world in [1u32, 2] {
        // A fresh coordinator per run: one that still lists the previous run's exited worker
        // as idle would put it in the next ring until its heartbeats are missed.
        let cluster = Cluster::start(&bin, dir, &format!("db-{world}w"), &token)?;
        let times = cluster.time_run(world, steps, skip, args)?;
        drop(cluster);
        println!(
            "{world} worker(s): step {:.3} s (per rank {:?}), data wait per step {:?} s",
            times.mean(),
            times.per_rank.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>(),
            times.data_wait.iter().map(|s| format!("{s:.4}")).collect::<Vec<_>>(),
        );
        results.push(times);
    }
    println!("load average at end: {}", crate::load_average());
    let (one, two) = (results[0].mean(), results[1].mean());
    println!();
    println!("step time, demo model, batch 1 per worker: 1 worker {one:.3} s, 2 workers {two:.3} s");
    println!(
        "RESULT step_time_ratio_2w_vs_1w={:.3} step_s_1w={one:.4} step_s_2w={two:.4}",
        two / one
    );
    Ok(())
}

/// A `coordinator serve` on loopback, stopped when dropped.
struct Cluster<'a> {
    bin: &'a Path,
    dir: &'a Path,
    token: &'a str,
    endpoint: String,
    serve: Child,
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}

impl<'a> Cluster<'a> {
    fn start(bin: &'a Path, dir: &'a Path, db: &str, token: &'a str) -> anyhow::Result<Self> {
        let mut serve = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join(db))
            .env(TOKEN_ENV, token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let mut line = String::new();
        BufReader::new(serve.stdout.take().expect("piped")).read_line(&mut line)?;
        let Some(addr) = line
            .strip_prefix("coordinator listening on ")
            .and_then(|rest| rest.split_whitespace().next())
        else {
            let _ = serve.kill();
            bail!("unexpected first line from coordinator serve: {line:?}");
        };
        Ok(Cluster {
            bin,
            dir,
            token,
            endpoint: format!("http://{addr}"),
            serve,
        })
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(self.bin)
            .args(args)
            .args(["--coordinator", &self.endpoint, "--json"])
            .env(TOKEN_ENV, self.token)
            .output()
            .with_context(|| format!("running coordinator {}", args.join(" ")))
    }

    fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "coordinator {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("coordinator {}: not JSON", args.join(" ")))
    }

    /// Submits the demo at `world` workers, runs it to the end on fresh workers, and reads its
    /// step times back.
    fn time_run(&self, world: u32, steps: u64, skip: u64, args: &StepArgs) -> anyhow::Result<RunTimes> {
        let spec = demo_spec(self.dir, world, steps, args.metrics_every)?;
        let spec_path = self.dir.join(format!("demo-{world}w.toml"));
        std::fs::write(&spec_path, spec)?;
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut workers = Workers(Vec::new());
        for i in 0..world {
            let log = std::fs::File::create(logs.join(format!("{world}w-worker-{i}.log")))?;
            let child = Command::new(self.bin)
                .args(["worker", "--coordinator", &self.endpoint, "--max-runs", "1"])
                .env("RAYON_NUM_THREADS", args.worker_threads.to_string())
                .env(TOKEN_ENV, self.token)
                .env("VOXELFLEET_CACHE_DIR", self.dir.join("cache"))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting a worker")?;
            workers.0.push(child);
        }
        let run = self.cli_json(&["submit", spec_path.to_str().context("scratch path is not UTF-8")?])?;
        let run_id = run["run_id"].as_str().context("submit printed no run_id")?.to_string();
        let started = Instant::now();
        // Generous: the tiny U-Net steps in well under a second per worker thread.
        let deadline = Duration::from_secs(120 + 10 * steps);
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let detail = self.cli_json(&["show", &run_id])?;
            let state = detail["run"]["state"].as_str().unwrap_or("").to_string();
            match state.as_str() {
                "Completed" => break,
                "Failed" | "Cancelled" | "Interrupted" => bail!(
                    "run {run_id} at {world} worker(s) ended {state}: {} (worker logs in {})",
                    detail["run"]["message"],
                    logs.display()
                ),
                _ if workers.all_exited() => bail!(
                    "run {run_id} at {world} worker(s) is {state} but its workers have exited: {}",
                    log_tail(&logs.join(format!("{world}w-worker-0.log")))
                ),
                _ if started.elapsed() > deadline => {
                    bail!("run {run_id} at {world} worker(s) still {state} after {deadline:?}")
                }
                _ => {}
            }
        }
        let out = self.cli(&["metrics", &run_id])?;
        if !out.status.success() {
            bail!(
                "coordinator metrics {run_id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let times = step_times(&String::from_utf8_lossy(&out.stdout), world, skip)?;
        workers.wait(Duration::from_secs(30));
        Ok(times)
    }
}

/// Worker processes, killed if still there when dropped.
struct Workers(Vec<Child>);

impl Workers {
    fn all_exited(&mut self) -> bool {
        self.0.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Gives the workers (`--max-runs 1`) a moment to exit on their own.
    fn wait(&mut self, within: Duration) {
        let until = Instant::now() + within;
        while Instant::now() < until && self.0.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last lines of a worker's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    format!(
        "{}: {}",
        path.display(),
        lines[lines.len().saturating_sub(3)..].join(" | ")
    )
}

/// configs/demo.toml at `world` workers and `steps` steps, with its data and store under `dir`;
/// no evaluation, no periodic checkpoints and no retries, which are not the step.
fn demo_spec(dir: &Path, world: u32, steps: u64, metrics_every: u64) -> anyhow::Result<String> {
    let mut spec: toml::Table = DEMO_SPEC.parse().context("configs/demo.toml")?;
    let path = |p: PathBuf| toml::Value::String(p.display().to_string());
    spec.insert("name".into(), format!("bench-step-time-{world}w").into());
    spec.insert("world_size".into(), i64::from(world).into());
    spec.insert("max_retries".into(), 0.into());
    let table = |spec: &toml::Table, key: &str| -> anyhow::Result<toml::Table> {
        spec.get(key)
            .and_then(|v| v.as_table())
            .cloned()
            .with_context(|| format!("configs/demo.toml has no [{key}]"))
    };
    let mut dataset = table(&spec, "dataset")?;
    dataset.insert("url".into(), path(dir.join("dataset")));
    spec.insert("dataset".into(), dataset.into());
    let mut artifacts = table(&spec, "artifacts")?;
    artifacts.insert("url".into(), path(dir.join("store")));
    spec.insert("artifacts".into(), artifacts.into());
    let mut train = table(&spec, "train")?;
    let steps = i64::try_from(steps)?;
    train.insert("steps".into(), steps.into());
    train.insert("warmup_steps".into(), (steps / 10).into());
    train.insert("eval".into(), false.into());
    train.insert("checkpoint_every".into(), 0.into());
    train.insert("metrics_every".into(), i64::try_from(metrics_every)?.into());
    spec.insert("train".into(), train.into());
    Ok(toml::to_string(&spec)?)
}

/// The mean `train/step_seconds` (and `data/wait_seconds`) per rank over the windows that end
/// after step `skip`, from `coordinator metrics --json` lines.
fn step_times(json_lines: &str, world: u32, skip: u64) -> anyhow::Result<RunTimes> {
    let mut sums = vec![(0.0, 0u32, 0.0, 0u32); world as usize];
    for line in json_lines.lines().filter(|l| l.trim_start().starts_with('{')) {
        let m: serde_json::Value = serde_json::from_str(line).with_context(|| format!("metric line {line:?}"))?;
        let (Some(rank), Some(step), Some(name), Some(value)) = (
            m["rank"].as_u64(),
            m["step"].as_u64(),
            m["name"].as_str(),
            m["value"].as_f64(),
        ) else {
            continue;
        };
        // A window ending at `step` covers the steps after the previous report.
        if step <= skip || rank >= u64::from(world) {
            continue;
        }
        let s = &mut sums[rank as usize];
        match name {
            "train/step_seconds" => (s.0, s.1) = (s.0 + value, s.1 + 1),
            "data/wait_seconds" => (s.2, s.3) = (s.2 + value, s.3 + 1),
            _ => {}
        }
    }
    if let Some(rank) = sums.iter().position(|s| s.1 == 0) {
        bail!("no train/step_seconds from rank {rank} after step {skip}");
    }
    Ok(RunTimes {
        per_rank: sums.iter().map(|s| s.0 / f64::from(s.1)).collect(),
        data_wait: sums.iter().map(|s| s.2 / f64::from(s.3.max(1))).collect(),
    })
}

/// `--coordinator-bin`, else `coordinator` next to this executable, else in
/// `$CARGO_TARGET_DIR/release/`.
fn coordinator_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            bail!("--coordinator-bin {}: no such file", p.display())
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("coordinator")));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("release").join("coordinator"));
    [beside, target]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .context("no coordinator executable found; build it with `cargo build --release --bin coordinator` or pass --coordinator-bin")
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_spec_is_changed_only_where_the_measurement_needs() {
        let text = demo_spec(Path::new("/scratch"), 2, 80, 10).unwrap();
        let spec = protocol::spec::RunSpec::from_toml(&text, "bench").unwrap();
        let demo = protocol::spec::RunSpec::from_toml(DEMO_SPEC, "demo").unwrap();
        assert_eq!(spec.world_size, 2);
        assert_eq!((spec.train.steps, spec.train.metrics_every), (80, 10));
        assert!(!spec.train.eval);
        assert_eq!(spec.dataset.url, "/scratch/dataset");
        // The step itself is the demo's: same model, batch per worker and patch.
        assert_eq!(spec.train.batch_size, demo.train.batch_size);
        assert_eq!(spec.train.patch, demo.train.patch);
        assert_eq!(spec.model.arch(), demo.model.arch());
    }

    #[test]
    fn only_windows_after_the_skipped_steps_count() {
        let lines = [
            r#"{"rank":0,"step":10,"name":"train/step_seconds","value":9.0}"#,
            r#"{"rank":0,"step":20,"name":"train/step_seconds","value":1.0}"#,
            r#"{"rank":1,"step":20,"name":"train/step_seconds","value":3.0}"#,
            r#"{"rank":1,"step":30,"name":"train/step_seconds","value":5.0}"#,
            r#"{"rank":1,"step":30,"name":"data/wait_seconds","value":0.5}"#,
            r#"{"rank":0,"step":30,"name":"train/loss","value":7.0}"#,
        ]
        .join("\n");
        let t = step_times(&lines, 2, 10).unwrap();
        assert_eq!(t.per_rank, vec![1.0, 4.0]);
        assert_eq!(t.data_wait, vec![0.0, 0.5]);
        assert_eq!(t.mean(), 2.5);
        let err = step_times(&lines, 3, 10).unwrap_err().to_string();
        assert!(err.contains("rank 2"), "{err}");
    }
}
