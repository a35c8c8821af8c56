//! The ring all-reduce: bucketed, pipelined and deterministic, over one or more HTTP/2 streams
//! per neighbour.
//!
//! A rank sends to its right-hand neighbour and receives from its left one. The flat buffer is
//! cut into buckets ([`bucket`]: at parameter boundaries, so the trainer can hand one over while
//! it flattens the next) and, globally, into 1 MiB blocks; each block's partial sum starts at
//! rank `block mod W`, grows by one rank per hop and comes back as the full sum ([`engine`]).
//! Each element is therefore summed in one fixed ring order, whatever the bucket size or the
//! number of streams, once, on one rank, and copied bit for bit to the others: all ranks agree
//! exactly, and a run reproduces from its seed and world size.
//!
//! With [`WireFormat::Bf16`] every partial sum is rounded to bf16 when sent (the adds stay f32),
//! and the owner keeps the same rounded sum it sends. A value is rounded W times on its way
//! (W-1 partial sums and the final one), each time by a relative error of at most u = 2^-8, so
//! `|result - exact| <= ((1 + u)^W - 1) * sum(|x_r|)` plus f32's own rounding of the adds.

mod bucket;
mod engine;
mod link;
mod wire;

use std::ops::Range;
use std::time::Duration;

use protocol::pb;
use tokio::sync::mpsc;

pub use bucket::{BLOCK_VALUES, bucket_bounds, uniform_buckets};
pub use wire::WireFormat;

use super::{CollectiveError, CollectiveHub};
use crate::stop::StopSignal;
use engine::Engine;

/// Bits per limb of [`Ring::all_reduce_sum_u64`]: small enough that a limb summed over 4096
/// ranks stays an integer f32 represents exactly.
pub const U64_LIMB_BITS: u32 = 12;
/// Limbs per u64 (6 x 12 = 72 bits >= 64).
pub const U64_LIMBS: usize = 64usize.div_ceil(U64_LIMB_BITS as usize);

/// How a ring is formed and how it moves data. [`RingOptions::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct RingOptions {
    /// Deadline for connecting, and for any wait without progress during an operation.
    pub timeout: Duration,
    /// The ring's generation (the assignment's attempt); chunks of another one are refused.
    pub generation: u64,
    /// Target bucket size of [`Ring::all_reduce_sum`] (the trainer cuts its own at parameter
    /// boundaries with [`bucket_bounds`]).
    pub bucket_bytes: usize,
    /// Parallel HTTP/2 connections to the right-hand neighbour.
    pub streams: usize,
    /// How f32 values travel; the sum is accumulated in f32 either way.
    pub wire: WireFormat,
    /// Pieces (of up to [`BLOCK_VALUES`] values) a rank starts before the first of them has
    /// come back summed: bounds what is in flight per link.
    pub chunks_in_flight: usize,
    /// Kernel send buffer (`SO_SNDBUF`) of each link connection; `None` leaves it to the
    /// kernel's autotuning. See [`DEFAULT_SEND_BUFFER_BYTES`].
    pub send_buffer_bytes: Option<u32>,
}

/// Default bucket size: PyTorch DDP's 25 MB.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Default `SO_SNDBUF` of a link (Linux books twice this). Autotuning grows a busy loopback
/// socket's buffer to 4 MiB, and the chunks then leave the cache between the sender's copy into
/// the kernel and the receiver's copy out: on one machine this size was 20-35% faster at 3 and 4
/// ranks than autotuning (and 1 MiB kernel-side no worse than 2 or 4 at 2 ranks). It still
/// covers a bandwidth-delay product of 1 MiB, e.g. 40 Gbit/s at 200 us round trip; links beyond
/// that want a larger value, or autotuning.
pub const DEFAULT_SEND_BUFFER_BYTES: u32 = protocol::spec::DEFAULT_SEND_BUFFER_KB * 1024;

impl RingOptions {
    pub fn new(timeout: Duration) -> Self {
        RingOptions {
            timeout,
            generation: 0,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            streams: 1,
            wire: WireFormat::F32,
            chunks_in_flight: 8,
            send_buffer_bytes: Some(DEFAULT_SEND_BUFFER_BYTES),
        }
    }
}

pub struct Ring {
    run_id: String,
    rank: u32,
    world: u32,
    options: RingOptions,
    hub: CollectiveHub,
    abort: StopSignal,
    /// `None` for a single rank, and while a [`BucketedReduce`] runs on the runtime.
    engine: Option<Engine>,
}

/// Element range of segment `i` when `n` elements are cut into `world` near-equal parts.
pub fn segment_bounds(n: usize, world: usize, i: usize) -> std::ops::Range<usize> {
    (i * n / world)..((i + 1) * n / world)
}

/// A bucketed all-reduce running on the tokio runtime while the caller hands over buckets with
/// [`BucketedReduce::submit`]; [`Ring::finish`] waits for it and returns the summed buckets.
pub struct BucketedReduce {
    buckets: mpsc::UnboundedSender<(u32, Vec<f32>)>,
    task: tokio::task::JoinHandle<ReduceOutcome>,
}

/// The engine, back for the next operation, and the summed buckets.
type ReduceOutcome = (Option<Engine>, Result<Vec<Vec<f32>>, CollectiveError>);

impl BucketedReduce {
    /// Hands over bucket `bucket`'s values (its range of the flat buffer). A reduce that has
    /// already failed drops them; [`Ring::finish`] reports why.
    pub fn submit(&self, bucket: u32, values: Vec<f32>) {
        let _ = self.buckets.send((bucket, values));
    }
}

impl Ring {
    /// Joins the ring of `run_id` with the default options and generation 0.
    pub async fn connect(
        hub: &CollectiveHub,
        run_id: &str,
        rank: u32,
        peers: &[String],
        timeout: Duration,
    ) -> Result<Ring, CollectiveError> {
        Ring::connect_with(hub, run_id, rank, peers, RingOptions::new(timeout)).await
    }

    /// Joins the ring of `run_id` at `options.generation`: claims this run's inbox and opens
    /// `options.streams` links to the right neighbour (retrying until `options.timeout`, since
    /// neighbours start at slightly different times).
    pub async fn connect_with(
        hub: &CollectiveHub,
        run_id: &str,
        rank: u32,
        peers: &[String],
        options: RingOptions,
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
            options,
            hub: hub.clone(),
            abort: StopSignal::default(),
            engine: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let generation = ring.options.generation;
        let inbox = hub.take_receiver(run_id, generation, rank)?;
        let right = (rank + 1) % world;
        let hello = pb::CollectiveChunk {
            run_id: run_id.to_string(),
            from_rank: rank,
            hello: true,
            generation,
            ..Default::default()
        };
        let outbox = link::open(hub, &peers[right as usize], right, &ring.options, hello).await;
        let outbox = match outbox {
            Ok(outbox) => outbox,
            Err(e) => {
                hub.release(run_id, generation, true);
                return Err(e);
            }
        };
        ring.engine = Some(Engine {
            run_id: run_id.to_string(),
            rank,
            world,
            generation,
            op: 0,
            timeout: ring.options.timeout,
            chunks_in_flight: ring.options.chunks_in_flight,
            outbox,
            inbox,
            stash: vec![],
            abort: StopSignal::default(),
            streams: ring.options.streams.max(1),
            closed_streams: 0,
            busy: false,
            send_buffers: Default::default(),
        });
        Ok(ring)
    }

    /// Makes every later wait end early, with `CollectiveError::Aborted`, once `stop` is raised:
    /// a run the coordinator has already ended must not sit out a dead peer's deadline.
    pub fn abort_on(&mut self, stop: StopSignal) {
        if let Some(engine) = self.engine.as_mut() {
            engine.abort = stop.clone();
        }
        self.abort = stop;
    }

    /// This worker's collective endpoint, where a held state is served from.
    pub fn hub(&self) -> &CollectiveHub {
        &self.hub
    }

    pub fn world_size(&self) -> u32 {
        self.world
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn options(&self) -> &RingOptions {
        &self.options
    }

    fn engine(&mut self) -> Result<&mut Engine, CollectiveError> {
        self.engine.as_mut().ok_or_else(|| CollectiveError::Aborted {
            reason: "an earlier bucketed all-reduce of this ring did not finish".into(),
        })
    }

    /// Replaces `data` on every rank with the element-wise sum over all ranks, reduced in
    /// buckets of `options.bucket_bytes` and sent in `options.wire`.
    pub async fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let wire = self.options.wire;
        self.sum_in_buckets(data, wire).await
    }

    async fn sum_in_buckets(&mut self, data: &mut [f32], wire: WireFormat) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let bounds = uniform_buckets(data.len(), self.options.bucket_bytes);
        let mut slots: Vec<Option<&mut [f32]>> = Vec::with_capacity(bounds.len());
        let mut rest = data;
        for range in &bounds {
            let (bucket, tail) = rest.split_at_mut(range.len());
            slots.push(Some(bucket));
            rest = tail;
        }
        self.engine()?.run(&bounds, &mut slots, None, wire).await
    }

    /// Starts summing a buffer cut into `bounds` (consecutive ranges from 0, e.g. from
    /// [`bucket_bounds`]) on the runtime; hand each bucket over with [`BucketedReduce::submit`]
    /// as soon as it is ready and collect the sums with [`Ring::finish`]. Every rank must use
    /// the same bounds. Call from within the tokio runtime (a blocking task is fine).
    pub fn start(&mut self, bounds: Vec<Range<usize>>) -> BucketedReduce {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u32, Vec<f32>)>();
        let wire = self.options.wire;
        let engine = if self.world == 1 { None } else { self.engine.take() };
        let broken = self.world > 1 && engine.is_none();
        let task = tokio::spawn(async move {
            let mut slots: Vec<Option<Vec<f32>>> = vec![None; bounds.len()];
            let mut engine = engine;
            let result = match engine.as_mut() {
                _ if broken => Err(CollectiveError::Aborted {
                    reason: "an earlier bucketed all-reduce of this ring did not finish".into(),
                }),
                Some(engine) => engine.run(&bounds, &mut slots, Some(&mut rx), wire).await,
                None => collect_locally(&bounds, &mut slots, &mut rx).await,
            };
            let summed = result.map(|()| slots.into_iter().map(|s| s.expect("every bucket arrived")).collect());
            (engine, summed)
        });
        BucketedReduce { buckets: tx, task }
    }

    /// Waits for a [`Ring::start`]ed reduce; its summed buckets, in order.
    pub async fn finish(&mut self, reduce: BucketedReduce) -> Result<Vec<Vec<f32>>, CollectiveError> {
        drop(reduce.buckets);
        let (engine, summed) = reduce.task.await.map_err(|e| CollectiveError::Aborted {
            reason: format!("the all-reduce task failed: {e}"),
        })?;
        if engine.is_some() {
            self.engine = engine;
        }
        summed
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
        // Always f32 on the wire: the limbs must stay exact.
        self.sum_in_buckets(&mut limbs, WireFormat::F32).await?;
        for (v, sums) in data.iter_mut().zip(limbs.chunks_exact(U64_LIMBS)) {
            // Bits carried past bit 63 are dropped: the wrapping sum.
            *v = sums.iter().enumerate().fold(0u64, |acc, (k, &s)| {
                acc.wrapping_add((s as u64) << (k as u32 * U64_LIMB_BITS))
            });
        }
        Ok(())
    }
}

/// A single rank's "reduce": the buckets as handed over.
async fn collect_locally(
    bounds: &[Range<usize>],
    slots: &mut [Option<Vec<f32>>],
    rx: &mut mpsc::UnboundedReceiver<(u32, Vec<f32>)>,
) -> Result<(), CollectiveError> {
    for _ in 0..bounds.len() {
        let (b, values) = rx.recv().await.ok_or_else(|| CollectiveError::Aborted {
            reason: "the local step stopped handing over buckets".into(),
        })?;
        match slots.get_mut(b as usize) {
            Some(slot @ None) if bounds[b as usize].len() == values.len() => *slot = Some(values),
            _ => {
                return Err(CollectiveError::Desync {
                    op: 0,
                    message: format!("bucket {b} handed over twice or with the wrong length"),
                });
            }
        }
    }
    Ok(())
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Dropping the outbox ends the link streams once their queued chunks are sent; aborting
        // them instead would lose the last chunks the neighbour is still waiting for.
        let abandoned = self.engine.take().is_none_or(|e| e.busy);
        if self.world > 1 {
            self.hub.release(&self.run_id, self.options.generation, abandoned);
        }
    }
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
