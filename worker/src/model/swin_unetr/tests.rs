use super::*;
use crate::backend::Cpu;
use burn::tensor::TensorData;

/// PyTorch's count for MONAI 1.6.1 `SwinUNETR(in_channels=1, out_channels=25, feature_size=48)`
/// (tools/fixtures/swinunetr.py prints it).
const SUPREM_PARAMS: usize = 62_187_835;
/// Same at feature_size 12.
const TINY_PARAMS: usize = 4_078_363;

fn random_input(dims: [usize; 5], seed: u64) -> Tensor<Cpu, 5> {
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = dims.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5)
        .collect();
    Tensor::from_data(TensorData::new(values, dims), &Default::default())
}

fn max_abs_diff<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn param_counts_match_monai() {
    let device = Default::default();
    assert_eq!(
        SwinUnetrConfig::suprem().init::<Cpu>(&device).num_params(),
        SUPREM_PARAMS
    );
    assert_eq!(SwinUnetrConfig::tiny().init::<Cpu>(&device).num_params(), TINY_PARAMS);
}

#[test]
fn stages_cover_every_parameter_with_monai_shapes() {
    let model = SwinUnetrConfig::tiny().init::<Cpu>(&Default::default());
    let rows = model.stages([2, 1, 96, 96, 64]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), TINY_PARAMS);
    let find = |name: &str| rows.iter().find(|r| r.name == name).unwrap().output.clone();
    assert_eq!(find("swinViT.patch_embed"), vec![2, 12, 48, 48, 32]);
    assert_eq!(find("swinViT.layers4"), vec![2, 192, 3, 3, 2]);
    assert_eq!(find("encoder10"), vec![2, 192, 3, 3, 2]);
    assert_eq!(find("decoder5"), vec![2, 96, 6, 6, 4]);
    assert_eq!(find("out"), vec![2, 25, 96, 96, 64]);
    assert_eq!(rows.len(), 1 + 4 + 5 + 5 + 1);
}

#[test]
fn validation_names_the_field() {
    for (config, field) in [
        (SwinUnetrConfig::new().with_feature_size(16), "feature_size"),
        (SwinUnetrConfig::new().with_feature_size(0), "feature_size"),
        (SwinUnetrConfig::new().with_num_heads([3, 6, 12, 7]), "num_heads"),
        (SwinUnetrConfig::new().with_num_heads([0, 6, 12, 24]), "num_heads"),
        (SwinUnetrConfig::new().with_depths([2, 0, 2, 2]), "depths"),
        (SwinUnetrConfig::new().with_window_size(0), "window_size"),
        (SwinUnetrConfig::new().with_patch_size(4), "patch_size"),
        (SwinUnetrConfig::new().with_in_channels(0), "in_channels"),
        (SwinUnetrConfig::new().with_out_channels(0), "out_channels"),
    ] {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(field));
    }
    assert_eq!(SwinUnetrConfig::suprem().validate(), Ok(()));
    assert_eq!(SwinUnetrConfig::tiny().validate(), Ok(()));
    assert_eq!(SwinUnetrConfig::tiny().size_multiple(), 32);
}

#[test]
fn bad_input_shape_is_reported() {
    let model = SwinUnetrConfig::tiny().init::<Cpu>(&Default::default());
    assert!(model.check_input_shape([1, 1, 32, 64, 96]).is_ok());
    assert!(model.check_input_shape([1, 1, 48, 32, 32]).unwrap_err().contains("32"));
    assert!(
        model
            .check_input_shape([1, 2, 32, 32, 32])
            .unwrap_err()
            .contains("channels")
    );
}

#[test]
fn torch_paths_rename_only_the_encoder_root() {
    let path = SwinUnetrConfig::torch_module_path;
    assert_eq!(
        path("swin_vit.layers1.0.blocks.1.attn.qkv").as_deref(),
        Some("swinViT.layers1.0.blocks.1.attn.qkv")
    );
    assert_eq!(
        path("decoder5.conv_block.conv3.conv").as_deref(),
        Some("decoder5.conv_block.conv3.conv")
    );
    assert_eq!(path("swin_vitx").as_deref(), Some("swin_vitx"));
}

/// Small enough for a debug-free unit test, deep enough for shifted windows with masks.
fn small() -> SwinUnetrConfig {
    SwinUnetrConfig::tiny()
        .with_out_channels(2)
        .with_num_heads([2, 2, 4, 4])
}

#[test]
fn batch_elements_are_independent() {
    // Masks and windows are laid out per sample; a batch must equal its samples run alone.
    let model = crate::train::params::reseed(small().init::<Cpu>(&Default::default()), 5).unwrap();
    let x = random_input([2, 1, 32, 32, 32], 1);
    let both = model.forward(x.clone());
    assert_eq!(both.dims(), [2, 2, 32, 32, 32]);
    for b in 0..2 {
        let alone = model.forward(x.clone().narrow(0, b, 1));
        let diff = max_abs_diff(alone, both.clone().narrow(0, b, 1));
        assert!(diff < 1e-4, "sample {b}: {diff}");
    }
}

#[test]
fn reseed_covers_the_whole_model() {
    let device = Default::default();
    let a = crate::train::params::reseed(small().init::<Cpu>(&device), 3).unwrap();
    let b = crate::train::params::reseed(small().init::<Cpu>(&device), 3).unwrap();
    assert_eq!(
        crate::train::params::weights_checksum(&a),
        crate::train::params::weights_checksum(&b)
    );
    // Same weights, same checkpoint bytes (the int index buffers' ids included).
    let bytes = |m: &SwinUnetr<Cpu>| crate::train::codec::model_to_bytes(m).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    // The index buffer is not a weight: reseeding leaves it MONAI's.
    let index = a.swin_vit.layers1[0].blocks[0].attn.relative_position_index.val();
    let expected = attention::relative_position_index([7, 7, 7]);
    assert_eq!(index.into_data().convert::<i64>().into_vec::<i64>().unwrap(), expected);
}

/// The MONAI fixture, gunzipped once per test process (it is committed gzipped: 2.2 MB instead of
/// 10.6 MB, MONAI's smallest Swin UNETR being 3.9M weights).
fn fixture_path() -> std::path::PathBuf {
    static UNZIPPED: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = UNZIPPED.get_or_init(|| {
        let gz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/swinunetr_tiny.pth.gz");
        let file = std::fs::File::open(&gz).unwrap_or_else(|e| panic!("{gz:?}: {e}"));
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut bytes).expect("gunzip the fixture");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("swinunetr_tiny.pth"), bytes).expect("write the fixture");
        dir
    });
    dir.path().join("swinunetr_tiny.pth")
}

fn fixture_tensor(path: &std::path::Path, key: &str) -> Tensor<Cpu, 5> {
    let reader = burn_store::pytorch::PytorchReader::new(path).unwrap();
    let data = reader
        .get(key)
        .unwrap_or_else(|| panic!("no `{key}` in {path:?}"))
        .to_data()
        .unwrap();
    Tensor::from_data(data.convert::<f32>(), &Default::default())
}

#[test]
fn matches_monai_output() {
    let path = fixture_path();
    use crate::model::interop::{TorchStateDict, load_torch_state_dict};
    use crate::model::{Backbone, ModelConfig};
    let config = ModelConfig::SwinUnetr(small());
    let dict = TorchStateDict::read_pth(&path).unwrap();
    let (model, report) = load_torch_state_dict(config.init::<Cpu>(&Default::default()), &config, &dict).unwrap();
    // Every MONAI tensor lands somewhere, relative_position_index included.
    assert_eq!(
        (report.loaded, report.unused.len()),
        (dict.len(), 0),
        "{:?}",
        report.unused
    );
    let Backbone::SwinUnetr(model) = model else {
        panic!("built a Swin UNETR")
    };
    let x = fixture_tensor(&path, "input");
    let expected = fixture_tensor(&path, "output");
    let got = model.forward(x);
    assert_eq!(got.dims(), expected.dims());
    let diff = max_abs_diff(got, expected);
    println!("swinunetr parity vs MONAI: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn export_has_monai_keys_and_shapes() {
    use crate::model::ModelConfig;
    use crate::model::interop::{TorchStateDict, torch_state_dict};
    let path = fixture_path();
    let dict = TorchStateDict::read_pth(&path).unwrap();
    let config = ModelConfig::SwinUnetr(small());
    let exported = torch_state_dict(&config.init::<Cpu>(&Default::default()), &config);
    let mut monai: Vec<&str> = dict.keys().collect();
    monai.sort();
    assert_eq!(exported.keys().map(String::as_str).collect::<Vec<_>>(), monai);
    let index = &exported["swinViT.layers2.0.blocks.1.attn.relative_position_index"];
    assert_eq!(index.shape.to_vec(), vec![343, 343]);
    assert_eq!(index.dtype, burn::tensor::DType::I64);
    assert_eq!(
        exported["swinViT.layers1.0.blocks.0.attn.qkv.weight"].shape.to_vec(),
        vec![36, 12]
    );
}

/// The backward pass against MONAI's: the L2 norm of every parameter's gradient of
/// `sum(output * sin(0.37 i))` from the fixture's weights and input. Forward parity alone would
/// miss a wrong gradient in a custom op (window partition, masks, the bias-table gather).
#[test]
fn gradients_match_monai() {
    use crate::backend::CpuTrain;
    use crate::model::interop::{TorchStateDict, load_torch_state_dict, torch_state_dict};
    use crate::model::{Backbone, ModelConfig};
    use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
    use burn::tensor::backend::AutodiffBackend;

    /// Replaces every float param with its gradient, so that the export's PyTorch names apply.
    struct ToGradient(<CpuTrain as AutodiffBackend>::Gradients);
    impl ModuleMapper<CpuTrain> for ToGradient {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<CpuTrain, D>>) -> Param<Tensor<CpuTrain, D>> {
            let (id, tensor, mapper) = param.consume();
            let grad = tensor.grad(&self.0).expect("every parameter reaches the output");
            Param::from_mapped_value(id, Tensor::from_inner(grad), mapper)
        }
    }

    let path = fixture_path();
    let config = ModelConfig::SwinUnetr(small());
    let dict = TorchStateDict::read_pth(&path).unwrap();
    let (model, _) = load_torch_state_dict(config.init::<CpuTrain>(&Default::default()), &config, &dict).unwrap();
    let y = model.forward(Tensor::from_inner(fixture_tensor(&path, "input")));
    let pattern: Vec<f32> = (0..y.shape().num_elements())
        .map(|i| (0.37 * i as f64).sin() as f32)
        .collect();
    let pattern = Tensor::<CpuTrain, 1>::from_floats(pattern.as_slice(), &Default::default()).reshape(y.dims());
    let gradients: Backbone<CpuTrain> = model.map(&mut ToGradient((y * pattern).sum().backward()));
    // Sorted PyTorch keys, as the fixture lists them; the int relative_position_index is no param.
    let ours: Vec<(String, f64)> = torch_state_dict(&gradients.valid(), &config)
        .into_iter()
        .filter(|(_, data)| data.dtype == burn::tensor::DType::F32)
        .map(|(key, data)| {
            let norm = data
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|&g| (g as f64).powi(2))
                .sum::<f64>();
            (key, norm.sqrt())
        })
        .collect();
    let reader = burn_store::pytorch::PytorchReader::new(&path).unwrap();
    let monai: Vec<f64> = reader
        .get("grad_norms")
        .expect("grad_norms")
        .to_data()
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(ours.len(), monai.len(), "one gradient norm per MONAI parameter");
    let mut worst = (0.0f64, String::new());
    for ((key, norm), expected) in ours.iter().zip(&monai) {
        let relative = (norm - expected).abs() / expected.max(1e-12);
        if relative > worst.0 {
            worst = (relative, key.clone());
        }
    }
    println!(
        "swinunetr gradients vs MONAI: worst relative difference of a norm {:e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-3,
        "gradient of {} differs from MONAI's by {:e}",
        worst.1,
        worst.0
    );
}
