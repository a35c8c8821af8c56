//! Scanned datasets and their quarantine, as the CLI and workers reach them: scanning a URL into
//! a dataset record, resolving a run's dataset by name or URL, and recording the cases a worker
//! could not read so that later runs skip them until an operator clears them.

use tokio::time::Instant;

use data::scan::ScanProgress;
use protocol::pb;

use super::{CoordError, Coordinator, Result};
use crate::records::*;
use crate::store::ScanChange;

/// Longest error text kept per quarantined case.
const MAX_ERROR_CHARS: usize = 4000;

/// What one scan found and changed.
#[derive(Debug, Clone)]
pub struct ScanOutcome {
    pub record: DatasetRecord,
    pub change: ScanChange,
    pub quarantined: u32,
    pub seconds: f64,
    /// What the operator should know about this scan, one sentence each.
    pub notes: Vec<String>,
}

/// A dataset name from its URL: the last path segment (`s3://b/AbdomenAtlas1.1/` →
/// `AbdomenAtlas1.1`), with characters an id may not hold replaced by `_`.
pub fn name_from_url(url: &str) -> String {
    let path = match url::Url::parse(url) {
        Ok(u) if u.scheme().len() > 1 => {
            let p = u.path().trim_matches('/').to_string();
            if p.is_empty() {
                u.host_str().unwrap_or_default().to_string()
            } else {
                p
            }
        }
        _ => url.trim_end_matches(['/', '\\']).to_string(),
    };
    let last = path.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut name: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    name = name.trim_start_matches('.').replace("..", "_");
    if name.is_empty() { "dataset".into() } else { name }
}

impl Coordinator {
    /// Lists `url` into a dataset record named `name` (or a name derived from the URL, or the
    /// name it was scanned under before), quarantining case folders without a CT.
    pub async fn scan_dataset(
        &self,
        url: &str,
        name: Option<&str>,
        progress: &mut (dyn FnMut(ScanProgress) + Send),
    ) -> Result<ScanOutcome> {
        let _one_at_a_time = self.submitting.lock().await;
        self.scan_locked(url, name, progress).await
    }

    /// `scan_dataset` for a caller that holds `submitting`.
    pub(super) async fn scan_locked(
        &self,
        url: &str,
        name: Option<&str>,
        progress: &mut (dyn FnMut(ScanProgress) + Send),
    ) -> Result<ScanOutcome> {
        let rejected = |m: String| CoordError::Rejected(format!("dataset {url}: {m}"));
        if url.trim().is_empty() {
            return Err(CoordError::Rejected("dataset URL must not be empty".into()));
        }
        let name = self.name_for_scan(url, name)?;
        crate::probe::probe_dataset(url)
            .await
            .map_err(|e| CoordError::Rejected(e.to_string()))?;
        let started = Instant::now();
        let (store, root) = data::store_from_url(url).map_err(|e| rejected(e.to_string()))?;
        let scan = data::scan_dataset(store.as_ref(), &root, progress)
            .await
            .map_err(|e| rejected(e.to_string()))?;
        if scan.cases.is_empty() {
            let ignored: Vec<String> = scan
                .ignored
                .iter()
                .take(5)
                .map(|i| format!("{} ({})", i.name, i.reason))
                .collect();
            return Err(rejected(format!(
                "no case folders (BDMAP_xxxxxxxx/ct.nii.gz) among {} objects{}",
                scan.objects,
                if ignored.is_empty() {
                    String::new()
                } else {
                    format!("; ignored: {}", ignored.join(", "))
                }
            )));
        }
        let record = DatasetRecord {
            name,
            url: url.to_string(),
            scanned_unix_ms: now_unix_ms(),
            cases: scan.cases,
            ignored: scan.ignored,
            objects: scan.objects,
        };
        let change = self.store.put_scan(&record)?;
        self.store.durable().await?;
        let quarantined = self.store.quarantined(url)?.len() as u32;
        tracing::info!(dataset = %record.name, url, cases = record.cases.len(), missing_ct = record.missing_ct().len(), "dataset scanned");
        let notes = self.frozen_note(&record, &change)?.into_iter().collect();
        Ok(ScanOutcome {
            record,
            change,
            quarantined,
            seconds: started.elapsed().as_secs_f64(),
            notes,
        })
    }

    /// Cases a rescan added are in no frozen manifest: runs over an order_seed that already has
    /// one keep its order (that is what makes them reproducible and resumable) and never read
    /// them. Re-freezing that order in place would change it under the runs that use it, so
    /// the way to the new cases is an order_seed without a manifest yet.
    fn frozen_note(&self, record: &DatasetRecord, change: &ScanChange) -> Result<Option<String>> {
        if change.added.is_empty() {
            return Ok(None);
        }
        let mut seeds: Vec<u64> = self
            .store
            .manifests()?
            .into_iter()
            .filter(|m| m.dataset_url == record.url && !m.subset)
            .map(|m| m.order_seed)
            .collect();
        if seeds.is_empty() {
            return Ok(None);
        }
        seeds.sort_unstable();
        seeds.dedup();
        let listed: Vec<String> = seeds.iter().map(u64::to_string).collect();
        let unused = (0..).find(|s| !seeds.contains(s)).unwrap_or(u64::MAX);
        Ok(Some(format!(
            "the {} added case(s) are not in the frozen manifest(s) of {} (dataset.order_seed {}):              runs over those order_seeds, new ones included, keep their frozen case order and will              not read them. To train on them, submit with a dataset.order_seed that has no manifest              yet (e.g. order_seed = {unused}); `coordinator dataset manifests` lists the frozen ones",
            change.added.len(),
            record.name,
            listed.join(", "),
        )))
    }

    /// The name a scan of `url` stores under: the one asked for (which must not name another
    /// URL), else the name the URL was scanned under, else one derived from the URL that no
    /// other URL holds.
    fn name_for_scan(&self, url: &str, asked: Option<&str>) -> Result<String> {
        let existing = self.store.dataset_by_url(url)?;
        if let Some(name) = asked {
            protocol::ids::validate_id(name, "dataset name").map_err(CoordError::Rejected)?;
            if let Some(held) = self.store.dataset(name)?.filter(|d| d.url != url) {
                return Err(CoordError::Rejected(format!(
                    "dataset name `{name}` already names {}; choose another --name",
                    held.url
                )));
            }
            if let Some(other) = existing.filter(|d| d.name != name) {
                return Err(CoordError::Rejected(format!(
                    "{url} is already scanned as `{}`; rescan it under that name",
                    other.name
                )));
            }
            return Ok(name.to_string());
        }
        if let Some(d) = existing {
            return Ok(d.name);
        }
        let base = name_from_url(url);
        let mut candidate = base.clone();
        for n in 2.. {
            match self.store.dataset(&candidate)? {
                Some(d) if d.url != url => candidate = format!("{base}-{n}"),
                _ => break,
            }
        }
        Ok(candidate)
    }

    /// A dataset by name, or by the URL it was scanned from.
    pub fn find_dataset(&self, name_or_url: &str) -> Result<DatasetRecord> {
        if let Some(d) = self.store.dataset(name_or_url)? {
            return Ok(d);
        }
        self.store
            .dataset_by_url(name_or_url)?
            .ok_or_else(|| CoordError::NotFound {
                what: "dataset",
                id: name_or_url.into(),
            })
    }

    /// Every scanned dataset with its quarantine count.
    pub fn datasets(&self) -> Result<Vec<(DatasetRecord, u32)>> {
        self.store
            .datasets()?
            .into_iter()
            .map(|d| {
                let held = self.store.quarantined(&d.url)?.len() as u32;
                Ok((d, held))
            })
            .collect()
    }

    /// The quarantine of one dataset (name or URL), or of all, with each dataset's name.
    pub fn quarantine(&self, dataset: Option<&str>) -> Result<Vec<(String, QuarantineRecord)>> {
        let entries = match dataset {
            Some(d) => self.store.quarantined(&self.quarantine_url(d)?)?,
            None => self.store.all_quarantined()?,
        };
        entries
            .into_iter()
            .map(|q| {
                let name = self
                    .store
                    .dataset_by_url(&q.dataset_url)?
                    .map(|d| d.name)
                    .unwrap_or_default();
                Ok((name, q))
            })
            .collect()
    }

    /// Clears a dataset's quarantine, or one case of it; later runs use the cases again. A case
    /// the last scan found without a CT stays: no run could read it, and clearing it would only
    /// move the failure into a run. Asked for by name, it is refused and the error says why;
    /// clearing all passes over it (the CLI lists what stays).
    pub async fn clear_quarantine(&self, dataset: &str, case_id: Option<&str>) -> Result<u32> {
        let url = self.quarantine_url(dataset)?;
        let no_ct: std::collections::HashSet<String> = self
            .store
            .dataset_by_url(&url)?
            .map(|d| d.missing_ct())
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(id) = case_id.filter(|id| no_ct.contains(*id)) {
            return Err(CoordError::Rejected(format!(
                "case {id} of {dataset} has no ct.nii.gz in the last scan of {url}, so no run can                  read it and clearing it would not make it usable: add its ct.nii.gz and rescan                  (`coordinator dataset scan {url}`), which lifts this quarantine by itself"
            )));
        }
        let cleared = match case_id {
            Some(id) => self.store.clear_quarantine(&url, Some(id))?,
            None => {
                let mut cleared = 0;
                for q in self.store.quarantined(&url)? {
                    if !no_ct.contains(&q.case_id) {
                        cleared += self.store.clear_quarantine(&url, Some(&q.case_id))?;
                    }
                }
                cleared
            }
        };
        self.store.durable().await?;
        if let (Some(id), 0) = (case_id, cleared) {
            return Err(CoordError::NotFound {
                what: "quarantined case",
                id: format!("{id} of {dataset}"),
            });
        }
        tracing::info!(dataset, cleared, "quarantine cleared");
        Ok(cleared)
    }

    /// A dataset's URL by name or URL; a URL with quarantine entries but no scan also counts.
    fn quarantine_url(&self, dataset: &str) -> Result<String> {
        match self.find_dataset(dataset) {
            Ok(d) => Ok(d.url),
            Err(CoordError::NotFound { .. }) if !self.store.quarantined(dataset)?.is_empty() => Ok(dataset.into()),
            Err(e) => Err(e),
        }
    }

    /// A worker could not read `case_id` of `run_id`'s dataset: quarantine it (the first report
    /// wins) and note it in the run's events. True when it was not quarantined before.
    pub async fn report_bad_case(&self, req: &pb::ReportBadCaseRequest) -> Result<bool> {
        let (run_id, worker_id, case_id) = (req.run_id.as_str(), req.worker_id.as_str(), req.case_id.as_str());
        let run = self.get_run(run_id)?;
        // Quarantine outlives the run and changes what every later run trains on: only a rank
        // of the run's current attempt, which has just read the case, may report it.
        if let Err(why) = self.check_member(&run, worker_id, req.rank, req.attempt) {
            tracing::warn!(
                run = run_id,
                worker = worker_id,
                case = case_id,
                "refused a bad-case report: {why}"
            );
            return Err(CoordError::Rejected(format!(
                "refused to quarantine case {case_id}: {why}; only a rank of the run's current attempt may report its cases"
            )));
        }
        let manifest = self.manifest(&run.manifest_id)?;
        if !manifest.cases.iter().any(|c| c == case_id) {
            return Err(CoordError::Rejected(format!(
                "case {case_id} is not in run {run_id}'s manifest {}",
                manifest.id
            )));
        }
        let mut error = req.error.clone();
        if let Some((cut, _)) = error.char_indices().nth(MAX_ERROR_CHARS) {
            error.truncate(cut);
            error.push_str(" [truncated]");
        }
        let entry = QuarantineRecord {
            dataset_url: manifest.dataset_url.clone(),
            case_id: case_id.to_string(),
            error: error.clone(),
            unix_ms: now_unix_ms(),
            run_id: run_id.to_string(),
            worker_id: worker_id.to_string(),
        };
        let event = RunEvent::new(
            "quarantined",
            run.step,
            format!("case {case_id} quarantined (reported by {worker_id}): {error}"),
        );
        let new = self.store.quarantine_case(&entry, &event)?;
        self.store.durable().await?;
        if new {
            tracing::warn!(run = run_id, worker = worker_id, case = case_id, %error, "case quarantined");
        }
        Ok(new)
    }

    /// The cases of `manifest` quarantined for its dataset now, in manifest order.
    pub(super) fn quarantined_in(&self, manifest: &ManifestRecord) -> Result<Vec<String>> {
        let held: std::collections::HashSet<String> = self
            .store
            .quarantined(&manifest.dataset_url)?
            .into_iter()
            .map(|q| q.case_id)
            .collect();
        Ok(manifest.cases.iter().filter(|c| held.contains(*c)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::name_from_url;

    #[test]
    fn names_come_from_the_last_path_segment() {
        assert_eq!(name_from_url("s3://bucket/AbdomenAtlas1.1/"), "AbdomenAtlas1.1");
        assert_eq!(name_from_url("s3://bucket"), "bucket");
        assert_eq!(name_from_url("file:///data/my%20atlas"), "my_20atlas");
        assert_eq!(name_from_url("/tmp/x/phantoms/"), "phantoms");
        assert_eq!(name_from_url("relative/.hidden"), "hidden");
        assert_eq!(name_from_url("/"), "dataset");
        for url in ["s3://b/a b/", "/x/..", "gs://b/é"] {
            let name = name_from_url(url);
            assert!(protocol::ids::validate_id(&name, "n").is_ok(), "{url} -> {name}");
        }
    }
}
