//! Our NIfTI reader against nibabel, an independent implementation: nibabel writes files of
//! every datatype we read, in both byte orders, with and without scaling, with each of the
//! sform/qform/base affines, as .nii and .nii.gz; then nibabel reads them back and reports
//! `img.affine`, `aff2axcodes`, the shape, the zooms and every value of `get_fdata()`. We must
//! agree: affines within 1e-5 relative, axcodes and shapes exactly, values to f32 rounding.

use data::geometry::axcodes;
use data::nifti_read::{AffineSource, decode, decode_image};
use data::reference::{reference_python, run_reference};

const SCRIPT: &str = r#"
import gzip, json, os, sys
import numpy as np
import nibabel as nib

out = sys.argv[1]
rng = np.random.default_rng(7)
shape = (5, 4, 3)  # x, y, z
cases = []

def rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K

def affine(R, zooms, offset):
    a = np.eye(4)
    a[:3, :3] = R @ np.diag(zooms)
    a[:3, 3] = offset
    return a

def write(name, dtype, endian, hdr_setup, slope=None, inter=None):
    hdr = nib.Nifti1Header(endianness=endian)
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_zooms((0.8, 0.9, 2.5))
    hdr_setup(hdr)
    if slope is not None:
        hdr['scl_slope'] = slope
        hdr['scl_inter'] = inter
    info = np.iinfo(dtype) if np.dtype(dtype).kind in 'iu' else None
    if info is not None:
        lo, hi = max(info.min, -2**31), min(info.max, 2**32 - 1)
        arr = rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64)
        arr.flat[:2] = [lo, hi]
        arr.flat[2] = 0
    else:
        arr = rng.normal(0, 1000, size=shape)
    disk = arr.astype(hdr.get_data_dtype())  # the header's dtype carries its byte order
    path = os.path.join(out, name)
    opener = gzip.open if name.endswith('.gz') else open
    with opener(path, 'wb') as f:
        hdr.write_to(f)
        f.write(b'\0' * (int(hdr['vox_offset']) - f.tell()))  # write_to adds the extension flag
        f.write(disk.tobytes(order='F'))
    img = nib.load(path)
    data = img.get_fdata()
    cases.append(dict(
        file=name,
        affine=img.affine.tolist(),
        axcodes=''.join(nib.aff2axcodes(img.affine)),
        shape=list(img.shape),
        zooms=[float(z) for z in img.header.get_zooms()[:3]],
        values=data.ravel(order='F').tolist(),
        endian='big' if img.header.endianness == '>' else 'little',
        dtype=str(img.get_data_dtype().newbyteorder('=')),
        sform=int(img.header['sform_code']), qform=int(img.header['qform_code']),
    ))

lps = affine(np.diag([-1.0, -1.0, 1.0]), (0.8, 0.9, 2.5), (120.0, 95.5, -300.0))
oblique = affine(rot((1, 2, 3), 30), (0.8, 0.9, 2.5), (-10.0, 4.0, 7.5))
flipped = oblique @ np.diag([1, 1, -1, 1])  # negative determinant: qfac -1
dtypes = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64]
i = 0
for dtype in dtypes:
    for endian in '<>':
        for ext in ('.nii', '.nii.gz'):
            scaled = i % 2 == 1
            write(f'{np.dtype(dtype).name}{endian == ">" and "_be" or "_le"}{ext}', dtype, endian,
                  lambda h: h.set_sform(lps, code=1),
                  *( (2.5, -7.25) if scaled else (0.0, 0.0) ))
            i += 1

def qform_only(h):
    h.set_qform(flipped, code=1)
    h.set_sform(None, code=0)
def both(h):
    h.set_qform(flipped, code=1)
    h.set_sform(lps, code=2)
def neither(h):
    h.set_qform(None, code=0)
    h.set_sform(None, code=0)
for endian in '<>':
    tag = endian == '>' and 'be' or 'le'
    write(f'qform_only_{tag}.nii.gz', np.int16, endian, qform_only, 1.5, 3.0)
    write(f'both_{tag}.nii', np.float32, endian, both)
    write(f'neither_{tag}.nii.gz', np.uint8, endian, neither)
json.dump(cases, sys.stdout)
"#;

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
#[ignore = "needs the Python reference (nibabel, scipy, numpy) named by VOXELFLEET_PYTHON; .ci/run provides it and runs this with --ignored"]
fn reader_matches_nibabel_on_every_datatype_order_scaling_and_affine() {
    let python = reference_python("reader_matches_nibabel");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_reference(&python, SCRIPT, &[dir.path().to_str().expect("utf-8 path")]);
    let cases: Vec<serde_json::Value> = serde_json::from_str(&out).expect("reference JSON");
    assert_eq!(cases.len(), 38, "every case the script writes");
    let mut sources = std::collections::BTreeSet::new();
    for case in &cases {
        let file = case["file"].as_str().expect("file");
        let bytes = std::fs::read(dir.path().join(file)).expect("read");
        let image = decode_image::<f32>(&bytes, file).unwrap_or_else(|e| panic!("{file}: {e}"));
        let (h, v) = (&image.header, &image.volume);
        sources.insert(format!("{:?}", image.affine_source));

        assert_eq!(h.datatype.name(), case["dtype"].as_str().expect("dtype"), "{file}");
        assert_eq!(h.endianness.name(), case["endian"].as_str().expect("endian"), "{file}");
        assert_eq!(image.gzip, file.ends_with(".gz"), "{file}");
        let shape: Vec<usize> = f64s(&case["shape"]).iter().map(|&d| d as usize).collect();
        assert_eq!(h.dims, shape, "{file}");
        assert_eq!(v.shape, [shape[2], shape[1], shape[0]], "{file}");
        for (ours, theirs) in h.zooms.iter().zip(f64s(&case["zooms"])) {
            assert!(
                (ours - theirs).abs() <= 1e-6 * theirs.abs(),
                "{file}: zooms {:?}",
                h.zooms
            );
        }
        let expected: Vec<f64> = case["affine"].as_array().expect("rows").iter().flat_map(f64s).collect();
        for (i, row) in v.affine.iter().enumerate() {
            for (j, &ours) in row.iter().enumerate() {
                let theirs = expected[4 * i + j];
                assert!(
                    (ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
                    "{file}: affine {:?} vs nibabel {expected:?}",
                    v.affine
                );
            }
        }
        let codes: String = axcodes(&v.affine).iter().collect();
        assert_eq!(codes, case["axcodes"].as_str().expect("axcodes"), "{file}");

        let values = f64s(&case["values"]);
        assert_eq!(v.data.len(), values.len(), "{file}");
        for (k, (&ours, &theirs)) in v.data.iter().zip(&values).enumerate() {
            // nibabel scales in f64; ours is the same f64 rounded once to f32.
            let tol = (theirs.abs() * f32::EPSILON as f64).max(1e-30);
            assert!(
                (ours as f64 - theirs).abs() <= tol,
                "{file}: voxel {k}: {ours} vs nibabel {theirs}"
            );
        }
        let mask = decode::<u8>(&bytes, file).expect("mask");
        let expected_mask: Vec<u8> = values.iter().map(|&x| (x != 0.0) as u8).collect();
        assert_eq!(mask.data, expected_mask, "{file}: mask");
    }
    let all: std::collections::BTreeSet<String> = [AffineSource::Sform, AffineSource::Qform, AffineSource::Base]
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    assert_eq!(sources, all, "the cases cover every affine source");
}
