//! The 348-byte NIfTI-1 header, parsed by hand.
//!
//! We do not use the `nifti` crate to read: its reader sizes reads by `bitpix` but converts by
//! `datatype` and panics when they disagree, and it materialises an ndarray per volume. The header
//! is a fixed 348-byte struct, so reading each field from a fixed-size array at a known offset
//! cannot go out of bounds, and every check below is ours, with the field named in its error.
//!
//! Where nibabel silently repairs a header on load (`Nifti1Header.check_fix`), we repair it the
//! same way, so that the affine and the spacing agree with `img.affine` and `header.get_zooms()`:
//! an unknown qform/sform code counts as 0, a zero spatial pixdim as 1, a negative one by its
//! absolute value, and a qfac other than ±1 as 1. Where nibabel refuses (bad magic, unknown
//! datatype, a too-small `vox_offset`), so do we. One deliberate difference: nibabel rewrites a
//! `bitpix` that disagrees with `datatype`, we reject it as corrupt, since it means the writer
//! was confused about the very size of the data.

use crate::DataError;

pub const HEADER_BYTES: usize = 348;
/// A `.nii` file's data may not start before the header and its 4-byte extension flag.
pub const MIN_VOX_OFFSET: u64 = 352;
/// Extensions between the header and the data larger than this are not a CT's metadata.
pub const MAX_VOX_OFFSET: u64 = 64 << 20;
/// 2^31 voxels: 8× a 512×512×1000 CT, far beyond any AbdomenAtlas volume.
pub const MAX_VOXELS: u64 = 1 << 31;
/// Refuse headers claiming more data than this: a corrupt header or a gzip bomb, not a case.
pub const MAX_DATA_BYTES: u64 = 4 << 30;

/// Byte order of the file, found from `sizeof_hdr` (348 read either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endianness {
    Little,
    Big,
}

impl Endianness {
    pub fn name(self) -> &'static str {
        match self {
            Endianness::Little => "little",
            Endianness::Big => "big",
        }
    }
}

/// The voxel datatypes we decode (NIfTI-1 `datatype` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Datatype {
    fn from_code(code: i16) -> Result<Self, String> {
        Ok(match code {
            2 => Datatype::U8,
            256 => Datatype::I8,
            4 => Datatype::I16,
            512 => Datatype::U16,
            8 => Datatype::I32,
            768 => Datatype::U32,
            16 => Datatype::F32,
            64 => Datatype::F64,
            other => {
                let name = match other {
                    1 => "binary (1-bit)",
                    32 => "complex64",
                    128 => "rgb24",
                    1024 => "int64",
                    1280 => "uint64",
                    1536 => "float128",
                    1792 => "complex128",
                    2048 => "complex256",
                    2304 => "rgba32",
                    _ => return Err(format!("datatype code {other} is not a NIfTI-1 datatype")),
                };
                return Err(format!("datatype {name} (code {other}) is not supported"));
            }
        })
    }

    /// The name numpy (and so nibabel's `get_data_dtype()`) gives it.
    pub fn name(self) -> &'static str {
        match self {
            Datatype::U8 => "uint8",
            Datatype::I8 => "int8",
            Datatype::I16 => "int16",
            Datatype::U16 => "uint16",
            Datatype::I32 => "int32",
            Datatype::U32 => "uint32",
            Datatype::F32 => "float32",
            Datatype::F64 => "float64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Datatype::U8 | Datatype::I8 => 1,
            Datatype::I16 | Datatype::U16 => 2,
            Datatype::I32 | Datatype::U32 | Datatype::F32 => 4,
            Datatype::F64 => 8,
        }
    }
}

/// The header fields the reader uses, validated, with nibabel's repairs applied (see the module
/// doc). `dim`, `pixdim` and the codes are kept as the file has them for `inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub endianness: Endianness,
    /// `dim[1..=dim[0]]`: the shape as nibabel reports it, x first.
    pub dims: Vec<usize>,
    pub datatype: Datatype,
    /// `pixdim[1..=3]` after nibabel's repairs: `header.get_zooms()[:3]`.
    pub zooms: [f64; 3],
    /// `pixdim[0]` after repair: 1 or -1.
    pub qfac: f64,
    pub vox_offset: u64,
    pub scl_slope: f32,
    pub scl_inter: f32,
    /// As written; `effective_*` below say which ones nibabel honours.
    pub qform_code: i16,
    pub sform_code: i16,
    pub quatern: [f64; 3],
    pub qoffset: [f64; 3],
    pub srow: [[f64; 4]; 3],
    pub descrip: String,
}

/// Reads fields of one byte order out of the fixed-size header.
struct Fields<'a> {
    b: &'a [u8; HEADER_BYTES],
    big: bool,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        // `at` is a constant offset inside the header; `get` keeps a typo from ever panicking.
        if let Some(src) = self.b.get(at..at + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn i16(&self, at: usize) -> i16 {
        let b = self.bytes::<2>(at);
        if self.big {
            i16::from_be_bytes(b)
        } else {
            i16::from_le_bytes(b)
        }
    }
    fn i32(&self, at: usize) -> i32 {
        let b = self.bytes::<4>(at);
        if self.big {
            i32::from_be_bytes(b)
        } else {
            i32::from_le_bytes(b)
        }
    }
    fn f32(&self, at: usize) -> f32 {
        let b = self.bytes::<4>(at);
        if self.big {
            f32::from_be_bytes(b)
        } else {
            f32::from_le_bytes(b)
        }
    }
}

impl Header {
    /// Parses and validates a header; errors are `DataError::Corrupt` naming `key` and the field.
    pub fn parse(b: &[u8; HEADER_BYTES], key: &str) -> Result<Self, DataError> {
        Self::parse_fields(b).map_err(|reason| DataError::Corrupt {
            key: key.to_string(),
            reason,
        })
    }

    fn parse_fields(b: &[u8; HEADER_BYTES]) -> Result<Self, String> {
        let le = Fields { b, big: false };
        let endianness = match le.i32(0) {
            348 => Endianness::Little,
            v if v.swap_bytes() == 348 => Endianness::Big,
            540 => return Err("NIfTI-2 headers (sizeof_hdr 540) are not supported".into()),
            v => return Err(format!("sizeof_hdr is {v}, not 348 in either byte order")),
        };
        let f = Fields {
            b,
            big: endianness == Endianness::Big,
        };
        let magic = f.bytes::<4>(344);
        if &magic == b"ni1\0" {
            return Err("magic 'ni1' is a .hdr/.img pair; only single-file .nii is read".into());
        }
        if &magic != b"n+1\0" {
            return Err(format!("magic {:?} is not 'n+1'", String::from_utf8_lossy(&magic)));
        }

        let dim: [i16; 8] = std::array::from_fn(|i| f.i16(40 + 2 * i));
        let ndim = dim[0];
        if !(3..=7).contains(&ndim) {
            return Err(format!(
                "dim[0] is {ndim}; a 3-D volume needs 3 (or more with trailing 1s)"
            ));
        }
        let mut dims = Vec::with_capacity(ndim as usize);
        for (i, &d) in dim.iter().enumerate().take(ndim as usize + 1).skip(1) {
            if d < 1 {
                return Err(format!("dim[{i}] is {d}; every dimension must be at least 1"));
            }
            if i > 3 && d != 1 {
                return Err(format!(
                    "dim[{i}] is {d}; only a single 3-D volume is read (dims {dim:?})"
                ));
            }
            dims.push(d as usize);
        }

        let datatype = Datatype::from_code(f.i16(70))?;
        let bitpix = f.i16(72);
        if bitpix as i64 != datatype.size() as i64 * 8 {
            return Err(format!(
                "bitpix {bitpix} disagrees with datatype {} ({} bits)",
                datatype.name(),
                datatype.size() * 8
            ));
        }
        let voxels: u64 = dims.iter().map(|&d| d as u64).product();
        if voxels > MAX_VOXELS {
            return Err(format!(
                "dims {dims:?} hold {voxels} voxels, over the limit of {MAX_VOXELS}"
            ));
        }
        let data_bytes = voxels * datatype.size() as u64;
        if data_bytes > MAX_DATA_BYTES {
            return Err(format!(
                "dims {dims:?} of {} need {data_bytes} bytes, over the limit of {MAX_DATA_BYTES}",
                datatype.name()
            ));
        }

        let pixdim: [f32; 8] = std::array::from_fn(|i| f.f32(76 + 4 * i));
        let qfac = if pixdim[0] == -1.0 { -1.0 } else { 1.0 };
        let zooms = [1, 2, 3].map(|i| {
            let p = pixdim[i].abs() as f64;
            if p == 0.0 { 1.0 } else { p }
        });
        if let Some(i) = (1..=3).find(|&i| !pixdim[i].is_finite()) {
            return Err(format!("pixdim[{i}] is {}", pixdim[i]));
        }

        let vox_offset_f = f.f32(108);
        if !vox_offset_f.is_finite() || vox_offset_f < 0.0 {
            return Err(format!("vox_offset is {vox_offset_f}"));
        }
        // nibabel truncates it to an integer (`int(hdr['vox_offset'])`).
        let vox_offset = vox_offset_f as u64;
        if vox_offset < MIN_VOX_OFFSET {
            return Err(format!(
                "vox_offset {vox_offset} is below {MIN_VOX_OFFSET}, inside the header"
            ));
        }
        if vox_offset > MAX_VOX_OFFSET {
            return Err(format!("vox_offset {vox_offset} is over the limit of {MAX_VOX_OFFSET}"));
        }

        let descrip_raw = f.bytes::<80>(148);
        let end = descrip_raw.iter().position(|&c| c == 0).unwrap_or(descrip_raw.len());
        Ok(Header {
            endianness,
            dims,
            datatype,
            zooms,
            qfac,
            vox_offset,
            scl_slope: f.f32(112),
            scl_inter: f.f32(116),
            qform_code: f.i16(252),
            sform_code: f.i16(254),
            quatern: [256, 260, 264].map(|at| f.f32(at) as f64),
            qoffset: [268, 272, 276].map(|at| f.f32(at) as f64),
            srow: [280, 296, 312].map(|row| std::array::from_fn(|c| f.f32(row + 4 * c) as f64)),
            descrip: String::from_utf8_lossy(&descrip_raw[..end]).into_owned(),
        })
    }

    /// The volume's shape in our `[z, y, x]` order.
    pub fn shape_zyx(&self) -> [usize; 3] {
        [self.dims[2], self.dims[1], self.dims[0]]
    }

    pub fn voxel_count(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn data_bytes(&self) -> u64 {
        self.voxel_count() as u64 * self.datatype.size() as u64
    }

    /// nibabel's `get_slope_inter()`: `None` (unscaled) when the slope is 0 or not finite, and an
    /// error when the slope is valid but the intercept is not. An identity scaling is `None` too,
    /// since it changes no value.
    pub fn scaling(&self, key: &str) -> Result<Option<(f64, f64)>, DataError> {
        let (slope, inter) = (self.scl_slope as f64, self.scl_inter as f64);
        if slope == 0.0 || !slope.is_finite() {
            return Ok(None);
        }
        if !inter.is_finite() {
            return Err(DataError::Corrupt {
                key: key.to_string(),
                reason: format!("scl_slope {slope} is valid but scl_inter is {inter}"),
            });
        }
        Ok((slope != 1.0 || inter != 0.0).then_some((slope, inter)))
    }

    /// The codes nibabel acts on: codes outside 0..=5 are reset to 0 by its `check_fix`.
    pub fn effective_sform_code(&self) -> i16 {
        if (0..=5).contains(&self.sform_code) {
            self.sform_code
        } else {
            0
        }
    }

    pub fn effective_qform_code(&self) -> i16 {
        if (0..=5).contains(&self.qform_code) {
            self.qform_code
        } else {
            0
        }
    }
}
