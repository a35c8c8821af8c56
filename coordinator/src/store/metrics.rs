//! Metric points, their newest values, and weight checksums: the high-volume half of the store,
//! written by every rank's reports.

use std::collections::BTreeMap;

use sled::Transactional;

use super::*;
use crate::records::MetricRecord;

/// One rank's weight checksum at one step, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ChecksumReport {
    pub step: u64,
    pub rank: u32,
    pub attempt: u32,
    pub sha256: String,
}

/// Per reported step, the checksums of every rank known for it: (step, [(rank, sha256)]).
pub type KnownChecksums = Vec<(u64, Vec<(u32, String)>)>;

fn latest_key(run_id: &str, rank: u32, name: &str) -> String {
    format!("{run_id}/{rank:06}/{name}")
}

/// One rank's report, encoded and ready to write: what `ReportTrees::apply` stores. Encoding
/// happens in the request's task, so the single writer spends its time in sled only.
#[derive(Debug)]
pub struct PreparedReport {
    run_id: String,
    /// The run's newest step, if this report advances it.
    step: Option<u64>,
    /// The points as one JSON array, keyed by the seq of the first; `None` without points.
    batch: Option<(usize, Vec<u8>)>,
    /// Per `latest` key, the newest point of that (rank, name) in this report and its step.
    newest: Vec<(String, u64, Vec<u8>)>,
    checksums: Vec<ChecksumReport>,
    world_size: u32,
}

impl PreparedReport {
    pub fn new(
        run_id: &str,
        step: Option<u64>,
        points: &[MetricRecord],
        checksums: Vec<ChecksumReport>,
        world_size: u32,
    ) -> Self {
        // Only the newest point of each (rank, name) in this report can replace the stored one.
        let mut newest: BTreeMap<String, &MetricRecord> = BTreeMap::new();
        for p in points {
            let key = latest_key(run_id, p.rank, &p.name);
            if newest.get(&key).is_none_or(|q| q.step <= p.step) {
                newest.insert(key, p);
            }
        }
        PreparedReport {
            run_id: run_id.to_string(),
            step,
            batch: (!points.is_empty()).then(|| (points.len(), encode(&points))),
            newest: newest.into_iter().map(|(k, p)| (k, p.step, encode(p))).collect(),
            checksums,
            world_size,
        }
    }
}

/// What a report's write returns: the run's metric seq after its last point and, for each
/// reported step, the checksums of ranks `0..world_size` known for it (read inside the write).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub next_seq: u64,
    pub known: KnownChecksums,
}

/// The trees a report touches, apart from the rest of the store so the report writer's thread
/// can hold them.
#[derive(Clone)]
pub(super) struct ReportTrees {
    pub(super) metrics: sled::Tree,
    pub(super) meta: sled::Tree,
    pub(super) checksums: sled::Tree,
    pub(super) progress: sled::Tree,
    pub(super) latest: sled::Tree,
}

impl ReportTrees {
    pub(super) fn open(db: &sled::Db, meta: &sled::Tree) -> Result<Self> {
        Ok(ReportTrees {
            metrics: db.open_tree("metrics")?,
            meta: meta.clone(),
            checksums: db.open_tree("checksums")?,
            progress: db.open_tree("progress")?,
            latest: db.open_tree("latest")?,
        })
    }

    /// Stores reports in one transaction, each as if written alone and in order: its metric
    /// points (dense per-run sequence numbers, one record for the whole report, keyed by its
    /// first), the newest value of each metric it names, its weight checksums, and the run's
    /// newest step. The points and their counter move together: a crash between them would hand
    /// the same sequence numbers out again and overwrite acknowledged points. A later report of
    /// the batch reads what an earlier one wrote (sled transactions read their own writes).
    /// The caller holds the store's write lock.
    pub(super) fn apply(&self, reports: &[&PreparedReport]) -> Result<Vec<Recorded>> {
        (&self.metrics, &self.meta, &self.checksums, &self.progress, &self.latest)
            .transaction(|(metrics, meta, sums, progress, latest)| {
                let mut out = Vec::with_capacity(reports.len());
                for r in reports {
                    let run_id = r.run_id.as_str();
                    let counter = format!("metric_seq/{run_id}");
                    let mut next = meta.get(&counter)?.as_deref().map(be_u64).unwrap_or(0);
                    if let Some((count, batch)) = &r.batch {
                        metrics.insert(step_key(run_id, next).as_bytes(), batch.clone())?;
                        next += *count as u64;
                        meta.insert(counter.as_bytes(), &next.to_be_bytes())?;
                    }
                    let mut known = Vec::with_capacity(r.checksums.len());
                    for c in &r.checksums {
                        let prefix = format!("{}/", step_key(run_id, c.step));
                        let key = |rank: u32| format!("{prefix}{rank:06}@{:06}", c.attempt);
                        sums.insert(key(c.rank).as_bytes(), c.sha256.as_bytes())?;
                        let mut at = vec![];
                        for rank in 0..r.world_size {
                            if let Some(v) = sums.get(key(rank).as_bytes())? {
                                at.push((rank, String::from_utf8_lossy(&v).into_owned()));
                            }
                        }
                        known.push((c.step, at));
                    }
                    for (key, step, value) in &r.newest {
                        let stored_step = latest
                            .get(key.as_bytes())?
                            .and_then(|v| serde_json::from_slice::<MetricRecord>(&v).ok())
                            .map(|m| m.step);
                        if stored_step.is_none_or(|s| s <= *step) {
                            latest.insert(key.as_bytes(), value.clone())?;
                        }
                    }
                    let recorded = progress.get(run_id.as_bytes())?.as_deref().map(be_u64);
                    if let Some(step) = r.step.filter(|s| recorded.is_none_or(|r| *s > r)) {
                        progress.insert(run_id.as_bytes(), &step.to_be_bytes())?;
                    }
                    out.push(Recorded { next_seq: next, known });
                }
                Ok(out)
            })
            .map_err(storage_error)
    }
}

impl Store {
    /// Stores one rank's report (see `ReportTrees::apply`) through the report writer, batched
    /// with whatever other reports are waiting, and returns once it is durable.
    pub async fn record_report(&self, report: PreparedReport) -> Result<Recorded> {
        self.report_writer.write(report).await
    }

    /// Stores one report at once, without the writer and without a flush: for tests.
    #[cfg(test)]
    fn record_report_now(&self, report: PreparedReport) -> Result<Recorded> {
        let trees = ReportTrees::open(&self.db, &self.meta)?;
        let _io = self.writing();
        Ok(trees.apply(&[&report])?.remove(0))
    }

    /// Appends metrics with dense per-run sequence numbers; returns the seq after the last one.
    #[cfg(test)]
    pub fn append_metrics(&self, run_id: &str, points: &[MetricRecord]) -> Result<u64> {
        Ok(self
            .record_report_now(PreparedReport::new(run_id, None, points, vec![], 0))?
            .next_seq)
    }

    /// The newest value of each metric of a run, per rank: as many records as the run has metric
    /// names times ranks, however long it trained.
    pub fn latest_metrics(&self, run_id: &str) -> Result<Vec<MetricRecord>> {
        scan(self.latest.scan_prefix(run_prefix(run_id)), "latest")
    }

    /// Metrics of a run with seq >= `from_seq`, in order, as (seq, record).
    pub fn metrics_from(&self, run_id: &str, from_seq: u64) -> Result<Vec<(u64, MetricRecord)>> {
        let prefix = run_prefix(run_id);
        let wanted = step_key(run_id, from_seq);
        let end = format!("{run_id}0"); // '0' sorts right after '/', ending the run's range
        // The batch holding `from_seq` starts at or before it.
        let start = match self.metrics.range(prefix.as_bytes()..=wanted.as_bytes()).next_back() {
            Some(kv) => kv?.0.to_vec(),
            None => wanted.into_bytes(),
        };
        let mut out = vec![];
        for kv in self.metrics.range(start.as_slice()..end.as_bytes()) {
            let (k, v) = kv?;
            let first: u64 = std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    tree: "metrics",
                    key: String::from_utf8_lossy(&k).into_owned(),
                    message: "bad sequence number".into(),
                })?;
            // Schema 1 stored one point per key; schema 2 one batch per report.
            let points: Vec<MetricRecord> = if v.first() == Some(&b'[') {
                decode("metrics", &k, &v)?
            } else {
                vec![decode("metrics", &k, &v)?]
            };
            for (i, point) in points.into_iter().enumerate() {
                let seq = first + i as u64;
                if seq >= from_seq {
                    out.push((seq, point));
                }
            }
        }
        Ok(out)
    }

    /// The newest step a report recorded for the run, when newer than its record says.
    pub(super) fn reported_step(&self, run_id: &str) -> Result<Option<u64>> {
        Ok(self.progress.get(run_id)?.as_deref().map(be_u64))
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
    use crate::records::MetricRecord;

    fn point(step: u64) -> MetricRecord {
        MetricRecord {
            rank: 0,
            step,
            name: "train/loss".into(),
            value: step as f64,
            unix_ms: 0,
        }
    }

    #[test]
    fn metric_sequence_numbers_stay_dense_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.append_metrics("run-000001", &[point(1), point(2)]).unwrap(), 2);
            assert_eq!(store.append_metrics("run-000002", &[point(9)]).unwrap(), 1);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.append_metrics("run-000001", &[point(3)]).unwrap(), 3);
        let seqs: Vec<(u64, u64)> = store
            .metrics_from("run-000001", 0)
            .unwrap()
            .into_iter()
            .map(|(seq, m)| (seq, m.step))
            .collect();
        assert_eq!(seqs, [(0, 1), (1, 2), (2, 3)]);
        assert_eq!(store.metrics_from("run-000001", 2).unwrap().len(), 1);
        let cluster = store.cluster_id().to_string();
        assert_eq!(store.next_run_id().unwrap().1, format!("run-000001-{cluster}"));
        assert_eq!(store.next_run_id().unwrap().1, format!("run-000002-{cluster}"));
    }

    #[test]
    fn stores_get_distinct_cluster_ids_that_survive_reopen() {
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
            err.contains("newer voxelfleet") && err.contains("schema version 3"),
            "{err}"
        );
    }

    #[test]
    fn a_report_lands_whole_and_returns_every_ranks_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sum = |rank, sha: &str| ChecksumReport {
            step: 4,
            rank,
            attempt: 1,
            sha256: sha.into(),
        };
        let report = |sum| PreparedReport::new("r", None, &[point(4)], vec![sum], 2);
        let Recorded { known, .. } = store.record_report_now(report(sum(1, "bb"))).unwrap();
        assert_eq!(known, [(4, vec![(1, "bb".to_string())])]);
        let Recorded { next_seq: next, known } = store.record_report_now(report(sum(0, "aa"))).unwrap();
        assert_eq!(next, 2);
        assert_eq!(known, [(4, vec![(0, "aa".to_string()), (1, "bb".to_string())])]);
        assert_eq!(store.checksums("r").unwrap().len(), 2);
    }

    #[test]
    fn only_the_newest_value_of_each_metric_is_kept_as_latest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append_metrics("r", &[point(3), point(5), point(4)]).unwrap();
        let from_inside: Vec<u64> = store
            .metrics_from("r", 1)
            .unwrap()
            .iter()
            .map(|(seq, m)| seq * 10 + m.step)
            .collect();
        assert_eq!(from_inside, [15, 24], "a read can start inside a report's batch");
        store.append_metrics("r", &[point(2)]).unwrap(); // late and older: not the latest
        let mut lr = point(6);
        lr.name = "train/lr".into();
        store.append_metrics("r", &[lr]).unwrap();
        let latest: Vec<(String, u64)> = store
            .latest_metrics("r")
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.step))
            .collect();
        assert_eq!(latest, [("train/loss".to_string(), 5), ("train/lr".to_string(), 6)]);
        assert!(store.latest_metrics("r2").unwrap().is_empty());
    }
}
