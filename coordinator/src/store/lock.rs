//! One coordinator per data dir, and a second one told which process holds it. sled locks its
//! own `db` file too, but its error is a `Debug` dump with no owner; this lock is taken first, on
//! `coordinator.pid`, which holds the owner's pid so the refusal can name it. The kernel drops
//! the lock when the process ends however it ends, so a stale pid file never blocks a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::StoreError;

/// The lock file in the data dir; its content is the holder's pid.
pub const PID_FILE: &str = "coordinator.pid";

/// Held for the life of the store; dropping it releases the data dir.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the data dir's lock and writes our pid, or names the process that holds it.
pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
    let path = dir.join(PID_FILE);
    let io = |action: &'static str, error: std::io::Error| StoreError::Lock {
        path: dir.display().to_string(),
        action,
        error,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("open its lock file coordinator.pid", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StoreError::InUse {
                path: dir.display().to_string(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io("lock coordinator.pid", e)),
    }
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    written.map_err(|e| io("write its pid to coordinator.pid", e))?;
    Ok(DirLock { _file: file })
}

/// Why a data dir is in use, and what to do, for [`StoreError::InUse`].
pub fn in_use_message(path: &str, pid: Option<u32>) -> String {
    let holder = match pid {
        Some(pid) => format!("another coordinator (pid {pid})"),
        None => "another coordinator (pid unknown)".to_string(),
    };
    let stop = match pid {
        Some(pid) => {
            format!("stop it first (`kill {pid}`: its runs keep training and the next coordinator adopts them)")
        }
        None => "stop it first".to_string(),
    };
    format!("data dir {path} is held by {holder}: {stop}, or give this one another --data-dir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(PID_FILE)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock is per open file, so a second open in this process conflicts like a second
        // process would.
        match acquire(dir.path()) {
            Err(StoreError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected InUse, got {other:?}"),
        }
        let message = StoreError::InUse {
            path: dir.path().display().to_string(),
            pid: Some(42),
        }
        .to_string();
        assert!(message.contains("another coordinator (pid 42)"), "{message}");
        assert!(message.contains(&dir.path().display().to_string()), "{message}");
        drop(first);
        acquire(dir.path()).unwrap();
    }
}
