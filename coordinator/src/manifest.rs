//! Turns a dataset URL and a run spec into the run's case lists: one seeded order of the whole
//! dataset, held-out cases from its end, and the training subset as a prefix of the rest. Prefixes
//! of one order make scaling-ablation subsets nest (the 21-case subset lies inside the 100-case
//! one), and the held-out set is the same for every subset size.

use protocol::spec::RunSpec;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("dataset.url `{url}`: {message}")]
    Listing { url: String, message: String },
    #[error("field `{field}`: {message}")]
    TooFew { field: &'static str, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct CasePlan {
    pub train: Vec<String>,
    pub eval: Vec<String>,
}

/// Lists the dataset through the object store and splits it for `spec`.
pub async fn plan_cases(spec: &RunSpec) -> Result<CasePlan, ManifestError> {
    let url = &spec.dataset.url;
    let listing = |message: String| ManifestError::Listing {
        url: url.clone(),
        message,
    };
    let (store, root) = worker::data::store_from_url(url).map_err(|e| listing(e.to_string()))?;
    let cases = worker::data::list_cases(store.as_ref(), &root)
        .await
        .map_err(|e| listing(e.to_string()))?;
    if cases.is_empty() {
        return Err(listing("no case folders with a ct.nii.gz found".into()));
    }
    split_cases(cases, spec)
}

/// The pure part of `plan_cases`, kept separate so the ordering rules are testable without a store.
pub fn split_cases(mut cases: Vec<String>, spec: &RunSpec) -> Result<CasePlan, ManifestError> {
    cases.sort();
    cases.dedup();
    cases.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.dataset.order_seed));
    let n_eval = spec.dataset.eval_cases as usize;
    if n_eval >= cases.len() {
        return Err(ManifestError::TooFew {
            field: "dataset.eval_cases",
            message: format!(
                "{n_eval} held-out cases leave none to train on; the dataset has {}",
                cases.len()
            ),
        });
    }
    let eval = cases.split_off(cases.len() - n_eval);
    let n_train = match spec.dataset.train_cases as usize {
        0 => cases.len(),
        n if n <= cases.len() => n,
        n => {
            return Err(ManifestError::TooFew {
                field: "dataset.train_cases",
                message: format!(
                    "asks for {n} cases but only {} are left after {n_eval} held out",
                    cases.len()
                ),
            });
        }
    };
    cases.truncate(n_train);
    Ok(CasePlan { train: cases, eval })
}

#[cfg(test)]
mod tests {
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
