//! Shared harness for the end-to-end tests: real `coordinator serve` and `coordinator worker`
//! processes on loopback, a real sled directory, and real NIfTI files in a temp dir.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use protocol::auth::{AuthChannel, SharedToken, TOKEN_ENV};
use protocol::pb;
use protocol::pb::control_service_client::ControlServiceClient;
use tonic::transport::Endpoint;

pub const BIN: &str = env!("CARGO_BIN_EXE_coordinator");

/// Every process of a test cluster shares this bearer token, so the tests run the
/// authenticated path a deployment runs.
pub const TOKEN: &str = "e2e-test-token-0123456789abcdef";

/// A run's final checkpoint, as two runs that end with the same state must share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalCheckpoint {
    pub weights_sha256: String,
    /// Of the `model.bin` bytes: the same weights must give the same bytes.
    pub model_bin_sha256: String,
}

/// A child process killed when the test ends, pass or fail.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    pub coordinator: Option<Proc>,
    pub workers: Vec<Proc>,
    dead_after_secs: u64,
}

/// Spawns `coordinator serve` and reads the bound address from its first line of output.
fn spawn_coordinator(db: &Path, listen: &str, dead_after_secs: u64) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            listen,
            "--dead-after-secs",
            &dead_after_secs.to_string(),
            "--data-dir",
        ])
        .arg(db)
        .env(
            "RUST_LOG",
            std::env::var("VOXELFLEET_TEST_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env(TOKEN_ENV, TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = listening_address(&mut child);
    (Proc(child), addr)
}

/// The address `coordinator serve` prints on its first line of output, read from its stdout.
pub fn listening_address(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.strip_prefix("coordinator listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line from coordinator: {line:?}"))
        .to_string()
}

/// A CA and a certificate it signed for 127.0.0.1 and localhost, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
pub fn make_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-server.pem")),
        dir.join(format!("{name}-server.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

impl Cluster {
    /// Starts a coordinator on a free loopback port with its store in a fresh temp dir.
    pub fn start() -> Cluster {
        Cluster::start_with_dead_after(10)
    }

    /// As `start`, declaring workers dead after `secs` without a heartbeat.
    pub fn start_with_dead_after(secs: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (proc, addr) = spawn_coordinator(&dir.path().join("db"), "127.0.0.1:0", secs);
        Cluster {
            dir,
            endpoint: format!("http://{addr}"),
            coordinator: Some(proc),
            workers: vec![],
            dead_after_secs: secs,
        }
    }

    /// Starts a new coordinator process on the same address and store, as a supervisor would
    /// after a crash.
    pub fn restart_coordinator(&mut self) {
        assert!(self.coordinator.is_none(), "kill the old coordinator first");
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let (proc, _) = spawn_coordinator(&self.path("db"), &addr, self.dead_after_secs);
        self.coordinator = Some(proc);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Spawns `n` worker processes that each exit after one run.
    pub fn spawn_workers(&mut self, n: usize) {
        self.spawn_workers_with(n, &["--max-runs", "1"]);
    }

    /// Spawns `n` worker processes with extra command-line arguments.
    pub fn spawn_workers_with(&mut self, n: usize, extra: &[&str]) {
        self.spawn_workers_threads(n, extra, 1);
    }

    /// As `spawn_workers_with`, each worker's tensor kernels on `threads` rayon threads.
    pub fn spawn_workers_threads(&mut self, n: usize, extra: &[&str], threads: usize) {
        for _ in 0..n {
            let child = Command::new(BIN)
                .args([
                    "worker",
                    "--coordinator",
                    &self.endpoint,
                    "--collective-timeout-secs",
                    "60",
                ])
                .args(extra)
                .env("RAYON_NUM_THREADS", threads.to_string())
                .env(
                    "RUST_LOG",
                    std::env::var("VOXELFLEET_TEST_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .env(TOKEN_ENV, TOKEN)
                // The cluster's workers share one node-wide case cache, kept out of $HOME.
                .env("VOXELFLEET_CACHE_DIR", self.path("cache"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            self.workers.push(Proc(child));
        }
    }

    /// Writes `cases` small phantoms (32^3) into `<dir>/dataset`.
    pub fn write_dataset(&self, cases: usize) -> PathBuf {
        let out = self.path("dataset");
        let opts = data::SynthOptions {
            cases,
            seed: 3,
            shape: [32, 32, 32],
            ..Default::default()
        };
        data::write_phantom_dataset(&out, &opts).unwrap();
        out
    }

    /// Writes a tiny run spec; `extra_train` lines are appended to its [train] table.
    pub fn write_spec(&self, name: &str, world_size: u32, steps: u64, extra_train: &str) -> PathBuf {
        self.write_spec_with(name, world_size, steps, "", extra_train)
    }

    /// As `write_spec`, with `extra_top` lines among the top-level keys (e.g. `max_retries`).
    pub fn write_spec_with(
        &self,
        name: &str,
        world_size: u32,
        steps: u64,
        extra_top: &str,
        extra_train: &str,
    ) -> PathBuf {
        let text = format!(
            r#"name = "{name}"
world_size = {world_size}
seed = 11
{extra_top}

[dataset]
url = "{dataset}"
eval_cases = 2

[model]
arch = "unet"
base_width = 4
depth = 2

[train]
steps = {steps}
patch = [16, 16, 16]
lr = 0.003
warmup_steps = 1
checksum_every = 1
metrics_every = 2
{extra_train}

[artifacts]
url = "{artifacts}"
"#,
            dataset = self.path("dataset").display(),
            artifacts = self.path("artifacts").display(),
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs a CLI command against this cluster's coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(["--coordinator", &self.endpoint])
            .env(TOKEN_ENV, TOKEN)
            .output()
            .unwrap()
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = args.to_vec();
        full.push("--json");
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    pub fn submit(&self, spec: &Path) -> String {
        let run = self.cli_json(&["submit", spec.to_str().unwrap()]);
        run["run_id"].as_str().unwrap().to_string()
    }

    /// Polls `coordinator show` until the run reaches one of `states`.
    /// Waits (up to 240 s) until the run reaches an end state or is interrupted, and returns
    /// its detail.
    pub fn wait_for_end(&self, run_id: &str) -> serde_json::Value {
        self.wait_for_state(
            run_id,
            &["Completed", "Failed", "Cancelled", "Interrupted"],
            Duration::from_secs(240),
        )
    }

    pub fn wait_for_state(&self, run_id: &str, states: &[&str], timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let detail = self.cli_json(&["show", run_id]);
            let state = detail["run"]["state"].as_str().unwrap().to_string();
            if states.contains(&state.as_str()) {
                return detail;
            }
            assert!(
                Instant::now() < deadline,
                "run {run_id} still {state} after {timeout:?}: {detail}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the coordinator with SIGKILL: whatever it acknowledged must already be durable.
    pub fn kill_coordinator(&mut self) {
        self.coordinator.take();
    }

    /// SIGKILLs worker `index` (in spawn order): no goodbye, only missing heartbeats and a
    /// closed ring link.
    pub fn kill_worker(&mut self, index: usize) {
        let w = &mut self.workers[index].0;
        let _ = w.kill();
        let _ = w.wait();
    }

    /// The run's step as the coordinator last recorded it.
    pub fn step(&self, run_id: &str) -> u64 {
        self.cli_json(&["show", run_id])["run"]["step"].as_u64().unwrap()
    }

    /// Waits until the run is Running at `min_step` or beyond.
    pub fn wait_for_step(&self, run_id: &str, min_step: u64, timeout: Duration) {
        self.wait_until(&format!("{run_id} to reach step {min_step}"), timeout, || {
            let detail = self.cli_json(&["show", run_id]);
            detail["run"]["state"] == "Running" && detail["run"]["step"].as_u64().unwrap() >= min_step
        });
    }

    /// The weights hash recorded in the run's final checkpoint (its `state.json`).
    pub fn final_weights(&self, detail: &serde_json::Value) -> String {
        self.final_checkpoint(detail).weights_sha256
    }

    /// What the run's final checkpoint holds: the weights hash its `state.json` records, which
    /// the coordinator's record of the checkpoint must carry too, and the SHA-256 of its
    /// `model.bin` as read from the artifacts directory.
    pub fn final_checkpoint(&self, detail: &serde_json::Value) -> FinalCheckpoint {
        use sha2::{Digest, Sha256};
        let finals: Vec<&serde_json::Value> = detail["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["is_final"] == true)
            .collect();
        assert_eq!(finals.len(), 1, "{detail}");
        let dir = self.path("artifacts").join(finals[0]["prefix"].as_str().unwrap());
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
        let weights_sha256 = state["weights_sha256"].as_str().unwrap().to_string();
        assert_eq!(
            finals[0]["weights_sha256"], weights_sha256,
            "the checkpoint's record and its state.json name different weights"
        );
        let model = std::fs::read(dir.join("model.bin")).unwrap();
        FinalCheckpoint {
            weights_sha256,
            model_bin_sha256: hex::encode(Sha256::digest(&model)),
        }
    }

    /// Event kinds of a run, in order.
    pub fn event_kinds(detail: &serde_json::Value) -> Vec<String> {
        detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn wait_workers_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for w in &mut self.workers {
            loop {
                if w.0.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "a worker did not exit within {timeout:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `coordinator workers --json`, as (worker id, state) pairs.
    pub fn worker_states(&self) -> Vec<(String, String)> {
        let list = self.cli_json(&["workers"]);
        list.as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["worker_id"].as_str().unwrap().to_string(),
                    w["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Polls until `check` holds, failing with `what` after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A channel to the coordinator whose requests carry the cluster's token.
    pub async fn channel(&self) -> AuthChannel {
        let channel = Endpoint::from_shared(self.endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        SharedToken::new(TOKEN).unwrap().channel(channel)
    }

    pub async fn control(&self) -> ControlServiceClient<AuthChannel> {
        ControlServiceClient::new(self.channel().await)
    }
}

pub fn worker_client_request(peer: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        host: "test".into(),
        peer_address: peer.into(),
        device_kind: "cpu".into(),
        device_memory_bytes: 0,
        version: "test".into(),
        ..Default::default()
    }
}

/// A worker played by the test over the real gRPC API: registered, never training.
pub async fn fake_worker(
    cluster: &Cluster,
    peer: &str,
) -> (
    protocol::pb::worker_service_client::WorkerServiceClient<AuthChannel>,
    String,
) {
    fake_worker_on(cluster, peer, "cpu").await
}

/// As `fake_worker`, with a device kind (`cpu`, `cuda:0`).
pub async fn fake_worker_on(
    cluster: &Cluster,
    peer: &str,
    device_kind: &str,
) -> (
    protocol::pb::worker_service_client::WorkerServiceClient<AuthChannel>,
    String,
) {
    let mut client = protocol::pb::worker_service_client::WorkerServiceClient::new(cluster.channel().await);
    let mut req = worker_client_request(peer);
    req.device_kind = device_kind.into();
    let id = client.register(req).await.unwrap().into_inner().worker_id;
    (client, id)
}

/// One long-poll for an assignment.
pub async fn poll(
    client: &mut protocol::pb::worker_service_client::WorkerServiceClient<AuthChannel>,
    worker_id: &str,
    wait_ms: u32,
) -> Option<pb::await_assignment_response::Outcome> {
    let req = pb::AwaitAssignmentRequest {
        worker_id: worker_id.into(),
        wait_ms,
    };
    client.await_assignment(req).await.unwrap().into_inner().outcome
}
