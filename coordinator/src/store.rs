//! The only module that touches sled. It owns the trees, the key formats and the durability
//! rule: every mutation is flushed before the call returns, so a caller may act on a transition
//! as soon as it has been written (sled 0.34 is durable only after `flush`).
//!
//! Trees and keys:
//! - `runs`:        `<run-id>` → RunRecord (JSON)
//! - `workers`:     `<worker-id>` → WorkerRecord (JSON)
//! - `checkpoints`: `<run-id>/<step:020>` → CheckpointRecord (JSON)
//! - `metrics`:     `<run-id>/<seq:020>` → MetricRecord (JSON); seq is per run, dense from 0
//! - `checksums`:   `<run-id>/<step:020>/<rank:06>` → weights SHA-256
//! - `meta`:        counters (`next_run`, `next_worker`, `metric_seq/<run-id>`)

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use thiserror::Error;

use crate::records::{CheckpointRecord, MetricRecord, RunRecord, WorkerRecord};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sled store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
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
    meta: sled::Tree,
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

/// Our transactions never abort on purpose, so only storage errors can come out of them.
fn storage_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
    }
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
        let db = sled::open(dir).map_err(|source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Store {
            runs: db.open_tree("runs")?,
            workers: db.open_tree("workers")?,
            checkpoints: db.open_tree("checkpoints")?,
            metrics: db.open_tree("metrics")?,
            checksums: db.open_tree("checksums")?,
            meta: db.open_tree("meta")?,
            db,
        })
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

    pub fn next_run_id(&self) -> Result<String> {
        Ok(format!("run-{:06}", self.next_counter("next_run")?))
    }

    pub fn next_worker_id(&self) -> Result<String> {
        Ok(format!("worker-{:06}", self.next_counter("next_worker")?))
    }

    // ---- runs -------------------------------------------------------------------------------

    pub async fn put_run(&self, run: &RunRecord) -> Result<()> {
        self.runs.insert(run.id.as_bytes(), encode(run))?;
        self.flush().await
    }

    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        get(&self.runs, "runs", run_id)
    }

    /// All runs in submission order (ids are zero-padded counters).
    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        scan(self.runs.iter(), "runs")
    }

    /// Writes a run and the workers it touches in one sled transaction, so a crash never leaves
    /// a worker reserved by a run that does not list it (or the reverse).
    pub async fn put_run_and_workers(&self, run: &RunRecord, workers: &[WorkerRecord]) -> Result<()> {
        let run_bytes = encode(run);
        let worker_bytes: Vec<(Vec<u8>, Vec<u8>)> =
            workers.iter().map(|w| (w.id.as_bytes().to_vec(), encode(w))).collect();
        (&self.runs, &self.workers)
            .transaction(|(runs, ws)| {
                runs.insert(run.id.as_bytes(), run_bytes.clone())?;
                for (k, v) in &worker_bytes {
                    ws.insert(k.as_slice(), v.clone())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(storage_error)?;
        self.flush().await
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

    pub async fn put_checkpoint(&self, ckpt: &CheckpointRecord) -> Result<()> {
        self.checkpoints
            .insert(step_key(&ckpt.run_id, ckpt.step).as_bytes(), encode(ckpt))?;
        self.flush().await
    }

    /// Committed checkpoints of a run, oldest first.
    pub fn checkpoints(&self, run_id: &str) -> Result<Vec<CheckpointRecord>> {
        scan(self.checkpoints.scan_prefix(run_prefix(run_id)), "checkpoints")
    }

    // ---- metrics ----------------------------------------------------------------------------

    /// Appends metrics with dense per-run sequence numbers; returns the seq after the last one.
    /// The points and the counter move in one transaction: a crash between them would otherwise
    /// hand the same sequence numbers out again and overwrite acknowledged points.
    pub async fn append_metrics(&self, run_id: &str, points: &[MetricRecord]) -> Result<u64> {
        let counter = format!("metric_seq/{run_id}");
        let encoded: Vec<Vec<u8>> = points.iter().map(encode).collect();
        let next = (&self.metrics, &self.meta)
            .transaction(|(metrics, meta)| {
                let mut next = meta.get(&counter)?.as_deref().map(be_u64).unwrap_or(0);
                for value in &encoded {
                    metrics.insert(step_key(run_id, next).as_bytes(), value.clone())?;
                    next += 1;
                }
                meta.insert(counter.as_bytes(), &next.to_be_bytes())?;
                Ok::<u64, ConflictableTransactionError<()>>(next)
            })
            .map_err(storage_error)?;
        self.flush().await?;
        Ok(next)
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

    /// Records one rank's checksum for a step; returns every rank's checksum known for that step.
    pub async fn put_checksum(&self, run_id: &str, step: u64, rank: u32, sha: &str) -> Result<Vec<(u32, String)>> {
        let prefix = format!("{}/", step_key(run_id, step));
        self.checksums
            .insert(format!("{prefix}{rank:06}").as_bytes(), sha.as_bytes())?;
        self.flush().await?;
        self.checksums
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                let rank = std::str::from_utf8(&k[prefix.len()..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                Ok((rank, String::from_utf8_lossy(&v).into_owned()))
            })
            .collect()
    }

    /// Every recorded weight checksum of a run as (step, rank, sha256), ordered by step then rank.
    pub fn checksums(&self, run_id: &str) -> Result<Vec<(u64, u32, String)>> {
        self.checksums
            .scan_prefix(run_prefix(run_id))
            .map(|kv| {
                let (k, v) = kv?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let mut parts = key.rsplitn(3, '/');
                let rank = parts.next().and_then(|r| r.parse().ok());
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
        assert_eq!(store.next_run_id().unwrap(), "run-000001");
        assert_eq!(store.next_run_id().unwrap(), "run-000002");
    }
}
