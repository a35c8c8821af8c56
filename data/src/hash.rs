//! Streamed SHA-256 of an object. Hashing gigabytes is CPU work that would stall the executor's
//! gRPC tasks, so it runs on a blocking thread fed through a short queue.

use std::sync::Arc;

use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Chunks in flight between the download and the hashing thread.
const HASH_QUEUE: usize = 8;

/// Streams `location` through SHA-256 and returns the bytes seen and the hex digest. Reading stops
/// once more than `limit` bytes arrived, as the size alone then decides a caller's verdict.
pub async fn sha256_of_object(
    store: &Arc<dyn ObjectStore>,
    location: &Path,
    limit: u64,
) -> Result<(u64, String), object_store::Error> {
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(HASH_QUEUE);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut sha = Sha256::new();
        while let Some(chunk) = rx.blocking_recv() {
            sha.update(&chunk);
        }
        hex::encode(sha.finalize())
    });
    let mut stream = store.get(location).await?.into_stream();
    let mut seen = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit || tx.send(chunk).await.is_err() {
            break;
        }
    }
    drop(tx);
    let sha256 = hasher.await.map_err(|e| object_store::Error::Generic {
        store: "sha256",
        source: Box::new(e),
    })?;
    Ok((seen, sha256))
}
