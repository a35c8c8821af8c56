//! The node-wide cache of preprocessed volumes: one compact file per (case, preprocessing
//! config), memory-mapped by every worker process on the node and every run of a sweep, so a
//! scaling sweep decodes and resamples each volume once instead of once per run.
//!
//! Safety across processes comes from the file system, not from an index anyone could corrupt:
//! - a file is written under a temporary name in the cache directory and `rename`d into place,
//!   so readers see a whole file or none, and two writers of the same case just replace one good
//!   file with an identical one;
//! - every open validates the header (magic, version, endianness, case id, config digest, a
//!   header checksum) and the exact file size; a file that fails is deleted and rebuilt, never
//!   trusted;
//! - recency is the file's mtime, refreshed on every hit, and eviction deletes the oldest files
//!   until the directory is under its limit; unlinking a file another process has mapped is safe
//!   (the mapping keeps the inode);
//! - an advisory lock per entry (`.locks/NAME.lock`) makes concurrent misses of one case wait for
//!   the first preparer instead of repeating its work. Correctness never depends on it: lock files
//!   may be deleted at any time, which at worst repeats a preparation.
//!
//! File format (native endianness, recorded in the header; a reader of the other endianness sees
//! an invalid file and rebuilds it):
//! ```text
//! 0     magic "VFCASE\0\0"      8 version u32      12 endian mark 0x01020304 u32
//! 16    shape d, h, w u64 x3    40 foreground count u64
//! 48    image offset u64        56 labels offset u64   64 foreground offset u64   72 file length u64
//! 96    case id (128 bytes, NUL padded)   224 sha256 hex of the config hash (64 bytes)
//! 4064  sha256 of bytes 0..4064
//! 4096  image u16 x n, then labels u32 x n, then foreground u32 x count, each at a 4096 boundary
//! ```
//! Page-aligned sections let the mapping be viewed as typed slices without copying.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use crate::DataError;
use crate::ids::validate_case_id;
use crate::volume::{CaseVolume, MappedSections};

/// Bumped whenever the layout or the quantisation changes: old files are then simply other keys.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: [u8; 8] = *b"VFCASE\0\0";
const ENDIAN_MARK: u32 = 0x0102_0304;
const PAGE: usize = 4096;
const CHECKSUM_AT: usize = PAGE - 32;
const ID_AT: usize = 96;
const ID_LEN: usize = 128;
const DIGEST_AT: usize = ID_AT + ID_LEN;
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
    /// Mapped from the node's cache directory.
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
    /// else mapped from the cache directory, else made by `prepare`, quantised, written (temp file
    /// and rename) and mapped. A cache that cannot be written (disk full, permissions) is logged
    /// and bypassed: the volume is still returned, owned.
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
        let owned = owned_volume(case_id, prepare()?)?;
        let vol = match self.store(dir, &name, &owned, &digest) {
            Ok(true) => match open_case_file(&path, case_id, &digest) {
                Ok(Some(mapped)) => mapped,
                _ => owned,
            },
            Ok(false) => owned,
            Err(e) => {
                tracing::warn!(
                    "case cache: cannot write {}: {e}; continuing without it",
                    path.display()
                );
                owned
            }
        };
        let vol = Arc::new(vol);
        self.remember(&name, &vol);
        Ok((vol, Source::Prepared))
    }

    /// Opens and validates a cache file, deleting it when invalid; refreshes its recency on a hit.
    fn open_valid(&self, path: &Path, case_id: &str, digest: &str) -> Option<CaseVolume> {
        match open_case_file(path, case_id, digest) {
            Ok(Some(vol)) => {
                touch(path);
                Some(vol)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("case cache: {e}; deleting it and preparing the case again");
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    /// Writes `vol` under `name` (temp file, then rename) and evicts down to the limit. `false`
    /// when the file alone would exceed the limit, so it is not cached.
    fn store(&self, dir: &Path, name: &str, vol: &CaseVolume, digest: &str) -> Result<bool, DataError> {
        let layout = Layout::of(vol.voxel_count(), vol.foreground().len());
        if layout.total as u64 > self.max_bytes {
            return Ok(false);
        }
        write_case_file(dir, name, vol, digest)?;
        evict(dir, self.max_bytes, &dir.join(name))?;
        Ok(true)
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

/// Section offsets of a file holding `n` voxels and `fg` foreground indices.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layout {
    image: usize,
    labels: usize,
    foreground: usize,
    total: usize,
}

impl Layout {
    fn of(n: usize, fg: usize) -> Self {
        let up = |x: usize| x.div_ceil(PAGE) * PAGE;
        let image = PAGE;
        let labels = up(image + 2 * n);
        let foreground = up(labels + 4 * n);
        Layout {
            image,
            labels,
            foreground,
            total: foreground + 4 * fg,
        }
    }
}

fn header(vol: &CaseVolume, digest: &str, layout: Layout) -> Vec<u8> {
    let mut h = vec![0u8; PAGE];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &MAGIC);
    put(8, &FORMAT_VERSION.to_ne_bytes());
    put(12, &ENDIAN_MARK.to_ne_bytes());
    for (a, d) in vol.shape.iter().enumerate() {
        put(16 + 8 * a, &(*d as u64).to_ne_bytes());
    }
    put(40, &(vol.foreground().len() as u64).to_ne_bytes());
    put(48, &(layout.image as u64).to_ne_bytes());
    put(56, &(layout.labels as u64).to_ne_bytes());
    put(64, &(layout.foreground as u64).to_ne_bytes());
    put(72, &(layout.total as u64).to_ne_bytes());
    put(ID_AT, vol.id.as_bytes());
    put(DIGEST_AT, digest.as_bytes());
    let sum = Sha256::digest(&h[..CHECKSUM_AT]);
    h[CHECKSUM_AT..].copy_from_slice(&sum);
    h
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `vol` to `dir/name` atomically: a temporary file in the same directory (same file
/// system, so the rename is atomic), flushed to disk, then renamed over the final name.
pub fn write_case_file(dir: &Path, name: &str, vol: &CaseVolume, digest: &str) -> Result<PathBuf, DataError> {
    let layout = Layout::of(vol.voxel_count(), vol.foreground().len());
    let temp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let file = File::options().write(true).create_new(true).open(&temp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&header(vol, digest, layout))?;
        w.write_all(bytemuck::cast_slice(vol.image()))?;
        pad_to(&mut w, PAGE + 2 * vol.voxel_count(), layout.labels)?;
        w.write_all(bytemuck::cast_slice(vol.labels()))?;
        pad_to(&mut w, layout.labels + 4 * vol.voxel_count(), layout.foreground)?;
        w.write_all(bytemuck::cast_slice(vol.foreground()))?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        // Data reaches the disk before the name does, so a crash never leaves a named file with
        // holes in it.
        file.sync_data()?;
        Ok(())
    })();
    let path = dir.join(name);
    match result.and_then(|()| fs::rename(&temp, &path)) {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(DataError::io(&path, e))
        }
    }
}

fn pad_to(w: &mut impl Write, at: usize, to: usize) -> std::io::Result<()> {
    w.write_all(&vec![0u8; to - at])
}

/// Maps and validates a cache file. `Ok(None)`: no such file. `Err`: a file that must not be
/// trusted (wrong size, magic, version, endianness, case, config or header checksum).
pub fn open_case_file(path: &Path, case_id: &str, digest: &str) -> Result<Option<CaseVolume>, DataError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(path, e)),
    };
    let bad = |reason: &str| DataError::Corrupt {
        key: path.display().to_string(),
        reason: format!("invalid cache file: {reason}"),
    };
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len() as usize;
    if len < PAGE {
        return Err(bad(&format!("{len} bytes, shorter than its header")));
    }
    // SAFETY: cache files are never modified in place: they are written under a temporary name
    // and renamed, and eviction only unlinks them (a mapping keeps the inode alive). Only an
    // outside process truncating a file in the cache directory could invalidate the mapping.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
    let h = &map[..PAGE];
    let u32_at = |at: usize| u32::from_ne_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_ne_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    if h[..8] != MAGIC {
        return Err(bad("bad magic"));
    }
    if u32_at(12) != ENDIAN_MARK {
        return Err(bad("written on a machine of the other endianness"));
    }
    if u32_at(8) != FORMAT_VERSION {
        return Err(bad(&format!(
            "format version {} (expected {FORMAT_VERSION})",
            u32_at(8)
        )));
    }
    if Sha256::digest(&h[..CHECKSUM_AT]).as_slice() != &h[CHECKSUM_AT..] {
        return Err(bad("header checksum mismatch"));
    }
    let id_field = &h[ID_AT..ID_AT + ID_LEN];
    let id_len = id_field.iter().position(|b| *b == 0).unwrap_or(ID_LEN);
    if &id_field[..id_len] != case_id.as_bytes() || &h[DIGEST_AT..DIGEST_AT + 64] != digest.as_bytes() {
        return Err(bad("holds another case or preprocessing config"));
    }
    let shape = [0, 1, 2].map(|a| u64_at(16 + 8 * a) as usize);
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| *n <= u32::MAX as usize)
        .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
    let fg = u64_at(40) as usize;
    if fg > n {
        return Err(bad("more foreground voxels than voxels"));
    }
    let layout = Layout::of(n, fg);
    let stored = [48, 56, 64, 72].map(|at| u64_at(at) as usize);
    if stored != [layout.image, layout.labels, layout.foreground, layout.total] {
        return Err(bad("section offsets disagree with the shape"));
    }
    if len != layout.total {
        return Err(bad(&format!("{len} bytes, expected {} (truncated?)", layout.total)));
    }
    let sections = MappedSections {
        image: layout.image..layout.image + 2 * n,
        labels: layout.labels..layout.labels + 4 * n,
        foreground: layout.foreground..layout.total,
    };
    Ok(Some(CaseVolume::mapped(
        case_id.to_string(),
        shape,
        Arc::new(map),
        sections,
    )))
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
