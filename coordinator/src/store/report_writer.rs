//! One writer for rank reports. Every rank of every run reports metrics every few seconds; with
//! a transaction and a flush per report, a thousand ranks queue on sled's write lock and on
//! fsync, block the runtime's threads while they wait, and every RPC's tail latency follows.
//! Here one thread takes every report that is waiting, writes them in one transaction, flushes
//! once, and only then acknowledges each: the same durability per report as before, the cost of
//! one flush shared by all, and request tasks that only await.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::metrics::{PreparedReport, Recorded, ReportTrees};
use super::{Durability, Result, StoreError};

/// Reports written in one transaction at most: bounds the transaction's memory and the wait of
/// the first report in a long queue.
const MAX_BATCH: usize = 512;
/// Reports waiting at most; a full queue makes reporters wait instead of growing memory.
const QUEUE_DEPTH: usize = 8192;

#[derive(Default)]
struct Counts {
    batches: AtomicU64,
    reports: AtomicU64,
}

struct Job {
    report: PreparedReport,
    done: oneshot::Sender<Result<Recorded>>,
}

/// The handle: a queue into the writer thread. Dropping it lets the thread finish what is queued
/// and waits for it, so the store is never closed under a write.
pub(super) struct ReportWriter {
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Transactions written so far (each one flush), and reports taken into them: how well
    /// reports batch. Read by the tests today; the natural gauges for a metrics endpoint.
    #[cfg_attr(not(test), allow(dead_code))]
    counts: Arc<Counts>,
}

impl ReportWriter {
    pub(super) fn start(trees: ReportTrees, durability: Durability) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel(QUEUE_DEPTH);
        let counts = Arc::new(Counts::default());
        let counted = counts.clone();
        let thread = std::thread::Builder::new()
            .name("report-writer".into())
            .spawn(move || write_batches(jobs, &trees, &durability, &counted))?;
        Ok(ReportWriter {
            queue: Some(queue),
            thread: Some(thread),
            counts,
        })
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.max_capacity() - q.capacity())
    }

    /// Queues a report and waits until it is written and flushed.
    pub(super) async fn write(&self, report: PreparedReport) -> Result<Recorded> {
        let (done, written) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(StoreError::WriterStopped)?;
        queue
            .send(Job { report, done })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        written.await.map_err(|_| StoreError::WriterStopped)?
    }
}

impl Drop for ReportWriter {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_batches(mut jobs: mpsc::Receiver<Job>, trees: &ReportTrees, durability: &Durability, counts: &Counts) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        counts.reports.fetch_add(batch.len() as u64, Ordering::SeqCst);
        let reports: Vec<&PreparedReport> = batch.iter().map(|job| &job.report).collect();
        let written = {
            let _io = durability.writing();
            trees.apply(&reports)
        };
        let result = written.and_then(|recorded| durability.flush().map(|()| recorded));
        counts.batches.fetch_add(1, Ordering::SeqCst);
        match result {
            Ok(recorded) => {
                for (job, recorded) in batch.drain(..).zip(recorded) {
                    let _ = job.done.send(Ok(recorded)); // the reporter may have gone; it was written
                }
            }
            Err(e) => {
                tracing::error!("writing {} reports: {e}", batch.len());
                let e = Arc::new(e);
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(StoreError::Shared(e.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::records::MetricRecord;
    use crate::store::{ChecksumReport, Store};

    fn report(rank: u32, step: u64) -> PreparedReport {
        let point = MetricRecord {
            rank,
            step,
            name: "train/loss".into(),
            value: step as f64,
            unix_ms: 0,
        };
        let sum = ChecksumReport {
            step,
            rank,
            attempt: 1,
            sha256: format!("{rank:064}"),
        };
        PreparedReport::new("r", Some(step), &[point.clone(), point], vec![sum], 2)
    }

    /// Reports that wait while the writer is busy go into one transaction, each lands as if
    /// written alone (dense seqs, every rank's checksum seen by the later one), and each is
    /// durable when acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_reports_share_one_transaction_and_one_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let writer = &store.report_writer;
        let before = writer.counts.batches.load(Ordering::SeqCst);
        // Holding the write lock stalls the writer on its first batch; the rest queue up.
        let io = store.durability.writing();
        let tasks: Vec<_> = (0..40u64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.record_report(report((i % 2) as u32, i / 2)).await })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let sent = || writer.counts.reports.load(Ordering::SeqCst) as usize + writer.queued();
        while sent() < 40 {
            assert!(tokio::time::Instant::now() < deadline, "reports never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(io);
        let (mut seqs, mut known) = (vec![], vec![]);
        for task in tasks {
            let recorded = task.await.unwrap().unwrap();
            assert!(store.is_durable(), "acknowledged before its flush");
            seqs.push(recorded.next_seq);
            known.extend(recorded.known);
        }
        // Both ranks report each step; whichever was written second read the other's checksum,
        // though both were in one transaction (sled transactions read their own writes).
        for step in 0..20 {
            let seen = known.iter().filter(|(s, _)| *s == step).map(|(_, all)| all.len()).max();
            assert_eq!(seen, Some(2), "step {step}: {known:?}");
        }
        seqs.sort();
        assert_eq!(
            seqs,
            (1..=40).map(|n| n * 2).collect::<Vec<_>>(),
            "dense, none repeated"
        );
        let batches = writer.counts.batches.load(Ordering::SeqCst) - before;
        assert!(batches <= 2, "40 waiting reports took {batches} transactions");
        assert_eq!(store.metrics_from("r", 0).unwrap().len(), 80);
        assert_eq!(store.checksums("r").unwrap().len(), 40);
    }
}
