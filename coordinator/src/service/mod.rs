//! gRPC shells over `core::Coordinator`: decode, call, encode. No state lives here.

pub mod control_api;
mod dataset_info;
mod paging;
mod sweep_info;
pub mod worker_api;

use tonic::Status;

use crate::core::CoordError;

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        match &e {
            CoordError::InvalidSpec(_) | CoordError::Manifest(_) | CoordError::Checkpoint(_) => {
                Status::invalid_argument(e.to_string())
            }
            CoordError::NotFound { .. } => Status::not_found(e.to_string()),
            CoordError::Rejected(_) => Status::failed_precondition(e.to_string()),
            CoordError::Denied(_) => Status::permission_denied(e.to_string()),
            CoordError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

/// Rejects malformed ids at the edge, before they reach a store key.
fn checked_id<'a>(id: &'a str, what: &str) -> Result<&'a str, Status> {
    protocol::ids::validate_id(id, what).map_err(Status::invalid_argument)?;
    Ok(id)
}

/// Rejects a hash that is not a SHA-256 as the workers write it (64 lowercase hex characters)
/// at the edge: hashes are compared, stored and shown, and one of another shape is either a
/// bug or an attack. `field` names the request field.
fn checked_sha256(hash: &str, field: &str) -> Result<(), Status> {
    let ok = hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !ok {
        return Err(Status::invalid_argument(format!(
            "{field} must be a SHA-256 as 64 lowercase hex characters, got {} bytes{}",
            hash.len(),
            if hash.len() == 64 {
                " that are not all lowercase hex"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_must_be_64_lowercase_hex() {
        assert!(checked_sha256(&"0a".repeat(32), "weights_sha256").is_ok());
        for bad in [
            String::new(),
            "ab".into(),
            "0A".repeat(32),
            "é".repeat(32),
            "g".repeat(64),
        ] {
            let err = checked_sha256(&bad, "weights_sha256").unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("weights_sha256"), "{}", err.message());
        }
    }
}
