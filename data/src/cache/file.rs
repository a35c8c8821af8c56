//! The cache's file format: a prepared case written once with a checksum per section, and read
//! back only after every section matched the checksum recorded when it was written.
//!
//! Why a checksum per section, not only the header's: a file whose data was overwritten under an
//! intact header (a bad disk, a stray writer, a fault probe) would otherwise be trained on as a
//! hit, silently changing the run. Each section's xxh3-64 sits in the header, which the header's
//! sha256 covers, so no single overwrite goes unnoticed.
//!
//! Why a read copies the file into this process's own memory instead of mapping it: a mapping of
//! a file that shrinks (another process or an operator truncating it) turns the next access past
//! the new end into SIGBUS, which kills the worker with no log line. A verified copy in an
//! anonymous mapping cannot change under the process. The price: each open reads the whole file
//! once (checksumming it on the way, see `read_verified`), and worker processes of one node no
//! longer share the page cache's copy of a volume; each holds its few open volumes privately.
//!
//! Layout (native endianness, recorded in the header; a reader of the other endianness sees an
//! invalid file and rebuilds it):
//! ```text
//! 0     magic "VFCASE\0\0"      8 version u32      12 endian mark 0x01020304 u32
//! 16    shape d, h, w u64 x3    40 foreground count u64
//! 48    image offset u64        56 labels offset u64   64 foreground offset u64   72 file length u64
//! 96    case id (128 bytes, NUL padded)   224 sha256 hex of the config hash (64 bytes)
//! 288   xxh3-64 of the image, labels and foreground sections, u64 x3
//! 4064  sha256 of bytes 0..4064
//! 4096  image u16 x n, then labels u32 x n, then foreground u32 x count, each at a 4096 boundary
//! ```
//! Page-aligned sections let the copy be viewed as typed slices without another copy.

use std::fmt;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::DataError;
use crate::volume::{CaseVolume, MappedSections};

/// Bumped whenever the layout, the checksums or the quantisation change: old files are then other
/// names, never read, and age out of the cache. Version 2 added the section checksums.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: [u8; 8] = *b"VFCASE\0\0";
const ENDIAN_MARK: u32 = 0x0102_0304;
pub(super) const PAGE: usize = 4096;
const CHECKSUM_AT: usize = PAGE - 32;
const ID_AT: usize = 96;
const ID_LEN: usize = 128;
const DIGEST_AT: usize = ID_AT + ID_LEN;
const SECTION_SUMS_AT: usize = DIGEST_AT + 64;
/// Bytes read (and checksummed) at a time: small enough to be hashed while still in the CPU's
/// cache, large enough that the syscalls do not show.
const READ_CHUNK: usize = 1 << 20;

/// The part of a cache file that failed its check, named in the log and the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The file as a whole: unreadable, or not the length its header records.
    File,
    Header,
    Image,
    Labels,
    Foreground,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::File => "file",
            Section::Header => "header",
            Section::Image => "image section",
            Section::Labels => "labels section",
            Section::Foreground => "foreground section",
        })
    }
}

/// Why a cache file is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub section: Section,
    pub reason: String,
}

impl Rejected {
    fn new(section: Section, reason: impl Into<String>) -> Self {
        Rejected {
            section,
            reason: reason.into(),
        }
    }

    pub fn into_error(self, path: &Path) -> DataError {
        DataError::Corrupt {
            key: path.display().to_string(),
            reason: format!(
                "invalid cache file, {}: {} (the cache deletes and rebuilds such a file)",
                self.section, self.reason
            ),
        }
    }
}

/// Section offsets of a file holding `n` voxels and `fg` foreground indices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Layout {
    pub image: usize,
    pub labels: usize,
    pub foreground: usize,
    pub total: usize,
}

impl Layout {
    pub fn of(n: usize, fg: usize) -> Self {
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

    /// The byte ranges of the three arrays (padding excluded) of a volume of `n` voxels.
    fn sections(&self, n: usize) -> MappedSections {
        MappedSections {
            image: self.image..self.image + 2 * n,
            labels: self.labels..self.labels + 4 * n,
            foreground: self.foreground..self.total,
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
    let sums = [
        xxh3_64(bytemuck::cast_slice(vol.image())),
        xxh3_64(bytemuck::cast_slice(vol.labels())),
        xxh3_64(bytemuck::cast_slice(vol.foreground())),
    ];
    for (k, sum) in sums.iter().enumerate() {
        put(SECTION_SUMS_AT + 8 * k, &sum.to_ne_bytes());
    }
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

/// Reads and verifies a cache file. `Ok(None)`: no such file. `Err`: a file that must not be
/// trusted (wrong size, magic, version, endianness, case, config, header or section checksum).
pub fn open_case_file(path: &Path, case_id: &str, digest: &str) -> Result<Option<CaseVolume>, DataError> {
    read_verified(path, case_id, digest).map_err(|r| r.into_error(path))
}

/// What the header of a valid file says.
struct Header {
    shape: [usize; 3],
    n: usize,
    layout: Layout,
    sums: [u64; 3],
}

fn parse_header(h: &[u8], case_id: &str, digest: &str) -> Result<Header, Rejected> {
    let bad = |reason: String| Rejected::new(Section::Header, reason);
    let u32_at = |at: usize| u32::from_ne_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_ne_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    if h[..8] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    if u32_at(12) != ENDIAN_MARK {
        return Err(bad("written on a machine of the other endianness".into()));
    }
    if u32_at(8) != FORMAT_VERSION {
        return Err(bad(format!("format version {} (expected {FORMAT_VERSION})", u32_at(8))));
    }
    if Sha256::digest(&h[..CHECKSUM_AT]).as_slice() != &h[CHECKSUM_AT..PAGE] {
        return Err(bad("header checksum mismatch".into()));
    }
    let id_field = &h[ID_AT..ID_AT + ID_LEN];
    let id_len = id_field.iter().position(|b| *b == 0).unwrap_or(ID_LEN);
    if &id_field[..id_len] != case_id.as_bytes() || &h[DIGEST_AT..DIGEST_AT + 64] != digest.as_bytes() {
        return Err(bad("holds another case or preprocessing config".into()));
    }
    let shape = [0, 1, 2].map(|a| u64_at(16 + 8 * a) as usize);
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| *n <= u32::MAX as usize)
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let fg = u64_at(40) as usize;
    if fg > n {
        return Err(bad("more foreground voxels than voxels".into()));
    }
    let layout = Layout::of(n, fg);
    let stored = [48, 56, 64, 72].map(|at| u64_at(at) as usize);
    if stored != [layout.image, layout.labels, layout.foreground, layout.total] {
        return Err(bad("section offsets disagree with the shape".into()));
    }
    let sums = [0, 1, 2].map(|k| u64_at(SECTION_SUMS_AT + 8 * k));
    Ok(Header { shape, n, layout, sums })
}

/// Reads `path` into a private, page-aligned anonymous mapping, checking the header and then
/// each section against its recorded checksum as it arrives. Nothing in the returned volume refers
/// to the file any more, so truncating or replacing the file afterwards cannot affect it.
pub(super) fn read_verified(path: &Path, case_id: &str, digest: &str) -> Result<Option<CaseVolume>, Rejected> {
    let io = |e: std::io::Error| Rejected::new(Section::File, format!("cannot read it: {e}"));
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len() as usize;
    if len < PAGE {
        return Err(Rejected::new(
            Section::File,
            format!("{len} bytes, shorter than its header"),
        ));
    }
    let mut h = vec![0u8; PAGE];
    read_fully(&mut file, &mut h, Section::Header)?;
    let header = parse_header(&h, case_id, digest)?;
    let layout = header.layout;
    if len != layout.total {
        return Err(Rejected::new(
            Section::File,
            format!("{len} bytes, expected {} (truncated or extended?)", layout.total),
        ));
    }
    let mut copy = MmapMut::map_anon(layout.total).map_err(io)?;
    // Faulting in fresh 4 KiB pages dominated the read of a SuPreM-sized case (200 ms for 87 MB
    // on a loaded 2-core VM); 2 MiB pages cut it to 70 ms (31 ms unloaded). Only advice: where transparent huge pages are off,
    // nothing changes.
    #[cfg(target_os = "linux")]
    let _ = copy.advise(memmap2::Advice::HugePage);
    copy[..PAGE].copy_from_slice(&h);
    let sections = layout.sections(header.n);
    let parts = [
        (Section::Image, &sections.image),
        (Section::Labels, &sections.labels),
        (Section::Foreground, &sections.foreground),
    ];
    for ((section, range), stored) in parts.into_iter().zip(header.sums) {
        let computed = read_section(&mut file, &mut copy, range.clone(), section)?;
        if computed != stored {
            return Err(Rejected::new(
                section,
                format!(
                    "checksum mismatch at bytes {}..{} (stored {stored:016x}, computed {computed:016x})",
                    range.start, range.end
                ),
            ));
        }
    }
    let copy = copy.make_read_only().map_err(io)?;
    Ok(Some(CaseVolume::mapped(
        case_id.to_string(),
        header.shape,
        Arc::new(copy),
        sections,
    )))
}

/// Reads `range` of the file into the same range of `copy`, chunk by chunk, hashing each chunk
/// while it is still in the CPU's cache.
fn read_section(file: &mut File, copy: &mut [u8], range: Range<usize>, section: Section) -> Result<u64, Rejected> {
    file.seek(SeekFrom::Start(range.start as u64))
        .map_err(|e| Rejected::new(section, format!("cannot seek to it: {e}")))?;
    let mut hasher = Xxh3::new();
    for chunk in copy[range].chunks_mut(READ_CHUNK) {
        read_fully(file, chunk, section)?;
        hasher.update(chunk);
    }
    Ok(hasher.digest())
}

/// `read_exact`, naming the section when the file ends early (it was truncated while being read).
fn read_fully(file: &mut File, buf: &mut [u8], section: Section) -> Result<(), Rejected> {
    file.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Rejected::new(section, "the file ended inside it (truncated while read?)"),
        _ => Rejected::new(section, format!("cannot read it: {e}")),
    })
}
