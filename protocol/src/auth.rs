//! The shared bearer token that every RPC carries, coordinator and peer alike. One secret for
//! the whole deployment, so a stray process on the network can neither submit runs nor inject
//! gradients. It comes from a file (`--token-file`, or `VOXELFLEET_TOKEN_FILE`) or from
//! `VOXELFLEET_TOKEN`; `coordinator serve` creates one when given neither. With no token
//! configured, nothing is checked: only an explicit `serve --insecure` gets there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Environment variable every voxelfleet process reads its token from.
pub const TOKEN_ENV: &str = "VOXELFLEET_TOKEN";
/// Environment variable naming a file that holds the token; `--token-file` overrides it.
pub const TOKEN_FILE_ENV: &str = "VOXELFLEET_TOKEN_FILE";

/// Longest token file read: a token is at most 512 characters, so anything much larger is the
/// wrong file, and reading it whole would be a waste.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A gRPC channel whose requests carry the token.
pub type AuthChannel = InterceptedService<Channel, AttachToken>;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `origin` says where the token came from: the variable or the file.
    #[error("{origin}: the token must be 16 to 512 visible ASCII characters without spaces")]
    Malformed { origin: String },
    // The io error is shown, not chained: anyhow's `{:#}` would print it twice.
    #[error("token file {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("token file {}: larger than {MAX_TOKEN_FILE_BYTES} bytes; is it the right file?", path.display())]
    TooLarge { path: PathBuf },
}

#[derive(Clone, Default)]
pub struct SharedToken(Option<Arc<str>>);

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "SharedToken(set)"
        } else {
            "SharedToken(none)"
        })
    }
}

impl SharedToken {
    pub fn none() -> Self {
        SharedToken(None)
    }

    pub fn new(token: &str) -> Result<Self, TokenError> {
        SharedToken::parse(token, "token")
    }

    /// Validates `token`; errors name `origin` (a variable or a file), never the token itself.
    fn parse(token: &str, origin: &str) -> Result<Self, TokenError> {
        let ok = (16..=512).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(TokenError::Malformed {
                origin: origin.to_string(),
            });
        }
        Ok(SharedToken(Some(token.into())))
    }

    /// `VOXELFLEET_TOKEN` if set and non-empty, else no token.
    pub fn from_env() -> Result<Self, TokenError> {
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.is_empty() => SharedToken::parse(&t, TOKEN_ENV),
            _ => Ok(SharedToken::none()),
        }
    }

    /// The token in `path`: its whole content, less the line break an editor or `echo` leaves at
    /// the end. An empty file is an error, not "no token": a file was asked for.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let read = |error| TokenError::Read {
            path: path.to_path_buf(),
            error,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_TOKEN_FILE_BYTES {
            return Err(TokenError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        SharedToken::parse(
            text.trim_end_matches(['\n', '\r']),
            &format!("token file {}", path.display()),
        )
    }

    /// The token a process was given: the file (from `--token-file`, or `VOXELFLEET_TOKEN_FILE`
    /// when the caller's flag reads that variable) when there is one, else `VOXELFLEET_TOKEN`,
    /// else none.
    pub fn resolve(token_file: Option<&Path>) -> Result<Self, TokenError> {
        match token_file {
            Some(path) => SharedToken::from_file(path),
            None => SharedToken::from_env(),
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The raw token, to hand to child processes through `VOXELFLEET_TOKEN`.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }

    fn header(&self) -> Option<MetadataValue<Ascii>> {
        let token = self.0.as_deref()?;
        Some(
            format!("Bearer {token}")
                .parse()
                .expect("validated tokens are visible ASCII"),
        )
    }

    /// Client side: adds `authorization: Bearer <token>` to every request.
    pub fn attach(&self) -> AttachToken {
        AttachToken(self.header())
    }

    /// Server side: refuses requests without the right token.
    pub fn require(&self) -> RequireToken {
        RequireToken(self.header().map(|h| Arc::from(h.as_bytes())))
    }

    /// Wraps a connected channel so its requests carry the token.
    pub fn channel(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.attach())
    }
}

#[derive(Clone)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.0 {
            req.metadata_mut().insert("authorization", header.clone());
        }
        Ok(req)
    }
}

#[derive(Clone)]
pub struct RequireToken(Option<Arc<[u8]>>);

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else { return Ok(req) };
        match req.metadata().get("authorization") {
            Some(given) if constant_time_eq(given.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated(format!(
                "wrong bearer token (check --token-file or {TOKEN_ENV})"
            ))),
            None => Err(Status::unauthenticated(format!(
                "missing bearer token: pass --token-file or set {TOKEN_ENV}"
            ))),
        }
    }
}

/// Compares without an early exit, so response timing does not reveal how much of a guess
/// was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_validated_and_checked() {
        assert!(SharedToken::new("short").is_err());
        assert!(SharedToken::new("has a space in it, sixteen+").is_err());
        let token = SharedToken::new("0123456789abcdef-secret").unwrap();
        let attached = token.attach().call(Request::new(())).unwrap();
        assert!(token.require().call(attached).is_ok());
        let missing = token.require().call(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let other = SharedToken::new("fedcba9876543210-secret").unwrap();
        let wrong = token
            .require()
            .call(other.attach().call(Request::new(())).unwrap())
            .unwrap_err();
        assert!(wrong.message().contains("wrong"));
        // Without a token configured, everything passes.
        assert!(SharedToken::none().require().call(Request::new(())).is_ok());
        assert!(format!("{token:?}").contains("set") && !format!("{token:?}").contains("secret"));
    }

    #[test]
    fn token_files_are_read_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("voxelfleet-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("token");
        std::fs::write(&good, "0123456789abcdef-from-a-file\n").unwrap();
        let token = SharedToken::from_file(&good).unwrap();
        assert_eq!(token.expose(), Some("0123456789abcdef-from-a-file"));
        assert_eq!(SharedToken::resolve(Some(&good)).unwrap().expose(), token.expose());

        let missing = dir.join("nope");
        let err = SharedToken::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("token file") && err.contains("nope"), "{err}");

        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        let err = SharedToken::from_file(&empty).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("16 to 512"), "{err}");

        let spaced = dir.join("spaced");
        std::fs::write(&spaced, "a token with spaces in it").unwrap();
        let err = SharedToken::from_file(&spaced).unwrap_err().to_string();
        assert!(err.contains("spaced") && !err.contains("with spaces"), "{err}");

        let big = dir.join("big");
        std::fs::write(&big, "x".repeat(10_000)).unwrap();
        assert!(matches!(SharedToken::from_file(&big), Err(TokenError::TooLarge { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
