//! Checks at submit what can be checked there, so a wrong location is refused with the field
//! that names it instead of surfacing later as a worker's failure or an OS error without
//! context ("File exists (os error 17)" for a dataset.url that is a file). A local dataset must be
//! an existing directory, a bucket dataset must list at least one object under its prefix; the
//! artifacts location must take a small write and delete through the same object store the
//! workers write checkpoints with.
//!
//! Bucket probes run with the coordinator's environment (AWS_*, GOOGLE_*, AZURE_*), and the
//! workers read with their own: both need the same credentials and endpoint.

use std::time::Duration;

use data::StoreUrl;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use protocol::classes::NUM_CLASSES;
use protocol::spec::ModelSpec;

/// How long a bucket probe may take. object_store retries an unreachable endpoint for up to
/// three minutes; a submit should say what is wrong well before that.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("field `dataset.url` (`{url}`): {message}")]
    Dataset { url: String, message: String },
    #[error("field `artifacts.url` (`{url}`): {message}")]
    Artifacts { url: String, message: String },
    #[error("field `model.init_from` (`{url}`): {message}")]
    InitFrom { url: String, message: String },
}

/// The dataset location must be an existing, listable directory, or a bucket prefix with at least
/// one object under it (one listing page, whatever the size of the dataset). Listing its cases is
/// left to the manifest, which names the field too.
pub async fn probe_dataset(url: &str) -> Result<(), ProbeError> {
    let fail = |message: String| ProbeError::Dataset {
        url: url.to_string(),
        message,
    };
    let dir = match StoreUrl::parse(url).map_err(|e| fail(e.to_string()))? {
        StoreUrl::Local(dir) => dir,
        _ => return probe_listing(url).await.map_err(fail),
    };
    let shown = dir.display();
    match tokio::fs::metadata(&dir).await {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(fail(format!("{shown} is a file, not a directory of case folders"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(format!("directory {shown} does not exist")));
        }
        Err(e) => return Err(fail(format!("cannot read {shown}: {e}"))),
    }
    match tokio::fs::read_dir(&dir).await {
        Ok(_) => Ok(()),
        Err(e) => Err(fail(format!("cannot list directory {shown}: {e}"))),
    }
}

async fn probe_listing(url: &str) -> Result<(), String> {
    let (store, prefix) = data::store_from_url(url).map_err(|e| e.to_string())?;
    let first = bounded(url, async { store.list(Some(&prefix)).next().await }).await?;
    match first {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(with_hint(url, format!("cannot list it: {e}"))),
        None => Err(format!(
            "no objects under it (an empty or misspelled prefix `{prefix}`?)"
        )),
    }
}

/// The artifacts location must take a write and a delete: the workers write checkpoints there
/// and the coordinator deletes old ones. A local directory is created if missing, as the workers
/// would; the probe object is removed again.
pub async fn probe_artifacts(url: &str) -> Result<(), ProbeError> {
    let fail = |message: String| ProbeError::Artifacts {
        url: url.to_string(),
        message,
    };
    if let StoreUrl::Local(dir) = StoreUrl::parse(url).map_err(|e| fail(e.to_string()))?
        && let Ok(meta) = tokio::fs::metadata(&dir).await
        && !meta.is_dir()
    {
        return Err(fail(format!("{} is a file, not a directory", dir.display())));
    }
    let (store, root) = data::store_from_url(url).map_err(|e| fail(format!("cannot open it for writing: {e}")))?;
    // A name no checkpoint, run or listing ever uses, unique per probe.
    let name = format!(".voxelfleet-probe-{:016x}", rand::random::<u64>());
    let key = ObjectPath::from(format!("{root}/{name}").trim_start_matches('/'));
    bounded(url, write_and_delete(store.as_ref(), &key))
        .await
        .and_then(|r| r)
        .map_err(|e| fail(with_hint(url, e)))
}

/// The model a run starts from must be there: a directory holding the model blob (an import's
/// output or a run's checkpoint prefix). An imported one says which architecture and size it
/// holds, which must be the run's; a run checkpoint does not, and the worker checks its layout
/// instead.
pub async fn probe_init_from(url: &str, model: &ModelSpec) -> Result<(), ProbeError> {
    let arch = model.arch();
    use protocol::model_dir::{MANIFEST_FILE, MODEL_FILE, ModelManifest};
    let fail = |message: String| ProbeError::InitFrom {
        url: url.to_string(),
        message,
    };
    // `store_from_url` would create a missing local directory.
    if let StoreUrl::Local(dir) = StoreUrl::parse(url).map_err(|e| fail(e.to_string()))?
        && !dir.is_dir()
    {
        return Err(fail(format!("directory {} does not exist", dir.display())));
    }
    let (store, root) = data::store_from_url(url).map_err(|e| fail(e.to_string()))?;
    let key = |name: &str| ObjectPath::from(format!("{root}/{name}").trim_start_matches('/'));
    match bounded(url, store.head(&key(MODEL_FILE))).await.map_err(&fail)? {
        Ok(_) => {}
        Err(object_store::Error::NotFound { .. }) => {
            return Err(fail(format!(
                "no {MODEL_FILE} there (expected a directory written by `coordinator model import`, \
                 or a run's checkpoint prefix)"
            )));
        }
        Err(e) => return Err(fail(with_hint(url, format!("cannot read {MODEL_FILE}: {e}")))),
    }
    let manifest = match bounded(url, async { store.get(&key(MANIFEST_FILE)).await?.bytes().await })
        .await
        .map_err(&fail)?
    {
        Ok(bytes) => bytes,
        Err(object_store::Error::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(fail(with_hint(url, format!("cannot read {MANIFEST_FILE}: {e}")))),
    };
    let manifest: ModelManifest =
        serde_json::from_slice(&manifest).map_err(|e| fail(format!("{MANIFEST_FILE} is not a model manifest: {e}")))?;
    if manifest.arch != arch {
        return Err(fail(format!(
            "it holds a `{}` model ({MANIFEST_FILE}), the spec's model.arch is `{arch}`",
            manifest.arch
        )));
    }
    let differ: Vec<String> = shape_fields(&manifest.model)
        .into_iter()
        .zip(shape_fields(model))
        .filter(|((_, imported), (_, run))| imported != run)
        .map(|((field, imported), (_, run))| format!("{field} is {run}, the model was imported with {imported}"))
        .collect();
    if !differ.is_empty() {
        return Err(fail(format!(
            "it holds a `{arch}` model of another size ({MANIFEST_FILE}): {}; set those fields of [model] \
             to the imported size, or import the weights again at this one",
            differ.join("; ")
        )));
    }
    if manifest.out_channels as usize != NUM_CLASSES {
        return Err(fail(format!(
            "its model has {} output channels ({MANIFEST_FILE}), runs train {NUM_CLASSES}: import it again",
            manifest.out_channels
        )));
    }
    Ok(())
}

/// The resolved sizes that decide a model's tensor shapes, named as the spec file spells them.
fn shape_fields(model: &ModelSpec) -> Vec<(&'static str, u32)> {
    match model {
        ModelSpec::Unet(s) => vec![
            ("model.base_width", s.resolved_base_width()),
            ("model.depth", s.resolved_depth()),
        ],
        ModelSpec::Segresnet(s) => vec![("model.init_filters", s.resolved_init_filters())],
        ModelSpec::Swinunetr(s) => vec![("model.feature_size", s.resolved_feature_size())],
    }
}

async fn write_and_delete(store: &dyn ObjectStore, key: &ObjectPath) -> Result<(), String> {
    store
        .put(key, PutPayload::from_static(b"voxelfleet write probe\n"))
        .await
        .map_err(|e| format!("cannot write there: {e}"))?;
    store
        .delete(key)
        .await
        .map_err(|e| format!("wrote a probe object {key} but cannot delete it: {e}"))
}

async fn bounded<T>(url: &str, probe: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(PROBE_TIMEOUT, probe).await.map_err(|_| {
        with_hint(
            url,
            format!(
                "no answer within {} s (is the endpoint reachable?)",
                PROBE_TIMEOUT.as_secs()
            ),
        )
    })
}

/// Appends which credential variables are unset, the usual reason a bucket refuses a request.
fn with_hint(url: &str, message: String) -> String {
    match data::store::credentials_hint(url) {
        Some(hint) => format!("{message}; {hint}"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn locations_are_probed_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let file = file.display().to_string();

        let err = probe_dataset(&file).await.unwrap_err().to_string();
        assert!(err.contains("dataset.url") && err.contains("is a file"), "{err}");
        let missing = dir.path().join("missing").display().to_string();
        let err = probe_dataset(&missing).await.unwrap_err().to_string();
        assert!(err.contains("dataset.url") && err.contains("does not exist"), "{err}");
        let err = probe_dataset("ftp://host/atlas").await.unwrap_err().to_string();
        assert!(err.contains("dataset.url") && err.contains("ftp"), "{err}");
        probe_dataset(&dir.path().display().to_string()).await.unwrap();
        // Probing the dataset never creates it.
        assert!(!dir.path().join("missing").exists());

        let err = probe_artifacts(&file).await.unwrap_err().to_string();
        assert!(err.contains("artifacts.url") && err.contains(&file), "{err}");
        let err = probe_artifacts("/proc/x").await.unwrap_err().to_string();
        assert!(err.contains("artifacts.url") && err.contains("/proc/x"), "{err}");
        let artifacts = dir.path().join("artifacts");
        probe_artifacts(&format!("file://{}", artifacts.display()))
            .await
            .unwrap();
        // The probe leaves nothing behind but the directory the workers would create anyway.
        assert_eq!(std::fs::read_dir(&artifacts).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn init_from_must_hold_a_model_of_the_runs_arch() {
        use protocol::model_dir::{MANIFEST_FILE, MODEL_FILE};
        let unet = ModelSpec::preset("unet", protocol::spec::Preset::Suprem).unwrap();
        let segresnet = ModelSpec::preset("segresnet", protocol::spec::Preset::Suprem).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("m").display().to_string();
        let err = probe_init_from(&url, &unet).await.unwrap_err().to_string();
        assert!(
            err.contains("model.init_from") && err.contains("does not exist"),
            "{err}"
        );
        assert!(!dir.path().join("m").exists(), "probing never creates it");
        std::fs::create_dir(dir.path().join("m")).unwrap();
        let err = probe_init_from(&url, &unet).await.unwrap_err().to_string();
        assert!(err.contains("model.init_from") && err.contains("no model.bin"), "{err}");
        // A run's checkpoint prefix: no manifest, accepted (the worker checks the layout).
        std::fs::write(dir.path().join("m").join(MODEL_FILE), b"VFMODEL1").unwrap();
        probe_init_from(&url, &unet).await.unwrap();
        let manifest = serde_json::json!({
            "format": 1, "arch": "segresnet", "model": {"arch": "segresnet"}, "out_channels": 25,
            "params": 1, "weights_sha256": "x", "loaded": 1, "unused": [], "created_unix_ms": 0,
            "source": {"file": "a.pth", "sha256": "y", "bytes": 3},
        });
        std::fs::write(dir.path().join("m").join(MANIFEST_FILE), manifest.to_string()).unwrap();
        probe_init_from(&format!("file://{url}"), &segresnet).await.unwrap();
        let err = probe_init_from(&url, &unet).await.unwrap_err().to_string();
        assert!(err.contains("`segresnet`") && err.contains("`unet`"), "{err}");
    }

    /// Before, a model imported at another depth or width passed the probe and the run failed
    /// later, at the worker, on the blob's layout.
    #[tokio::test]
    async fn init_from_at_another_size_is_refused_naming_the_fields() {
        use protocol::model_dir::{MANIFEST_FILE, MODEL_FILE};
        use protocol::spec::{Preset, SegResNetSpec, UnetSpec};
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().display().to_string();
        std::fs::write(dir.path().join(MODEL_FILE), b"VFMODEL1").unwrap();
        let manifest = |model: serde_json::Value, out_channels: usize| {
            let manifest = serde_json::json!({
                "format": 1, "arch": model["arch"], "model": model, "out_channels": out_channels,
                "params": 1, "weights_sha256": "x", "loaded": 1, "unused": [], "created_unix_ms": 0,
                "source": {"file": "a.pth", "sha256": "y", "bytes": 3},
            });
            std::fs::write(dir.path().join(MANIFEST_FILE), manifest.to_string()).unwrap();
        };
        let unet = |preset, base_width, depth| {
            ModelSpec::Unet(UnetSpec {
                preset,
                base_width,
                depth,
                init_from: Some(url.clone()),
            })
        };
        manifest(
            serde_json::json!({"arch": "unet", "preset": "tiny", "depth": 2}),
            NUM_CLASSES,
        );
        // The same sizes, spelled another way (the tiny preset's width 4), are accepted.
        probe_init_from(&url, &unet(Preset::Suprem, Some(4), Some(2)))
            .await
            .unwrap();
        let err = probe_init_from(&url, &unet(Preset::Suprem, None, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.init_from")
                && err.contains("model.base_width is 32, the model was imported with 4")
                && err.contains("model.depth is 4, the model was imported with 2"),
            "{err}"
        );
        let err = probe_init_from(&url, &unet(Preset::Tiny, None, Some(3)))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.depth is 3") && !err.contains("model.base_width"),
            "{err}"
        );
        manifest(serde_json::json!({"arch": "segresnet", "init_filters": 8}), NUM_CLASSES);
        let seg = |init_filters| {
            ModelSpec::Segresnet(SegResNetSpec {
                preset: Preset::Suprem,
                init_filters,
                init_from: None,
            })
        };
        probe_init_from(&url, &seg(Some(8))).await.unwrap();
        let err = probe_init_from(&url, &seg(None)).await.unwrap_err().to_string();
        assert!(err.contains("model.init_filters is 16"), "{err}");
        manifest(serde_json::json!({"arch": "segresnet", "init_filters": 8}), 3);
        let err = probe_init_from(&url, &seg(Some(8))).await.unwrap_err().to_string();
        assert!(err.contains("3 output channels"), "{err}");
    }

    #[tokio::test]
    async fn bucket_locations_are_probed_by_listing_and_a_write() {
        let err = probe_dataset("memory://probe-test/atlas")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset.url") && err.contains("no objects under it"),
            "{err}"
        );
        let (store, _) = data::store_from_url("memory://probe-test").unwrap();
        store
            .put(
                &ObjectPath::from("atlas/BDMAP_00000001/ct.nii.gz"),
                PutPayload::from_static(b"x"),
            )
            .await
            .unwrap();
        probe_dataset("memory://probe-test/atlas/").await.unwrap();

        probe_artifacts("memory://probe-test/artifacts").await.unwrap();
        let left: Vec<_> = store
            .list(Some(&ObjectPath::from("artifacts")))
            .collect::<Vec<_>>()
            .await;
        assert!(left.is_empty(), "the probe object is deleted again: {left:?}");

        let err = probe_artifacts("s3://bucket/../x").await.unwrap_err().to_string();
        assert!(err.contains("artifacts.url") && err.contains(".."), "{err}");
    }

    #[tokio::test]
    #[ignore = "needs the S3-compatible test server (VOXELFLEET_TEST_S3_ENDPOINT); .ci/run starts moto and runs this with --ignored"]
    async fn s3_locations_are_probed_against_the_test_server() {
        let s3 = data::reference::reference_s3("s3_locations_are_probed_against_the_test_server");
        let url = s3.unique_url("probe");
        let err = probe_dataset(&url).await.unwrap_err().to_string();
        assert!(
            err.contains("dataset.url") && err.contains("no objects under it"),
            "{err}"
        );
        let (store, prefix) = data::store_from_url(&url).unwrap();
        store
            .put(
                &prefix.child("BDMAP_00000001").child("ct.nii.gz"),
                PutPayload::from_static(b"x"),
            )
            .await
            .unwrap();
        probe_dataset(&url).await.unwrap();

        let artifacts = s3.unique_url("probe-artifacts");
        probe_artifacts(&artifacts).await.unwrap();
        let (store, prefix) = data::store_from_url(&artifacts).unwrap();
        let left: Vec<_> = store.list(Some(&prefix)).collect::<Vec<_>>().await;
        assert!(left.is_empty(), "the probe object is deleted again: {left:?}");

        // A bucket that does not exist: the server's refusal, under the field's name.
        let missing = "s3://no-such-bucket-voxelfleet/atlas";
        let err = probe_dataset(missing).await.unwrap_err().to_string();
        assert!(err.contains("dataset.url") && err.contains("cannot list it"), "{err}");
        let err = probe_artifacts(missing).await.unwrap_err().to_string();
        assert!(
            err.contains("artifacts.url") && err.contains("cannot write there"),
            "{err}"
        );
    }
}
