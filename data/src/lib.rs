//! voxelfleet's data plane, shared by the coordinator and the workers, with no burn in it:
//! dataset URLs and their object stores, case ids and keys, listing, streamed hashing, NIfTI,
//! SuPreM's preprocessing and the crops that become training tensors.
//!
//! Everything here works on flat buffers in the `[D, H, W]` (= `[z, y, x]`) layout that matches
//! burn's `[N, C, D, H, W]`, so the trainer only copies them into tensors. The control plane uses
//! the listing, id and hashing parts and so never compiles a tensor library. The synthetic
//! phantom generator sits here because tests, demos and CI need a real AbdomenAtlas-shaped dataset
//! without downloading one.

pub mod augment;
pub mod cache;
pub mod case_fetch;
pub mod geometry;
pub mod hash;
pub mod ids;
pub mod loader;
pub mod nifti_read;
mod nifti_write;
pub mod patch;
pub mod preprocess;
pub mod reference;
pub mod scan;
pub mod split;
pub mod store;
pub mod synth;
mod synth_anatomy;
mod synth_raster;
pub mod volume;

pub use cache::{Prepared, Source, VolumeCache};
pub use ids::validate_case_id;
pub use loader::{list_cases, load_case};
pub use patch::{CropConfig, Patch, sample_patch, whole_volume};
pub use scan::{DatasetScan, ScanProgress, scan_dataset};
pub use store::{StoreUrl, local_dir_from_url, store_from_url};
pub use synth::{PhantomOrientation, SynthOptions, TRAINING_SPACING_MM, write_phantom_dataset};
pub use volume::{CaseVolume, window_hu};

use std::path::PathBuf;

/// Why a case, a dataset or a synthetic write failed. Every variant names the object key, file or
/// URL involved, because a failed case is quarantined and reported by name, and an operator has
/// to find the offending object from the message alone.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// `reason` already names the id (see `protocol::ids::validate_id`).
    #[error("{reason}")]
    InvalidCaseId { id: String, reason: String },

    #[error("object {key} does not exist")]
    Missing { key: String },

    #[error("object store error on {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },

    #[error("{key} is not a readable NIfTI-1 file: {source}")]
    Nifti {
        key: String,
        #[source]
        source: nifti::NiftiError,
    },

    #[error("{key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },

    #[error("{key} has shape {found:?} (z, y, x) but the CT has {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: [usize; 3],
        found: [usize; 3],
    },

    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("no case folders with a ct.nii.gz under {url}")]
    NoCases { url: String },

    #[error(
        "dataset URL {url:?} uses scheme {scheme:?}; supported are plain paths, file://, memory://, s3://, gs:// \
         and az:// (azure://, abfs://, abfss://)"
    )]
    UnsupportedScheme { url: String, scheme: String },

    #[error("dataset URL {url:?} is not usable: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("invalid synthetic dataset options: {reason}")]
    InvalidOptions { reason: String },

    #[error("invalid preprocessing config: {reason}")]
    InvalidPreprocess { reason: String },

    #[error("case {case} is quarantined in this run (found bad before it was submitted)")]
    Quarantined { case: String },
}

// Callers box these into anyhow and send them across tasks; keep that possible.
const _: fn() = || {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<DataError>();
};

impl DataError {
    /// Whether the error is the case's own fault: its files are absent, corrupt or inconsistent,
    /// so reading it again fails again, anywhere. Such a case is quarantined and replaced. Other
    /// errors (a flaky store, a full disk, a bad configuration) say nothing about the case and
    /// must fail the step instead, or a passing outage would change what a run trains on.
    pub fn is_case_fault(&self) -> bool {
        match self {
            DataError::InvalidCaseId { .. }
            | DataError::Missing { .. }
            | DataError::Nifti { .. }
            | DataError::Corrupt { .. }
            | DataError::ShapeMismatch { .. }
            | DataError::Quarantined { .. } => true,
            DataError::Store { .. }
            | DataError::Io { .. }
            | DataError::NoCases { .. }
            | DataError::UnsupportedScheme { .. }
            | DataError::InvalidUrl { .. }
            | DataError::InvalidOptions { .. }
            | DataError::InvalidPreprocess { .. } => false,
        }
    }

    /// Maps a store error for `key`, singling out absent objects so callers can tell a missing
    /// mask (the dataset is incomplete) from a flaky store (worth a retry).
    pub(crate) fn store(key: &object_store::path::Path, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => DataError::Missing { key: key.to_string() },
            source => DataError::Store {
                key: key.to_string(),
                source,
            },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
