//! The MONAI side: the venv that holds it, and `monai_pipeline.py` runs read back from its JSON.
//!
//! The Python half is SuPreM's own preprocessing (nibabel + MONAI dictionary transforms with
//! SuPreM's parameters); this module only starts it and maps its stages onto the rows of the
//! Rust table, so both sides are printed and compared the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::rust_pipeline::{STAGES, StageTimes};

/// The script's stage names, per row of [`STAGES`] (its `crop_fg` and `pad` share one row).
const MONAI_STAGES: [&[&str]; 7] = [
    &["read"],
    &["decode"],
    &["orientation"],
    &["spacing"],
    &["scale"],
    &["crop_fg", "pad"],
    &["rand_crop"],
];

/// One `monai_pipeline.py` run, summarised.
#[derive(Debug, Clone)]
pub struct MonaiRun {
    /// Mean seconds per volume per stage (each process times its own cases).
    pub times: StageTimes,
    /// Wall seconds from the first case's start to the last's end, divided by the cases.
    pub throughput_s_per_volume: f64,
    pub cases: usize,
    pub threads: usize,
    pub procs: usize,
    /// torch / MONAI / nibabel / numpy versions, as the script reports them.
    pub versions: String,
}

pub use bench_pyvenv::{imports, venv_python};

/// Creates the venv with `setup_venv.sh` unless its interpreter already imports MONAI.
pub fn ensure_venv(script_dir: &Path, venv: &Path) -> anyhow::Result<PathBuf> {
    bench_pyvenv::ensure(
        &script_dir.join("setup_venv.sh"),
        venv,
        "monai, nibabel, torch",
        "MONAI",
    )
}

/// Runs `monai_pipeline.py` on the first `cases` cases of `data_dir` with `threads` torch/OpenMP
/// threads in each of `procs` processes, with its untimed warm-up, and reads its JSON.
pub fn run(
    python: &Path,
    script_dir: &Path,
    data_dir: &Path,
    cases: usize,
    threads: usize,
    procs: usize,
    json: &Path,
) -> anyhow::Result<MonaiRun> {
    let status = Command::new(python)
        .arg(script_dir.join("monai_pipeline.py"))
        .arg(data_dir)
        .args(["--cases", &cases.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--procs", &procs.to_string()])
        .arg("--warmup")
        .arg("--json")
        .arg(json)
        .status()
        .context("starting monai_pipeline.py")?;
    if !status.success() {
        bail!("monai_pipeline.py failed ({status})");
    }
    let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    parse(&serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?)
        .with_context(|| format!("unexpected content in {}", json.display()))
}

fn parse(v: &Value) -> anyhow::Result<MonaiRun> {
    let num = |v: &Value, what: &str| v.as_f64().with_context(|| format!("{what} is not a number"));
    let summary = &v["summary"];
    let mut times = StageTimes::default();
    for (row, names) in MONAI_STAGES.iter().enumerate() {
        for name in *names {
            times.wall[row] += num(&summary["mean_wall_s"][name], &format!("mean_wall_s.{name}"))?;
            times.cpu[row] += num(&summary["mean_cpu_s"][name], &format!("mean_cpu_s.{name}"))?;
        }
    }
    debug_assert_eq!(MONAI_STAGES.len(), STAGES.len());
    let config = &v["config"];
    let count = |key: &str| {
        config[key]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("config.{key}"))
    };
    let versions = config["versions"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    Ok(MonaiRun {
        times,
        throughput_s_per_volume: num(&v["throughput_s_per_volume"], "throughput_s_per_volume")?,
        cases: count("cases")?,
        threads: count("threads_per_proc")?,
        procs: count("procs")?,
        versions,
    })
}
