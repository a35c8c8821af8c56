//! Turns a scanned dataset and a run spec into the run's cases: one seeded order of the whole
//! dataset, held-out cases from its end, and the training subset as a prefix of the rest. Prefixes
//! of one order make scaling-ablation subsets nest (the 21-case subset lies inside the 100-case
//! one), and the held-out set is the same for every subset size.
//!
//! The order is frozen once per dataset URL and seed, in the store, as a manifest, over EVERY
//! case folder the scan found, those without a CT included: they are quarantined and skipped,
//! but keep their place, so deleting one `ct.nii.gz` never shifts the order nested subsets rely
//! on. Later runs refer to the manifest by id and never list the bucket again, so a bucket that
//! changes between two submits cannot break the nesting. A case-id list becomes a subset
//! manifest: the listed cases in the full manifest's order, so subsets of one list nest too.
use std::collections::HashSet;

use protocol::spec::RunSpec;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::records::{DatasetRecord, ManifestRecord, now_unix_ms};
use crate::store::{Store, StoreError, manifest_id};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("dataset.url `{url}`: {message}")]
    Listing { url: String, message: String },
    #[error("field `{field}`: {message}")]
    TooFew { field: &'static str, message: String },
    #[error("field `dataset.cases`: {message}")]
    UnknownCases { message: String },
}

/// The manifest of `dataset` under `order_seed`: the stored one, or a new one (not yet stored)
/// in the seeded order of every case folder the scan found.
pub fn freeze(store: &Store, dataset: &DatasetRecord, order_seed: u64) -> Result<(ManifestRecord, bool), StoreError> {
    if let Some(m) = store.manifest_for(&dataset.url, order_seed)? {
        return Ok((m, false));
    }
    let cases = seeded_order(dataset.cases.iter().map(|c| c.id.clone()).collect(), order_seed);
    let manifest = ManifestRecord {
        id: manifest_id(&dataset.url, order_seed, &cases),
        dataset_url: dataset.url.clone(),
        order_seed,
        cases,
        frozen_unix_ms: now_unix_ms(),
        subset: false,
    };
    Ok((manifest, true))
}

/// The cases of a case-id list in the order of `full`. Ids `full` does not hold are an error
/// that names them (the first 20).
pub fn subset(full: &ManifestRecord, ids: &[String]) -> Result<ManifestRecord, ManifestError> {
    let known: HashSet<&str> = full.cases.iter().map(String::as_str).collect();
    let unknown: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !known.contains(id))
        .collect();
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(20).copied().collect();
        let more = if unknown.len() > shown.len() {
            format!(" and {} more", unknown.len() - shown.len())
        } else {
            String::new()
        };
        return Err(ManifestError::UnknownCases {
            message: format!(
                "{} listed case ids are not in the dataset {}: {}{more}",
                unknown.len(),
                full.dataset_url,
                shown.join(", ")
            ),
        });
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let cases: Vec<String> = full
        .cases
        .iter()
        .filter(|c| wanted.contains(c.as_str()))
        .cloned()
        .collect();
    Ok(ManifestRecord {
        id: manifest_id(&full.dataset_url, full.order_seed, &cases),
        dataset_url: full.dataset_url.clone(),
        order_seed: full.order_seed,
        subset: cases != full.cases,
        cases,
        frozen_unix_ms: now_unix_ms(),
    })
}

/// A listing in the seeded order every run over the dataset shares; the order the bucket listed
/// the cases in does not matter.
pub fn seeded_order(mut cases: Vec<String>, order_seed: u64) -> Vec<String> {
    cases.sort();
    cases.dedup();
    cases.shuffle(&mut ChaCha8Rng::seed_from_u64(order_seed));
    cases
}

/// How many of a manifest's cases `spec` trains on and holds out: (train, eval). Held-out cases
/// are the last `eval` positions of the order; training cases are the first good ones of the
/// rest, quarantined cases replaced by the next ones (workers slice them so, see
/// `data::split::slice_cases`). `train_cases = 0` takes every good case not held out.
pub fn split_counts(
    manifest: &ManifestRecord,
    spec: &RunSpec,
    quarantined: &HashSet<String>,
) -> Result<(u32, u32), ManifestError> {
    let total = manifest.cases.len();
    let n_eval = spec.dataset.eval_cases as usize;
    if n_eval >= total {
        return Err(ManifestError::TooFew {
            field: "dataset.eval_cases",
            message: format!("{n_eval} held-out cases leave none to train on; the dataset has {total}"),
        });
    }
    let region = &manifest.cases[..total - n_eval];
    let bad = region.iter().filter(|c| quarantined.contains(*c)).count();
    let left = region.len() - bad;
    let why = if bad > 0 {
        format!(" ({bad} of them quarantined; see `coordinator dataset quarantine`)")
    } else {
        String::new()
    };
    let n_train = match spec.dataset.train_cases as usize {
        0 if left == 0 => {
            return Err(ManifestError::TooFew {
                field: "dataset.train_cases",
                message: format!("no case is left to train on after {n_eval} held out{why}"),
            });
        }
        0 => left,
        n if n <= left => n,
        n => {
            return Err(ManifestError::TooFew {
                field: "dataset.train_cases",
                message: format!(
                    "asks for {n} cases but only {left} good ones are left of {} after {n_eval} held out{why}",
                    region.len()
                ),
            });
        }
    };
    Ok((n_train as u32, n_eval as u32))
}

#[cfg(test)]
mod tests {
    use data::split::{RunCases, slice_cases};

    use super::*;

    fn spec(train: u32, eval: u32) -> RunSpec {
        let text = format!(
            "name='t'\nworld_size=1\n[dataset]\nurl='/x'\ntrain_cases={train}\neval_cases={eval}\norder_seed=7\n\
             [model]\narch='unet'\ndepth=2\n[train]\nsteps=2\npatch=[8,8,8]\nlr=0.1\n[artifacts]\nurl='/y'\n"
        );
        RunSpec::from_toml(&text, "t").unwrap()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("BDMAP_{i:08}")).collect()
    }

    fn manifest(listing: Vec<String>, order_seed: u64) -> ManifestRecord {
        let cases = seeded_order(listing, order_seed);
        ManifestRecord {
            id: manifest_id("/x", order_seed, &cases),
            dataset_url: "/x".into(),
            order_seed,
            cases,
            frozen_unix_ms: 0,
            subset: false,
        }
    }

    /// A listing through the whole path: frozen order, counts, and the slices a worker takes.
    fn split_cases(listing: Vec<String>, spec: &RunSpec) -> Result<RunCases, ManifestError> {
        split_quarantined(listing, spec, &[])
    }

    fn split_quarantined(listing: Vec<String>, spec: &RunSpec, bad: &[String]) -> Result<RunCases, ManifestError> {
        let manifest = manifest(listing, spec.dataset.order_seed);
        let (train, eval) = split_counts(&manifest, spec, &bad.iter().cloned().collect())?;
        Ok(slice_cases(&manifest.cases, train, eval, bad).unwrap())
    }

    #[test]
    fn subsets_nest_and_share_one_held_out_set() {
        let small = split_cases(ids(50), &spec(5, 10)).unwrap();
        let large = split_cases(ids(50), &spec(20, 10)).unwrap();
        assert_eq!(small.eval, large.eval);
        assert_eq!(small.train[..], large.train[..5]);
        assert!(large.train.iter().all(|c| !large.eval.contains(c)));
        let all = split_cases(ids(50), &spec(0, 10)).unwrap();
        assert_eq!(all.train.len(), 40);
    }

    #[test]
    fn listing_order_does_not_matter() {
        let mut reversed = ids(30);
        reversed.reverse();
        assert_eq!(
            split_cases(reversed, &spec(0, 3)).unwrap(),
            split_cases(ids(30), &spec(0, 3)).unwrap()
        );
    }

    #[test]
    fn too_few_cases_names_the_field() {
        let err = split_cases(ids(10), &spec(9, 3)).unwrap_err().to_string();
        assert!(err.contains("dataset.train_cases"), "{err}");
        let err = split_cases(ids(3), &spec(0, 3)).unwrap_err().to_string();
        assert!(err.contains("dataset.eval_cases"), "{err}");
    }

    #[test]
    fn quarantined_cases_keep_their_place_and_are_replaced() {
        let order = manifest(ids(20), 7).cases;
        let bad = vec![order[1].clone(), order[4].clone()];
        let clean = split_cases(ids(20), &spec(6, 3)).unwrap();
        let run = split_quarantined(ids(20), &spec(6, 3), &bad).unwrap();
        assert_eq!(run.train.len(), 6, "the requested count of good cases");
        assert!(run.train.iter().all(|c| !bad.contains(c)));
        assert_eq!(run.eval, clean.eval);
        let expect: Vec<&String> = order[..17].iter().filter(|c| !bad.contains(c)).take(6).collect();
        assert_eq!(run.train.iter().collect::<Vec<_>>(), expect);
        let small = split_quarantined(ids(20), &spec(3, 3), &bad).unwrap();
        assert_eq!(small.train[..], run.train[..3], "subsets still nest");
        // 17 positions before the held-out set, 2 quarantined: 15 good.
        let all = split_quarantined(ids(20), &spec(0, 3), &bad).unwrap();
        assert_eq!(all.train.len(), 15);
        let err = split_quarantined(ids(20), &spec(16, 3), &bad).unwrap_err().to_string();
        assert!(
            err.contains("dataset.train_cases") && err.contains("2 of them quarantined"),
            "{err}"
        );
    }

    #[test]
    fn a_case_list_keeps_the_dataset_order_and_names_unknown_ids() {
        let full = manifest(ids(30), 5);
        let listed: Vec<String> = vec![ids(30)[3].clone(), ids(30)[17].clone(), ids(30)[9].clone()];
        let sub = subset(&full, &listed).unwrap();
        assert!(sub.subset);
        let expect: Vec<&String> = full.cases.iter().filter(|c| listed.contains(c)).collect();
        assert_eq!(sub.cases.iter().collect::<Vec<_>>(), expect);
        assert_ne!(sub.id, full.id);
        let same = subset(&full, &ids(30)).unwrap();
        assert_eq!((same.id.as_str(), same.subset), (full.id.as_str(), false));
        let err = subset(&full, &["BDMAP_99999999".to_string(), listed[0].clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dataset.cases") && err.contains("BDMAP_99999999"), "{err}");
        assert!(!err.contains(&listed[0]), "{err}");
    }
}
