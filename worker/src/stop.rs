//! The coordinator's "stop this run" order, delivered to the training thread (polled between
//! steps) and to the collective (awaited, so a rank blocked on a dead peer stops at once instead
//! of waiting out its deadline). The same signal carries the process's SIGTERM to the loops that
//! must react to it (see `on_sigterm`).

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct StopSignal {
    reason: Arc<watch::Sender<Option<String>>>,
}

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal {
            reason: Arc::new(watch::channel(None).0),
        }
    }
}

impl StopSignal {
    /// Raises the signal; the first reason wins.
    pub fn raise(&self, reason: &str) {
        self.reason.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason.to_string());
            true
        });
    }

    pub fn raised(&self) -> Option<String> {
        self.reason.borrow().clone()
    }

    /// Resolves with the reason once the signal is raised.
    pub async fn wait(&self) -> String {
        let mut rx = self.reason.subscribe();
        // The guard `wait_for` returns is not Send; copy the reason out before any other await.
        let reason = rx.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
        match reason {
            Some(reason) => reason,
            // Unreachable while `self` holds the sender; never resolve rather than invent a stop.
            None => std::future::pending().await,
        }
    }
}

/// A signal raised by the process's first SIGTERM, with the reason "SIGTERM". Installing it
/// replaces the default action (death with status 143, without a word to anyone): Kubernetes and
/// Slurm send SIGTERM and then wait a grace period, in which the worker says goodbye to the
/// coordinator and hands its run back (see `leave`). A later SIGTERM changes nothing; the grace
/// period ends in SIGKILL anyway.
pub fn on_sigterm() -> std::io::Result<StopSignal> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = StopSignal::default();
    let raised = signal.clone();
    tokio::spawn(async move {
        if sigterm.recv().await.is_some() {
            tracing::info!("SIGTERM: leaving the coordinator's pool of workers");
            raised.raise("SIGTERM");
        }
        while sigterm.recv().await.is_some() {
            tracing::info!("SIGTERM again: already leaving");
        }
    });
    Ok(signal)
}

#[cfg(test)]
mod tests {
    use super::StopSignal;

    /// The process survives its SIGTERM, and the signal says so.
    #[tokio::test]
    async fn sigterm_raises_the_signal_instead_of_killing_the_process() {
        let terminate = super::on_sigterm().unwrap();
        assert_eq!(terminate.raised(), None);
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), terminate.wait())
            .await
            .expect("SIGTERM never reached the signal");
        assert_eq!(reason, "SIGTERM");
    }

    #[tokio::test]
    async fn first_reason_wins_and_waiters_wake() {
        let stop = StopSignal::default();
        assert_eq!(stop.raised(), None);
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.wait().await }
        });
        stop.raise("cancelled");
        stop.raise("later");
        assert_eq!(waiter.await.unwrap(), "cancelled");
        assert_eq!(stop.raised().as_deref(), Some("cancelled"));
        assert_eq!(stop.wait().await, "cancelled");
    }
}
