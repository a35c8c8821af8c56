//! How CLI commands reach the coordinator: its endpoint (`https://` with `--tls-ca`), the bearer
//! token (`--token-file` or `VOXELFLEET_TOKEN`), and a deadline on connecting and on every
//! answer, so a coordinator that accepts connections but never answers cannot hang a command.
//!
//! The deadline is ours, not tonic's `Endpoint::timeout`: that one covers a call only until the
//! response headers arrive, which for a streamed answer is the start of the stream. Unary calls
//! and each message of a finite stream get `--timeout-secs`; `metrics --follow` waits for new
//! points as long as the run lasts, so its messages have no deadline.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use protocol::auth::{AuthChannel, SharedToken};
use protocol::pb::control_service_client::ControlServiceClient;

use super::Remote;
use super::client::status_error;

impl Remote {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The error for a deadline that passed, naming the endpoint and the deadline.
    fn no_answer(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "the coordinator at {} did not {what} within {} s (--timeout-secs)",
            self.coordinator,
            self.timeout_secs
        )
    }

    /// A client of the coordinator whose requests carry the token.
    pub async fn connect(&self) -> anyhow::Result<ControlServiceClient<AuthChannel>> {
        // Read before dialling: a wrong path is the user's to fix, whatever the network does.
        let token = SharedToken::resolve(self.token_file.as_deref())?;
        let endpoint =
            protocol::tls::client_endpoint(&self.coordinator, self.tls_ca.as_deref())?.connect_timeout(self.timeout());
        let channel = tokio::time::timeout(self.timeout(), endpoint.connect())
            .await
            .map_err(|_| self.no_answer("accept a connection"))?
            .with_context(|| {
                format!(
                    "cannot reach the coordinator at {} (is `coordinator serve` running?)",
                    self.coordinator
                )
            })?;
        Ok(ControlServiceClient::new(token.channel(channel)))
    }

    /// Awaits one answer (a unary reply, a stream's next message) within the deadline.
    pub async fn within<T>(&self, answer: impl Future<Output = Result<T, tonic::Status>>) -> anyhow::Result<T> {
        tokio::time::timeout(self.timeout(), answer)
            .await
            .map_err(|_| self.no_answer("answer"))?
            .map_err(status_error)
    }

    /// A unary call (or the opening of a stream) within the deadline.
    pub async fn call<T>(
        &self,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        Ok(self.within(request).await?.into_inner())
    }
}
