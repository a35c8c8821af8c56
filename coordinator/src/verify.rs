//! Checkpoint verification against the object store. A checkpoint is committed only after every
//! file it names has been read back and matched against the size and hash the worker claimed, and
//! it is checked again before a run resumes from it, so a torn, missing or since-damaged upload
//! never becomes the state a run continues from. Checkpoints run to gigabytes, hence streaming.

use std::io::ErrorKind;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
pub use protocol::ids::checkpoint_prefix;
use protocol::ids::validate_id;
use protocol::pb;
use thiserror::Error;

use crate::records::{CheckpointFileRecord, CheckpointRecord};

const WORKER_CLAIM: &str = "the worker reported";
const RECORD_CLAIM: &str = "the committed record says";

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("checkpoint at `{prefix}` names no files")]
    Empty { prefix: String },
    #[error("checkpoint file `{key}` is not under `{prefix}`")]
    NotUnderPrefix { key: String, prefix: String },
    #[error("checkpoint file `{key}`: {reason}")]
    BadName { key: String, reason: String },
    #[error("checkpoint file `{key}` is missing from the object store")]
    Missing { key: String },
    #[error("checkpoint file `{key}` holds {actual} bytes, {claimed_by} {expected}")]
    Size {
        key: String,
        actual: u64,
        expected: u64,
        claimed_by: &'static str,
    },
    #[error("checkpoint file `{key}` has SHA-256 {actual}, {claimed_by} {expected}")]
    Hash {
        key: String,
        actual: String,
        expected: String,
        claimed_by: &'static str,
    },
    #[error("checkpoint file `{key}`: cannot read it back: {message}")]
    Read { key: String, message: String },
    #[error("checkpoint file `{key}`: cannot delete it: {message}")]
    Delete { key: String, message: String },
    #[error("artifacts url `{url}`: {message}")]
    Store { url: String, message: String },
}

/// Verifies the files a worker says it uploaded for a checkpoint at `prefix`, returning the
/// records to commit. Every key is vetted before any object is read.
pub async fn verify_files(
    artifacts_url: &str,
    prefix: &str,
    files: &[pb::CheckpointFile],
) -> Result<Vec<CheckpointFileRecord>, VerifyError> {
    let claimed: Vec<CheckpointFileRecord> = files
        .iter()
        .map(|f| CheckpointFileRecord {
            key: f.key.clone(),
            sha256: f.sha256.clone(),
            bytes: f.bytes,
        })
        .collect();
    verify_claims(artifacts_url, prefix, &claimed, WORKER_CLAIM).await?;
    Ok(claimed)
}

/// Re-verifies a committed checkpoint: objects can be lost or overwritten after commit, and
/// resuming from a damaged one would silently corrupt the run.
pub async fn verify_committed(artifacts_url: &str, record: &CheckpointRecord) -> Result<(), VerifyError> {
    verify_claims(artifacts_url, &record.prefix, &record.files, RECORD_CLAIM).await
}

/// The cheap half of `verify_committed`: every file exists with its committed size. Listings
/// use it to mark a resume point without reading gigabytes; a resume still reads and hashes.
pub async fn check_present(artifacts_url: &str, record: &CheckpointRecord) -> Result<(), VerifyError> {
    if record.files.is_empty() {
        return Err(VerifyError::Empty {
            prefix: record.prefix.clone(),
        });
    }
    let (store, root) = open_store(artifacts_url)?;
    for claim in &record.files {
        let location = locate(&root, &record.prefix, &claim.key)?;
        let meta = store.head(&location).await.map_err(|e| read_error(&claim.key, e))?;
        if meta.size != claim.bytes {
            return Err(VerifyError::Size {
                key: claim.key.clone(),
                actual: meta.size,
                expected: claim.bytes,
                claimed_by: RECORD_CLAIM,
            });
        }
    }
    Ok(())
}

impl VerifyError {
    /// The object is gone or has another size: no retry will make the checkpoint usable, unlike
    /// a store that could not be reached.
    pub fn is_definitive(&self) -> bool {
        !matches!(self, VerifyError::Read { .. } | VerifyError::Store { .. })
    }
}

/// Deletes a checkpoint's objects for garbage collection. Already-gone objects count as deleted
/// so an interrupted collection can simply be repeated.
pub async fn delete_checkpoint_objects(artifacts_url: &str, record: &CheckpointRecord) -> Result<(), VerifyError> {
    let (store, root) = open_store(artifacts_url)?;
    // Vet every key first: a corrupt record must not delete anything outside its checkpoint.
    let locations = record
        .files
        .iter()
        .map(|f| locate(&root, &record.prefix, &f.key))
        .collect::<Result<Vec<_>, _>>()?;
    for (file, location) in record.files.iter().zip(locations) {
        match store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(VerifyError::Delete {
                    key: file.key.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
    remove_local_dir(artifacts_url, &record.prefix);
    Ok(())
}

/// On a local store each checkpoint is a directory, which deleting its objects leaves behind
/// (object stores have no directories to delete). Removes it once empty. Something else in it
/// keeps it, and a failure only warns: the objects are gone, which is what collection is for.
fn remove_local_dir(artifacts_url: &str, prefix: &str) {
    let Ok(data::StoreUrl::Local(root)) = data::StoreUrl::parse(artifacts_url) else {
        return;
    };
    // The prefix comes from a record: plain names only, so nothing outside the store is touched.
    let parts: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    if parts.iter().any(|p| validate_id(p, "prefix segment").is_err()) {
        return;
    }
    let dir = parts.iter().fold(root, |dir, part| dir.join(part));
    match std::fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::DirectoryNotEmpty) => {}
        Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove a collected checkpoint's directory: {e}"),
    }
}

async fn verify_claims(
    artifacts_url: &str,
    prefix: &str,
    claims: &[CheckpointFileRecord],
    claimed_by: &'static str,
) -> Result<(), VerifyError> {
    if claims.is_empty() {
        return Err(VerifyError::Empty { prefix: prefix.into() });
    }
    let (store, root) = open_store(artifacts_url)?;
    let locations = claims
        .iter()
        .map(|c| locate(&root, prefix, &c.key))
        .collect::<Result<Vec<_>, _>>()?;
    for (claim, location) in claims.iter().zip(locations) {
        check_file(&store, location, claim, claimed_by).await?;
    }
    Ok(())
}

fn open_store(artifacts_url: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath), VerifyError> {
    data::store_from_url(artifacts_url).map_err(|e| VerifyError::Store {
        url: artifacts_url.into(),
        message: e.to_string(),
    })
}

/// Maps a key to its object, accepting only a single plain name directly under `prefix`: keys come
/// from workers, and `..` or nested paths would let one reach into other runs' objects.
fn locate(root: &ObjectPath, prefix: &str, key: &str) -> Result<ObjectPath, VerifyError> {
    let name = key
        .strip_prefix(prefix)
        // Without a trailing `/`, `…/3-1` would also admit `…/3-1x`, a sibling checkpoint.
        .filter(|_| prefix.ends_with('/'))
        .ok_or_else(|| VerifyError::NotUnderPrefix {
            key: key.into(),
            prefix: prefix.into(),
        })?;
    validate_id(name, "checkpoint file name").map_err(|reason| VerifyError::BadName {
        key: key.into(),
        reason,
    })?;
    Ok(ObjectPath::from(format!("{root}/{key}").trim_start_matches('/')))
}

/// Checks one object against what someone (the worker, or an earlier commit) claims it holds.
async fn check_file(
    store: &Arc<dyn ObjectStore>,
    location: ObjectPath,
    claim: &CheckpointFileRecord,
    claimed_by: &'static str,
) -> Result<(), VerifyError> {
    let size_error = |actual| VerifyError::Size {
        key: claim.key.clone(),
        actual,
        expected: claim.bytes,
        claimed_by,
    };
    // Sizes are metadata; a mismatch is decided without paying for a full read.
    let meta = store.head(&location).await.map_err(|e| read_error(&claim.key, e))?;
    if meta.size != claim.bytes {
        return Err(size_error(meta.size));
    }
    let (bytes, sha256) = hash_object(store, &location, &claim.key, claim.bytes).await?;
    // The object may have changed between `head` and the read.
    if bytes != claim.bytes {
        return Err(size_error(bytes));
    }
    if sha256 != claim.sha256 {
        return Err(VerifyError::Hash {
            key: claim.key.clone(),
            actual: sha256,
            expected: claim.sha256.clone(),
            claimed_by,
        });
    }
    Ok(())
}

async fn hash_object(
    store: &Arc<dyn ObjectStore>,
    location: &ObjectPath,
    key: &str,
    limit: u64,
) -> Result<(u64, String), VerifyError> {
    data::hash::sha256_of_object(store, location, limit)
        .await
        .map_err(|e| read_error(key, e))
}

fn read_error(key: &str, e: object_store::Error) -> VerifyError {
    match e {
        object_store::Error::NotFound { .. } => VerifyError::Missing { key: key.into() },
        e => VerifyError::Read {
            key: key.into(),
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    const PREFIX: &str = "runs/r/checkpoints/3-1/";

    /// Writes `data` at `PREFIX{name}` under the store root and returns the worker's truthful claim.
    fn put(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> pb::CheckpointFile {
        let key = format!("{PREFIX}{name}");
        let path = dir.path().join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        let (sha256, bytes) = (hex::encode(Sha256::digest(data)), data.len() as u64);
        pb::CheckpointFile { key, sha256, bytes }
    }

    fn url(dir: &tempfile::TempDir) -> String {
        dir.path().to_str().unwrap().to_string()
    }

    /// A committed record of two freshly written and verified files.
    async fn committed(dir: &tempfile::TempDir) -> CheckpointRecord {
        let files = [put(dir, "model.bin", b"weights"), put(dir, "optim.bin", b"moments!")];
        let files = verify_files(&url(dir), PREFIX, &files).await.unwrap();
        // Built through serde so record fields added later (with defaults) need no change here.
        let record = serde_json::json!({
            "run_id": "r", "step": 3, "prefix": PREFIX, "files": files, "is_final": false, "committed_unix_ms": 0,
        });
        serde_json::from_value(record).unwrap()
    }

    async fn rejection(dir: &tempfile::TempDir, files: &[pb::CheckpointFile]) -> VerifyError {
        verify_files(&url(dir), PREFIX, files).await.unwrap_err()
    }

    #[tokio::test]
    async fn good_checkpoint_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let files = [put(&dir, "model.bin", b"weights"), put(&dir, "optim.bin", b"moments!")];
        let records = verify_files(&url(&dir), PREFIX, &files).await.unwrap();
        assert_eq!(records.len(), 2);
        for (r, f) in records.iter().zip(&files) {
            assert_eq!((&r.key, &r.sha256, r.bytes), (&f.key, &f.sha256, f.bytes));
        }
        verify_committed(&url(&dir), &committed(&dir).await).await.unwrap();
    }

    #[tokio::test]
    async fn changed_content_fails_on_hash() {
        let dir = tempfile::tempdir().unwrap();
        let claim = put(&dir, "model.bin", b"weights");
        std::fs::write(dir.path().join(&claim.key), b"WEIGHTS").unwrap();
        let err = rejection(&dir, std::slice::from_ref(&claim)).await;
        assert!(matches!(err, VerifyError::Hash { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&claim.key) && msg.contains("SHA-256"), "{msg}");
    }

    #[tokio::test]
    async fn size_mismatch_names_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut claim = put(&dir, "model.bin", b"weights");
        claim.bytes = 12;
        let msg = rejection(&dir, std::slice::from_ref(&claim)).await.to_string();
        let names_all = msg.contains(&claim.key) && msg.contains(" 7 bytes") && msg.contains(" 12");
        assert!(names_all, "{msg}");
    }

    #[tokio::test]
    async fn keys_outside_prefix_rejected_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let good = put(&dir, "model.bin", b"weights");
        // None of these objects exist, so a read would have reported them missing instead.
        let outside = [
            "runs/other/checkpoints/3-1/model.bin",
            "runs/r/checkpoints/3-10/model.bin",
        ];
        let bad_names = ["../x", "a/b", ".hidden", ""].map(|name| format!("{PREFIX}{name}"));
        for key in outside.iter().map(|k| k.to_string()).chain(bad_names) {
            let bad = pb::CheckpointFile {
                key: key.clone(),
                ..good.clone()
            };
            let err = rejection(&dir, &[good.clone(), bad]).await;
            let misplaced = matches!(err, VerifyError::NotUnderPrefix { .. } | VerifyError::BadName { .. });
            assert!(misplaced && err.to_string().contains(&key), "{key}: {err:?}");
        }
    }

    #[tokio::test]
    async fn missing_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let claim = put(&dir, "model.bin", b"weights");
        std::fs::remove_file(dir.path().join(&claim.key)).unwrap();
        let err = rejection(&dir, std::slice::from_ref(&claim)).await;
        let named = matches!(err, VerifyError::Missing { .. }) && err.to_string().contains(&claim.key);
        assert!(named, "{err:?}");
        assert!(matches!(rejection(&dir, &[]).await, VerifyError::Empty { .. }));
    }

    #[tokio::test]
    async fn large_file_streams_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mut data: Vec<u8> = (0..20u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let claim = put(&dir, "model.bin", &data);
        let records = verify_files(&url(&dir), PREFIX, std::slice::from_ref(&claim)).await;
        assert_eq!(records.unwrap()[0].bytes, 20 << 20);
        // A flipped byte far past the first chunks must still be caught.
        data[15 << 20] ^= 1;
        std::fs::write(dir.path().join(&claim.key), &data).unwrap();
        let err = rejection(&dir, &[claim]).await;
        assert!(matches!(err, VerifyError::Hash { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn verify_committed_detects_deleted_file() {
        let dir = tempfile::tempdir().unwrap();
        let record = committed(&dir).await;
        let gone = record.files[1].key.clone();
        std::fs::remove_file(dir.path().join(&gone)).unwrap();
        let err = verify_committed(&url(&dir), &record).await.unwrap_err();
        let named = matches!(err, VerifyError::Missing { ref key } if *key == gone);
        assert!(named, "{err:?}");
    }

    #[tokio::test]
    async fn delete_removes_files_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = committed(&dir).await;
        let keep = dir.path().join("runs/r/checkpoints/4-1/model.bin");
        std::fs::create_dir_all(keep.parent().unwrap()).unwrap();
        std::fs::write(&keep, b"newer").unwrap();
        delete_checkpoint_objects(&url(&dir), &record).await.unwrap();
        assert!(record.files.iter().all(|f| !dir.path().join(&f.key).exists()));
        assert!(keep.exists());
        delete_checkpoint_objects(&url(&dir), &record).await.unwrap();

        record.files[0].key = "runs/r/checkpoints/4-1/model.bin".into();
        let err = delete_checkpoint_objects(&url(&dir), &record).await.unwrap_err();
        assert!(matches!(err, VerifyError::NotUnderPrefix { .. }), "{err:?}");
        assert!(keep.exists());
    }

    #[tokio::test]
    async fn delete_leaves_no_empty_checkpoint_directory_on_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let record = committed(&dir).await;
        let checkpoint = dir.path().join(PREFIX);
        let newer = dir.path().join("runs/r/checkpoints/4-1");
        std::fs::create_dir_all(&newer).unwrap();
        delete_checkpoint_objects(&url(&dir), &record).await.unwrap();
        assert!(!checkpoint.exists(), "{} is left behind", checkpoint.display());
        assert!(newer.exists(), "only the collected checkpoint's directory goes");
        // As a file:// URL too, and again once it is gone.
        let file_url = url::Url::from_directory_path(dir.path()).unwrap().to_string();
        delete_checkpoint_objects(&file_url, &record).await.unwrap();

        // A file no record names keeps its directory.
        let record = committed(&dir).await;
        std::fs::write(checkpoint.join("stray"), b"?").unwrap();
        delete_checkpoint_objects(&url(&dir), &record).await.unwrap();
        assert!(checkpoint.join("stray").exists());
        assert!(record.files.iter().all(|f| !dir.path().join(&f.key).exists()));
    }
}
