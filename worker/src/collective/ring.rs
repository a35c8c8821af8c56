//! The sending side and the algorithm: ring all-reduce as reduce-scatter then all-gather.
//!
//! With W ranks the buffer is cut into W contiguous segments. In reduce-scatter step s, rank r
//! sends segment (r - s) mod W to its right neighbour and adds segment (r - s - 1) mod W from its
//! left one; after W-1 steps rank r owns the full sum of segment (r + 1) mod W, accumulated in
//! ring order. All-gather then passes those owned segments around unchanged. Because each
//! segment is summed exactly once, in one order, and copied bit for bit, all ranks agree exactly.

use std::time::Duration;

use bytes::Bytes;
use protocol::pb;
use protocol::pb::collective_client::CollectiveClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{CollectiveError, CollectiveHub};
use crate::stop::StopSignal;

const F32_PER_CHUNK: usize = protocol::MAX_CHUNK_BYTES / 4;

/// Bits per limb of [`Ring::all_reduce_sum_u64`]: small enough that a limb summed over 4096
/// ranks stays an integer f32 represents exactly.
pub const U64_LIMB_BITS: u32 = 12;
/// Limbs per u64 (6 x 12 = 72 bits >= 64).
pub const U64_LIMBS: usize = 64usize.div_ceil(U64_LIMB_BITS as usize);

pub struct Ring {
    run_id: String,
    rank: u32,
    world: u32,
    op: u64,
    timeout: Duration,
    hub: CollectiveHub,
    abort: StopSignal,
    outbox: Option<mpsc::Sender<pb::CollectiveChunk>>,
    inbox: Option<mpsc::Receiver<pb::CollectiveChunk>>,
}

/// Element range of segment `i` when `n` elements are cut into `world` near-equal parts.
pub fn segment_bounds(n: usize, world: usize, i: usize) -> std::ops::Range<usize> {
    (i * n / world)..((i + 1) * n / world)
}

impl Ring {
    /// Joins the ring of `run_id`: opens the link to the right neighbour (retrying until
    /// `timeout`, since neighbours start at slightly different times) and claims this run's inbox.
    pub async fn connect(
        hub: &CollectiveHub,
        run_id: &str,
        rank: u32,
        peers: &[String],
        timeout: Duration,
    ) -> Result<Ring, CollectiveError> {
        let world = peers.len() as u32;
        if world == 0 || rank >= world {
            return Err(CollectiveError::BadTopology {
                rank,
                world,
                peers: peers.len(),
            });
        }
        let mut ring = Ring {
            run_id: run_id.to_string(),
            rank,
            world,
            op: 0,
            timeout,
            hub: hub.clone(),
            abort: StopSignal::default(),
            outbox: None,
            inbox: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        ring.inbox = Some(hub.take_receiver(run_id).ok_or_else(|| CollectiveError::LinkClosed {
            rank,
            message: format!("run {run_id} already has a ring on this worker"),
        })?);
        let right = (rank + 1) % world;
        let addr = &peers[right as usize];
        let endpoint = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        let connect_err = |message: String| CollectiveError::Connect {
            rank: right,
            addr: addr.clone(),
            message,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let client = loop {
            let attempt = async {
                tonic::transport::Endpoint::from_shared(endpoint.clone())?
                    .initial_stream_window_size(super::STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(super::STREAM_WINDOW_BYTES)
                    .connect()
                    .await
            };
            match attempt.await {
                Ok(channel) => break CollectiveClient::new(hub.token.channel(channel)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(connect_err(e.to_string())),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let mut client = client
            .max_decoding_message_size(2 * protocol::MAX_CHUNK_BYTES)
            .max_encoding_message_size(2 * protocol::MAX_CHUNK_BYTES);
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::CollectiveChunk {
            run_id: run_id.to_string(),
            from_rank: rank,
            hello: true,
            ..Default::default()
        })
        .await
        .map_err(|_| connect_err("link closed before hello".into()))?;
        let link_run = run_id.to_string();
        // Detached: it ends by itself when the outbox is dropped and its queue has drained.
        tokio::spawn(async move {
            if let Err(status) = client.link(ReceiverStream::new(rx)).await {
                tracing::warn!(run = %link_run, to_rank = right, "collective link ended: {status}");
            }
        });
        ring.outbox = Some(tx);
        Ok(ring)
    }

    /// Makes every later wait end early, with `CollectiveError::Aborted`, once `stop` is raised:
    /// a run the coordinator has already ended must not sit out a dead peer's deadline.
    pub fn abort_on(&mut self, stop: StopSignal) {
        self.abort = stop;
    }

    /// This worker's collective endpoint, where a held state is served from.
    pub fn hub(&self) -> &CollectiveHub {
        &self.hub
    }

    pub fn world_size(&self) -> u32 {
        self.world
    }

    /// Replaces `data` on every rank with the element-wise sum over all ranks.
    pub async fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let w = self.world as usize;
        if w == 1 {
            return Ok(());
        }
        self.op += 1;
        let n = data.len();
        let r = self.rank as usize;
        for s in 0..w - 1 {
            let send = segment_bounds(n, w, (r + w - s) % w);
            let recv = segment_bounds(n, w, (r + 2 * w - s - 1) % w);
            self.exchange(s as u32, data, send, recv, Combine::Add).await?;
        }
        for s in 0..w - 1 {
            let send = segment_bounds(n, w, (r + 1 + w - s) % w);
            let recv = segment_bounds(n, w, (r + w - s) % w);
            self.exchange((w - 1 + s) as u32, data, send, recv, Combine::Overwrite)
                .await?;
        }
        Ok(())
    }

    /// Sum, then divide by the world size: the data-parallel gradient average.
    pub async fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(data).await?;
        let scale = 1.0 / self.world as f32;
        data.iter_mut().for_each(|x| *x *= scale);
        Ok(())
    }

    /// Replaces `data` on every rank with the element-wise sum over all ranks, exactly (modulo
    /// 2^64, like wrapping integer addition): counts that an f32 reduce would round.
    ///
    /// Rides on the f32 reduce: each value travels as [`U64_LIMBS`] limbs of [`U64_LIMB_BITS`]
    /// bits, every limb below 2^12. Every partial sum of one limb over W ranks is then below
    /// W * 2^12, an integer f32 holds exactly while it is at most 2^24, so the reduce is exact
    /// for W <= 4096 (run specs allow 1024). The limb sums are recombined with their carries.
    ///
    /// # Panics
    /// If the ring has more than 4096 ranks.
    pub async fn all_reduce_sum_u64(&mut self, data: &mut [u64]) -> Result<(), CollectiveError> {
        assert!(
            (self.world as u64) << U64_LIMB_BITS <= 1 << f32::MANTISSA_DIGITS,
            "all_reduce_sum_u64 is exact only up to 4096 ranks"
        );
        if self.world == 1 {
            return Ok(());
        }
        let mask = (1u64 << U64_LIMB_BITS) - 1;
        let mut limbs: Vec<f32> = data
            .iter()
            .flat_map(|&v| (0..U64_LIMBS).map(move |k| ((v >> (k as u32 * U64_LIMB_BITS)) & mask) as f32))
            .collect();
        self.all_reduce_sum(&mut limbs).await?;
        for (v, sums) in data.iter_mut().zip(limbs.chunks_exact(U64_LIMBS)) {
            // Bits carried past bit 63 are dropped: the wrapping sum.
            *v = sums.iter().enumerate().fold(0u64, |acc, (k, &s)| {
                acc.wrapping_add((s as u64) << (k as u32 * U64_LIMB_BITS))
            });
        }
        Ok(())
    }

    /// Sends one segment right while receiving one from the left. Both directions run at once:
    /// every rank sends before it receives, so doing them in turn would deadlock on flow control.
    async fn exchange(
        &mut self,
        step: u32,
        data: &mut [f32],
        send: std::ops::Range<usize>,
        recv: std::ops::Range<usize>,
        combine: Combine,
    ) -> Result<(), CollectiveError> {
        let outgoing = self.encode(step, &data[send.clone()], send.start);
        let outbox = self.outbox.clone().expect("multi-rank ring has an outbox");
        let right = (self.rank + 1) % self.world;
        let timeout = self.timeout;
        let sending = async move {
            for chunk in outgoing {
                match tokio::time::timeout(timeout, outbox.send(chunk)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        return Err(CollectiveError::LinkClosed {
                            rank: right,
                            message: "stream ended".into(),
                        });
                    }
                    Err(_) => {
                        return Err(CollectiveError::LinkClosed {
                            rank: right,
                            message: format!("send blocked for {timeout:?}"),
                        });
                    }
                }
            }
            Ok(())
        };
        let abort = self.abort.clone();
        let receiving = self.receive(step, data, recv, combine);
        tokio::select! {
            (sent, received) = async { tokio::join!(sending, receiving) } => sent.and(received),
            reason = abort.wait() => Err(CollectiveError::Aborted { reason }),
        }
    }

    fn encode(&self, step: u32, values: &[f32], offset: usize) -> Vec<pb::CollectiveChunk> {
        values
            .chunks(F32_PER_CHUNK)
            .enumerate()
            .map(|(i, chunk)| {
                let mut bytes = Vec::with_capacity(chunk.len() * 4);
                chunk.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                pb::CollectiveChunk {
                    run_id: self.run_id.clone(),
                    from_rank: self.rank,
                    op: self.op,
                    ring_step: step,
                    offset: (offset + i * F32_PER_CHUNK) as u64,
                    data: Bytes::from(bytes),
                    hello: false,
                }
            })
            .collect()
    }

    async fn receive(
        &mut self,
        step: u32,
        data: &mut [f32],
        range: std::ops::Range<usize>,
        combine: Combine,
    ) -> Result<(), CollectiveError> {
        let left = (self.rank + self.world - 1) % self.world;
        let inbox = self.inbox.as_mut().expect("multi-rank ring has an inbox");
        let mut at = range.start;
        // A zero-length segment still arrives as nothing: nothing to wait for.
        while at < range.end {
            let chunk = match tokio::time::timeout(self.timeout, inbox.recv()).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    return Err(CollectiveError::LinkClosed {
                        rank: left,
                        message: "inbox closed".into(),
                    });
                }
                Err(_) => {
                    return Err(CollectiveError::Timeout {
                        op: self.op,
                        step,
                        from_rank: left,
                        timeout_ms: self.timeout.as_millis(),
                    });
                }
            };
            if chunk.hello {
                return Err(CollectiveError::LinkClosed {
                    rank: left,
                    message: "the neighbour closed its link".into(),
                });
            }
            if chunk.op != self.op || chunk.ring_step != step || chunk.offset != at as u64 {
                return Err(CollectiveError::Desync {
                    expected_op: self.op,
                    expected_step: step,
                    expected_offset: at as u64,
                    op: chunk.op,
                    step: chunk.ring_step,
                    offset: chunk.offset,
                });
            }
            let count = chunk.data.len() / 4;
            if chunk.data.len() % 4 != 0 || count == 0 || at + count > range.end {
                return Err(CollectiveError::BadChunk {
                    bytes: chunk.data.len(),
                });
            }
            let values = chunk
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match combine {
                Combine::Add => data[at..at + count].iter_mut().zip(values).for_each(|(x, v)| *x += v),
                Combine::Overwrite => data[at..at + count].iter_mut().zip(values).for_each(|(x, v)| *x = v),
            }
            at += count;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Combine {
    Add,
    Overwrite,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Dropping the outbox ends the link stream once its queued chunks are sent; aborting the
        // link instead would lose the last chunks the neighbour is still waiting for.
        self.outbox.take();
        if self.world > 1 {
            self.hub.release(&self.run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::serve_collective;
    use protocol::auth::SharedToken;

    /// Values on `rank` that an f32 reduce would round: above 2^40, some near u64::MAX / 4.
    fn values(rank: u64) -> Vec<u64> {
        vec![
            (1 << 40) + 12_345 * rank + 1,
            (1 << 62) - 1 - rank * 999_999_937,
            0,
            rank,
            0xfff_ffff_ffff * (rank + 1),
            u64::MAX / 4 - rank,
            4095,
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn u64_sums_are_exact_over_a_real_three_rank_ring() {
        let token = SharedToken::new("ring-u64-test-token-0123456789").unwrap();
        let world = 3u64;
        let mut hubs = vec![];
        let mut peers = vec![];
        for _ in 0..world {
            let (addr, hub) = serve_collective("127.0.0.1:0".parse().unwrap(), &token).await.unwrap();
            hubs.push(hub);
            peers.push(addr.to_string());
        }
        let mut tasks = vec![];
        for (rank, hub) in hubs.iter().enumerate() {
            let mut ring = Ring::connect(hub, "run-u64", rank as u32, &peers, Duration::from_secs(20))
                .await
                .unwrap();
            tasks.push(tokio::spawn(async move {
                let mut data = values(rank as u64);
                ring.all_reduce_sum_u64(&mut data).await.unwrap();
                data
            }));
        }
        let expected: Vec<u64> = (0..values(0).len())
            .map(|i| (0..world).map(|r| values(r)[i]).sum())
            .collect();
        assert!(expected[0] > 1 << 41 && (expected[0] as f32) as u64 != expected[0]);
        for task in tasks {
            assert_eq!(task.await.unwrap(), expected);
        }
    }
}
