//! NIfTI-1 decoding at the boundary of the `nifti` crate.
//!
//! The crate does the format work; this module pins down what the rest of `data` relies on:
//! gzip is detected by its magic rather than the key's suffix, inputs the crate would panic on
//! (a `bitpix` that disagrees with `datatype`) are rejected first, and every volume comes out as a
//! flat buffer in `[z, y, x]` order with its shape. NIfTI stores voxels x fastest (Fortran order
//! over `[x, y, z]`), which is the same memory as C order over `[z, y, x]`, so no transpose is
//! needed either way.

use std::borrow::Cow;
use std::io::Read;

use flate2::read::MultiGzDecoder;
use nifti::{DataElement, InMemNiftiObject, IntoNdArray, NiftiHeader, NiftiObject, NiftiType};

use crate::DataError;

/// Refuse to inflate more than this: a full-resolution abdominal CT is a few hundred MiB as
/// int16, so anything larger is a corrupt header or a gzip bomb, not a case.
const MAX_DECODED_BYTES: u64 = 4 << 30;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A decoded volume: `shape` is `[D, H, W]` = `[z, y, x]` and `data` is x fastest.
#[derive(Debug)]
pub(crate) struct Decoded<T> {
    pub shape: [usize; 3],
    pub data: Vec<T>,
}

/// Decodes a `.nii` or `.nii.gz` held in memory, converting voxels to `T` with the header's
/// `scl_slope`/`scl_inter` applied (a zero slope means "unscaled", as the standard says).
pub(crate) fn decode<T: DataElement>(bytes: &[u8], key: &str) -> Result<Decoded<T>, DataError> {
    let corrupt = |reason: String| DataError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let raw: Cow<'_, [u8]> = if bytes.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        MultiGzDecoder::new(bytes)
            .take(MAX_DECODED_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(format!("gzip stream: {e}")))?;
        if out.len() as u64 > MAX_DECODED_BYTES {
            return Err(corrupt(format!("inflates to more than {MAX_DECODED_BYTES} bytes")));
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(bytes)
    };

    let nifti_err = |source| DataError::Nifti {
        key: key.to_string(),
        source,
    };
    let header = NiftiHeader::from_reader(&raw[..]).map_err(nifti_err)?;
    let datatype = header.data_type().map_err(nifti_err)?;
    if !matches!(
        datatype,
        NiftiType::Uint8
            | NiftiType::Int8
            | NiftiType::Uint16
            | NiftiType::Int16
            | NiftiType::Uint32
            | NiftiType::Int32
            | NiftiType::Float32
            | NiftiType::Float64
    ) {
        return Err(corrupt(format!("unsupported voxel datatype {datatype:?}")));
    }
    // The crate sizes its read by bitpix but converts by datatype, and panics if they disagree.
    if header.bitpix as usize != datatype.size_of() * 8 {
        return Err(corrupt(format!(
            "bitpix {} disagrees with datatype {datatype:?}",
            header.bitpix
        )));
    }
    let dims = header.dim().map_err(nifti_err)?;
    if dims.len() < 3 || dims[3..].iter().any(|&d| d != 1) {
        return Err(corrupt(format!("dims {dims:?} are not a single 3-D volume")));
    }
    let shape = [dims[2] as usize, dims[1] as usize, dims[0] as usize];

    let object = InMemNiftiObject::from_reader(&raw[..]).map_err(nifti_err)?;
    drop(raw);
    let array = object.into_volume().into_ndarray::<T>().map_err(nifti_err)?;
    // Reversing the axes of a Fortran-ordered [x, y, z(, 1...)] array gives a C-ordered
    // [(1..., ) z, y, x] one whose memory is already our layout.
    let reversed = array.reversed_axes();
    let data = if reversed.is_standard_layout() {
        let (data, offset) = reversed.into_raw_vec_and_offset();
        match offset {
            Some(0) | None => data,
            Some(_) => return Err(corrupt("decoder returned an offset buffer".into())),
        }
    } else {
        reversed.iter().copied().collect()
    };
    if data.len() != shape.iter().product::<usize>() {
        return Err(corrupt(format!("{} voxels for dims {dims:?}", data.len())));
    }
    Ok(Decoded { shape, data })
}
