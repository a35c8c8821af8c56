//! voxelfleet worker: the data plane. Streams cases from object storage, trains a burn model and
//! averages gradients with its peers over gRPC.

pub mod data;
pub mod backend;
pub mod model;
pub mod train;
pub mod collective;
pub mod checkpoint;
pub mod link;
pub mod stop;
pub mod agent;
pub mod telemetry;
