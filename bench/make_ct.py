"""Writes a realistic 512x512x200 int16 CT phantom (.nii.gz and .nii) with nibabel, for
data/examples/nifti_bench.rs: air outside an elliptic body, soft tissue with scanner noise,
a spine, at 0.8 x 0.8 x 2.5 mm in LPS like a scanner's output."""
import sys
import numpy as np
import nibabel as nib

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ct512"
rng = np.random.default_rng(0)
x, y = np.meshgrid(np.arange(512) - 256, np.arange(512) - 256, indexing="ij")
body = (x / 220.0) ** 2 + (y / 160.0) ** 2 < 1
spine = ((x) / 20.0) ** 2 + ((y - 100) / 25.0) ** 2 < 1
vol = np.full((512, 512, 200), -1024, dtype=np.int16)
for z in range(200):
    sl = np.where(body, 40 + rng.normal(0, 15, (512, 512)), -1000 + rng.normal(0, 5, (512, 512)))
    sl[spine] = 700 + rng.normal(0, 30, spine.sum())
    vol[:, :, z] = sl.astype(np.int16)
aff = np.diag([-0.8, -0.8, 2.5, 1.0])
img = nib.Nifti1Image(vol, aff)
img.set_data_dtype(np.int16)
nib.save(img, out + ".nii.gz")
nib.save(img, out + ".nii")
