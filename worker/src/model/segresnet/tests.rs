use super::*;
use crate::backend::Cpu;
use crate::model::param_count;
use burn_store::pytorch::PytorchReader;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/segresnet_tiny.pth");

fn small() -> SegResNetConfig {
    SegResNetConfig::new()
        .with_out_channels(3)
        .with_init_filters(4)
        .with_norm_groups(4)
}

#[test]
fn suprem_param_counts_match_monai() {
    let device = Default::default();
    // MONAI's counts (asserted by tools/fixtures/segresnet.py, and stored in the fixture).
    let fixture = PytorchReader::new(FIXTURE).expect("read fixture");
    let monai = |key: &str| -> usize {
        let data = fixture.get(key).expect(key).to_data().expect("tensor data");
        data.convert::<i64>().to_vec::<i64>().unwrap()[0] as usize
    };
    assert_eq!(monai("params_if16"), 4_701_305);
    assert_eq!(monai("params_if32"), 18_796_761);
    assert_eq!(param_count(&suprem().init::<Cpu>(&device)), monai("params_if16"));
    assert_eq!(
        param_count(&suprem().with_init_filters(32).init::<Cpu>(&device)),
        monai("params_if32")
    );
    assert_eq!(param_count(&tiny().init::<Cpu>(&device)), 1_176_393);
}

#[test]
fn run_spec_presets_build_the_same_configs() {
    use crate::model::ModelConfig;
    use protocol::spec::{ModelSpec, Preset};
    for (preset, want) in [(Preset::Suprem, suprem()), (Preset::Tiny, tiny())] {
        let spec = ModelSpec::preset("segresnet", preset).expect("known arch");
        let config = ModelConfig::from_spec(&spec, 25).expect("valid preset");
        assert_eq!(config, ModelConfig::SegResNet(want), "{preset:?}");
        assert_eq!(config.size_multiple() as u32, spec.size_multiple());
    }
    // Every rank builds it through the seeded init, which must know all its module types.
    let spec = ModelSpec::preset("segresnet", Preset::Tiny).unwrap();
    let model = ModelConfig::from_spec(&spec, 25)
        .unwrap()
        .init_seeded::<Cpu>(&Default::default(), 3)
        .expect("seeded init");
    assert_eq!(param_count(&model), 1_176_393);
}

#[test]
fn forward_keeps_spatial_shape() {
    let device = Default::default();
    let model = small().with_in_channels(2).init::<Cpu>(&device);
    let x = Tensor::<Cpu, 5>::zeros([2, 2, 8, 16, 24], &device);
    assert_eq!(model.forward(x).dims(), [2, 3, 8, 16, 24]);
    // Fewer levels, so a smaller multiple and an uneven block layout.
    let config = small().with_blocks_down(vec![2, 0]).with_blocks_up(vec![0]);
    assert_eq!(config.size_multiple(), 2);
    let model = config.init::<Cpu>(&device);
    let x = Tensor::<Cpu, 5>::zeros([1, 1, 2, 4, 6], &device);
    assert_eq!(model.forward(x).dims(), [1, 3, 2, 4, 6]);
}

#[test]
fn bad_input_shape_is_reported() {
    let model = small().init::<Cpu>(&Default::default());
    assert_eq!(small().size_multiple(), 8);
    assert!(model.check_input_shape([1, 1, 16, 8, 24]).is_ok());
    let err = model.check_input_shape([1, 1, 16, 12, 16]).unwrap_err();
    assert!(err.contains("multiples of 8"), "{err}");
    let err = model.check_input_shape([1, 2, 16, 16, 16]).unwrap_err();
    assert!(err.contains("channels"), "{err}");
    assert!(model.check_input_shape([1, 1, 0, 8, 8]).is_err());
}

#[test]
fn validation_names_the_field() {
    for (config, field) in [
        (suprem().with_in_channels(0), "in_channels"),
        (suprem().with_out_channels(0), "out_channels"),
        (suprem().with_init_filters(0), "init_filters"),
        (suprem().with_norm_groups(0), "norm_groups"),
        (suprem().with_norm_groups(3), "norm_groups"),
        (suprem().with_blocks_down(vec![]), "blocks_down"),
        (
            suprem().with_blocks_down(vec![1; 9]).with_blocks_up(vec![1; 8]),
            "blocks_down",
        ),
        (suprem().with_blocks_up(vec![1, 1]), "blocks_up"),
        (suprem().with_init_filters(1 << 20), "init_filters"),
    ] {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
    assert_eq!(suprem().validate(), Ok(()));
    assert_eq!(tiny().validate(), Ok(()));
}

#[test]
fn stages_cover_every_parameter_with_forward_shapes() {
    let device = Default::default();
    let model = small().init::<Cpu>(&device);
    let input = [2, 1, 16, 8, 24];
    let stages = model.stages(input);
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "convInit",
            "down_layers.0",
            "down_layers.1",
            "down_layers.2",
            "down_layers.3",
            "up_samples.0",
            "up_layers.0",
            "up_samples.1",
            "up_layers.1",
            "up_samples.2",
            "up_layers.2",
            "conv_final",
        ]
    );
    assert_eq!(stages.iter().map(|s| s.params).sum::<usize>(), model.num_params());
    assert_eq!(stages[4].output, vec![2, 32, 2, 1, 3]);
    assert_eq!(stages[9].output, vec![2, 4, 16, 8, 24]);
    let out = model.forward(Tensor::zeros(input, &device));
    assert_eq!(&stages.last().unwrap().output, &out.dims().to_vec());
    // The bottleneck row against a real forward of the encoder.
    let mut x = model.conv_init.forward(Tensor::<Cpu, 5>::zeros(input, &device));
    for (down, stage) in model.down_layers.iter().zip(&stages[1..5]) {
        x = down.forward(x);
        assert_eq!(x.dims().to_vec(), stage.output, "{}", stage.name);
    }
}

#[test]
fn torch_paths_follow_monai_sequential_indices() {
    let path = |p: &str| SegResNetConfig::torch_module_path(p);
    assert_eq!(path("conv_init").as_deref(), Some("convInit.conv"));
    assert_eq!(
        path("down_layers.0.blocks.0.norm1").as_deref(),
        Some("down_layers.0.1.norm1")
    );
    assert_eq!(path("down_layers.1.pre_conv").as_deref(), Some("down_layers.1.0.conv"));
    assert_eq!(
        path("down_layers.3.blocks.3.conv2").as_deref(),
        Some("down_layers.3.4.conv2.conv")
    );
    assert_eq!(path("up_layers.2.0.conv1").as_deref(), Some("up_layers.2.0.conv1.conv"));
    assert_eq!(path("up_samples.1.conv").as_deref(), Some("up_samples.1.0.conv"));
    assert_eq!(path("conv_final.norm").as_deref(), Some("conv_final.0"));
    assert_eq!(path("conv_final.conv").as_deref(), Some("conv_final.2.conv"));
    for bad in [
        "down_layers.0.pre_conv",
        "down_layers.x.blocks.0",
        "up_samples.01.conv",
        "head",
        "conv_final.act",
    ] {
        assert_eq!(path(bad), None, "{bad}");
    }
}

#[test]
fn seeded_init_has_a_rule_for_every_module() {
    let a = crate::train::params::reseed(small().init::<Cpu>(&Default::default()), 7).expect("reseed");
    let b = crate::train::params::reseed(small().init::<Cpu>(&Default::default()), 7).expect("reseed");
    let x = Tensor::<Cpu, 5>::ones([1, 1, 8, 8, 8], &Default::default());
    a.forward(x.clone())
        .into_data()
        .assert_eq(&b.forward(x).into_data(), true);
    // Same weights, same checkpoint bytes, whatever ids burn drew for each build.
    let bytes = |m: &SegResNet<Cpu>| crate::train::codec::model_to_bytes(m).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
}

#[test]
fn matches_monai_output_from_a_ddp_checkpoint() {
    use crate::model::interop::{TorchStateDict, load_torch_state_dict};
    use crate::model::{Backbone, ModelConfig};
    let dict = TorchStateDict::read_pth(std::path::Path::new(FIXTURE)).expect("read fixture state dict");
    let config = ModelConfig::SegResNet(small());
    let (model, report) =
        load_torch_state_dict(config.init::<Cpu>(&Default::default()), &config, &dict).expect("load MONAI weights");
    assert!(report.unused.is_empty(), "fixture keys not loaded: {:?}", report.unused);
    assert_eq!(report.loaded, dict.len());
    // Export writes MONAI's key set back, so MONAI can load our weights.
    let exported = crate::model::interop::torch_state_dict(&model, &config);
    let mut keys: Vec<&str> = dict.keys().collect();
    keys.sort_unstable();
    assert_eq!(exported.keys().map(String::as_str).collect::<Vec<_>>(), keys);
    let Backbone::SegResNet(model) = model else {
        panic!("built a SegResNet")
    };

    let reader = PytorchReader::new(FIXTURE).expect("read fixture");
    let want = crate::model::fixture_tensor::<Cpu, 5>(&reader, "output");
    let got = model.forward(crate::model::fixture_tensor::<Cpu, 5>(&reader, "input"));
    assert_eq!(got.dims(), want.dims());
    let diff = (got - want).abs().max().into_scalar();
    println!("SegResNet vs MONAI: max abs diff {diff:.3e}");
    assert!(diff <= 1e-4, "max abs diff {diff} against MONAI");
}
