//! A rank's line to the coordinator while it trains: buffered metrics, weight checksums,
//! checkpoint commits and the final report. The training loop runs on a blocking thread, so
//! every call here blocks on the agent's tokio runtime.
//!
//! A coordinator restart must cost no training: while the coordinator is unreachable the rank
//! keeps training and keeps what it has to say (metrics, checksums, checkpoint commits, its
//! final report), and delivers it once the coordinator answers again. Only after `grace` without
//! an answer does the rank give the run up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;
use tokio::runtime::Handle;

pub use crate::stop::StopSignal;

/// Who this rank is within which placement of which run.
#[derive(Debug, Clone)]
pub struct RankIdentity {
    pub worker_id: String,
    pub run_id: String,
    pub rank: u32,
    pub attempt: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the coordinator has been unreachable for {0:?}; giving the run up: {1}")]
    CoordinatorLost(Duration, tonic::Status),
    #[error("the coordinator refused: {0}")]
    Refused(tonic::Status),
}

pub struct RunLink {
    client: WorkerServiceClient<AuthChannel>,
    handle: Handle,
    pub id: RankIdentity,
    pub stop: StopSignal,
    /// Raised by the heartbeat when the coordinator asks rank 0 to checkpoint and pause.
    pause: Arc<AtomicBool>,
    grace: Duration,
    metrics: Vec<pb::Metric>,
    checksums: Vec<pb::WeightsChecksum>,
    /// Commits not yet acknowledged because the coordinator was away.
    pending_commits: Vec<pb::CommitCheckpointRequest>,
    unreachable_since: Option<Instant>,
}

fn is_transient(status: &tonic::Status) -> bool {
    // A status made on this side from a broken connection never reached the coordinator's logic,
    // whatever its code: a GOAWAY from a coordinator stopping on SIGTERM arrives as `Internal`.
    let from_transport = std::error::Error::source(status).is_some_and(|e| e.is::<tonic::transport::Error>());
    from_transport
        || matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        )
}

impl RunLink {
    pub fn new(
        client: WorkerServiceClient<AuthChannel>,
        handle: Handle,
        id: RankIdentity,
        stop: StopSignal,
        pause: Arc<AtomicBool>,
        grace: Duration,
    ) -> Self {
        RunLink {
            client,
            handle,
            id,
            stop,
            pause,
            grace,
            metrics: vec![],
            checksums: vec![],
            pending_commits: vec![],
            unreachable_since: None,
        }
    }

    pub fn rank(&self) -> u32 {
        self.id.rank
    }

    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    pub fn metric(&mut self, step: u64, name: &str, value: f64) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.metrics.push(pb::Metric {
            rank: self.id.rank,
            step,
            name: name.to_string(),
            value,
            unix_ms,
        });
    }

    pub fn checksum(&mut self, step: u64, sha256: String) {
        self.checksums.push(pb::WeightsChecksum { step, sha256 });
    }

    /// Sorts an RPC outcome: an answer clears the unreachable clock; a transient failure within
    /// the grace period is `None` (try again later); anything else is an error.
    fn answered<T>(&mut self, result: Result<tonic::Response<T>, tonic::Status>) -> Result<Option<T>, LinkError> {
        match result {
            Ok(resp) => {
                if self.unreachable_since.take().is_some() {
                    tracing::info!(run = %self.id.run_id, "the coordinator answers again; delivering what was kept");
                }
                Ok(Some(resp.into_inner()))
            }
            Err(status) if is_transient(&status) => {
                let Some(since) = self.unreachable_since else {
                    tracing::warn!(run = %self.id.run_id, grace = ?self.grace, "coordinator unreachable, training on and keeping reports: {}", status.message());
                    self.unreachable_since = Some(Instant::now());
                    return Ok(None);
                };
                if since.elapsed() > self.grace {
                    return Err(LinkError::CoordinatorLost(self.grace, status));
                }
                tracing::debug!(run = %self.id.run_id, "coordinator still unreachable: {}", status.message());
                Ok(None)
            }
            Err(status) => Err(LinkError::Refused(status)),
        }
    }

    /// Sends what is buffered: commits held back while the coordinator was away first, then
    /// metrics and checksums. The coordinator may answer that the run is over; that becomes the
    /// stop signal.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        while let Some(commit) = self.pending_commits.first().cloned() {
            let result = self.handle.block_on(self.client.clone().commit_checkpoint(commit));
            match self.answered(result)? {
                Some(resp) => {
                    self.pending_commits.remove(0);
                    self.apply_commit_answer(&resp);
                }
                None => return Ok(()),
            }
        }
        if self.metrics.is_empty() && self.checksums.is_empty() {
            return Ok(());
        }
        let req = pb::ReportMetricsRequest {
            worker_id: self.id.worker_id.clone(),
            run_id: self.id.run_id.clone(),
            rank: self.id.rank,
            metrics: self.metrics.clone(),
            checksums: self.checksums.clone(),
            attempt: self.id.attempt,
        };
        let result = self.handle.block_on(self.client.clone().report_metrics(req));
        if let Some(resp) = self.answered(result)? {
            self.metrics.clear();
            self.checksums.clear();
            if resp.stop_run {
                self.stop.raise(&resp.stop_reason);
            }
            if resp.pause_run {
                self.pause.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn apply_commit_answer(&self, resp: &pb::CommitCheckpointResponse) {
        if resp.stop_run {
            self.stop.raise(&resp.stop_reason);
        }
    }

    /// Asks the coordinator to verify and commit a checkpoint of `files`, holding weights that
    /// hash to `weights_sha256`; kept for later if it is away.
    pub fn commit_checkpoint(
        &mut self,
        step: u64,
        files: Vec<pb::CheckpointFile>,
        weights_sha256: String,
        is_final: bool,
        eval_dice: Option<f64>,
    ) -> Result<(), LinkError> {
        self.pending_commits.push(pb::CommitCheckpointRequest {
            worker_id: self.id.worker_id.clone(),
            run_id: self.id.run_id.clone(),
            step,
            files,
            is_final,
            attempt: self.id.attempt,
            has_eval_dice: eval_dice.is_some(),
            eval_dice: eval_dice.unwrap_or(0.0),
            weights_sha256,
        });
        self.flush()
    }

    /// Delivers everything kept and then the final report, waiting out a coordinator restart
    /// (up to the grace period) rather than losing the run's end.
    pub fn finish(&mut self, final_step: u64, weights_sha256: String) -> Result<(), LinkError> {
        let req = pb::FinishRunRequest {
            worker_id: self.id.worker_id.clone(),
            run_id: self.id.run_id.clone(),
            rank: self.id.rank,
            final_step,
            weights_sha256,
            attempt: self.id.attempt,
        };
        loop {
            self.flush()?;
            if self.pending_commits.is_empty() && self.metrics.is_empty() && self.checksums.is_empty() {
                let result = self.handle.block_on(self.client.clone().finish_run(req.clone()));
                if self.answered(result)?.is_some() {
                    return Ok(());
                }
            }
            if let Some(reason) = self.stop.raised() {
                tracing::info!(run = %self.id.run_id, %reason, "stopped while delivering the final report");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Tells the coordinator that `case_id` is bad, so that it is quarantined and later runs of
    /// the dataset skip it. Best effort: the run goes on with a substitute either way, and a
    /// report lost to an outage is made again by the next run that reads the case.
    pub fn report_bad_case(&self, case_id: &str, error: &str) {
        let req = pb::ReportBadCaseRequest {
            run_id: self.id.run_id.clone(),
            worker_id: self.id.worker_id.clone(),
            case_id: case_id.to_string(),
            error: error.to_string(),
            rank: self.id.rank,
            attempt: self.id.attempt,
        };
        match self.handle.block_on(self.client.clone().report_bad_case(req)) {
            Ok(reply) if reply.get_ref().newly_quarantined => {
                tracing::warn!(run = %self.id.run_id, case = case_id, "case quarantined: {error}")
            }
            Ok(_) => {}
            Err(status) => tracing::warn!(
                run = %self.id.run_id,
                case = case_id,
                "could not report the bad case to the coordinator: {}",
                status.message()
            ),
        }
    }

    /// The runtime this link blocks on, for spawning work that runs alongside the step.
    pub fn runtime(&self) -> &Handle {
        &self.handle
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }
}

#[cfg(test)]
mod tests {
    use super::is_transient;

    #[test]
    fn refusals_are_final_and_transport_failures_are_not() {
        assert!(!is_transient(&tonic::Status::failed_precondition("run cancelled")));
        assert!(!is_transient(&tonic::Status::internal("store")));
        assert!(is_transient(&tonic::Status::unavailable("down")));
    }

    #[tokio::test]
    async fn a_broken_connection_is_transient_whatever_its_code() {
        let refused = tonic::transport::Endpoint::from_static("http://127.0.0.1:1")
            .connect()
            .await
            .unwrap_err();
        let mut goaway = tonic::Status::internal("h2 protocol error: http2 error");
        goaway.set_source(std::sync::Arc::new(refused));
        assert!(is_transient(&goaway));
    }
}
