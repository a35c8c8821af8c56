//! Every voxelfleet wire contract, plus the few types both sides share (run spec, class list,
//! identifiers, the bearer token, TLS settings). No logic beyond parsing and validation lives here.

pub mod auth;
pub mod classes;
pub mod ids;
pub mod model_dir;
pub mod model_spec;
pub mod spec;
pub mod telemetry;
pub mod tls;

/// Generated gRPC types and services (package `voxelfleet.v1`). An assignment outweighs the
/// other outcomes of a poll, but it is sent once per run, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub mod pb {
    tonic::include_proto!("voxelfleet.v1");
}

/// Largest collective chunk payload. tonic's default message limit is 4 MiB; 1 MiB chunks leave
/// headroom and keep per-chunk latency low.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
