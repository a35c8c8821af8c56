//! The PyTorch side: which interpreter runs it, and one `train_step.py` run per point.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;
use protocol::spec::ModelSpec;

use crate::burn_step::StepReport;

/// The interpreter for the PyTorch side: `--python` / `BENCH_TRAIN_STEP_PYTHON` as given, else
/// the venv (created with setup_venv.sh unless it already imports torch and MONAI). In quick
/// mode nothing is created: without a given Python, PyTorch is skipped.
pub fn python(given: Option<PathBuf>, venv: Option<PathBuf>, quick: bool) -> anyhow::Result<Option<PathBuf>> {
    if let Some(python) = given {
        if !bench_pyvenv::imports(&python, "torch, monai") {
            bail!("{} cannot import torch and monai", python.display());
        }
        return Ok(Some(python));
    }
    let venv = venv.unwrap_or_else(bench_pyvenv::shared_torch_venv);
    if quick && !bench_pyvenv::imports(&bench_pyvenv::venv_python(&venv), "torch, monai") {
        println!(
            "PyTorch side skipped: no --python given and no venv at {}",
            venv.display()
        );
        return Ok(None);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("setup_venv.sh");
    bench_pyvenv::ensure(&script, &venv, "torch, monai", "PyTorch").map(Some)
}

/// The width arguments that build `spec`'s architecture in `train_step.py`.
fn width_args(spec: &ModelSpec) -> Vec<String> {
    match spec {
        ModelSpec::Unet(u) => vec![
            "--width".into(),
            u.resolved_base_width().to_string(),
            "--depth".into(),
            u.resolved_depth().to_string(),
        ],
        ModelSpec::Segresnet(s) => vec!["--width".into(), s.resolved_init_filters().to_string()],
        ModelSpec::Swinunetr(s) => vec!["--width".into(), s.resolved_feature_size().to_string()],
    }
}

/// One `train_step.py` run with `threads` torch threads.
#[allow(clippy::too_many_arguments)]
pub fn run(
    python: &Path,
    script_dir: &Path,
    spec: &ModelSpec,
    patch: usize,
    batch: usize,
    threads: usize,
    warmup: usize,
    steps: usize,
) -> StepReport {
    let t = threads.to_string();
    let output = Command::new(python)
        .arg(script_dir.join("train_step.py"))
        .args(["--arch", spec.arch()])
        .args(width_args(spec))
        .args([
            "--patch",
            &patch.to_string(),
            "--batch",
            &batch.to_string(),
            "--threads",
            &t,
        ])
        .args(["--warmup", &warmup.to_string(), "--steps", &steps.to_string()])
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .output();
    match output {
        Ok(out) => crate::parse_report(&out.stdout, &out.stderr, out.status.success()),
        Err(err) => StepReport::failed(format!("starting {}: {err}", python.display())),
    }
}
