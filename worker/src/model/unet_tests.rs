//! Tests of [`super::UNet`]: shapes, validation, PyTorch's parameter counts, and output parity
//! with the PyTorch re-implementation of SuPreM's UNet3D in `tools/fixtures/unet.py`.

use super::*;
use crate::backend::{Cpu, CpuTrain};
use crate::model::interop::{TorchStateDict, load_torch_state_dict, torch_state_dict};
use crate::model::{Backbone, ModelConfig, fixture_tensor};
use burn::module::AutodiffModule;
use burn_store::pytorch::PytorchReader;
use std::path::Path;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/unet_tiny.pth");

/// The fixture's network: width 4, depth 4, 3 outputs.
fn fixture_config() -> UNetConfig {
    tiny().with_out_channels(3)
}

#[test]
fn forward_keeps_spatial_shape() {
    let device = Default::default();
    let config = UNetConfig::new()
        .with_in_channels(2)
        .with_out_channels(3)
        .with_base_width(2)
        .with_depth(3);
    let model = config.init::<Cpu>(&device);
    let x = Tensor::<Cpu, 5>::zeros([2, 2, 8, 12, 16], &device);
    assert_eq!(model.forward(x).dims(), [2, 3, 8, 12, 16]);
}

#[test]
fn depth_one_has_no_resampling() {
    let device = Default::default();
    let model = UNetConfig::new().with_base_width(2).with_depth(1).init::<Cpu>(&device);
    assert!(model.up_tr.is_empty());
    let x = Tensor::<Cpu, 5>::zeros([1, 1, 3, 5, 7], &device);
    assert_eq!(model.forward(x).dims(), [1, 25, 3, 5, 7]);
}

#[test]
fn validation_names_the_field() {
    for (config, field) in [
        (UNetConfig::new().with_depth(0), "depth"),
        (UNetConfig::new().with_depth(9), "depth"),
        (UNetConfig::new().with_base_width(0), "base_width"),
        (UNetConfig::new().with_in_channels(0), "in_channels"),
        (UNetConfig::new().with_out_channels(0), "out_channels"),
        (UNetConfig::new().with_base_width(usize::MAX / 2), "base_width"),
    ] {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(field));
    }
    assert_eq!(suprem().validate(), Ok(()));
    assert_eq!(tiny().validate(), Ok(()));
}

#[test]
fn bad_input_shape_is_reported() {
    let model = tiny().init::<Cpu>(&Default::default());
    assert!(model.check_input_shape([1, 1, 32, 32, 32]).is_ok());
    assert!(model.check_input_shape([1, 1, 36, 32, 32]).is_err());
    assert!(model.check_input_shape([1, 2, 32, 32, 32]).is_err());
}

/// 19,075,225: `sum(p.numel() for p in UNet3D(width=32, depth=4, n_class=25).parameters())`,
/// printed by tools/fixtures/unet.py. burn's own `num_params` adds the BatchNorm running statistics.
#[test]
fn suprem_preset_counts_like_pytorch() {
    let model = suprem().init::<Cpu>(&Default::default());
    assert_eq!(param_count(&model), 19_075_225);
    // Two running statistics per BatchNorm channel: 14 BatchNorms over these channel counts.
    let bn_channels: usize = [32, 64, 64, 128, 128, 256, 256, 512, 256, 256, 128, 128, 64, 64]
        .iter()
        .sum();
    assert_eq!(model.num_params(), 19_075_225 + 2 * bn_channels);
    // The fixture's width: 299,011 per the same script.
    assert_eq!(param_count(&fixture_config().init::<Cpu>(&Default::default())), 299_011);
}

#[test]
fn stages_describe_the_suprem_network() {
    let model = suprem().init::<Cpu>(&Default::default());
    let rows = model.stages([2, 1, 96, 96, 96]);
    let summary: Vec<(&str, Vec<usize>)> = rows.iter().map(|r| (r.name.as_str(), r.output.clone())).collect();
    assert_eq!(
        summary,
        vec![
            ("down_tr64", vec![2, 64, 48, 48, 48]),
            ("down_tr128", vec![2, 128, 24, 24, 24]),
            ("down_tr256", vec![2, 256, 12, 12, 12]),
            ("down_tr512", vec![2, 512, 12, 12, 12]),
            ("up_tr256", vec![2, 256, 24, 24, 24]),
            ("up_tr128", vec![2, 128, 48, 48, 48]),
            ("up_tr64", vec![2, 64, 96, 96, 96]),
            ("out_tr", vec![2, 25, 96, 96, 96]),
        ]
    );
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), 19_075_225);
    // out_tr: a 1x1x1 conv 64 -> 25 with bias.
    assert_eq!(rows.last().unwrap().params, 64 * 25 + 25);
}

#[test]
fn stage_shapes_match_a_forward_pass() {
    let device = Default::default();
    let model = UNetConfig::new()
        .with_base_width(2)
        .with_depth(3)
        .with_out_channels(2)
        .init::<Cpu>(&device);
    let rows = model.stages([1, 1, 8, 4, 12]);
    let out = model.forward(Tensor::zeros([1, 1, 8, 4, 12], &device));
    assert_eq!(rows.last().unwrap().output, out.dims().to_vec());
    assert_eq!(rows.len(), 3 + 2 + 1);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), param_count(&model));
}

#[test]
fn module_paths_map_to_suprem_names() {
    assert_eq!(
        torch_module_path("down_tr.0.ops.1.bn1").as_deref(),
        Some("down_tr64.ops.1.bn1")
    );
    assert_eq!(
        torch_module_path("down_tr.3.ops.0.conv1").as_deref(),
        Some("down_tr512.ops.0.conv1")
    );
    assert_eq!(
        torch_module_path("up_tr.2.up_conv").as_deref(),
        Some("up_tr256.up_conv")
    );
    assert_eq!(
        torch_module_path("up_tr.0.ops.0.bn1").as_deref(),
        Some("up_tr64.ops.0.bn1")
    );
    assert_eq!(
        torch_module_path("out_tr.final_conv").as_deref(),
        Some("out_tr.final_conv")
    );
    assert_eq!(torch_module_path("down_tr.x.ops"), None);
    assert_eq!(torch_module_path("encoders.0"), None);
}

// --- parity with PyTorch ------------------------------------------------------------------------

fn fixture_model_config() -> ModelConfig {
    ModelConfig::Unet(fixture_config())
}

/// The fixture's weights, through the shared importer (SuPreM's `net` / `module.backbone.` layout).
fn load_fixture<B: Backend>() -> UNet<B> {
    load_fixture_as::<B>(fixture_model_config())
}

fn load_fixture_as<B: Backend>(config: ModelConfig) -> UNet<B> {
    let dict = TorchStateDict::read_pth(Path::new(FIXTURE)).unwrap();
    let (model, report) = load_torch_state_dict(config.init::<B>(&Default::default()), &config, &dict).unwrap();
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    // Every key but `num_batches_tracked` (one per BatchNorm) went into the model.
    assert_eq!(report.loaded + 14, dict.len());
    let Backbone::Unet(unet) = model else {
        unreachable!("a U-Net config builds a U-Net")
    };
    unet
}

fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    a.sub(b)
        .abs()
        .max()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()[0]
}

/// SuPreM's evaluation: `ContBatchNorm3d` normalises with the batch's statistics.
#[test]
fn eval_output_matches_suprem() {
    let reader = PytorchReader::new(FIXTURE).unwrap();
    let model: UNet<Cpu> = load_fixture::<CpuTrain>().valid();
    let out = model.forward(fixture_tensor(&reader, "input"));
    let diff = max_abs_diff(out, fixture_tensor(&reader, "output_eval"));
    println!("eval-mode output vs SuPreM's UNet3D: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
}

/// `batch_stats_in_eval = false`: `nn.BatchNorm3d.eval()`, the running statistics.
#[test]
fn eval_output_with_running_statistics_matches_pytorch() {
    let reader = PytorchReader::new(FIXTURE).unwrap();
    let config = ModelConfig::Unet(fixture_config().with_batch_stats_in_eval(false));
    let model: UNet<Cpu> = load_fixture_as::<CpuTrain>(config).valid();
    let out = model.forward(fixture_tensor(&reader, "input"));
    let diff = max_abs_diff(out.clone(), fixture_tensor(&reader, "output_eval_running"));
    println!("eval-mode output (running statistics) vs PyTorch: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
    // The two semantics really differ on this input, so each test checks its own.
    assert!(max_abs_diff(out, fixture_tensor(&reader, "output_eval")) > 1e-2);
}

#[test]
fn train_mode_uses_batch_statistics_and_updates_running_ones_like_pytorch() {
    let reader = PytorchReader::new(FIXTURE).unwrap();
    let model = load_fixture::<CpuTrain>();
    let out = model.forward(fixture_tensor(&reader, "input"));
    let diff = max_abs_diff(out, fixture_tensor(&reader, "output_train"));
    println!("train-mode output vs PyTorch: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "{diff}");

    let mut worst = 0.0f32;
    let mut checked = 0;
    let all = model
        .down_tr
        .iter()
        .map(|d| ("down_tr", &d.ops))
        .chain(model.up_tr.iter().map(|u| ("up_tr", &u.ops)));
    let mut level = [0usize; 2];
    for (kind, ops) in all {
        let slot = usize::from(kind == "up_tr");
        let torch = format!("{kind}{}", 64 << level[slot]);
        level[slot] += 1;
        for (i, op) in ops.iter().enumerate() {
            for (stat, value) in [
                ("running_mean", op.bn1.running_mean.value_sync()),
                ("running_var", op.bn1.running_var.value_sync()),
            ] {
                let key = format!("train.{torch}.ops.{i}.bn1.{stat}");
                worst = worst.max(max_abs_diff(value.inner(), fixture_tensor(&reader, &key)));
                checked += 1;
            }
        }
    }
    println!("running statistics after one train-mode forward vs PyTorch: max abs diff {worst:e}");
    assert_eq!(checked, 2 * 14);
    assert!(worst <= 1e-4, "{worst}");
}

/// Export writes exactly the keys of PyTorch's `state_dict()` (BatchNorm's `num_batches_tracked`
/// included, so `load_state_dict(strict=True)` accepts it) with the values that were imported.
#[test]
fn export_reproduces_the_pytorch_state_dict() {
    let config = fixture_model_config();
    let dict = TorchStateDict::read_pth(Path::new(FIXTURE)).unwrap();
    let exported = torch_state_dict(&Backbone::Unet(load_fixture::<Cpu>()), &config);
    let mut keys: Vec<&str> = dict.keys().collect();
    keys.sort();
    assert_eq!(exported.keys().map(String::as_str).collect::<Vec<_>>(), keys);
    for (key, data) in &exported {
        if !key.ends_with("num_batches_tracked") {
            assert_eq!(data, &dict.float(key).unwrap().unwrap(), "{key}");
        }
    }
}
