//! `worker`: one process per device. Registers with the coordinator and trains what it is given.

use clap::Parser;

/// voxelfleet GPU/CPU worker: registers with a coordinator, trains assigned runs data-parallel
/// with its peers, reports metrics and checkpoints, then waits for the next run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: worker::agent::WorkerArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    protocol::telemetry::init("info");
    tokio::runtime::Runtime::new()?.block_on(worker::agent::run_worker(cli.args))
}
