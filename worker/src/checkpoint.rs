//! Writes a checkpoint's files to the object store under the run's prefix and returns their
//! hashes, which the coordinator re-checks before it commits the checkpoint.

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use protocol::ids::checkpoint_prefix;
use protocol::pb;
use sha2::{Digest, Sha256};

pub async fn write_checkpoint(
    store: &dyn ObjectStore,
    root: &ObjectPath,
    run_id: &str,
    step: u64,
    files: Vec<(&str, Vec<u8>)>,
) -> object_store::Result<Vec<pb::CheckpointFile>> {
    let prefix = checkpoint_prefix(run_id, step);
    let mut written = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let key = format!("{prefix}{name}");
        let location = ObjectPath::from(format!("{root}/{key}").trim_start_matches('/'));
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        store.put(&location, bytes.into()).await?;
        written.push(pb::CheckpointFile {
            key,
            sha256,
            bytes: size,
        });
    }
    Ok(written)
}
