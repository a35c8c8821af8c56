#!/usr/bin/env python3
"""Generate synthetic abdominal CT cases in the AbdomenAtlas / BDMAP layout.

    OUT_DIR/BDMAP_00000001/ct.nii.gz                   int16 HU
    OUT_DIR/BDMAP_00000001/segmentations/<class>.nii.gz   uint8 0/1 masks

Used by bench/preprocess (the Rust and MONAI pipelines read the same files) and
by data/examples/nifti_bench.rs (pass it OUT_DIR/BDMAP_00000001/ct.nii.gz).
Each case is written into a temporary folder and renamed into place when
complete, so an interrupted run never leaves a half-written case behind.

Geometry: voxel axes point to patient Left, Posterior, Superior (the "LPS"
orientation DICOM converters typically write), i.e. the NIfTI affine is
diag(-sx, -sy, sz) with an origin, nib.aff2axcodes == ('L', 'P', 'S').
Orientationd(axcodes="RAS") therefore has to flip the first two axes.

Phantom: air (-1000) outside a body ellipse, a subcutaneous fat ring (-100),
soft tissue (~40), spine (700) with a spinal canal, ribs (700), lung bases at
the top (-850), and ellipsoidal organs whose masks are written as the
segmentations.  Gaussian noise (sigma 12 HU) everywhere.  Organ placement is
jittered per case from --seed.

Everything is vectorised with numpy; a 512x512x200 case takes a few seconds,
most of it gzip inside nibabel.
"""
import argparse
import os
import shutil
import sys
import time

import numpy as np
import nibabel as nib

# The 9 AbdomenAtlas 1.0 classes (SuPreM's class_map_abdomenatlas_1_0), a subset
# of the 25 AbdomenAtlas 1.1 classes. name: (center u,v,w mm; semi-axes mm; HU)
# u = towards patient Left, v = towards Posterior, w = towards Superior,
# all relative to the volume centre.
ORGANS = {
    "liver":        ((-70.0,   0.0,  80.0), (80.0, 70.0, 75.0),   60),
    "spleen":       (( 85.0,  40.0,  80.0), (35.0, 45.0, 55.0),   50),
    "kidney_right": ((-60.0,  55.0,   0.0), (30.0, 35.0, 55.0),  150),
    "kidney_left":  (( 60.0,  55.0,  10.0), (30.0, 35.0, 55.0),  150),
    "aorta":        (( 10.0,  35.0,  15.0), (12.0, 12.0, 170.0), 200),
    "postcava":     ((-22.0,  28.0,  10.0), (12.0, 10.0, 170.0), 130),
    "pancreas":     (( 10.0,  10.0,  20.0), (50.0, 12.0, 15.0),   45),
    "stomach":      (( 55.0, -20.0,  90.0), (40.0, 35.0, 45.0),   20),
    "gall_bladder": ((-55.0, -40.0,  40.0), (15.0, 15.0, 30.0),   15),
}
# paint order: big organs first so small ones stay visible in the CT
PAINT_ORDER = ["liver", "stomach", "spleen", "kidney_right", "kidney_left",
               "pancreas", "gall_bladder", "postcava", "aorta"]


def ellipsoid_box(center_vox, semi_vox, shape):
    """Index slices of the bounding box and the in-box boolean mask."""
    lo = [max(0, int(np.floor(c - s))) for c, s in zip(center_vox, semi_vox)]
    hi = [min(n, int(np.ceil(c + s)) + 1) for c, s, n in zip(center_vox, semi_vox, shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None, None
    ax = [((np.arange(l, h, dtype=np.float32) - c) / s) ** 2
          for l, h, c, s in zip(lo, hi, center_vox, semi_vox)]
    inside = (ax[0][:, None, None] + ax[1][None, :, None] + ax[2][None, None, :]) <= 1.0
    return tuple(slice(l, h) for l, h in zip(lo, hi)), inside


def make_case(shape, spacing, rng):
    X, Y, Z = shape
    sx, sy, sz = spacing
    cx, cy, cz = (X - 1) / 2.0, (Y - 1) / 2.0, (Z - 1) / 2.0

    # ---- 2-D axial template (body, fat, spine, canal), same for every slice
    u = ((np.arange(X, dtype=np.float32) - cx) * sx)[:, None]  # mm, +Left
    v = ((np.arange(Y, dtype=np.float32) - cy) * sy)[None, :]  # mm, +Posterior
    body_a = 165.0 * rng.uniform(0.9, 1.1)       # LR semi-axis mm
    body_b = 115.0 * rng.uniform(0.9, 1.1)       # AP semi-axis mm
    body_v0 = -10.0                              # body centre slightly anterior
    r = (u / body_a) ** 2 + ((v - body_v0) / body_b) ** 2
    sl = np.full((X, Y), -1000, dtype=np.int16)
    sl[r <= 1.0] = -100                          # subcutaneous fat
    sl[r <= 0.80] = 40                           # muscle / soft tissue
    spine_v = body_v0 + 0.70 * body_b
    sl[(u ** 2 + (v - spine_v) ** 2) <= 20.0 ** 2] = 700          # vertebral body
    sl[(u ** 2 + (v - spine_v - 24.0) ** 2) <= 8.0 ** 2] = 30     # spinal canal
    rib_ring = (r > 0.72) & (r <= 0.80) & (v > body_v0 - 0.3 * body_b)

    ct = np.empty((X, Y, Z), dtype=np.int16, order="F")
    ct[...] = sl[:, :, None]

    w = (np.arange(Z, dtype=np.float32) - cz) * sz   # mm, +Superior
    # ribs: 10 mm thick arcs every ~28 mm in the upper two thirds
    rib_z = (np.mod(w, 28.0) < 10.0) & (w > -0.2 * Z * sz / 2)
    for k in np.nonzero(rib_z)[0]:
        ct[:, :, k][rib_ring] = 700

    # lung bases at the top of the volume
    for side in (-1.0, 1.0):
        c = (side * 75.0 / sx + cx, (20.0 - 0.0) / sy + cy, (w[-1] + 40.0) / sz + cz)
        box, inside = ellipsoid_box(c, (60.0 / sx, 80.0 / sy, 120.0 / sz), shape)
        if box is not None:
            sub = ct[box]
            sub[inside & (sub < 600)] = -850

    # ---- organs
    masks = {}
    for name in PAINT_ORDER:
        (cu, cv, cw), (a, b, c), hu = ORGANS[name]
        jit = rng.normal(0.0, 6.0, size=3)
        scl = rng.uniform(0.9, 1.1)
        center_vox = ((cu + jit[0]) / sx + cx, (cv + jit[1]) / sy + cy, (cw + jit[2]) / sz + cz)
        semi_vox = (a * scl / sx, b * scl / sy, c * scl / sz)
        box, inside = ellipsoid_box(center_vox, semi_vox, shape)
        m = np.zeros((X, Y, Z), dtype=np.uint8, order="F")
        if box is not None:
            m[box][inside] = 1
            sub = ct[box]
            sub[inside] = hu + int(rng.integers(-8, 9))
        masks[name] = m

    # ---- noise, slice by slice to bound memory
    for k in range(Z):
        n = rng.standard_normal((X, Y), dtype=np.float32) * 12.0
        s = ct[:, :, k].astype(np.float32) + n
        np.clip(np.rint(s), -1024, 3071, out=s)
        ct[:, :, k] = s.astype(np.int16)
    return ct, masks


def lps_affine(shape, spacing):
    sx, sy, sz = spacing
    X, Y, Z = shape
    aff = np.diag([-sx, -sy, sz, 1.0])
    # scanner-like origin: table centred in x/y, arbitrary z offset
    aff[:3, 3] = [(X - 1) * sx / 2.0, (Y - 1) * sy / 2.0, -612.5]
    return aff


def save_nifti(arr, affine, path, dtype):
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], metavar=("SX", "SY", "SZ"))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--classes", nargs="+", default=list(ORGANS), choices=list(ORGANS),
                   help="which masks to write (default: all 9 AbdomenAtlas1.0 classes)")
    p.add_argument("--first-id", type=int, default=1)
    a = p.parse_args(argv)

    shape, spacing = tuple(a.shape), tuple(a.spacing)
    affine = lps_affine(shape, spacing)
    os.makedirs(a.out_dir, exist_ok=True)
    for i in range(a.cases):
        t0 = time.perf_counter()
        case = f"BDMAP_{a.first_id + i:08d}"
        rng = np.random.default_rng([a.seed, a.first_id + i])
        ct, masks = make_case(shape, spacing, rng)
        t1 = time.perf_counter()
        cdir = os.path.join(a.out_dir, case)
        tmp = os.path.join(a.out_dir, f".{case}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "segmentations"))
        save_nifti(ct, affine, os.path.join(tmp, "ct.nii.gz"), np.int16)
        for name in a.classes:
            save_nifti(masks[name], affine, os.path.join(tmp, "segmentations", f"{name}.nii.gz"), np.uint8)
        shutil.rmtree(cdir, ignore_errors=True)
        os.rename(tmp, cdir)
        t2 = time.perf_counter()
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cdir) for f in fs)
        print(f"{case}: shape {shape} spacing {spacing} axcodes {''.join(nib.aff2axcodes(affine))} "
              f"{len(a.classes)} masks; synth {t1 - t0:.1f}s, write {t2 - t1:.1f}s, "
              f"{size / 1e6:.1f} MB on disk", flush=True)


if __name__ == "__main__":
    sys.exit(main())
