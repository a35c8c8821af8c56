//! Turns a dataset URL and a run spec into the run's cases: one seeded order of the whole
//! dataset, held-out cases from its end, and the training subset as a prefix of the rest. Prefixes
//! of one order make scaling-ablation subsets nest (the 21-case subset lies inside the 100-case
//! one), and the held-out set is the same for every subset size.
//!
//! The order is frozen once per dataset URL and seed, in the store, as a manifest. Later runs
//! refer to it by id and never list the bucket again, so a bucket that changes between two
//! submits cannot break the nesting.

use protocol::spec::RunSpec;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::core::CoordError;
use crate::records::{ManifestRecord, now_unix_ms};
use crate::store::{Store, manifest_id};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("dataset.url `{url}`: {message}")]
    Listing { url: String, message: String },
    #[error("field `{field}`: {message}")]
    TooFew { field: &'static str, message: String },
}

/// Lists the dataset through the object store: the case ids, sorted.
pub async fn list_dataset(url: &str) -> Result<Vec<String>, ManifestError> {
    let listing = |message: String| ManifestError::Listing {
        url: url.to_string(),
        message,
    };
    let (store, root) = data::store_from_url(url).map_err(|e| listing(e.to_string()))?;
    let mut cases = data::list_cases(store.as_ref(), &root)
        .await
        .map_err(|e| listing(e.to_string()))?;
    if cases.is_empty() {
        return Err(listing("no case folders with a ct.nii.gz found".into()));
    }
    cases.sort();
    cases.dedup();
    Ok(cases)
}

/// The manifest of `url` under `order_seed`: the stored one, or a new one (not yet stored) made
/// from the listing another seed's manifest froze, or from a fresh listing of the bucket.
pub async fn freeze(store: &Store, url: &str, order_seed: u64) -> Result<(ManifestRecord, bool), CoordError> {
    if let Some(m) = store.manifest_for(url, order_seed)? {
        return Ok((m, false));
    }
    let listing = match store.any_manifest_of(url)? {
        Some(other) => other.cases,
        None => list_dataset(url).await?,
    };
    let cases = seeded_order(listing, order_seed);
    let manifest = ManifestRecord {
        id: manifest_id(url, order_seed, &cases),
        dataset_url: url.to_string(),
        order_seed,
        cases,
        frozen_unix_ms: now_unix_ms(),
    };
    Ok((manifest, true))
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
/// come from the end of the order, training cases are a prefix of the rest (workers slice them
/// so, see `data::split::slice_cases`).
pub fn split_counts(manifest: &ManifestRecord, spec: &RunSpec) -> Result<(u32, u32), ManifestError> {
    let total = manifest.cases.len();
    let n_eval = spec.dataset.eval_cases as usize;
    if n_eval >= total {
        return Err(ManifestError::TooFew {
            field: "dataset.eval_cases",
            message: format!("{n_eval} held-out cases leave none to train on; the dataset has {total}"),
        });
    }
    let left = total - n_eval;
    let n_train = match spec.dataset.train_cases as usize {
        0 => left,
        n if n <= left => n,
        n => {
            return Err(ManifestError::TooFew {
                field: "dataset.train_cases",
                message: format!("asks for {n} cases but only {left} are left after {n_eval} held out"),
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

    /// A listing through the whole path: frozen order, counts, and the slices a worker takes.
    fn split_cases(listing: Vec<String>, spec: &RunSpec) -> Result<RunCases, ManifestError> {
        let manifest = ManifestRecord {
            id: "m".into(),
            dataset_url: spec.dataset.url.clone(),
            order_seed: spec.dataset.order_seed,
            cases: seeded_order(listing, spec.dataset.order_seed),
            frozen_unix_ms: 0,
        };
        let (train, eval) = split_counts(&manifest, spec)?;
        Ok(slice_cases(&manifest.cases, train, eval).unwrap())
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
}
