//! Binds the gRPC services, runs the liveness and automatic-resume loops, and shuts down cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

// The io errors are shown, not chained (`error`, not `source`): anyhow's `{:#}` would print them
// twice.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--data-dir {}: cannot create it: {error}", path.display())]
    DataDir { path: PathBuf, error: std::io::Error },
    #[error("cannot listen on {addr}: {error}{}", bind_hint(error))]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("{0}")]
    Coordinator(#[from] CoordError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("--tls-cert/--tls-key: not a usable certificate and private key: {0}")]
    Tls(String),
}

/// What to do about a failed bind.
fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another process (perhaps another coordinator) listens there: stop it, or pass another --listen"
        }
        std::io::ErrorKind::AddrNotAvailable => "; that address is not one of this machine's: pass another --listen",
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need privileges: pass another --listen",
        _ => "",
    }
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

/// As [`start`]; with `tls`, every connection is TLS (see `protocol::tls`). The steps are
/// [`builder`], [`bind`], [`open`] and [`serve_on`], in that order, so that a bad certificate or
/// a port in use leaves the data dir untouched.
pub async fn start_with_tls(
    listen: SocketAddr,
    data_dir: &Path,
    timing: Timing,
    token: &SharedToken,
    tls: Option<ServerTlsConfig>,
) -> Result<RunningServer, ServerError> {
    let builder = builder(tls)?;
    let listener = bind(listen).await?;
    let coordinator = open(data_dir, timing).await?;
    serve_on(builder, listener, coordinator, token)
}

/// The gRPC server, speaking TLS when given a config.
pub fn builder(tls: Option<ServerTlsConfig>) -> Result<tonic::transport::Server, ServerError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // A client that opens a connection and never finishes its handshake is dropped.
        builder = builder
            .tls_config(tls.timeout(std::time::Duration::from_secs(10)))
            .map_err(|e| ServerError::Tls(error_chain(&e)))?;
    }
    Ok(builder)
}

/// Binds the listening socket; nothing else is touched yet.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(listen)
        .await
        .map_err(|error| ServerError::Bind { addr: listen, error })
}

/// Opens (creating if needed) the data dir's store, which takes its lock: a second coordinator
/// on the same dir fails here, naming the first one's pid.
pub async fn open(data_dir: &Path, timing: Timing) -> Result<Arc<Coordinator>, ServerError> {
    std::fs::create_dir_all(data_dir).map_err(|error| ServerError::DataDir {
        path: data_dir.to_path_buf(),
        error,
    })?;
    Ok(Coordinator::open(data_dir, timing).await?)
}

/// Serves the coordinator's gRPC services on `listener`, each request checked against `token`,
/// and starts the liveness and automatic-resume loops.
pub fn serve_on(
    builder: tonic::transport::Server,
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    token: &SharedToken,
) -> Result<RunningServer, ServerError> {
    let addr = listener.local_addr().map_err(|error| ServerError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        error,
    })?;
    let mut builder = builder;
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
