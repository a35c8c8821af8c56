//! What runs are made from: frozen dataset manifests and sweeps, written together with the runs
//! they create, and the migration that moved schema 1's per-run case lists into manifests.

use sha2::{Digest, Sha256};
use sled::Transactional;

use super::*;
use crate::records::{ManifestRecord, SweepRecord};

/// `<dataset url>\n<order seed>`: a prefix scan over one URL finds every seed's manifest of it.
fn index_key(url: &str, order_seed: u64) -> String {
    format!("{url}\n{order_seed:020}")
}

/// Content address of a manifest: the same listing in the same order gets the same id.
pub fn manifest_id(dataset_url: &str, order_seed: u64, cases: &[String]) -> String {
    let mut hash = Sha256::new();
    hash.update(dataset_url.as_bytes());
    hash.update(order_seed.to_be_bytes());
    for case in cases {
        hash.update(case.as_bytes());
        hash.update([0]);
    }
    format!("m-{}", &hex::encode(hash.finalize())[..16])
}

impl Store {
    pub fn manifest(&self, id: &str) -> Result<Option<ManifestRecord>> {
        get(&self.manifests, "manifests", id)
    }

    /// The manifest frozen for `dataset_url` under `order_seed`, if any.
    pub fn manifest_for(&self, dataset_url: &str, order_seed: u64) -> Result<Option<ManifestRecord>> {
        match self.manifest_index.get(index_key(dataset_url, order_seed))? {
            Some(id) => self.manifest(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Any manifest of `dataset_url`, under whichever seed: its cases are the frozen listing, so
    /// a new seed reorders them instead of listing the bucket again.
    pub fn any_manifest_of(&self, dataset_url: &str) -> Result<Option<ManifestRecord>> {
        match self.manifest_index.scan_prefix(format!("{dataset_url}\n")).next() {
            Some(kv) => self.manifest(&String::from_utf8_lossy(&kv?.1)),
            None => Ok(None),
        }
    }

    pub fn manifests(&self) -> Result<Vec<ManifestRecord>> {
        scan(self.manifests.iter(), "manifests")
    }

    pub fn sweeps(&self) -> Result<Vec<SweepRecord>> {
        scan(self.sweeps.iter(), "sweeps")
    }

    /// Stores new runs with their `submitted` events, the manifests they froze and the sweep that
    /// made them, all in one transaction: a sweep is queued whole or not at all. As every write
    /// of a run, it writes the events of the transitions the run carries too.
    pub fn put_submission(
        &self,
        manifests: &[ManifestRecord],
        sweep: Option<&SweepRecord>,
        runs: &mut [(RunRecord, RunEvent)],
    ) -> Result<()> {
        let _io = self.writing();
        // A case list's subset is found through its runs, never by URL and seed.
        let manifest_bytes: Vec<(String, Option<String>, Vec<u8>)> = manifests
            .iter()
            .map(|m| {
                let key = (!m.subset).then(|| index_key(&m.dataset_url, m.order_seed));
                (m.id.clone(), key, encode(m))
            })
            .collect();
        let sweep_bytes = sweep.map(|s| (s.id.clone(), encode(s)));
        let run_bytes: Vec<(String, Vec<u8>, Vec<Vec<u8>>)> = runs
            .iter()
            .map(|(r, e)| (r.id.clone(), encode(r), encode_events(std::slice::from_ref(e), r)))
            .collect();
        (
            &self.manifests,
            &self.manifest_index,
            &self.sweeps,
            &self.runs,
            &self.events,
            &self.meta,
        )
            .transaction(|(mans, index, sweeps, rs, evs, meta)| {
                for (id, key, value) in &manifest_bytes {
                    mans.insert(id.as_bytes(), value.clone())?;
                    if let Some(key) = key {
                        index.insert(key.as_bytes(), id.as_bytes())?;
                    }
                }
                if let Some((id, value)) = &sweep_bytes {
                    sweeps.insert(id.as_bytes(), value.clone())?;
                }
                for (id, run, events) in &run_bytes {
                    rs.insert(id.as_bytes(), run.clone())?;
                    append_events(evs, meta, id, events)?;
                }
                Ok(())
            })
            .map_err(storage_error)?;
        for (run, _) in runs {
            run.events_written();
        }
        Ok(())
    }

    /// Schema 1 copied the case lists into every run. Each such run gets a manifest holding its
    /// own lists (training cases, then held-out ones) and keeps only counts; the run counter in
    /// its id becomes its queue order.
    pub(super) fn migrate_case_lists(&self) -> Result<()> {
        for mut run in self.runs()? {
            if run.seq == 0 {
                run.seq = run
                    .id
                    .strip_prefix("run-")
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
            if run.manifest_id.is_empty() && !run.legacy_train_cases.is_empty() {
                let mut cases = std::mem::take(&mut run.legacy_train_cases);
                let eval = std::mem::take(&mut run.legacy_eval_cases);
                run.train_count = cases.len() as u32;
                run.eval_count = eval.len() as u32;
                cases.extend(eval);
                let url = format!("schema-1 run {}", run.id);
                let manifest = ManifestRecord {
                    id: manifest_id(&url, 0, &cases),
                    dataset_url: url,
                    order_seed: 0,
                    cases,
                    frozen_unix_ms: run.submitted_unix_ms,
                    subset: false,
                };
                self.manifests.insert(manifest.id.as_bytes(), encode(&manifest))?;
                run.manifest_id = manifest.id;
            }
            self.runs.insert(run.id.as_bytes(), encode(&run))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_1_store_moves_case_lists_into_manifests() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let run = r#"{"id":"run-000007-abcd1234","name":"demo","spec_toml":"","state":"Completed",
                "world_size":2,"total_steps":8,"step":8,"message":"","submitted_unix_ms":1,
                "updated_unix_ms":2,"workers":[],"started_ranks":[],"train_cases":["a","b"],
                "eval_cases":["c"],"artifacts_url":"/x","finished":{},"final_checkpoint":null}"#;
            db.open_tree("runs")
                .unwrap()
                .insert("run-000007-abcd1234", run)
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("schema_version", &1u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let run = store.run("run-000007-abcd1234").unwrap().unwrap();
        assert_eq!((run.train_count, run.eval_count, run.seq), (2, 1, 7));
        let manifest = store.manifest(&run.manifest_id).unwrap().unwrap();
        assert_eq!(manifest.cases, ["a", "b", "c"]);
        assert_eq!(manifest.cases[..run.train_count as usize], ["a", "b"]);
        // Written back without the lists.
        let raw = store.runs.get("run-000007-abcd1234").unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("train_cases"));
    }

    #[test]
    fn manifests_are_found_by_url_and_seed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cases = vec!["x".to_string(), "y".to_string()];
        let m = ManifestRecord {
            id: manifest_id("/data", 3, &cases),
            dataset_url: "/data".into(),
            order_seed: 3,
            cases,
            frozen_unix_ms: 0,
            subset: false,
        };
        store.put_submission(std::slice::from_ref(&m), None, &mut []).unwrap();
        assert_eq!(store.manifest_for("/data", 3).unwrap(), Some(m.clone()));
        assert_eq!(store.manifest_for("/data", 4).unwrap(), None);
        assert_eq!(store.any_manifest_of("/data").unwrap(), Some(m));
        assert_eq!(store.any_manifest_of("/dat").unwrap(), None);
    }
}
