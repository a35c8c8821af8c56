//! A rank's line to the coordinator while it trains: buffered metrics, weight checksums,
//! checkpoint commits and the final report. The training loop runs on a blocking thread, so
//! every call here blocks on the agent's tokio runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;
use tokio::runtime::Handle;
use tonic::transport::Channel;

/// Why a run stopped early, as told by the coordinator (cancelled, failed elsewhere).
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    reason: Arc<Mutex<String>>,
}

impl StopSignal {
    pub fn raise(&self, reason: &str) {
        *self.reason.lock().expect("stop reason lock") = reason.to_string();
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn raised(&self) -> Option<String> {
        self.flag.load(Ordering::SeqCst).then(|| self.reason.lock().expect("stop reason lock").clone())
    }
}

pub struct RunLink {
    client: WorkerServiceClient<Channel>,
    handle: Handle,
    pub worker_id: String,
    pub run_id: String,
    pub rank: u32,
    pub stop: StopSignal,
    metrics: Vec<pb::Metric>,
    checksums: Vec<pb::WeightsChecksum>,
}

impl RunLink {
    pub fn new(client: WorkerServiceClient<Channel>, handle: Handle, worker_id: String, run_id: String, rank: u32, stop: StopSignal) -> Self {
        RunLink { client, handle, worker_id, run_id, rank, stop, metrics: vec![], checksums: vec![] }
    }

    pub fn metric(&mut self, step: u64, name: &str, value: f64) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.metrics.push(pb::Metric { rank: self.rank, step, name: name.to_string(), value, unix_ms });
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
        let resp = self.handle.block_on(client.report_metrics(req))?.into_inner();
        if resp.stop_run {
            self.stop.raise(&resp.stop_reason);
        }
        Ok(())
    }

    pub fn commit_checkpoint(&self, step: u64, files: Vec<pb::CheckpointFile>, is_final: bool) -> Result<(), tonic::Status> {
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
