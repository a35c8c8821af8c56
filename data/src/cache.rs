//! The node-wide cache of preprocessed volumes: one compact file per (case, preprocessing
//! config), read by every worker process on the node and every run of a sweep, so a scaling
//! sweep decodes and resamples each volume once instead of once per run.
//!
//! Safety across processes comes from the file system, not from an index anyone could corrupt:
//! - a file is written under a temporary name in the cache directory and `rename`d into place,
//!   so readers see a whole file or none, and two writers of the same case just replace one good
//!   file with an identical one;
//! - a process reads a file once per open into its own memory, checking the header (magic,
//!   version, endianness, case id, config digest, a header checksum), the exact file size and a
//!   checksum per section (`file`); a file that fails is logged (file and section), deleted and
//!   rebuilt, and the read counts as a miss. Nothing is trained on unverified, and a file
//!   truncated or replaced later cannot touch a volume already read;
//! - recency is the file's mtime, refreshed on every hit, and eviction deletes the oldest files
//!   until the directory is under its limit; unlinking a file another process is reading is safe
//!   (its open descriptor keeps the inode);
//! - an advisory lock per entry (`.locks/NAME.lock`) makes concurrent misses of one case wait for
//!   the first preparer instead of repeating its work. Correctness never depends on it: lock files
//!   may be deleted at any time, which at worst repeats a preparation.

mod file;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

pub use self::file::{FORMAT_VERSION, open_case_file, write_case_file};
use self::file::{Layout, read_verified};
use crate::DataError;
use crate::ids::validate_case_id;
use crate::volume::CaseVolume;

const EXTENSION: &str = "vfc";
/// Temporary files older than this belong to a writer that died; eviction removes them.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// Default bound of the in-process list of open volumes.
pub const DEFAULT_OPEN_VOLUMES: usize = 4;
/// Default size limit of the cache directory.
pub const DEFAULT_MAX_BYTES: u64 = 50 << 30;

/// What a preparation yields: shape `[z, y, x]`, the windowed 0..1 image and the label bitmask.
pub type Prepared = ([usize; 3], Vec<f32>, Vec<u32>);

/// Where a volume came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Already open in this process.
    Memory,
    /// Read (and verified) from the node's cache directory.
    Disk,
    /// Prepared now (a miss).
    Prepared,
}

impl Source {
    pub fn is_hit(self) -> bool {
        self != Source::Prepared
    }
}

/// `$VOXELFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/voxelfleet/cases`, else
/// `~/.cache/voxelfleet/cases`, else a folder under the system temp dir: one place every worker
/// process of the node finds by default.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env("VOXELFLEET_CACHE_DIR") {
        return dir;
    }
    if let Some(xdg) = env("XDG_CACHE_HOME") {
        return xdg.join("voxelfleet").join("cases");
    }
    match env("HOME") {
        Some(home) => home.join(".cache").join("voxelfleet").join("cases"),
        None => std::env::temp_dir().join("voxelfleet-cases"),
    }
}

/// The node-wide cache, as one process sees it: the directory, its size limit, and a few open
/// volumes (the only memory it holds).
pub struct VolumeCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
    capacity: usize,
    open: Mutex<VecDeque<(String, Arc<CaseVolume>)>>,
}

impl VolumeCache {
    /// A cache in `dir` (created if absent) holding at most `max_bytes` of files, keeping up to
    /// `open_volumes` volumes open in this process.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64, open_volumes: usize) -> Result<Self, DataError> {
        let dir = dir.into();
        let locks = dir.join(".locks");
        fs::create_dir_all(&locks).map_err(|e| DataError::io(&locks, e))?;
        Ok(VolumeCache {
            dir: Some(dir),
            max_bytes,
            capacity: open_volumes.max(1),
            open: Mutex::new(VecDeque::new()),
        })
    }

    /// No disk: every miss prepares (and quantises, exactly as a cached volume is), keeping only
    /// the in-process few.
    pub fn disabled(open_volumes: usize) -> Self {
        VolumeCache {
            dir: None,
            max_bytes: 0,
            capacity: open_volumes.max(1),
            open: Mutex::new(VecDeque::new()),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The file a (case, config) pair lives in.
    pub fn file_path(&self, case_id: &str, config_hash: &str) -> Option<PathBuf> {
        let name = file_name(case_id, &config_digest(config_hash));
        self.dir.as_ref().map(|d| d.join(name))
    }

    /// The volume of `case_id` prepared under `config_hash`: from this process's open volumes,
    /// else read (and verified) from the cache directory, else made by `prepare`, quantised and
    /// written (temp file and rename). A cache that cannot be written (disk full, permissions) is
    /// logged and bypassed: the volume is still returned.
    pub fn get_or_prepare<F>(
        &self,
        case_id: &str,
        config_hash: &str,
        prepare: F,
    ) -> Result<(Arc<CaseVolume>, Source), DataError>
    where
        F: FnOnce() -> Result<Prepared, DataError>,
    {
        validate_case_id(case_id)?;
        let digest = config_digest(config_hash);
        let name = file_name(case_id, &digest);
        if let Some(vol) = self.recall(&name) {
            if let Some(dir) = &self.dir {
                touch(&dir.join(&name));
            }
            return Ok((vol, Source::Memory));
        }
        let Some(dir) = &self.dir else {
            let vol = Arc::new(owned_volume(case_id, prepare()?)?);
            self.remember(&name, &vol);
            return Ok((vol, Source::Prepared));
        };
        let path = dir.join(&name);
        if let Some(vol) = self.open_valid(&path, case_id, &digest) {
            let vol = Arc::new(vol);
            self.remember(&name, &vol);
            return Ok((vol, Source::Disk));
        }
        // A miss: wait for whoever is preparing this entry, then look again.
        let _lock = lock_entry(dir, &name);
        if let Some(vol) = self.open_valid(&path, case_id, &digest) {
            let vol = Arc::new(vol);
            self.remember(&name, &vol);
            return Ok((vol, Source::Disk));
        }
        // The volume just prepared is returned as it is: reading the file back would only copy
        // the same bytes into memory again.
        let vol = Arc::new(owned_volume(case_id, prepare()?)?);
        if let Err(e) = self.store(dir, &name, &vol, &digest) {
            tracing::warn!(
                file = %path.display(),
                "case cache: cannot write {}: {e}; continuing without it",
                path.display()
            );
        }
        self.remember(&name, &vol);
        Ok((vol, Source::Prepared))
    }

    /// Reads and verifies a cache file, deleting it when invalid (the caller then prepares the
    /// case again, a miss); refreshes its recency on a hit.
    fn open_valid(&self, path: &Path, case_id: &str, digest: &str) -> Option<CaseVolume> {
        match read_verified(path, case_id, digest) {
            Ok(Some(vol)) => {
                touch(path);
                Some(vol)
            }
            Ok(None) => None,
            Err(rejected) => {
                tracing::warn!(
                    file = %path.display(),
                    section = %rejected.section,
                    "case cache: {} is invalid, {}: {}; deleting it and preparing the case again",
                    path.display(),
                    rejected.section,
                    rejected.reason
                );
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    /// Writes `vol` under `name` (temp file, then rename) and evicts down to the limit; a file
    /// that alone would exceed the limit is not written.
    fn store(&self, dir: &Path, name: &str, vol: &CaseVolume, digest: &str) -> Result<(), DataError> {
        let layout = Layout::of(vol.voxel_count(), vol.foreground().len());
        if layout.total as u64 > self.max_bytes {
            return Ok(());
        }
        write_case_file(dir, name, vol, digest)?;
        evict(dir, self.max_bytes, &dir.join(name))?;
        Ok(())
    }

    fn recall(&self, name: &str) -> Option<Arc<CaseVolume>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let at = open.iter().position(|(n, _)| n == name)?;
        let entry = open.remove(at).expect("position is in range");
        let vol = entry.1.clone();
        open.push_back(entry);
        Some(vol)
    }

    fn remember(&self, name: &str, vol: &Arc<CaseVolume>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(n, _)| n != name);
        open.push_back((name.to_string(), vol.clone()));
        while open.len() > self.capacity {
            open.pop_front();
        }
    }

    /// Volumes this process holds open (at most the capacity given at construction).
    pub fn open_volumes(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Bytes of case files in the directory (0 without one).
    pub fn usage(&self) -> Result<u64, DataError> {
        match &self.dir {
            Some(dir) => Ok(list_entries(dir)?.iter().map(|e| e.size).sum()),
            None => Ok(0),
        }
    }
}

/// sha256 hex of the preprocessing config's hash string: fixed length and safe in file names
/// whatever the caller's hash looks like.
pub fn config_digest(config_hash: &str) -> String {
    hex::encode(Sha256::digest(config_hash.as_bytes()))
}

fn file_name(case_id: &str, digest: &str) -> String {
    format!("{case_id}.{}.v{FORMAT_VERSION}.{EXTENSION}", &digest[..16])
}

fn owned_volume(case_id: &str, (shape, image, labels): Prepared) -> Result<CaseVolume, DataError> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let bad = |reason: String| DataError::Corrupt {
        key: format!("prepared case {case_id}"),
        reason,
    };
    match n {
        Some(n) if n == image.len() && n == labels.len() && n <= u32::MAX as usize => {
            Ok(CaseVolume::new(case_id.to_string(), shape, image, labels))
        }
        _ => Err(bad(format!(
            "shape {shape:?} does not match {} image and {} label voxels (or exceeds u32 indices)",
            image.len(),
            labels.len()
        ))),
    }
}

/// Best-effort recency update: a hit makes the file the most recently used.
fn touch(path: &Path) {
    if let Ok(f) = File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Blocks until this process holds the entry's advisory lock (released on drop). `None` when
/// the lock cannot be taken (read-only directory…): the caller then just prepares.
fn lock_entry(dir: &Path, name: &str) -> Option<File> {
    let path = dir.join(".locks").join(format!("{name}.lock"));
    let _ = fs::create_dir_all(dir.join(".locks"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    file.lock().ok()?;
    Some(file)
}

struct Entry {
    path: PathBuf,
    size: u64,
    modified: SystemTime,
}

fn list_entries(dir: &Path) -> Result<Vec<Entry>, DataError> {
    let mut out = vec![];
    for item in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let Ok(item) = item else { continue };
        let path = item.path();
        let name = item.file_name();
        let name = name.to_string_lossy();
        let Ok(meta) = item.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with('.') {
            // A temporary file whose writer died long ago.
            if name.contains(".tmp.") && modified.elapsed().is_ok_and(|age| age > STALE_TEMP) {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if path.extension().is_some_and(|e| e == EXTENSION) {
            out.push(Entry {
                path,
                size: meta.len(),
                modified,
            });
        }
    }
    Ok(out)
}

/// Deletes the least recently used case files (oldest mtime first) until the directory holds at
/// most `max_bytes`, never `keep` (the file just written). Returns the bytes freed. Safe to run
/// in several processes at once: a file already gone is simply skipped.
pub fn evict(dir: &Path, max_bytes: u64, keep: &Path) -> Result<u64, DataError> {
    let mut entries = list_entries(dir)?;
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    if total <= max_bytes {
        return Ok(0);
    }
    entries.sort_by_key(|e| e.modified);
    let mut freed = 0;
    for e in entries {
        if total <= max_bytes {
            break;
        }
        if e.path == keep {
            continue;
        }
        match fs::remove_file(&e.path) {
            Ok(()) => {
                freed += e.size;
                if let Some(name) = e.path.file_name() {
                    let lock = dir.join(".locks").join(format!("{}.lock", name.to_string_lossy()));
                    let _ = fs::remove_file(lock);
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(DataError::io(&e.path, err)),
        }
        total -= e.size;
    }
    Ok(freed)
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
