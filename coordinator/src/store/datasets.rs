//! Scanned datasets and the quarantine of cases no run should read. A scan replaces its
//! dataset's record and adjusts the quarantine in one transaction: case folders without a CT are
//! quarantined by the scan itself, and the scan's own entries are lifted when the CT is back.
//! Entries a worker reported stay until an operator clears them.

use std::collections::BTreeSet;

use sled::Transactional;

use super::*;
use crate::records::{DatasetRecord, QuarantineRecord, now_unix_ms};

/// Why a scan quarantines a case folder without a CT.
pub const MISSING_CT: &str = "missing ct.nii.gz";

fn quarantine_key(url: &str, case_id: &str) -> String {
    format!("{url}\n{case_id}")
}

fn quarantine_prefix(url: &str) -> String {
    format!("{url}\n")
}

/// What a scan changed against the previous scan of the same name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanChange {
    pub rescanned: bool,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Newly quarantined by this scan (missing CT), and scan-made entries it lifted.
    pub quarantined: Vec<String>,
    pub lifted: Vec<String>,
}

impl Store {
    pub fn dataset(&self, name: &str) -> Result<Option<DatasetRecord>> {
        get(&self.datasets, "datasets", name)
    }

    pub fn dataset_by_url(&self, url: &str) -> Result<Option<DatasetRecord>> {
        match self.dataset_urls.get(url.as_bytes())? {
            Some(name) => self.dataset(&String::from_utf8_lossy(&name)),
            None => Ok(None),
        }
    }

    /// Every dataset, by name.
    pub fn datasets(&self) -> Result<Vec<DatasetRecord>> {
        scan(self.datasets.iter(), "datasets")
    }

    /// Stores a scan under its name (replacing the previous one), quarantines its case folders
    /// without a CT, and lifts the scan-made entries of cases whose CT is back.
    pub fn put_scan(&self, record: &DatasetRecord) -> Result<ScanChange> {
        let previous = self.dataset(&record.name)?;
        let held = self.quarantined(&record.url)?;
        let _io = self.writing();
        let now: BTreeSet<&str> = record.cases.iter().map(|c| c.id.as_str()).collect();
        let mut change = ScanChange::default();
        if let Some(prev) = &previous {
            let before: BTreeSet<&str> = prev.cases.iter().map(|c| c.id.as_str()).collect();
            change.rescanned = true;
            change.added = now.difference(&before).map(|s| s.to_string()).collect();
            change.removed = before.difference(&now).map(|s| s.to_string()).collect();
        }
        let held_ids: BTreeSet<&str> = held.iter().map(|q| q.case_id.as_str()).collect();
        let mut puts = vec![];
        for case in record.cases.iter().filter(|c| c.ct_bytes.is_none()) {
            if !held_ids.contains(case.id.as_str()) {
                let entry = QuarantineRecord {
                    dataset_url: record.url.clone(),
                    case_id: case.id.clone(),
                    error: MISSING_CT.into(),
                    unix_ms: now_unix_ms(),
                    run_id: String::new(),
                    worker_id: String::new(),
                };
                puts.push((quarantine_key(&record.url, &case.id), encode(&entry)));
                change.quarantined.push(case.id.clone());
            }
        }
        let has_ct: BTreeSet<&str> = record
            .cases
            .iter()
            .filter(|c| c.ct_bytes.is_some())
            .map(|c| c.id.as_str())
            .collect();
        let mut lifts = vec![];
        for q in held
            .iter()
            .filter(|q| q.by_scan() && has_ct.contains(q.case_id.as_str()))
        {
            lifts.push(quarantine_key(&q.dataset_url, &q.case_id));
            change.lifted.push(q.case_id.clone());
        }
        let record_bytes = encode(record);
        (&self.datasets, &self.dataset_urls, &self.quarantine)
            .transaction(|(datasets, urls, quarantine)| {
                if let Some(prev) = previous.as_ref().filter(|p| p.url != record.url) {
                    urls.remove(prev.url.as_bytes())?;
                }
                datasets.insert(record.name.as_bytes(), record_bytes.clone())?;
                urls.insert(record.url.as_bytes(), record.name.as_bytes())?;
                for (k, v) in &puts {
                    quarantine.insert(k.as_bytes(), v.clone())?;
                }
                for k in &lifts {
                    quarantine.remove(k.as_bytes())?;
                }
                Ok(())
            })
            .map_err(storage_error)?;
        Ok(change)
    }

    /// The quarantined cases of one dataset URL, by case id.
    pub fn quarantined(&self, url: &str) -> Result<Vec<QuarantineRecord>> {
        scan(self.quarantine.scan_prefix(quarantine_prefix(url)), "quarantine")
    }

    /// Every quarantined case, by dataset URL and case id.
    pub fn all_quarantined(&self) -> Result<Vec<QuarantineRecord>> {
        scan(self.quarantine.iter(), "quarantine")
    }

    /// Quarantines a case a worker could not read, with an event on the reporting run; false
    /// (and nothing written) when it is already quarantined, so the first report's error stays.
    pub fn quarantine_case(&self, entry: &QuarantineRecord, event: &RunEvent) -> Result<bool> {
        let _io = self.writing();
        let key = quarantine_key(&entry.dataset_url, &entry.case_id);
        let (value, event) = (encode(entry), encode(event));
        let run_id = entry.run_id.clone();
        (&self.quarantine, &self.events, &self.meta)
            .transaction(|(quarantine, events, meta)| {
                if quarantine.get(key.as_bytes())?.is_some() {
                    return Ok(false);
                }
                quarantine.insert(key.as_bytes(), value.clone())?;
                append_events(events, meta, &run_id, std::slice::from_ref(&event))?;
                Ok(true)
            })
            .map_err(storage_error)
    }

    /// Clears one case of a dataset, or all of them; returns how many entries went.
    pub fn clear_quarantine(&self, url: &str, case_id: Option<&str>) -> Result<u32> {
        let keys: Vec<sled::IVec> = match case_id {
            Some(id) => {
                let key = quarantine_key(url, id);
                self.quarantine
                    .get(key.as_bytes())?
                    .map(|_| key.as_bytes().into())
                    .into_iter()
                    .collect()
            }
            None => self
                .quarantine
                .scan_prefix(quarantine_prefix(url))
                .keys()
                .collect::<std::result::Result<_, _>>()?,
        };
        let _io = self.writing();
        self.quarantine
            .transaction(|tree| {
                for k in &keys {
                    tree.remove(k)?;
                }
                Ok(())
            })
            .map_err(storage_error)?;
        Ok(keys.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use data::scan::ScannedCase;

    use super::*;

    fn case(id: &str, ct: bool) -> ScannedCase {
        ScannedCase {
            id: id.into(),
            ct_bytes: ct.then_some(10),
            masks: 0,
            mask_bytes: 0,
        }
    }

    fn record(cases: Vec<ScannedCase>) -> DatasetRecord {
        DatasetRecord {
            name: "atlas".into(),
            url: "/data/atlas".into(),
            scanned_unix_ms: 1,
            cases,
            ignored: vec![],
            objects: 0,
        }
    }

    #[test]
    fn scans_quarantine_missing_cts_and_lift_them_when_the_ct_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store
            .put_scan(&record(vec![case("a", true), case("b", false)]))
            .unwrap();
        assert_eq!(
            (first.rescanned, first.quarantined.clone()),
            (false, vec!["b".to_string()])
        );
        assert_eq!(store.dataset_by_url("/data/atlas").unwrap().unwrap().name, "atlas");
        let held = store.quarantined("/data/atlas").unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].case_id.as_str(), held[0].error.as_str()), ("b", MISSING_CT));
        assert!(store.quarantined("/data/atlas2").unwrap().is_empty());

        // A worker's report on `a`; a rescan where `b` has its CT again and `c` appeared.
        let reported = QuarantineRecord {
            dataset_url: "/data/atlas".into(),
            case_id: "a".into(),
            error: "truncated gzip".into(),
            unix_ms: 2,
            run_id: "run-1".into(),
            worker_id: "worker-1".into(),
        };
        let event = RunEvent::new("quarantined", 0, "a");
        assert!(store.quarantine_case(&reported, &event).unwrap());
        assert!(!store.quarantine_case(&reported, &event).unwrap(), "already held");
        assert_eq!(store.events("run-1").unwrap().len(), 1);
        let again = store
            .put_scan(&record(vec![case("a", true), case("b", true), case("c", true)]))
            .unwrap();
        assert!(again.rescanned);
        assert_eq!(
            (again.added, again.removed, again.lifted),
            (vec!["c".into()], vec![], vec!["b".into()])
        );
        let held = store.quarantined("/data/atlas").unwrap();
        assert_eq!(held, vec![reported]);

        assert_eq!(store.clear_quarantine("/data/atlas", Some("zzz")).unwrap(), 0);
        assert_eq!(store.clear_quarantine("/data/atlas", None).unwrap(), 1);
        assert!(store.all_quarantined().unwrap().is_empty());
    }
}
