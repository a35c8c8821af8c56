//! `coordinator model import`: a PyTorch checkpoint becomes a model directory (the model blob a
//! run checkpoint holds, plus a manifest) that a run starts from with `model.init_from`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use protocol::classes::NUM_CLASSES;
use protocol::model_dir::{MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, ManifestSource, ModelManifest};
use protocol::spec::ModelSpec;
use sha2::{Digest, Sha256};
use worker::backend::Cpu;
use worker::model::interop::{TorchStateDict, load_torch_state_dict};
use worker::model::{ModelConfig, param_count};
use worker::train::{codec, params};

pub fn import(file: &Path, spec: &ModelSpec, out: &Path) -> anyhow::Result<ExitCode> {
    let manifest = import_to_dir(file, spec, out)?;
    for key in &manifest.unused {
        eprintln!("unused: {key}");
    }
    println!(
        "imported {} tensors of {} into {}: {} ({}), {} params, weights {}{}",
        manifest.loaded,
        file.display(),
        out.display(),
        manifest.arch,
        spec.preset_name().name(),
        manifest.params,
        &manifest.weights_sha256[..16],
        if manifest.unused.is_empty() {
            String::new()
        } else {
            format!("; {} unused keys (listed above)", manifest.unused.len())
        }
    );
    println!(
        "start a run from it with `init_from = \"{}\"` in its [model] table",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads `file` into the backbone `spec` describes and writes the model directory `out`.
pub fn import_to_dir(file: &Path, spec: &ModelSpec, out: &Path) -> anyhow::Result<ModelManifest> {
    refuse_non_empty(out)?;
    let (sha256, bytes) = file_sha256(file)?;
    let config = ModelConfig::from_spec(spec, NUM_CLASSES)?;
    let dict = TorchStateDict::read_pth(file)?;
    let model = config.init::<Cpu>(&Default::default());
    let (model, report) = load_torch_state_dict(model, &config, &dict)?;
    let blob = codec::model_to_bytes(&model).context("encoding the model")?;
    let manifest = ModelManifest {
        format: MANIFEST_FORMAT,
        arch: spec.arch().to_string(),
        model: spec.clone(),
        out_channels: NUM_CLASSES as u32,
        params: param_count(&model) as u64,
        weights_sha256: params::weights_checksum(&model),
        source: ManifestSource {
            file: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256,
            bytes,
        },
        loaded: report.loaded as u64,
        unused: report.unused,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    write_dir_atomically(out, &[(MODEL_FILE, &blob), (MANIFEST_FILE, &json)])?;
    Ok(manifest)
}

fn refuse_non_empty(out: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{}: not empty; refusing to overwrite it", out.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("{}: is a file, not a directory", out.display())
        }
        Err(e) => Err(e).with_context(|| format!("{}: cannot read it", out.display())),
    }
}

fn file_sha256(file: &Path) -> anyhow::Result<(String, u64)> {
    let mut reader = std::fs::File::open(file).with_context(|| format!("{}: cannot open it", file.display()))?;
    let mut hash = Sha256::new();
    let bytes = std::io::copy(&mut reader, &mut hash).with_context(|| format!("{}: cannot read it", file.display()))?;
    Ok((hex::encode(hash.finalize()), bytes))
}

/// Writes the files into a temporary sibling of `out` and renames it into place, so `out` is
/// never seen half written (rename replaces an empty directory).
fn write_dir_atomically(out: &Path, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("{}: cannot create it", parent.display()))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{:016x}", rand::random::<u64>()));
    let written = (|| -> anyhow::Result<()> {
        std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create it", tmp.display()))?;
        for (file, bytes) in files {
            let path = tmp.join(file);
            let mut f =
                std::fs::File::create(&path).with_context(|| format!("{}: cannot create it", path.display()))?;
            f.write_all(bytes)
                .and_then(|_| f.sync_all())
                .with_context(|| format!("{}: cannot write it", path.display()))?;
        }
        std::fs::rename(&tmp, out)
            .with_context(|| format!("{}: cannot move the new model directory into place", out.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_empty_directory_is_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("keep"), b"x").unwrap();
        let err = refuse_non_empty(&out).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        refuse_non_empty(&tmp.path().join("absent")).unwrap();

        // An empty directory is replaced whole; nothing temporary is left beside it.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        write_dir_atomically(&empty, &[("a", b"1"), ("b", b"2")]).unwrap();
        assert_eq!(std::fs::read(empty.join("b")).unwrap(), b"2");
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ModelSpec::preset("unet", protocol::spec::Preset::Tiny).unwrap();
        let pth = tmp.path().join("garbage.pth");
        std::fs::write(&pth, b"not a pickle").unwrap();
        let err = import_to_dir(&pth, &spec, &tmp.path().join("out")).unwrap_err();
        assert!(format!("{err:#}").contains("garbage.pth"), "{err:#}");
        assert!(!tmp.path().join("out").exists());
    }
}
