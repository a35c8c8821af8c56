//! A rank's line to the coordinator while it trains: buffered metrics, weight checksums,
//! checkpoint commits and the final report. The training loop runs on a blocking thread, so
//! every call here blocks on the agent's tokio runtime.

use std::time::{Duration, Instant};

use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;
use tokio::runtime::Handle;

pub use crate::stop::StopSignal;

pub struct RunLink {
    client: WorkerServiceClient<AuthChannel>,
    handle: Handle,
    pub worker_id: String,
    pub run_id: String,
    pub rank: u32,
    pub stop: StopSignal,
    metrics: Vec<pb::Metric>,
    checksums: Vec<pb::WeightsChecksum>,
    unreachable_since: Option<Instant>,
}

/// How long a rank keeps training while the coordinator cannot be reached.
const COORDINATOR_PATIENCE: Duration = Duration::from_secs(60);

fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    )
}

impl RunLink {
    pub fn new(
        client: WorkerServiceClient<AuthChannel>,
        handle: Handle,
        worker_id: String,
        run_id: String,
        rank: u32,
        stop: StopSignal,
    ) -> Self {
        RunLink {
            client,
            handle,
            worker_id,
            run_id,
            rank,
            stop,
            metrics: vec![],
            checksums: vec![],
            unreachable_since: None,
        }
    }

    pub fn metric(&mut self, step: u64, name: &str, value: f64) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.metrics.push(pb::Metric {
            rank: self.rank,
            step,
            name: name.to_string(),
            value,
            unix_ms,
        });
    }

    pub fn checksum(&mut self, step: u64, sha256: String) {
        self.checksums.push(pb::WeightsChecksum { step, sha256 });
    }

    /// Sends what is buffered. The coordinator may answer that the run is over; that becomes
    /// the stop signal.
    pub fn flush(&mut self) -> Result<(), tonic::Status> {
        if self.metrics.is_empty() && self.checksums.is_empty() {
            return Ok(());
        }
        let req = pb::ReportMetricsRequest {
            worker_id: self.worker_id.clone(),
            run_id: self.run_id.clone(),
            rank: self.rank,
            metrics: std::mem::take(&mut self.metrics),
            checksums: std::mem::take(&mut self.checksums),
        };
        let mut client = self.client.clone();
        match self.handle.block_on(client.report_metrics(req.clone())) {
            Ok(resp) => {
                self.unreachable_since = None;
                let resp = resp.into_inner();
                if resp.stop_run {
                    self.stop.raise(&resp.stop_reason);
                }
                Ok(())
            }
            // A coordinator restart or a network blip must not throw away training: keep the
            // points and send them with the next batch, up to COORDINATOR_PATIENCE.
            Err(status) if is_transient(&status) => {
                let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > COORDINATOR_PATIENCE {
                    return Err(status);
                }
                tracing::warn!(run = %self.run_id, "coordinator unreachable, keeping metrics for the next report: {}", status.message());
                let (mut metrics, mut checksums) = (req.metrics, req.checksums);
                metrics.append(&mut self.metrics);
                checksums.append(&mut self.checksums);
                (self.metrics, self.checksums) = (metrics, checksums);
                Ok(())
            }
            Err(status) => Err(status),
        }
    }

    pub fn commit_checkpoint(
        &self,
        step: u64,
        files: Vec<pb::CheckpointFile>,
        is_final: bool,
    ) -> Result<(), tonic::Status> {
        let req = pb::CommitCheckpointRequest {
            worker_id: self.worker_id.clone(),
            run_id: self.run_id.clone(),
            step,
            files,
            is_final,
        };
        let mut client = self.client.clone();
        self.handle.block_on(client.commit_checkpoint(req))?;
        Ok(())
    }

    pub fn finish(&self, final_step: u64, weights_sha256: String) -> Result<(), tonic::Status> {
        let req = pb::FinishRunRequest {
            worker_id: self.worker_id.clone(),
            run_id: self.run_id.clone(),
            rank: self.rank,
            final_step,
            weights_sha256,
        };
        let mut client = self.client.clone();
        self.handle.block_on(client.finish_run(req))?;
        Ok(())
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }
}
