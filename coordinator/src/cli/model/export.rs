//! `coordinator model export`: a run's committed checkpoint as a safetensors file under PyTorch's
//! key names. The coordinator says where the checkpoint is (its prefix under the run's
//! `artifacts.url`, and each file's hash); the weights are read from the object store here, checked
//! against that hash, and decoded into the backbone the run's stored spec describes.

use std::collections::HashMap;
use std::path::Path;
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

pub async fn export(remote: &Remote, target: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let (run_id, step) = parse_target(target)?;
    let detail = run_detail(remote, run_id).await?;
    let spec = RunSpec::from_toml(&detail.spec_toml, &format!("run {run_id}'s stored spec"))?;
    let checkpoint = pick_checkpoint(run_id, &detail.checkpoints, step)?;
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
        write_safetensors(&out_path, &tensors, metadata)?;
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
