//! How CLI commands reach the coordinator: its endpoint (`https://` with `--tls-ca`), the bearer
//! token (`--token-file` or `VOXELFLEET_TOKEN`), and a deadline on connecting and on every
//! answer, so a coordinator that accepts connections but never answers cannot hang a command.
//!
//! The deadline is ours, not tonic's `Endpoint::timeout`: that one covers a call only until the
//! response headers arrive, which for a streamed answer is the start of the stream. Unary calls
//! and each message of a finite stream get `--timeout-secs`; `metrics --follow` waits for new
//! points as long as the run lasts, so its messages have no deadline.
//!
//! A request the coordinator never answered (tonic's "transport error", "operation was
//! canceled", "h2 protocol error") is told apart from the coordinator's own refusals, and the
//! error says what happened to the endpoint (gone, speaking TLS, or a broken connection), and
//! whether the request may have been applied.

use std::future::Future;
use std::time::Duration;

use protocol::auth::{AuthChannel, SharedToken};
use protocol::pb::control_service_client::ControlServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Remote;
use super::client::status_error;

/// What an unanswered request may have done, for the error that says so.
#[derive(Debug, Clone, Copy)]
pub enum Effect {
    /// Only reads: nothing changed.
    Read,
    /// May have been applied; the text says how to find out ("check `coordinator runs` ...").
    Write(&'static str),
    /// Unknown to the caller.
    Unsure,
}

impl Effect {
    fn consequence(self) -> String {
        match self {
            Effect::Read => "it only reads, so nothing was changed: run it again once the coordinator is back".into(),
            Effect::Write(check) => {
                format!("the request may or may not have been applied; once the coordinator is back, {check}")
            }
            Effect::Unsure => "if the command changes something, it may or may not have been applied; once the \
                               coordinator is back, check (`coordinator runs`, `coordinator show RUN`) before \
                               trying again"
                .into(),
        }
    }
}

/// What is at the endpoint after a request went unanswered.
#[derive(Debug, PartialEq, Eq)]
enum Peer {
    /// Nothing accepts connections there.
    Gone,
    /// Something accepts them but does not speak plain HTTP/2: a TLS port dialled as http://.
    NotPlainGrpc,
    /// Something speaks there (or it could not be told).
    Listening,
}

/// A status made on our side of the connection (it broke, or was never one gRPC could use):
/// tonic keeps the transport error as its source, and statuses the coordinator sent have none.
fn unanswered(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || (status.code() == tonic::Code::Internal && status.message().contains("Unexpected EOF"))
}

/// A status and its causes on one line, each said once.
fn cause_text(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Looks at the endpoint: does it still accept connections, and does an http:// one speak
/// plain HTTP/2 (it answers the client preface with a SETTINGS frame; a TLS server hangs up)?
async fn probe(endpoint: &str) -> Peer {
    let Ok(url) = url::Url::parse(endpoint) else {
        return Peer::Listening;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Peer::Listening;
    };
    let patience = Duration::from_secs(2);
    let mut stream =
        match tokio::time::timeout(patience, tokio::net::TcpStream::connect(format!("{host}:{port}"))).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) | Err(_) => return Peer::Gone,
        };
    if url.scheme() != "http" {
        return Peer::Listening;
    }
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let mut frame = [0u8; 9];
    let answered = tokio::time::timeout(patience, async {
        stream.write_all(PREFACE).await?;
        stream.read_exact(&mut frame).await
    })
    .await;
    match answered {
        Ok(Ok(_)) if frame[3] == 0x4 => Peer::Listening,
        Ok(_) => Peer::NotPlainGrpc,
        Err(_) => Peer::Listening,
    }
}

/// The hint for an http:// endpoint that does not speak plain HTTP/2.
fn tls_hint(endpoint: &str) -> String {
    let https = endpoint.replacen("http://", "https://", 1);
    format!(
        "it does not speak plain gRPC there, so it probably serves TLS: dial {https} with --tls-ca \
         (the PEM of the CA that signed its certificate)"
    )
}

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
        let channel = match tokio::time::timeout(self.timeout(), endpoint.connect()).await {
            Err(_) => return Err(self.no_answer("accept a connection")),
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let cause = super::output::error_text(&anyhow::Error::from(e));
                let hint = if cause.contains("invalid peer certificate") {
                    "its TLS certificate is not one --tls-ca trusts: pass the PEM of the CA that signed the \
                     coordinator's --tls-cert"
                        .to_string()
                } else {
                    match probe(&self.coordinator).await {
                        Peer::NotPlainGrpc => tls_hint(&self.coordinator),
                        _ => "is `coordinator serve` running there?".into(),
                    }
                };
                anyhow::bail!("cannot reach the coordinator at {} ({cause}); {hint}", self.coordinator);
            }
        };
        Ok(ControlServiceClient::new(token.channel(channel)))
    }

    /// Awaits one answer (a unary reply, a stream's next message) within the deadline; an
    /// answer that never came says what became of the coordinator and what `effect` the request
    /// may have had.
    pub async fn within_as<T>(
        &self,
        effect: Effect,
        answer: impl Future<Output = Result<T, tonic::Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout(), answer).await {
            Err(_) => Err(self.no_answer("answer")),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(status)) => Err(self.failed(status, effect).await),
        }
    }

    /// The error for a failed request: the coordinator's own message when it answered, else
    /// what became of it ([`Remote::lost`]).
    pub async fn failed(&self, status: tonic::Status, effect: Effect) -> anyhow::Error {
        if unanswered(&status) {
            self.lost(&status, effect).await
        } else {
            status_error(status)
        }
    }

    /// A unary call (or the opening of a stream) within the deadline.
    pub async fn call<T>(
        &self,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        self.call_as(Effect::Unsure, request).await
    }

    /// As [`Remote::call`], for a request whose effect the caller knows.
    pub async fn call_as<T>(
        &self,
        effect: Effect,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        Ok(self.within_as(effect, request).await?.into_inner())
    }

    /// The error for a request the coordinator never answered.
    pub async fn lost(&self, status: &tonic::Status, effect: Effect) -> anyhow::Error {
        let cause = cause_text(status);
        let at = &self.coordinator;
        match probe(at).await {
            // The request never reached a gRPC server, so nothing can have been applied.
            Peer::NotPlainGrpc => anyhow::anyhow!(
                "the coordinator at {at} closed the connection ({cause}); {}",
                tls_hint(at)
            ),
            Peer::Gone => anyhow::anyhow!(
                "the coordinator at {at} went away during the request ({cause}) and accepts no connections now; {}",
                effect.consequence()
            ),
            Peer::Listening => anyhow::anyhow!(
                "the connection to the coordinator at {at} broke during the request ({cause}); {}",
                effect.consequence()
            ),
        }
    }
}
