//! The worker process's life: serve the collective endpoint, register with the coordinator,
//! heartbeat, take assignments one at a time, train, report, and go back to waiting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::auth::{AuthChannel, SharedToken};
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use protocol::pb::worker_service_client::WorkerServiceClient;

use crate::backend::DeviceSpec;
use crate::collective::{CollectiveHub, Ring, RingOptions, WireFormat, serve_collective};
use crate::fingerprint::numeric_fingerprint;
use crate::leave::{Drained, Goodbye, run_draining};
use crate::link::{LinkError, RankIdentity, RunLink, StopSignal};
use crate::manifests::{ManifestCache, RunCases};
use crate::train::cases::DataPlane;
use crate::train::trainer::{RunSummary, TrainError, train_rank};
use data::cache::VolumeCache;

/// Everything `worker` (and `coordinator worker`) accepts on its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Coordinator gRPC endpoint.
    #[arg(long, env = "VOXELFLEET_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// Device to train on: `cpu`, or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Address the collective (worker-to-worker) gRPC service binds; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub peer_listen: SocketAddr,
    /// Host (or host:port) peers should dial to reach the collective service. Without a port the
    /// bound port is used. Required when --peer-listen binds all interfaces (0.0.0.0 / [::]).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Exit after this many runs (0: serve until the coordinator says to shut down).
    #[arg(long, default_value_t = 0)]
    pub max_runs: u32,
    /// Deadline for every collective receive, in seconds. Must exceed rank 0's held-out
    /// evaluation, during which the other ranks wait in their next all-reduce.
    #[arg(long, default_value_t = 300)]
    pub collective_timeout_secs: u64,
    /// How long to keep retrying the first connection to the coordinator, in seconds.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout_secs: u64,
    /// File holding the bearer token shared with the coordinator and the peers (else
    /// VOXELFLEET_TOKEN).
    #[arg(long, env = protocol::auth::TOKEN_FILE_ENV)]
    pub token_file: Option<PathBuf>,
    /// PEM of the CA that signed the coordinator's certificate; the --coordinator URL is then
    /// https://. Peer links are not TLS: they carry the token and gradients on the cluster network.
    #[arg(long, env = protocol::tls::TLS_CA_ENV)]
    pub tls_ca: Option<PathBuf>,
    /// How long a run keeps training while the coordinator is unreachable (a restart, an
    /// upgrade), in seconds. Reports are kept and delivered when it answers again; past this
    /// the run is given up and resumed from its checkpoint once the coordinator is back.
    #[arg(long, default_value_t = 300)]
    pub coordinator_grace_secs: u64,
    /// Directory of the node-wide cache of preprocessed volumes, shared by every worker process
    /// on the node and every run (default: $XDG_CACHE_HOME/voxelfleet/cases, else
    /// ~/.cache/voxelfleet/cases).
    #[arg(long, env = "VOXELFLEET_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Size limit of the cache directory in GB (10^9 bytes); least recently used volumes are
    /// evicted beyond it. 0 turns the disk cache off.
    #[arg(long, default_value_t = 50.0)]
    pub cache_max_gb: f64,
    /// Threads that load cases and build the next batches while a step trains.
    #[arg(long, default_value_t = 2)]
    pub prefetch_threads: usize,
    /// Memory for batches built ahead, in MiB (at least one batch is always built ahead).
    #[arg(long, default_value_t = 512)]
    pub prefetch_mib: usize,
    /// On SIGTERM, how long a run this worker holds may take to drain (rank 0 checkpoints at its
    /// next step boundary and the run goes back to the queue) before the worker gives it up and
    /// exits anyway, in seconds. The default leaves a margin of ten seconds within Kubernetes'
    /// default termination grace period of 30 s (deploy/kubernetes sets the same); raise both
    /// together for steps or checkpoint uploads that take longer.
    #[arg(long, default_value_t = 20)]
    pub drain_timeout_secs: u64,
}

impl WorkerArgs {
    /// The process's data plane. A cache directory that cannot be created is logged and the
    /// worker trains without a disk cache: the cache only saves work.
    pub fn data_plane(&self) -> DataPlane {
        let open = data::cache::DEFAULT_OPEN_VOLUMES;
        let cache = if self.cache_max_gb <= 0.0 || !self.cache_max_gb.is_finite() {
            VolumeCache::disabled(open)
        } else {
            let dir = self.cache_dir.clone().unwrap_or_else(data::cache::default_cache_dir);
            let max = (self.cache_max_gb * 1e9) as u64;
            match VolumeCache::new(&dir, max, open) {
                Ok(cache) => {
                    tracing::info!(dir = %dir.display(), max_gb = self.cache_max_gb, "node-wide case cache");
                    cache
                }
                Err(e) => {
                    tracing::warn!("case cache unavailable ({e}); reading every case from the store");
                    VolumeCache::disabled(open)
                }
            }
        };
        DataPlane {
            cache: Arc::new(cache),
            prefetch_threads: self.prefetch_threads.max(1),
            prefetch_bytes: self.prefetch_mib << 20,
        }
    }
}

/// The run a worker is on, as the heartbeat task needs to see it.
#[derive(Clone)]
struct ActiveRun {
    run_id: String,
    attempt: u32,
    stop: StopSignal,
    pause: Arc<AtomicBool>,
}

/// Shared between the heartbeat task and the run loop.
#[derive(Default)]
struct Presence {
    worker_id: String,
    /// Proves `worker_id` is ours when registering again or leaving.
    worker_secret: String,
    run: Option<ActiveRun>,
    reregister: bool,
    /// The coordinator said it is going away; quiets the warnings while it is.
    coordinator_away: bool,
}

pub async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    // First of all: from here on SIGTERM is an order to leave, not an instant death.
    let terminate = crate::stop::on_sigterm()?;
    // One shared secret for the coordinator and the peers (see protocol::auth).
    let token = SharedToken::resolve(args.token_file.as_deref())?;
    let (bound, hub) = serve_collective(args.peer_listen, &token).await?;
    let peer_address = advertised_address(args.advertise.as_deref(), bound)?;
    let presence = Arc::new(Mutex::new(Presence::default()));
    let joined = async {
        let client = connect(
            &args.coordinator,
            args.tls_ca.as_deref(),
            &token,
            Duration::from_secs(args.connect_timeout_secs),
        )
        .await?;
        let interval = register(&client, &peer_address, args.device, &presence).await?;
        anyhow::Ok((client, interval))
    };
    let (client, interval) = tokio::select! {
        joined = joined => joined?,
        _ = terminate.wait() => {
            tracing::info!("SIGTERM before joining the coordinator; exiting");
            return Ok(());
        }
    };
    let manifests = ManifestCache::default();
    let plane = args.data_plane();
    tokio::spawn(heartbeat_loop(client.clone(), presence.clone(), interval));

    let mut runs_done = 0u32;
    loop {
        if terminate.raised().is_some() {
            goodbye(&client, &presence).idle().await;
            return Ok(());
        }
        if std::mem::take(&mut presence.lock().expect("presence").reregister)
            && let Err(e) = register(&client, &peer_address, args.device, &presence).await
        {
            tracing::warn!("registering again failed: {e}; retrying");
            presence.lock().expect("presence").reregister = true;
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let worker_id = presence.lock().expect("presence").worker_id.clone();
        let req = pb::AwaitAssignmentRequest {
            worker_id,
            wait_ms: 10_000,
        };
        // SIGTERM ends the poll: leaving is handled at the top of the loop.
        let mut poller = client.clone();
        let polled = tokio::select! {
            polled = poller.await_assignment(req) => polled,
            _ = terminate.wait() => continue,
        };
        let outcome = match polled {
            Ok(resp) => resp.into_inner().outcome,
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::warn!("coordinator no longer knows this worker; registering again");
                presence.lock().expect("presence").reregister = true;
                continue;
            }
            Err(status) => {
                tracing::warn!("waiting for an assignment failed: {status}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        match outcome {
            Some(Outcome::Assignment(assignment)) => {
                let ended = run_assignment(
                    &args, &client, &hub, &presence, &manifests, &plane, assignment, &terminate,
                );
                if let Drained::Stuck = ended.await {
                    // Waiting for the thread would outlast the grace period, and returning would
                    // too: the runtime joins its blocking threads when dropped. The run was given
                    // up (`goodbye` names no run), so the coordinator interrupts it.
                    goodbye(&client, &presence).idle().await;
                    tracing::warn!("the training thread did not stop; exiting without it");
                    std::process::exit(0);
                }
                runs_done += 1;
                if args.max_runs > 0 && runs_done >= args.max_runs {
                    tracing::info!(runs_done, "reached --max-runs; exiting");
                    return Ok(());
                }
            }
            Some(Outcome::Shutdown(s)) => {
                tracing::info!(reason = %s.reason, "coordinator asked this worker to exit");
                return Ok(());
            }
            Some(Outcome::Idle(_)) | None => {}
        }
    }
}

/// The address ring neighbours dial. An unspecified bind address (0.0.0.0) is not dialable, so
/// it needs an explicit host.
fn advertised_address(advertise: Option<&str>, bound: SocketAddr) -> anyhow::Result<String> {
    match advertise {
        Some(a) if a.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) => Ok(a.to_string()),
        Some(host) => Ok(format!("{host}:{}", bound.port())),
        None if bound.ip().is_unspecified() => {
            anyhow::bail!(
                "--peer-listen {bound} binds all interfaces; pass --advertise HOST so peers know where to dial"
            )
        }
        None => Ok(bound.to_string()),
    }
}

async fn connect(
    endpoint: &str,
    tls_ca: Option<&Path>,
    token: &SharedToken,
    patience: Duration,
) -> anyhow::Result<WorkerServiceClient<AuthChannel>> {
    // A bad URL or an unreadable CA is not worth retrying.
    let target = protocol::tls::client_endpoint(endpoint, tls_ca)?.connect_timeout(Duration::from_secs(10));
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match target.connect().await {
            Ok(channel) => return Ok(WorkerServiceClient::new(token.channel(channel))),
            // A certificate the CA does not vouch for stays so: no retry will help.
            Err(e) if certificate_refused(&e) => {
                let ca = tls_ca.map(|p| p.display().to_string()).unwrap_or_default();
                anyhow::bail!(
                    "cannot reach the coordinator at {endpoint}: its TLS certificate is not one --tls-ca {ca} \
                     trusts ({}); pass the PEM of the CA that signed the coordinator's --tls-cert",
                    error_chain(&e)
                )
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!(
                    "cannot reach the coordinator at {endpoint} after {patience:?}: {}; is `coordinator serve` \
                     running there?",
                    error_chain(&e)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// An error and its causes on one line: tonic's transport error says only "transport error"
/// and keeps the reason (`invalid peer certificate: UnknownIssuer`) in its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Whether the TLS handshake failed on the coordinator's certificate (rustls says "invalid
/// peer certificate").
fn certificate_refused(e: &tonic::transport::Error) -> bool {
    error_chain(e).contains("invalid peer certificate")
}

async fn register(
    client: &WorkerServiceClient<AuthChannel>,
    peer_address: &str,
    device: DeviceSpec,
    presence: &Mutex<Presence>,
) -> anyhow::Result<Duration> {
    let (previous_id, secret, run) = {
        let p = presence.lock().expect("presence");
        (p.worker_id.clone(), p.worker_secret.clone(), p.run.clone())
    };
    let mut req = pb::RegisterRequest {
        host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        peer_address: peer_address.to_string(),
        device_kind: device.to_string(),
        device_memory_bytes: crate::train::memory::device_memory_total(device),
        version: env!("CARGO_PKG_VERSION").to_string(),
        // Keep our identity across reconnects.
        worker_id: previous_id,
        numeric_fingerprint: numeric_fingerprint(device),
        run_id: run.as_ref().map(|r| r.run_id.clone()).unwrap_or_default(),
        attempt: run.as_ref().map_or(0, |r| r.attempt),
        worker_secret: secret,
    };
    let resp = match client.clone().register(req.clone()).await {
        Ok(resp) => resp.into_inner(),
        // This process cannot prove the id is its own (the coordinator's record changed under
        // it): better a new identity than retrying the old one forever.
        Err(status) if status.code() == tonic::Code::PermissionDenied && !req.worker_id.is_empty() => {
            tracing::warn!(worker = %req.worker_id, "the coordinator refused this worker's id ({}); registering as a new worker", status.message());
            req.worker_id.clear();
            req.worker_secret.clear();
            client.clone().register(req).await?.into_inner()
        }
        Err(status) => return Err(status.into()),
    };
    tracing::info!(worker = %resp.worker_id, peer = %peer_address, %device, "registered with the coordinator");
    let mut p = presence.lock().expect("presence");
    p.worker_id = resp.worker_id;
    p.worker_secret = resp.worker_secret;
    Ok(Duration::from_millis(resp.heartbeat_interval_ms.max(100) as u64))
}

async fn heartbeat_loop(client: WorkerServiceClient<AuthChannel>, presence: Arc<Mutex<Presence>>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let (worker_id, run) = {
            let p = presence.lock().expect("presence");
            (p.worker_id.clone(), p.run.clone())
        };
        let req = pb::HeartbeatRequest {
            worker_id,
            run_id: run.as_ref().map(|r| r.run_id.clone()).unwrap_or_default(),
            step: 0,
            attempt: run.as_ref().map_or(0, |r| r.attempt),
        };
        match client.clone().heartbeat(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                if let Some(run) = &run {
                    if resp.stop_run {
                        run.stop.raise(&resp.stop_reason);
                    }
                    if resp.pause_run {
                        run.pause.store(true, Ordering::SeqCst);
                    }
                }
                let mut p = presence.lock().expect("presence");
                if resp.reregister {
                    p.reregister = true;
                }
                if resp.coordinator_going_away && !p.coordinator_away {
                    tracing::info!("the coordinator is going away and will be back; training on");
                }
                p.coordinator_away = resp.coordinator_going_away;
            }
            Err(status) if presence.lock().expect("presence").coordinator_away => {
                tracing::debug!("heartbeat failed while the coordinator is away: {status}")
            }
            Err(status) => tracing::warn!("heartbeat failed: {status}"),
        }
    }
}

// One more than clippy's seven: the process-wide parts of the agent, passed as they are.
#[allow(clippy::too_many_arguments)]
async fn run_assignment(
    args: &WorkerArgs,
    client: &WorkerServiceClient<AuthChannel>,
    hub: &CollectiveHub,
    presence: &Arc<Mutex<Presence>>,
    manifests: &ManifestCache,
    plane: &DataPlane,
    assignment: pb::Assignment,
    terminate: &StopSignal,
) -> Drained<()> {
    let stop = StopSignal::default();
    let pause = Arc::new(AtomicBool::new(false));
    let worker_id = {
        let mut p = presence.lock().expect("presence");
        p.run = Some(ActiveRun {
            run_id: assignment.run_id.clone(),
            attempt: assignment.attempt,
            stop: stop.clone(),
            pause: pause.clone(),
        });
        p.worker_id.clone()
    };
    let (run_id, rank, attempt) = (assignment.run_id.clone(), assignment.rank, assignment.attempt);
    tracing::info!(run = %run_id, rank, attempt, world = assignment.world_size, resume_step = assignment.resume_step, "starting assignment");
    let timeout = Duration::from_secs(args.collective_timeout_secs);
    // Each placement of a run is a new ring generation: the hub refuses links and chunks of an
    // attempt that is going away, so they never feed the ring replacing it.
    let ring_options = ring_options(&assignment, timeout);
    // A state held for live recovery of another run is no longer wanted.
    hub.release_state_unless(&run_id);
    let identity = RankIdentity {
        worker_id: worker_id.clone(),
        run_id: run_id.clone(),
        rank,
        attempt,
    };
    let link = RunLink::new(
        client.clone(),
        tokio::runtime::Handle::current(),
        identity,
        stop.clone(),
        pause,
        Duration::from_secs(args.coordinator_grace_secs),
    );
    let device = args.device;
    let plane = plane.clone();
    let (ring_stop, work_run) = (stop.clone(), run_id.clone());
    let work = async move {
        // Without its cases the run cannot start: fail at once instead of first waiting out the
        // ring's connect deadline.
        let connected = match manifests.cases_for(client, &assignment).await {
            Err(e) => Err(TrainError::Assignment(e)),
            Ok(cases) => tokio::select! {
                ring = Ring::connect_with(hub, &work_run, rank, &assignment.peers, ring_options) => {
                    ring.map(|ring| (ring, cases)).map_err(TrainError::from)
                }
                reason = ring_stop.wait() => Err(TrainError::Stopped(reason)),
            },
        };
        match connected {
            Err(e) => Err(e),
            Ok((mut ring, cases)) => tokio::task::spawn_blocking(move || {
                ring.abort_on(ring_stop);
                let mut link = link;
                let summary = train_on(device, &assignment, &cases, &mut ring, &mut link, &plane)?;
                link.finish(summary.final_step, summary.weights_sha256.clone())?;
                Ok(summary)
            })
            .await
            .unwrap_or_else(|panic| Err(TrainError::Assignment(format!("training thread panicked: {panic}")))),
        }
    };
    // SIGTERM meanwhile drains the run (see `leave`).
    let drain_timeout = Duration::from_secs(args.drain_timeout_secs);
    let leaving = goodbye(client, presence);
    let outcome = match run_draining(work, terminate, &stop, &leaving, (&run_id, attempt), drain_timeout).await {
        Drained::Ended(outcome) => outcome,
        Drained::Stuck => return Drained::Stuck,
    };
    presence.lock().expect("presence").run = None;
    match outcome {
        Ok(summary) => {
            tracing::info!(run = %run_id, rank, step = summary.final_step, weights = %&summary.weights_sha256[..16], "run finished")
        }
        Err(TrainError::Stopped(reason)) => tracing::info!(run = %run_id, rank, %reason, "run stopped"),
        Err(e) => {
            tracing::error!(run = %run_id, rank, "run failed: {e}");
            let lost_rank = match &e {
                TrainError::Collective(c) | TrainError::PeerLostHolding { source: c, .. } => c.lost_peer(),
                _ => None,
            };
            let req = pb::ReportFailureRequest {
                names_lost_rank: lost_rank.is_some(),
                lost_rank: lost_rank.unwrap_or(0),
                worker_id,
                run_id,
                rank,
                message: e.to_string(),
                peer_lost: matches!(&e, TrainError::Collective(c) if c.is_peer_loss())
                    || matches!(&e, TrainError::PeerLostHolding { .. }),
                attempt,
                coordinator_lost: matches!(&e, TrainError::Link(LinkError::CoordinatorLost(..))),
                checkpoint_unusable: matches!(&e, TrainError::Resume(_)),
                holds_state: matches!(&e, TrainError::PeerLostHolding { .. }),
                held_step: match &e {
                    TrainError::PeerLostHolding { step, .. } => *step,
                    _ => 0,
                },
            };
            // Leaving on SIGTERM, the report gets a moment, not report_failure's hour.
            tokio::select! {
                _ = report_failure(client, req) => {}
                _ = async { terminate.wait().await; tokio::time::sleep(crate::leave::STOP_GRACE).await } => {}
            }
        }
    }
    Drained::Ended(())
}

/// What leaving takes: this worker's id and secret as they are now.
fn goodbye(client: &WorkerServiceClient<AuthChannel>, presence: &Mutex<Presence>) -> Goodbye {
    let p = presence.lock().expect("presence");
    Goodbye {
        client: client.clone(),
        worker_id: p.worker_id.clone(),
        worker_secret: p.worker_secret.clone(),
        reason: "SIGTERM".into(),
    }
}

/// Delivers a failure report, waiting for a coordinator that is away: the run stays Running in
/// its store until it hears, so giving up silently would leave it waiting on heartbeats.
async fn report_failure(client: &WorkerServiceClient<AuthChannel>, req: pb::ReportFailureRequest) {
    const PATIENCE: Duration = Duration::from_secs(3600);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.clone().report_failure(req.clone()).await {
            Ok(_) => return,
            Err(status) if status.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::debug!("coordinator unreachable, will report the failure when it is back: {status}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(status) => {
                tracing::warn!("could not report the failure: {status}");
                return;
            }
        }
    }
}

/// The one place a device spec picks a backend type. Before the trainer allocates anything, a
/// step that cannot fit in the device's memory fails the run with the fields to change.
fn train_on(
    device: DeviceSpec,
    assignment: &pb::Assignment,
    cases: &RunCases,
    ring: &mut Ring,
    link: &mut RunLink,
    plane: &DataPlane,
) -> Result<RunSummary, TrainError> {
    let spec = protocol::spec::RunSpec::from_toml(&assignment.spec_toml, "assignment")?;
    let available = crate::train::memory::available_memory(device);
    let need = crate::train::memory::check_step_fits(&spec, assignment.world_size, available)?;
    match available {
        Some(a) => tracing::info!(
            run = %assignment.run_id,
            need_mib = need.total() >> 20,
            available_mib = a.bytes >> 20,
            "the step fits in memory ({})",
            a.source
        ),
        None => tracing::warn!(
            run = %assignment.run_id,
            need_mib = need.total() >> 20,
            %device,
            "cannot read this device's free memory; the step's estimate is not checked"
        ),
    }
    match device {
        DeviceSpec::Cpu => {
            train_rank::<crate::backend::CpuTrain>(Default::default(), assignment, cases, ring, link, plane)
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => train_rank::<crate::backend::GpuTrain>(
            crate::backend::GpuDevice::new(index),
            assignment,
            cases,
            ring,
            link,
            plane,
        ),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => Err(TrainError::Assignment(
            "this worker was built without the `cuda` feature".into(),
        )),
    }
}

/// The ring an assignment asks for: its attempt as the generation, `[collective]` of its spec.
/// A spec that does not parse gets the defaults here; training reports the spec's error.
fn ring_options(assignment: &pb::Assignment, timeout: Duration) -> RingOptions {
    let mut options = RingOptions {
        generation: assignment.attempt as u64,
        ..RingOptions::new(timeout)
    };
    if let Ok(spec) = protocol::spec::RunSpec::from_toml(&assignment.spec_toml, "assignment") {
        let c = &spec.collective;
        options.bucket_bytes = c.bucket_bytes();
        options.streams = c.streams as usize;
        options.send_buffer_bytes = c.send_buffer_bytes();
        options.wire = if c.wire == "bf16" {
            WireFormat::Bf16
        } else {
            WireFormat::F32
        };
    }
    options
}

#[cfg(test)]
mod tests {
    use super::advertised_address;

    #[test]
    fn advertised_address_rules() {
        let bound = "0.0.0.0:4100".parse().unwrap();
        assert!(advertised_address(None, bound).is_err());
        assert_eq!(advertised_address(Some("node7"), bound).unwrap(), "node7:4100");
        assert_eq!(advertised_address(Some("node7:5000"), bound).unwrap(), "node7:5000");
        assert_eq!(
            advertised_address(None, "127.0.0.1:4100".parse().unwrap()).unwrap(),
            "127.0.0.1:4100"
        );
    }
}
