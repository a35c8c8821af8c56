//! Identifier validation. Object keys and store keys are built from IDs, never from raw user
//! strings, so every ID that crosses a trust boundary passes through here first.

/// Accepts 1..=128 characters of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn validate_id(id: &str, what: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!(
            "{what} must be 1..=128 characters, got {} characters",
            id.len()
        ));
    }
    if id.starts_with('.') {
        return Err(format!("{what} `{id}` must not start with `.`"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{what} `{id}` contains `{c}`; only letters, digits, `_`, `-` and `.` are allowed"
        ));
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
    fn rejects_path_tricks() {
        assert!(validate_id("run-000001", "run id").is_ok());
        assert!(validate_id("../etc", "run id").is_err());
        assert!(validate_id("a/b", "run id").is_err());
        assert!(validate_id("", "run id").is_err());
        assert!(validate_id(".hidden", "run id").is_err());
    }
}
