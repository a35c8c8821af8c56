//! NIfTI-1 encoding and decoding at the boundary of the `nifti` crate.
//!
//! The crate does the format work; this module pins down what the rest of `data` relies on:
//! gzip is detected by its magic rather than the key's suffix, inputs the crate would panic on
//! (a `bitpix` that disagrees with `datatype`) are rejected first, and every volume comes out as a
//! flat buffer in `[z, y, x]` order with its shape. NIfTI stores voxels x fastest (Fortran order
//! over `[x, y, z]`), which is the same memory as C order over `[z, y, x]`, so no transpose is
//! needed either way.

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;
use ndarray::ArrayView3;
use nifti::writer::WriterOptions;
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

/// Voxel buffers the phantom writer emits: CT as int16 Hounsfield units, masks as uint8, the
/// datatypes AbdomenAtlas itself ships.
pub(crate) enum Voxels<'a> {
    I16(&'a [i16]),
    U8(&'a [u8]),
}

/// What the header says about geometry and meaning, beyond shape and datatype.
pub(crate) struct HeaderInfo<'a> {
    pub spacing_mm: f32,
    pub description: &'a str,
    /// NIFTI_INTENT_LABEL for masks so viewers colour them as labels.
    pub is_label: bool,
}

/// Writes a `.nii.gz` (gzip chosen by the file name) with shape `[D, H, W]` and a RAS+ affine:
/// voxel axes x, y, z point to the patient's right, anterior and superior, scaled by the spacing,
/// and the volume centre sits at the world origin.
pub(crate) fn write_gz(
    path: &Path,
    shape: [usize; 3],
    voxels: Voxels<'_>,
    info: &HeaderInfo<'_>,
) -> Result<(), DataError> {
    let key = path.display().to_string();
    let header = ras_header(shape, info).map_err(|source| DataError::Nifti {
        key: key.clone(),
        source,
    })?;
    let options = WriterOptions::new(path).reference_header(&header);
    let shape_err = |e: ndarray::ShapeError| DataError::Corrupt {
        key: key.clone(),
        reason: format!("buffer does not match shape {shape:?}: {e}"),
    };
    // A C-ordered [z, y, x] view with reversed axes is the [x, y, z] array NIfTI expects.
    let result = match voxels {
        Voxels::I16(data) => options.write_nifti(
            &ArrayView3::from_shape((shape[0], shape[1], shape[2]), data)
                .map_err(shape_err)?
                .reversed_axes(),
        ),
        Voxels::U8(data) => options.write_nifti(
            &ArrayView3::from_shape((shape[0], shape[1], shape[2]), data)
                .map_err(shape_err)?
                .reversed_axes(),
        ),
    };
    result.map_err(|source| match source {
        nifti::NiftiError::Io(source) => DataError::io(path, source),
        source => DataError::Nifti { key, source },
    })
}

fn ras_header(shape: [usize; 3], info: &HeaderInfo<'_>) -> nifti::Result<NiftiHeader> {
    let s = info.spacing_mm;
    let [d, h, w] = shape;
    let origin = |n: usize| -s * (n as f32 - 1.0) / 2.0;
    let (ox, oy, oz) = (origin(w), origin(h), origin(d));
    let mut header = NiftiHeader {
        pixdim: [1.0, s, s, s, 1.0, 1.0, 1.0, 1.0],
        // mm and seconds.
        xyzt_units: 2 | 8,
        qform_code: 1,
        sform_code: 1,
        // Identity rotation: the quaternion's (b, c, d) are zero and pixdim[0] (qfac) is 1.
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 0.0,
        quatern_x: ox,
        quatern_y: oy,
        quatern_z: oz,
        srow_x: [s, 0.0, 0.0, ox],
        srow_y: [0.0, s, 0.0, oy],
        srow_z: [0.0, 0.0, s, oz],
        scl_slope: 1.0,
        scl_inter: 0.0,
        intent_code: if info.is_label { 1002 } else { 0 },
        cal_min: if info.is_label { 0.0 } else { -1000.0 },
        cal_max: if info.is_label { 1.0 } else { 1000.0 },
        ..NiftiHeader::default()
    };
    header.set_description(info.description.as_bytes())?;
    Ok(header)
}
