//! The token `coordinator serve` makes for itself when it is given none, so that no coordinator
//! is open by accident: the first start writes a random token to `<data-dir>/token`, readable by
//! its owner only, and later starts on the same data dir reuse it. Workers and CLI users read
//! the same file with `--token-file`.
//!
//! The file appears whole or not at all: the token is written to a private temporary file,
//! flushed, and then hard-linked into place, which fails rather than overwrite a token another
//! process put there first. A crash leaves at worst a stray temporary file, never a half token.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::auth::{SharedToken, TokenError};

/// File name of the generated token inside the data dir.
pub const TOKEN_FILE_NAME: &str = "token";

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    // The io error is shown, not chained: anyhow's `{:#}` would print it twice.
    #[error("token file {}: cannot {action}: {error}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },
    #[error("{0}")]
    Token(#[from] TokenError),
}

/// Whether [`load_or_create`] made the token or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Created,
    Existing,
}

/// The token in `path`, created (32 random bytes, hex) if the file does not exist yet.
pub fn load_or_create(path: &Path) -> Result<(SharedToken, Origin), TokenFileError> {
    if path.exists() {
        warn_if_shared(path);
        return Ok((SharedToken::from_file(path)?, Origin::Existing));
    }
    let io = |action, error| TokenFileError::Io {
        path: path.to_path_buf(),
        action,
        error,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let token = hex::encode(rand::random::<[u8; 32]>());
    let tmp = dir.join(format!(
        ".{TOKEN_FILE_NAME}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write a temporary file beside it", e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            // The link is durable once the directory entry is.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok((SharedToken::new(&token)?, Origin::Created))
        }
        // Another process created it between our check and our link: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((SharedToken::from_file(path)?, Origin::Existing))
        }
        Err(e) => Err(io("create it", e)),
    }
}

/// A token others can read is a token others can use; say so, but serve: the operator may
/// have reasons (a group of CLI users), and refusing would take the coordinator down. `serve`
/// checks a `--token-file` with this too.
pub fn warn_if_shared(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "token file {} is readable by other users (mode {:o}); `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_call_creates_a_private_token_and_later_ones_reuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let (first, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Created);
        let token = first.expose().unwrap().to_string();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let (again, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Existing);
        assert_eq!(again.expose(), Some(token.as_str()));
        // The file is what clients read with --token-file.
        assert_eq!(SharedToken::from_file(&path).unwrap().expose(), Some(token.as_str()));
    }

    #[test]
    fn a_damaged_token_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        std::fs::write(&path, "").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        // It is left alone, not replaced by a new token the clients do not have.
        assert_eq!(std::fs::read(&path).unwrap(), b"");

        let missing_dir = dir.path().join("no-such-dir").join(TOKEN_FILE_NAME);
        let err = load_or_create(&missing_dir).unwrap_err().to_string();
        assert!(err.contains("no-such-dir"), "{err}");
    }
}
