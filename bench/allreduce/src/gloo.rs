//! The peer: torch.distributed's gloo backend, N Python processes on loopback, same plan.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::plan::{SizePlan, encode};

/// The interpreter for the gloo side: `--python` / `BENCH_ALLREDUCE_PYTHON` as given, else the
/// venv (created with setup_venv.sh unless it already imports torch). In quick mode nothing is
/// created: without a venv, gloo is skipped.
pub fn python(given: Option<PathBuf>, venv: Option<PathBuf>, quick: bool) -> anyhow::Result<Option<PathBuf>> {
    const MODULES: &str = "torch, torch.distributed";
    if let Some(python) = given {
        if !bench_pyvenv::imports(&python, MODULES) {
            bail!("{} cannot import torch.distributed", python.display());
        }
        return Ok(Some(python));
    }
    let venv = venv.unwrap_or_else(bench_pyvenv::shared_torch_venv);
    if quick && !bench_pyvenv::imports(&bench_pyvenv::venv_python(&venv), MODULES) {
        println!("gloo side skipped: no --python given and no venv at {}", venv.display());
        return Ok(None);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("setup_venv.sh");
    bench_pyvenv::ensure(&script, &venv, MODULES, "PyTorch (gloo)").map(Some)
}

/// A loopback port free right now, for gloo's rendezvous store (rank 0 binds it).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("finding a free loopback port")?
        .local_addr()?
        .port())
}

/// The N rank commands for one gloo group.
pub fn commands(python: &Path, world: usize, plan: &[SizePlan], timeout_secs: u64) -> anyhow::Result<Vec<Command>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("gloo_allreduce.py");
    let port = free_port()?.to_string();
    Ok((0..world)
        .map(|rank| {
            let mut cmd = Command::new(python);
            cmd.arg(&script)
                .args(["--plan", &encode(plan)])
                .args(["--timeout-secs", &timeout_secs.to_string()])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                // gloo picks its interface from the hostname otherwise; loopback is the test.
                .env("GLOO_SOCKET_IFNAME", "lo");
            cmd
        })
        .collect())
}
