//! The shared bearer token that every RPC carries, coordinator and peer alike. One secret for
//! the whole deployment, read from `VOXELFLEET_TOKEN`, so a stray process on the network can
//! neither submit runs nor inject gradients. With no token configured, nothing is checked
//! (a single-user machine, tests of the open path).

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Environment variable every voxelfleet process reads its token from.
pub const TOKEN_ENV: &str = "VOXELFLEET_TOKEN";

/// A gRPC channel whose requests carry the token.
pub type AuthChannel = InterceptedService<Channel, AttachToken>;

#[derive(Debug, thiserror::Error)]
#[error("{TOKEN_ENV}: the token must be 16 to 512 visible ASCII characters without spaces")]
pub struct BadToken;

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

    pub fn new(token: &str) -> Result<Self, BadToken> {
        let ok = (16..=512).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(BadToken);
        }
        Ok(SharedToken(Some(token.into())))
    }

    /// `VOXELFLEET_TOKEN` if set and non-empty, else no token.
    pub fn from_env() -> Result<Self, BadToken> {
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.is_empty() => SharedToken::new(&t),
            _ => Ok(SharedToken::none()),
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
                "wrong bearer token (check {TOKEN_ENV})"
            ))),
            None => Err(Status::unauthenticated(format!(
                "missing bearer token: set {TOKEN_ENV}"
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
}
