//! `worker`: one process per device. Registers with the coordinator and trains what it is given.

use clap::Parser;

/// mimalloc, not glibc's malloc: see the workspace Cargo.toml on why the ring wants it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// voxelfleet GPU/CPU worker: registers with a coordinator, trains assigned runs data-parallel
/// with its peers, reports metrics and checkpoints, then waits for the next run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json` (one object a line,
    /// for log collectors). The level comes from RUST_LOG (default info).
    #[arg(long, env = protocol::telemetry::LOG_FORMAT_ENV, default_value = "text",
          value_parser = |s: &str| s.parse::<protocol::telemetry::LogFormat>())]
    log_format: protocol::telemetry::LogFormat,
    #[command(flatten)]
    args: worker::agent::WorkerArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    protocol::telemetry::init("info", cli.log_format);
    tokio::runtime::Runtime::new()?.block_on(worker::agent::run_worker(cli.args))
}
