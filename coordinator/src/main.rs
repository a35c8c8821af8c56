//! `coordinator`: the voxelfleet control plane and its CLI.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
