//! Decoding while the download streams: the object's chunks go through a short queue to a
//! blocking thread that inflates and converts them as they arrive (as `hash.rs` does for
//! hashing), so a 300 MB CT costs one pass over the network and one over the CPU, overlapped,
//! and never sits in memory compressed and decompressed at once. When the decoder stops early (a
//! bad header, or all the data it needs), the download stops too.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use tokio::sync::mpsc;

use super::{NiftiImage, Voxel, read_image};
use crate::DataError;
use crate::geometry::Volume;

/// Chunks in flight between the download and the decoder.
const QUEUE: usize = 16;

/// Fetches and decodes the NIfTI object at `key`.
pub async fn fetch_volume<T: Voxel>(store: &dyn ObjectStore, key: &Path) -> Result<Volume<T>, DataError> {
    fetch_image(store, key).await.map(|image| image.volume)
}

/// As [`fetch_volume`], keeping the header.
pub async fn fetch_image<T: Voxel>(store: &dyn ObjectStore, key: &Path) -> Result<NiftiImage<T>, DataError> {
    let result = store.get(key).await.map_err(|e| DataError::store(key, e))?;
    let size = result.meta.size;
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let name = key.to_string();
    let decoder = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        read_image::<T>(reader, Some(size), &name)
    });
    let mut stream = result.into_stream();
    let mut store_error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break; // the decoder is done, with a volume or an error
                }
            }
            Err(e) => {
                store_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let decoded = decoder.await.map_err(|e| DataError::Corrupt {
        key: key.to_string(),
        reason: format!("decoder thread failed: {e}"),
    })?;
    // A failed download shows up to the decoder as a truncated file; report the real cause.
    match store_error {
        Some(e) => Err(DataError::store(key, e)),
        None => decoded,
    }
}

/// A blocking `Read` over the queue of downloaded chunks; the end of the queue is end of file.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}
