//! Command-line interface. `serve` runs the control plane; most other commands are gRPC clients
//! of a running coordinator; `demo` runs everything on one machine; `worker` (hidden) runs the
//! worker agent from this same executable so a fresh checkout needs only one binary.

/// std's `println!` panics on a closed pipe (`coordinator runs | head`); every command of this
/// module and its children prints through this one instead (see `output::print_line`).
macro_rules! println {
    () => {
        $crate::cli::output::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::print_line(format_args!($($arg)*))
    };
}

mod client;
mod datasets;
mod demo;
mod inspect;
mod lifecycle;
mod model;
mod output;
mod remote;
mod serve;
mod spec_files;
mod sweeps;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use protocol::telemetry::LogFormat;

/// voxelfleet coordinator: schedules supervised pre-training of 3D CT segmentation backbones
/// (SuPreM-style) across data-parallel workers, and keeps runs, checkpoints and metrics in sled.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json` (one object a line,
    /// for log collectors). The level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = protocol::telemetry::LOG_FORMAT_ENV, default_value = "text",
          value_parser = parse_log_format)]
    log_format: LogFormat,
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
    /// File holding the bearer token (what `serve` printed; else VOXELFLEET_TOKEN).
    #[arg(long, global = true, env = protocol::auth::TOKEN_FILE_ENV)]
    pub token_file: Option<PathBuf>,
    /// PEM of the CA that signed the coordinator's TLS certificate; --coordinator is then https://.
    #[arg(long, global = true, env = protocol::tls::TLS_CA_ENV)]
    pub tls_ca: Option<PathBuf>,
    /// Seconds to wait for the coordinator to accept the connection and to answer each request
    /// (`metrics --follow` waits for new points as long as the run lasts).
    #[arg(long, global = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_secs: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator service (gRPC for workers and this CLI), with its sled store. Every
    /// request (workers, CLI) must carry the bearer token: from --token-file, VOXELFLEET_TOKEN,
    /// or, given neither, `<data-dir>/token`, created on first start (its path is printed);
    /// give workers and CLI users the same token. --insecure serves without one. With
    /// --tls-cert/--tls-key it serves TLS. Restarting it costs no training: on SIGTERM (or
    /// SIGINT) it flushes the store and tells workers it will be back; they keep training and
    /// reattach, and the next process on the same --data-dir adopts their runs.
    Serve(serve::ServeArgs),
    /// Submit a run from a TOML spec (see configs/). Relative local paths in `dataset.url`,
    /// `artifacts.url` and `model.init_from` are resolved against the current directory.
    Submit {
        /// Run spec file.
        spec: PathBuf,
        /// Queue priority, overriding the spec's `priority` (higher runs first; 0 by default).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List runs, newest first, a page at a time. A queued run shows its place in the queue and
    /// why it waits ("needs 4 workers, 2 idle").
    Runs {
        /// Only the runs of this sweep.
        #[arg(long)]
        sweep: Option<String>,
        /// Only runs in this state: Queued, Assigned, Running, Paused, Completed, Failed,
        /// Cancelled or Interrupted.
        #[arg(long)]
        state: Option<String>,
        /// At most this many runs (the coordinator's page is 1,000 at most, fewer for long
        /// messages); the rest are counted, not shown.
        #[arg(long, conflicts_with = "all", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Every matching run: follow the pages to the end.
        #[arg(long)]
        all: bool,
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
    /// List the scanned datasets: name, URL, cases, cases without a CT, quarantined cases, size
    /// and when they were scanned (`dataset scan URL` adds one; a submit scans its URL too).
    Datasets {
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
    /// Queue a Paused, Interrupted, Failed or Cancelled run again. It continues from its newest
    /// checkpoint that still verifies, bit-identical to an uninterrupted run at the same world
    /// size; its retry budget starts over. A run that trained but has no checkpoint that
    /// verifies is refused unless --from-scratch.
    Resume {
        /// Run id, as `coordinator runs` lists it.
        run: String,
        /// Resume on this many workers (1 or more). The sample order is global, so no sample is
        /// skipped or repeated; with `train.global_batch` the optimisation is the same too.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        world_size: Option<u32>,
        /// When no checkpoint verifies, start the run over from step 0, discarding its steps.
        #[arg(long)]
        from_scratch: bool,
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
    /// Model tools: `model info ARCH` (parameters and stages), `model import FILE.pth --arch A
    /// --out DIR` (PyTorch weights a run starts from with `model.init_from`), `model export
    /// RUN[@STEP] --out FILE.safetensors` (a run's weights under PyTorch's key names).
    #[command(subcommand)]
    Model(model::ModelCommand),
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
    /// List a dataset URL once (by prefix, never per case) into a dataset record on the running
    /// coordinator: every case folder with its file sizes and class masks. Case folders without
    /// a ct.nii.gz are reported by id and quarantined. Rescanning a name updates it and says what
    /// changed. Runs then name it with `dataset.name` (or its URL).
    Scan {
        /// Dataset URL: file:///path or a plain path (relative to here), or an object-store URL.
        url: String,
        /// Name runs refer to it by; default: the URL's last path segment, or the name it was
        /// scanned under before.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the quarantined cases of a dataset (by name or URL), or of every dataset: the case,
    /// the error, when, and who reported it. Runs skip them until cleared. `--clear` clears the
    /// dataset's whole quarantine, `--clear CASE` one case.
    Quarantine {
        /// Dataset name or URL; every dataset when absent.
        dataset: Option<String>,
        /// Clear instead of listing: every case, or only CASE.
        #[arg(long, value_name = "CASE", num_args = 0..=1, default_missing_value = "")]
        clear: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the frozen dataset manifests: the case order every run over a dataset shares. The
    /// first submit over a dataset URL lists it and freezes the order; later ones reuse it.
    Manifests {
        #[command(flatten)]
        remote: Remote,
    },
    /// Write synthetic CT phantoms in the AbdomenAtlas 1.1 layout (gzip NIfTI: ct.nii.gz int16
    /// HU, segmentations/<class>.nii.gz uint8 for all 25 classes).
    Synth {
        /// Number of cases (at least 1).
        #[arg(long, default_value_t = 24, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
        cases: usize,
        /// Output directory (case folders BDMAP_XXXXXXXX/ are created inside).
        #[arg(long)]
        out: PathBuf,
        /// Seed; the same seed gives byte-identical files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Volume size in voxels, D,H,W (z,y,x), once resampled to the 1.5 mm training spacing;
        /// the files are written at 0.8 x 0.8 x 2.5 mm in LPS, as scanners write CT.
        #[arg(long, default_value = "64,64,64", value_parser = parse_shape)]
        shape: [usize; 3],
    },
    /// Print what a NIfTI file holds, as nibabel reads it: shape (x, y, z), spacing, orientation
    /// codes, datatype, byte order, scaling, sform/qform codes, the affine, and the min, max and
    /// mean of the scaled values with the NaN count.
    Inspect {
        /// A local .nii/.nii.gz path, or a dataset URL ending in the file's key
        /// (file:///data/atlas/BDMAP_00000001/ct.nii.gz).
        file: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
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

/// The demo draws its own progress display; the service logs would interleave with it.
fn quiet_logs(command: &Command) -> bool {
    matches!(command, Command::Demo(_))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    protocol::telemetry::init(if quiet_logs(&cli.command) { "warn" } else { "info" }, cli.log_format);
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
            eprintln!("error: {}", output::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve::serve(args).await,
        Command::Submit { spec, priority, remote } => client::submit(&remote, &spec, priority).await,
        Command::Runs {
            sweep,
            state,
            limit,
            all,
            remote,
        } => {
            let filter = client::RunsFilter {
                sweep,
                state,
                limit,
                all,
            };
            client::runs(&remote, &filter).await
        }
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
        Command::Datasets { remote } => datasets::list(&remote).await,
        Command::Dataset(DatasetCommand::Scan { url, name, remote }) => {
            datasets::scan(&remote, &url, name.as_deref()).await
        }
        Command::Dataset(DatasetCommand::Quarantine { dataset, clear, remote }) => {
            datasets::quarantine(&remote, dataset.as_deref(), clear.as_deref()).await
        }
        Command::Dataset(DatasetCommand::Manifests { remote }) => sweeps::manifests(&remote).await,
        Command::Dataset(DatasetCommand::Inspect { file, json }) => inspect::inspect(&file, json).await,
        Command::Show { run, remote } => client::show(&remote, &run).await,
        Command::Metrics { run, follow, remote } => client::metrics(&remote, &run, follow).await,
        Command::Cancel { run, remote } => lifecycle::cancel(&remote, &run).await,
        Command::Workers { remote } => client::workers(&remote).await,
        Command::Pause { run, remote } => lifecycle::pause(&remote, &run).await,
        Command::Resume {
            run,
            world_size,
            from_scratch,
            remote,
        } => lifecycle::resume(&remote, &run, world_size, from_scratch).await,
        Command::Checkpoints { run, remote } => lifecycle::checkpoints(&remote, &run).await,
        Command::Model(command) => model::run(command).await,
        Command::Dataset(DatasetCommand::Synth {
            cases,
            out,
            seed,
            shape,
        }) => {
            let opts = data::SynthOptions {
                cases,
                seed,
                shape,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let ids = tokio::task::spawn_blocking(move || data::write_phantom_dataset(&out, &opts)).await??;
            let (first, last) = (
                ids.first().cloned().unwrap_or_default(),
                ids.last().cloned().unwrap_or_default(),
            );
            println!(
                "wrote {} cases ({first} .. {last}) in {:.1}s",
                ids.len(),
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
