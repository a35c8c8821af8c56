//! The benchmark's input: CT cases written by `gen_volumes.py` in the AbdomenAtlas layout, kept in
//! a cache folder and reused, since the same files must feed both pipelines and writing a
//! 512 × 512 × 200 case takes seconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// `BDMAP_00000001`, `BDMAP_00000002`, …: the ids `gen_volumes.py` writes.
pub fn case_ids(n: usize) -> Vec<String> {
    (1..=n).map(|k| format!("BDMAP_{k:08}")).collect()
}

/// Makes sure the first `n` cases exist under `dir`, generating the missing ones. A case folder
/// only appears once complete (the generator renames it into place), so an existing
/// `ct.nii.gz` means a whole case.
pub fn ensure(
    python: &Path,
    script_dir: &Path,
    dir: &Path,
    n: usize,
    shape: [usize; 3],
    seed: u64,
) -> anyhow::Result<()> {
    let ids = case_ids(n);
    let present = ids
        .iter()
        .take_while(|id| dir.join(id).join("ct.nii.gz").is_file())
        .count();
    if present == n {
        println!("volumes: {n} cases in {} (reused)", dir.display());
        return Ok(());
    }
    println!(
        "volumes: writing cases {}..={n} ({}x{}x{} int16, 0.8 x 0.8 x 2.5 mm, LPS) into {}",
        present + 1,
        shape[0],
        shape[1],
        shape[2],
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = Command::new(python)
        .arg(script_dir.join("gen_volumes.py"))
        .arg(dir)
        .args(["--cases", &(n - present).to_string()])
        .args(["--first-id", &(present + 1).to_string()])
        .args(["--seed", &seed.to_string()])
        .arg("--shape")
        .args(shape.map(|s| s.to_string()))
        .status()
        .with_context(|| format!("starting {} gen_volumes.py", python.display()))?;
    if !status.success() {
        bail!("gen_volumes.py failed ({status})");
    }
    Ok(())
}

/// Every file of the cases, so both pipelines start from a warm page cache.
pub fn files(dir: &Path, ids: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for id in ids {
        let case = dir.join(id);
        out.push(case.join("ct.nii.gz"));
        let seg = case.join("segmentations");
        for entry in std::fs::read_dir(&seg).with_context(|| format!("listing {}", seg.display()))? {
            out.push(entry?.path());
        }
    }
    Ok(out)
}

/// Reads every file once; returns the bytes read.
pub fn warm_page_cache(files: &[PathBuf]) -> anyhow::Result<u64> {
    let mut total = 0;
    for f in files {
        total += std::fs::read(f)
            .with_context(|| format!("reading {}", f.display()))?
            .len() as u64;
    }
    Ok(total)
}
