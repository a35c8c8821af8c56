//! Training: the model's loss, the bridge from burn gradients to the all-reduce, checkpoint
//! encoding, the data order, evaluation, the memory a step needs, and the loop that ties them
//! together.

pub mod cases;
pub mod checkpoint;
pub mod codec;
pub mod eval;
pub mod exchange;
pub mod feed;
pub mod finite;
pub mod init_from;
pub mod loss;
pub mod memory;
pub mod optimizer;
pub mod order;
pub mod params;
mod path_ids;
pub mod schedule;
pub mod sliding_window;
pub mod trainer;
