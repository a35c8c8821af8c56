//! voxelfleet's side: the data crate's preprocessing, timed stage by stage on one case at a time.
//!
//! The stages are the ones `monai_pipeline.py` times, in the same order and on the same files:
//!
//! | stage | here | MONAI |
//! | --- | --- | --- |
//! | download | `object_store` GET of the CT and of every class mask (file:// store) | `read` |
//! | decode | gunzip + parse to `f32` CT and `u8` masks, folded into one `u32` bitmask | `LoadImaged` ×2 |
//! | RAS | `orient_ras` on CT and labels | `Orientationd` |
//! | resample | `resample_linear` (CT) + `resample_nearest` (labels) to 1.5 mm | `Spacingd` |
//! | window | `window_in_place`, −175..250 HU to 0..1 | `ScaleIntensityRanged` |
//! | fg crop + pad | `foreground_bounds` + `crop` + `pad_to` 96³ | `CropForegroundd` + `SpatialPadd` |
//! | rand crop | [`rand_crop`] below | `RandCropByPosNegLabeld` |
//!
//! Download and decode are timed apart (the bytes are fetched whole, then decoded from memory),
//! so each has its own row; the loader itself overlaps them (`nifti_read::fetch_volume`).
//!
//! All 25 AbdomenAtlas classes are requested, as the loader does; a class file that does not
//! exist costs one failed GET and is an empty mask. MONAI is given the files that exist, which is
//! the same set of voxels to decode.
//!
//! The random crop is inline rather than `data::sample_patch`, whose crop rules are being
//! rewritten: it is `RandCropByPosNegLabeld(pos=2, neg=1, num_samples=1, image_threshold=0)`,
//! including the part that costs time in MONAI, the scan that lists foreground voxels (any label)
//! and background voxels (image > 0, no label) before a centre is drawn from one of the lists.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use bytes::Bytes;
use data::geometry::Volume;
use data::ids::{ct_key, mask_key};
use data::nifti_read::decode;
use data::preprocess::{
    PreprocessConfig, crop, foreground_bounds, orient_ras, pad_to, resample_linear, resample_nearest, window_in_place,
};
use object_store::ObjectStore;
use object_store::path::Path;
use protocol::classes::CLASSES;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cpu::Stamp;

/// Row names of the per-stage tables, shared with the MONAI side.
pub const STAGES: [&str; 7] = [
    "download",
    "decode",
    "RAS",
    "resample",
    "window",
    "fg crop + pad",
    "rand crop",
];

/// Seconds spent in each of [`STAGES`].
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    pub wall: [f64; 7],
    pub cpu: [f64; 7],
}

impl StageTimes {
    pub fn total_wall(&self) -> f64 {
        self.wall.iter().sum()
    }
    pub fn total_cpu(&self) -> f64 {
        self.cpu.iter().sum()
    }

    /// The mean over `runs`, stage by stage.
    pub fn mean<'a>(runs: impl IntoIterator<Item = &'a StageTimes>) -> StageTimes {
        let mut sum = StageTimes::default();
        let mut n = 0usize;
        for r in runs {
            for s in 0..STAGES.len() {
                sum.wall[s] += r.wall[s];
                sum.cpu[s] += r.cpu[s];
            }
            n += 1;
        }
        let n = n.max(1) as f64;
        for s in 0..STAGES.len() {
            sum.wall[s] /= n;
            sum.cpu[s] /= n;
        }
        sum
    }
}

/// What one case went through.
#[derive(Debug, Clone)]
pub struct CaseRun {
    pub case: String,
    pub times: StageTimes,
    /// `[z, y, x]` after decoding, after resampling, after the foreground crop and pad.
    pub shapes: [[usize; 3]; 3],
    pub masks_found: usize,
    pub bytes: u64,
}

/// Laps a stage clock.
struct Laps {
    last: Stamp,
    times: StageTimes,
}

impl Laps {
    fn new() -> Self {
        Laps {
            last: Stamp::now(),
            times: StageTimes::default(),
        }
    }
    fn lap(&mut self, stage: usize) {
        let (w, c) = self.last.elapsed();
        self.times.wall[stage] += w;
        self.times.cpu[stage] += c;
        self.last = Stamp::now();
    }
}

/// The object's bytes, or `None` when it does not exist (an absent class mask).
async fn get_bytes(store: &dyn ObjectStore, key: &Path) -> anyhow::Result<Option<Bytes>> {
    match store.get(key).await {
        Ok(r) => Ok(Some(r.bytes().await.with_context(|| format!("reading {key}"))?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("GET {key}")),
    }
}

/// Runs every stage on case `id` under `root`.
pub async fn run_case(
    store: &dyn ObjectStore,
    root: &Path,
    id: &str,
    cfg: &PreprocessConfig,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<CaseRun> {
    let mut laps = Laps::new();

    let ct_path = ct_key(root, id);
    let ct_bytes = get_bytes(store, &ct_path)
        .await?
        .with_context(|| format!("{ct_path} does not exist"))?;
    let mut mask_bytes = Vec::new();
    for (c, class) in CLASSES.iter().enumerate() {
        let key = mask_key(root, id, class);
        if let Some(b) = get_bytes(store, &key).await? {
            mask_bytes.push((c, key, b));
        }
    }
    let bytes = ct_bytes.len() as u64 + mask_bytes.iter().map(|(_, _, b)| b.len() as u64).sum::<u64>();
    laps.lap(0);

    let ct = decode::<f32>(&ct_bytes, ct_path.as_ref())?;
    drop(ct_bytes);
    let mut labels = Volume {
        shape: ct.shape,
        data: vec![0u32; ct.data.len()],
        affine: ct.affine,
    };
    let masks_found = mask_bytes.len();
    for (c, key, b) in mask_bytes {
        let mask = decode::<u8>(&b, key.as_ref())?;
        if mask.shape != ct.shape {
            bail!("{key} has shape {:?}, the CT {:?}", mask.shape, ct.shape);
        }
        labels.affine = mask.affine;
        // Branch-free so it vectorises: decoded masks are exactly 0 or 1.
        for (l, &m) in labels.data.iter_mut().zip(&mask.data) {
            *l |= u32::from(m) << c;
        }
    }
    let decoded_shape = ct.shape;
    laps.lap(1);

    let ct = orient_ras(ct);
    let labels = orient_ras(labels);
    laps.lap(2);

    let threads = cfg.threads.max(1);
    let mut image = resample_linear(&ct, cfg.spacing_mm, threads);
    drop(ct);
    let labels = resample_nearest(&labels, cfg.spacing_mm, threads);
    laps.lap(3);

    window_in_place(&mut image.data, cfg.hu_min, cfg.hu_max);
    laps.lap(4);

    let resampled_shape = image.shape;
    let bounds =
        foreground_bounds(&image.data, image.shape).with_context(|| format!("{id}: no foreground after windowing"))?;
    let cropped_image = crop(&image.data, image.shape, bounds);
    let cropped_labels = crop(&labels.data, labels.shape, bounds);
    drop((image, labels));
    let (image, shape) = pad_to(cropped_image, bounds.shape(), cfg.patch, 0.0);
    let (labels, _) = pad_to(cropped_labels, bounds.shape(), cfg.patch, 0);
    laps.lap(5);

    let patch = rand_crop(&image, &labels, shape, cfg.patch, rng);
    std::hint::black_box(&patch);
    drop((patch, image, labels));
    laps.lap(6);

    Ok(CaseRun {
        case: id.to_string(),
        times: laps.times,
        shapes: [decoded_shape, resampled_shape, shape],
        masks_found,
        bytes,
    })
}

/// `RandCropByPosNegLabeld(pos=2, neg=1, num_samples=1, image_threshold=0)` on a volume at least
/// `size` long on every axis: list the foreground (any label) and background (image > 0 and no
/// label) voxels, draw the centre from the foreground with probability 2/3, else from the
/// background (from whichever list is non-empty if one is), shift it so the box fits, and copy
/// the box out of the image and the labels.
pub fn rand_crop(
    image: &[f32],
    labels: &[u32],
    shape: [usize; 3],
    size: [usize; 3],
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, Vec<u32>) {
    let mut fg = Vec::new();
    let mut bg = Vec::new();
    for (i, (&v, &l)) in image.iter().zip(labels).enumerate() {
        if l != 0 {
            fg.push(i as u32);
        } else if v > 0.0 {
            bg.push(i as u32);
        }
    }
    let want_fg = rng.random_range(0..3u32) < 2;
    let from = match (want_fg, fg.is_empty(), bg.is_empty()) {
        (_, true, true) => None,
        (true, false, _) | (false, false, true) => Some(&fg),
        _ => Some(&bg),
    };
    let centre = from.map_or(0, |list| list[rng.random_range(0..list.len())] as usize);
    let [_, h, w] = shape;
    let c = [centre / (h * w), centre / w % h, centre % w];
    let start = [0, 1, 2].map(|a| c[a].saturating_sub(size[a] / 2).min(shape[a].saturating_sub(size[a])));
    let n = size.iter().product();
    let (mut img, mut lab) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let rows = [0, 1, 2].map(|a| size[a].min(shape[a]));
    for z in start[0]..start[0] + rows[0] {
        for y in start[1]..start[1] + rows[1] {
            let row = (z * h + y) * w + start[2];
            img.extend_from_slice(&image[row..row + rows[2]]);
            lab.extend_from_slice(&labels[row..row + rows[2]]);
        }
    }
    (img, lab)
}

/// Runs `cases` one after another on a single-threaded runtime with `cfg.threads` resampling
/// threads, after one untimed warm-up pass over the first case.
pub fn sequential(dir: &str, cases: &[String], cfg: &PreprocessConfig, seed: u64) -> anyhow::Result<Vec<CaseRun>> {
    let (store, root) = data::store_from_url(dir)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        if let Some(first) = cases.first() {
            run_case(store.as_ref(), &root, first, cfg, &mut rng).await?;
        }
        let mut runs = Vec::new();
        for (i, id) in cases.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
            runs.push(run_case(store.as_ref(), &root, id, cfg, &mut rng).await?);
        }
        Ok(runs)
    })
}

/// Throughput on all cores: `workers` threads, each with its own single-threaded runtime, take
/// cases from a shared counter, one case at a time with `cfg.threads` resampling threads each.
/// Returns the runs and the wall seconds from the first start to the last finish.
pub fn parallel(
    dir: &str,
    cases: &[String],
    cfg: &PreprocessConfig,
    seed: u64,
    workers: usize,
) -> anyhow::Result<(Vec<CaseRun>, f64)> {
    let (store, root) = data::store_from_url(dir)?;
    let next = AtomicUsize::new(0);
    let start = std::time::Instant::now();
    let results: Vec<anyhow::Result<Vec<(usize, CaseRun)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                let (store, root, next) = (store.clone(), root.clone(), &next);
                scope.spawn(move || -> anyhow::Result<Vec<(usize, CaseRun)>> {
                    let rt = tokio::runtime::Builder::new_current_thread().build()?;
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = cases.get(i) else { break };
                        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
                        done.push((i, rt.block_on(run_case(store.as_ref(), &root, id, cfg, &mut rng))?));
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    for r in results {
        runs.extend(r?);
    }
    runs.sort_by_key(|(i, _)| *i);
    Ok((runs.into_iter().map(|(_, r)| r).collect(), wall))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_crop_is_a_box_of_the_volume_around_a_labelled_or_tissue_voxel() {
        let shape = [10, 12, 14];
        let n: usize = shape.iter().product();
        let image: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { i as f32 }).collect();
        let mut labels = vec![0u32; n];
        labels[(7 * 12 + 9) * 14 + 11] = 4;
        let size = [4, 5, 6];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut saw_label = 0;
        for _ in 0..60 {
            let (img, lab) = rand_crop(&image, &labels, shape, size, &mut rng);
            assert_eq!(img.len(), 4 * 5 * 6);
            // The first voxel's value is its flat index in the volume; the box is contiguous.
            let first = img.iter().copied().find(|v| *v > 0.0).expect("tissue in the box") as usize;
            let idx = img.iter().position(|v| *v as usize == first).expect("found");
            let origin = first - (idx / 30 * 12 * 14 + idx / 6 % 5 * 14 + idx % 6);
            let [z0, y0, x0] = [origin / (12 * 14), origin / 14 % 12, origin % 14];
            assert!(z0 + 4 <= 10 && y0 + 5 <= 12 && x0 + 6 <= 14);
            for (k, v) in img.iter().enumerate() {
                let src = ((z0 + k / 30) * 12 + y0 + k / 6 % 5) * 14 + x0 + k % 6;
                assert_eq!(*v, image[src]);
                assert_eq!(lab[k], labels[src]);
            }
            saw_label += usize::from(lab.contains(&4));
        }
        // Foreground-centred with p = 2/3; background crops may also contain the voxel.
        assert!(saw_label >= 30, "{saw_label} of 60 crops hold the labelled voxel");
    }
}
