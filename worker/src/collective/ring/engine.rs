//! One all-reduce, chunk by chunk. Every chunk is a piece of one ownership block (see
//! [`super::bucket`]) on one hop of its trip around the ring: hops 0..W-2 carry the growing
//! partial sum (reduce-scatter: the receiver adds its own values and passes the new sum on), the
//! receiver of hop W-2 owns the full sum, and hops W-1..2W-3 carry that sum unchanged
//! (all-gather: the receiver copies it in and forwards the very same bytes).
//!
//! A chunk is forwarded as soon as it has been combined, so every link is busy at once and the
//! pieces of a bucket pipeline around the ring; each rank sends 2(W-1)/W of the buffer. Nothing
//! depends on arrival order beyond causality (a range's all-gather cannot overtake its own
//! reduce-scatter), so buckets interleave, several streams may carry one link, and chunks of a
//! bucket the trainer has not handed over yet, or of the next operation, wait in a small stash.
//! A rank starts at most `chunks_in_flight` pieces of its own before the first of them comes
//! back summed, which bounds what is in flight on each link.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use protocol::pb;
use tokio::sync::mpsc;

use super::bucket::{BLOCK_VALUES, pieces, start_rank};
use super::link::Outbox;
use super::wire::{self, WireFormat};
use crate::collective::CollectiveError;
use crate::collective::framing::Framed;
use crate::stop::StopSignal;

/// Early chunks a rank keeps before it calls its neighbour out of step.
const MAX_STASHED_CHUNKS: usize = 4096;

pub(crate) struct Engine {
    pub(crate) run_id: String,
    pub(crate) rank: u32,
    pub(crate) world: u32,
    pub(crate) generation: u64,
    pub(crate) op: u64,
    pub(crate) timeout: Duration,
    pub(crate) chunks_in_flight: usize,
    pub(crate) outbox: Outbox,
    pub(crate) inbox: mpsc::Receiver<pb::CollectiveChunk>,
    pub(crate) stash: Vec<pb::CollectiveChunk>,
    pub(crate) abort: StopSignal,
    /// Streams the left neighbour opened to this rank.
    pub(crate) streams: usize,
    /// Of those, the ones whose end the hub has reported. The left neighbour is gone once all
    /// have ended; before that, chunks may still be on their way over the others.
    pub(crate) closed_streams: usize,
    /// An operation started and has not completed: dropped now, the ring leaves it half done.
    pub(crate) busy: bool,
    pub(crate) send_buffers: wire::SendBuffers,
}

enum Event<B> {
    Aborted(String),
    LinkFailed(String),
    Chunk(Option<pb::CollectiveChunk>),
    Bucket(Option<(u32, B)>),
    TimedOut,
}

enum Outgoing {
    /// This rank's own values of a piece, on hop 0.
    Encode { bucket: u32, piece: Range<usize> },
    /// An all-gather chunk passed on as received.
    Forward(pb::CollectiveChunk),
    /// A partial sum, added and encoded as its chunk came in.
    Ready(Framed),
}

struct Op<'a, B> {
    bounds: &'a [Range<usize>],
    slots: &'a mut [Option<B>],
    wire: WireFormat,
    pending: VecDeque<Outgoing>,
    own_pieces: VecDeque<(u32, Range<usize>)>,
    outstanding: usize,
    expected: usize,
    received: usize,
    /// The engine's, for the length of the operation.
    send_buffers: wire::SendBuffers,
}

impl Engine {
    fn left(&self) -> u32 {
        (self.rank + self.world - 1) % self.world
    }

    fn right(&self) -> u32 {
        (self.rank + 1) % self.world
    }

    /// Sums bucket `b` (`bounds[b]` of the flat buffer, held in `slots[b]`) over all ranks.
    /// Buckets missing from `slots` arrive through `arriving` while the reduce runs.
    pub(crate) async fn run<B: AsMut<[f32]>>(
        &mut self,
        bounds: &[Range<usize>],
        slots: &mut [Option<B>],
        mut arriving: Option<&mut mpsc::UnboundedReceiver<(u32, B)>>,
        wire: WireFormat,
    ) -> Result<(), CollectiveError> {
        self.op += 1;
        self.busy = true;
        let (rank, world) = (self.rank, self.world);
        let expected = bounds
            .iter()
            .flat_map(pieces)
            .map(|p| {
                let start = start_rank(p.start, world);
                usize::from(start != rank) + usize::from((start + world - 1) % world != rank)
            })
            .sum();
        let mut op = Op {
            bounds,
            slots,
            wire,
            pending: VecDeque::new(),
            own_pieces: VecDeque::new(),
            outstanding: 0,
            expected,
            received: 0,
            send_buffers: std::mem::take(&mut self.send_buffers),
        };
        let mut arrived = 0;
        for b in 0..bounds.len() {
            if op.slots[b].is_some() {
                arrived += 1;
                self.bucket_ready(&mut op, b as u32)?;
            }
        }
        loop {
            while op.outstanding < self.chunks_in_flight.max(1) {
                let Some((bucket, piece)) = op.own_pieces.pop_front() else {
                    break;
                };
                op.pending.push_back(Outgoing::Encode { bucket, piece });
                op.outstanding += 1;
            }
            if op.received == op.expected && op.pending.is_empty() && arrived == bounds.len() {
                self.busy = false;
                self.send_buffers = op.send_buffers;
                return Ok(());
            }
            let event = tokio::select! {
                biased;
                reason = self.abort.wait() => Event::Aborted(reason),
                message = self.outbox.failed.wait() => Event::LinkFailed(message),
                permit = self.outbox.chunks.reserve(), if !op.pending.is_empty() => match permit {
                    Ok(permit) => {
                        let next = op.pending.pop_front().expect("checked non-empty");
                        permit.send(self.materialise(&mut op, next));
                        continue;
                    }
                    Err(_) => Event::LinkFailed("stream ended".into()),
                },
                chunk = self.inbox.recv(), if op.received < op.expected => Event::Chunk(chunk),
                bucket = next_bucket(&mut arriving), if arrived < bounds.len() => Event::Bucket(bucket),
                _ = tokio::time::sleep(self.timeout) => Event::TimedOut,
            };
            match event {
                Event::Aborted(reason) => return Err(CollectiveError::Aborted { reason }),
                Event::LinkFailed(message) => {
                    return Err(CollectiveError::LinkClosed {
                        rank: self.right(),
                        message,
                    });
                }
                Event::Chunk(Some(chunk)) => self.accept(&mut op, chunk)?,
                Event::Chunk(None) => {
                    return Err(CollectiveError::LinkClosed {
                        rank: self.left(),
                        message: "inbox closed".into(),
                    });
                }
                Event::Bucket(None) => {
                    return Err(CollectiveError::Aborted {
                        reason: "the local step stopped handing over buckets".into(),
                    });
                }
                Event::Bucket(Some((b, mut values))) => {
                    let fits = bounds.get(b as usize).is_some_and(|r| r.len() == values.as_mut().len());
                    if !fits || op.slots[b as usize].is_some() {
                        return Err(CollectiveError::Desync {
                            op: self.op,
                            message: format!("bucket {b} handed over twice or with the wrong length"),
                        });
                    }
                    op.slots[b as usize] = Some(values);
                    arrived += 1;
                    self.bucket_ready(&mut op, b)?;
                }
                Event::TimedOut if op.received < op.expected => {
                    return Err(CollectiveError::Timeout {
                        op: self.op,
                        from_rank: self.left(),
                        timeout_ms: self.timeout.as_millis(),
                    });
                }
                Event::TimedOut => {
                    return Err(CollectiveError::LinkClosed {
                        rank: self.right(),
                        message: format!("send blocked for {:?}", self.timeout),
                    });
                }
            }
        }
    }

    /// Queues this rank's own pieces of bucket `b` and takes in the chunks that came early.
    fn bucket_ready<B: AsMut<[f32]>>(&mut self, op: &mut Op<B>, b: u32) -> Result<(), CollectiveError> {
        for piece in pieces(&op.bounds[b as usize]) {
            if start_rank(piece.start, self.world) == self.rank {
                op.own_pieces.push_back((b, piece));
            }
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stash)
            .into_iter()
            .partition(|c| c.op == self.op && c.bucket == b);
        self.stash = later;
        now.into_iter().try_for_each(|chunk| self.apply(op, chunk))
    }

    fn accept<B: AsMut<[f32]>>(&mut self, op: &mut Op<B>, chunk: pb::CollectiveChunk) -> Result<(), CollectiveError> {
        if chunk.hello {
            self.closed_streams += 1;
            if self.closed_streams >= self.streams {
                return Err(CollectiveError::LinkClosed {
                    rank: self.left(),
                    message: "the neighbour closed its link".into(),
                });
            }
            return Ok(());
        }
        if chunk.generation != self.generation {
            return Err(CollectiveError::Generation {
                from_rank: chunk.from_rank,
                got: chunk.generation,
                expected: self.generation,
            });
        }
        let waiting = op.slots.get(chunk.bucket as usize).is_some_and(Option::is_none);
        if chunk.op > self.op || (chunk.op == self.op && waiting) {
            if self.stash.len() >= MAX_STASHED_CHUNKS {
                return Err(CollectiveError::Desync {
                    op: self.op,
                    message: format!(
                        "rank {} ran more than {MAX_STASHED_CHUNKS} chunks ahead",
                        chunk.from_rank
                    ),
                });
            }
            self.stash.push(chunk);
            return Ok(());
        }
        self.apply(op, chunk)
    }

    fn apply<B: AsMut<[f32]>>(
        &mut self,
        op: &mut Op<B>,
        mut chunk: pb::CollectiveChunk,
    ) -> Result<(), CollectiveError> {
        let (world, rank) = (self.world, self.rank);
        let out_of_step = |message: String| CollectiveError::Desync { op: self.op, message };
        if chunk.op != self.op {
            return Err(out_of_step(format!(
                "a chunk of op {} from rank {}",
                chunk.op, chunk.from_rank
            )));
        }
        let b = chunk.bucket as usize;
        let bucket = op
            .bounds
            .get(b)
            .ok_or_else(|| out_of_step(format!("bucket {b} of {}", op.bounds.len())))?;
        let offset = chunk.offset as usize;
        let piece_start = bucket.start.max(offset / BLOCK_VALUES * BLOCK_VALUES);
        if !bucket.contains(&offset) || offset != piece_start {
            return Err(out_of_step(format!(
                "offset {offset} is no chunk of bucket {b} ({bucket:?})"
            )));
        }
        let piece_end = ((offset / BLOCK_VALUES + 1) * BLOCK_VALUES).min(bucket.end);
        if op.wire.values_in(chunk.data.len()) != Some(piece_end - offset) {
            return Err(CollectiveError::BadChunk {
                bytes: chunk.data.len(),
            });
        }
        let start = start_rank(offset, world);
        let hop = chunk.ring_step;
        if hop >= 2 * (world - 1) || (start + hop + 1) % world != rank {
            return Err(out_of_step(format!(
                "hop {hop} of the block starting at rank {start} does not end at rank {rank}"
            )));
        }
        let values = op.slots[b]
            .as_mut()
            .expect("accept stashes chunks of missing buckets")
            .as_mut();
        let local = &mut values[offset - bucket.start..piece_end - bucket.start];
        let piece = offset..piece_end;
        if hop < world - 1 {
            // Past hop W-2 this rank owns the sum: it keeps what the others will decode.
            let owner = hop == world - 2;
            let mut buf = op.send_buffers.take();
            wire::add_encode(local, &chunk.data, op.wire, &mut buf, owner);
            let header = self.header(b as u32, piece.start, hop + 1);
            op.pending
                .push_back(Outgoing::Ready(Framed::new(&header, op.send_buffers.lend(buf))));
        } else {
            wire::copy_into(local, &chunk.data, op.wire);
            if hop == world - 1 {
                // The first all-gather hop ends where the block's partial sum started.
                op.outstanding = op.outstanding.saturating_sub(1);
            }
            if hop < 2 * world - 3 {
                chunk.ring_step += 1;
                chunk.from_rank = rank;
                op.pending.push_back(Outgoing::Forward(chunk));
            }
        }
        op.received += 1;
        Ok(())
    }

    fn materialise<B: AsMut<[f32]>>(&self, op: &mut Op<B>, next: Outgoing) -> Framed {
        match next {
            Outgoing::Ready(framed) => framed,
            // The received payload goes out again as it is: no copy.
            Outgoing::Forward(chunk) => Framed::new(&chunk, chunk.data.clone()),
            Outgoing::Encode { bucket, piece } => {
                let start = op.bounds[bucket as usize].start;
                let values = op.slots[bucket as usize]
                    .as_mut()
                    .expect("encoded buckets are present")
                    .as_mut();
                let mut buf = op.send_buffers.take();
                wire::encode_into(&values[piece.start - start..piece.end - start], op.wire, &mut buf);
                Framed::new(&self.header(bucket, piece.start, 0), op.send_buffers.lend(buf))
            }
        }
    }

    /// The fields of this rank's chunk of `bucket` at element `offset`, on hop `hop`.
    fn header(&self, bucket: u32, offset: usize, hop: u32) -> pb::CollectiveChunk {
        pb::CollectiveChunk {
            run_id: self.run_id.clone(),
            from_rank: self.rank,
            op: self.op,
            ring_step: hop,
            offset: offset as u64,
            data: Bytes::new(),
            hello: false,
            generation: self.generation,
            bucket,
        }
    }
}

async fn next_bucket<B>(arriving: &mut Option<&mut mpsc::UnboundedReceiver<(u32, B)>>) -> Option<(u32, B)> {
    match arriving {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
