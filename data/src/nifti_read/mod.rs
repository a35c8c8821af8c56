//! NIfTI-1 reading, matching what nibabel reads: the voxels of `get_fdata()` (scaled by
//! `scl_slope`/`scl_inter`), and `img.affine` by the sform > qform > base precedence, from `.nii`
//! or `.nii.gz` of either byte order.
//!
//! - `header`: the 348-byte header, parsed and validated by hand (why: see there).
//! - `affine`: nibabel's `get_best_affine()`.
//! - `decode`: raw bytes to `f32`/`f64` values or `u8` masks, block by block.
//! - `stream`: the same, fed from an object store's download stream.
//!
//! Nothing here panics on bad bytes: every malformed input is a `DataError::Corrupt` naming the
//! key and the reason. Memory is bounded by the header's claim (itself capped at
//! `MAX_DATA_BYTES`) and, before any data arrives, by the compressed size: a 1 KiB file claiming
//! 8 GiB of voxels is refused after reading, not honoured with an 8 GiB allocation up front.
//! NaNs are passed through; the preprocessing decides what to do with them.

mod affine;
mod decode;
mod header;
mod stream;
pub mod testing;

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;

pub use affine::AffineSource;
pub use decode::Voxel;
pub use header::{Datatype, Endianness, HEADER_BYTES, Header, MAX_DATA_BYTES, MAX_VOXELS};
pub use stream::{fetch_image, fetch_volume};

use crate::DataError;
use crate::geometry::Volume;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Raw bytes converted per step: big enough to amortise the loop, small enough to stay in cache.
const BLOCK_BYTES: usize = 1 << 20;
/// Deflate expands at most ~1032:1; a little above that bounds what a compressed input of known
/// size can honestly inflate to, which caps the up-front allocation.
const MAX_INFLATE_RATIO: u64 = 1040;
/// After the data, this much more of a gzip stream is read so that its CRC and length trailer
/// are checked; a longer tail (padding, a bomb) is left unread rather than refused.
const TRAILER_SLACK: u64 = 64 << 10;

/// A decoded file: its header (for `inspect`), where its affine came from, and the volume.
#[derive(Debug, Clone)]
pub struct NiftiImage<T> {
    pub header: Header,
    pub affine_source: AffineSource,
    /// Whether the file was gzip-compressed (detected by magic, not by name).
    pub gzip: bool,
    pub volume: Volume<T>,
}

/// Decodes a `.nii` or `.nii.gz` held in memory.
pub fn decode<T: Voxel>(bytes: &[u8], key: &str) -> Result<Volume<T>, DataError> {
    decode_image(bytes, key).map(|image| image.volume)
}

/// As [`decode`], keeping the header.
pub fn decode_image<T: Voxel>(bytes: &[u8], key: &str) -> Result<NiftiImage<T>, DataError> {
    read_image(bytes, Some(bytes.len() as u64), key)
}

/// Decodes a NIfTI file from any reader, gzip detected by its magic. `input_len`, when known,
/// bounds the up-front allocation (see the module doc).
pub fn read_image<T: Voxel>(
    mut input: impl Read,
    input_len: Option<u64>,
    key: &str,
) -> Result<NiftiImage<T>, DataError> {
    let mut magic = [0u8; 2];
    let got = read_full(&mut input, &mut magic).map_err(|e| io_corrupt(key, "reading", e))?;
    let prefixed = io::Cursor::new(magic).take(got as u64).chain(input);
    if got == 2 && magic == GZIP_MAGIC {
        let cap = input_len.map(|n| n.saturating_mul(MAX_INFLATE_RATIO).saturating_add(1 << 20));
        read_decompressed(MultiGzDecoder::new(prefixed), cap, true, key)
    } else {
        read_decompressed(prefixed, input_len, false, key)
    }
}

fn read_decompressed<T: Voxel>(
    mut r: impl Read,
    max_len: Option<u64>,
    gzip: bool,
    key: &str,
) -> Result<NiftiImage<T>, DataError> {
    let what = if gzip { "gzip stream" } else { "reading" };
    let corrupt = |reason: String| DataError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let mut raw_header = [0u8; HEADER_BYTES];
    let got = read_full(&mut r, &mut raw_header).map_err(|e| io_corrupt(key, what, e))?;
    if got < HEADER_BYTES {
        return Err(corrupt(format!(
            "ends after {got} bytes, inside the {HEADER_BYTES}-byte header"
        )));
    }
    let header = Header::parse(&raw_header, key)?;
    let scaling = header.scaling(key)?;
    let (affine, affine_source) = affine::best_affine(&header, key)?;

    let skip = header.vox_offset - HEADER_BYTES as u64;
    let skipped = io::copy(&mut (&mut r).take(skip), &mut io::sink()).map_err(|e| io_corrupt(key, what, e))?;
    if skipped < skip {
        return Err(corrupt(format!(
            "ends at byte {} before vox_offset {}",
            HEADER_BYTES as u64 + skipped,
            header.vox_offset
        )));
    }

    let size = header.datatype.size();
    let total = header.data_bytes();
    // Reserve what the header claims only as far as the input could possibly hold it.
    let plausible = max_len.map_or(total, |n| total.min(n.saturating_sub(header.vox_offset)));
    let mut data: Vec<T> = Vec::with_capacity((plausible / size as u64) as usize);
    let mut block = vec![0u8; (BLOCK_BYTES as u64).min(total) as usize];
    let mut done = 0u64;
    while done < total {
        let want = ((total - done) as usize).min(block.len());
        let got = read_full(&mut r, &mut block[..want]).map_err(|e| io_corrupt(key, what, e))?;
        decode::convert(
            &mut data,
            &block[..got - got % size],
            header.datatype,
            header.endianness,
            scaling,
        );
        done += got as u64;
        if got < want {
            return Err(corrupt(format!(
                "data ends after {done} of the {total} bytes its header claims (dims {:?}, {})",
                header.dims,
                header.datatype.name()
            )));
        }
    }
    if gzip {
        io::copy(&mut r.take(TRAILER_SLACK), &mut io::sink()).map_err(|e| io_corrupt(key, what, e))?;
    }
    Ok(NiftiImage {
        volume: Volume {
            shape: header.shape_zyx(),
            data,
            affine,
        },
        header,
        affine_source,
        gzip,
    })
}

fn io_corrupt(key: &str, what: &str, e: io::Error) -> DataError {
    DataError::Corrupt {
        key: key.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;
