//! Crash durability of the coordinator's sled store, end to end.
//!
//! sled 0.34 makes a write durable only once it is flushed, and spacejam/sled#1509 reports a
//! store left corrupt after the process was killed. The coordinator's answer is `store.rs`'s
//! rule: every request is one transaction and one flush before the reply goes out. This test
//! is the evidence that the rule holds: it SIGKILLs a real `coordinator serve` process 20
//! times, at seeded random moments, while the test (playing a worker over gRPC) reports
//! metrics, weight checksums and checkpoints, and after every kill opens the store directly and
//! checks that every write the coordinator acknowledged is there and readable, then restarts
//! the coordinator on the same store.
//!
//! A write counts as acknowledged only when its OK reply reached the test; a request that died
//! with the coordinator (refused, reset) may or may not have landed, and is not checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Cluster, TOKEN, worker_client_request};
use coordinator::store::Store;
use protocol::auth::{AuthChannel, SharedToken};
use protocol::ids::checkpoint_prefix;
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use protocol::pb::worker_service_client::WorkerServiceClient;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tonic::transport::Endpoint;

const KILLS: u32 = 20;
/// The kill schedule (delays of worker traffic before each SIGKILL) reproduces from this seed.
const SEED: u64 = 0x5EED_D0A1;
/// Bound on the whole test; it normally takes a small fraction of this.
const TEST_BUDGET: Duration = Duration::from_secs(90);
const CHECKPOINT_EVERY: u64 = 5;
const CHECKPOINT_BYTES: usize = 4096;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(300);
/// Per-call limit, so a request to a half-dead coordinator can never hang the worker loop.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything the coordinator acknowledged, tagged with the number of kills before the ack.
#[derive(Clone, Default)]
struct Acked {
    /// (epoch, step, name, value)
    metrics: Vec<(u32, u64, String, f64)>,
    /// (epoch, step, attempt, sha256)
    checksums: Vec<(u32, u64, u32, String)>,
    /// (epoch, step, attempt, key, sha256, bytes)
    checkpoints: Vec<(u32, u64, u32, String, String, u64)>,
    /// (epoch, worker id)
    registrations: Vec<(u32, String)>,
    /// Acks per epoch, to show the kills landed among live traffic.
    per_epoch: BTreeMap<u32, u64>,
}

/// What the fake worker saw go wrong, for the summary (and for the report if the test fails).
#[derive(Default)]
struct Trouble {
    transport_errors: u64,
    /// Errors the coordinator answered with deliberately (not a dead connection).
    app_errors: Vec<String>,
    rejoins: u32,
}

struct Shared {
    acked: Mutex<Acked>,
    trouble: Mutex<Trouble>,
    /// Kills so far; acks are tagged with it.
    epoch: AtomicU32,
    stop: AtomicBool,
    /// Requests sent and not yet answered, to count the kills that cut one off.
    in_flight: AtomicU32,
}

impl Shared {
    fn ack(&self, f: impl FnOnce(&mut Acked, u32)) {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut acked = self.acked.lock().unwrap();
        f(&mut acked, epoch);
        *acked.per_epoch.entry(epoch).or_default() += 1;
    }
}

type Client = WorkerServiceClient<AuthChannel>;

/// A fresh connection each time; fails fast while the coordinator is down.
async fn connect(endpoint: &str) -> Option<Client> {
    let channel = Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .ok()?;
    Some(WorkerServiceClient::new(
        SharedToken::new(TOKEN).unwrap().channel(channel),
    ))
}

/// Awaits one RPC, counted as in flight meanwhile.
async fn in_flight<T>(shared: &Shared, call: impl std::future::Future<Output = T>) -> T {
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let out = call.await;
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    out
}

/// A transport failure (the coordinator died or is not up yet), as opposed to a reply.
fn is_transport(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    ) || (status.code() == tonic::Code::Internal && !status.message().contains("sled"))
}

fn metric_points(step: u64) -> Vec<(String, f64)> {
    vec![
        ("train/loss".to_string(), 1.0 / (step as f64 + 1.0)),
        ("train/lr".to_string(), 0.003 + step as f64 * 1e-9),
        ("train/dice".to_string(), (step % 1000) as f64 / 1000.0),
    ]
}

fn weights_sha(step: u64, attempt: u32) -> String {
    hex::encode(Sha256::digest(format!("weights {step} attempt {attempt}")))
}

/// The fake rank 0: reports metrics and a checksum for every step and commits a checkpoint
/// every `CHECKPOINT_EVERY` steps, reconnecting through every coordinator death.
struct FakeWorker {
    endpoint: String,
    artifacts: PathBuf,
    run_id: String,
    worker_id: String,
    /// Proves `worker_id` when registering again.
    worker_secret: String,
    attempt: u32,
    step: u64,
    shared: Arc<Shared>,
    client: Option<Client>,
    last_heartbeat: Option<Instant>,
    deadline: Instant,
}

enum Op {
    Report(u64),
    Commit(u64),
}

impl FakeWorker {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst) || Instant::now() > self.deadline
    }

    async fn client(&mut self) -> Option<&mut Client> {
        if self.client.is_none() {
            match connect(&self.endpoint).await {
                Some(c) => {
                    self.client = Some(c);
                    // First thing on a new connection: a heartbeat, so the coordinator (perhaps
                    // a fresh process adopting the run) counts this worker alive.
                    self.last_heartbeat = None;
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return None;
                }
            }
        }
        self.client.as_mut()
    }

    fn lost_connection(&mut self, status: &tonic::Status) {
        self.client = None;
        let mut trouble = self.shared.trouble.lock().unwrap();
        if is_transport(status) {
            trouble.transport_errors += 1;
        } else {
            trouble
                .app_errors
                .push(format!("{:?}: {}", status.code(), status.message()));
        }
    }

    /// Heartbeats when due. Ok(false) means the run is no longer this worker's (rejoin).
    async fn heartbeat_if_due(&mut self) -> Result<bool, ()> {
        if self.last_heartbeat.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
            return Ok(true);
        }
        let req = pb::HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            run_id: self.run_id.clone(),
            step: self.step,
            attempt: self.attempt,
        };
        let shared = self.shared.clone();
        let Some(client) = self.client().await else {
            return Err(());
        };
        match in_flight(&shared, client.heartbeat(req)).await {
            Ok(resp) => {
                self.last_heartbeat = Some(Instant::now());
                let resp = resp.into_inner();
                Ok(!(resp.reregister || resp.stop_run))
            }
            Err(status) => {
                self.lost_connection(&status);
                Err(())
            }
        }
    }

    /// The run was taken from this worker (declared dead, attempt over): register again under
    /// the same id and wait for the run's next placement.
    async fn rejoin(&mut self) {
        self.shared.trouble.lock().unwrap().rejoins += 1;
        let mut registered = false;
        while !self.stopping() {
            let (worker_id, worker_secret) = (self.worker_id.clone(), self.worker_secret.clone());
            let Some(client) = self.client().await else { continue };
            if !registered {
                let mut req = worker_client_request("127.0.0.1:9");
                req.worker_id = worker_id;
                req.worker_secret = worker_secret;
                match client.register(req).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        let id = resp.worker_id;
                        self.worker_secret = resp.worker_secret;
                        self.shared.ack(|a, e| a.registrations.push((e, id.clone())));
                        self.worker_id = id;
                        registered = true;
                    }
                    Err(status) => self.lost_connection(&status),
                }
                continue;
            }
            let req = pb::AwaitAssignmentRequest {
                worker_id,
                wait_ms: 1000,
            };
            match client.await_assignment(req).await.map(|r| r.into_inner().outcome) {
                Ok(Some(Outcome::Assignment(a))) if a.run_id == self.run_id => {
                    self.attempt = a.attempt;
                    self.last_heartbeat = Some(Instant::now());
                    return;
                }
                Ok(_) => {}
                Err(status) => {
                    // NotFound: the restarted coordinator had declared us dead; register again.
                    if status.code() == tonic::Code::NotFound {
                        registered = false;
                    }
                    self.lost_connection(&status);
                }
            }
        }
    }

    async fn run(mut self) {
        let mut op = Op::Report(self.step + 1);
        let mut failures_of_op = 0u32;
        // (step, attempt) of the checkpoint file already written, with its claim.
        let mut written: Option<(u64, u32, pb::CheckpointFile)> = None;
        while !self.stopping() {
            match self.heartbeat_if_due().await {
                Ok(true) => {}
                Ok(false) => {
                    self.rejoin().await;
                    continue;
                }
                Err(()) => continue,
            }
            if failures_of_op >= 10 {
                // Something other than a dead coordinator keeps refusing it: move on.
                op = Op::Report(self.step + 1);
                failures_of_op = 0;
            }
            let (run_id, worker_id, attempt) = (self.run_id.clone(), self.worker_id.clone(), self.attempt);
            match op {
                Op::Report(step) => {
                    let points = metric_points(step);
                    let sha = weights_sha(step, attempt);
                    let req = pb::ReportMetricsRequest {
                        worker_id,
                        run_id,
                        rank: 0,
                        metrics: points
                            .iter()
                            .map(|(name, value)| pb::Metric {
                                rank: 0,
                                step,
                                name: name.clone(),
                                value: *value,
                                unix_ms: 0,
                            })
                            .collect(),
                        checksums: vec![pb::WeightsChecksum {
                            step,
                            sha256: sha.clone(),
                        }],
                        attempt,
                    };
                    let shared = self.shared.clone();
                    let Some(client) = self.client().await else { continue };
                    match in_flight(&shared, client.report_metrics(req)).await {
                        Ok(resp) if resp.get_ref().stop_run => {
                            // Refused as stale: nothing was recorded. Find out where we stand.
                            self.last_heartbeat = None;
                            failures_of_op += 1;
                        }
                        Ok(_) => {
                            self.shared.ack(|a, e| {
                                for (name, value) in points {
                                    a.metrics.push((e, step, name, value));
                                }
                                a.checksums.push((e, step, attempt, sha));
                            });
                            self.step = step;
                            failures_of_op = 0;
                            op = if step % CHECKPOINT_EVERY == 0 {
                                Op::Commit(step)
                            } else {
                                Op::Report(step + 1)
                            };
                        }
                        Err(status) => {
                            failures_of_op += 1;
                            self.lost_connection(&status);
                        }
                    }
                }
                Op::Commit(step) => {
                    if written.as_ref().is_none_or(|(s, a, _)| (*s, *a) != (step, attempt)) {
                        written = Some((step, attempt, self.write_checkpoint_file(step, attempt)));
                    }
                    let file = written.as_ref().unwrap().2.clone();
                    let req = pb::CommitCheckpointRequest {
                        worker_id,
                        run_id,
                        step,
                        files: vec![file.clone()],
                        is_final: false,
                        attempt,
                        has_eval_dice: false,
                        eval_dice: 0.0,
                        // A worker of an earlier release: it sends no weights hash.
                        weights_sha256: String::new(),
                    };
                    let shared = self.shared.clone();
                    let Some(client) = self.client().await else { continue };
                    match in_flight(&shared, client.commit_checkpoint(req)).await {
                        Ok(_) => {
                            self.shared.ack(|a, e| {
                                a.checkpoints
                                    .push((e, step, attempt, file.key, file.sha256, file.bytes))
                            });
                            failures_of_op = 0;
                            op = Op::Report(step + 1);
                        }
                        Err(status) => {
                            if status.code() == tonic::Code::FailedPrecondition {
                                self.last_heartbeat = None; // not a member any more?
                            }
                            failures_of_op += 1;
                            self.lost_connection(&status);
                        }
                    }
                }
            }
        }
    }

    /// Writes a few KB of seeded random bytes where the coordinator will look for them.
    fn write_checkpoint_file(&self, step: u64, attempt: u32) -> pb::CheckpointFile {
        let key = format!("{}model.bin", checkpoint_prefix(&self.run_id, step, attempt));
        let mut bytes = vec![0u8; CHECKPOINT_BYTES];
        ChaCha8Rng::seed_from_u64(step ^ ((attempt as u64) << 48)).fill_bytes(&mut bytes);
        let path = self.artifacts.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        pb::CheckpointFile {
            key,
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
        }
    }
}

/// Opens the store of the dead coordinator and lists every acknowledged write that is missing
/// or unreadable. Metric values must come back to the bit (serde_json's `float_roundtrip`).
fn check_store(db: &Path, run_id: &str, acked: &Acked, kill: u32) -> Vec<String> {
    let mut missing = vec![];
    let store = match Store::open(db) {
        Ok(s) => s,
        Err(e) => return vec![format!("kill {kill}: the store does not open: {e}")],
    };
    let mut readable = |what: &str, r: Result<(), coordinator::store::StoreError>| {
        if let Err(e) = r {
            missing.push(format!("kill {kill}: {what} unreadable: {e}"));
        }
    };
    readable("runs tree", store.runs().map(drop));
    readable("workers tree", store.workers().map(drop));
    readable("events", store.events(run_id).map(drop));
    let run = store.run(run_id);
    let metrics = store.metrics_from(run_id, 0);
    let checksums = store.checksums(run_id);
    let checkpoints = store.checkpoints(run_id);
    let workers = store.workers().unwrap_or_default();
    drop(store);

    let max_acked_step = acked.metrics.iter().map(|m| m.1).max().unwrap_or(0);
    match run {
        Ok(Some(run)) if run.step >= max_acked_step => {}
        Ok(Some(run)) => missing.push(format!(
            "kill {kill}: run record says step {} but a report for step {max_acked_step} was acknowledged",
            run.step
        )),
        Ok(None) => missing.push(format!("kill {kill}: run {run_id} is gone from the store")),
        Err(e) => missing.push(format!("kill {kill}: run record unreadable: {e}")),
    }

    for (epoch, id) in &acked.registrations {
        if !workers.iter().any(|w| &w.id == id) {
            missing.push(format!(
                "kill {kill}: worker {id} (registration acked after kill {epoch}) missing"
            ));
        }
    }

    match metrics {
        Err(e) => missing.push(format!("kill {kill}: metrics unreadable: {e}")),
        Ok(metrics) => {
            let dense = metrics.iter().enumerate().all(|(i, (seq, _))| *seq == i as u64);
            if !dense {
                let seqs: Vec<u64> = metrics.iter().map(|(s, _)| *s).collect();
                missing.push(format!("kill {kill}: metric seqs are not dense from 0: {seqs:?}"));
            }
            let mut present: HashMap<(u64, String), Vec<f64>> = HashMap::new();
            for (_, m) in &metrics {
                present.entry((m.step, m.name.clone())).or_default().push(m.value);
            }
            for (epoch, step, name, value) in &acked.metrics {
                let stored = present.get(&(*step, name.clone())).map(Vec::as_slice).unwrap_or(&[]);
                if stored.iter().any(|v| v.to_bits() == value.to_bits()) {
                    continue;
                }
                missing.push(format!(
                    "kill {kill}: metric {name}={value} at step {step} (acked after kill {epoch}) missing; \
                     stored values for it: {stored:?}"
                ));
            }
        }
    }

    match checksums {
        Err(e) => missing.push(format!("kill {kill}: checksums unreadable: {e}")),
        Ok(sums) => {
            let present: HashSet<(u64, u32, String)> = sums.into_iter().collect();
            for (epoch, step, attempt, sha) in &acked.checksums {
                if !present.contains(&(*step, 0, sha.clone())) {
                    missing.push(format!(
                        "kill {kill}: checksum of step {step} attempt {attempt} = {sha} (acked after kill {epoch}) missing"
                    ));
                }
            }
        }
    }

    match checkpoints {
        Err(e) => missing.push(format!("kill {kill}: checkpoints unreadable: {e}")),
        Ok(ckpts) => {
            for (epoch, step, attempt, key, sha, bytes) in &acked.checkpoints {
                let found = ckpts.iter().find(|c| c.step == *step);
                let ok = found.is_some_and(|c| {
                    c.attempt == *attempt
                        && c.prefix == checkpoint_prefix(run_id, *step, *attempt)
                        && c.unusable.is_none()
                        && c.files.len() == 1
                        && c.files[0].key == *key
                        && c.files[0].sha256 == *sha
                        && c.files[0].bytes == *bytes
                });
                if !ok {
                    missing.push(format!(
                        "kill {kill}: checkpoint at step {step} attempt {attempt} (acked after kill {epoch}) \
                         missing or different: found {found:?}"
                    ));
                }
            }
        }
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_keeps_every_acknowledged_write_across_20_sigkills() {
    let started = Instant::now();
    let deadline = started + TEST_BUDGET;
    let mut cluster = Cluster::start();
    cluster.write_dataset(4);
    // Keep every checkpoint (garbage collection would legitimately delete acknowledged ones)
    // and allow plenty of automatic resumes in case the worker is ever declared dead.
    let spec = cluster.write_spec("durable", 1, 1_000_000, "checkpoint_keep = 100000");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replacen("seed = 11", "seed = 11\nmax_retries = 100", 1)).unwrap();

    let shared = Arc::new(Shared {
        acked: Mutex::new(Acked::default()),
        trouble: Mutex::new(Trouble::default()),
        epoch: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        in_flight: AtomicU32::new(0),
    });

    // Register, submit, and pick the assignment up before any kill.
    let mut client = connect(&cluster.endpoint).await.expect("coordinator up");
    let registered = client
        .register(worker_client_request("127.0.0.1:9"))
        .await
        .unwrap()
        .into_inner();
    let (worker_id, worker_secret) = (registered.worker_id, registered.worker_secret);
    shared.ack(|a, e| a.registrations.push((e, worker_id.clone())));
    let run_id = cluster.submit(&spec);
    let assignment = loop {
        assert!(Instant::now() < deadline, "no assignment");
        let req = pb::AwaitAssignmentRequest {
            worker_id: worker_id.clone(),
            wait_ms: 2000,
        };
        if let Some(Outcome::Assignment(a)) = client.await_assignment(req).await.unwrap().into_inner().outcome {
            break a;
        }
    };
    assert_eq!((assignment.run_id.as_str(), assignment.rank), (run_id.as_str(), 0));
    drop(client);

    let worker = FakeWorker {
        endpoint: cluster.endpoint.clone(),
        artifacts: cluster.path("artifacts"),
        run_id: run_id.clone(),
        worker_id: worker_id.clone(),
        worker_secret,
        attempt: assignment.attempt,
        step: 0,
        shared: shared.clone(),
        client: None,
        last_heartbeat: None,
        deadline,
    };
    let traffic = tokio::spawn(worker.run());

    // Traffic is flowing before the first kill.
    while shared.acked.lock().unwrap().metrics.is_empty() {
        assert!(Instant::now() < deadline, "no report was ever acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut failures = vec![];
    let mut kills = 0;
    let mut mid_request = 0;
    let mut traffic = Some(traffic);
    for kill in 1..=KILLS {
        assert!(Instant::now() < deadline, "test budget spent after {} kills", kill - 1);
        let delay = Duration::from_millis(rng.random_range(50..=400));
        tokio::time::sleep(delay).await;
        if shared.in_flight.load(Ordering::SeqCst) > 0 {
            mid_request += 1;
        }
        cluster.kill_coordinator(); // SIGKILL, then reaped: the store's lock is free
        kills += 1;
        shared.epoch.store(kill, Ordering::SeqCst);
        if kill == KILLS {
            // The last check covers every ack: stop the worker and wait for its last reply.
            shared.stop.store(true, Ordering::SeqCst);
            let task = traffic.take().unwrap();
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the fake worker did not stop")
                .expect("the fake worker panicked");
        } else {
            // Replies already on the wire get recorded; later ones are checked at the next kill.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snapshot = shared.acked.lock().unwrap().clone();
        let missing = check_store(&cluster.path("db"), &run_id, &snapshot, kill);
        if !missing.is_empty() {
            eprintln!(
                "kill {kill} (after {delay:?} of traffic): {} acknowledged writes missing or unreadable",
                missing.len()
            );
            for m in missing.iter().take(50) {
                eprintln!("  {m}");
            }
        }
        failures.extend(missing);
        if kill < KILLS {
            cluster.restart_coordinator();
        }
    }

    let acked = shared.acked.lock().unwrap().clone();
    let trouble = shared.trouble.lock().unwrap();
    let windows_with_acks = (1..KILLS)
        .filter(|e| acked.per_epoch.get(e).is_some_and(|n| *n > 0))
        .count();
    println!(
        "durability: {kills} SIGKILLs ({mid_request} with a request in flight) in {:.1}s; acknowledged {} metric points, {} checksums, {} checkpoints, \
         {} registrations (last step {}); {}/{} restarts saw acks; {} transport errors, {} rejoins, {} app errors",
        started.elapsed().as_secs_f64(),
        acked.metrics.len(),
        acked.checksums.len(),
        acked.checkpoints.len(),
        acked.registrations.len(),
        acked.checksums.iter().map(|c| c.1).max().unwrap_or(0),
        windows_with_acks,
        KILLS - 1,
        trouble.transport_errors,
        trouble.rejoins,
        trouble.app_errors.len(),
    );
    for e in trouble.app_errors.iter().take(10) {
        println!("  app error: {e}");
    }
    assert!(
        failures.is_empty(),
        "{} acknowledged writes were missing or unreadable after a SIGKILL; first ones:\n{}",
        failures.len(),
        failures.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(kills >= 20, "only {kills} kills");
    assert!(
        !acked.metrics.is_empty() && !acked.checksums.is_empty() && !acked.checkpoints.is_empty(),
        "some kind of write was never acknowledged"
    );
}
