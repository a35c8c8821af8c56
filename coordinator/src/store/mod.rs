//! The only module that touches sled. It owns the trees, the key formats and the durability
//! rule: writes are applied at once (each request's writes in one transaction) and made
//! durable by `durable()`, which callers await before they answer or act on what they wrote
//! (sled 0.34 is durable only after a flush). Splitting the two lets the coordinator write under
//! its model lock and flush after releasing it; sled's log is ordered, so one flush covers every
//! earlier write, and callers waiting at once share it (group commit).
//!
//! Writes and flushes never overlap: sled 0.34 deadlocks when a transaction waits for its global
//! write lock while a flush, holding the read side, waits for log writes that need it. So every
//! mutation and every flush takes `io`, and sled's own background flusher is off.
//!
//! Trees and keys:
//! - `runs`:        `<run-id>` → RunRecord (JSON)
//! - `workers`:     `<worker-id>` → WorkerRecord (JSON)
//! - `checkpoints`: `<run-id>/<step:020>` → CheckpointRecord (JSON)
//! - `metrics`:     `<run-id>/<seq:020>` → MetricRecord (JSON); seq is per run, dense from 0
//! - `checksums`:   `<run-id>/<step:020>/<rank:06>@<attempt:06>` → weights SHA-256 (a resumed
//!   run re-computes steps under a new attempt; the spine wrote keys without `@<attempt>`)
//! - `events`:      `<run-id>/<seq:020>` → RunEvent (JSON); seq is per run, dense from 0
//! - `metrics` holds one JSON array per report, keyed by the seq of its first point (schema 1
//!   stored one point per key; both read back)
//! - `latest`:      `<run-id>/<rank:06>/<metric name>` → newest MetricRecord of that name (JSON)
//! - `progress`:    `<run-id>` → newest step reported (8 bytes BE); overrides an older run step
//! - `manifests`:   `<manifest-id>` → ManifestRecord (JSON); `manifest_index`:
//!   `<order_seed:020>/<dataset url>` → manifest id
//! - `sweeps`:      `<sweep-id>` → SweepRecord (JSON)
//! - `datasets`:    `<dataset name>` → DatasetRecord (JSON): the newest scan of its URL
//!   `dataset_urls`: `<dataset url>` → dataset name (one name per URL)
//! - `quarantine`:  `<dataset url>\n<case-id>` → QuarantineRecord (JSON)
//! - `meta`:        `schema_version`, `cluster_id`, counters (`next_run`, `next_worker`,
//!   `next_sweep`, `metric_seq/<run-id>`, `event_seq/<run-id>`)
//!
//! Each request the coordinator serves is one sled transaction: a crash leaves either all of a
//! report or none of it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use thiserror::Error;

use crate::records::{CheckpointRecord, RunEvent, RunRecord, WorkerRecord};

mod catalog;
mod datasets;
mod lock;
mod metrics;
mod report_writer;

pub use catalog::manifest_id;
pub use datasets::ScanChange;
pub use lock::PID_FILE;
pub use metrics::{ChecksumReport, PreparedReport, Recorded};

/// Layout version this build writes. Raise it when a change needs more than new serde-defaulted
/// fields, and teach `open` to migrate the old one. Version 2 moved case lists out of run
/// records into frozen manifests.
pub const SCHEMA_VERSION: u64 = 2;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sled store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("{}", lock::in_use_message(path, *pid))]
    InUse { path: String, pid: Option<u32> },
    // Shown, not chained: anyhow's `{:#}` would print the io error twice.
    #[error("data dir {path}: cannot {action}: {error}")]
    Lock {
        path: String,
        action: &'static str,
        error: std::io::Error,
    },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("flushing the store: {0}")]
    Flush(String),
    #[error("the store's report writer has stopped; the coordinator is shutting down")]
    WriterStopped,
    /// One failure of a batched write, handed to every report of the batch.
    #[error(transparent)]
    Shared(Arc<StoreError>),
    #[error(
        "sled store at {path} has schema version {found}, written by a newer voxelfleet; this \
         build reads versions up to {SCHEMA_VERSION}. Upgrade the coordinator, or point \
         --data-dir elsewhere"
    )]
    TooNew { path: String, found: u64 },
    #[error("store tree `{tree}` key `{key}` holds an unreadable record: {message}")]
    Corrupt {
        tree: &'static str,
        key: String,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub struct Store {
    db: sled::Db,
    runs: sled::Tree,
    workers: sled::Tree,
    checkpoints: sled::Tree,
    metrics: sled::Tree,
    checksums: sled::Tree,
    events: sled::Tree,
    latest: sled::Tree,
    /// `<run-id>` → newest reported step (8 bytes BE): progress without rewriting the run.
    progress: sled::Tree,
    manifests: sled::Tree,
    manifest_index: sled::Tree,
    sweeps: sled::Tree,
    datasets: sled::Tree,
    dataset_urls: sled::Tree,
    quarantine: sled::Tree,
    meta: sled::Tree,
    cluster_id: String,
    durability: Durability,
    /// One flush at a time; the others wait for it and usually find their writes covered.
    flushing: tokio::sync::Mutex<()>,
    /// Before `_lock`: dropping it waits for the writer thread, which holds trees of `db`.
    report_writer: report_writer::ReportWriter,
    /// The data dir's lock; last, so it is released after sled has let go of its files.
    _lock: lock::DirLock,
}

/// The write lock and the flush bookkeeping, shared by the store and its report writer thread.
#[derive(Clone)]
struct Durability {
    db: sled::Db,
    /// Held by every write and every flush (see the module comment).
    io: Arc<Mutex<()>>,
    /// Writes made, and how many of them the last flush covered.
    written: Arc<AtomicU64>,
    flushed: Arc<AtomicU64>,
}

impl Durability {
    /// Takes the write lock; the write counts when the returned guard drops.
    fn writing(&self) -> Writing<'_> {
        Writing {
            _io: self.io.lock().unwrap_or_else(|p| p.into_inner()),
            written: &self.written,
        }
    }

    #[cfg(test)]
    fn is_durable(&self) -> bool {
        self.flushed.load(Ordering::SeqCst) >= self.written.load(Ordering::SeqCst)
    }

    /// Flushes sled (blocking) and records which writes that covered.
    fn flush(&self) -> Result<()> {
        let _io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let covered = self.written.load(Ordering::SeqCst);
        self.db.flush()?;
        self.flushed.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }
}

/// Proof that the caller holds the store's write lock, counted as a write when dropped.
struct Writing<'a> {
    _io: MutexGuard<'a, ()>,
    written: &'a AtomicU64,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

/// Counters are stored as 8 big-endian bytes; anything else reads as 0.
fn be_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<()>>;

/// Our transactions never abort on purpose, so only storage errors can come out of them.
fn storage_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
    }
}

/// Appends `events` to a run's event log inside a transaction, with a dense per-run sequence.
fn append_events(
    events: &sled::transaction::TransactionalTree,
    meta: &sled::transaction::TransactionalTree,
    run_id: &str,
    encoded: &[Vec<u8>],
) -> TxResult<()> {
    if encoded.is_empty() {
        return Ok(());
    }
    let counter = format!("event_seq/{run_id}");
    let mut next = meta.get(&counter)?.as_deref().map(be_u64).unwrap_or(0);
    for value in encoded {
        events.insert(step_key(run_id, next).as_bytes(), value.clone())?;
        next += 1;
    }
    meta.insert(counter.as_bytes(), &next.to_be_bytes())?;
    Ok(())
}

/// `events`, then the events of the transitions `run` carries, encoded for the transaction that
/// writes `run`.
fn encode_events(events: &[RunEvent], run: &RunRecord) -> Vec<Vec<u8>> {
    events.iter().chain(run.unwritten_events()).map(encode).collect()
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str, key: &str) -> Result<Option<T>> {
    tree.get(key.as_bytes())?
        .map(|v| decode(name, key.as_bytes(), &v))
        .transpose()
}

fn scan<T: DeserializeOwned>(entries: sled::Iter, name: &'static str) -> Result<Vec<T>> {
    entries
        .map(|kv| {
            let (k, v) = kv?;
            decode(name, &k, &v)
        })
        .collect()
}

fn step_key(run_id: &str, n: u64) -> String {
    format!("{run_id}/{n:020}")
}

fn run_prefix(run_id: &str) -> String {
    format!("{run_id}/")
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|error| StoreError::Lock {
            path: path.clone(),
            action: "create it",
            error,
        })?;
        // Before sled: its own lock error names no owner.
        let dir_lock = lock::acquire(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            // sled's default page cache is 1 GiB; the coordinator reads little back (the model
            // is in memory), so a small cache keeps its footprint small.
            .cache_capacity(64 << 20)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let meta = db.open_tree("meta")?;
        // A store without a version is the spine's: the same layout as version 1.
        let found = meta.get("schema_version")?.as_deref().map(be_u64).unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path, found });
        }
        let cluster_id = match meta.get("cluster_id")? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => {
                // Run ids carry it, so coordinators that share an artifacts bucket never pick
                // the same run prefix.
                let id = format!("{:08x}", rand::random::<u32>());
                meta.insert("cluster_id", id.as_bytes())?;
                id
            }
        };
        let durability = Durability {
            db: db.clone(),
            io: Arc::new(Mutex::new(())),
            written: Arc::new(AtomicU64::new(0)),
            flushed: Arc::new(AtomicU64::new(0)),
        };
        let report_trees = metrics::ReportTrees::open(&db, &meta)?;
        let report_writer =
            report_writer::ReportWriter::start(report_trees, durability.clone()).map_err(|error| StoreError::Lock {
                path: path.clone(),
                action: "start its report writer thread",
                error,
            })?;
        let store = Store {
            runs: db.open_tree("runs")?,
            workers: db.open_tree("workers")?,
            checkpoints: db.open_tree("checkpoints")?,
            metrics: db.open_tree("metrics")?,
            checksums: db.open_tree("checksums")?,
            events: db.open_tree("events")?,
            latest: db.open_tree("latest")?,
            progress: db.open_tree("progress")?,
            manifests: db.open_tree("manifests")?,
            manifest_index: db.open_tree("manifest_index")?,
            sweeps: db.open_tree("sweeps")?,
            datasets: db.open_tree("datasets")?,
            dataset_urls: db.open_tree("dataset_urls")?,
            quarantine: db.open_tree("quarantine")?,
            meta,
            cluster_id,
            db,
            durability,
            flushing: tokio::sync::Mutex::new(()),
            report_writer,
            _lock: dir_lock,
        };
        if found < 2 {
            store.migrate_case_lists()?;
        }
        if found < SCHEMA_VERSION {
            store.meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
        }
        store.db.flush()?;
        Ok(store)
    }

    /// Random id of this store, part of every run id it hands out.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Makes everything written so far durable. Await it before answering a request or acting
    /// on a write.
    pub async fn durable(&self) -> Result<()> {
        let target = self.durability.written.load(Ordering::SeqCst);
        let covered = || self.durability.flushed.load(Ordering::SeqCst) >= target;
        if covered() {
            return Ok(());
        }
        let _one_flush = self.flushing.lock().await;
        if covered() {
            return Ok(()); // the flush we waited for, or the report writer's, covered our writes
        }
        let durability = self.durability.clone();
        tokio::task::spawn_blocking(move || durability.flush())
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))?
    }

    /// Whether every write so far has been flushed.
    #[cfg(test)]
    pub fn is_durable(&self) -> bool {
        self.durability.is_durable()
    }

    /// Takes the write lock; the write counts when the returned guard drops.
    fn writing(&self) -> Writing<'_> {
        self.durability.writing()
    }

    /// Next value of a durable counter, starting at 1. Flushed by the caller's write.
    fn next_counter(&self, name: &str) -> Result<u64> {
        let _io = self.writing();
        let next = self.meta.update_and_fetch(name, |old| {
            Some((old.map(be_u64).unwrap_or(0) + 1).to_be_bytes().to_vec())
        })?;
        Ok(next.as_deref().map(be_u64).unwrap_or(1))
    }

    /// `run-<counter>-<cluster id>`: ordered within this store, unique across stores. The
    /// counter also orders the queue within a priority.
    pub fn next_run_id(&self) -> Result<(u64, String)> {
        let seq = self.next_counter("next_run")?;
        Ok((seq, format!("run-{seq:06}-{}", self.cluster_id)))
    }

    pub fn next_sweep_id(&self) -> Result<String> {
        Ok(format!(
            "sweep-{:06}-{}",
            self.next_counter("next_sweep")?,
            self.cluster_id
        ))
    }

    pub fn next_worker_id(&self) -> Result<String> {
        Ok(format!("worker-{:06}", self.next_counter("next_worker")?))
    }

    // ---- runs -------------------------------------------------------------------------------

    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        get::<RunRecord>(&self.runs, "runs", run_id)?
            .map(|run| self.with_progress(run))
            .transpose()
    }

    /// All runs in submission order (ids are zero-padded counters).
    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        scan::<RunRecord>(self.runs.iter(), "runs")?
            .into_iter()
            .map(|run| self.with_progress(run))
            .collect()
    }

    /// Reports record a run's step apart from its record (see `record_report`).
    fn with_progress(&self, mut run: RunRecord) -> Result<RunRecord> {
        if let Some(step) = self.reported_step(&run.id)? {
            run.step = run.step.max(step);
        }
        Ok(run)
    }

    /// Writes a run, the workers it touches and the events that explain the change in one sled
    /// transaction, so a crash never leaves a worker reserved by a run that does not list it (or
    /// the reverse), nor a state change without its reason. The events of the run's transitions
    /// (`RunRecord::unwritten_events`) go in the same transaction, after `events`, and are then
    /// marked written.
    pub fn put_transition(&self, run: &mut RunRecord, workers: &[WorkerRecord], events: &[RunEvent]) -> Result<()> {
        self.write_transition(None, run, workers, events)
    }

    /// The one transaction behind `put_transition` and `put_checkpoint`.
    fn write_transition(
        &self,
        ckpt: Option<&CheckpointRecord>,
        run: &mut RunRecord,
        workers: &[WorkerRecord],
        events: &[RunEvent],
    ) -> Result<()> {
        let _io = self.writing();
        let ckpt_bytes = ckpt.map(|c| (step_key(&c.run_id, c.step), encode(c)));
        let run_bytes = encode(&*run);
        let worker_bytes: Vec<(Vec<u8>, Vec<u8>)> =
            workers.iter().map(|w| (w.id.as_bytes().to_vec(), encode(w))).collect();
        let event_bytes = encode_events(events, run);
        (&self.checkpoints, &self.runs, &self.workers, &self.events, &self.meta)
            .transaction(|(ckpts, runs, ws, evs, meta)| {
                if let Some((key, value)) = &ckpt_bytes {
                    ckpts.insert(key.as_bytes(), value.clone())?;
                }
                runs.insert(run.id.as_bytes(), run_bytes.clone())?;
                for (k, v) in &worker_bytes {
                    ws.insert(k.as_slice(), v.clone())?;
                }
                append_events(evs, meta, &run.id, &event_bytes)
            })
            .map_err(storage_error)?;
        run.events_written();
        Ok(())
    }

    /// Events of a run, oldest first.
    pub fn events(&self, run_id: &str) -> Result<Vec<RunEvent>> {
        scan(self.events.scan_prefix(run_prefix(run_id)), "events")
    }

    // ---- workers ----------------------------------------------------------------------------

    pub fn put_worker(&self, worker: &WorkerRecord) -> Result<()> {
        let _io = self.writing();
        self.workers.insert(worker.id.as_bytes(), encode(worker))?;
        Ok(())
    }

    /// Forgets a worker long dead.
    pub fn delete_worker(&self, worker_id: &str) -> Result<()> {
        let _io = self.writing();
        self.workers.remove(worker_id.as_bytes())?;
        Ok(())
    }

    pub fn worker(&self, worker_id: &str) -> Result<Option<WorkerRecord>> {
        get(&self.workers, "workers", worker_id)
    }

    pub fn workers(&self) -> Result<Vec<WorkerRecord>> {
        scan(self.workers.iter(), "workers")
    }

    // ---- checkpoints ------------------------------------------------------------------------

    /// Commits a checkpoint together with the run change, the workers it frees (a pause) and the
    /// events it causes.
    pub fn put_checkpoint(
        &self,
        ckpt: &CheckpointRecord,
        run: &mut RunRecord,
        workers: &[WorkerRecord],
        events: &[RunEvent],
    ) -> Result<()> {
        self.write_transition(Some(ckpt), run, workers, events)
    }

    /// Rewrites one checkpoint record (marking it unusable) with an event saying why.
    pub fn update_checkpoint(&self, ckpt: &CheckpointRecord, events: &[RunEvent]) -> Result<()> {
        let _io = self.writing();
        let ckpt_bytes = encode(ckpt);
        let event_bytes: Vec<Vec<u8>> = events.iter().map(encode).collect();
        (&self.checkpoints, &self.events, &self.meta)
            .transaction(|(ckpts, evs, meta)| {
                ckpts.insert(step_key(&ckpt.run_id, ckpt.step).as_bytes(), ckpt_bytes.clone())?;
                append_events(evs, meta, &ckpt.run_id, &event_bytes)
            })
            .map_err(storage_error)
    }

    /// Removes checkpoint records (their objects are already deleted) with an event.
    pub fn delete_checkpoints(&self, run_id: &str, steps: &[u64], events: &[RunEvent]) -> Result<()> {
        let _io = self.writing();
        let event_bytes: Vec<Vec<u8>> = events.iter().map(encode).collect();
        (&self.checkpoints, &self.events, &self.meta)
            .transaction(|(ckpts, evs, meta)| {
                for step in steps {
                    ckpts.remove(step_key(run_id, *step).as_bytes())?;
                }
                append_events(evs, meta, run_id, &event_bytes)
            })
            .map_err(storage_error)
    }

    /// Committed checkpoints of a run, oldest first.
    pub fn checkpoints(&self, run_id: &str) -> Result<Vec<CheckpointRecord>> {
        scan(self.checkpoints.scan_prefix(run_prefix(run_id)), "checkpoints")
    }
}

#[cfg(test)]
mod transition_tests;
