//! New work: a single run or a whole sweep, each validated whole (spec, frozen manifest, case
//! counts) before anything is stored, then written in one transaction. Also the sweep-wide
//! actions: listing, cancel and resume of every child.

use std::collections::{BTreeMap, HashMap, HashSet};

use protocol::spec::RunSpec;

use super::model::count_states;
use super::{CoordError, Coordinator, Result};
use crate::manifest;
use crate::records::*;
use crate::sweep::{SweepFile, literal};

/// A sweep with its children as they are now.
#[derive(Debug, Clone)]
pub struct SweepView {
    pub sweep: SweepRecord,
    pub states: BTreeMap<String, u32>,
    pub children: Vec<(SweepChildRecord, RunRecord)>,
}

/// What one submission has checked so far: the manifests it froze or found (and whether they are
/// new), and the locations it probed. A sweep's children share them.
#[derive(Default)]
struct Checked {
    manifests: HashMap<(String, u64), (ManifestRecord, bool)>,
    probed: HashSet<String>,
    /// Datasets resolved so far, by the name or URL the spec gave.
    datasets: HashMap<String, DatasetRecord>,
}

impl Checked {
    /// The manifests this submission froze, for the caller to store with its runs.
    fn new_manifests(self) -> Vec<ManifestRecord> {
        self.manifests
            .into_values()
            .filter(|(_, new)| *new)
            .map(|(m, _)| m)
            .collect()
    }
}

/// A run checked against its frozen manifest, ready to be stored.
struct Prepared {
    spec: RunSpec,
    manifest_id: String,
    dataset_name: String,
    /// Quarantined cases of the manifest at submit, skipped by the run.
    /// The dataset's quarantine when the run was submitted, sorted: the run's case slices are
    /// cut around it for its whole life (see `RunRecord::quarantined`).
    quarantined: Vec<String>,
    train_count: u32,
    eval_count: u32,
}

impl Coordinator {
    pub async fn submit(&self, spec_toml: &str, source_name: &str) -> Result<RunRecord> {
        let spec = RunSpec::from_toml(spec_toml, source_name)?;
        let _one_at_a_time = self.submitting.lock().await;
        let mut checked = Checked::default();
        let prepared = self.prepare(spec, source_name, &mut checked).await?;
        let run_id = {
            let mut m = self.lock();
            let (run, event) = self.new_run(prepared, None, format!("from {source_name}"))?;
            let id = run.id.clone();
            m.put_submission(&self.store, &checked.new_manifests(), None, vec![(run, event)])?;
            id
        };
        self.settle(&[], false).await?;
        self.schedule().await?;
        self.get_run(&run_id)
    }

    /// Expands a sweep file (base inlined) and queues every child under one sweep id, or, when
    /// any child is invalid, stores nothing and names the axis.
    pub async fn submit_sweep(&self, sweep_toml: &str, source_name: &str) -> Result<SweepView> {
        let file = SweepFile::parse(sweep_toml, source_name, |path| {
            Err(format!(
                "`{path}`: inline the base spec as a [base] table (the CLI does this)"
            ))
        })
        .map_err(|e| CoordError::Rejected(e.to_string()))?;
        let children = file
            .expand(source_name)
            .map_err(|e| CoordError::Rejected(e.to_string()))?;
        let _one_at_a_time = self.submitting.lock().await;
        // Manifests are frozen once per dataset and seed, shared by every child: their
        // training subsets are prefixes of one order, so they nest.
        let mut checked = Checked::default();
        let mut prepared = Vec::with_capacity(children.len());
        for child in children {
            let label: Vec<String> = file
                .axes
                .iter()
                .zip(&child.values)
                .map(|((k, _), v)| format!("{k} = {}", literal(v)))
                .collect();
            let source = format!("{source_name} ({})", label.join(", "));
            let values = child.values.iter().map(literal).collect();
            prepared.push((self.prepare(child.spec, &source, &mut checked).await?, values));
        }
        // What the children run at, which the base or an axis may set: with an axis, the
        // highest (the CLI shows such a sweep's priority as by axis).
        let priority = prepared.iter().map(|(p, _)| p.spec.priority).max().unwrap_or(0);
        let sweep_id = {
            let mut m = self.lock();
            let sweep_id = self.store.next_sweep_id()?;
            let mut runs = vec![];
            let mut records = vec![];
            for (p, values) in prepared {
                let (run, event) =
                    self.new_run(p, Some(&sweep_id), format!("from sweep {sweep_id} ({source_name})"))?;
                records.push(SweepChildRecord {
                    run_id: run.id.clone(),
                    values,
                });
                runs.push((run, event));
            }
            let sweep = SweepRecord {
                id: sweep_id.clone(),
                name: file.name.clone(),
                priority,
                source_name: source_name.to_string(),
                sweep_toml: file.to_toml(),
                axes: file.axis_keys(),
                children: records,
                submitted_unix_ms: now_unix_ms(),
            };
            m.put_submission(&self.store, &checked.new_manifests(), Some(sweep), runs)?;
            sweep_id
        };
        self.settle(&[], false).await?;
        self.schedule().await?;
        self.sweep(&sweep_id)
    }

    /// Checks a spec against the world: its dataset (resolved by name, or by URL and scanned
    /// first when no scan of it exists), its artifacts location (probed once per submission),
    /// and its manifest (frozen now if new, kept in `checked` until the caller stores it; a
    /// case-id list becomes a subset manifest), which must hold the cases it asks for once the
    /// quarantined ones are skipped, and at least one per rank. The spec is stored with the
    /// dataset's URL in place of its name, so workers read the URL.
    async fn prepare(&self, mut spec: RunSpec, source_name: &str, checked: &mut Checked) -> Result<Prepared> {
        let rejected = |e: String| CoordError::Rejected(format!("{source_name}: {e}"));
        if let Some(list) = &spec.dataset.case_list {
            return Err(rejected(format!(
                "field `dataset.case_list`: `{list}` is a file on the client; the CLI reads it and \
                 sends its ids as dataset.cases (the coordinator reads no client files)"
            )));
        }
        let dataset = self.dataset_for(&spec, source_name, checked).await?;
        spec.dataset.url = dataset.url.clone();
        spec.dataset.name = None;
        if checked.probed.insert(format!("dataset {}", spec.dataset.url)) {
            crate::probe::probe_dataset(&spec.dataset.url)
                .await
                .map_err(|e| rejected(e.to_string()))?;
        }
        if checked.probed.insert(format!("artifacts {}", spec.artifacts.url)) {
            crate::probe::probe_artifacts(&spec.artifacts.url)
                .await
                .map_err(|e| rejected(e.to_string()))?;
        }
        // Keyed by the whole [model] table: the probe checks the architecture and its sizes.
        if let Some(url) = spec.model.init_from()
            && checked.probed.insert(format!("init_from {:?}", spec.model))
        {
            crate::probe::probe_init_from(url, &spec.model)
                .await
                .map_err(|e| rejected(e.to_string()))?;
        }
        let key = (spec.dataset.url.clone(), spec.dataset.order_seed);
        if !checked.manifests.contains_key(&key) {
            let found = manifest::freeze(&self.store, &dataset, key.1)?;
            checked.manifests.insert(key.clone(), found);
        }
        let mut manifest = checked.manifests[&key].0.clone();
        if let Some(ids) = &spec.dataset.cases {
            let sub = manifest::subset(&manifest, ids).map_err(|e| rejected(e.to_string()))?;
            if sub.subset {
                let sub_key = (sub.id.clone(), key.1);
                if let std::collections::hash_map::Entry::Vacant(slot) = checked.manifests.entry(sub_key) {
                    let new = self.store.manifest(&sub.id)?.is_none();
                    slot.insert((sub.clone(), new));
                }
            }
            manifest = sub;
        }
        let quarantined: HashSet<String> = self.quarantined_in(&manifest)?.into_iter().collect();
        let (train_count, eval_count) =
            manifest::split_counts(&manifest, &spec, &quarantined).map_err(|e| rejected(e.to_string()))?;
        if train_count < spec.world_size {
            return Err(rejected(format!(
                "field `world_size`: {} ranks but only {train_count} training cases",
                spec.world_size
            )));
        }
        Ok(Prepared {
            manifest_id: manifest.id.clone(),
            dataset_name: dataset.name,
            quarantined: {
                let mut ids: Vec<String> = quarantined.into_iter().collect();
                ids.sort();
                ids
            },
            spec,
            train_count,
            eval_count,
        })
    }

    /// The scanned dataset a spec names: by `dataset.name`, or by `dataset.url`, scanning the
    /// URL first when it was never scanned.
    async fn dataset_for(&self, spec: &RunSpec, source_name: &str, checked: &mut Checked) -> Result<DatasetRecord> {
        let rejected = |e: String| CoordError::Rejected(format!("{source_name}: {e}"));
        let wanted = spec.dataset.name.clone().unwrap_or_else(|| spec.dataset.url.clone());
        if let Some(d) = checked.datasets.get(&wanted) {
            return Ok(d.clone());
        }
        let dataset = match &spec.dataset.name {
            Some(name) => self.store.dataset(name)?.ok_or_else(|| {
                let known: Vec<String> = self
                    .store
                    .datasets()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|d| d.name)
                    .collect();
                rejected(format!(
                    "field `dataset.name`: no dataset `{name}` is scanned (known: {}); run \
                     `coordinator dataset scan URL --name {name}` first",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?,
            None => match self.store.dataset_by_url(&spec.dataset.url)? {
                Some(d) => d,
                None => {
                    let outcome = self
                        .scan_locked(&spec.dataset.url, None, &mut |_| {})
                        .await
                        .map_err(|e| rejected(format!("field `dataset.url`: {e}")))?;
                    let missing = outcome.record.missing_ct();
                    if !missing.is_empty() {
                        tracing::warn!(dataset = %outcome.record.name, missing_ct = ?missing, "scanned at submit: case folders without ct.nii.gz are quarantined");
                    }
                    outcome.record
                }
            },
        };
        checked.datasets.insert(wanted, dataset.clone());
        Ok(dataset)
    }

    fn new_run(&self, p: Prepared, sweep_id: Option<&str>, from: String) -> Result<(RunRecord, RunEvent)> {
        let (seq, id) = self.store.next_run_id()?;
        let spec = p.spec;
        let mut run = RunRecord::submitted(id, seq, &spec, sweep_id.map(str::to_string));
        run.manifest_id = p.manifest_id;
        run.train_count = p.train_count;
        run.eval_count = p.eval_count;
        run.quarantined = p.quarantined.clone();
        let event = RunEvent::new(
            "submitted",
            0,
            format!(
                "{from}, {} workers, priority {}, dataset {}, {} training cases{}",
                spec.world_size,
                spec.priority,
                p.dataset_name,
                p.train_count,
                match p.quarantined.len() {
                    0 => String::new(),
                    n => format!(" ({n} quarantined cases skipped)"),
                }
            ),
        );
        Ok((run, event))
    }

    pub fn sweep(&self, sweep_id: &str) -> Result<SweepView> {
        let m = self.lock();
        let sweep = m.sweeps.get(sweep_id).cloned().ok_or_else(|| CoordError::NotFound {
            what: "sweep",
            id: sweep_id.into(),
        })?;
        let children: Vec<(SweepChildRecord, RunRecord)> = sweep
            .children
            .iter()
            .filter_map(|c| m.run(&c.run_id).ok().map(|r| (c.clone(), r.clone())))
            .collect();
        Ok(SweepView {
            states: count_states(children.iter().map(|(_, r)| r)),
            sweep,
            children,
        })
    }

    pub fn sweeps(&self) -> Vec<SweepView> {
        let ids: Vec<String> = self.lock().sweeps.keys().cloned().collect();
        ids.iter().filter_map(|id| self.sweep(id).ok()).collect()
    }

    /// Cancels every child that has not ended; one line per child says what happened.
    pub async fn cancel_sweep(&self, sweep_id: &str) -> Result<(SweepView, Vec<(String, bool, String)>)> {
        let view = self.sweep(sweep_id)?;
        let mut results = vec![];
        for (_, run) in &view.children {
            let result = match self.cancel(&run.id).await {
                Ok(_) => (run.id.clone(), true, "cancelled".to_string()),
                Err(e) => (run.id.clone(), false, e.to_string()),
            };
            results.push(result);
        }
        Ok((self.sweep(sweep_id)?, results))
    }

    /// Resumes every child that can be resumed (Paused, Interrupted, Failed or Cancelled with a
    /// usable checkpoint); the others are listed with the reason.
    pub async fn resume_sweep(&self, sweep_id: &str) -> Result<(SweepView, Vec<(String, bool, String)>)> {
        let view = self.sweep(sweep_id)?;
        let mut results = vec![];
        for (_, run) in &view.children {
            let result = if !run.state().is_resumable() {
                (run.id.clone(), false, format!("left alone: {}", run.state()))
            } else {
                match self.resume(&run.id, None, false).await {
                    Ok(r) => (run.id.clone(), true, r.message),
                    Err(e) => (run.id.clone(), false, e.to_string()),
                }
            };
            results.push(result);
        }
        Ok((self.sweep(sweep_id)?, results))
    }
}
