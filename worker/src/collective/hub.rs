//! The receiving side of the ring: a `Collective` gRPC service that routes each incoming link's
//! chunks to the inbox of the run it belongs to. Whichever arrives first, the neighbour's link or
//! the local `Ring`, creates the inbox, so start-up order between ranks does not matter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::auth::SharedToken;
use protocol::pb;
use protocol::pb::collective_server::{Collective, CollectiveServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::CollectiveError;
use super::framing::MAX_MESSAGE_BYTES;
use super::route::LinkRoute;

/// Chunks buffered per inbox; with 1 MiB chunks this bounds memory per run to 64 MiB.
const INBOX_CHUNKS: usize = 64;

/// How long an inbox that an incoming link created waits for its local ring by default: past
/// it, the ring never formed here (the run went elsewhere) and the buffered chunks are dropped.
pub const UNCLAIMED_INBOX_TTL: Duration = Duration::from_secs(180);

/// A run's inbox at one generation. `receiver` is `None` once a local `Ring` has claimed it.
struct Inbox {
    generation: u64,
    serial: u64,
    sender: mpsc::Sender<pb::CollectiveChunk>,
    receiver: Option<mpsc::Receiver<pb::CollectiveChunk>>,
    /// Set when the inbox goes away with its ring mid-operation (or never formed): incoming
    /// links then end with an error, so the sender fails now rather than at its deadline. A
    /// ring that finished cleanly ends them cleanly.
    abandoned: Arc<AtomicBool>,
}

impl Inbox {
    fn new(generation: u64, serial: u64) -> Self {
        let (sender, receiver) = mpsc::channel(INBOX_CHUNKS);
        Inbox {
            generation,
            serial,
            sender,
            receiver: Some(receiver),
            abandoned: Arc::default(),
        }
    }
}

#[derive(Default)]
struct Inboxes {
    by_run: HashMap<String, Inbox>,
    next_serial: u64,
}

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

#[derive(Clone)]
pub struct CollectiveHub {
    inboxes: Arc<Mutex<Inboxes>>,
    /// See [`UNCLAIMED_INBOX_TTL`].
    unclaimed_ttl: Arc<Mutex<Duration>>,
    held: Arc<Mutex<Option<HeldState>>>,
    /// Required of incoming links and attached to the ones this worker opens.
    pub(crate) token: SharedToken,
}

impl CollectiveHub {
    /// The inbox an incoming link of `run_id` at `generation` delivers to. A newer generation
    /// replaces an older inbox (that ring is being re-formed); an older one is refused.
    fn sender(
        &self,
        run_id: &str,
        generation: u64,
    ) -> Result<(mpsc::Sender<pb::CollectiveChunk>, Arc<AtomicBool>), Status> {
        let mut inboxes = self.inboxes.lock().expect("hub lock");
        if let Some(inbox) = inboxes.by_run.get(run_id) {
            if inbox.generation > generation {
                return Err(Status::failed_precondition(format!(
                    "collective link of run {run_id} is from generation {generation}, but this worker's ring is at generation {}",
                    inbox.generation
                )));
            }
            if inbox.generation == generation {
                return Ok((inbox.sender.clone(), inbox.abandoned.clone()));
            }
        }
        inboxes.next_serial += 1;
        let serial = inboxes.next_serial;
        let inbox = Inbox::new(generation, serial);
        let link_end = (inbox.sender.clone(), inbox.abandoned.clone());
        inboxes.by_run.insert(run_id.to_string(), inbox);
        drop(inboxes);
        self.expire_unclaimed(run_id, serial);
        Ok(link_end)
    }

    /// Drops the inbox (and what it buffered) if no local ring has claimed it within the TTL.
    fn expire_unclaimed(&self, run_id: &str, serial: u64) {
        let (inboxes, ttl) = (self.inboxes.clone(), *self.unclaimed_ttl.lock().expect("hub lock"));
        let run_id = run_id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let mut inboxes = inboxes.lock().expect("hub lock");
            if inboxes
                .by_run
                .get(&run_id)
                .is_some_and(|i| i.serial == serial && i.receiver.is_some())
            {
                if let Some(inbox) = inboxes.by_run.remove(&run_id) {
                    inbox.abandoned.store(true, Ordering::SeqCst);
                }
                tracing::warn!(run = %run_id, "dropped a collective inbox whose ring never formed here within {ttl:?}");
            }
        });
    }

    /// Sets how long an inbox created by an incoming link waits for its local ring.
    pub fn set_unclaimed_ttl(&self, ttl: Duration) {
        *self.unclaimed_ttl.lock().expect("hub lock") = ttl;
    }

    /// Whether an inbox for `run_id` exists, claimed or not.
    pub fn has_inbox(&self, run_id: &str) -> bool {
        self.inboxes.lock().expect("hub lock").by_run.contains_key(run_id)
    }

    /// Claims the inbox of `run_id` at `generation` for the local ring of `rank`.
    pub(crate) fn take_receiver(
        &self,
        run_id: &str,
        generation: u64,
        rank: u32,
    ) -> Result<mpsc::Receiver<pb::CollectiveChunk>, CollectiveError> {
        let mut inboxes = self.inboxes.lock().expect("hub lock");
        let serial = inboxes.next_serial + 1;
        let inbox = match inboxes.by_run.get_mut(run_id) {
            Some(inbox) if inbox.generation > generation => {
                return Err(CollectiveError::Generation {
                    from_rank: rank,
                    got: generation,
                    expected: inbox.generation,
                });
            }
            Some(inbox) if inbox.generation == generation => inbox,
            _ => {
                inboxes.next_serial = serial;
                inboxes
                    .by_run
                    .insert(run_id.to_string(), Inbox::new(generation, serial));
                inboxes.by_run.get_mut(run_id).expect("just inserted")
            }
        };
        inbox.receiver.take().ok_or_else(|| CollectiveError::LinkClosed {
            rank,
            message: format!("run {run_id} already has a ring on this worker"),
        })
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

    /// Forgets a run's inbox once its ring is done, so a later link for it starts clean; an
    /// inbox of another generation (a re-formed ring's) stays. `abandoned`: the ring stopped
    /// mid-operation, which its left neighbour must learn at once.
    pub(crate) fn release(&self, run_id: &str, generation: u64, abandoned: bool) {
        let mut inboxes = self.inboxes.lock().expect("hub lock");
        if inboxes.by_run.get(run_id).is_some_and(|i| i.generation == generation) {
            let inbox = inboxes.by_run.remove(run_id).expect("checked present");
            inbox.abandoned.store(abandoned, Ordering::SeqCst);
        }
    }
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
        // The ring's own links arrive through `route` instead; this serves generated clients
        // that reach the service some other way.
        self.receive_link(req.into_inner()).await.map(Response::new)
    }
}

impl CollectiveHub {
    /// Routes one incoming link's chunks to the inbox of the run its hello names, until the
    /// link ends or the inbox goes away.
    pub(super) async fn receive_link<S>(&self, mut stream: S) -> Result<pb::LinkClosed, Status>
    where
        S: futures::Stream<Item = Result<pb::CollectiveChunk, Status>> + Unpin,
    {
        use futures::StreamExt;
        let hello = stream
            .next()
            .await
            .transpose()?
            .filter(|c| c.hello)
            .ok_or_else(|| Status::invalid_argument("a collective link must open with a hello chunk"))?;
        protocol::ids::validate_id(&hello.run_id, "run id").map_err(Status::invalid_argument)?;
        let (inbox, abandoned) = self.sender(&hello.run_id, hello.generation)?;
        let outcome = loop {
            let next = tokio::select! {
                next = stream.next() => next.transpose(),
                // The inbox was dropped (its ring never formed here, or a newer generation took
                // the run over): stop reading, so the sender learns now.
                () = inbox.closed() => {
                    if abandoned.load(Ordering::SeqCst) {
                        break Err(Status::unavailable(format!("the ring of run {} here stopped mid-operation or never formed", hello.run_id)));
                    }
                    break Ok(());
                }
            };
            match next {
                Ok(Some(chunk)) if chunk.run_id != hello.run_id => {
                    break Err(Status::invalid_argument("a collective link carries one run only"));
                }
                Ok(Some(chunk)) if chunk.generation != hello.generation => {
                    break Err(Status::failed_precondition(format!(
                        "collective link of run {} opened at generation {} carried a chunk of generation {}",
                        hello.run_id, hello.generation, chunk.generation
                    )));
                }
                Ok(Some(chunk)) => {
                    if inbox.send(chunk).await.is_err() {
                        if abandoned.load(Ordering::SeqCst) {
                            break Err(Status::unavailable(format!(
                                "the ring of run {} here stopped mid-operation or never formed",
                                hello.run_id
                            )));
                        }
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
            generation: hello.generation,
            ..Default::default()
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), inbox.send(closed)).await;
        outcome.map(|()| pb::LinkClosed {})
    }
}

/// Binds the collective service; returns the bound address and the hub rings attach to. Peers
/// must present `token`, and this worker's own links carry it.
pub async fn serve_collective(listen: SocketAddr, token: &SharedToken) -> std::io::Result<(SocketAddr, CollectiveHub)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let hub = CollectiveHub {
        inboxes: Default::default(),
        unclaimed_ttl: Arc::new(Mutex::new(UNCLAIMED_INBOX_TTL)),
        held: Default::default(),
        token: token.clone(),
    };
    let generated = CollectiveServer::new(hub.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let route = LinkRoute {
        hub: hub.clone(),
        generated,
    };
    let service = InterceptedService::new(route, token.require());
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .initial_stream_window_size(super::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(super::STREAM_WINDOW_BYTES)
            // Links send 1 MiB chunks client to server: 16 KiB frames would cut each into 64.
            .max_frame_size(Some(super::MAX_FRAME_BYTES))
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await;
        if let Err(e) = served {
            tracing::error!("collective server stopped: {e}");
        }
    });
    Ok((addr, hub))
}

/// Binds `world` collective endpoints on 127.0.0.1: a whole ring inside one process, for tests
/// and in-process measurements. Returns the hubs and the peer list, both indexed by rank.
pub async fn serve_loopback_ring(
    world: usize,
    token: &SharedToken,
) -> std::io::Result<(Vec<CollectiveHub>, Vec<String>)> {
    let (mut hubs, mut peers) = (Vec::with_capacity(world), Vec::with_capacity(world));
    for _ in 0..world {
        let (addr, hub) = serve_collective(SocketAddr::from(([127, 0, 0, 1], 0)), token).await?;
        hubs.push(hub);
        peers.push(addr.to_string());
    }
    Ok((hubs, peers))
}
