//! One pass over a dataset's objects: which case folders exist, how large their CT is, and which
//! of the 25 class masks each one has. The coordinator stores the result in sled so a submit
//! never lists the bucket again, and reports every folder it could not use instead of dropping
//! it silently.
//!
//! The listing is ONE recursive `list(root)` stream: a bucket answers it a thousand keys a page,
//! so the 9,262 AbdomenAtlas cases (about 27 objects each) cost some 250 requests, never one per
//! case. Only when a local directory holds an entry that cannot be walked (a symlink loop, a
//! folder without read permission) does it list again folder by folder, since the stream ends
//! at its first error: that folder is then skipped and reported by name, not the whole scan.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use protocol::classes::CLASSES;
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::ids::validate_case_id;

/// How often (in objects) a scan reports progress; the last report always comes at the end.
const PROGRESS_EVERY: u64 = 500;

/// One case folder as the listing found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScannedCase {
    pub id: String,
    /// Bytes of `ct.nii.gz`; `None` when the folder has no CT.
    pub ct_bytes: Option<u64>,
    /// Bit `c` set when `segmentations/<CLASSES[c]>.nii.gz` exists.
    pub masks: u32,
    /// Bytes of all the class masks found.
    pub mask_bytes: u64,
}

impl ScannedCase {
    pub fn has_mask(&self, class: usize) -> bool {
        self.masks & (1 << class) != 0
    }
}

/// A top-level name that is not a usable case folder, with the reason, so an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoredName {
    pub name: String,
    pub reason: String,
}

/// Everything one scan found, cases sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetScan {
    pub cases: Vec<ScannedCase>,
    pub ignored: Vec<IgnoredName>,
    /// Objects listed under the root.
    pub objects: u64,
}

impl DatasetScan {
    /// Ids of case folders without a `ct.nii.gz`, sorted.
    pub fn missing_ct(&self) -> Vec<String> {
        missing_ct(&self.cases)
    }

    /// Bytes of every CT and mask found.
    pub fn total_bytes(&self) -> u64 {
        total_bytes(&self.cases)
    }

    /// For each class (in `CLASSES` order), how many cases lack its mask.
    pub fn masks_missing(&self) -> [u32; CLASSES.len()] {
        let mut missing = [0u32; CLASSES.len()];
        for case in &self.cases {
            for (c, m) in missing.iter_mut().enumerate() {
                if !case.has_mask(c) {
                    *m += 1;
                }
            }
        }
        missing
    }
}

/// Ids of the case folders in `cases` without a `ct.nii.gz`, in their order. The scan and the
/// stored dataset record both summarise their cases with this.
pub fn missing_ct(cases: &[ScannedCase]) -> Vec<String> {
    cases
        .iter()
        .filter(|c| c.ct_bytes.is_none())
        .map(|c| c.id.clone())
        .collect()
}

/// Bytes of every CT and mask in `cases`.
pub fn total_bytes(cases: &[ScannedCase]) -> u64 {
    cases.iter().map(|c| c.ct_bytes.unwrap_or(0) + c.mask_bytes).sum()
}

/// How far a scan has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanProgress {
    pub objects: u64,
    /// Distinct top-level folders seen so far (case folders or not).
    pub cases: u64,
}

/// What the listing saw under one top-level name.
#[derive(Default)]
struct Folder {
    is_folder: bool,
    ct_bytes: Option<u64>,
    masks: u32,
    mask_bytes: u64,
    has_segmentations: bool,
}

/// Lists everything under `root` once and groups it by case folder. A folder counts as a case
/// when its name is a valid case id and it holds a `ct.nii.gz` or a `segmentations/` folder; a
/// case without a CT is kept (with `ct_bytes: None`) so the caller can quarantine it by id.
/// Other top-level names (invalid ids, stray files, folders with neither, folders that cannot be
/// listed) come back in `ignored`, each with its reason.
pub async fn scan_dataset(
    store: &dyn ObjectStore,
    root: &Path,
    progress: &mut (dyn FnMut(ScanProgress) + Send),
) -> Result<DatasetScan, DataError> {
    let mut listing = Listing::default();
    let mut unlisted: Vec<IgnoredName> = vec![];
    if let Err(e) = listing.add(store, root, root, progress).await {
        if unwalkable(&e).is_none() {
            return Err(store_error(root, e));
        }
        listing = Listing::default();
        let top = store
            .list_with_delimiter(Some(root))
            .await
            .map_err(|e| store_error(root, e))?;
        for meta in &top.objects {
            listing.record(root, meta);
        }
        for folder in &top.common_prefixes {
            let (objects, name) = (listing.objects, folder.filename().unwrap_or_default().to_string());
            if let Err(e) = listing.add(store, folder, root, progress).await {
                let Some(reason) = unwalkable(&e) else {
                    return Err(store_error(folder, e));
                };
                // What was listed of it before the error goes too: a case is whole or absent.
                listing.folders.remove(&name);
                listing.objects = objects;
                unlisted.push(IgnoredName {
                    name,
                    reason: format!("cannot be listed, so it was skipped: {reason}"),
                });
            }
        }
    }
    progress(ScanProgress {
        objects: listing.objects,
        cases: listing.folders.len() as u64,
    });
    let Listing { folders, objects } = listing;

    let mut scan = DatasetScan {
        objects,
        ..Default::default()
    };
    for (name, folder) in folders {
        let ignore = |reason: String| IgnoredName {
            name: name.clone(),
            reason,
        };
        if !folder.is_folder {
            scan.ignored.push(ignore("a file, not a case folder".into()));
        } else if let Err(e) = validate_case_id(&name) {
            scan.ignored.push(ignore(e.to_string()));
        } else if folder.ct_bytes.is_none() && !folder.has_segmentations {
            scan.ignored
                .push(ignore("holds neither ct.nii.gz nor segmentations/".into()));
        } else {
            scan.cases.push(ScannedCase {
                id: name,
                ct_bytes: folder.ct_bytes,
                masks: folder.masks,
                mask_bytes: folder.mask_bytes,
            });
        }
    }
    // Where it would have been had it been listed.
    scan.ignored.extend(unlisted);
    scan.ignored.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(scan)
}

/// The objects listed so far, grouped by top-level name.
#[derive(Default)]
struct Listing {
    folders: BTreeMap<String, Folder>,
    objects: u64,
}

impl Listing {
    /// Lists everything under `prefix` (`root` or one of its folders) into the groups.
    async fn add(
        &mut self,
        store: &dyn ObjectStore,
        prefix: &Path,
        root: &Path,
        progress: &mut (dyn FnMut(ScanProgress) + Send),
    ) -> Result<(), object_store::Error> {
        let mut listing = store.list(Some(prefix));
        while let Some(meta) = listing.try_next().await? {
            self.record(root, &meta);
            if self.objects.is_multiple_of(PROGRESS_EVERY) {
                progress(ScanProgress {
                    objects: self.objects,
                    cases: self.folders.len() as u64,
                });
            }
        }
        Ok(())
    }

    fn record(&mut self, root: &Path, meta: &object_store::ObjectMeta) {
        self.objects += 1;
        let Some(parts) = meta.location.prefix_match(root) else {
            return;
        };
        let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
        let Some(top) = parts.first() else { return };
        let folder = self.folders.entry(top.clone()).or_default();
        match parts[1..].iter().map(String::as_str).collect::<Vec<_>>()[..] {
            [] => {}
            ["ct.nii.gz"] => {
                folder.is_folder = true;
                folder.ct_bytes = Some(meta.size);
            }
            ["segmentations", file] => {
                folder.is_folder = true;
                folder.has_segmentations = true;
                let class = file
                    .strip_suffix(".nii.gz")
                    .and_then(|n| CLASSES.iter().position(|c| *c == n));
                if let Some(c) = class {
                    folder.masks |= 1 << c;
                    folder.mask_bytes += meta.size;
                }
            }
            ["segmentations", ..] => {
                folder.is_folder = true;
                folder.has_segmentations = true;
            }
            _ => folder.is_folder = true,
        }
    }
}

/// The reason, when a listing failed on one local entry it could not walk (object_store's
/// local store keeps walkdir's error, with the paths, in its sources) rather than on the store.
fn unwalkable(e: &object_store::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(walk) = c.downcast_ref::<walkdir::Error>() {
            return Some(walk.to_string());
        }
        cause = c.source();
    }
    None
}

/// A listing error that names where: an empty root (a dataset at the store's root) printed as
/// "object store error on : ...".
fn store_error(at: &Path, e: object_store::Error) -> DataError {
    if at.as_ref().is_empty() {
        return DataError::Store {
            key: "the dataset's root".into(),
            source: e,
        };
    }
    DataError::store(at, e)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::PutPayload;
    use object_store::local::LocalFileSystem;
    use object_store::memory::InMemory;

    use super::*;

    async fn put(store: &dyn ObjectStore, key: &str, bytes: usize) {
        store
            .put(&Path::from(key), PutPayload::from(vec![7u8; bytes]))
            .await
            .unwrap();
    }

    /// Two good cases (one missing a class), one without CT, and three names that are not cases.
    async fn fill(store: &dyn ObjectStore, prefix: &str) {
        for (c, class) in CLASSES.iter().enumerate() {
            put(
                store,
                &format!("{prefix}BDMAP_00000001/segmentations/{class}.nii.gz"),
                10,
            )
            .await;
            if c != 3 {
                put(
                    store,
                    &format!("{prefix}BDMAP_00000002/segmentations/{class}.nii.gz"),
                    5,
                )
                .await;
            }
        }
        put(store, &format!("{prefix}BDMAP_00000001/ct.nii.gz"), 1000).await;
        put(store, &format!("{prefix}BDMAP_00000002/ct.nii.gz"), 2000).await;
        put(store, &format!("{prefix}BDMAP_00000003/segmentations/liver.nii.gz"), 4).await;
        put(store, &format!("{prefix}BDMAP_00000003/segmentations/notes.txt"), 4).await;
        put(store, &format!("{prefix}README.md"), 3).await;
        put(store, &format!("{prefix}dataset_list/all.txt"), 3).await;
        put(store, &format!("{prefix}..bad/ct.nii.gz"), 3).await;
    }

    fn check(scan: &DatasetScan, reports: &[ScanProgress]) {
        let ids: Vec<&str> = scan.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["BDMAP_00000001", "BDMAP_00000002", "BDMAP_00000003"]);
        assert_eq!(scan.cases[0].ct_bytes, Some(1000));
        assert_eq!(scan.cases[0].masks, (1u32 << 25) - 1);
        assert_eq!(scan.cases[0].mask_bytes, 250);
        assert_eq!(scan.cases[1].masks, ((1u32 << 25) - 1) & !(1 << 3));
        assert_eq!(scan.cases[1].mask_bytes, 120);
        let liver = CLASSES.iter().position(|c| *c == "liver").unwrap();
        assert_eq!((scan.cases[2].ct_bytes, scan.cases[2].masks), (None, 1 << liver));
        assert_eq!(scan.missing_ct(), ["BDMAP_00000003"]);
        assert_eq!(scan.total_bytes(), 1000 + 2000 + 250 + 120 + 4);
        let missing = scan.masks_missing();
        assert_eq!(missing[3], 2);
        assert_eq!(missing[liver], 0);
        assert_eq!(missing[0], 1);
        let ignored: Vec<&str> = scan.ignored.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(ignored, ["..bad", "README.md", "dataset_list"]);
        assert!(scan.ignored[0].reason.contains(".."), "{:?}", scan.ignored[0]);
        assert!(scan.ignored[1].reason.contains("file"));
        assert!(scan.ignored[2].reason.contains("neither"));
        assert_eq!(scan.objects, 25 + 24 + 2 + 2 + 3);
        let last = reports.last().unwrap();
        assert_eq!((last.objects, last.cases), (scan.objects, 6));
        assert!(reports.windows(2).all(|w| w[0].objects <= w[1].objects));
    }

    #[tokio::test]
    async fn in_memory_store_under_a_prefix() {
        let store = InMemory::new();
        fill(&store, "atlas/").await;
        put(&store, "other/BDMAP_00000009/ct.nii.gz", 1).await;
        let mut reports = vec![];
        let scan = scan_dataset(&store, &Path::from("atlas"), &mut |p| reports.push(p))
            .await
            .unwrap();
        check(&scan, &reports);
    }

    #[tokio::test]
    async fn local_file_system_at_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        fill(store.as_ref(), "").await;
        let mut reports = vec![];
        let scan = scan_dataset(store.as_ref(), &Path::default(), &mut |p| reports.push(p))
            .await
            .unwrap();
        check(&scan, &reports);
    }

    #[tokio::test]
    async fn a_symlink_loop_in_one_case_folder_skips_that_folder_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        fill(store.as_ref(), "").await;
        // A link back to its own folder: walking it never ends.
        let looped = dir.path().join("BDMAP_00000002");
        std::os::unix::fs::symlink(&looped, looped.join("segmentations").join("again")).unwrap();
        let scan = scan_dataset(store.as_ref(), &Path::default(), &mut |_| {})
            .await
            .unwrap();
        let ids: Vec<&str> = scan.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["BDMAP_00000001", "BDMAP_00000003"]);
        let skipped = scan
            .ignored
            .iter()
            .find(|i| i.name == "BDMAP_00000002")
            .unwrap_or_else(|| panic!("the looping folder is not reported: {:?}", scan.ignored));
        assert!(skipped.reason.contains("loop"), "{skipped:?}");
        assert!(
            skipped.reason.contains("again"),
            "the reason names the link: {skipped:?}"
        );
        // The other names are reported as before, in order, and nothing of the skipped folder
        // is counted.
        let ignored: Vec<&str> = scan.ignored.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(ignored, ["..bad", "BDMAP_00000002", "README.md", "dataset_list"]);
        assert_eq!(scan.objects, 26 + 2 + 3);
    }

    #[tokio::test]
    async fn progress_comes_while_listing_many_cases() {
        let store = InMemory::new();
        for i in 0..400 {
            put(&store, &format!("BDMAP_{i:08}/ct.nii.gz"), 1).await;
            put(&store, &format!("BDMAP_{i:08}/segmentations/aorta.nii.gz"), 1).await;
        }
        let mut reports = vec![];
        let scan = scan_dataset(&store, &Path::default(), &mut |p| reports.push(p))
            .await
            .unwrap();
        assert_eq!(scan.cases.len(), 400);
        assert!(scan.missing_ct().is_empty() && scan.ignored.is_empty());
        assert!(reports.len() >= 2, "{reports:?}");
        assert_eq!(reports[0].objects, PROGRESS_EVERY);
    }
}
