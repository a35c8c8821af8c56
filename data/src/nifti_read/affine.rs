//! The voxel-to-world affine, chosen and computed as nibabel's `Nifti1Header.get_best_affine()`
//! does, so that our `Volume::affine` equals `img.affine`: the sform when its code is set, else
//! the qform (a quaternion rotation, pixdims and qfac), else the base affine nibabel falls back
//! to, which assumes radiological (x-flipped) storage centred on the volume.

use super::header::Header;
use crate::DataError;
use crate::geometry::Affine;

/// Which transform the affine came from, for `inspect` and for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffineSource {
    Sform,
    Qform,
    /// Neither code set: nibabel's `get_base_affine()`.
    Base,
}

impl AffineSource {
    pub fn name(self) -> &'static str {
        match self {
            AffineSource::Sform => "sform",
            AffineSource::Qform => "qform",
            AffineSource::Base => "base (no sform or qform)",
        }
    }
}

/// nibabel's `quaternion_threshold` for NIfTI-1: float32 eps × 3. Below it, `w` is taken as 0.
const W2_THRESHOLD: f64 = f32::EPSILON as f64 * 3.0;

/// The best affine and where it came from. Non-finite entries are refused: no resampling can
/// use them, and nibabel would only hand back NaNs.
pub fn best_affine(h: &Header, key: &str) -> Result<(Affine, AffineSource), DataError> {
    let corrupt = |reason: String| DataError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let (affine, source) = if h.effective_sform_code() != 0 {
        (sform(h), AffineSource::Sform)
    } else if h.effective_qform_code() != 0 {
        (qform(h).map_err(corrupt)?, AffineSource::Qform)
    } else {
        (base_affine(h), AffineSource::Base)
    };
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(corrupt(format!(
            "the {} affine has non-finite entries: {affine:?}",
            source.name()
        )));
    }
    Ok((affine, source))
}

fn sform(h: &Header) -> Affine {
    [h.srow[0], h.srow[1], h.srow[2], [0.0, 0.0, 0.0, 1.0]]
}

/// `get_qform()`: R(quaternion) · diag(zooms with z × qfac), offset by qoffset.
fn qform(h: &Header) -> Result<Affine, String> {
    let [b, c, d] = h.quatern;
    // nibabel's `fillpositive`: w from the unit norm, 0 when within threshold, refused when the
    // (b, c, d) part is already longer than 1.
    let w2 = 1.0 - (b * b + c * c + d * d);
    let a = if w2.abs() < W2_THRESHOLD {
        0.0
    } else if w2 < 0.0 {
        return Err(format!("quatern_b/c/d {:?} have norm > 1 (w² = {w2:e})", h.quatern));
    } else {
        w2.sqrt()
    };
    let r = quat_to_rotation(a, b, c, d);
    let vox = [h.zooms[0], h.zooms[1], h.zooms[2] * h.qfac];
    let mut out = crate::geometry::identity();
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = r[i][j] * vox[j];
        }
        out[i][3] = h.qoffset[i];
    }
    Ok(out)
}

/// nibabel's `quat2mat`, normalising by the quaternion's norm (identity for a null one).
fn quat_to_rotation(w: f64, x: f64, y: f64, z: f64) -> [[f64; 3]; 3] {
    let nq = w * w + x * x + y * y + z * z;
    if nq < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / nq;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

/// `get_base_affine()` = `shape_zoom_affine(shape, zooms, x_flip=True)`: the x zoom negated and
/// the centre of the volume at the origin.
fn base_affine(h: &Header) -> Affine {
    let zooms = [-h.zooms[0], h.zooms[1], h.zooms[2]];
    let mut out = crate::geometry::identity();
    for i in 0..3 {
        out[i][i] = zooms[i];
        out[i][3] = -((h.dims[i] as f64 - 1.0) / 2.0) * zooms[i];
    }
    out
}
