//! Writes NIfTI-1 files: the phantom datasets, and test inputs. Every volume goes out as
//! `[z, y, x]` memory (x fastest), which is NIfTI's on-disk order, so no transpose is needed.
//! The affine is arbitrary (phantoms are written in LPS, as scanners write CT) and goes out as
//! both the sform and the qform, so every reader finds the same geometry whichever it prefers.

use std::path::Path;

use ndarray::ArrayView3;
use nifti::NiftiHeader;
use nifti::writer::WriterOptions;

use crate::DataError;
use crate::geometry::Affine;

/// Voxel buffers the phantom writer emits: CT as int16 Hounsfield units, masks as uint8, the
/// datatypes AbdomenAtlas itself ships.
pub(crate) enum Voxels<'a> {
    I16(&'a [i16]),
    U8(&'a [u8]),
}

/// What the header says about geometry and meaning, beyond shape and datatype.
pub(crate) struct HeaderInfo<'a> {
    /// Voxel `(i, j, k)` to world RAS+ mm, written as both the sform and the qform (codes 1).
    pub affine: Affine,
    pub description: &'a str,
    /// NIFTI_INTENT_LABEL for masks so viewers colour them as labels.
    pub is_label: bool,
}

/// A RAS+ affine with `spacing_mm` (x, y, z) voxels whose volume centre sits at the world origin.
pub(crate) fn centred_ras_affine(shape: [usize; 3], spacing_mm: [f64; 3]) -> Affine {
    let [d, h, w] = shape;
    let n = [w, h, d];
    let mut a = crate::geometry::identity();
    for j in 0..3 {
        a[j][j] = spacing_mm[j];
        a[j][3] = -spacing_mm[j] * (n[j] as f64 - 1.0) / 2.0;
    }
    a
}

/// Writes a `.nii.gz` (gzip chosen by the file name) with shape `[D, H, W]` and the affine of
/// `info`.
pub(crate) fn write_gz(
    path: &Path,
    shape: [usize; 3],
    voxels: Voxels<'_>,
    info: &HeaderInfo<'_>,
) -> Result<(), DataError> {
    let key = path.display().to_string();
    let header = header(info).map_err(|source| DataError::Nifti {
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

/// The quaternion form of an affine without shear, as `nifti_mat44_to_quatern` in nifti1_io.c
/// computes it: voxel sizes, `qfac` (−1 when the axes are left-handed, with the third column
/// negated), and the rotation's `(b, c, d)` with `a ≥ 0`.
fn quatern(affine: &Affine) -> ([f64; 3], f64, [f64; 3]) {
    let zooms = crate::geometry::spacing(affine);
    let mut r = [[0.0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = affine[i][j] / zooms[j];
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    for row in &mut r {
        row[2] *= qfac;
    }
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (xd, yd, zd) = (
        1.0 + r[0][0] - (r[1][1] + r[2][2]),
        1.0 + r[1][1] - (r[0][0] + r[2][2]),
        1.0 + r[2][2] - (r[0][0] + r[1][1]),
    );
    // Each branch divides by the largest component, which keeps it well conditioned.
    let (a, b, c, d) = if trace > 0.5 {
        let a = 0.5 * trace.sqrt();
        (
            a,
            0.25 * (r[2][1] - r[1][2]) / a,
            0.25 * (r[0][2] - r[2][0]) / a,
            0.25 * (r[1][0] - r[0][1]) / a,
        )
    } else if xd > 1.0 {
        let b = 0.5 * xd.sqrt();
        (
            0.25 * (r[2][1] - r[1][2]) / b,
            b,
            0.25 * (r[0][1] + r[1][0]) / b,
            0.25 * (r[0][2] + r[2][0]) / b,
        )
    } else if yd > 1.0 {
        let c = 0.5 * yd.sqrt();
        (
            0.25 * (r[0][2] - r[2][0]) / c,
            0.25 * (r[0][1] + r[1][0]) / c,
            c,
            0.25 * (r[1][2] + r[2][1]) / c,
        )
    } else {
        let d = 0.5 * zd.sqrt();
        (
            0.25 * (r[1][0] - r[0][1]) / d,
            0.25 * (r[0][2] + r[2][0]) / d,
            0.25 * (r[1][2] + r[2][1]) / d,
            d,
        )
    };
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    let (b, c, d) = (b * sign, c * sign, d * sign);
    (zooms, qfac, [b, c, d])
}

fn header(info: &HeaderInfo<'_>) -> nifti::Result<NiftiHeader> {
    let a = &info.affine;
    let (zooms, qfac, [b, c, d]) = quatern(a);
    let row = |i: usize| [a[i][0] as f32, a[i][1] as f32, a[i][2] as f32, a[i][3] as f32];
    let mut header = NiftiHeader {
        pixdim: [
            qfac as f32,
            zooms[0] as f32,
            zooms[1] as f32,
            zooms[2] as f32,
            1.0,
            1.0,
            1.0,
            1.0,
        ],
        // mm and seconds.
        xyzt_units: 2 | 8,
        qform_code: 1,
        sform_code: 1,
        quatern_b: b as f32,
        quatern_c: c as f32,
        quatern_d: d as f32,
        quatern_x: a[0][3] as f32,
        quatern_y: a[1][3] as f32,
        quatern_z: a[2][3] as f32,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{reference_python, run_reference};

    const READ_BACK: &str = r#"
import json, sys
import numpy as np, nibabel as nib
img = nib.load(sys.argv[1])
h = img.header
print(json.dumps({"sform": h.get_sform().tolist(), "qform": h.get_qform().tolist(),
                  "codes": [int(h["sform_code"]), int(h["qform_code"])],
                  "shape": list(img.shape), "dtype": str(img.get_data_dtype()),
                  "zyx": np.asarray(img.dataobj).transpose(2, 1, 0).ravel().tolist()}))
"#;

    #[test]
    #[ignore = "needs the Python reference (nibabel, scipy, numpy) named by VOXELFLEET_PYTHON; .ci/run provides it and runs this with --ignored"]
    fn nibabel_reads_back_the_affine_as_sform_and_qform() {
        let python = reference_python("nibabel_reads_back_the_affine_as_sform_and_qform");
        let dir = tempfile::tempdir().expect("tempdir");
        let t: f64 = 0.3;
        let affines: [(&str, Affine); 4] = [
            ("LPS", {
                let mut a = crate::geometry::identity();
                (a[0][0], a[1][1], a[2][2]) = (-0.8, -0.8, 2.5);
                (a[0][3], a[1][3], a[2][3]) = (120.5, 96.25, -47.5);
                a
            }),
            ("RAS centred", centred_ras_affine([3, 4, 5], [1.5, 1.5, 1.5])),
            ("LAS (left-handed)", {
                let mut a = centred_ras_affine([3, 4, 5], [0.7, 0.9, 3.0]);
                a[0][0] = -0.7;
                a
            }),
            (
                "oblique",
                [
                    [0.8 * t.cos(), -0.8 * t.sin(), 0.0, 10.0],
                    [0.8 * t.sin(), 0.8 * t.cos(), 0.0, -20.0],
                    [0.0, 0.0, -2.5, 30.0],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            ),
        ];
        let shape = [3, 4, 5];
        let data: Vec<i16> = (0..60).map(|i| i * 37 - 1000).collect();
        for (name, affine) in affines {
            let path = dir.path().join("v.nii.gz");
            let info = HeaderInfo {
                affine,
                description: name,
                is_label: false,
            };
            write_gz(&path, shape, Voxels::I16(&data), &info).expect("write");
            let out = run_reference(&python, READ_BACK, &[path.to_str().expect("utf8")]);
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
            assert_eq!(v["codes"], serde_json::json!([1, 1]), "{name}");
            assert_eq!(v["shape"], serde_json::json!([5, 4, 3]), "{name}");
            assert_eq!(v["dtype"], "int16", "{name}");
            let zyx: Vec<i16> = serde_json::from_value(v["zyx"].clone()).expect("data");
            assert_eq!(zyx, data, "{name}");
            for form in ["sform", "qform"] {
                let m: Vec<Vec<f64>> = serde_json::from_value(v[form].clone()).expect("matrix");
                for r in 0..4 {
                    for c in 0..4 {
                        // Stored as float32: 1e-5 relative, plus quaternion round-off.
                        let tol = 1e-5 * (1.0 + affine[r][c].abs());
                        assert!(
                            (m[r][c] - affine[r][c]).abs() <= tol,
                            "{name} {form}[{r}][{c}]: {} vs {}",
                            m[r][c],
                            affine[r][c]
                        );
                    }
                }
            }
        }
    }
}
