//! The only module that touches sled. It owns the trees, the key formats and the durability
//! rule: every mutation is flushed before the call returns, so a caller may act on a transition
//! as soon as it has been written (sled 0.34 is durable only after `flush`).
//!
//! Trees and keys:
//! - `runs`:        `<run-id>` → RunRecord (JSON)
//! - `workers`:     `<worker-id>` → WorkerRecord (JSON)
//! - `checkpoints`: `<run-id>/<step:020>` → CheckpointRecord (JSON)
//! - `metrics`:     `<run-id>/<seq:020>` → MetricRecord (JSON); seq is per run, dense from 0
//! - `checksums`:   `<run-id>/<step:020>/<rank:06>@<attempt:06>` → weights SHA-256 (a resumed
//!   run re-computes steps under a new attempt; the spine wrote keys without `@<attempt>`)
//! - `events`:      `<run-id>/<seq:020>` → RunEvent (JSON); seq is per run, dense from 0
//! - `meta`:        `schema_version`, `cluster_id`, counters (`next_run`, `next_worker`,
//!   `metric_seq/<run-id>`, `event_seq/<run-id>`)
//!
//! Each request the coordinator serves is one sled transaction and one flush: a crash leaves
//! either all of a report or none of it.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use thiserror::Error;

use crate::records::{CheckpointRecord, MetricRecord, RunEvent, RunRecord, WorkerRecord};

/// Layout version this build writes. Raise it when a change needs more than new serde-defaulted
/// fields, and teach `open` to migrate the old one.
pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sled store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
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
    meta: sled::Tree,
    cluster_id: String,
}

/// One rank's weight checksum at one step, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ChecksumReport {
    pub step: u64,
    pub rank: u32,
    pub attempt: u32,
    pub sha256: String,
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
        let db = sled::open(dir).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let meta = db.open_tree("meta")?;
        // A store without a version is the spine's: the same layout as version 1.
        let found = meta.get("schema_version")?.as_deref().map(be_u64).unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path, found });
        }
        if found < SCHEMA_VERSION {
            meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
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
        db.flush()?;
        Ok(Store {
            runs: db.open_tree("runs")?,
            workers: db.open_tree("workers")?,
            checkpoints: db.open_tree("checkpoints")?,
            metrics: db.open_tree("metrics")?,
            checksums: db.open_tree("checksums")?,
            events: db.open_tree("events")?,
            meta,
            cluster_id,
            db,
        })
    }

    /// Random id of this store, part of every run id it hands out.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Makes everything written so far durable (used on shutdown).
    pub async fn flush_all(&self) -> Result<()> {
        self.flush().await
    }

    async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Next value of a durable counter, starting at 1. Flushed by the caller's write.
    fn next_counter(&self, name: &str) -> Result<u64> {
        let next = self.meta.update_and_fetch(name, |old| {
            Some((old.map(be_u64).unwrap_or(0) + 1).to_be_bytes().to_vec())
        })?;
        Ok(next.as_deref().map(be_u64).unwrap_or(1))
    }

    /// `run-<counter>-<cluster id>`: ordered within this store, unique across stores.
    pub fn next_run_id(&self) -> Result<String> {
        Ok(format!("run-{:06}-{}", self.next_counter("next_run")?, self.cluster_id))
    }

    pub fn next_worker_id(&self) -> Result<String> {
        Ok(format!("worker-{:06}", self.next_counter("next_worker")?))
    }

    // ---- runs -------------------------------------------------------------------------------

    pub async fn put_run(&self, run: &RunRecord) -> Result<()> {
        self.put_transition(run, &[], &[]).await
    }

    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        get(&self.runs, "runs", run_id)
    }

    /// All runs in submission order (ids are zero-padded counters).
    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        scan(self.runs.iter(), "runs")
    }

    /// Writes a run, the workers it touches and the events that explain the change in one sled
    /// transaction, so a crash never leaves a worker reserved by a run that does not list it (or
    /// the reverse), nor a state change without its reason.
    pub async fn put_transition(&self, run: &RunRecord, workers: &[WorkerRecord], events: &[RunEvent]) -> Result<()> {
        self.write_transition(None, run, workers, events).await
    }

    /// The one transaction behind `put_transition` and `put_checkpoint`.
    async fn write_transition(
        &self,
        ckpt: Option<&CheckpointRecord>,
        run: &RunRecord,
        workers: &[WorkerRecord],
        events: &[RunEvent],
    ) -> Result<()> {
        let ckpt_bytes = ckpt.map(|c| (step_key(&c.run_id, c.step), encode(c)));
        let run_bytes = encode(run);
        let worker_bytes: Vec<(Vec<u8>, Vec<u8>)> =
            workers.iter().map(|w| (w.id.as_bytes().to_vec(), encode(w))).collect();
        let event_bytes: Vec<Vec<u8>> = events.iter().map(encode).collect();
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
        self.flush().await
    }

    /// Events of a run, oldest first.
    pub fn events(&self, run_id: &str) -> Result<Vec<RunEvent>> {
        scan(self.events.scan_prefix(run_prefix(run_id)), "events")
    }

    // ---- workers ----------------------------------------------------------------------------

    pub async fn put_worker(&self, worker: &WorkerRecord) -> Result<()> {
        self.workers.insert(worker.id.as_bytes(), encode(worker))?;
        self.flush().await
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
    pub async fn put_checkpoint(
        &self,
        ckpt: &CheckpointRecord,
        run: &RunRecord,
        workers: &[WorkerRecord],
        events: &[RunEvent],
    ) -> Result<()> {
        self.write_transition(Some(ckpt), run, workers, events).await
    }

    /// Rewrites one checkpoint record (marking it unusable) with an event saying why.
    pub async fn update_checkpoint(&self, ckpt: &CheckpointRecord, events: &[RunEvent]) -> Result<()> {
        let ckpt_bytes = encode(ckpt);
        let event_bytes: Vec<Vec<u8>> = events.iter().map(encode).collect();
        (&self.checkpoints, &self.events, &self.meta)
            .transaction(|(ckpts, evs, meta)| {
                ckpts.insert(step_key(&ckpt.run_id, ckpt.step).as_bytes(), ckpt_bytes.clone())?;
                append_events(evs, meta, &ckpt.run_id, &event_bytes)
            })
            .map_err(storage_error)?;
        self.flush().await
    }

    /// Removes checkpoint records (their objects are already deleted) with an event.
    pub async fn delete_checkpoints(&self, run_id: &str, steps: &[u64], events: &[RunEvent]) -> Result<()> {
        let event_bytes: Vec<Vec<u8>> = events.iter().map(encode).collect();
        (&self.checkpoints, &self.events, &self.meta)
            .transaction(|(ckpts, evs, meta)| {
                for step in steps {
                    ckpts.remove(step_key(run_id, *step).as_bytes())?;
                }
                append_events(evs, meta, run_id, &event_bytes)
            })
            .map_err(storage_error)?;
        self.flush().await
    }

    /// Committed checkpoints of a run, oldest first.
    pub fn checkpoints(&self, run_id: &str) -> Result<Vec<CheckpointRecord>> {
        scan(self.checkpoints.scan_prefix(run_prefix(run_id)), "checkpoints")
    }

    // ---- metrics ----------------------------------------------------------------------------

    /// Appends metrics with dense per-run sequence numbers; returns the seq after the last one.
    pub async fn append_metrics(&self, run_id: &str, points: &[MetricRecord]) -> Result<u64> {
        Ok(self.record_report(run_id, None, points, &[], 0).await?.0)
    }

    /// Stores one rank's report: its metric points (dense per-run sequence numbers), its weight
    /// checksums, and the run's new progress, in one transaction and one flush. The points and
    /// their counter move together: a crash between them would hand the same sequence numbers
    /// out again and overwrite acknowledged points.
    ///
    /// Returns the seq after the last point and, for each reported step, the checksums of ranks
    /// `0..world_size` known for it (read inside the same transaction).
    pub async fn record_report(
        &self,
        run_id: &str,
        run: Option<&RunRecord>,
        points: &[MetricRecord],
        checksums: &[ChecksumReport],
        world_size: u32,
    ) -> Result<(u64, Vec<(u64, Vec<(u32, String)>)>)> {
        let counter = format!("metric_seq/{run_id}");
        let encoded: Vec<Vec<u8>> = points.iter().map(encode).collect();
        let run_bytes = run.map(encode);
        let out = (&self.metrics, &self.meta, &self.checksums, &self.runs)
            .transaction(|(metrics, meta, sums, runs)| {
                let mut next = meta.get(&counter)?.as_deref().map(be_u64).unwrap_or(0);
                if !encoded.is_empty() {
                    for value in &encoded {
                        metrics.insert(step_key(run_id, next).as_bytes(), value.clone())?;
                        next += 1;
                    }
                    meta.insert(counter.as_bytes(), &next.to_be_bytes())?;
                }
                let mut known = Vec::with_capacity(checksums.len());
                for c in checksums {
                    let prefix = format!("{}/", step_key(run_id, c.step));
                    let key = |rank: u32| format!("{prefix}{rank:06}@{:06}", c.attempt);
                    sums.insert(key(c.rank).as_bytes(), c.sha256.as_bytes())?;
                    let mut at = vec![];
                    for rank in 0..world_size {
                        if let Some(v) = sums.get(key(rank).as_bytes())? {
                            at.push((rank, String::from_utf8_lossy(&v).into_owned()));
                        }
                    }
                    known.push((c.step, at));
                }
                if let Some(bytes) = &run_bytes {
                    runs.insert(run_id.as_bytes(), bytes.clone())?;
                }
                Ok((next, known))
            })
            .map_err(storage_error)?;
        self.flush().await?;
        Ok(out)
    }

    /// Metrics of a run with seq >= `from_seq`, in order, as (seq, record).
    pub fn metrics_from(&self, run_id: &str, from_seq: u64) -> Result<Vec<(u64, MetricRecord)>> {
        let start = step_key(run_id, from_seq);
        let end = format!("{run_id}0"); // '0' sorts right after '/', ending the run's range
        self.metrics
            .range(start.as_bytes()..end.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                let seq = std::str::from_utf8(&k[run_id.len() + 1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "metrics",
                        key: String::from_utf8_lossy(&k).into_owned(),
                        message: "bad sequence number".into(),
                    })?;
                Ok((seq, decode("metrics", &k, &v)?))
            })
            .collect()
    }

    // ---- weight checksums -------------------------------------------------------------------

    /// Every recorded weight checksum of a run as (step, rank, sha256), ordered by step then rank.
    pub fn checksums(&self, run_id: &str) -> Result<Vec<(u64, u32, String)>> {
        self.checksums
            .scan_prefix(run_prefix(run_id))
            .map(|kv| {
                let (k, v) = kv?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let mut parts = key.rsplitn(3, '/');
                let rank = parts.next().and_then(|r| r.split('@').next()?.parse().ok());
                let step = parts.next().and_then(|s| s.parse().ok());
                match (step, rank) {
                    (Some(step), Some(rank)) => Ok((step, rank, String::from_utf8_lossy(&v).into_owned())),
                    _ => Err(StoreError::Corrupt {
                        tree: "checksums",
                        key,
                        message: "expected <run>/<step>/<rank>".into(),
                    }),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64) -> MetricRecord {
        MetricRecord {
            rank: 0,
            step,
            name: "train/loss".into(),
            value: step as f64,
            unix_ms: 0,
        }
    }

    #[tokio::test]
    async fn metric_sequence_numbers_stay_dense_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.append_metrics("run-000001", &[point(1), point(2)]).await.unwrap(),
                2
            );
            assert_eq!(store.append_metrics("run-000002", &[point(9)]).await.unwrap(), 1);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.append_metrics("run-000001", &[point(3)]).await.unwrap(), 3);
        let seqs: Vec<(u64, u64)> = store
            .metrics_from("run-000001", 0)
            .unwrap()
            .into_iter()
            .map(|(seq, m)| (seq, m.step))
            .collect();
        assert_eq!(seqs, [(0, 1), (1, 2), (2, 3)]);
        assert_eq!(store.metrics_from("run-000001", 2).unwrap().len(), 1);
        let cluster = store.cluster_id().to_string();
        assert_eq!(store.next_run_id().unwrap(), format!("run-000001-{cluster}"));
        assert_eq!(store.next_run_id().unwrap(), format!("run-000002-{cluster}"));
    }

    #[tokio::test]
    async fn stores_get_distinct_cluster_ids_that_survive_reopen() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = Store::open(a.path()).unwrap().cluster_id().to_string();
        assert_ne!(first, Store::open(b.path()).unwrap().cluster_id());
        assert_eq!(first, Store::open(a.path()).unwrap().cluster_id());
    }

    #[test]
    fn a_store_from_a_newer_build_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert("schema_version", &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("newer voxelfleet") && err.contains("schema version 2"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_report_lands_whole_and_returns_every_ranks_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sum = |rank, sha: &str| ChecksumReport {
            step: 4,
            rank,
            attempt: 1,
            sha256: sha.into(),
        };
        let (_, known) = store
            .record_report("r", None, &[point(4)], &[sum(1, "bb")], 2)
            .await
            .unwrap();
        assert_eq!(known, [(4, vec![(1, "bb".to_string())])]);
        let (next, known) = store
            .record_report("r", None, &[point(4)], &[sum(0, "aa")], 2)
            .await
            .unwrap();
        assert_eq!(next, 2);
        assert_eq!(known, [(4, vec![(0, "aa".to_string()), (1, "bb".to_string())])]);
        assert_eq!(store.checksums("r").unwrap().len(), 2);
    }
}
