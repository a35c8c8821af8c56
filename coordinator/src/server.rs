//! Binds the gRPC services, runs the liveness and automatic-resume loops, and shuts down cleanly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use protocol::auth::SharedToken;
use protocol::pb::control_service_server::ControlServiceServer;
use protocol::pb::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::ServerTlsConfig;
use tonic::transport::server::TcpIncoming;

use crate::core::{CoordError, Coordinator, Timing};
use crate::service::control_api::ControlApi;
use crate::service::worker_api::WorkerApi;

pub struct RunningServer {
    pub addr: SocketAddr,
    pub coordinator: Arc<Coordinator>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The liveness and automatic-resume loops.
    monitors: [JoinHandle<()>; 2],
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Coordinator(#[from] CoordError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("--tls-cert/--tls-key: not a usable certificate and private key: {0}")]
    Tls(String),
}

impl RunningServer {
    /// Stops accepting requests and waits for in-flight ones.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for monitor in &self.monitors {
            monitor.abort();
        }
        Ok(self.task.await??)
    }

    /// Resolves when the server task ends (it only ends on error or after `stop`).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        Ok((&mut self.task).await??)
    }
}

/// An error and its causes on one line: tonic's transport errors say only "transport error" at
/// the top and keep the reason (a PEM that does not parse) in their sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs `job` every `period` for the life of the server, logging its failures.
fn every<F, Fut>(
    period: std::time::Duration,
    coordinator: Arc<Coordinator>,
    what: &'static str,
    job: F,
) -> JoinHandle<()>
where
    F: Fn(Arc<Coordinator>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), CoordError>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = job(coordinator.clone()).await {
                tracing::error!("{what} failed: {e}");
            }
        }
    })
}

/// Every request must carry `token` (see `protocol::auth`); `SharedToken::none()` checks nothing.
pub async fn start(
    listen: SocketAddr,
    data_dir: &Path,
    timing: Timing,
    token: &SharedToken,
) -> Result<RunningServer, ServerError> {
    start_with_tls(listen, data_dir, timing, token, None).await
}

/// As [`start`]; with `tls`, every connection is TLS (see `protocol::tls`).
pub async fn start_with_tls(
    listen: SocketAddr,
    data_dir: &Path,
    timing: Timing,
    token: &SharedToken,
    tls: Option<ServerTlsConfig>,
) -> Result<RunningServer, ServerError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // A client that opens a connection and never finishes its handshake is dropped.
        builder = builder
            .tls_config(tls.timeout(std::time::Duration::from_secs(10)))
            .map_err(|e| ServerError::Tls(error_chain(&e)))?;
    }
    std::fs::create_dir_all(data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    let coordinator = Coordinator::open(data_dir, timing).await?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Bind { addr: listen, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr: listen, source })?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let router = builder
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerApi(coordinator.clone()),
            token.require(),
        ))
        .add_service(ControlServiceServer::with_interceptor(
            ControlApi(coordinator.clone()),
            token.require(),
        ));
    let task = tokio::spawn(
        // No Nagle: small replies would otherwise wait on the client's delayed ACK (~40 ms).
        router.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            let _ = stop_rx.await;
        }),
    );
    let period = coordinator
        .timing
        .heartbeat_interval
        .min(std::time::Duration::from_secs(1));
    // Two loops, so that re-reading a large checkpoint before a resume never delays declaring
    // a silent worker dead. The liveness check ticks four times a heartbeat interval: a gap of a
    // whole interval between two checks then means the coordinator itself stalled (see
    // `Coordinator::reap_dead_workers`), never an ordinary tick.
    let liveness_period = (coordinator.timing.heartbeat_interval / 4).min(std::time::Duration::from_millis(500));
    let liveness = every(liveness_period, coordinator.clone(), "liveness check", |c| async move {
        c.reap_dead_workers().await
    });
    let resumer = every(period, coordinator.clone(), "automatic resume", |c| async move {
        c.resume_interrupted().await
    });
    Ok(RunningServer {
        addr,
        coordinator,
        stop: Some(stop_tx),
        task,
        monitors: [liveness, resumer],
    })
}
