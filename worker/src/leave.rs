//! Leaving on SIGTERM. A terminating pod (Kubernetes) or job step (Slurm) gets SIGTERM and then a
//! grace period before SIGKILL. In it the worker tells the coordinator it is going, so that it is
//! offered no more work; a run it holds is drained rather than lost: rank 0 checkpoints at its
//! next step boundary, the run goes back to the queue without spending a retry, and resumes on
//! other workers. Everything here is bounded by `--drain-timeout-secs`; past that the worker
//! gives the run up (it is then interrupted, as if the worker had died) and exits anyway.

use std::future::Future;
use std::time::Duration;

use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;
use tokio::time::Instant;

use crate::stop::StopSignal;

/// Longest wait for one Deregister answer: the coordinator may be away (restarting), and the
/// process must still exit within its grace period.
const CALL_PATIENCE: Duration = Duration::from_secs(5);

/// How long a training thread told to stop may take to notice (it looks between steps, and the
/// collective aborts at once) before the process exits without it.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Who is leaving, as the coordinator knows it.
#[derive(Clone)]
pub struct Goodbye {
    pub client: WorkerServiceClient<AuthChannel>,
    pub worker_id: String,
    pub worker_secret: String,
    pub reason: String,
}

impl Goodbye {
    /// Deregisters, naming the run this worker trains (or none when idle). True when the
    /// coordinator drains that run: keep training until it is stopped.
    pub async fn deregister(&self, run: Option<(&str, u32)>) -> Result<bool, String> {
        let req = pb::DeregisterRequest {
            worker_id: self.worker_id.clone(),
            worker_secret: self.worker_secret.clone(),
            run_id: run.map(|(id, _)| id.to_string()).unwrap_or_default(),
            attempt: run.map_or(0, |(_, attempt)| attempt),
            reason: self.reason.clone(),
        };
        match tokio::time::timeout(CALL_PATIENCE, self.client.clone().deregister(req)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().draining),
            Ok(Err(status)) => Err(format!(
                "the coordinator answered {:?}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!("no answer within {CALL_PATIENCE:?}")),
        }
    }

    /// The last word of an idle worker: the coordinator forgets it. A failure is only logged:
    /// the coordinator then declares the worker dead once its heartbeats stop, as before.
    pub async fn idle(&self) {
        match self.deregister(None).await {
            Ok(_) => tracing::info!(worker = %self.worker_id, "deregistered from the coordinator; exiting"),
            Err(e) => tracing::warn!(
                worker = %self.worker_id,
                "could not deregister ({e}); exiting anyway, the coordinator will miss this worker's heartbeats"
            ),
        }
    }
}

/// How a run under SIGTERM ended.
pub enum Drained<T> {
    /// The run ended (drained, finished or stopped) with this outcome.
    Ended(T),
    /// Its training thread did not stop within `STOP_GRACE` of being told to: exit without it.
    Stuck,
}

/// Runs `work`, one assignment, to its end. On `terminate` meanwhile, asks the coordinator to
/// drain run `run` and lets `work` end by itself within `timeout` of the signal; if the
/// coordinator will not drain it, or the time is up, raises `stop` (the run's own stop signal).
pub async fn run_draining<T>(
    work: impl Future<Output = T>,
    terminate: &StopSignal,
    stop: &StopSignal,
    goodbye: &Goodbye,
    run: (&str, u32),
    timeout: Duration,
) -> Drained<T> {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return Drained::Ended(out),
        _ = terminate.wait() => {}
    }
    let deadline = Instant::now() + timeout;
    let asked = tokio::select! {
        asked = goodbye.deregister(Some(run)) => asked,
        out = &mut work => return Drained::Ended(out),
    };
    match asked {
        Ok(true) => tracing::info!(
            run = %run.0,
            "SIGTERM: the coordinator drains the run (rank 0 checkpoints at its next step boundary, then the run \
             goes back to the queue); waiting up to {timeout:?}"
        ),
        Ok(false) => stop.raise("this worker is leaving (SIGTERM); the coordinator took the run back"),
        Err(e) => {
            tracing::warn!(run = %run.0, "SIGTERM: could not ask the coordinator to drain the run ({e}); giving it up");
            stop.raise("this worker is leaving (SIGTERM)");
        }
    }
    if let Ok(out) = tokio::time::timeout_at(deadline, &mut work).await {
        return Drained::Ended(out);
    }
    tracing::warn!(run = %run.0, "the run did not drain within {timeout:?}; giving it up");
    stop.raise("this worker is leaving (SIGTERM) and the run did not drain in time");
    match tokio::time::timeout(STOP_GRACE, &mut work).await {
        Ok(out) => Drained::Ended(out),
        Err(_) => Drained::Stuck,
    }
}
