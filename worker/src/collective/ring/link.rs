//! The sending side of a ring link: one or more HTTP/2 connections to the right-hand neighbour,
//! all fed from one bounded outbox. Each connection's stream takes the next chunk when HTTP/2 is
//! ready for it, so a slow connection never holds chunks another could send. Several streams
//! matter across nodes, where one HTTP/2 connection caps well below the link.

use std::sync::Arc;
use std::time::Duration;

use protocol::pb;
use protocol::pb::collective_client::CollectiveClient;
use tokio::sync::{Mutex, mpsc};

use super::super::{CollectiveError, CollectiveHub};
use crate::stop::StopSignal;

/// The outbox of a link and the signal its streams raise when one of them fails.
pub(crate) struct Outbox {
    pub(crate) chunks: mpsc::Sender<pb::CollectiveChunk>,
    pub(crate) failed: StopSignal,
}

/// Opens `streams` connections to `addr` (rank `right`), retrying each until `timeout` since
/// neighbours start at slightly different times, and greets each with `hello`.
pub(crate) async fn open(
    hub: &CollectiveHub,
    addr: &str,
    right: u32,
    streams: usize,
    outbox_chunks: usize,
    timeout: Duration,
    hello: pb::CollectiveChunk,
) -> Result<Outbox, CollectiveError> {
    let endpoint = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let connect_err = |message: String| CollectiveError::Connect {
        rank: right,
        addr: addr.to_string(),
        message,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut clients = vec![];
    for _ in 0..streams.max(1) {
        // Each `connect` is its own TCP connection, so the streams do not share one HTTP/2
        // connection's flow control.
        let client = loop {
            let attempt = async {
                tonic::transport::Endpoint::from_shared(endpoint.clone())?
                    .initial_stream_window_size(super::super::STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(super::super::STREAM_WINDOW_BYTES)
                    .tcp_nodelay(true)
                    .connect()
                    .await
            };
            match attempt.await {
                Ok(channel) => break CollectiveClient::new(hub.token.channel(channel)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(connect_err(e.to_string())),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        clients.push(
            client
                .max_decoding_message_size(2 * protocol::MAX_CHUNK_BYTES)
                .max_encoding_message_size(2 * protocol::MAX_CHUNK_BYTES),
        );
    }
    let (tx, rx) = mpsc::channel(outbox_chunks.max(1));
    let shared = Arc::new(Mutex::new(rx));
    let failed = StopSignal::default();
    for mut client in clients {
        let (shared, failed, hello) = (shared.clone(), failed.clone(), hello.clone());
        let chunks = futures::stream::unfold(shared, |rx| async move {
            let chunk = rx.lock().await.recv().await?;
            Some((chunk, rx))
        });
        let run = hello.run_id.clone();
        let stream = futures::StreamExt::chain(futures::stream::iter([hello]), chunks);
        // Detached: it ends by itself when the outbox is dropped and its queue has drained.
        tokio::spawn(async move {
            if let Err(status) = client.link(stream).await {
                tracing::warn!(%run, to_rank = right, "collective link ended: {status}");
                failed.raise(&format!("{}: {}", status.code(), status.message()));
            }
        });
    }
    Ok(Outbox { chunks: tx, failed })
}
