//! The 25 AbdomenAtlas 1.1 structures, in the channel order every model head and metric uses.
//!
//! Kept in the protocol crate because the coordinator (reports, validation) and the worker
//! (label decoding, the model head) must agree on it bit for bit.

/// Class names as they appear in `segmentations/<class>.nii.gz`, in output-channel order.
pub const CLASSES: [&str; 25] = [
    "aorta",
    "gall_bladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "postcava",
    "spleen",
    "stomach",
    "adrenal_gland_left",
    "adrenal_gland_right",
    "bladder",
    "celiac_trunk",
    "colon",
    "duodenum",
    "esophagus",
    "femur_left",
    "femur_right",
    "hepatic_vessel",
    "intestine",
    "lung_left",
    "lung_right",
    "portal_vein_and_splenic_vein",
    "prostate",
    "rectum",
];

/// Number of output channels of a full AbdomenAtlas head.
pub const NUM_CLASSES: usize = CLASSES.len();

/// The structures whose Dice the demo and reports single out: large, unambiguous organs that any
/// working training path learns first.
pub const LARGE_ORGANS: [&str; 5] = ["liver", "lung_left", "lung_right", "femur_left", "femur_right"];

/// Channel index of a class name.
pub fn class_index(name: &str) -> Option<usize> {
    CLASSES.iter().position(|c| *c == name)
}
