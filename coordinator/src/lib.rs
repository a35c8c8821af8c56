//! voxelfleet coordinator: the control plane. It keeps runs, workers, checkpoints and metrics in
//! sled, gang-schedules runs onto workers, and serves the worker and CLI gRPC APIs. It never
//! touches voxels or tensors.

pub mod core;
pub mod manifest;
pub mod probe;
pub mod records;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod store;
pub mod sweep;
pub mod token_file;
pub mod verify;
