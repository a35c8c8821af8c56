//! The preprocessing steps against independent implementations on the same arrays: nibabel's
//! `as_closest_canonical` for orientation (exact), scipy's `affine_transform` driven by MONAI's
//! own shape/offset/zoom arithmetic (re-implemented in numpy) for resampling, and a numpy
//! transcription of MONAI's `CropForeground` + `SpatialPad` rule. Arrays travel as raw
//! little-endian files in `[z, y, x]` order.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::reference::{reference_python, run_reference};

fn write_raw<T: Copy>(path: &Path, data: &[T], to_le: impl Fn(T) -> [u8; 4]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| to_le(*v)).collect();
    std::fs::write(path, bytes).expect("write raw");
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("read raw");
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_u32(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).expect("read raw");
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn affine_json(a: &Affine) -> String {
    serde_json::to_string(&a.to_vec()).expect("json")
}

fn parse_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("reference output {out:?}: {e}"))
}

fn affine_of(v: &serde_json::Value) -> Affine {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).expect("affine");
    let mut a = [[0.0; 4]; 4];
    for (r, row) in rows.iter().enumerate() {
        a[r].copy_from_slice(row);
    }
    a
}

fn shape_of(v: &serde_json::Value) -> [usize; 3] {
    let s: Vec<usize> = serde_json::from_value(v.clone()).expect("shape");
    [s[0], s[1], s[2]]
}

fn rotation_z(theta: f64, zooms: [f64; 3], flip: [f64; 3], origin: [f64; 3]) -> Affine {
    let (s, c) = theta.sin_cos();
    let r = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let mut a = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            a[i][j] = r[i][j] * zooms[j] * flip[j];
        }
        a[i][3] = origin[i];
    }
    a[3][3] = 1.0;
    a
}

const ORIENT_SCRIPT: &str = r#"
import json, sys
import numpy as np, nibabel as nib
src, dst, shape, affine = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), np.array(json.loads(sys.argv[4]))
zyx = np.fromfile(src, dtype="<u4").reshape(shape)
img = nib.Nifti1Image(zyx.transpose(2, 1, 0), affine)
can = nib.as_closest_canonical(img)
out = np.asanyarray(can.dataobj).transpose(2, 1, 0)
np.ascontiguousarray(out, dtype="<u4").tofile(dst)
print(json.dumps({"shape": list(out.shape), "affine": can.affine.tolist(),
                  "axcodes": "".join(nib.aff2axcodes(can.affine))}))
"#;

#[test]
#[ignore = "needs the Python reference (nibabel, scipy, numpy) named by VOXELFLEET_PYTHON; .ci/run provides it and runs this with --ignored"]
fn orientation_matches_nibabel_as_closest_canonical() {
    let python = reference_python("orientation_matches_nibabel_as_closest_canonical");
    let dir = tempfile::tempdir().expect("tempdir");
    let diag = |x: f64, y: f64, z: f64, t: [f64; 3]| {
        [
            [x, 0.0, 0.0, t[0]],
            [0.0, y, 0.0, t[1]],
            [0.0, 0.0, z, t[2]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    };
    let cases: Vec<(&str, Affine)> = vec![
        ("LPS", diag(-0.8, -0.8, 2.5, [201.3, 187.6, -512.25])),
        ("LAS", diag(-0.7, 0.7, 3.0, [90.0, -120.5, 14.0])),
        ("RPI", diag(1.25, -0.9, -2.0, [-3.0, 44.0, 61.0])),
        ("RAS", diag(1.5, 1.5, 1.5, [-48.0, -48.0, -48.0])),
        (
            "permuted AIL",
            [
                [0.0, 0.0, -2.0, 5.5],
                [1.1, 0.0, 0.0, -7.0],
                [0.0, -3.0, 0.0, 11.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ),
        (
            "permuted SLP",
            [
                [0.0, -0.75, 0.0, 30.0],
                [0.0, 0.0, -0.75, 40.0],
                [2.5, 0.0, 0.0, -60.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ),
        (
            "oblique LPS",
            rotation_z(0.15, [0.8, 0.8, 2.5], [-1.0, -1.0, 1.0], [150.0, 140.0, -300.0]),
        ),
    ];
    let shape = [5, 6, 7];
    let n: usize = shape.iter().product();
    let data: Vec<u32> = (0..n as u32).map(|i| i * 7 + 3).collect();
    for (name, affine) in cases {
        let (src, dst) = (dir.path().join("in.raw"), dir.path().join("out.raw"));
        write_raw(&src, &data, u32::to_le_bytes);
        let out = run_reference(
            &python,
            ORIENT_SCRIPT,
            &[
                src.to_str().expect("utf8"),
                dst.to_str().expect("utf8"),
                &serde_json::to_string(&shape).expect("json"),
                &affine_json(&affine),
            ],
        );
        let reference = parse_json(&out);
        assert_eq!(reference["axcodes"], "RAS", "{name}");
        let ours = orient_ras(Volume {
            shape,
            data: data.clone(),
            affine,
        });
        assert_eq!(ours.shape, shape_of(&reference["shape"]), "{name}");
        assert_eq!(ours.data, read_u32(&dst), "{name}: voxel data");
        let theirs = affine_of(&reference["affine"]);
        #[allow(clippy::needless_range_loop)] // Two matrices indexed alike read clearer.
        for r in 0..4 {
            for c in 0..4 {
                // Same products of the same f64s; only the summation order may differ.
                let tol = 1e-12 * (1.0 + theirs[r][c].abs());
                assert!(
                    (ours.affine[r][c] - theirs[r][c]).abs() <= tol,
                    "{name}: affine[{r}][{c}] {} vs nibabel {}",
                    ours.affine[r][c],
                    theirs[r][c]
                );
            }
        }
    }
}

/// MONAI's `Spacing` geometry (zoom_affine with diagonal=False, compute_shape_offset with
/// scale_extent=False), then scipy resampling with the voxel transform inv(src) @ dst and
/// edge-replicating borders (grid_sample's padding_mode="border").
const RESAMPLE_SCRIPT: &str = r#"
import json, sys
import numpy as np
from scipy import ndimage
src, shape, affine, pixdim, out_dir = sys.argv[1], json.loads(sys.argv[2]), np.array(json.loads(sys.argv[3])), np.array(json.loads(sys.argv[4])), sys.argv[5]
zyx = np.fromfile(src, dtype="<f4").reshape(shape)
xyz = zyx.transpose(2, 1, 0).astype(np.float64)
labels = np.fromfile(src + ".labels", dtype="<u4").reshape(shape).transpose(2, 1, 0)

# monai.data.utils.zoom_affine(affine, pixdim, diagonal=False)
rzs = affine[:3, :3]
zs = np.linalg.cholesky(rzs.T @ rzs).T
rotation = rzs @ np.linalg.inv(zs)
new_affine = np.eye(4)
new_affine[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(pixdim))
# monai.data.utils.compute_shape_offset(shape, affine, new_affine, scale_extent=False)
in_shape = np.array(xyz.shape, dtype=float)
corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in in_shape], indexing="ij")).reshape(3, -1)
corners = np.concatenate((corners, np.ones_like(corners[:1])))
mat = np.linalg.solve(new_affine, affine)
corners_out = (mat @ corners)[:3]
out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0).astype(int)
offset = None
for i in range(corners.shape[1]):
    if np.allclose(np.min(corners_out - corners_out[:, i:i + 1], 1), 0.0):
        offset = affine @ corners[:, i]
        break
new_affine[:3, 3] = offset[:3]

xform = np.linalg.solve(affine, new_affine)
lin = ndimage.affine_transform(xyz, xform[:3, :3], offset=xform[:3, 3], output_shape=tuple(out_shape), order=1, mode="nearest")
near = ndimage.affine_transform(labels, xform[:3, :3], offset=xform[:3, 3], output_shape=tuple(out_shape), order=0, mode="nearest")
# Where a sample sits exactly halfway between two voxels, scipy's order 0 rounds up; flag those.
grid = np.indices(tuple(out_shape)).reshape(3, -1).astype(np.float64)
coords = xform[:3, :3] @ grid + xform[:3, 3:4]
coords = np.clip(coords, 0, (in_shape - 1)[:, None])
tie = (np.abs(coords - np.floor(coords) - 0.5) < 1e-6).any(axis=0).reshape(tuple(out_shape))
for name, arr, dt in (("lin", lin, "<f4"), ("near", near, "<u4"), ("tie", tie, "<u4")):
    np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=dt).tofile(f"{out_dir}/{name}.raw")
print(json.dumps({"shape": [int(d) for d in out_shape[::-1]], "affine": new_affine.tolist()}))
"#;

#[test]
#[ignore = "needs the Python reference (nibabel, scipy, numpy) named by VOXELFLEET_PYTHON; .ci/run provides it and runs this with --ignored"]
fn resampling_matches_scipy_on_monai_geometry() {
    let python = reference_python("resampling_matches_scipy_on_monai_geometry");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    let ras = |s: [f64; 3]| rotation_z(0.0, s, [1.0; 3], [-31.0, 12.5, 140.0]);
    let cases: Vec<([usize; 3], Affine, [f64; 3])> = vec![
        ([20, 33, 31], ras([0.8, 0.8, 2.5]), [1.5; 3]),
        ([17, 23, 29], ras([0.7, 1.1, 3.0]), [1.5; 3]),
        // 1 mm -> 1.5 mm puts every other sample exactly between two voxels: the tie case.
        ([12, 14, 16], ras([1.0, 1.0, 1.0]), [1.5; 3]),
        // Upsampling, anisotropic target.
        ([9, 11, 13], ras([2.0, 1.7, 3.3]), [1.0, 1.25, 2.0]),
        // Oblique: MONAI keeps the direction cosines, so it is still a per-axis scaling.
        (
            [15, 18, 21],
            rotation_z(0.2, [0.9, 0.9, 2.0], [1.0; 3], [5.0, 6.0, 7.0]),
            [1.5; 3],
        ),
    ];
    let mut ties_seen = 0usize;
    for (shape, affine, target) in cases {
        let n: usize = shape.iter().product();
        let ct: Vec<f32> = (0..n).map(|_| rng.random_range(-1000.0f32..1000.0)).collect();
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0u32..1 << 25)).collect();
        let src = dir.path().join("ct.raw");
        write_raw(&src, &ct, f32::to_le_bytes);
        write_raw(&dir.path().join("ct.raw.labels"), &labels, u32::to_le_bytes);
        let out = run_reference(
            &python,
            RESAMPLE_SCRIPT,
            &[
                src.to_str().expect("utf8"),
                &serde_json::to_string(&shape).expect("json"),
                &affine_json(&affine),
                &serde_json::to_string(&target).expect("json"),
                dir.path().to_str().expect("utf8"),
            ],
        );
        let reference = parse_json(&out);
        let what = format!("{shape:?} at {:?} -> {target:?}", crate::geometry::spacing(&affine));

        let lin = resample_linear(
            &Volume {
                shape,
                data: ct,
                affine,
            },
            target,
            2,
        );
        assert_eq!(lin.shape, shape_of(&reference["shape"]), "{what}: shape");
        let monai_affine = affine_of(&reference["affine"]);
        for r in 0..3 {
            for c in 0..4 {
                assert!(
                    (lin.affine[r][c] - monai_affine[r][c]).abs() < 1e-9,
                    "{what}: affine {:?} vs MONAI's {monai_affine:?}",
                    lin.affine
                );
            }
        }
        // Trilinear: within 1e-6 of the value range (2000 HU), i.e. 0.002 HU; what is left is
        // f32 rounding (scipy works in f64, we in f32 with separable passes).
        let theirs = read_f32(&dir.path().join("lin.raw"));
        let worst = lin
            .data
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-6 * 2000.0, "{what}: trilinear max abs diff {worst}");
        eprintln!("{what}: trilinear max abs diff vs scipy {worst} HU");

        // Nearest: exact, except at exact half-way samples where scipy rounds up and we (like
        // grid_sample's nearbyint) round half to even; there we must still pick a neighbour.
        let near = resample_nearest(
            &Volume {
                shape,
                data: labels.clone(),
                affine,
            },
            target,
            2,
        );
        let (theirs, tie) = (
            read_u32(&dir.path().join("near.raw")),
            read_u32(&dir.path().join("tie.raw")),
        );
        assert_eq!(near.data.len(), theirs.len(), "{what}");
        for (i, ((a, b), t)) in near.data.iter().zip(&theirs).zip(&tie).enumerate() {
            if *t == 0 {
                assert_eq!(a, b, "{what}: nearest differs at output voxel {i}");
            } else {
                ties_seen += 1;
                assert!(
                    labels.contains(a),
                    "{what}: tie voxel {i} took a value not in the input"
                );
            }
        }
    }
    assert!(ties_seen > 0, "the 1 mm case exercises ties");
    eprintln!("nearest: exact except {ties_seen} half-way samples");
}

const CROP_PAD_SCRIPT: &str = r#"
import json, sys
import numpy as np
src, shape, patch = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
img = np.fromfile(src, dtype="<f4").reshape(shape)
lab = np.fromfile(src + ".labels", dtype="<u4").reshape(shape)
# CropForeground: select_fn x > 0 over all channels, margin 0; box end is max + 1.
nz = np.nonzero(img > 0)
start = [int(a.min()) for a in nz]
end = [int(a.max()) + 1 for a in nz]
sl = tuple(slice(s, e) for s, e in zip(start, end))
img, lab = img[sl], lab[sl]
# SpatialPad, method symmetric: width // 2 before, the rest after; constant 0.
pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for p, s in zip(patch, img.shape)]
img = np.pad(img, pads, mode="constant", constant_values=0)
lab = np.pad(lab, pads, mode="constant", constant_values=0)
img.astype("<f4").tofile(src + ".img.out")
lab.astype("<u4").tofile(src + ".lab.out")
print(json.dumps({"shape": list(img.shape)}))
"#;

#[test]
#[ignore = "needs the Python reference (nibabel, scipy, numpy) named by VOXELFLEET_PYTHON; .ci/run provides it and runs this with --ignored"]
fn crop_and_pad_match_monai_rules_in_numpy() {
    let python = reference_python("crop_and_pad_match_monai_rules_in_numpy");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (shape, patch) in [
        ([20, 24, 28], [8, 8, 8]),
        ([20, 24, 28], [16, 21, 40]),
        ([9, 30, 11], [12, 12, 12]),
    ] {
        let n: usize = shape.iter().product();
        // A random box of positive values inside zeros and negatives.
        let lo = shape.map(|d| rng.random_range(0..d / 2));
        let hi = [0, 1, 2].map(|a| rng.random_range(lo[a] + 1..=shape[a]));
        let mut image = vec![0.0f32; n];
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0u32..4)).collect();
        let [_, h, w] = shape;
        for (i, v) in image.iter_mut().enumerate() {
            let p = [i / (h * w), (i / w) % h, i % w];
            let inside = (0..3).all(|a| (lo[a]..hi[a]).contains(&p[a]));
            *v = if inside && rng.random_bool(0.6) {
                rng.random_range(0.01f32..1.0)
            } else if rng.random_bool(0.3) {
                -0.5
            } else {
                0.0
            };
        }
        // Make sure the box corners are hit, so the reference box equals the drawn one.
        image[(lo[0] * h + lo[1]) * w + lo[2]] = 0.5;
        image[((hi[0] - 1) * h + hi[1] - 1) * w + hi[2] - 1] = 0.5;
        let src = dir.path().join("v.raw");
        write_raw(&src, &image, f32::to_le_bytes);
        write_raw(&dir.path().join("v.raw.labels"), &labels, u32::to_le_bytes);
        let out = run_reference(
            &python,
            CROP_PAD_SCRIPT,
            &[
                src.to_str().expect("utf8"),
                &serde_json::to_string(&shape).expect("json"),
                &serde_json::to_string(&patch).expect("json"),
            ],
        );
        let reference = parse_json(&out);
        let p = crop_and_pad(
            "c",
            Prepared {
                shape,
                image,
                labels,
                spacing: [1.5; 3],
            },
            patch,
        )
        .expect("crop");
        assert_eq!(p.shape, shape_of(&reference["shape"]), "{shape:?} -> {patch:?}");
        assert_eq!(p.image, read_f32(&dir.path().join("v.raw.img.out")), "{shape:?} image");
        assert_eq!(
            p.labels,
            read_u32(&dir.path().join("v.raw.lab.out")),
            "{shape:?} labels"
        );
    }
}
