//! `coordinator model export`: a run's committed checkpoint as a safetensors file under PyTorch's
//! key names. The coordinator says where the checkpoint is (its prefix under the run's
//! `artifacts.url`, and each file's hash); the weights are read from the object store here, checked
//! against that hash, and decoded into the backbone the run's stored spec describes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use object_store::path::Path as ObjectPath;
use protocol::model_dir::MODEL_FILE;
use protocol::pb;
use protocol::spec::RunSpec;
use serde_json::json;
use sha2::{Digest, Sha256};
use worker::backend::Cpu;
use worker::model::interop::{torch_state_dict, write_safetensors};
use worker::train::{codec, trainer::model_config};

use crate::cli::Remote;
use crate::cli::client::run_detail;

/// `RUN` or `RUN@STEP`.
fn parse_target(target: &str) -> anyhow::Result<(&str, Option<u64>)> {
    match target.rsplit_once('@') {
        None => Ok((target, None)),
        Some((run, step)) => {
            let step = step
                .parse::<u64>()
                .with_context(|| format!("`{target}`: expected RUN or RUN@STEP, STEP a number"))?;
            Ok((run, Some(step)))
        }
    }
}

/// The committed, usable checkpoint at `step`, or the newest one.
fn pick_checkpoint<'a>(
    run: &str,
    checkpoints: &'a [pb::CheckpointInfo],
    step: Option<u64>,
) -> anyhow::Result<&'a pb::CheckpointInfo> {
    let usable = checkpoints.iter().filter(|c| c.unusable.is_empty());
    let found = match step {
        // Several attempts may have committed the same step; the latest commit wins.
        Some(step) => usable.filter(|c| c.step == step).max_by_key(|c| c.committed_unix_ms),
        None => usable.max_by_key(|c| (c.step, c.committed_unix_ms)),
    };
    found.with_context(|| {
        let steps: Vec<String> = checkpoints
            .iter()
            .map(|c| {
                if c.unusable.is_empty() {
                    c.step.to_string()
                } else {
                    format!("{} (unusable: {})", c.step, c.unusable)
                }
            })
            .collect();
        match (step, steps.is_empty()) {
            (_, true) => format!("run {run} has no committed checkpoint"),
            (Some(step), false) => format!(
                "run {run} has no usable checkpoint at step {step}; its checkpoints: {}",
                steps.join(", ")
            ),
            (None, false) => format!("run {run} has no usable checkpoint: {}", steps.join(", ")),
        }
    })
}

pub async fn export(remote: &Remote, target: &str, out: &Path, force: bool) -> anyhow::Result<ExitCode> {
    let (run_id, step) = parse_target(target)?;
    let detail = run_detail(remote, run_id).await?;
    let spec = RunSpec::from_toml(&detail.spec_toml, &format!("run {run_id}'s stored spec"))?;
    let checkpoint = pick_checkpoint(run_id, &detail.checkpoints, step)?;
    // Before the download: refusing afterwards would waste it.
    check_out(out, force)?;
    let file = checkpoint
        .files
        .iter()
        .find(|f| f.key.rsplit('/').next() == Some(MODEL_FILE))
        .with_context(|| format!("checkpoint {} lists no {MODEL_FILE}", checkpoint.prefix))?;
    let blob = read_verified(&spec.artifacts.url, file).await?;

    let config = model_config(&spec)?;
    let (arch, step, out_path) = (config.arch(), checkpoint.step, out.to_path_buf());
    let run = run_id.to_string();
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let device = Default::default();
        let model = codec::model_from_bytes(config.init::<Cpu>(&device), &blob, &device)
            .with_context(|| format!("decoding {MODEL_FILE} into run {run}'s {} model", config.arch()))?;
        let tensors = torch_state_dict(&model, &config);
        let metadata = HashMap::from([
            // What `safetensors.torch.save_file` writes; some loaders look for it.
            ("format".to_string(), "pt".to_string()),
            ("voxelfleet_run".to_string(), run.clone()),
            ("voxelfleet_step".to_string(), step.to_string()),
            ("voxelfleet_arch".to_string(), config.arch().to_string()),
            (
                "voxelfleet_weights_sha256".to_string(),
                worker::train::params::weights_checksum(&model),
            ),
        ]);
        write_through_partial(&out_path, force, |partial| {
            Ok(write_safetensors(partial, &tensors, metadata)?)
        })?;
        Ok(tensors.len())
    })
    .await??;
    if remote.json {
        println!(
            "{}",
            json!({"run_id": run_id, "step": step, "arch": arch, "tensors": written, "out": out.display().to_string()})
        );
    } else {
        println!(
            "wrote {}: {written} tensors of run {run_id}'s {arch} at step {step}, PyTorch key names",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses an `--out` that exists unless `force`, and with it anything but a regular file (a
/// directory, `/dev/null`), which a rename would replace or fail on.
fn check_out(out: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("--out {}", out.display())),
        Ok(_) if !force => bail!("--out {} exists; pass --force to replace it", out.display()),
        Ok(meta) if !meta.is_file() => bail!(
            "--out {} is not a regular file; --force replaces only files",
            out.display()
        ),
        Ok(_) => Ok(()),
    }
}

/// `<out>.partial`, where the file is written before it takes its name.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Writes `out` through `<out>.partial`, so a failed export leaves neither a half-written `out`
/// nor the partial. Without `force` an `out` that appeared meanwhile is kept (see `place`).
fn write_through_partial(
    out: &Path,
    force: bool,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    check_out(out, force)?;
    let partial = partial_path(out);
    let result = write(&partial)
        .with_context(|| format!("writing {}", partial.display()))
        .and_then(|()| place(&partial, out, force));
    // After a rename it is gone already; after a link or a failure it must go.
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound && result.is_ok() => {
            Err(e).with_context(|| format!("removing {}", partial.display()))
        }
        _ => result,
    }
}

/// Gives the written partial its name: a rename with `force`, else a hard link, which fails
/// if the name is taken where a rename would replace it.
fn place(partial: &Path, out: &Path, force: bool) -> anyhow::Result<()> {
    let moving = || format!("moving {} to {}", partial.display(), out.display());
    if force {
        return std::fs::rename(partial, out).with_context(moving);
    }
    match std::fs::hard_link(partial, out) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("--out {} exists; pass --force to replace it", out.display())
        }
        // A file system without hard links: check, then rename.
        Err(_) => {
            check_out(out, false)?;
            std::fs::rename(partial, out).with_context(moving)
        }
    }
}

/// Reads one checkpoint file from the run's artifacts store and checks it against its hash.
async fn read_verified(artifacts_url: &str, file: &pb::CheckpointFile) -> anyhow::Result<Vec<u8>> {
    let (store, root) =
        data::store_from_url(artifacts_url).with_context(|| format!("the run's artifacts.url `{artifacts_url}`"))?;
    let location = ObjectPath::from(format!("{root}/{}", file.key).trim_start_matches('/'));
    let read = async { store.get(&location).await?.bytes().await };
    let bytes = read
        .await
        .with_context(|| format!("reading {} under {artifacts_url}", file.key))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if bytes.len() as u64 != file.bytes || sha != file.sha256 {
        bail!(
            "{} under {artifacts_url} holds {} bytes with SHA-256 {sha}; the committed checkpoint says {} bytes with {}",
            file.key,
            bytes.len(),
            file.bytes,
            file.sha256
        );
    }
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(step: u64, committed: i64, unusable: &str) -> pb::CheckpointInfo {
        pb::CheckpointInfo {
            step,
            committed_unix_ms: committed,
            unusable: unusable.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_export_writes_through_a_partial_and_refuses_an_existing_out_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("w.safetensors");
        let partial = dir.path().join("w.safetensors.partial");
        let write = |text: &'static str| move |p: &Path| -> anyhow::Result<()> { Ok(std::fs::write(p, text)?) };
        write_through_partial(&out, false, |p| {
            assert_eq!(p, partial);
            write("one")(p)
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one");
        assert!(!partial.exists());

        // An existing file is kept unless --force.
        let err = write_through_partial(&out, false, write("two"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("w.safetensors exists") && err.contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one");
        write_through_partial(&out, true, write("two")).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "two");
        assert!(!partial.exists());

        // A file that appears while the export writes is not replaced either.
        let late = dir.path().join("late.safetensors");
        let err = write_through_partial(&late, false, |p| {
            std::fs::write(&late, "someone else's")?;
            Ok(std::fs::write(p, "mine")?)
        })
        .unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&late).unwrap(), "someone else's");
        assert!(!dir.path().join("late.safetensors.partial").exists());

        // A failed write leaves neither the file nor the partial.
        let failed = dir.path().join("failed.safetensors");
        let err = write_through_partial(&failed, false, |p| {
            std::fs::write(p, "half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"), "{err:#}");
        assert!(!failed.exists() && !dir.path().join("failed.safetensors.partial").exists());

        // --force replaces files only.
        let err = check_out(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = check_out(Path::new("/dev/null"), false).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
    }

    #[test]
    fn targets_name_a_run_and_maybe_a_step() {
        assert_eq!(parse_target("r-1").unwrap(), ("r-1", None));
        assert_eq!(parse_target("r-1@30").unwrap(), ("r-1", Some(30)));
        assert!(parse_target("r-1@x").is_err());
    }

    #[test]
    fn the_newest_usable_checkpoint_is_picked_unless_a_step_is_named() {
        let all = [
            checkpoint(3, 10, ""),
            checkpoint(6, 20, "corrupt"),
            checkpoint(3, 30, ""),
            checkpoint(5, 25, ""),
        ];
        let c = pick_checkpoint("r", &all, None).unwrap();
        assert_eq!((c.step, c.committed_unix_ms), (5, 25));
        let c = pick_checkpoint("r", &all, Some(3)).unwrap();
        assert_eq!(c.committed_unix_ms, 30);
        let err = pick_checkpoint("r", &all, Some(6)).unwrap_err().to_string();
        assert!(err.contains("step 6") && err.contains("unusable: corrupt"), "{err}");
        let err = pick_checkpoint("r", &[], None).unwrap_err().to_string();
        assert!(err.contains("no committed checkpoint"), "{err}");
    }
}
