//! The load: run submitters, simulated workers (register, heartbeat, long-poll, report metrics),
//! and a CLI probe. Every worker is two tokio tasks (its main loop and its heartbeat) on a small
//! pool of shared HTTP/2 channels, so a thousand of them cost the client little.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use protocol::auth::{AuthChannel, SharedToken};
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use protocol::pb::control_service_client::ControlServiceClient;
use protocol::pb::worker_service_client::WorkerServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::payload::{FINGERPRINT, MetricBatch, fake_sha256, spec_toml};
use crate::stats::{Kind, Stats};

/// Responses may be large (ListRuns over ten thousand runs); tonic's 4 MiB default is not a
/// property of the coordinator worth tripping over here.
const MAX_MESSAGE: usize = 256 << 20;

/// Opens one HTTP/2 connection. Requests carry the token and give up after `rpc_timeout`.
pub async fn connect(addr: std::net::SocketAddr, rpc_timeout: Duration) -> anyhow::Result<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(rpc_timeout)
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(channel)
}

pub fn worker_client(channel: &Channel, token: &SharedToken) -> WorkerServiceClient<AuthChannel> {
    WorkerServiceClient::new(token.channel(channel.clone())).max_decoding_message_size(MAX_MESSAGE)
}

pub fn control_client(channel: &Channel, token: &SharedToken) -> ControlServiceClient<AuthChannel> {
    ControlServiceClient::new(token.channel(channel.clone())).max_decoding_message_size(MAX_MESSAGE)
}

/// State every task of the benchmark reads.
pub struct Shared {
    pub stats: Stats,
    /// The measurement window, set once when it opens: [start, end).
    pub window: OnceLock<(Instant, Instant)>,
    /// The window has closed: every task winds down.
    pub done: AtomicBool,
    /// Wakes tasks waiting for the window to open or close.
    pub phase: tokio::sync::watch::Sender<()>,
    pub registered: AtomicUsize,
    /// Workers that received at least one assignment.
    pub assigned: AtomicUsize,
    /// Metric points the coordinator acknowledged within the window.
    pub acked_points: AtomicU64,
    pub acked_reports: AtomicU64,
    pub stop_orders: AtomicU64,
    /// Times the coordinator declared one of these workers dead (they never stop beating) and
    /// told it to register again.
    pub reregistrations: AtomicU64,
    /// RPCs still outstanding (any kind): any left once the drain gives up are reported.
    pub in_flight: AtomicU64,
    /// Calls answered so far (any kind, success or failure): the hang detector watches it.
    pub answered: AtomicU64,
    /// Run ids handed out, for the CLI probe's GetRun.
    pub assigned_runs: Mutex<Vec<String>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            stats: Stats::default(),
            window: OnceLock::new(),
            done: AtomicBool::new(false),
            phase: tokio::sync::watch::channel(()).0,
            registered: AtomicUsize::new(0),
            assigned: AtomicUsize::new(0),
            acked_points: AtomicU64::new(0),
            acked_reports: AtomicU64::new(0),
            stop_orders: AtomicU64::new(0),
            reregistrations: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            assigned_runs: Mutex::new(vec![]),
        }
    }

    pub fn in_window(&self, t: Instant) -> bool {
        self.window.get().is_some_and(|(start, end)| t >= *start && t < *end)
    }

    pub fn window_open(&self) -> bool {
        self.window.get().is_some()
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Resolves once the window has opened (or the benchmark is over).
    async fn until_window(&self) {
        let mut rx = self.phase.subscribe();
        while !self.window_open() && !self.is_done() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once the window has closed.
    async fn until_done(&self) {
        let mut rx = self.phase.subscribe();
        while !self.is_done() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Times one call. Steady-state kinds are recorded only when the call began inside the
    /// window; the others always. Failures are counted, not timed.
    async fn timed<T>(
        &self,
        kind: Kind,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let started = Instant::now();
        let counted = !kind.steady_state() || self.in_window(started);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = call.await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(resp) => {
                if counted {
                    self.stats.record(kind, started.elapsed());
                }
                Ok(resp.into_inner())
            }
            // "Register again" is the protocol's answer to a worker it declared dead, not a
            // failure of the call: the worker registers again, and that is counted apart.
            Err(status) if kind == Kind::Await && status.code() == tonic::Code::NotFound => Err(status),
            Err(status) => {
                if counted {
                    self.stats.error(kind, &status);
                }
                Err(status)
            }
        }
    }
}

/// Submits `runs` specs with `concurrency` requests in flight, spread over `clients`. Stops at
/// the first refusal: a benchmark on a half-filled queue would measure something else.
pub async fn submit_runs(
    shared: Arc<Shared>,
    clients: Vec<ControlServiceClient<AuthChannel>>,
    runs: usize,
    concurrency: usize,
    dataset: String,
    artifacts: String,
    submitted: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let (dataset, artifacts) = (Arc::new(dataset), Arc::new(artifacts));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency.max(1) {
        let mut client = clients[t % clients.len()].clone();
        let (shared, next, submitted) = (shared.clone(), next.clone(), submitted.clone());
        let (dataset, artifacts) = (dataset.clone(), artifacts.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= runs {
                    return Ok(());
                }
                let req = pb::SubmitRunRequest {
                    spec_toml: spec_toml(i, &dataset, &artifacts),
                    source_name: format!("bench-coordinator run {i}"),
                };
                match shared.timed(Kind::Submit, client.submit_run(req)).await {
                    Ok(_) => {
                        submitted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        anyhow::bail!("SubmitRun {i} failed: {:?}: {}", status.code(), status.message())
                    }
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

pub struct WorkerConfig {
    pub points_per_report: usize,
    /// Period of each worker's reports; zero reports in a closed loop (as fast as answered).
    pub report_every: Duration,
    pub checksum_every: u64,
    pub heartbeat: Duration,
    pub poll_wait_ms: u32,
    pub workers: usize,
}

/// What one simulated worker holds: its id and the run it is on.
#[derive(Default)]
struct Presence {
    worker_id: String,
    /// What the first registration handed out; a re-registration under the id must show it.
    worker_secret: String,
    current: Option<Current>,
}

#[derive(Clone)]
struct Current {
    run_id: String,
    attempt: u32,
    /// Last step reported.
    step: u64,
}

type PresenceRef = Arc<Mutex<Presence>>;

fn register_request(n: usize, worker_id: &str, worker_secret: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        host: "bench-host".into(),
        // Unique per worker; nothing dials it (world size 1 needs no ring).
        peer_address: format!("127.0.0.1:{}", 20_000 + n),
        device_kind: "cpu".into(),
        device_memory_bytes: 0,
        version: concat!("bench-coordinator ", env!("CARGO_PKG_VERSION")).into(),
        worker_id: worker_id.into(),
        worker_secret: worker_secret.into(),
        numeric_fingerprint: FINGERPRINT.into(),
        run_id: String::new(),
        attempt: 0,
    }
}

/// Registers (again, keeping `worker_id` when given), retrying every second until it works or
/// the benchmark ends. Returns false if it never did.
async fn register(
    n: usize,
    client: &mut WorkerServiceClient<AuthChannel>,
    shared: &Shared,
    presence: &PresenceRef,
) -> bool {
    while !shared.is_done() {
        let (id, secret) = {
            let p = presence.lock().expect("presence");
            (p.worker_id.clone(), p.worker_secret.clone())
        };
        match shared
            .timed(Kind::Register, client.register(register_request(n, &id, &secret)))
            .await
        {
            Ok(resp) => {
                let mut p = presence.lock().expect("presence");
                p.worker_id = resp.worker_id;
                if !resp.worker_secret.is_empty() {
                    p.worker_secret = resp.worker_secret;
                }
                return true;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    false
}

/// One simulated worker: register, start beating, wait for a run, and once the window opens
/// report metrics back to back until it closes. A stop order sends it back to waiting.
pub async fn worker(
    n: usize,
    mut client: WorkerServiceClient<AuthChannel>,
    shared: Arc<Shared>,
    cfg: Arc<WorkerConfig>,
) {
    let presence: PresenceRef = Arc::default();
    if !register(n, &mut client, &shared, &presence).await {
        return;
    }
    shared.registered.fetch_add(1, Ordering::Relaxed);
    let beat = tokio::spawn(heartbeat(
        n,
        client.clone(),
        shared.clone(),
        presence.clone(),
        cfg.clone(),
    ));

    let mut template = MetricBatch::new(cfg.points_per_report);
    let mut reports: u64 = 0;
    // Open loop: each worker reports once a period at its own offset, as trainers do at
    // `metrics_every`, so the offered load does not depend on how fast the coordinator answers.
    let offset = cfg.report_every.mul_f64(n as f64 / cfg.workers.max(1) as f64);
    let mut next_report = tokio::time::Instant::now() + offset;
    let mut ever_assigned = false;
    while !shared.is_done() {
        let current = presence.lock().expect("presence").current.clone();
        let Some(mut current) = current else {
            // Workers still without a run when the window opens only beat (there are more
            // workers than runs); the others wait for a new run like a real worker.
            if shared.window_open() && !ever_assigned {
                shared.until_done().await;
                break;
            }
            let worker_id = presence.lock().expect("presence").worker_id.clone();
            let req = pb::AwaitAssignmentRequest {
                worker_id,
                wait_ms: cfg.poll_wait_ms,
            };
            match shared.timed(Kind::Await, client.await_assignment(req)).await {
                Ok(pb::AwaitAssignmentResponse {
                    outcome: Some(Outcome::Assignment(a)),
                }) => {
                    if !ever_assigned {
                        ever_assigned = true;
                        shared.assigned.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.assigned_runs.lock().expect("runs").push(a.run_id.clone());
                    presence.lock().expect("presence").current = Some(Current {
                        run_id: a.run_id,
                        attempt: a.attempt,
                        step: a.resume_step,
                    });
                }
                Ok(pb::AwaitAssignmentResponse {
                    outcome: Some(Outcome::Shutdown(_)),
                }) => break,
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::NotFound => {
                    shared.reregistrations.fetch_add(1, Ordering::Relaxed);
                    if !register(n, &mut client, &shared, &presence).await {
                        break;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        if !shared.window_open() {
            shared.until_window().await;
            continue;
        }
        if !cfg.report_every.is_zero() {
            tokio::time::sleep_until(next_report).await;
            next_report += cfg.report_every;
        }
        let (deadline, worker_id) = (
            shared.window.get().expect("window is open").1,
            presence.lock().expect("presence").worker_id.clone(),
        );
        if Instant::now() >= deadline {
            break;
        }
        reports += 1;
        let with_checksum = cfg.checksum_every > 0 && reports.is_multiple_of(cfg.checksum_every);
        let (metrics, newest) = template.next(current.step, n);
        let checksums = if with_checksum {
            vec![pb::WeightsChecksum {
                step: newest,
                sha256: fake_sha256(n as u64, newest),
            }]
        } else {
            vec![]
        };
        let points = metrics.len() as u64;
        let req = pb::ReportMetricsRequest {
            worker_id,
            run_id: current.run_id.clone(),
            rank: 0,
            metrics,
            checksums,
            attempt: current.attempt,
        };
        match shared.timed(Kind::Report, client.report_metrics(req)).await {
            Ok(resp) if resp.stop_run => {
                shared.stop_orders.fetch_add(1, Ordering::Relaxed);
                clear_run(&presence, &current.run_id);
            }
            Ok(_) => {
                if Instant::now() < deadline {
                    shared.acked_points.fetch_add(points, Ordering::Relaxed);
                    shared.acked_reports.fetch_add(1, Ordering::Relaxed);
                }
                current.step = newest;
                let mut p = presence.lock().expect("presence");
                if let Some(c) = p.current.as_mut().filter(|c| c.run_id == current.run_id) {
                    c.step = newest;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = beat.await;
}

fn clear_run(presence: &PresenceRef, run_id: &str) {
    let mut p = presence.lock().expect("presence");
    if p.current.as_ref().is_some_and(|c| c.run_id == run_id) {
        p.current = None;
    }
}

/// Beats every `cfg.heartbeat` until the window closes, naming the run once assigned. Worker
/// `n` starts at its own offset within the period, as workers started at different times
/// would, rather than all at once.
async fn heartbeat(
    n: usize,
    mut client: WorkerServiceClient<AuthChannel>,
    shared: Arc<Shared>,
    presence: PresenceRef,
    cfg: Arc<WorkerConfig>,
) {
    let offset = cfg.heartbeat.mul_f64(n as f64 / cfg.workers.max(1) as f64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut phase = shared.phase.subscribe();
    loop {
        // A phase change (the window opening) is no reason to beat: that would send every
        // worker's beat at the same instant.
        tokio::select! {
            _ = tick.tick() => {}
            _ = phase.changed() => {
                if shared.is_done() {
                    return;
                }
                continue;
            }
        }
        if shared.is_done() {
            return;
        }
        let req = {
            let p = presence.lock().expect("presence");
            let (run_id, step, attempt) = match &p.current {
                Some(c) => (c.run_id.clone(), c.step, c.attempt),
                None => (String::new(), 0, 0),
            };
            pb::HeartbeatRequest {
                worker_id: p.worker_id.clone(),
                run_id,
                step,
                attempt,
            }
        };
        let Ok(resp) = shared.timed(Kind::Heartbeat, client.heartbeat(req.clone())).await else {
            continue;
        };
        if resp.stop_run && !req.run_id.is_empty() {
            shared.stop_orders.fetch_add(1, Ordering::Relaxed);
            clear_run(&presence, &req.run_id);
        }
        if resp.reregister {
            shared.reregistrations.fetch_add(1, Ordering::Relaxed);
            register(n, &mut client, &shared, &presence).await;
        }
    }
}

/// What an operator at the CLI does while the fleet trains: once a second, list the runs and
/// show one of the runs being trained (which reads its stored metrics), on its own connection.
pub async fn cli_probe(shared: Arc<Shared>, mut client: ControlServiceClient<AuthChannel>) {
    shared.until_window().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done = shared.phase.subscribe();
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.changed() => {}
        }
        if shared.is_done() {
            return;
        }
        let _ = shared
            .timed(Kind::ListRuns, client.list_runs(pb::ListRunsRequest::default()))
            .await;
        let run_id = {
            let runs = shared.assigned_runs.lock().expect("runs");
            (!runs.is_empty()).then(|| runs[next % runs.len()].clone())
        };
        next = next.wrapping_add(7919); // a prime stride visits every run over time
        if let Some(run_id) = run_id
            && !shared.is_done()
        {
            let _ = shared
                .timed(Kind::GetRun, client.get_run(pb::GetRunRequest { run_id }))
                .await;
        }
    }
}
