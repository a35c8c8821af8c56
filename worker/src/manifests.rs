//! The cases of an assignment. The coordinator freezes each dataset's case list once, as a
//! manifest, and an assignment names it with counts: the training subset is its first
//! `train_count` cases, the held-out set its last `eval_count`. A worker fetches a manifest once
//! and keeps the newest, so a sweep's runs over one dataset cost one fetch.

use std::sync::{Arc, Mutex};

use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;

/// The cases one run trains and evaluates on.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCases {
    pub train: Vec<String>,
    pub eval: Vec<String>,
}

/// A manifest's id and its cases.
type Held = (String, Arc<Vec<String>>);

/// The last manifest fetched.
#[derive(Clone, Default)]
pub struct ManifestCache(Arc<Mutex<Option<Held>>>);

impl ManifestCache {
    pub async fn cases_for(
        &self,
        client: &WorkerServiceClient<AuthChannel>,
        assignment: &pb::Assignment,
    ) -> Result<RunCases, String> {
        let id = &assignment.manifest_id;
        let held = self.0.lock().expect("manifest cache").clone();
        let cases = match held {
            Some((held_id, cases)) if held_id == *id => cases,
            _ => {
                let req = pb::GetManifestRequest {
                    manifest_id: id.clone(),
                };
                let manifest = client
                    .clone()
                    .get_manifest(req)
                    .await
                    .map_err(|s| format!("manifest {id}: {}", s.message()))?
                    .into_inner();
                for case in &manifest.cases {
                    crate::data::loader::validate_case_id(case).map_err(|e| format!("manifest {id}: {e}"))?;
                }
                let cases = Arc::new(manifest.cases);
                *self.0.lock().expect("manifest cache") = Some((id.clone(), cases.clone()));
                cases
            }
        };
        slice_cases(&cases, assignment.train_count, assignment.eval_count).map_err(|e| format!("manifest {id}: {e}"))
    }
}

/// Training cases from the front of the frozen order, held-out ones from its end.
pub fn slice_cases(cases: &[String], train: u32, eval: u32) -> Result<RunCases, String> {
    let (train, eval) = (train as usize, eval as usize);
    if train == 0 || train + eval > cases.len() {
        return Err(format!(
            "asks for {train} training and {eval} held-out cases of {}",
            cases.len()
        ));
    }
    Ok(RunCases {
        train: cases[..train].to_vec(),
        eval: cases[cases.len() - eval..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::slice_cases;

    #[test]
    fn training_is_a_prefix_and_held_out_cases_come_from_the_end() {
        let cases: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let small = slice_cases(&cases, 3, 2).unwrap();
        let large = slice_cases(&cases, 8, 2).unwrap();
        assert_eq!(small.train, ["c0", "c1", "c2"]);
        assert_eq!(large.train[..3], small.train[..]);
        assert_eq!(small.eval, ["c8", "c9"]);
        assert_eq!(small.eval, large.eval);
        assert!(slice_cases(&cases, 9, 2).is_err());
        assert!(slice_cases(&cases, 0, 2).is_err());
    }
}
