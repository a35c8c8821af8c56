//! `prepare` as a whole: the order of the steps, and every guard.

use super::*;
use crate::geometry::axcodes;

fn lps(spacing: [f64; 3]) -> Affine {
    [
        [-spacing[0], 0.0, 0.0, 100.0],
        [0.0, -spacing[1], 0.0, 80.0],
        [0.0, 0.0, spacing[2], -40.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// A body (a box of soft tissue in air) with one labelled cube, in LPS at 0.8 × 0.8 × 2.5 mm.
fn case(shape: [usize; 3]) -> (Volume<f32>, Volume<u32>) {
    let [d, h, w] = shape;
    let mut ct = vec![-1000.0f32; d * h * w];
    let mut labels = vec![0u32; d * h * w];
    for z in 2..d - 2 {
        for y in 10..h - 6 {
            for x in 8..w - 12 {
                let i = (z * h + y) * w + x;
                ct[i] = 40.0;
                if (20..30).contains(&y) && (20..30).contains(&x) {
                    ct[i] = 200.0;
                    labels[i] = 1 << 3;
                }
            }
        }
    }
    let affine = lps([0.8, 0.8, 2.5]);
    (
        Volume {
            shape,
            data: ct,
            affine,
        },
        Volume {
            shape,
            data: labels,
            affine,
        },
    )
}

fn cfg(patch: [usize; 3]) -> PreprocessConfig {
    PreprocessConfig {
        patch,
        ..PreprocessConfig::default()
    }
}

#[test]
fn prepare_is_the_steps_in_order() {
    let (ct, labels) = case([12, 48, 50]);
    let p = prepare("BDMAP_00000001", ct.clone(), labels.clone(), &cfg([8, 8, 8])).expect("prepare");

    let (ct, labels) = (orient_ras(ct), orient_ras(labels));
    assert_eq!(axcodes(&ct.affine), ['R', 'A', 'S']);
    let mut image = resample_linear(&ct, [1.5; 3], 1);
    let labels = resample_nearest(&labels, [1.5; 3], 1);
    window_in_place(&mut image.data, -175.0, 250.0);
    let b = foreground_bounds(&image.data, image.shape).expect("body");
    assert_eq!(p.shape, b.shape());
    assert_eq!(p.image, crop(&image.data, image.shape, b));
    assert_eq!(p.labels, crop(&labels.data, labels.shape, b));
    assert_eq!(p.spacing, [1.5; 3]);
    // The body is soft tissue (windowed ~0.51) and the labelled cube is brighter.
    assert!(p.labels.contains(&(1 << 3)));
    assert!(p.image.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn small_volumes_are_padded_to_the_patch() {
    let (ct, labels) = case([12, 48, 50]);
    let p = prepare("c", ct, labels, &cfg([32, 32, 32])).expect("prepare");
    assert!(p.shape.iter().all(|&s| s >= 32), "{:?}", p.shape);
    assert_eq!(p.image.len(), p.shape.iter().product::<usize>());
    assert_eq!(p.labels.len(), p.image.len());
    // Padding is zero in both.
    assert_eq!((p.image[0], p.labels[0]), (0.0, 0));
}

#[test]
fn threads_do_not_change_the_result() {
    let (ct, labels) = case([12, 48, 50]);
    let one = prepare("c", ct.clone(), labels.clone(), &cfg([8; 3])).expect("one");
    let four = PreprocessConfig {
        threads: 4,
        ..cfg([8; 3])
    };
    assert_eq!(prepare("c", ct, labels, &four).expect("four"), one);
}

fn err_of(ct: Volume<f32>, labels: Volume<u32>) -> String {
    prepare("BDMAP_00000042", ct, labels, &cfg([8; 3]))
        .expect_err("must be rejected")
        .to_string()
}

#[test]
fn bad_geometry_is_rejected_naming_the_case() {
    let (ct, labels) = case([12, 48, 50]);

    let mut short = labels.clone();
    short.shape = [12, 48, 49];
    short.data.truncate(12 * 48 * 49);
    let err = err_of(ct.clone(), short);
    assert!(err.contains("BDMAP_00000042") && err.contains("49"), "{err}");

    for bad in [0.0, -0.0, f64::NAN, 25.0] {
        let (mut ct, mut labels) = (ct.clone(), labels.clone());
        ct.affine[2][2] = bad;
        labels.affine[2][2] = bad;
        let err = err_of(ct, labels);
        assert!(err.contains("BDMAP_00000042 is corrupt"), "{bad}: {err}");
    }

    let mut moved = labels.clone();
    moved.affine[0][3] += 3.0;
    let err = err_of(ct.clone(), moved);
    assert!(err.contains("differs from the CT"), "{err}");

    let mut nan = ct.clone();
    nan.data[17] = f32::NAN;
    let err = err_of(nan, labels.clone());
    assert!(err.contains("voxel 17") && err.contains("NaN"), "{err}");

    let mut air = ct.clone();
    air.data.iter_mut().for_each(|v| *v = -1000.0);
    let err = err_of(air, labels.clone());
    assert!(err.contains("no foreground"), "{err}");
}

#[test]
fn a_header_that_would_allocate_terabytes_is_rejected_before_allocating() {
    // 16 voxels claiming 20 mm each, resampled to 0.01 mm: 32,000 voxels a side.
    let shape = [16, 16, 16];
    let affine = lps([20.0, 20.0, 20.0]);
    let ct = Volume {
        shape,
        data: vec![0.0f32; 4096],
        affine,
    };
    let labels = Volume {
        shape,
        data: vec![0u32; 4096],
        affine,
    };
    let fine = PreprocessConfig {
        spacing_mm: [0.01; 3],
        ..cfg([8; 3])
    };
    let err = prepare("big", ct.clone(), labels.clone(), &fine)
        .expect_err("guarded")
        .to_string();
    assert!(err.contains("big is corrupt") && err.contains("4096"), "{err}");
    // Many moderate sides: every side fits, the total does not.
    let medium = PreprocessConfig {
        spacing_mm: [0.4; 3],
        ..cfg([8; 3])
    };
    let err = prepare("big", ct, labels, &medium).expect_err("guarded").to_string();
    assert!(err.contains("voxels, more than"), "{err}");
}

#[test]
fn config_hash_is_stable_and_tracks_what_changes_the_output() {
    let base = PreprocessConfig::default();
    assert_eq!(base.hash().len(), 16);
    assert!(base.hash().chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        base.canonical(),
        "voxelfleet-preprocess/1;spacing_mm=1.5,1.5,1.5;hu=-175.0,250.0;patch=96,96,96"
    );
    assert_eq!(
        base.hash(),
        PreprocessConfig {
            threads: 8,
            ..base.clone()
        }
        .hash()
    );
    let variants = [
        PreprocessConfig {
            spacing_mm: [1.5, 1.5, 2.0],
            ..base.clone()
        },
        PreprocessConfig {
            hu_min: -174.0,
            ..base.clone()
        },
        PreprocessConfig {
            hu_max: 251.0,
            ..base.clone()
        },
        PreprocessConfig {
            patch: [96, 96, 64],
            ..base.clone()
        },
    ];
    for v in variants {
        assert_ne!(v.hash(), base.hash(), "{}", v.canonical());
    }
    assert!(matches!(
        PreprocessConfig {
            hu_min: 300.0,
            ..base.clone()
        }
        .validate(),
        Err(DataError::InvalidPreprocess { .. })
    ));
    assert!(
        PreprocessConfig {
            spacing_mm: [0.0, 1.5, 1.5],
            ..base
        }
        .validate()
        .is_err()
    );
}

#[test]
fn config_follows_the_run_spec() {
    let text = r#"
name = "t"
world_size = 1
[dataset]
url = "/tmp/x"
[model]
arch = "unet"
[train]
steps = 10
patch = [32, 64, 96]
lr = 0.001
[artifacts]
url = "/tmp/y"
[preprocess]
spacing_mm = [1.0, 1.0, 2.0]
hu_min = -100
"#;
    let spec = protocol::spec::RunSpec::from_toml(text, "t.toml").expect("spec");
    let cfg = PreprocessConfig::from_run_spec(&spec);
    assert_eq!(cfg.spacing_mm, [1.0, 1.0, 2.0]);
    assert_eq!((cfg.hu_min, cfg.hu_max), (-100.0, 250.0));
    assert_eq!(cfg.patch, [32, 64, 96]);
}

/// The realistic input: 512 × 512 × 200 at 0.8 × 0.8 × 2.5 mm in LPS. Run with
/// `cargo test --release -p data realistic_timing -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check; about a second in release"]
fn realistic_timing() {
    let shape = [200, 512, 512];
    let n: usize = shape.iter().product();
    let affine = lps([0.8, 0.8, 2.5]);
    let ct = Volume {
        shape,
        data: (0..n).map(|i| ((i * 2654435761) % 2000) as f32 - 1000.0).collect(),
        affine,
    };
    let labels = Volume {
        shape,
        data: (0..n).map(|i| ((i / 777) % 3) as u32).collect(),
        affine,
    };
    let time = |what: &str, f: &mut dyn FnMut()| {
        let start = std::time::Instant::now();
        f();
        eprintln!("{what}: {:.3} s", start.elapsed().as_secs_f64());
    };
    let ras = orient_ras(ct.clone());
    time("orient_ras (CT, LPS -> RAS)", &mut || drop(orient_ras(ct.clone())));
    for threads in [1, 2] {
        time(&format!("resample_linear, {threads} thread(s)"), &mut || {
            let out = resample_linear(&ras, [1.5; 3], threads);
            assert_eq!(out.shape, [333, 274, 274]);
        });
        time(&format!("resample_nearest (u32), {threads} thread(s)"), &mut || {
            drop(resample_nearest(&labels, [1.5; 3], threads))
        });
    }
    time("prepare, 1 thread (clones included)", &mut || {
        drop(prepare("t", ct.clone(), labels.clone(), &PreprocessConfig::default()).expect("prepare"))
    });
}
