//! Identifier validation. Object keys and store keys are built from IDs, never from raw user
//! strings, so every ID that crosses a trust boundary passes through here first: run, sweep and
//! worker ids at the coordinator's edge, case ids before a worker builds an object key, checkpoint
//! file names before the coordinator reads or deletes an object. One rule for all of them, so an
//! id one side accepts is never refused (or worse, interpreted differently) by the other.

/// Longest accepted id. Case folders and run ids are far shorter; this bounds key sizes.
pub const MAX_ID_LEN: usize = 128;

/// Accepts 1..=128 characters of `[A-Za-z0-9_.-]`, not starting with `.` (which also rules out
/// `.` and `..`, and keeps hidden staging folders out of listings) and never containing `..`.
/// `what` names the id in the error ("run id", "case id", …).
pub fn validate_id(id: &str, what: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} must be 1..={MAX_ID_LEN} characters, got {} bytes",
            id.len()
        ));
    }
    // Debug formatting escapes NUL and control characters, so the error itself is safe to print.
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{what} {id:?} contains {c:?}; only ASCII letters, digits, `_`, `-` and `.` are allowed"
        ));
    }
    if id.starts_with('.') {
        return Err(format!("{what} {id:?} must not start with `.`"));
    }
    if id.contains("..") {
        return Err(format!("{what} {id:?} must not contain `..`"));
    }
    Ok(())
}

/// Object prefix of a run's checkpoint for `step`, written by placement `attempt`, relative to the
/// artifacts root. Workers write there and the coordinator verifies there, so the format lives in
/// one place. The attempt is part of the prefix so that a retried run re-reaching a step writes
/// new objects instead of overwriting those of a checkpoint another attempt committed.
pub fn checkpoint_prefix(run_id: &str, step: u64, attempt: u32) -> String {
    format!("runs/{run_id}/checkpoints/{step:010}-a{attempt}/")
}

#[cfg(test)]
mod tests {
    use super::validate_id;

    #[test]
    fn ids_the_system_makes_pass() {
        for good in [
            "run-000001-3fa9c2d1",
            "worker-000042",
            "BDMAP_00000001",
            "BDMAP_A0000123",
            "case-1.v2",
            "model.bin",
            // A collective ring: run id and attempt.
            "run-000001-3fa9c2d1.a3",
            "A",
        ] {
            assert_eq!(validate_id(good, "id"), Ok(()), "{good}");
        }
        assert!(validate_id(&"x".repeat(128), "id").is_ok());
    }

    #[test]
    fn rejects_path_tricks_and_odd_characters() {
        let long = "x".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\\b",
            ".hidden",
            "a..b",
            "trailing..",
            "nul\0byte",
            "has space",
            "tab\there",
            "new\nline",
            "é",
            "run:1",
            "%2e%2e",
            long.as_str(),
        ] {
            let err = validate_id(bad, "run id").expect_err(bad);
            assert!(err.starts_with("run id"), "{err}");
        }
        // The message never carries a raw control character.
        assert!(!validate_id("nul\0byte", "case id").unwrap_err().contains('\0'));
    }
}
