//! Writes NIfTI-1 files: the phantom datasets, and test inputs. Every volume goes out as
//! `[z, y, x]` memory (x fastest), which is NIfTI's on-disk order, so no transpose is needed.

use std::path::Path;

use ndarray::ArrayView3;
use nifti::NiftiHeader;
use nifti::writer::WriterOptions;

use crate::DataError;

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
