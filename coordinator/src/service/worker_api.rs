//! The worker-facing gRPC service. Whatever a worker sends is checked here before the core
//! sees it: ids before they become keys, hashes before they are stored or compared, ranks
//! against the run's world size.

use std::sync::Arc;
use std::time::Duration;

use protocol::pb;
use protocol::pb::worker_service_server::WorkerService;
use tonic::{Request, Response, Status};

use super::{checked_id, checked_sha256};
use crate::core::Coordinator;

/// Longest a single AwaitAssignment call may hold the connection.
const MAX_POLL: Duration = Duration::from_secs(30);

/// Longest failure message kept: it lands in the run record and its events, shown by `show`.
const MAX_FAILURE_MESSAGE_CHARS: usize = 4000;

/// Longest deregistration reason kept: it lands in the run's events.
const MAX_REASON_CHARS: usize = 200;

/// Longest worker secret accepted; the coordinator issues 32 hex characters.
const MAX_SECRET_BYTES: usize = 256;

pub struct WorkerApi(pub Arc<Coordinator>);

/// A secret is hashed, never stored or shown, but an oversized one is refused before that.
fn checked_secret(secret: &str) -> Result<(), Status> {
    if secret.len() > MAX_SECRET_BYTES {
        return Err(Status::invalid_argument(format!(
            "worker_secret is {} bytes; it is the {MAX_SECRET_BYTES}-byte-at-most secret RegisterResponse returned",
            secret.len()
        )));
    }
    Ok(())
}

impl WorkerApi {
    /// A rank the run's current attempt cannot have is malformed, not merely stale (a stale
    /// report names an older attempt, whose world size may have differed), so it is refused
    /// rather than answered with a stop order.
    fn checked_rank(&self, run_id: &str, rank: u32, attempt: u32) -> Result<(), Status> {
        let (current, world_size) = self.0.attempt_and_world(run_id)?;
        if attempt == current && rank >= world_size {
            return Err(Status::invalid_argument(format!(
                "rank {rank} is out of range: run {run_id} has {world_size} ranks"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        if !req.worker_id.is_empty() {
            checked_id(&req.worker_id, "worker id")?;
        }
        if req.peer_address.is_empty() {
            return Err(Status::invalid_argument(
                "peer_address must name the worker's collective endpoint",
            ));
        }
        checked_secret(&req.worker_secret)?;
        let admitted = self.0.admit(req).await?;
        let worker = admitted.worker;
        tracing::info!(worker = %worker.id, peer = %worker.peer_address, device = %worker.device_kind, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: worker.id,
            heartbeat_interval_ms: self.0.timing.heartbeat_interval.as_millis() as u32,
            worker_secret: admitted.secret,
        }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let mut req = req.into_inner();
        checked_id(&req.worker_id, "worker id")?;
        if !req.run_id.is_empty() {
            checked_id(&req.run_id, "run id")?;
        }
        checked_secret(&req.worker_secret)?;
        if let Some((cut, _)) = req.reason.char_indices().nth(MAX_REASON_CHARS) {
            req.reason.truncate(cut);
        }
        let draining = self.0.deregister(req).await?;
        Ok(Response::new(pb::DeregisterResponse { draining }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        checked_id(&req.worker_id, "worker id")?;
        if !req.run_id.is_empty() {
            checked_id(&req.run_id, "run id")?;
        }
        Ok(Response::new(self.0.heartbeat(req)?))
    }

    async fn await_assignment(
        &self,
        req: Request<pb::AwaitAssignmentRequest>,
    ) -> Result<Response<pb::AwaitAssignmentResponse>, Status> {
        let req = req.into_inner();
        checked_id(&req.worker_id, "worker id")?;
        let wait = Duration::from_millis(req.wait_ms as u64).min(MAX_POLL);
        Ok(Response::new(self.0.await_assignment(&req.worker_id, wait).await?))
    }

    async fn report_metrics(
        &self,
        req: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        checked_id(&req.worker_id, "worker id")?;
        for c in &req.checksums {
            checked_sha256(&c.sha256, "checksums.sha256")?;
        }
        self.checked_rank(&req.run_id, req.rank, req.attempt)?;
        Ok(Response::new(self.0.report_metrics(req).await?))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        checked_id(&req.worker_id, "worker id")?;
        for f in &req.files {
            checked_sha256(&f.sha256, "files.sha256")?;
        }
        // Workers of earlier releases send none.
        if !req.weights_sha256.is_empty() {
            checked_sha256(&req.weights_sha256, "weights_sha256")?;
        }
        let (run_id, step) = (req.run_id.clone(), req.step);
        let resp = self.0.commit_checkpoint(req).await?;
        tracing::info!(run = %run_id, step, "checkpoint committed");
        Ok(Response::new(resp))
    }

    async fn finish_run(&self, req: Request<pb::FinishRunRequest>) -> Result<Response<pb::FinishRunResponse>, Status> {
        let req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        checked_id(&req.worker_id, "worker id")?;
        checked_sha256(&req.weights_sha256, "weights_sha256")?;
        self.checked_rank(&req.run_id, req.rank, req.attempt)?;
        self.0.finish_run(req).await?;
        Ok(Response::new(pb::FinishRunResponse {}))
    }

    async fn report_failure(
        &self,
        req: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let mut req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        checked_id(&req.worker_id, "worker id")?;
        self.checked_rank(&req.run_id, req.rank, req.attempt)?;
        if let Some((cut, _)) = req.message.char_indices().nth(MAX_FAILURE_MESSAGE_CHARS) {
            req.message.truncate(cut);
            req.message.push_str(" [truncated]");
        }
        tracing::warn!(run = %req.run_id, rank = req.rank, message = %req.message, "worker reported a failure");
        self.0.report_failure(req).await?;
        Ok(Response::new(pb::ReportFailureResponse {}))
    }

    async fn get_manifest(&self, req: Request<pb::GetManifestRequest>) -> Result<Response<pb::Manifest>, Status> {
        let req = req.into_inner();
        checked_id(&req.manifest_id, "manifest id")?;
        let manifest = self.0.manifest(&req.manifest_id)?;
        Ok(Response::new(super::sweep_info::manifest_info(&manifest)))
    }

    async fn report_bad_case(
        &self,
        req: Request<pb::ReportBadCaseRequest>,
    ) -> Result<Response<pb::ReportBadCaseResponse>, Status> {
        let req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        checked_id(&req.worker_id, "worker id")?;
        checked_id(&req.case_id, "case id")?;
        if req.error.trim().is_empty() {
            return Err(Status::invalid_argument("error: say why the case is bad"));
        }
        let newly_quarantined = self.0.report_bad_case(&req).await?;
        Ok(Response::new(pb::ReportBadCaseResponse { newly_quarantined }))
    }
}
