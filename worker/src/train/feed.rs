//! The data feed: background threads build the next steps' batches while the current step
//! trains, so a step with a warm cache only pops a ready batch.
//!
//! Which case a sample reads and how it is cropped are functions of (seed, global sample index)
//! alone (`order`), so the feed knows every future batch in advance and its output never depends
//! on timing: threads build whole batches, each into its own slot, and the trainer takes them in
//! step order. Memory is bounded: at most `depth` batches are built or waiting at any time
//! (`depth` from a byte budget), besides the one the trainer holds and the cache's few open
//! volumes.
//!
//! A case that fails to load is replaced, for that sample slot, by the case `substitute(sample,
//! attempt)` names (deterministic, so ranks and reruns agree), with the same crop randomness. The
//! batch lists every such `CaseFailure` in sample order, so the trainer can quarantine and report
//! them in order. Without a substitute, or when every substitute fails too, the batch itself is
//! `Err(CaseFailure)` for the sample's own case; in the second case it also lists the substitutes
//! that failed, since one bad case is not why the run stops: most of its cases are.

use std::collections::BTreeMap;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use data::patch::{CropConfig, sample_patch};
use data::{CaseVolume, DataError};
use protocol::classes::NUM_CLASSES;

use crate::train::cases::CaseSource;
use crate::train::order::{SampleOrder, rank_slice, sample_rng};

/// Names the case to read instead for global sample `index`, attempt `attempt` (0, 1, …) after
/// its case failed; `None` gives up.
pub type Substitute = Arc<dyn Fn(u64, u32) -> Option<String> + Send + Sync>;

/// What the feed builds, and how far ahead.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub seed: u64,
    pub rank: u32,
    pub per_rank_batch: u32,
    /// Global samples one step consumes (world size × per-rank batch).
    pub samples_per_step: u64,
    /// Samples consumed before the first batch this feed builds (the resumed cursor).
    pub first_consumed: u64,
    /// Batches to build (the steps left in the run).
    pub batches: u64,
    pub crop: CropConfig,
    /// Loader threads.
    pub threads: usize,
    /// Byte budget for batches built ahead (at least one batch is always allowed).
    pub max_ahead_bytes: usize,
    /// Substitutes tried per failed sample before the batch fails.
    pub max_substitutions: u32,
}

impl FeedConfig {
    /// Bytes of one batch's tensors (image and channel-major labels, f32).
    pub fn batch_bytes(&self) -> usize {
        self.per_rank_batch as usize * self.crop.voxels() * (1 + NUM_CLASSES) * 4
    }

    /// Batches built ahead: as many as the budget holds, 1..=8.
    pub fn depth(&self) -> usize {
        (self.max_ahead_bytes / self.batch_bytes().max(1)).clamp(1, 8)
    }

    /// The global samples of batch `k`.
    pub fn samples(&self, k: u64) -> Range<u64> {
        rank_slice(
            self.first_consumed + k * self.samples_per_step,
            self.rank,
            self.per_rank_batch,
        )
    }
}

/// A case that could not be read for a sample.
#[derive(Debug)]
pub struct CaseFailure {
    pub sample_index: u64,
    pub case_id: String,
    /// Boxed: failures are rare, and batches travel as `Result`s.
    pub error: Box<DataError>,
    /// Set when the sample's substitutes all failed too.
    pub exhausted: Option<Exhausted>,
}

/// Every candidate of one sample failed: its substitutes, and the run's case count.
#[derive(Debug)]
pub struct Exhausted {
    /// The substitutes tried, in order, each failed.
    pub substitutes: Vec<String>,
    /// Training cases of the run.
    pub run_cases: usize,
}

impl CaseFailure {
    /// Why the run cannot go on, when the sample's substitutes ran out: how many cases failed
    /// out of how many, a few of their ids, and the first error.
    pub fn exhausted_message(&self) -> Option<String> {
        let ex = self.exhausted.as_ref()?;
        let mut bad: Vec<&str> = vec![self.case_id.as_str()];
        for id in &ex.substitutes {
            if !bad.contains(&id.as_str()) {
                bad.push(id);
            }
        }
        let shown: Vec<&str> = bad.iter().take(5).copied().collect();
        let more = bad.len() - shown.len();
        Some(format!(
            "case {} (sample {}) could not be read, nor could any of the {} substitutes tried for it: \
             {} of the run's {} training cases failed to load ({}{}), so much of the dataset looks \
             unreadable; check its files and `coordinator dataset quarantine`. First error: {}",
            self.case_id,
            self.sample_index,
            ex.substitutes.len(),
            bad.len(),
            ex.run_cases,
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            self.error
        ))
    }
}

/// One step's input for this rank.
#[derive(Debug)]
pub struct Batch {
    /// The global samples it holds.
    pub samples: Range<u64>,
    /// The case each sample read (a substitute where its own case failed).
    pub cases: Vec<String>,
    /// `[B, 1, D, H, W]`.
    pub images: Vec<f32>,
    /// `[B, NUM_CLASSES, D, H, W]`.
    pub labels: Vec<f32>,
    /// Cases that failed and were replaced, in sample order.
    pub failures: Vec<CaseFailure>,
}

/// Loader figures since the last `take_metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedMetrics {
    pub cases_per_second: f64,
    pub cache_hit_rate: f64,
    /// Mean seconds a step waited for its batch.
    pub wait_seconds: f64,
    pub case_failures: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    hits: AtomicU64,
    failures: AtomicU64,
}

struct State {
    next_claim: u64,
    popped: u64,
    ready: BTreeMap<u64, Result<Batch, CaseFailure>>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    space: Condvar,
    stop: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything a loader thread needs to build batch `k`.
#[derive(Clone)]
pub struct BatchBuilder {
    pub order: Arc<SampleOrder>,
    pub source: Arc<dyn CaseSource>,
    pub substitute: Option<Substitute>,
    pub config: FeedConfig,
}

impl BatchBuilder {
    /// Builds batch `k` in the calling thread: what the feed's threads do, and what a test
    /// compares them with.
    pub fn build(&self, k: u64) -> Result<Batch, CaseFailure> {
        self.build_counted(k, &Counters::default(), &AtomicBool::new(false))
    }

    fn build_counted(&self, k: u64, counters: &Counters, stop: &AtomicBool) -> Result<Batch, CaseFailure> {
        let cfg = &self.config;
        let samples = cfg.samples(k);
        let voxels = cfg.crop.voxels();
        let b = cfg.per_rank_batch as usize;
        let mut batch = Batch {
            samples: samples.clone(),
            cases: Vec::with_capacity(b),
            images: Vec::with_capacity(b * voxels),
            labels: Vec::with_capacity(b * NUM_CLASSES * voxels),
            failures: vec![],
        };
        let ids: Vec<String> = self
            .order
            .cases(samples.clone())
            .into_iter()
            .map(str::to_string)
            .collect();
        for (index, id) in samples.zip(ids) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let (case, vol) = self.read(index, id, counters, &mut batch.failures)?;
            let patch = sample_patch(&vol, &cfg.crop, &mut sample_rng(cfg.seed, index));
            drop(vol);
            batch.images.extend_from_slice(&patch.image);
            batch.labels.extend_from_slice(&patch.labels);
            batch.cases.push(case);
        }
        Ok(batch)
    }

    /// The sample's own case, else its substitutes in turn. On success the sample's failures
    /// join `failures`; when every candidate fails, the own case's failure is the error.
    fn read(
        &self,
        index: u64,
        id: String,
        counters: &Counters,
        failures: &mut Vec<CaseFailure>,
    ) -> Result<(String, Arc<CaseVolume>), CaseFailure> {
        let mut candidate = id;
        let mut failed: Vec<CaseFailure> = vec![];
        loop {
            counters.reads.fetch_add(1, Ordering::Relaxed);
            match self.source.volume(&candidate) {
                Ok((vol, source)) => {
                    if source.is_hit() {
                        counters.hits.fetch_add(1, Ordering::Relaxed);
                    }
                    failures.append(&mut failed);
                    return Ok((candidate, vol));
                }
                // Not the case's fault: substituting would make what the run trains on depend
                // on an outage. The step fails and the run resumes from its checkpoint.
                Err(error) if !error.is_case_fault() => {
                    return Err(CaseFailure {
                        sample_index: index,
                        case_id: candidate,
                        error: Box::new(error),
                        exhausted: None,
                    });
                }
                Err(error) => {
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(sample = index, case = %candidate, "case failed to load: {error}");
                    failed.push(CaseFailure {
                        sample_index: index,
                        case_id: candidate.clone(),
                        error: Box::new(error),
                        exhausted: None,
                    });
                }
            }
            let attempt = failed.len() as u32 - 1;
            let next = match &self.substitute {
                Some(sub) if attempt < self.config.max_substitutions => sub(index, attempt),
                _ => None,
            };
            match next {
                Some(next) => candidate = next,
                None => {
                    let mut own = failed.remove(0);
                    if !failed.is_empty() {
                        own.exhausted = Some(Exhausted {
                            substitutes: failed.into_iter().map(|f| f.case_id).collect(),
                            run_cases: self.order.all_cases().len(),
                        });
                    }
                    return Err(own);
                }
            }
        }
    }
}

/// The running feed. Dropping it stops and joins its threads.
pub struct Feed {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    batches: u64,
    waited: Duration,
    steps_since: u64,
    reads_at: u64,
    hits_at: u64,
    failures_at: u64,
    since: Instant,
}

impl Feed {
    pub fn start(builder: BatchBuilder) -> Feed {
        let cfg = &builder.config;
        let depth = cfg.depth() as u64;
        let threads = cfg.threads.clamp(1, depth as usize);
        let batches = cfg.batches;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_claim: 0,
                popped: 0,
                ready: BTreeMap::new(),
            }),
            ready: Condvar::new(),
            space: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let threads = (0..threads)
            .map(|t| {
                let (shared, builder) = (shared.clone(), builder.clone());
                std::thread::Builder::new()
                    .name(format!("feed-{t}"))
                    .spawn(move || load_loop(&shared, &builder, depth, batches))
                    .expect("spawning a loader thread")
            })
            .collect();
        Feed {
            shared,
            threads,
            batches,
            waited: Duration::ZERO,
            steps_since: 0,
            reads_at: 0,
            hits_at: 0,
            failures_at: 0,
            since: Instant::now(),
        }
    }

    /// The next batch, in step order, waiting for it if it is not built yet. `None` once all
    /// `batches` have been taken.
    pub fn next_batch(&mut self) -> Option<Result<Batch, CaseFailure>> {
        let started = Instant::now();
        let mut state = self.shared.lock();
        if state.popped >= self.batches {
            return None;
        }
        let k = state.popped;
        let out = loop {
            if let Some(out) = state.ready.remove(&k) {
                break out;
            }
            state = self.shared.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        };
        state.popped += 1;
        drop(state);
        self.shared.space.notify_all();
        self.waited += started.elapsed();
        self.steps_since += 1;
        Some(out)
    }

    /// Batches built and waiting (for tests of the bound).
    pub fn buffered(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// Figures since the previous call.
    pub fn take_metrics(&mut self) -> FeedMetrics {
        let c = &self.shared.counters;
        let (reads, hits, failures) = (
            c.reads.load(Ordering::Relaxed),
            c.hits.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
        );
        let (dr, dh) = (reads - self.reads_at, hits - self.hits_at);
        let metrics = FeedMetrics {
            cases_per_second: dr as f64 / self.since.elapsed().as_secs_f64().max(1e-9),
            cache_hit_rate: if dr == 0 { 1.0 } else { dh as f64 / dr as f64 },
            wait_seconds: self.waited.as_secs_f64() / self.steps_since.max(1) as f64,
            case_failures: failures - self.failures_at,
        };
        (self.reads_at, self.hits_at, self.failures_at) = (reads, hits, failures);
        self.waited = Duration::ZERO;
        self.steps_since = 0;
        self.since = Instant::now();
        metrics
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.space.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn load_loop(shared: &Shared, builder: &BatchBuilder, depth: u64, batches: u64) {
    loop {
        let k = {
            let mut state = shared.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) || state.next_claim >= batches {
                    return;
                }
                if state.next_claim < state.popped + depth {
                    state.next_claim += 1;
                    break state.next_claim - 1;
                }
                state = shared.space.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        // A panic in a crop must reach the trainer as an error, not leave it waiting forever.
        let built = catch_unwind(AssertUnwindSafe(|| {
            builder.build_counted(k, &shared.counters, &shared.stop)
        }))
        .unwrap_or_else(|panic| {
            let samples = builder.config.samples(k);
            Err(CaseFailure {
                sample_index: samples.start,
                case_id: String::new(),
                error: Box::new(DataError::Corrupt {
                    key: format!("batch of samples {samples:?}"),
                    reason: format!("building it panicked: {}", panic_message(&panic)),
                }),
                exhausted: None,
            })
        });
        shared.lock().ready.insert(k, built);
        shared.ready.notify_all();
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
#[path = "feed_tests.rs"]
mod tests;
