//! Gradient exchange between data-parallel ranks: a ring all-reduce over gRPC streams.
//!
//! Every rank runs a `Collective` gRPC server (`hub`, `route`) and holds one or more long-lived
//! `Link` streams to its right-hand neighbour (`ring`). The links carry plain gRPC, framed by
//! hand (`framing`) so that a chunk's values are copied once on the way out and added straight
//! from the received HTTP/2 frame on the way in. Chunks are bounded (`protocol::MAX_CHUNK_BYTES`), every
//! wait has a deadline, chunks of another ring generation are refused, and each element is
//! summed in one fixed order on one rank and then copied verbatim to the others, so every rank
//! ends with bit-identical results.

mod framing;
mod hub;
mod ring;
mod route;
mod transfer;

pub use hub::{CollectiveHub, HeldState, UNCLAIMED_INBOX_TTL, serve_collective, serve_loopback_ring};
pub use ring::{
    BLOCK_VALUES, BucketedReduce, DEFAULT_BUCKET_BYTES, DEFAULT_SEND_BUFFER_BYTES, Ring, RingOptions, WireFormat,
    bucket_bounds, segment_bounds, uniform_buckets,
};
pub use transfer::fetch_state;

use thiserror::Error;

/// HTTP/2 flow-control window of a ring link. The 64 KiB default allows one round trip per
/// 64 KiB, which held a 2-rank 64 MiB all-reduce on loopback to 0.12 GB/s; it must exceed the
/// chunks a rank keeps in flight (`RingOptions::chunks_in_flight` of up to 1 MiB).
const STREAM_WINDOW_BYTES: u32 = 16 << 20;

/// Largest HTTP/2 frame a hub accepts (the protocol's default is 16 KiB).
const MAX_FRAME_BYTES: u32 = 1 << 20;

impl CollectiveError {
    /// The neighbour whose link closed or could not be opened: most likely a dead process. A
    /// timeout names no one, since the silent rank may itself be waiting on another.
    pub fn lost_peer(&self) -> Option<u32> {
        match self {
            CollectiveError::Connect { rank, .. } | CollectiveError::LinkClosed { rank, .. } => Some(*rank),
            _ => None,
        }
    }

    /// The error means a peer is gone or unreachable, not that this run is broken.
    pub fn is_peer_loss(&self) -> bool {
        matches!(
            self,
            CollectiveError::Connect { .. } | CollectiveError::Timeout { .. } | CollectiveError::LinkClosed { .. }
        )
    }
}

#[derive(Debug, Error)]
pub enum CollectiveError {
    #[error("cannot reach rank {rank} at {addr}: {message}")]
    Connect { rank: u32, addr: String, message: String },
    #[error("collective op {op}: nothing from rank {from_rank} within {timeout_ms} ms")]
    Timeout { op: u64, from_rank: u32, timeout_ms: u128 },
    #[error("collective link to rank {rank} closed: {message}")]
    LinkClosed { rank: u32, message: String },
    #[error("collective op {op} out of step: {message}")]
    Desync { op: u64, message: String },
    #[error(
        "collective chunk or link from rank {from_rank} is of ring generation {got}, this ring is at generation {expected}"
    )]
    Generation { from_rank: u32, got: u64, expected: u64 },
    #[error("collective chunk of {bytes} bytes is not a whole number of f32 values or overruns its segment")]
    BadChunk { bytes: usize },
    #[error("collective aborted: {reason}")]
    Aborted { reason: String },
    #[error("rank {rank} is outside world size {world}, or the peer list has {peers} entries")]
    BadTopology { rank: u32, world: u32, peers: usize },
}
