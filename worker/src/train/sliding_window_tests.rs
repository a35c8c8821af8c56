use super::*;
use crate::backend::Cpu;
use burn::tensor::module::conv3d;
use burn::tensor::ops::ConvOptions;
use burn_store::pytorch::PytorchReader;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/sliding_window.pth");

fn tensor<const D: usize>(reader: &PytorchReader, name: &str) -> Tensor<Cpu, D> {
    let data = reader
        .get(name)
        .unwrap_or_else(|| panic!("{FIXTURE} has no `{name}`"))
        .to_data()
        .unwrap();
    Tensor::from_data(data.convert::<f32>(), &Default::default())
}

fn max_abs_diff<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar()
}

#[test]
fn matches_monai_sliding_window_inference() {
    let reader = PytorchReader::new(FIXTURE).unwrap();
    let weight: Tensor<Cpu, 5> = tensor(&reader, "weight");
    let bias: Tensor<Cpu, 1> = tensor(&reader, "bias");
    // The fixture's predictor: a 3x3x3 conv with zero padding, so a voxel's output depends on
    // where it sits in its window.
    let predictor = |x: Tensor<Cpu, 5>| {
        conv3d(
            x,
            weight.clone(),
            Some(bias.clone()),
            ConvOptions::new([1; 3], [1; 3], [1; 3], 1),
        )
    };
    let gaussian = Blend::Gaussian { sigma_scale: 0.125 };
    let cases = [
        ("gaussian", "x_big", [8, 8, 8], 0.5, gaussian, 3),
        ("constant", "x_big", [8, 8, 8], 0.5, Blend::Constant, 4),
        ("uneven", "x_big", [6, 8, 10], 0.25, gaussian, 5),
        ("padded", "x_small", [8, 8, 8], 0.5, gaussian, 2),
    ];
    for (name, input, roi, overlap, blend, sw_batch_size) in cases {
        let sw = SlidingWindow {
            roi,
            overlap,
            blend,
            sw_batch_size,
        };
        let out = sw.infer(tensor(&reader, input), predictor).unwrap();
        let expected: Tensor<Cpu, 5> = tensor(&reader, &format!("y_{name}"));
        let diff = max_abs_diff(out, expected);
        println!("sliding window vs MONAI, {name}: max abs diff {diff:e}");
        assert!(diff <= 1e-5, "{name}: max abs diff {diff}");
    }
}

/// Channel mixing and a nonlinearity, voxel by voxel: its output at a voxel does not depend on
/// which window the voxel was seen in, so blending windows must give back the whole-volume result.
fn pointwise(x: Tensor<Cpu, 5>) -> Tensor<Cpu, 5> {
    let device = x.device();
    let w1 = Tensor::<Cpu, 5>::from_data(
        TensorData::new(vec![0.7f32, -1.1, 0.4, 0.9, 0.3, -0.6], [3, 2, 1, 1, 1]),
        &device,
    );
    let w2 = Tensor::<Cpu, 5>::from_data(TensorData::new(vec![1.5f32, -0.8, 0.6], [1, 3, 1, 1, 1]), &device);
    let options = || ConvOptions::new([1; 3], [0; 3], [1; 3], 1);
    let hidden = burn::tensor::activation::relu(conv3d(x, w1, None, options()));
    conv3d(hidden, w2, None, options()).tanh() + 0.5
}

fn ramp(shape: [usize; 5]) -> Tensor<Cpu, 5> {
    let len: usize = shape.iter().product();
    let values: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

#[test]
fn matches_whole_volume_inference_on_a_volume_not_a_multiple_of_the_window() {
    // 37 x 21 x 26 against 16^3 windows: no side is a multiple of the window or of its stride.
    let x = ramp([1, 2, 37, 21, 26]);
    let whole = pointwise(x.clone());
    for (blend, sw_batch_size) in [(Blend::Gaussian { sigma_scale: 0.125 }, 1), (Blend::Constant, 4)] {
        let sw = SlidingWindow {
            blend,
            sw_batch_size,
            ..SlidingWindow::new([16, 16, 16])
        };
        let mut calls = 0;
        let out = sw
            .infer(x.clone(), |w| {
                calls += 1;
                pointwise(w)
            })
            .unwrap();
        // Starts per axis: D 0,8,16,21; H 0,5; W 0,8,10.
        assert_eq!(calls, (4 * 2 * 3usize).div_ceil(sw_batch_size));
        let diff = max_abs_diff(out, whole.clone());
        println!("sliding window vs whole volume ({blend:?}): max abs diff {diff:e}");
        assert!(diff <= 1e-5, "{blend:?}: max abs diff {diff}");
    }
}

#[test]
fn pads_a_volume_smaller_than_the_window_and_crops_back() {
    let x = ramp([2, 2, 5, 19, 3]);
    let out = SlidingWindow::new([8, 8, 8]).infer(x.clone(), pointwise).unwrap();
    assert_eq!(out.dims(), [2, 1, 5, 19, 3]);
    assert!(max_abs_diff(out, pointwise(x)) <= 1e-5);
}

#[test]
fn window_geometry_follows_monai() {
    assert_eq!(scan_interval(32, 16, 0.5), 8);
    assert_eq!(scan_interval(16, 16, 0.5), 16);
    assert_eq!(scan_interval(20, 3, 0.9), 1);
    assert_eq!(window_starts(32, 16, 8), [0, 8, 16]);
    assert_eq!(window_starts(19, 8, 4), [0, 4, 8, 11]);
    assert_eq!(window_starts(16, 16, 16), [0]);
    assert_eq!(window_starts(96 * 3 + 1, 96, 48), [0, 48, 96, 144, 192, 193]);
    assert_eq!(symmetric_padding([5, 20, 6], [8, 8, 9]), [(1, 2), (0, 0), (1, 2)]);
    assert_eq!(window_boxes([8, 8, 12], [8, 8, 8], 0.5).len(), 2);
}

#[test]
fn gaussian_map_peaks_at_one_and_floors_tiny_corners() {
    let map = importance_map([96, 96, 96], Blend::Gaussian { sigma_scale: 0.125 });
    let max = map.iter().copied().fold(0.0f32, f32::max);
    let min = map.iter().copied().fold(1.0f32, f32::min);
    // The four central voxels of an even side sit half a voxel off centre: exp(-0.25/288)^3.
    assert!((max - (-0.75f64 / 288.0).exp() as f32).abs() < 1e-6, "{max}");
    // A corner is exp(-47.5^2/288)^3 ~ 7e-11 before the clamp.
    assert_eq!(min, 1e-3);
    let odd = importance_map([3, 3, 3], Blend::Gaussian { sigma_scale: 0.125 });
    assert_eq!(odd[13], 1.0);
}

#[test]
fn rejects_bad_settings_by_name() {
    let bad = |sw: SlidingWindow| match sw.validate() {
        Err(SlidingWindowError::Invalid { field, .. }) => field,
        Ok(()) => "ok",
    };
    let base = SlidingWindow::new([8, 8, 8]);
    assert_eq!(
        bad(SlidingWindow {
            roi: [8, 0, 8],
            ..base.clone()
        }),
        "roi"
    );
    assert_eq!(
        bad(SlidingWindow {
            overlap: 1.0,
            ..base.clone()
        }),
        "overlap"
    );
    assert_eq!(
        bad(SlidingWindow {
            sw_batch_size: 0,
            ..base.clone()
        }),
        "sw_batch_size"
    );
    assert_eq!(
        bad(SlidingWindow {
            blend: Blend::Gaussian { sigma_scale: 0.0 },
            ..base.clone()
        }),
        "sigma_scale"
    );
    assert_eq!(bad(base), "ok");
}
