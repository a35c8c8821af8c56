//! `coordinator`: the voxelfleet command line. It serves the control plane (the `coordinator`
//! library), talks to a running one, and runs the demo, the model tools and workers.

mod cli;

/// mimalloc, not glibc's malloc: `coordinator worker` runs rings (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
