//! The cases of an assignment. The coordinator freezes each dataset's case list once, as a
//! manifest, and an assignment names it with counts: the training subset is its first
//! `train_count` cases, the held-out set its last `eval_count`. A worker fetches a manifest once
//! and keeps the newest, so a sweep's runs over one dataset cost one fetch.

use std::sync::{Arc, Mutex};

use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;

pub use data::split::{RunCases, slice_cases};

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
                    data::validate_case_id(case).map_err(|e| format!("manifest {id}: {e}"))?;
                }
                let cases = Arc::new(manifest.cases);
                *self.0.lock().expect("manifest cache") = Some((id.clone(), cases.clone()));
                cases
            }
        };
        slice_cases(
            &cases,
            assignment.train_count,
            assignment.eval_count,
            &assignment.quarantined,
        )
        .map_err(|e| format!("manifest {id}: {e}"))
    }
}
