//! Case ids and the object keys built from them. Keys are only ever built from validated ids
//! (DESIGN: "object keys are built from validated IDs, never from raw user strings"), so a case id
//! from a manifest, a list file or a bucket listing can never address anything outside its case
//! folder.

use object_store::path::Path;

use crate::DataError;

/// Case folder names like `BDMAP_00000001`, by the one id rule every voxelfleet id follows
/// (`protocol::ids::validate_id`): ASCII letters, digits, `_`, `.` and `-`, at most 128 of them,
/// not starting with `.` and never containing `..`. Only the error type is the data plane's own.
pub fn validate_case_id(id: &str) -> Result<(), DataError> {
    protocol::ids::validate_id(id, "case id").map_err(|reason| DataError::InvalidCaseId {
        id: id.to_string(),
        reason,
    })
}

pub fn ct_key(root: &Path, case_id: &str) -> Path {
    root.child(case_id).child("ct.nii.gz")
}

pub fn mask_key(root: &Path, case_id: &str, class: &str) -> Path {
    root.child(case_id)
        .child("segmentations")
        .child(format!("{class}.nii.gz"))
}
