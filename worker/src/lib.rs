//! voxelfleet worker: the data plane. Streams cases from object storage, trains a burn model and
//! averages gradients with its peers over gRPC.

pub mod agent;
pub mod backend;
pub mod collective;
pub mod fingerprint;
pub mod leave;
pub mod link;
pub mod manifests;
pub mod model;
pub mod stop;
pub mod train;
