//! Checks at submit what can be checked there, so a wrong location is refused with the field
//! that names it instead of surfacing later as a worker's failure or an OS error without
//! context ("File exists (os error 17)" for a dataset.url that is a file). The dataset must be
//! an existing directory; the artifacts location must take a small write and delete through the
//! same object store the workers write checkpoints with.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("field `dataset.url` (`{url}`): {message}")]
    Dataset { url: String, message: String },
    #[error("field `artifacts.url` (`{url}`): {message}")]
    Artifacts { url: String, message: String },
}

/// The dataset location must be an existing, listable directory. Listing its cases is left to
/// the manifest, which names the field too.
pub async fn probe_dataset(url: &str) -> Result<(), ProbeError> {
    let fail = |message: String| ProbeError::Dataset {
        url: url.to_string(),
        message,
    };
    let dir = data::local_dir_from_url(url).map_err(|e| fail(e.to_string()))?;
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

/// The artifacts location must take a write and a delete: the workers write checkpoints there
/// and the coordinator deletes old ones. The directory is created if missing, as the workers
/// would; the probe object is removed again.
pub async fn probe_artifacts(url: &str) -> Result<(), ProbeError> {
    let fail = |message: String| ProbeError::Artifacts {
        url: url.to_string(),
        message,
    };
    let dir = data::local_dir_from_url(url).map_err(|e| fail(e.to_string()))?;
    if let Ok(meta) = tokio::fs::metadata(&dir).await
        && !meta.is_dir()
    {
        return Err(fail(format!("{} is a file, not a directory", dir.display())));
    }
    let (store, root) = data::store_from_url(url).map_err(|e| fail(format!("cannot open it for writing: {e}")))?;
    // A name no checkpoint, run or listing ever uses, unique per probe.
    let name = format!(".voxelfleet-probe-{:016x}", rand::random::<u64>());
    let key = ObjectPath::from(format!("{root}/{name}").trim_start_matches('/'));
    write_and_delete(store.as_ref(), &key).await.map_err(fail)
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
        let err = probe_dataset("s3://bucket/atlas").await.unwrap_err().to_string();
        assert!(err.contains("dataset.url") && err.contains("s3"), "{err}");
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
}
