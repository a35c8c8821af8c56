//! The coordinator's "stop this run" order, delivered to the training thread (polled between
//! steps) and to the collective (awaited, so a rank blocked on a dead peer stops at once instead
//! of waiting out its deadline).

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

#[cfg(test)]
mod tests {
    use super::StopSignal;

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
