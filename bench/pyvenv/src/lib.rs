//! The benchmarks that compare against PyTorch (preprocess, train_step, allreduce) all need the
//! same thing: an interpreter that imports torch, from a venv that is reused when it is there
//! and created by a `setup_venv.sh` when it is not. This is that logic, once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The venv's interpreter.
pub fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// The torch + MONAI venv the training-step and all-reduce benchmarks share by default
/// (`~/.cache/voxelfleet/bench-train-step/venv`), so one 4 GB install serves both.
pub fn shared_torch_venv() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/voxelfleet/bench-train-step/venv")
}

/// Whether `python` can import `modules` (a comma-separated list, as `import` takes it).
pub fn imports(python: &Path, modules: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The venv's interpreter, after creating the venv with `setup_script VENV` unless it already
/// imports `modules`. `what` names the side in the messages ("MONAI", "PyTorch").
pub fn ensure(setup_script: &Path, venv: &Path, modules: &str, what: &str) -> anyhow::Result<PathBuf> {
    let python = venv_python(venv);
    if imports(&python, modules) {
        println!("{what} venv: {} (reused)", venv.display());
        return Ok(python);
    }
    println!(
        "{what} venv: creating {} with {} (torch from PyPI; a few minutes, ~4 GB)",
        venv.display(),
        setup_script.display()
    );
    let status = Command::new("bash")
        .arg(setup_script)
        .arg(venv)
        .status()
        .with_context(|| format!("running {}", setup_script.display()))?;
    if !status.success() || !imports(&python, modules) {
        bail!(
            "{} did not produce a venv that imports {modules} ({status})",
            setup_script.display()
        );
    }
    Ok(python)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_interpreter_imports_nothing() {
        assert!(!imports(Path::new("/nonexistent/bin/python"), "sys"));
    }

    #[test]
    fn the_interpreter_lives_in_bin() {
        assert_eq!(venv_python(Path::new("/v")), PathBuf::from("/v/bin/python"));
    }
}
