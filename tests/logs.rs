//! Logs a cluster can read: a real `coordinator serve` whose stderr is a pipe (as under
//! Kubernetes, Slurm or systemd) writes no colour codes, `--log-format json` writes one JSON
//! object a line, and RUST_LOG picks the level.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");

/// A child process killed when the test ends, pass or fail.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `coordinator serve` with `extra` arguments and `env` until it prints its address, then
/// reads its stderr until a line satisfies `until` (bounded), kills it, and returns the lines
/// read. With `until` = None it is killed as soon as it listens: every line logged before the
/// address was printed is in the pipe by then, since stderr is written synchronously.
fn serve_log_lines(extra: &[&str], env: &[(&str, &str)], until: Option<&str>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure", "--data-dir"])
        .arg(dir.path().join("db"))
        .args(extra)
        .env_remove(protocol::telemetry::LOG_FORMAT_ENV)
        .env_remove(protocol::auth::TOKEN_ENV)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut proc = Proc(command.spawn().unwrap());
    let mut first = String::new();
    BufReader::new(proc.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("coordinator listening on "), "{first:?}");
    let stderr = proc.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    if let Some(wanted) = until {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("no log line with {wanted:?} within 30 s ({e}); stderr so far: {lines:#?}"));
            let done = line.contains(wanted);
            lines.push(line);
            if done {
                break;
            }
        }
    }
    drop(proc);
    // The process is gone: what is left in the pipe arrives, then the channel closes.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        lines.push(line);
    }
    lines
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let lines = serve_log_lines(&[], &[], Some("serving http://"));
    for line in &lines {
        assert!(!line.contains('\x1b'), "escape byte in a piped log line: {line:?}");
    }
    let serving = lines
        .iter()
        .find(|l| l.contains("serving http://"))
        .expect("a `serving` line");
    assert!(serving.contains("INFO"), "{serving:?}");
    assert!(
        lines.iter().any(|l| l.contains("WARN") && l.contains("--insecure")),
        "{lines:#?}"
    );
}

#[test]
fn json_logs_are_one_object_a_line_with_level_and_message() {
    for (args, env) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[(protocol::telemetry::LOG_FORMAT_ENV, "json")][..]),
    ] {
        let lines = serve_log_lines(args, env, Some("serving http://"));
        for line in &lines {
            assert!(!line.contains('\x1b'), "escape byte in a JSON log line: {line:?}");
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(value["timestamp"].is_string(), "{line}");
            assert!(value["fields"]["message"].is_string(), "{line}");
        }
        let serving = lines
            .iter()
            .find(|l| l.contains("serving http://"))
            .expect("a `serving` line");
        let serving: serde_json::Value = serde_json::from_str(serving).unwrap();
        assert_eq!(serving["level"], "INFO");
        assert!(
            serving["fields"]["message"]
                .as_str()
                .unwrap()
                .starts_with("serving http://"),
            "{serving}"
        );
        let warned = lines.iter().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["level"] == "WARN" && v["fields"]["message"].as_str().unwrap_or("").contains("--insecure")
        });
        assert!(warned, "{lines:#?}");
    }
}

#[test]
fn rust_log_sets_the_level() {
    // The warning about --insecure is logged before the address is printed.
    let warn = serve_log_lines(&[], &[("RUST_LOG", "warn")], None);
    assert!(
        warn.iter().any(|l| l.contains("WARN") && l.contains("--insecure")),
        "{warn:#?}"
    );
    let error_only = serve_log_lines(&[], &[("RUST_LOG", "error")], None);
    assert!(
        error_only.is_empty(),
        "RUST_LOG=error let lower levels through: {error_only:#?}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let out = Command::new(BIN)
        .args(["--log-format", "xml", "runs"])
        .env_remove(protocol::telemetry::LOG_FORMAT_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("xml") && stderr.contains("text, json"), "{stderr}");
}
