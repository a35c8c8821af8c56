//! `model.init_from`: a fresh run starts from the weights of a model checkpoint directory (written
//! by `coordinator model import`, or a run's own checkpoint prefix) instead of the seeded init.
//!
//! Every rank loads the same blob before the first step, so the ranks still start bit-identical;
//! the optimiser starts fresh. What the directory claims is checked before training on it: the
//! manifest's architecture against the run's, the blob's layout against the run's backbone (the
//! codec's header), and the loaded weights against the checksum its writer recorded (manifest or
//! `state.json`), so a truncated or swapped file is refused rather than trained on.

use burn::tensor::backend::Backend;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use protocol::model_dir::{MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, ModelManifest, STATE_FILE};

use crate::model::{Backbone, ModelConfig};
use crate::train::{codec, params};

/// Always names the field and the location, so the user knows which line of the spec to fix.
#[derive(Debug, thiserror::Error)]
#[error("model.init_from (`{url}`): {message}")]
pub struct InitFromError {
    pub url: String,
    pub message: String,
}

/// The contents of a model checkpoint directory, as read from its store.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub url: String,
    /// The model blob (`model.bin`).
    pub blob: Vec<u8>,
    /// Present for an imported directory.
    pub manifest: Option<ModelManifest>,
    /// The weights checksum its writer recorded (manifest or a run checkpoint's `state.json`).
    pub recorded_sha256: Option<String>,
}

impl ModelSource {
    fn error(&self, message: impl Into<String>) -> InitFromError {
        InitFromError {
            url: self.url.clone(),
            message: message.into(),
        }
    }
}

/// Reads the directory at `url` (local path, `file://` or object-store URL).
pub async fn fetch(url: &str) -> Result<ModelSource, InitFromError> {
    let fail = |message: String| InitFromError {
        url: url.to_string(),
        message,
    };
    // `store_from_url` creates a missing local directory, which would hide a typo.
    if let data::StoreUrl::Local(dir) = data::StoreUrl::parse(url).map_err(|e| fail(e.to_string()))?
        && !dir.is_dir()
    {
        return Err(fail(format!("directory {} does not exist", dir.display())));
    }
    let (store, root) = data::store_from_url(url).map_err(|e| fail(e.to_string()))?;
    let read = |name: &'static str| read_optional(store.as_ref(), &root, name);
    let blob = read(MODEL_FILE).await.map_err(&fail)?.ok_or_else(|| {
        fail(format!(
            "no {MODEL_FILE} there (expected a directory written by `coordinator model import`, or a run's checkpoint prefix)"
        ))
    })?;
    let manifest = match read(MANIFEST_FILE).await.map_err(&fail)? {
        None => None,
        Some(bytes) => Some(
            serde_json::from_slice::<ModelManifest>(&bytes)
                .map_err(|e| fail(format!("{MANIFEST_FILE} is not a model manifest: {e}")))?,
        ),
    };
    let recorded_sha256 = match &manifest {
        Some(m) => Some(m.weights_sha256.clone()),
        None => match read(STATE_FILE).await.map_err(&fail)? {
            None => None,
            Some(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|state| state["weights_sha256"].as_str().map(str::to_string)),
        },
    };
    Ok(ModelSource {
        url: url.to_string(),
        blob,
        manifest,
        recorded_sha256,
    })
}

async fn read_optional(store: &dyn ObjectStore, root: &ObjectPath, name: &str) -> Result<Option<Vec<u8>>, String> {
    let key = ObjectPath::from(format!("{root}/{name}").trim_start_matches('/'));
    let got = match store.get(&key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(format!("cannot read {name}: {e}")),
    };
    let bytes = got.bytes().await.map_err(|e| format!("cannot read {name}: {e}"))?;
    Ok(Some(bytes.to_vec()))
}

/// Loads the source's weights into `model`, a freshly built backbone of the run's `config`.
pub fn apply<B: Backend>(
    source: &ModelSource,
    model: Backbone<B>,
    config: &ModelConfig,
    device: &B::Device,
) -> Result<Backbone<B>, InitFromError> {
    let built_from = match &source.manifest {
        Some(manifest) => {
            if manifest.format != MANIFEST_FORMAT {
                return Err(source.error(format!(
                    "{MANIFEST_FILE} has format {} (this worker reads {MANIFEST_FORMAT})",
                    manifest.format
                )));
            }
            if manifest.arch != config.arch() {
                return Err(source.error(format!(
                    "it holds a `{}` model ({MANIFEST_FILE}), this run trains `{}`",
                    manifest.arch,
                    config.arch()
                )));
            }
            format!(
                "; it was imported with [model] {}",
                serde_json::to_string(&manifest.model).unwrap_or_default()
            )
        }
        None => String::new(),
    };
    let model = codec::model_from_bytes(model, &source.blob, device)
        .map_err(|e| source.error(format!("{MODEL_FILE} does not fit this run's model: {e}{built_from}")))?;
    if let Some(recorded) = &source.recorded_sha256 {
        let loaded = params::weights_checksum(&model);
        if &loaded != recorded {
            return Err(source.error(format!(
                "the weights of {MODEL_FILE} hash to {loaded} once loaded, its writer recorded {recorded}"
            )));
        }
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuTrain};
    use crate::model::test_unet;
    use protocol::model_dir::ManifestSource;
    use protocol::spec::{ModelSpec, UnetSpec};

    fn manifest(arch: &str, sha: String) -> ModelManifest {
        ModelManifest {
            format: MANIFEST_FORMAT,
            arch: arch.into(),
            model: ModelSpec::Unet(UnetSpec::default()),
            out_channels: 2,
            params: 0,
            weights_sha256: sha,
            source: ManifestSource {
                file: "x.pth".into(),
                sha256: String::new(),
                bytes: 0,
            },
            loaded: 0,
            unused: vec![],
            created_unix_ms: 0,
        }
    }

    fn write_dir(dir: &std::path::Path, blob: &[u8], manifest: Option<&ModelManifest>) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(MODEL_FILE), blob).unwrap();
        if let Some(m) = manifest {
            std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(m).unwrap()).unwrap();
        }
    }

    fn fetch_blocking(url: &str) -> Result<ModelSource, InitFromError> {
        tokio::runtime::Runtime::new().unwrap().block_on(fetch(url))
    }

    #[test]
    fn a_run_starts_from_the_directory_weights_not_its_seeded_init() {
        let tmp = tempfile::tempdir().unwrap();
        let config = test_unet(2, 4, 2);
        let device = Default::default();
        let imported = config.init_seeded::<Cpu>(&device, 7).unwrap();
        let sha = params::weights_checksum(&imported);
        let dir = tmp.path().join("imported");
        write_dir(
            &dir,
            &codec::model_to_bytes(&imported).unwrap(),
            Some(&manifest("unet", sha.clone())),
        );
        // A training (autodiff) model, as the trainer builds it.
        let fresh = config.init_seeded::<CpuTrain>(&device, 11).unwrap();
        assert_ne!(params::weights_checksum(&fresh), sha);
        for url in [dir.display().to_string(), format!("file://{}/", dir.display())] {
            let source = fetch_blocking(&url).unwrap();
            let loaded = apply(&source, fresh.clone(), &config, &device).unwrap();
            assert_eq!(params::weights_checksum(&loaded), sha, "{url}");
        }
    }

    #[test]
    fn a_run_checkpoint_prefix_is_checked_against_its_state() {
        let tmp = tempfile::tempdir().unwrap();
        let config = test_unet(2, 4, 2);
        let device = Default::default();
        let model = config.init_seeded::<Cpu>(&device, 3).unwrap();
        let dir = tmp.path().join("ckpt");
        write_dir(&dir, &codec::model_to_bytes(&model).unwrap(), None);
        let state = |sha: &str| serde_json::to_vec(&serde_json::json!({ "step": 6, "weights_sha256": sha })).unwrap();
        std::fs::write(dir.join(STATE_FILE), state(&params::weights_checksum(&model))).unwrap();
        let source = fetch_blocking(&dir.display().to_string()).unwrap();
        let fresh = config.init_seeded::<Cpu>(&device, 4).unwrap();
        let loaded = apply(&source, fresh.clone(), &config, &device).unwrap();
        assert_eq!(params::weights_checksum(&loaded), params::weights_checksum(&model));

        std::fs::write(dir.join(STATE_FILE), state(&"0".repeat(64))).unwrap();
        let source = fetch_blocking(&dir.display().to_string()).unwrap();
        let err = apply(&source, fresh, &config, &device).unwrap_err().to_string();
        assert!(err.contains("model.init_from") && err.contains("hash to"), "{err}");
    }

    #[test]
    fn wrong_arch_layout_or_location_is_an_error_naming_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let device = Default::default();
        let config = test_unet(2, 4, 2);
        let model = config.init::<Cpu>(&device);
        let blob = codec::model_to_bytes(&model).unwrap();

        let other_arch = tmp.path().join("seg");
        write_dir(
            &other_arch,
            &blob,
            Some(&manifest("segresnet", params::weights_checksum(&model))),
        );
        let source = fetch_blocking(&other_arch.display().to_string()).unwrap();
        let err = apply(&source, config.init::<Cpu>(&device), &config, &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.init_from") && err.contains("`segresnet`") && err.contains("`unet`"),
            "{err}"
        );

        let wider = test_unet(2, 8, 2);
        let plain = tmp.path().join("plain");
        write_dir(&plain, &blob, None);
        let source = fetch_blocking(&plain.display().to_string()).unwrap();
        let err = apply(&source, wider.init::<Cpu>(&device), &wider, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.init_from") && err.contains("does not fit"), "{err}");

        let missing = tmp.path().join("missing");
        let err = fetch_blocking(&missing.display().to_string()).unwrap_err().to_string();
        assert!(
            err.contains("model.init_from") && err.contains("does not exist"),
            "{err}"
        );
        assert!(!missing.exists(), "a missing directory is not created");
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = fetch_blocking(&empty.display().to_string()).unwrap_err().to_string();
        assert!(err.contains("no model.bin"), "{err}");
    }

    #[test]
    fn the_file_names_are_those_run_checkpoints_use() {
        let device = Default::default();
        let model = test_unet(2, 4, 2).init::<CpuTrain>(&device);
        let optim: crate::train::checkpoint::Optim<CpuTrain, Backbone<CpuTrain>> =
            crate::train::optimizer::adamw(1e-5).init();
        let state = crate::train::checkpoint::LoopState::fresh(1, 1, 1);
        let parts = crate::train::checkpoint::encode_parts(&model, &optim, &state).unwrap();
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&MODEL_FILE) && names.contains(&STATE_FILE), "{names:?}");
    }
}
