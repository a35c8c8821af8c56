//! The receiving side of the ring: a `Collective` gRPC service that routes each incoming link's
//! chunks to the inbox of the run it belongs to. Whichever arrives first, the neighbour's link or
//! the local `Ring`, creates the inbox, so start-up order between ranks does not matter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use protocol::auth::SharedToken;
use protocol::pb;
use protocol::pb::collective_server::{Collective, CollectiveServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// Chunks buffered per inbox; with 1 MiB chunks this bounds memory per run to 64 MiB.
const INBOX_CHUNKS: usize = 64;

type Inbox = (
    mpsc::Sender<pb::CollectiveChunk>,
    Option<mpsc::Receiver<pb::CollectiveChunk>>,
);

/// The training state a rank kept when it lost a peer mid-step, served to the re-formed ring
/// (live recovery). Parts are named as a checkpoint's are.
#[derive(Clone)]
pub struct HeldState {
    pub run_id: String,
    pub attempt: u32,
    pub step: u64,
    pub parts: Arc<Vec<(String, Vec<u8>)>>,
    /// SHA-256 of each part, computed once when the state is kept, not per fetch.
    sha256: Arc<Vec<String>>,
}

impl HeldState {
    pub fn new(run_id: String, attempt: u32, step: u64, parts: Vec<(String, Vec<u8>)>) -> Self {
        use sha2::Digest;
        let sha256 = parts
            .iter()
            .map(|(_, bytes)| hex::encode(sha2::Sha256::digest(bytes)))
            .collect();
        HeldState {
            run_id,
            attempt,
            step,
            parts: Arc::new(parts),
            sha256: Arc::new(sha256),
        }
    }

    /// The parts as `StatePart` chunks of at most `MAX_CHUNK_BYTES`, made one at a time as the
    /// stream is read, so serving a large state never copies it whole. The last chunk of each
    /// part carries the part's hash.
    fn chunks(&self) -> impl Iterator<Item = pb::StatePart> + Send + 'static {
        let (parts, sha256) = (self.parts.clone(), self.sha256.clone());
        (0..parts.len()).flat_map(move |p| {
            let (parts, sha256) = (parts.clone(), sha256.clone());
            let count = parts[p].1.len().div_ceil(protocol::MAX_CHUNK_BYTES).max(1);
            (0..count).map(move |c| {
                let (name, bytes) = &parts[p];
                let start = c * protocol::MAX_CHUNK_BYTES;
                let end = (start + protocol::MAX_CHUNK_BYTES).min(bytes.len());
                pb::StatePart {
                    name: name.clone(),
                    data: bytes[start..end].to_vec(),
                    sha256: if c + 1 == count {
                        sha256[p].clone()
                    } else {
                        String::new()
                    },
                }
            })
        })
    }
}

#[derive(Clone, Default)]
pub struct CollectiveHub {
    inboxes: Arc<Mutex<HashMap<String, Inbox>>>,
    held: Arc<Mutex<Option<HeldState>>>,
    /// Required of incoming links and attached to the ones this worker opens.
    pub(crate) token: SharedToken,
}

impl CollectiveHub {
    fn sender(&self, run_id: &str) -> mpsc::Sender<pb::CollectiveChunk> {
        let mut inboxes = self.inboxes.lock().expect("hub lock");
        inboxes.entry(run_id.to_string()).or_insert_with(new_inbox).0.clone()
    }

    /// Takes the inbox of `run_id`; `None` if a `Ring` for this run already holds it.
    pub(crate) fn take_receiver(&self, run_id: &str) -> Option<mpsc::Receiver<pb::CollectiveChunk>> {
        let mut inboxes = self.inboxes.lock().expect("hub lock");
        inboxes.entry(run_id.to_string()).or_insert_with(new_inbox).1.take()
    }

    /// Keeps `state` for the ranks of the re-formed ring to fetch; replaces any older one.
    pub fn hold_state(&self, state: HeldState) {
        *self.held.lock().expect("hub lock") = Some(state);
    }

    /// The held state, if it is the one named.
    pub fn held_state(&self, run_id: &str, attempt: u32, step: u64) -> Option<HeldState> {
        let held = self.held.lock().expect("hub lock");
        held.as_ref()
            .filter(|h| h.run_id == run_id && h.attempt == attempt && h.step == step)
            .cloned()
    }

    /// Drops a held state once this worker moves on to another run.
    pub fn release_state_unless(&self, run_id: &str) {
        let mut held = self.held.lock().expect("hub lock");
        if held.as_ref().is_some_and(|h| h.run_id != run_id) {
            *held = None;
        }
    }

    /// Forgets a run's inbox once its ring is done, so a later link for it starts clean.
    pub(crate) fn release(&self, run_id: &str) {
        self.inboxes.lock().expect("hub lock").remove(run_id);
    }
}

fn new_inbox() -> Inbox {
    let (tx, rx) = mpsc::channel(INBOX_CHUNKS);
    (tx, Some(rx))
}

type PartStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::StatePart, Status>> + Send>>;

#[tonic::async_trait]
impl Collective for CollectiveHub {
    type FetchStateStream = PartStream;

    async fn fetch_state(&self, req: Request<pb::FetchStateRequest>) -> Result<Response<PartStream>, Status> {
        let req = req.into_inner();
        let held = self.held_state(&req.run_id, req.attempt, req.step).ok_or_else(|| {
            Status::not_found(format!(
                "this worker holds no state of run {} attempt {} at step {}",
                req.run_id, req.attempt, req.step
            ))
        })?;
        Ok(Response::new(Box::pin(futures::stream::iter(held.chunks().map(Ok)))))
    }

    async fn link(&self, req: Request<Streaming<pb::CollectiveChunk>>) -> Result<Response<pb::LinkClosed>, Status> {
        let mut stream = req.into_inner();
        let hello = stream
            .message()
            .await?
            .filter(|c| c.hello)
            .ok_or_else(|| Status::invalid_argument("a collective link must open with a hello chunk"))?;
        protocol::ids::validate_id(&hello.run_id, "run id").map_err(Status::invalid_argument)?;
        let inbox = self.sender(&hello.run_id);
        let outcome = loop {
            match stream.message().await {
                Ok(Some(chunk)) if chunk.run_id != hello.run_id => {
                    break Err(Status::invalid_argument("a collective link carries one run only"));
                }
                Ok(Some(chunk)) => {
                    if inbox.send(chunk).await.is_err() {
                        break Ok(()); // the local ring is gone (run ended); drop the rest
                    }
                }
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            }
        };
        // Tell the local ring its left neighbour is gone, so a receive in progress fails now
        // instead of at its deadline. After a clean end of run nobody is listening any more.
        let closed = pb::CollectiveChunk {
            run_id: hello.run_id,
            from_rank: hello.from_rank,
            hello: true,
            ..Default::default()
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), inbox.send(closed)).await;
        outcome.map(|()| Response::new(pb::LinkClosed {}))
    }
}

/// Binds the collective service; returns the bound address and the hub rings attach to. Peers
/// must present `token`, and this worker's own links carry it.
pub async fn serve_collective(listen: SocketAddr, token: &SharedToken) -> std::io::Result<(SocketAddr, CollectiveHub)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let hub = CollectiveHub {
        inboxes: Default::default(),
        held: Default::default(),
        token: token.clone(),
    };
    let server = CollectiveServer::new(hub.clone())
        .max_decoding_message_size(2 * protocol::MAX_CHUNK_BYTES)
        .max_encoding_message_size(2 * protocol::MAX_CHUNK_BYTES);
    let service = InterceptedService::new(server, token.require());
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .initial_stream_window_size(super::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(super::STREAM_WINDOW_BYTES)
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await;
        if let Err(e) = served {
            tracing::error!("collective server stopped: {e}");
        }
    });
    Ok((addr, hub))
}
