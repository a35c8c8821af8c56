//! `bench-coordinator`: a load benchmark for the voxelfleet coordinator.
//!
//! Why it exists: every worker heartbeat, every metric report and every CLI call goes through
//! the one coordinator process, and it writes each of them to sled. The end-to-end tests prove it
//! correct with a handful of workers; they say nothing about a fleet. This program puts a fleet's
//! load on a real `coordinator serve` (a thousand simulated workers, ten thousand queued runs, an
//! operator polling the CLI) and measures what the fleet would feel: p50/p99 latency per RPC,
//! metric points ingested per second, and the coordinator's peak resident memory. Its last line
//! is one machine-readable `RESULT` line, so coordinator changes can be compared run to run.
//! Targets, for reading the figures (nothing asserts them): p99 under 10 ms, and at least
//! 100,000 points per second.
//!
//! Phases: synthesise a tiny phantom dataset and start the coordinator (with a fresh bearer
//! token, as deployed) → submit the runs, 64 in flight → register the workers and let each take
//! a run (the ramp) → the measurement window, in which assigned workers report metrics once a
//! second each (as trainers do; `--report-ms 0` makes it a closed loop that finds the ceiling),
//! every worker beats at 1 Hz, and a CLI task lists runs and shows one each second
//! → stop the coordinator (SIGTERM) and print the report. Only calls begun inside the window
//! count toward the steady-state p99; submission and registration are shown on their own rows,
//! and AwaitAssignment, a long-poll whose latency is its poll window, is shown but never counted.

mod cluster;
mod load;
mod payload;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use protocol::auth::SharedToken;

use cluster::{CoordinatorProc, WorkDir};
use load::{Shared, WorkerConfig};

/// Load benchmark for the voxelfleet coordinator.
///
/// Starts a real `coordinator serve` on loopback (its store in a scratch directory, a generated
/// VOXELFLEET_TOKEN), queues runs, runs simulated workers as tokio tasks over a few shared HTTP/2
/// connections (register, 1 Hz heartbeat, long-poll for a run, then ReportMetrics back to back),
/// and a CLI task that calls ListRuns and GetRun once a second. Prints p50/p99 latency per RPC,
/// metric points acknowledged per second, and the coordinator's peak resident memory; the last
/// line is `RESULT p99_ms=X points_per_s=Y rss_mb=Z`, where p99_ms is the worst p99 among
/// Heartbeat, ReportMetrics, ListRuns and GetRun during the measurement window. Targets (not
/// asserted): p99 under 10 ms, at least 100,000 points/s.
///
/// Exits non-zero if the coordinator fails to start, dies, or answers any call with an error.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The coordinator executable to benchmark [default: `coordinator` next to this executable,
    /// then $CARGO_TARGET_DIR/release/coordinator].
    #[arg(long, env = "BENCH_COORDINATOR_BIN")]
    coordinator_bin: Option<PathBuf>,
    /// Runs to queue (world size 1 each) before the workers start [default: 10000; --quick: 1000].
    #[arg(long)]
    runs: Option<usize>,
    /// Simulated workers [default: 1000; --quick: 100].
    #[arg(long)]
    workers: Option<usize>,
    /// Length of the measurement window in seconds [default: 20; --quick: 5].
    #[arg(long)]
    seconds: Option<u64>,
    /// Smoke test: 100 workers, 1,000 runs, a 5 s window (explicit --runs, --workers and
    /// --seconds still win).
    #[arg(long)]
    quick: bool,
    /// Metric points per ReportMetrics call (consecutive steps, `train/loss` and `train/lr`).
    /// With the default period, 1,000 workers offer 120,000 points per second.
    #[arg(long, default_value_t = 120)]
    points_per_report: usize,
    /// Each worker reports once per this many milliseconds (a trainer's `metrics_every`);
    /// 0 reports in a closed loop, as fast as the coordinator answers, to find its ceiling
    /// (latencies then measure queueing, not service).
    #[arg(long, default_value_t = 1000)]
    report_ms: u64,
    /// Attach a weights checksum to every Nth report of a worker (0: never).
    #[arg(long, default_value_t = 10)]
    checksum_every: u64,
    /// HTTP/2 connections the simulated workers share (requests are multiplexed on them).
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// SubmitRun calls in flight while the runs are queued.
    #[arg(long, default_value_t = 64)]
    submit_concurrency: usize,
    /// Heartbeat period of every worker, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// wait_ms of each AwaitAssignment long-poll.
    #[arg(long, default_value_t = 1000)]
    poll_wait_ms: u32,
    /// Stop waiting for every worker to be registered and given a run after this many seconds,
    /// and measure with the workers that have one.
    #[arg(long, default_value_t = 300)]
    ramp_timeout_secs: u64,
    /// Fail when calls are outstanding and none has been answered for this many seconds.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
    /// Give up on a single call after this many seconds (it then counts as an error).
    #[arg(long, default_value_t = 120)]
    rpc_timeout_secs: u64,
    /// Threads of the benchmark's own async runtime. It shares the machine with the coordinator,
    /// so it is kept small; its CPU use during the window is printed.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Where to make the scratch directory (store, dataset, log) [default: the system temp dir].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the scratch directory afterwards (its path is printed).
    #[arg(long)]
    keep_data: bool,
}

/// Args with the --quick defaults applied.
struct Config {
    args: Args,
    runs: usize,
    workers: usize,
    seconds: u64,
}

impl Config {
    fn new(args: Args) -> anyhow::Result<Config> {
        let (runs, workers, seconds) = if args.quick {
            (1_000, 100, 5)
        } else {
            (10_000, 1_000, 20)
        };
        let cfg = Config {
            runs: args.runs.unwrap_or(runs),
            workers: args.workers.unwrap_or(workers),
            seconds: args.seconds.unwrap_or(seconds),
            args,
        };
        anyhow::ensure!(cfg.workers > 0, "--workers must be at least 1");
        anyhow::ensure!(cfg.seconds > 0, "--seconds must be at least 1");
        anyhow::ensure!(cfg.args.channels > 0, "--channels must be at least 1");
        anyhow::ensure!(cfg.args.client_threads > 0, "--client-threads must be at least 1");
        anyhow::ensure!(cfg.args.points_per_report > 0, "--points-per-report must be at least 1");
        anyhow::ensure!(cfg.args.heartbeat_ms > 0, "--heartbeat-ms must be at least 1");
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    let cfg = match Config::new(Args::parse()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.args.client_threads)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the measurement phases leave for the report.
struct Measured {
    submit_secs: f64,
    ramp_secs: f64,
    registered: usize,
    assigned: usize,
    window_secs: f64,
    coordinator_cpu: Option<f64>,
    bench_cpu: Option<f64>,
    stuck_calls: u64,
}

async fn run(cfg: &Config) -> anyhow::Result<()> {
    let begun = Instant::now();
    let bin = cluster::resolve_coordinator_bin(cfg.args.coordinator_bin.as_deref())?;
    let mut work = WorkDir::create(cfg.args.work_dir.as_deref(), cfg.args.keep_data)?;
    let result = bench(cfg, &bin, &work, begun).await;
    if result.is_err() && work.path.join("coordinator.log").exists() {
        // The coordinator's log and store are what explain a failure: keep them.
        work.keep = true;
        return result.with_context(|| format!("scratch directory kept for inspection: {}", work.path.display()));
    }
    result
}

async fn bench(cfg: &Config, bin: &std::path::Path, work: &WorkDir, begun: Instant) -> anyhow::Result<()> {
    let dataset = work.path.join("dataset");
    let artifacts = work.path.join("artifacts");
    std::fs::create_dir_all(&artifacts).with_context(|| format!("cannot create {}", artifacts.display()))?;
    let (dataset, artifacts) = (dataset.display().to_string(), artifacts.display().to_string());
    // Fail here, not on the coordinator, if this program's own spec has gone stale.
    protocol::spec::RunSpec::from_toml(&payload::spec_toml(0, &dataset, &artifacts), "bench spec")
        .context("the benchmark's run spec no longer validates")?;

    println!(
        "bench-coordinator: {} runs, {} workers, {} s window, {} points/report, {} channels, {} client thread(s)",
        cfg.runs, cfg.workers, cfg.seconds, cfg.args.points_per_report, cfg.args.channels, cfg.args.client_threads
    );
    // The binary under test may be rebuilt between runs: say which one this was.
    let meta = std::fs::metadata(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
    println!(
        "  coordinator: {} ({} bytes, built {})",
        bin.display(),
        meta.len(),
        age.map_or("at an unknown time".to_string(), |a| format!(
            "{} min ago",
            a.as_secs() / 60
        ))
    );
    println!("  scratch dir: {}", work.path.display());
    cluster::synth_dataset(bin, std::path::Path::new(&dataset), 4, "16,16,16").await?;

    let token_text = cluster::random_token()?;
    let token = SharedToken::new(&token_text).context("generated token")?;
    let log = work.path.join("coordinator.log");
    let mut coord = CoordinatorProc::spawn(bin, &work.path.join("db"), &log, &token_text).await?;
    println!("  coordinator pid {} listening on {}", coord.pid, coord.addr);

    let shared = Arc::new(Shared::new());
    let (rss, sampler) = cluster::sample_rss(coord.pid, {
        let shared = shared.clone();
        move || shared.window_open() && !shared.is_done()
    });
    let measured = measure(cfg, &coord, &shared, &token, dataset, artifacts).await;
    sampler.abort();
    let stopped = coord.stop().await;
    let measured = measured?;
    println!("  coordinator {stopped}");

    report(cfg, &shared, &measured, &rss, begun.elapsed());
    if cfg.args.keep_data {
        println!("  kept {}", work.path.display());
    }
    let errors = shared.stats.total_errors();
    if errors > 0 {
        anyhow::bail!(
            "the coordinator answered {errors} call(s) with an error, so the figures above are not a clean \
             measurement; first errors:\n  {}",
            shared.stats.error_samples().join("\n  ")
        );
    }
    if measured.stuck_calls > 0 {
        anyhow::bail!(
            "{} call(s) were still unanswered {DRAIN:?} after the window closed; their latency is missing from the \
             table",
            measured.stuck_calls
        );
    }
    let rows = shared.stats.rows();
    let (_, p99) = stats::worst_steady_p99(&rows).context("no call completed during the measurement window")?;
    let points_per_s = shared.acked_points.load(Ordering::Relaxed) as f64 / measured.window_secs;
    let rss_mb = rss.overall_kib.load(Ordering::Relaxed) as f64 / 1024.0;
    println!(
        "RESULT p99_ms={p99:.2} points_per_s={} rss_mb={}",
        points_per_s.round() as u64,
        rss_mb.round() as u64
    );
    Ok(())
}

/// How long outstanding calls get to finish after the window closes.
const DRAIN: Duration = Duration::from_secs(60);

async fn measure(
    cfg: &Config,
    coord: &CoordinatorProc,
    shared: &Arc<Shared>,
    token: &SharedToken,
    dataset: String,
    artifacts: String,
) -> anyhow::Result<Measured> {
    let rpc_timeout = Duration::from_secs(cfg.args.rpc_timeout_secs.max(1));
    let mut channels = vec![];
    for _ in 0..cfg.args.channels {
        channels.push(
            load::connect(coord.addr, rpc_timeout)
                .await
                .context("cannot connect to the coordinator")?,
        );
    }
    // The operator's CLI has a connection of its own, as `coordinator runs` would.
    let probe_channel = load::connect(coord.addr, rpc_timeout).await?;

    // 1. Queue the runs.
    let started = Instant::now();
    let submitted = Arc::new(AtomicUsize::new(0));
    let control: Vec<_> = channels.iter().map(|c| load::control_client(c, token)).collect();
    let mut submit = tokio::spawn(load::submit_runs(
        shared.clone(),
        control,
        cfg.runs,
        cfg.args.submit_concurrency,
        dataset,
        artifacts,
        submitted.clone(),
    ));
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS, PROGRESS);
    let mut watchdog = Watchdog::new(cfg.args.stall_secs);
    loop {
        tokio::select! {
            joined = &mut submit => { joined.context("submit task")??; break }
            how = coord.exited() => return Err(coord.died(&how)),
            _ = progress.tick() => {
                let n = submitted.load(Ordering::Relaxed);
                println!("  submitted {n}/{} runs ({:.0}/s)", cfg.runs, n as f64 / started.elapsed().as_secs_f64());
            }
        }
        watchdog.check(shared, coord)?;
    }
    let submit_secs = started.elapsed().as_secs_f64();
    println!(
        "  submitted {} runs in {submit_secs:.1} s ({:.0}/s)",
        cfg.runs,
        cfg.runs as f64 / submit_secs
    );

    // 2. The ramp: workers register, beat, and take a run each.
    let started = Instant::now();
    let wcfg = Arc::new(WorkerConfig {
        points_per_report: cfg.args.points_per_report,
        report_every: Duration::from_millis(cfg.args.report_ms),
        checksum_every: cfg.args.checksum_every,
        heartbeat: Duration::from_millis(cfg.args.heartbeat_ms),
        poll_wait_ms: cfg.args.poll_wait_ms,
        workers: cfg.workers,
    });
    let mut workers = tokio::task::JoinSet::new();
    for n in 0..cfg.workers {
        let client = load::worker_client(&channels[n % channels.len()], token);
        workers.spawn(load::worker(n, client, shared.clone(), wcfg.clone()));
    }
    let probe = tokio::spawn(load::cli_probe(
        shared.clone(),
        load::control_client(&probe_channel, token),
    ));
    let expected = cfg.runs.min(cfg.workers);
    let ramp_timeout = Duration::from_secs(cfg.args.ramp_timeout_secs);
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS, PROGRESS);
    let mut check = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            how = coord.exited() => return Err(coord.died(&how)),
            _ = check.tick() => {}
            _ = progress.tick() => println!(
                "  ramp: {}/{} workers registered, {}/{expected} have a run",
                shared.registered.load(Ordering::Relaxed),
                cfg.workers,
                shared.assigned.load(Ordering::Relaxed),
            ),
        }
        watchdog.check(shared, coord)?;
        let registered = shared.registered.load(Ordering::Relaxed);
        let assigned = shared.assigned.load(Ordering::Relaxed);
        if registered == cfg.workers && assigned >= expected {
            break;
        }
        if started.elapsed() >= ramp_timeout {
            println!(
                "  warning: ramp timeout ({ramp_timeout:?}): measuring with {registered}/{} workers registered and \
                 {assigned}/{expected} runs placed",
                cfg.workers
            );
            break;
        }
    }
    let ramp_secs = started.elapsed().as_secs_f64();
    let registered = shared.registered.load(Ordering::Relaxed);
    let assigned = shared.assigned.load(Ordering::Relaxed);
    println!("  ramp: {registered} workers registered, {assigned} with a run, in {ramp_secs:.1} s");

    // 3. The measurement window.
    let cpu_before = (
        cluster::cpu_seconds(&coord.pid.to_string()),
        cluster::cpu_seconds("self"),
    );
    let start = Instant::now();
    let end = start + Duration::from_secs(cfg.seconds);
    shared.window.set((start, end)).expect("the window opens once");
    shared.phase.send_replace(());
    println!("  measuring for {} s ...", cfg.seconds);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < end {
        tokio::select! {
            how = coord.exited() => return Err(coord.died(&how)),
            _ = tokio::time::sleep_until(end.into()) => {}
            _ = check.tick() => watchdog.check(shared, coord)?,
        }
    }
    shared.done.store(true, Ordering::Release);
    shared.phase.send_replace(());
    let window_secs = start.elapsed().as_secs_f64();
    let cpu_after = (
        cluster::cpu_seconds(&coord.pid.to_string()),
        cluster::cpu_seconds("self"),
    );
    let used = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / window_secs);

    // 4. Let outstanding calls finish, so slow ones are counted, not dropped.
    let drained = tokio::time::timeout(DRAIN, async { while workers.join_next().await.is_some() {} }).await;
    let stuck_calls = if drained.is_err() {
        workers.abort_all();
        shared.in_flight.load(Ordering::Relaxed)
    } else {
        0
    };
    probe.abort();
    Ok(Measured {
        submit_secs,
        ramp_secs,
        registered,
        assigned,
        window_secs,
        coordinator_cpu: used(cpu_before.0, cpu_after.0),
        bench_cpu: used(cpu_before.1, cpu_after.1),
        stuck_calls,
    })
}

const PROGRESS: Duration = Duration::from_secs(5);

/// Fails the benchmark when calls are outstanding but none has been answered for a while: a
/// hung coordinator (a lock never released, a flush that never returns) would otherwise leave
/// it waiting for timeouts.
struct Watchdog {
    limit: Duration,
    answered: u64,
    since: Instant,
}

impl Watchdog {
    fn new(secs: u64) -> Watchdog {
        Watchdog {
            limit: Duration::from_secs(secs.max(1)),
            answered: 0,
            since: Instant::now(),
        }
    }

    fn check(&mut self, shared: &Shared, coord: &CoordinatorProc) -> anyhow::Result<()> {
        let answered = shared.answered.load(Ordering::Relaxed);
        let waiting = shared.in_flight.load(Ordering::Relaxed);
        if answered != self.answered || waiting == 0 {
            self.answered = answered;
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() >= self.limit {
            anyhow::bail!(
                "the coordinator has answered none of {waiting} outstanding call(s) for {:?}: it looks hung (CPU \
                 time so far {}){}",
                self.limit,
                cluster::cpu_seconds(&coord.pid.to_string()).map_or("?".into(), |s| format!("{s:.1} s")),
                cluster::log_tail(&coord.log)
            );
        }
        Ok(())
    }
}

fn report(cfg: &Config, shared: &Shared, m: &Measured, rss: &cluster::RssPeaks, total: Duration) {
    let rows = shared.stats.rows();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mib = |kib: u64| kib as f64 / 1024.0;
    let points = shared.acked_points.load(Ordering::Relaxed);
    let reports = shared.acked_reports.load(Ordering::Relaxed);
    let points_per_s = points as f64 / m.window_secs;
    println!();
    println!("== voxelfleet coordinator benchmark ==");
    println!(
        "setup:  {} runs queued in {:.1} s; {}/{} workers registered and {} given a run in {:.1} s; {:.0} s in all",
        cfg.runs,
        m.submit_secs,
        m.registered,
        cfg.workers,
        m.assigned,
        m.ramp_secs,
        total.as_secs_f64()
    );
    println!(
        "window: {:.1} s; {} workers reporting {} points per call {} (checksum every {} calls), all {} beating every {} ms, \
         CLI probe every 1 s",
        m.window_secs,
        m.assigned,
        cfg.args.points_per_report,
        match cfg.args.report_ms {
            0 => "in a closed loop".to_string(),
            ms => format!("every {ms} ms"),
        },
        cfg.args.checksum_every,
        m.registered,
        cfg.args.heartbeat_ms
    );
    println!();
    print!("{}", stats::table(&rows));
    println!(
        "(AwaitAssignment is a long-poll with wait_ms {}: its latency is mostly waiting)",
        cfg.args.poll_wait_ms
    );
    println!();
    println!(
        "ingest: {points} points in {reports} acknowledged reports = {points_per_s:.0} points/s (target >= 100000)"
    );
    if let Some((kind, p99)) = stats::worst_steady_p99(&rows) {
        println!("worst steady-state p99: {p99:.2} ms ({}) (target < 10 ms)", kind.name());
    }
    println!(
        "coordinator RSS: peak {:.0} MiB (window peak {:.0} MiB, last sample {:.0} MiB)",
        mib(rss.overall_kib.load(Ordering::Relaxed)),
        mib(rss.window_kib.load(Ordering::Relaxed)),
        mib(rss.last_kib.load(Ordering::Relaxed))
    );
    let pct = |c: Option<f64>| c.map_or("?".to_string(), |c| format!("{:.0}%", c * 100.0));
    println!(
        "CPU during the window (100% = one core, {cores} cores here): coordinator {}, this benchmark {}",
        pct(m.coordinator_cpu),
        pct(m.bench_cpu)
    );
    let rereg = shared.reregistrations.load(Ordering::Relaxed);
    if rereg > 0 {
        println!(
            "note: the coordinator declared live workers dead {rereg} time(s) (their heartbeats waited past \
             --dead-after-secs 30) and they registered again"
        );
    }
    let stops = shared.stop_orders.load(Ordering::Relaxed);
    if stops > 0 {
        println!("note: {stops} stop order(s) for a worker's run; the worker went back to waiting for a run");
    }
}
