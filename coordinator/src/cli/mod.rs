//! Command-line interface. `serve` runs the control plane; most other commands are gRPC clients
//! of a running coordinator; `demo` runs everything on one machine; `worker` (hidden) runs the
//! worker agent from this same executable so a fresh checkout needs only one binary.

mod client;
mod demo;
mod lifecycle;
mod output;
mod sweeps;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// voxelfleet coordinator: schedules supervised pre-training of 3D CT segmentation backbones
/// (SuPreM-style) across data-parallel workers, and keeps runs, checkpoints and metrics in sled.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub struct Remote {
    /// Coordinator gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "VOXELFLEET_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator service (gRPC for workers and this CLI), with its sled store. When
    /// VOXELFLEET_TOKEN is set, every request (workers, CLI) must carry it as a bearer token;
    /// give workers and CLI users the same variable. Restarting it costs no training: on SIGTERM
    /// (or SIGINT) it flushes the store and tells workers it will be back; they keep training
    /// and reattach, and the next process on the same --data-dir adopts their runs.
    Serve {
        /// Address to listen on; port 0 picks a free port (printed on start).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Directory of the sled store (runs, workers, checkpoints, metrics).
        #[arg(long, default_value = "./.voxelfleet")]
        data_dir: PathBuf,
        /// Seconds without a heartbeat after which a worker is dead and its run interrupted.
        #[arg(long, default_value_t = 10)]
        dead_after_secs: u64,
    },
    /// Submit a run from a TOML spec (see configs/). Relative local paths in `dataset.url` and
    /// `artifacts.url` are resolved against the current directory.
    Submit {
        /// Run spec file.
        spec: PathBuf,
        /// Queue priority, overriding the spec's `priority` (higher runs first; 0 by default).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List runs. A queued run shows its place in the queue and why it waits ("needs 4 workers,
    /// 2 idle").
    Runs {
        /// Only the runs of this sweep.
        #[arg(long)]
        sweep: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Queue a sweep: a base run spec and axes over any of its keys (`dataset.train_cases`,
    /// `seed`, `train.lr`, ...), expanded into the product of their values, all under one sweep
    /// id. The whole file is validated first; one bad child rejects it and nothing is queued.
    /// Subsets over `dataset.train_cases` nest: they are prefixes of one frozen case order. See
    /// configs/demo-scaling.toml. Also: `sweep show S`, `sweep cancel S`, `sweep resume S`.
    #[command(args_conflicts_with_subcommands = true)]
    Sweep {
        /// Sweep file (TOML).
        file: Option<PathBuf>,
        /// Expand and validate the file here, print the runs, and queue nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(subcommand)]
        action: Option<SweepCommand>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List sweeps with a count of their runs in each state.
    Sweeps {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one run: state, progress, checkpoints, latest metrics, and its events (interruptions
    /// with their causes, resumes, recoveries, garbage collection).
    Show {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a run's metrics; with --follow, keep printing until the run ends.
    Metrics {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a queued or running run; its workers stop and go back to idle.
    Cancel {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Pause a run: rank 0 writes a checkpoint at the next step boundary, then the workers are
    /// released and the run is Paused. A queued run pauses at once.
    Pause {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Queue a Paused run again, or an Interrupted, Failed or Cancelled one that has a committed
    /// checkpoint. It continues from its newest checkpoint that still verifies, bit-identical to
    /// an uninterrupted run at the same world size; its retry budget starts over.
    Resume {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        /// Resume on this many workers. The sample order is global, so no sample is skipped or
        /// repeated; with `train.global_batch` the optimisation is the same too.
        #[arg(long)]
        world_size: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a run's committed checkpoints: step, time, size and hash; `*` marks the one a
    /// resume would start from.
    Checkpoints {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List registered workers.
    Workers {
        #[command(flatten)]
        remote: Remote,
    },
    /// Dataset tools.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Run the whole path on this machine: synthesise a dataset if needed, start a coordinator
    /// and two worker processes, pre-train the tiny U-Net, and print held-out Dice before and
    /// after training. State goes under --dir.
    Demo(demo::DemoArgs),
    /// Run a worker from this executable (what `demo` spawns; same as the `worker` binary).
    #[command(hide = true)]
    Worker(worker::agent::WorkerArgs),
}

#[derive(Subcommand)]
enum SweepCommand {
    /// A table of the sweep's runs: axis values, state, step, final training loss and held-out
    /// Dice (`--json` for the same as JSON).
    Show {
        /// Sweep id, as `coordinator sweeps` lists it.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel every run of the sweep that has not ended.
    Cancel {
        /// Sweep id, as `coordinator sweeps` lists it.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Resume every run of the sweep that can be resumed (paused, interrupted, or failed or
    /// cancelled with a usable checkpoint); the others are listed with the reason.
    Resume {
        /// Sweep id, as `coordinator sweeps` lists it.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// List the frozen dataset manifests: the case order every run over a dataset shares. The
    /// first submit over a dataset URL lists it and freezes the order; later ones reuse it.
    Manifests {
        #[command(flatten)]
        remote: Remote,
    },
    /// Write synthetic CT phantoms in the AbdomenAtlas 1.1 layout (gzip NIfTI: ct.nii.gz int16
    /// HU, segmentations/<class>.nii.gz uint8 for all 25 classes).
    Synth {
        /// Number of cases.
        #[arg(long, default_value_t = 24)]
        cases: usize,
        /// Output directory (case folders BDMAP_XXXXXXXX/ are created inside).
        #[arg(long)]
        out: PathBuf,
        /// Seed; the same seed gives byte-identical files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Volume size in voxels, D,H,W (z,y,x) at 1.5 mm.
        #[arg(long, default_value = "64,64,64", value_parser = parse_shape)]
        shape: [usize; 3],
    },
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{s}`: {e}"))?;
    parts
        .try_into()
        .map_err(|_| format!("`{s}`: expected three comma-separated sizes, like 64,64,64"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws its own progress display; the service logs would interleave with it.
    worker::telemetry::init(if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            listen,
            data_dir,
            dead_after_secs,
        } => serve(listen, data_dir, dead_after_secs).await,
        Command::Submit { spec, priority, remote } => client::submit(&remote, &spec, priority).await,
        Command::Runs { sweep, remote } => client::runs(&remote, sweep.as_deref()).await,
        Command::Sweep {
            file,
            dry_run,
            action,
            remote,
        } => match action {
            Some(SweepCommand::Show { sweep, remote }) => sweeps::show(&remote, &sweep).await,
            Some(SweepCommand::Cancel { sweep, remote }) => sweeps::act(&remote, &sweep, false).await,
            Some(SweepCommand::Resume { sweep, remote }) => sweeps::act(&remote, &sweep, true).await,
            None => sweeps::submit(&remote, sweeps::require_file(file.as_deref())?, dry_run).await,
        },
        Command::Sweeps { remote } => sweeps::list(&remote).await,
        Command::Dataset(DatasetCommand::Manifests { remote }) => sweeps::manifests(&remote).await,
        Command::Show { run, remote } => client::show(&remote, &run).await,
        Command::Metrics { run, follow, remote } => client::metrics(&remote, &run, follow).await,
        Command::Cancel { run, remote } => lifecycle::cancel(&remote, &run).await,
        Command::Workers { remote } => client::workers(&remote).await,
        Command::Pause { run, remote } => lifecycle::pause(&remote, &run).await,
        Command::Resume {
            run,
            world_size,
            remote,
        } => lifecycle::resume(&remote, &run, world_size).await,
        Command::Checkpoints { run, remote } => lifecycle::checkpoints(&remote, &run).await,
        Command::Dataset(DatasetCommand::Synth {
            cases,
            out,
            seed,
            shape,
        }) => {
            let opts = worker::data::SynthOptions {
                cases,
                seed,
                shape,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let ids = tokio::task::spawn_blocking(move || worker::data::write_phantom_dataset(&out, &opts)).await??;
            println!(
                "wrote {} cases ({} .. {}) in {:.1}s",
                ids.len(),
                ids[0],
                ids[ids.len() - 1],
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Worker(args) => {
            worker::agent::run_worker(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(listen: SocketAddr, data_dir: PathBuf, dead_after_secs: u64) -> anyhow::Result<ExitCode> {
    let timing = coordinator::core::Timing::with_dead_after(std::time::Duration::from_secs(dead_after_secs.max(1)));
    let token = protocol::auth::SharedToken::from_env()?;
    if !token.is_set() {
        let var = protocol::auth::TOKEN_ENV;
        tracing::warn!("{var} is not set: any process that can reach {listen} may use this coordinator");
    }
    let mut server = coordinator::server::start(listen, &data_dir, timing, &token).await?;
    // Tests and scripts read the bound address from this line.
    println!(
        "coordinator listening on {} (store: {})",
        server.addr,
        data_dir.display()
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = tokio::select! {
        r = server.wait() => { r?; return Ok(ExitCode::SUCCESS) }
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
    };
    // Workers keep training through a restart: tell them at their next heartbeat that this
    // coordinator is going away and will be back, make every write durable, then stop.
    let running = server.coordinator.begin_going_away().await?;
    tracing::info!(
        signal,
        running,
        "stopping; every write is flushed, and running runs keep training for the next coordinator to adopt"
    );
    tokio::time::sleep(server.coordinator.timing.heartbeat_interval + std::time::Duration::from_millis(500)).await;
    server.stop().await?;
    tracing::info!("coordinator stopped");
    Ok(ExitCode::SUCCESS)
}
