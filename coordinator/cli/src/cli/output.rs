//! Human-readable tables and JSON for CLI output. Tables are plain padded columns, so they
//! survive `grep`, `less` and logs.
//!
//! Every line goes out through [`print_line`] (the CLI's `println!` is a macro that calls it):
//! std's `println!` panics when the reader of a pipe has left (`coordinator runs | head -5`),
//! and a command whose reader is gone has nothing left to do.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use protocol::pb;
use serde_json::{Value, json};

/// Whether a closed stdout ends the process (true) or only silences later output (false, for
/// commands that own child processes and must stop them on their way out).
static EXIT_ON_CLOSED_STDOUT: AtomicBool = AtomicBool::new(true);
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// A closed stdout silences this command's output instead of ending it: for `serve`, which
/// serves on, and `demo`, whose worker processes are stopped by its own shutdown path.
pub fn keep_running_on_closed_stdout() {
    EXIT_ON_CLOSED_STDOUT.store(false, Ordering::SeqCst);
}

/// Writes one line to stdout. A reader that closed the pipe ends the command quietly (exit 0:
/// it read what it wanted); any other write error is reported once, on stderr.
pub fn print_line(args: std::fmt::Arguments<'_>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(e) = written {
        STDOUT_CLOSED.store(true, Ordering::SeqCst);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
        }
        if EXIT_ON_CLOSED_STDOUT.load(Ordering::SeqCst) {
            // `exit` flushes stdout, which takes this lock.
            drop(out);
            std::process::exit(if e.kind() == std::io::ErrorKind::BrokenPipe {
                0
            } else {
                1
            });
        }
    }
}

/// An error and its causes on one line, each cause once: many of our error types print their
/// source in their own message and also chain it, so anyhow's `{:#}` said the same thing up to
/// four times.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if said.is_empty() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

pub fn unix_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn run_json(r: &pb::RunInfo) -> Value {
    json!({
        "run_id": r.run_id, "name": r.name, "state": r.state, "world_size": r.world_size,
        "step": r.step, "total_steps": r.total_steps, "message": r.message,
        "submitted_unix_ms": r.submitted_unix_ms, "updated_unix_ms": r.updated_unix_ms, "workers": r.workers,
        "attempt": r.attempt, "retries": r.retries, "max_retries": r.max_retries, "retry_budget": r.retry_budget,
        "pause_requested": r.pause_requested, "priority": r.priority,
        "queue_position": (r.queue_position > 0).then_some(r.queue_position),
        "waiting_reason": (!r.waiting_reason.is_empty()).then_some(&r.waiting_reason),
        "sweep_id": (!r.sweep_id.is_empty()).then_some(&r.sweep_id),
        "device": (!r.device.is_empty()).then_some(&r.device),
    })
}

pub fn run_row(r: &pb::RunInfo) -> Vec<String> {
    vec![
        r.run_id.clone(),
        r.name.clone(),
        r.state.clone(),
        format!("{}/{}", r.step, r.total_steps),
        r.world_size.to_string(),
        r.priority.to_string(),
        unix_ms(r.submitted_unix_ms),
        run_message(r),
    ]
}

/// A queued run's place in the queue and why it waits, else the run's last message.
pub fn run_message(r: &pb::RunInfo) -> String {
    match (r.queue_position, r.waiting_reason.is_empty()) {
        (0, _) => r.message.clone(),
        (pos, true) => format!("#{pos} in the queue"),
        (pos, false) => format!("#{pos} in the queue: {}", r.waiting_reason),
    }
}

pub const RUN_HEADERS: [&str; 8] = ["RUN", "NAME", "STATE", "STEP", "WORKERS", "PRI", "SUBMITTED", "MESSAGE"];

pub fn metric_json(m: &pb::Metric) -> Value {
    json!({ "rank": m.rank, "step": m.step, "name": m.name, "value": m.value, "unix_ms": m.unix_ms })
}

pub fn checkpoint_json(c: &pb::CheckpointInfo) -> Value {
    json!({
        "step": c.step, "prefix": c.prefix, "is_final": c.is_final, "committed_unix_ms": c.committed_unix_ms,
        "attempt": c.attempt, "resume_candidate": c.resume_candidate,
        "unusable": (!c.unusable.is_empty()).then_some(&c.unusable),
        "eval_dice": c.has_eval_dice.then_some(c.eval_dice), "best": c.is_best,
        "bytes": checkpoint_bytes(c), "sha256": checkpoint_digest(c),
        "weights_sha256": (!c.weights_sha256.is_empty()).then_some(&c.weights_sha256),
        "files": c.files.iter().map(|f| json!({"key": f.key, "sha256": f.sha256, "bytes": f.bytes})).collect::<Vec<_>>(),
    })
}

pub fn checkpoint_bytes(c: &pb::CheckpointInfo) -> u64 {
    c.files.iter().map(|f| f.bytes).sum()
}

/// One hash for a whole checkpoint: SHA-256 over its files' names and hashes, in order. Two
/// listings show the same digest exactly when every file is the same.
pub fn checkpoint_digest(c: &pb::CheckpointInfo) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in &c.files {
        let name = f.key.rsplit('/').next().unwrap_or(&f.key);
        h.update(format!("{name} {}\n", f.sha256));
    }
    hex::encode(h.finalize())
}

/// Short flags for a checkpoint row: final, best by Dice, unusable.
pub fn checkpoint_marks(c: &pb::CheckpointInfo) -> String {
    let mut marks = vec![];
    if c.is_final {
        marks.push("final".to_string());
    }
    if c.is_best {
        marks.push("best".into());
    }
    if c.has_eval_dice {
        marks.push(format!("dice {:.3}", c.eval_dice));
    }
    if !c.unusable.is_empty() {
        marks.push("unusable".into());
    }
    marks.join(", ")
}

pub fn event_json(e: &pb::RunEvent) -> Value {
    json!({ "unix_ms": e.unix_ms, "kind": e.kind, "step": e.step, "message": e.message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("listen on 127.0.0.1:1: {source}")]
        struct Bind {
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Wrapper(#[from] Bind);
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::from(Wrapper(Bind { source: io }));
        // What `{:#}` printed: the same message three times over.
        assert_eq!(format!("{e:#}").matches("Address already in use").count(), 3);
        assert_eq!(error_text(&e), "listen on 127.0.0.1:1: Address already in use");
        // Context that adds something is kept, in order.
        let e = anyhow::anyhow!("connection refused").context("cannot reach the coordinator at http://x");
        assert_eq!(
            error_text(&e),
            "cannot reach the coordinator at http://x: connection refused"
        );
    }

    #[test]
    fn dates_and_tables() {
        assert_eq!(unix_ms(0), "-");
        assert_eq!(unix_ms(1_764_374_400_000), "2025-11-29 00:00:00");
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1");
    }
}
