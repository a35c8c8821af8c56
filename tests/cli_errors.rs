//! Errors a user can act on, end to end (issue 18, items 13 to 16): real `coordinator`
//! processes, real sockets, real files. Each error must say what happened and what to do; a
//! closed stdout must end a command quietly; a scan must survive one bad entry.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Cluster, Proc, TOKEN, make_pki};
use protocol::auth::{TOKEN_ENV, TOKEN_FILE_ENV};
use protocol::tls::TLS_CA_ENV;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `coordinator` command with no token, CA or log settings from the test's environment.
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove(TOKEN_ENV)
        .env_remove(TOKEN_FILE_ENV)
        .env_remove(TLS_CA_ENV)
        .env("RUST_LOG", "warn");
    command
}

/// Runs `args` with a stdout whose reader has already left, as `| head -0` would.
fn with_closed_stdout(args: &[String]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env(TOKEN_ENV, TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// Spawns `serve` with `args` on a free port and returns it with the address it printed.
fn spawn_serve(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut command = command(&["serve", "--listen", "127.0.0.1:0", "--data-dir"]);
    command
        .arg(data_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let addr = crate::common::listening_address(&mut child);
    (child, addr)
}

/// Kills a process and returns everything it wrote on stderr.
fn kill_and_read_stderr(mut child: Child) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    err
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn case_ids(dataset: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(dataset)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("BDMAP_"))
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let cluster = Cluster::start();
    let dataset = cluster.write_dataset(4);
    let run = cluster.submit(&cluster.write_spec("piped", 1, 2, ""));
    let remote = |args: &[&str]| -> Vec<String> {
        let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        full.extend(["--coordinator".to_string(), cluster.endpoint.clone()]);
        full
    };
    let dataset = dataset.to_str().unwrap();
    let commands = [
        remote(&["runs"]),
        remote(&["show", &run]),
        remote(&["checkpoints", &run]),
        remote(&["metrics", &run]),
        remote(&["workers"]),
        remote(&["datasets"]),
        remote(&["dataset", "scan", dataset]),
        remote(&["dataset", "quarantine"]),
        remote(&["dataset", "manifests"]),
        remote(&["sweeps"]),
        remote(&["runs", "--json"]),
        vec!["model".into(), "info".into(), "unet".into()],
    ];
    for args in commands {
        let out = with_closed_stdout(&args);
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?} panicked on a closed stdout: {err}");
        assert!(out.status.success(), "{args:?} failed ({:?}): {err}", out.status);
    }
}

#[test]
fn serve_on_a_port_in_use_says_so_once_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let data_dir = dir.path().join("db");
    let out = command(&["serve", "--listen", &addr, "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&addr), "{err}");
    assert_eq!(err.matches("already in use").count(), 1, "said once: {err}");
    assert!(err.contains("--listen"), "says what to do: {err}");
    assert!(!data_dir.exists(), "the data dir was created before the bind failed");
}

#[test]
fn a_second_serve_on_a_live_data_dir_names_the_first_ones_pid() {
    let cluster = Cluster::start();
    let first = cluster.coordinator.as_ref().unwrap().0.id();
    let out = command(&["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(cluster.path("db"))
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("another coordinator (pid {first})")), "{err}");
    assert_eq!(err.matches("another coordinator").count(), 1, "said once: {err}");
    assert!(err.contains("--data-dir"), "says what to do: {err}");
    assert!(
        !err.contains("Os {") && !err.contains("WouldBlock"),
        "no Debug text: {err}"
    );
    // The first one serves on.
    assert!(cluster.cli_json(&["runs"]).as_array().unwrap().is_empty());
}

#[test]
fn a_token_file_others_can_read_gets_the_same_warning_as_the_data_dirs_own() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.txt");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (child, _) = spawn_serve(
        &dir.path().join("db"),
        &["--token-file", token_file.to_str().unwrap()],
        &[],
    );
    let err = kill_and_read_stderr(child);
    assert!(err.contains("readable by other users"), "{err}");
    assert!(err.contains(&token_file.display().to_string()), "{err}");

    // The data dir's own token at 0644: the same warning.
    let data_dir = dir.path().join("db2");
    let (child, _) = spawn_serve(&data_dir, &[], &[]);
    kill_and_read_stderr(child);
    let own = data_dir.join("token");
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (child, _) = spawn_serve(&data_dir, &[], &[]);
    let err = kill_and_read_stderr(child);
    assert!(err.contains("readable by other users"), "{err}");
    assert!(err.contains(&own.display().to_string()), "{err}");
}

/// A coordinator that takes one request and dies before answering it: it sends its HTTP/2
/// settings, reads the request, then closes its listener and the connection.
fn dying_coordinator() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let (mut got, mut buf) = (0, [0u8; 4096]);
        // The preface and settings are 33 bytes; the request's headers and body follow.
        while got < 120 {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        drop(listener);
        drop(conn);
    });
    (endpoint, handle)
}

#[test]
fn a_coordinator_that_dies_mid_request_is_named_with_what_may_have_happened() {
    let cluster = Cluster::start();
    cluster.write_dataset(3);
    let spec = cluster.write_spec("lost", 1, 2, "");
    let (endpoint, server) = dying_coordinator();
    let out = command(&["submit", spec.to_str().unwrap(), "--coordinator", &endpoint])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    server.join().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&endpoint) && err.contains("went away"), "{err}");
    assert!(err.contains("may or may not have been applied"), "{err}");
    assert!(err.contains("coordinator runs"), "{err}");

    let (endpoint, server) = dying_coordinator();
    let out = command(&["runs", "--coordinator", &endpoint])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    server.join().unwrap();
    let err = stderr(&out);
    assert!(err.contains(&endpoint) && err.contains("went away"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
}

#[test]
fn plain_http_to_tls_and_a_worker_with_the_wrong_ca_say_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = make_pki(dir.path(), "ours");
    let (other_ca, _, _) = make_pki(dir.path(), "theirs");
    let (serve, addr) = spawn_serve(
        &dir.path().join("db"),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
        &[(TOKEN_ENV, TOKEN)],
    );
    let _serve = Proc(serve);

    let out = command(&["runs", "--coordinator", &format!("http://{addr}")])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("https://{addr}")) && err.contains("--tls-ca"),
        "{err}"
    );
    assert!(err.contains("TLS"), "{err}");

    // A worker whose CA did not sign the coordinator's certificate: no retrying for the whole
    // connect timeout, and the reason is shown.
    let started = Instant::now();
    let out = command(&["worker", "--coordinator", &format!("https://{addr}")])
        .args(["--tls-ca", other_ca.to_str().unwrap(), "--connect-timeout-secs", "120"])
        .env(TOKEN_ENV, TOKEN)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(
        err.contains(&format!("https://{addr}")) && err.contains("--tls-ca"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "retried a certificate it will never trust"
    );
}

#[test]
fn quarantine_clear_keeps_a_case_without_ct_and_a_rescan_tells_of_frozen_manifests() {
    let cluster = Cluster::start();
    let dataset = cluster.write_dataset(6);
    let ids = case_ids(&dataset);
    let no_ct = &ids[2];
    std::fs::remove_file(dataset.join(no_ct).join("ct.nii.gz")).unwrap();
    let dataset_arg = dataset.to_str().unwrap();
    let out = cluster.cli(&["dataset", "scan", dataset_arg, "--name", "atlas"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // One case by name: refused, saying why and what to do.
    let out = cluster.cli(&["dataset", "quarantine", "atlas", "--clear", no_ct]);
    assert!(!out.status.success(), "cleared a case without a CT: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains(no_ct.as_str()) && err.contains("no ct.nii.gz"), "{err}");
    assert!(err.contains("rescan"), "{err}");
    // The whole quarantine: the case stays, and the output says so.
    let out = cluster.cli(&["dataset", "quarantine", "atlas", "--clear"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("stay quarantined") && text.contains(no_ct.as_str()),
        "{text}"
    );
    let held = cluster.cli_json(&["dataset", "quarantine", "atlas"]);
    assert_eq!(held.as_array().unwrap().len(), 1, "{held}");
    assert_eq!(held[0]["case_id"], no_ct.as_str());

    // A submit freezes the order; a case added later is in no frozen manifest.
    cluster.submit(&cluster.write_spec("frozen", 1, 2, ""));
    copy_dir(&dataset.join(&ids[0]), &dataset.join("BDMAP_00000999"));
    let out = cluster.cli(&["dataset", "scan", dataset_arg, "--name", "atlas"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("1 cases added"), "{text}");
    assert!(
        text.contains("frozen manifest") && text.contains("order_seed"),
        "{text}"
    );
    assert!(text.contains("order_seed = 1"), "offers an unused seed: {text}");
    // A rescan that adds nothing says nothing of it.
    let summary = cluster.cli_json(&["dataset", "scan", dataset_arg, "--name", "atlas"]);
    assert!(summary["notes"].as_array().unwrap().is_empty(), "{summary}");
}

#[test]
fn inspect_of_a_directory_names_the_files_to_give_instead() {
    let cluster = Cluster::start();
    let dataset = cluster.write_dataset(1);
    let case = dataset.join(&case_ids(&dataset)[0]);
    let out = command(&["dataset", "inspect", case.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is a directory"), "{err}");
    assert!(err.contains(&case.join("ct.nii.gz").display().to_string()), "{err}");
}
