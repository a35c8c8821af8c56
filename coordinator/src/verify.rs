//! Checkpoint verification. A checkpoint is committed only after every file it names has been
//! read back from the object store and matched against the hash and size the worker claimed;
//! a torn or missing upload can then never become the checkpoint a run resumes from.

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
pub use protocol::ids::checkpoint_prefix;
use protocol::ids::validate_id;
use protocol::pb;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::records::CheckpointFileRecord;

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("checkpoint file `{key}`: {message}")]
    BadFile { key: String, message: String },
    #[error("checkpoint at `{prefix}` names no files")]
    Empty { prefix: String },
    #[error("artifacts url `{url}`: {message}")]
    Store { url: String, message: String },
}

pub async fn verify_files(
    artifacts_url: &str,
    prefix: &str,
    files: &[pb::CheckpointFile],
) -> Result<Vec<CheckpointFileRecord>, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError::Empty { prefix: prefix.into() });
    }
    let (store, root) = worker::data::store_from_url(artifacts_url).map_err(|e| VerifyError::Store {
        url: artifacts_url.into(),
        message: e.to_string(),
    })?;
    let mut verified = Vec::with_capacity(files.len());
    for f in files {
        let bad = |message: String| VerifyError::BadFile {
            key: f.key.clone(),
            message,
        };
        let name = f
            .key
            .strip_prefix(prefix)
            .ok_or_else(|| bad(format!("is not under `{prefix}`")))?;
        validate_id(name, "checkpoint file name").map_err(bad)?;
        let location = ObjectPath::from(format!("{root}/{prefix}{name}").trim_start_matches('/'));
        let bytes = read_all(store.as_ref(), &location)
            .await
            .map_err(|e| bad(format!("cannot read it back: {e}")))?;
        if bytes.len() as u64 != f.bytes {
            return Err(bad(format!(
                "holds {} bytes, the worker reported {}",
                bytes.len(),
                f.bytes
            )));
        }
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != f.sha256 {
            return Err(bad(format!("SHA-256 is {sha}, the worker reported {}", f.sha256)));
        }
        verified.push(CheckpointFileRecord {
            key: f.key.clone(),
            sha256: sha,
            bytes: f.bytes,
        });
    }
    Ok(verified)
}

async fn read_all(store: &dyn ObjectStore, location: &ObjectPath) -> object_store::Result<bytes::Bytes> {
    store.get(location).await?.bytes().await
}
