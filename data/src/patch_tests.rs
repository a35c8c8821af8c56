use super::*;
use crate::augment::rot90_yx;
use crate::volume::quantise;
use rand::SeedableRng;

/// A volume whose quantised image encodes the voxel index (index + 1, so every voxel is > 0),
/// with a few labelled voxels.
fn volume(shape: [usize; 3], labelled: &[(usize, u32)]) -> CaseVolume {
    let n = shape.iter().product::<usize>();
    assert!(n < u16::MAX as usize);
    let image = (0..n).map(|i| i as u16 + 1).collect();
    let mut labels = vec![0u32; n];
    for &(i, bits) in labelled {
        labels[i] = bits;
    }
    CaseVolume::from_quantised("t".into(), shape, image, labels)
}

/// The voxel index a patch value came from (its quantised value minus one; -1 for padding).
fn source(v: f32) -> i64 {
    quantise(v) as i64 - 1
}

fn plain(patch: [usize; 3]) -> CropConfig {
    CropConfig::suprem(patch).without_augmentation()
}

#[test]
fn foreground_centres_two_thirds_of_draws_and_background_is_unlabelled_tissue() {
    // Foreground: a few voxels. Image: zero (air) in the first half of the volume, so a
    // background centre must come from the labelled-free second half.
    let shape = [32, 32, 32];
    let n = 32 * 32 * 32;
    let mut image: Vec<u16> = (0..n).map(|i| if i < n / 2 { 0 } else { 1000 }).collect();
    let mut labels = vec![0u32; n];
    for i in 0..40 {
        labels[n / 2 + i * 97] = 1 << (i % 25);
        labels[i * 53] = 1; // labelled air still counts as foreground
    }
    image[n - 1] = 0;
    let vol = CaseVolume::from_quantised("t".into(), shape, image, labels);
    let cfg = CropConfig::suprem([8, 8, 8]);
    let draws = 6000;
    let mut fg = 0;
    for index in 0..draws {
        let mut rng = ChaCha8Rng::seed_from_u64(index);
        let (_, draw) = sample_patch_with_draw(&vol, &cfg, &mut rng);
        assert_eq!(draw.foreground, vol.labels()[draw.centre] != 0);
        if draw.foreground {
            fg += 1;
        } else {
            assert_eq!(vol.labels()[draw.centre], 0, "background centre on a label");
            assert!(vol.image()[draw.centre] > 0, "background centre on image <= 0");
        }
    }
    // Binomial sd at p = 2/3, 6000 draws: 0.006.
    let fraction = fg as f64 / draws as f64;
    assert!((fraction - 2.0 / 3.0).abs() < 0.03, "foreground fraction {fraction}");
}

#[test]
fn the_ratio_follows_pos_and_neg() {
    let vol = volume([16, 16, 16], &[(100, 1), (2000, 2)]);
    let cfg = CropConfig {
        pos: 1,
        neg: 3,
        ..plain([4, 4, 4])
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let fg = (0..4000)
        .filter(|_| sample_patch_with_draw(&vol, &cfg, &mut rng).1.foreground)
        .count();
    let fraction = fg as f64 / 4000.0;
    assert!((fraction - 0.25).abs() < 0.03, "foreground fraction {fraction}");
}

#[test]
fn background_falls_back_to_a_scan_and_then_to_foreground() {
    // One background voxel in 4096: rejection sampling rarely finds it; the scan must.
    let n = 16 * 16 * 16;
    let labels: Vec<(usize, u32)> = (0..n).filter(|i| *i != 1234).map(|i| (i, 1)).collect();
    let vol = volume([16, 16, 16], &labels);
    let cfg = CropConfig {
        pos: 0,
        neg: 1,
        ..plain([2, 2, 2])
    };
    for seed in 0..20 {
        let (_, draw) = sample_patch_with_draw(&vol, &cfg, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!((draw.centre, draw.foreground), (1234, false));
    }
    // No background at all (everything labelled): foreground centres, as MONAI does.
    let all: Vec<(usize, u32)> = (0..n).map(|i| (i, 1)).collect();
    let vol = volume([16, 16, 16], &all);
    let (_, draw) = sample_patch_with_draw(&vol, &cfg, &mut ChaCha8Rng::seed_from_u64(1));
    assert!(draw.foreground);
    // No foreground: background everywhere, every voxel reachable.
    let vol = volume([4, 4, 4], &[]);
    let mut seen = [false; 64];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..2000 {
        let (_, draw) = sample_patch_with_draw(&vol, &plain([1, 1, 1]), &mut rng);
        assert!(!draw.foreground);
        seen[draw.centre] = true;
    }
    assert!(seen.iter().all(|s| *s), "every voxel is a possible centre");
}

#[test]
fn augmentations_fire_at_their_probabilities_and_transform_the_plain_crop() {
    let vol = volume([12, 10, 10], &[(333, 1 << 3), (777, 1 << 9)]);
    let cfg = CropConfig::suprem([6, 4, 4]);
    let draws = 5000u64;
    let (mut rotated, mut shifted, mut ks) = (0, 0, [0usize; 4]);
    for seed in 0..draws {
        let (patch, draw) = sample_patch_with_draw(&vol, &cfg, &mut ChaCha8Rng::seed_from_u64(seed));
        // The same seed without augmentation draws the same centre (same number of draws).
        let (mut expected, plain_draw) = sample_patch_with_draw(
            &vol,
            &cfg.clone().without_augmentation(),
            &mut ChaCha8Rng::seed_from_u64(seed),
        );
        assert_eq!(plain_draw.centre, draw.centre);
        ks[draw.rot90 as usize] += 1;
        if draw.rot90 > 0 {
            rotated += 1;
            rot90_yx(&mut expected.image, cfg.patch, draw.rot90);
            let plane = cfg.voxels();
            for c in 0..NUM_CLASSES {
                rot90_yx(&mut expected.labels[c * plane..(c + 1) * plane], cfg.patch, draw.rot90);
            }
        }
        if let Some(offset) = draw.shift {
            shifted += 1;
            assert!((-0.1..0.1).contains(&offset), "offset {offset}");
            expected.image.iter_mut().for_each(|v| *v += offset);
        }
        assert_eq!(patch, expected, "seed {seed}");
    }
    let rate = |k: usize| k as f64 / draws as f64;
    assert!((rate(rotated) - 0.1).abs() < 0.015, "rotation rate {}", rate(rotated));
    assert!((rate(shifted) - 0.2).abs() < 0.02, "shift rate {}", rate(shifted));
    for k in 1..=3 {
        assert!(
            (ks[k] as f64 / rotated as f64 - 1.0 / 3.0).abs() < 0.07,
            "k = {k}: {ks:?}"
        );
    }
}

#[test]
fn odd_turns_are_skipped_on_a_non_square_plane() {
    let vol = volume([8, 8, 8], &[(100, 1)]);
    let cfg = CropConfig {
        rot90_prob: 1.0,
        ..plain([4, 4, 2])
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..200 {
        let (patch, draw) = sample_patch_with_draw(&vol, &cfg, &mut rng);
        assert!(draw.rot90 == 0 || draw.rot90 == 2);
        assert_eq!(patch.image.len(), 32);
    }
}

#[test]
fn crops_stay_inside_a_large_volume_and_are_deterministic() {
    let vol = volume([20, 20, 20], &[(0, 1), (7999, 2)]);
    let cfg = plain([8, 6, 4]);
    let mut a = ChaCha8Rng::seed_from_u64(9);
    let mut b = ChaCha8Rng::seed_from_u64(9);
    for _ in 0..200 {
        let p = sample_patch(&vol, &cfg, &mut a);
        assert_eq!(p, sample_patch(&vol, &cfg, &mut b));
        assert_eq!(p.image.len(), 8 * 6 * 4);
        assert_eq!(p.labels.len(), NUM_CLASSES * 8 * 6 * 4);
        // Never padded, and rows are contiguous x-runs of the source.
        assert!(p.image.iter().all(|v| source(*v) >= 0));
        assert_eq!(source(p.image[1]) - source(p.image[0]), 1);
        assert_eq!(source(p.image[4]) - source(p.image[0]), 20);
        assert_eq!(source(p.image[24]) - source(p.image[0]), 400);
    }
    // The corner voxels are reachable: a corner-centred crop clamps to the corner.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let corner = (0..200)
        .map(|_| sample_patch(&vol, &cfg, &mut rng))
        .find(|p| p.labels[0] == 1.0);
    assert_eq!(source(corner.expect("corner crop").image[0]), 0);
}

#[test]
fn small_volume_is_zero_padded_symmetrically() {
    // 2 x 3 x 4 volume in a 4 x 4 x 8 patch: pads (1,1), (0,1), (2,2).
    let vol = volume([2, 3, 4], &[(0, 1 << 3), (23, 1)]);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let p = sample_patch(&vol, &plain([4, 4, 8]), &mut rng);
    let at = |z: usize, y: usize, x: usize| source(p.image[(z * 4 + y) * 8 + x]);
    let plane = 4 * 4 * 8;
    assert_eq!(at(0, 0, 2), -1, "z padding");
    assert_eq!(at(1, 0, 2), 0, "voxel (0,0,0)");
    assert_eq!(at(2, 2, 5), 23, "voxel (1,2,3)");
    assert_eq!(at(1, 3, 2), -1, "y padding at the far end");
    assert_eq!(at(1, 0, 1), -1, "x padding");
    assert_eq!(at(1, 0, 6), -1, "x padding");
    assert_eq!(p.image.iter().filter(|v| **v != 0.0).count(), 24);
    assert_eq!(p.labels[3 * plane + 4 * 8 + 2], 1.0);
    assert_eq!(p.labels[(2 * 4 + 2) * 8 + 5], 1.0);
    assert_eq!(p.labels.iter().filter(|v| **v != 0.0).count(), 2);
}

#[test]
fn whole_volume_pads_at_the_far_end() {
    let vol = volume([3, 5, 8], &[(vol_index(2, 4, 7), 1 << 24)]);
    let (image, labels, shape) = whole_volume(&vol, 4);
    assert_eq!(shape, [4, 8, 8]);
    let plane = 4 * 8 * 8;
    assert_eq!(image.len(), plane);
    assert_eq!(labels.len(), NUM_CLASSES * plane);
    for z in 0..4 {
        for y in 0..8 {
            for x in 0..8 {
                let v = image[(z * 8 + y) * 8 + x];
                if z < 3 && y < 5 {
                    assert_eq!(v, vol.intensity(vol.index(z, y, x)));
                } else {
                    assert_eq!(v, 0.0);
                }
            }
        }
    }
    assert_eq!(labels[24 * plane + (2 * 8 + 4) * 8 + 7], 1.0);
    assert_eq!(whole_volume(&vol, 0).2, [3, 5, 8]);
    let all: Vec<f32> = (0..vol.voxel_count()).map(|i| vol.intensity(i)).collect();
    assert_eq!(whole_volume(&vol, 1).0, all);
}

fn vol_index(z: usize, y: usize, x: usize) -> usize {
    (z * 5 + y) * 8 + x
}
