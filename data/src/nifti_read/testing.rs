//! A byte-level NIfTI-1 encoder for tests, fuzzing and benchmarks. Unlike `nifti_write`, it
//! writes whatever fields it is given, valid or not, in either byte order, so tests can build
//! exactly the malformed files the reader must refuse.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

/// Header fields to write; `Default` is a valid little-endian int16 1×1×1 volume with no
/// transforms set.
#[derive(Debug, Clone)]
pub struct RawHeader {
    pub big_endian: bool,
    pub sizeof_hdr: i32,
    pub dim: [i16; 8],
    pub datatype: i16,
    pub bitpix: i16,
    pub pixdim: [f32; 8],
    pub vox_offset: f32,
    pub scl_slope: f32,
    pub scl_inter: f32,
    pub qform_code: i16,
    pub sform_code: i16,
    pub quatern: [f32; 3],
    pub qoffset: [f32; 3],
    pub srow: [[f32; 4]; 3],
    pub magic: [u8; 4],
}

impl Default for RawHeader {
    fn default() -> Self {
        RawHeader {
            big_endian: false,
            sizeof_hdr: 348,
            dim: [3, 1, 1, 1, 1, 1, 1, 1],
            datatype: 4,
            bitpix: 16,
            pixdim: [1.0; 8],
            vox_offset: 352.0,
            scl_slope: 0.0,
            scl_inter: 0.0,
            qform_code: 0,
            sform_code: 0,
            quatern: [0.0; 3],
            qoffset: [0.0; 3],
            srow: [[0.0; 4]; 3],
            magic: *b"n+1\0",
        }
    }
}

impl RawHeader {
    /// The 348 header bytes followed by zero padding up to `vox_offset` (at least 352 bytes, so
    /// the 4-byte extension flag is present), then `data` as given.
    pub fn file(&self, data: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 348];
        let big = self.big_endian;
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        macro_rules! num {
            ($v:expr) => {
                if big { $v.to_be_bytes() } else { $v.to_le_bytes() }
            };
        }
        put(0, &num!(self.sizeof_hdr));
        for (i, d) in self.dim.iter().enumerate() {
            put(40 + 2 * i, &num!(*d));
        }
        put(70, &num!(self.datatype));
        put(72, &num!(self.bitpix));
        for (i, p) in self.pixdim.iter().enumerate() {
            put(76 + 4 * i, &num!(*p));
        }
        put(108, &num!(self.vox_offset));
        put(112, &num!(self.scl_slope));
        put(116, &num!(self.scl_inter));
        put(252, &num!(self.qform_code));
        put(254, &num!(self.sform_code));
        for i in 0..3 {
            put(256 + 4 * i, &num!(self.quatern[i]));
            put(268 + 4 * i, &num!(self.qoffset[i]));
            for c in 0..4 {
                put(280 + 16 * i + 4 * c, &num!(self.srow[i][c]));
            }
        }
        put(344, &self.magic);
        let offset = if self.vox_offset.is_finite() && self.vox_offset >= 352.0 && self.vox_offset < 1e7 {
            self.vox_offset as usize
        } else {
            352
        };
        h.resize(offset, 0);
        h.extend_from_slice(data);
        h
    }
}

/// Gzips `bytes` at `level` (0..=9).
pub fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::new(level));
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}
