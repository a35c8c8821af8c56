//! Security by default, end to end: the bearer token a coordinator requires (its own when given
//! none), TLS, deadlines on every CLI call, and a coordinator that no worker report or user spec
//! can crash or lead into storing a run that cannot work.

use std::io::{BufRead, BufReader, Lines};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Cluster, Proc, TOKEN, make_pki};
use protocol::auth::{TOKEN_ENV, TOKEN_FILE_ENV};
use protocol::pb;
use protocol::pb::worker_service_client::WorkerServiceClient;
use protocol::tls::TLS_CA_ENV;

/// A `coordinator serve` started by a test, with its output kept open for reading.
struct Serve {
    proc: Proc,
    addr: String,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Serve {
    /// Starts `serve` on a free port with `args`; `token` is its VOXELFLEET_TOKEN, if any.
    fn start(data_dir: &Path, token: Option<&str>, args: &[&str]) -> Serve {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove(TOKEN_ENV)
            .env_remove(TOKEN_FILE_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(token) = token {
            command.env(TOKEN_ENV, token);
        }
        let mut child = command.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = stdout.next().unwrap().unwrap();
        let addr = first
            .strip_prefix("coordinator listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from coordinator: {first:?}"))
            .to_string();
        Serve {
            proc: Proc(child),
            addr,
            stdout,
        }
    }

    fn next_line(&mut self) -> String {
        self.stdout.next().unwrap().unwrap()
    }

    fn alive(&mut self) -> bool {
        self.proc.0.try_wait().unwrap().is_none()
    }
}

/// A CLI call with no token in its environment unless `env` sets one.
fn cli(endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .args(["--coordinator", endpoint])
        .env_remove(TOKEN_ENV)
        .env_remove(TOKEN_FILE_ENV)
        .env_remove(TLS_CA_ENV);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_refused(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected a refusal, got success");
    let err = stderr(out);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn the_cli_without_the_token_or_with_a_wrong_one_is_refused() {
    let cluster = Cluster::start();
    let endpoint = cluster.endpoint.as_str();
    assert_refused(&cli(endpoint, &["runs"], &[]), "missing bearer token");
    assert_refused(
        &cli(endpoint, &["runs"], &[(TOKEN_ENV, "a-wrong-token-0123456789")]),
        "wrong bearer token",
    );
    let wrong = cluster.path("wrong-token");
    std::fs::write(&wrong, "another-wrong-token-0123456789\n").unwrap();
    assert_refused(
        &cli(endpoint, &["runs", "--token-file", wrong.to_str().unwrap()], &[]),
        "wrong bearer token",
    );
    // An unreadable token file is named before anything is sent.
    assert_refused(
        &cli(endpoint, &["runs", "--token-file", "/nonexistent/token"], &[]),
        "token file /nonexistent/token",
    );
    let right = cluster.path("right-token");
    std::fs::write(&right, format!("{TOKEN}\n")).unwrap();
    let out = cli(endpoint, &["runs", "--token-file", right.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The variable naming the file works as the flag does.
    let out = cli(endpoint, &["runs"], &[(TOKEN_FILE_ENV, right.to_str().unwrap())]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn serve_creates_its_own_token_requires_it_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let token_path = db.join("token");
    let mut serve = Serve::start(&db, None, &[]);
    let second = serve.next_line();
    assert!(
        second.contains(&token_path.display().to_string()) && second.contains("created"),
        "{second}"
    );
    let meta = std::fs::metadata(&token_path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_path).unwrap();
    assert_eq!(token.trim().len(), 64, "{token:?}");

    let endpoint = format!("http://{}", serve.addr);
    assert_refused(&cli(&endpoint, &["runs"], &[]), "token");
    let file = token_path.to_str().unwrap();
    let out = cli(&endpoint, &["runs", "--token-file", file], &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A second start on the same data dir reuses the token: clients keep working.
    drop(serve);
    let mut serve = Serve::start(&db, None, &[]);
    let second = serve.next_line();
    assert!(second.contains(&token_path.display().to_string()), "{second}");
    assert_eq!(std::fs::read_to_string(&token_path).unwrap(), token);
    let endpoint = format!("http://{}", serve.addr);
    let out = cli(&endpoint, &["runs", "--token-file", file], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_refused(&cli(&endpoint, &["runs"], &[]), "token");
}

#[test]
fn insecure_serves_open_and_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("open");
    let mut serve = Serve::start(&db, None, &["--insecure"]);
    assert!(serve.next_line().contains("--insecure"));
    let out = cli(&format!("http://{}", serve.addr), &["runs"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!db.join("token").exists(), "an open coordinator writes no token");

    // --insecure with a token configured anyway is a contradiction, refused by name.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure", "--data-dir"])
        .arg(dir.path().join("other"))
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert_refused(&out, "--insecure");
    assert!(stderr(&out).contains(TOKEN_ENV), "{}", stderr(&out));
}

#[test]
fn tls_connects_clients_and_workers_that_trust_the_ca_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(dir.path(), "ours");
    let (other_ca, _, _) = make_pki(dir.path(), "theirs");
    let (ca, other_ca) = (ca.to_str().unwrap(), other_ca.to_str().unwrap());
    let mut serve = Serve::start(
        &dir.path().join("db"),
        Some(TOKEN),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    let port = serve.addr.rsplit(':').next().unwrap().to_string();
    let token = [(TOKEN_ENV, TOKEN)];
    for host in ["127.0.0.1", "localhost"] {
        let endpoint = format!("https://{host}:{port}");
        let out = cli(&endpoint, &["runs", "--tls-ca", ca], &token);
        assert!(out.status.success(), "{endpoint}: {}", stderr(&out));
    }
    let https = format!("https://127.0.0.1:{port}");
    let out = cli(&https, &["runs", "--tls-ca", other_ca, "--timeout-secs", "10"], &token);
    assert_refused(&out, "certificate");
    assert_refused(&cli(&https, &["runs"], &token), "--tls-ca");
    // Plain HTTP to a TLS port gets nowhere, within the deadline.
    let out = cli(
        &format!("http://{}", serve.addr),
        &["runs", "--timeout-secs", "5"],
        &token,
    );
    assert!(!out.status.success());

    // A worker trusting the CA registers over TLS.
    let worker = Command::new(BIN)
        .args(["worker", "--coordinator", &https, "--tls-ca", ca, "--max-runs", "1"])
        .env("RUST_LOG", "warn")
        .env(TOKEN_ENV, TOKEN)
        .env_remove(TOKEN_FILE_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _worker = Proc(worker);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&https, &["workers", "--json", "--tls-ca", ca], &token);
        assert!(out.status.success(), "{}", stderr(&out));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if list.as_array().is_some_and(|l| l.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the TLS worker never registered: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(serve.alive());

    // An unreadable certificate is named by flag and file, and nothing is served.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-key", key.to_str().unwrap()])
        .args(["--tls-cert", "/nonexistent/cert.pem", "--data-dir"])
        .arg(dir.path().join("db2"))
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert_refused(&out, "--tls-cert /nonexistent/cert.pem");
}

#[tokio::test]
async fn malformed_worker_reports_get_errors_and_the_coordinator_keeps_serving() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(4);
    let run_id = cluster.submit(&cluster.write_spec("target", 1, 5, ""));
    let mut client = WorkerServiceClient::new(cluster.channel().await);
    let sha = "0".repeat(64);
    let metrics = |run_id: &str, rank: u32, sha: &str| pb::ReportMetricsRequest {
        worker_id: "worker-000001".into(),
        run_id: run_id.into(),
        rank,
        metrics: vec![],
        checksums: vec![pb::WeightsChecksum {
            step: 1,
            sha256: sha.into(),
        }],
        attempt: 0,
    };
    let finish = |rank: u32, sha: &str| pb::FinishRunRequest {
        worker_id: "worker-000001".into(),
        run_id: run_id.clone(),
        rank,
        final_step: 5,
        weights_sha256: sha.into(),
        attempt: 0,
    };
    let commit = |sha: &str| pb::CommitCheckpointRequest {
        worker_id: "worker-000001".into(),
        run_id: run_id.clone(),
        step: 1,
        files: vec![pb::CheckpointFile {
            key: format!("runs/{run_id}/checkpoints/0000000001-a0/model.bin"),
            sha256: sha.into(),
            bytes: 1,
        }],
        ..Default::default()
    };
    use tonic::Code::{InvalidArgument, NotFound};
    let multibyte = "é".repeat(32); // 64 bytes, sliced by bytes it would split a character
    let cases: Vec<(&str, Result<(), tonic::Status>, tonic::Code, &str)> = vec![
        (
            "short checksum",
            client.report_metrics(metrics(&run_id, 0, "abc")).await.map(drop),
            InvalidArgument,
            "checksums.sha256",
        ),
        (
            "multibyte checksum",
            client.report_metrics(metrics(&run_id, 0, &multibyte)).await.map(drop),
            InvalidArgument,
            "checksums.sha256",
        ),
        (
            "uppercase file hash",
            client.commit_checkpoint(commit(&"AB".repeat(32))).await.map(drop),
            InvalidArgument,
            "files.sha256",
        ),
        (
            "empty weights hash",
            client.finish_run(finish(0, "")).await.map(drop),
            InvalidArgument,
            "weights_sha256",
        ),
        (
            "short weights hash on a checkpoint",
            client
                .commit_checkpoint(pb::CommitCheckpointRequest {
                    weights_sha256: "abc".into(),
                    ..commit(&sha)
                })
                .await
                .map(drop),
            InvalidArgument,
            "weights_sha256",
        ),
        (
            "unknown run",
            client
                .report_metrics(metrics("run-999999-00000000", 0, &sha))
                .await
                .map(drop),
            NotFound,
            "run-999999-00000000",
        ),
        (
            "rank out of range in a report",
            client.report_metrics(metrics(&run_id, 7, &sha)).await.map(drop),
            InvalidArgument,
            "rank 7",
        ),
        (
            "rank out of range at the finish",
            client.finish_run(finish(7, &sha)).await.map(drop),
            InvalidArgument,
            "rank 7",
        ),
        (
            "rank out of range in a failure",
            client
                .report_failure(pb::ReportFailureRequest {
                    worker_id: "worker-000001".into(),
                    run_id: run_id.clone(),
                    rank: u32::MAX,
                    message: "x".repeat(1 << 20),
                    ..Default::default()
                })
                .await
                .map(drop),
            InvalidArgument,
            "out of range",
        ),
        (
            "path in a run id",
            client.report_metrics(metrics("../../etc", 0, &sha)).await.map(drop),
            InvalidArgument,
            "run id",
        ),
        (
            "path in a worker id",
            client
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: "a/../b".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            InvalidArgument,
            "worker id",
        ),
        (
            "NUL in a worker id",
            client
                .register(pb::RegisterRequest {
                    worker_id: "w\0".into(),
                    peer_address: "127.0.0.1:9".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            InvalidArgument,
            "worker id",
        ),
    ];
    for (what, result, code, needle) in cases {
        let status = result.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: {}", status.message());
    }
    // Still serving, the run untouched.
    assert!(cluster.coordinator.as_mut().unwrap().0.try_wait().unwrap().is_none());
    let runs = cluster.cli_json(&["runs"]);
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    assert_eq!(runs[0]["state"], "Queued", "{runs}");
}

#[test]
fn a_cli_call_to_a_coordinator_that_never_answers_fails_within_its_deadline() {
    // Accepts connections (the kernel completes the handshakes) and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    for args in [
        &["runs"][..],
        &["show", "run-000001-00000000"],
        &["metrics", "run-000001-00000000"],
    ] {
        let started = Instant::now();
        let mut full = args.to_vec();
        full.extend(["--timeout-secs", "2"]);
        let out = cli(&endpoint, &full, &[(TOKEN_ENV, TOKEN)]);
        let took = started.elapsed();
        assert_refused(&out, "did not");
        let err = stderr(&out);
        assert!(err.contains("within 2 s") && err.contains(&endpoint), "{args:?}: {err}");
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
    drop(listener);
}

#[test]
fn submit_refuses_unusable_locations_by_field_and_stores_nothing() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);
    let spec = cluster.write_spec("probe", 1, 5, "");
    let text = std::fs::read_to_string(&spec).unwrap();
    let artifacts = cluster.path("artifacts").display().to_string();
    let dataset = cluster.path("dataset").display().to_string();
    let a_file = cluster.path("a-file");
    std::fs::write(&a_file, "not a directory").unwrap();
    let a_file = a_file.display().to_string();
    let missing = cluster.path("no-such-dataset").display().to_string();
    for (name, from, to, field) in [
        ("proc", &artifacts, "/proc/x", "artifacts.url"),
        ("file-artifacts", &artifacts, a_file.as_str(), "artifacts.url"),
        ("file-dataset", &dataset, a_file.as_str(), "dataset.url"),
        ("missing-dataset", &dataset, missing.as_str(), "dataset.url"),
    ] {
        let path = cluster.path(&format!("{name}.toml"));
        std::fs::write(&path, text.replace(from.as_str(), to)).unwrap();
        let out = cluster.cli(&["submit", path.to_str().unwrap()]);
        assert_refused(&out, field);
        assert!(stderr(&out).contains(to), "{name}: {}", stderr(&out));
    }
    assert!(!Path::new(&missing).exists(), "a probe must not create the dataset");
    assert_eq!(cluster.cli_json(&["runs"]), serde_json::json!([]));
}

#[test]
fn a_step_too_large_for_the_worker_fails_the_run_naming_patch_and_batch() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(4);
    let spec = cluster.write_spec("huge", 1, 5, "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("patch = [16, 16, 16]", "patch = [512, 512, 512]")
        .replace("base_width = 4", "base_width = 32");
    std::fs::write(&spec, text).unwrap();
    let run_id = cluster.submit(&spec);
    cluster.spawn_workers(1);
    let detail = cluster.wait_for_state(&run_id, &["Failed", "Completed"], Duration::from_secs(60));
    let message = detail["run"]["message"].as_str().unwrap();
    assert_eq!(detail["run"]["state"], "Failed", "{detail}");
    assert!(
        message.contains("train.patch") && message.contains("train.batch_size"),
        "{message}"
    );
    // Refused up front, not retried on the next worker to die the same way.
    assert_eq!(detail["run"]["retries"], 0, "{detail}");
    cluster.wait_workers_exit(Duration::from_secs(30));
}
