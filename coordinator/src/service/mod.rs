//! gRPC shells over `core::Coordinator`: decode, call, encode. No state lives here.

pub mod control_api;
pub mod worker_api;

use tonic::Status;

use crate::core::CoordError;

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        match &e {
            CoordError::InvalidSpec(_)
            | CoordError::Manifest(_)
            | CoordError::Checkpoint(_)
            | CoordError::Probe(_) => Status::invalid_argument(e.to_string()),
            CoordError::NotFound { .. } => Status::not_found(e.to_string()),
            CoordError::Rejected(_) => Status::failed_precondition(e.to_string()),
            CoordError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

/// Rejects malformed ids at the edge, before they reach a store key.
fn checked_id<'a>(id: &'a str, what: &str) -> Result<&'a str, Status> {
    protocol::ids::validate_id(id, what).map_err(Status::invalid_argument)?;
    Ok(id)
}
