//! The system under test: a scratch directory, a phantom dataset, and a real `coordinator serve`
//! child process on loopback, plus what /proc says about it (resident memory, CPU time).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long `coordinator serve` may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to stop after SIGTERM (it waits one heartbeat interval, 2.5 s at
/// --dead-after-secs 30, to tell workers it is going away) before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A scratch directory, removed when dropped unless kept.
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl WorkDir {
    pub fn create(base: Option<&Path>, keep: bool) -> anyhow::Result<WorkDir> {
        let base = base.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = base.join(format!("voxelfleet-bench-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create the scratch directory {}", path.display()))?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A fresh bearer token from the kernel's random source (`bench-` and 32 hex digits).
pub fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for a token")?;
    Ok(format!("bench-{}", hex(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The coordinator to benchmark: `--coordinator-bin`, else `coordinator` next to this
/// executable (same target dir), else `$CARGO_TARGET_DIR/release/coordinator`.
pub fn resolve_coordinator_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--coordinator-bin {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let mut tried = vec![];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        tried.push(dir.join("coordinator"));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        let candidate = PathBuf::from(target).join("release").join("coordinator");
        if !tried.contains(&candidate) {
            tried.push(candidate);
        }
    }
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let listing: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "no coordinator executable found (looked at: {}); build it with `cargo build --release --bin coordinator` \
         or pass --coordinator-bin PATH",
        if listing.is_empty() {
            "nothing".to_string()
        } else {
            listing.join(", ")
        }
    )
}

/// Writes `cases` phantoms of `shape` with `<bin> dataset synth`.
pub async fn synth_dataset(bin: &Path, out: &Path, cases: usize, shape: &str) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(bin)
        .args([
            "dataset",
            "synth",
            "--cases",
            &cases.to_string(),
            "--shape",
            shape,
            "--out",
        ])
        .arg(out)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "`{} dataset synth` failed ({}): {}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A running `coordinator serve`. Its stderr goes to `log`; `stop` ends it (SIGTERM, then
/// SIGKILL after a grace period). Dropping it kills the process.
pub struct CoordinatorProc {
    pub pid: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
    exit: watch::Receiver<Option<String>>,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<String>>,
}

impl CoordinatorProc {
    pub async fn spawn(bin: &Path, data_dir: &Path, log: &Path, token: &str) -> anyhow::Result<CoordinatorProc> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create the coordinator log {}", log.display()))?;
        let mut child = tokio::process::Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--dead-after-secs",
                "30",
                "--data-dir",
            ])
            .arg(data_dir)
            .env(protocol::auth::TOKEN_ENV, token)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("the coordinator exited at once")?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let first = tokio::select! {
            line = tokio::time::timeout(STARTUP_TIMEOUT, lines.next_line()) => line,
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                bail!("the coordinator exited ({status}) before it listened{}", log_tail(log));
            }
        };
        let line = match first {
            Err(_) => bail!(
                "the coordinator printed nothing within {STARTUP_TIMEOUT:?}{}",
                log_tail(log)
            ),
            Ok(Err(e)) => bail!("cannot read the coordinator's output: {e}"),
            Ok(Ok(None)) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                bail!("the coordinator exited ({status}) before it listened{}", log_tail(log));
            }
            Ok(Ok(Some(line))) => line,
        };
        let addr: SocketAddr = line
            .strip_prefix("coordinator listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line from the coordinator: {line:?}"))?;
        // Keep its stdout drained so a full pipe never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let (exit_tx, exit) = watch::channel(None);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let how = tokio::select! {
                status = child.wait() => match status {
                    Ok(s) => format!("exited on its own ({s})"),
                    Err(e) => format!("could not be waited for: {e}"),
                },
                _ = stop_rx => stop_child(&mut child, pid).await,
            };
            let _ = exit_tx.send(Some(how.clone()));
            how
        });
        Ok(CoordinatorProc {
            pid,
            addr,
            log: log.to_path_buf(),
            exit,
            stop_tx: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Resolves once the process has ended, with how it ended. Pending forever while it runs.
    pub async fn exited(&self) -> String {
        let mut exit = self.exit.clone();
        match exit.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().unwrap_or_default(),
            Err(_) => "its supervisor task ended".to_string(),
        }
    }

    /// The error to stop the benchmark with when the coordinator died under it.
    pub fn died(&self, how: &str) -> anyhow::Error {
        anyhow::anyhow!("the coordinator {how} during the benchmark{}", log_tail(&self.log))
    }

    /// SIGTERM, then SIGKILL after the grace period. Returns how it ended.
    pub async fn stop(&mut self) -> String {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| format!("supervisor task failed: {e}")),
            None => "already stopped".to_string(),
        }
    }
}

async fn stop_child(child: &mut tokio::process::Child, pid: u32) -> String {
    // No libc dependency for one signal: kill(1) is on every Linux box.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if term.is_ok_and(|s| s.success()) {
        match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(Ok(status)) => return format!("stopped on SIGTERM ({status})"),
            Ok(Err(e)) => return format!("could not be waited for after SIGTERM: {e}"),
            Err(_) => {}
        }
    }
    let _ = child.kill().await;
    format!("killed (did not stop within {STOP_GRACE:?} of SIGTERM)")
}

/// The last lines of the coordinator's log, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!(" (its log {} is empty)", log.display());
    }
    let tail = &lines[lines.len().saturating_sub(15)..];
    format!("; its log {} ends with:\n  {}", log.display(), tail.join("\n  "))
}

/// VmRSS of `pid` in KiB, or None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of `pid` ("self" for this process) in seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux target we run on (reading it needs sysconf, i.e. libc).
    Some((utime + stime) as f64 / 100.0)
}

/// Peak resident memory of the coordinator, sampled every 100 ms: over the whole benchmark, and
/// over the measurement window alone.
#[derive(Default)]
pub struct RssPeaks {
    pub overall_kib: AtomicU64,
    pub window_kib: AtomicU64,
    pub last_kib: AtomicU64,
}

pub fn sample_rss(pid: u32, in_window: impl Fn() -> bool + Send + 'static) -> (Arc<RssPeaks>, JoinHandle<()>) {
    let peaks = Arc::new(RssPeaks::default());
    let out = peaks.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(kib) = rss_kib(pid) else { return };
            peaks.last_kib.store(kib, Ordering::Relaxed);
            peaks.overall_kib.fetch_max(kib, Ordering::Relaxed);
            if in_window() {
                peaks.window_kib.fetch_max(kib, Ordering::Relaxed);
            }
        }
    });
    (out, task)
}
