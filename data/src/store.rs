//! Dataset and artifact URLs, opened as `object_store` stores. One place decides what a URL means,
//! so the coordinator (listing, verifying checkpoints) and the workers (reading cases, writing
//! checkpoints) can never disagree about where a key lives.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

use crate::DataError;

/// Opens a dataset URL: `file:///abs/path` or a plain local path (relative ones resolve against
/// the current directory). The directory is created if missing, and the store is a
/// `LocalFileSystem` rooted *at that directory* with an empty prefix, so keys are dataset-relative
/// (`BDMAP_00000001/ct.nii.gz`) and cannot reach outside it.
pub fn store_from_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), DataError> {
    let dir = local_dir_from_url(url)?;
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| DataError::Store {
        key: dir.display().to_string(),
        source: e,
    })?;
    Ok((Arc::new(store), Path::default()))
}

/// The local directory a store URL names, without touching the file system, so a caller can
/// check it before [`store_from_url`] creates it.
///
/// `object_store::parse_url` is not used because for `file://` it keeps percent-escapes of the URL
/// path in the object path and roots the store at `/`; `url::Url::to_file_path` decodes correctly.
/// Other schemes (`s3://`, `gs://`, …) are refused by name: this build has only the `fs` feature.
pub fn local_dir_from_url(url: &str) -> Result<PathBuf, DataError> {
    let invalid = |reason: String| DataError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    match url::Url::parse(url) {
        // One-letter "schemes" are Windows drive letters, i.e. plain paths.
        Ok(parsed) if parsed.scheme().len() > 1 => {
            if parsed.scheme() != "file" {
                return Err(DataError::UnsupportedScheme {
                    url: url.to_string(),
                    scheme: parsed.scheme().to_string(),
                });
            }
            parsed
                .to_file_path()
                .map_err(|()| invalid("not an absolute local path".into()))
        }
        _ => {
            if url.is_empty() {
                return Err(invalid("empty".into()));
            }
            let path = PathBuf::from(url);
            if path.is_absolute() {
                Ok(path)
            } else {
                Ok(std::env::current_dir().map_err(|e| DataError::io(".", e))?.join(path))
            }
        }
    }
}
