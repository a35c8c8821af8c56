//! `coordinator`: the voxelfleet control plane and its CLI.

mod cli;

/// mimalloc, not glibc's malloc: `coordinator worker` runs rings (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
