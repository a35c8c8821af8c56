//! Weights in and out of voxelfleet through the CLI: `model export` of a real two-rank run gives
//! the checkpoint's weights under PyTorch's names; those weights, saved by torch the way SuPreM's
//! files are, come back in bit for bit through `model import`; and a run with `model.init_from`
//! starts from them on every rank. `model info` counts parameters as PyTorch does.
//!
//! The torch step needs a Python with torch (VOXELFLEET_PYTHON if set, else /tmp/bp-venv/bin/python
//! or python3); without one it is skipped, unless VOXELFLEET_REQUIRE_TORCH=1, and the
//! `init_from` run starts from the first run's checkpoint prefix instead of the import.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{BIN, Cluster};
use burn::tensor::TensorData;
use protocol::spec::RunSpec;
use worker::backend::Cpu;
use worker::model::interop::torch_state_dict;
use worker::train::{codec, params, trainer::model_config};

/// A Python that can `import torch`, if there is one.
fn python_with_torch() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("VOXELFLEET_PYTHON") {
        Some(python) => vec![python.into()],
        None => vec!["/tmp/bp-venv/bin/python".into(), "python3".into()],
    };
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    assert!(
        std::env::var("VOXELFLEET_REQUIRE_TORCH").as_deref() != Ok("1"),
        "VOXELFLEET_REQUIRE_TORCH=1 but no Python with torch (set VOXELFLEET_PYTHON)"
    );
    None
}

fn script(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The final checkpoint of a completed run, decoded, with its spec.
fn final_checkpoint(cluster: &Cluster, detail: &serde_json::Value) -> (RunSpec, BTreeMap<String, TensorData>, String) {
    let spec = RunSpec::from_toml(detail["spec_toml"].as_str().unwrap(), "stored spec").unwrap();
    let final_ckpt = detail["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["is_final"] == true)
        .unwrap();
    let prefix = cluster.path("artifacts").join(final_ckpt["prefix"].as_str().unwrap());
    let config = model_config(&spec).unwrap();
    let device = Default::default();
    let bytes = std::fs::read(prefix.join("model.bin")).unwrap();
    let model = codec::model_from_bytes(config.init::<Cpu>(&device), &bytes, &device).unwrap();
    let sha = params::weights_checksum(&model);
    assert_eq!(sha, cluster.final_weights(detail));
    (spec, torch_state_dict(&model, &config), sha)
}

#[test]
fn export_import_and_init_from_round_trip_a_real_runs_weights() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(6);
    // The same two workers train both runs.
    cluster.spawn_workers_with(2, &["--max-runs", "2"]);
    let spec_path = cluster.write_spec("interop-1", 2, 2, "");
    let run1 = cluster.submit(&spec_path);
    let detail = cluster.wait_for_end(&run1);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    let (spec, expected, run1_sha) = final_checkpoint(&cluster, &detail);

    // Export: PyTorch names and layouts, the checkpoint's values, metadata naming the run.
    let exported = cluster.path("run1.safetensors");
    let target = format!("{run1}@2");
    let out = cluster.cli(&["model", "export", &target, "--out", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&exported).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, expected.keys().cloned().collect::<Vec<_>>());
    assert!(names.iter().all(|k| !k.contains("gamma")), "{names:?}");
    for (key, data) in &expected {
        let view = file.tensor(key).unwrap();
        assert_eq!(view.shape(), data.shape.as_slice(), "{key}");
        assert_eq!(view.data(), data.as_bytes(), "values of {key}");
    }
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata.metadata().clone().unwrap();
    assert_eq!(metadata["voxelfleet_run"], run1);
    assert_eq!(metadata["voxelfleet_step"], "2");
    assert_eq!(metadata["voxelfleet_arch"], "unet");
    // Exporting the newest is the same checkpoint here; an absent step names the ones there are.
    let out = cluster.cli(&["model", "export", &format!("{run1}@7"), "--out", "/dev/null"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("step 7") && err.contains('2'),
        "{err}"
    );

    // Import what torch saved, SuPreM-style (`net`, `module.backbone.`): the same weights.
    let init_from = match python_with_torch() {
        Some(python) => {
            let pth = cluster.path("run1.pth");
            run_ok(
                Command::new(python)
                    .arg(script("tools/interop/safetensors_to_pth.py"))
                    .args([&exported, &pth]),
            );
            let dir = cluster.path("imported");
            let import = |out: &Path| {
                Command::new(BIN)
                    .args(["model", "import"])
                    .arg(&pth)
                    .args(["--arch", "unet", "--set", "base_width=4", "--set", "depth=2", "--out"])
                    .arg(out)
                    .output()
                    .unwrap()
            };
            let out = import(&dir);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("voxelfleet-model.json")).unwrap()).unwrap();
            assert_eq!(manifest["weights_sha256"], run1_sha.as_str(), "{manifest}");
            assert_eq!(manifest["arch"], "unet");
            assert_eq!(manifest["model"]["depth"], 2);
            assert_eq!(manifest["source"]["file"], "run1.pth");
            assert_eq!(manifest["unused"], serde_json::json!([]));
            let tensors = expected.keys().filter(|k| !k.ends_with("num_batches_tracked")).count();
            assert_eq!(manifest["loaded"], tensors);
            // The directory is not written over.
            let again = import(&dir);
            let err = String::from_utf8_lossy(&again.stderr);
            assert!(!again.status.success() && err.contains("not empty"), "{err}");
            // The coordinator refuses a run of another architecture from it, at submit.
            let seg = cluster.path("seg.toml");
            let text = std::fs::read_to_string(&spec_path).unwrap().replace(
                "arch = \"unet\"\nbase_width = 4\ndepth = 2\n",
                &format!("arch = \"segresnet\"\ninit_from = \"{}\"\n", dir.display()),
            );
            std::fs::write(&seg, text).unwrap();
            let out = cluster.cli(&["submit", seg.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("model.init_from") && err.contains("`unet`"),
                "{err}"
            );
            dir.display().to_string()
        }
        None => {
            eprintln!("no Python with torch: skipping the .pth import; init_from uses the checkpoint");
            let prefix = detail["checkpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["is_final"] == true)
                .unwrap()["prefix"]
                .as_str()
                .unwrap()
                .to_string();
            format!("file://{}", cluster.path("artifacts").join(prefix).display())
        }
    };

    // A spec naming a model that is not there is refused at submit, naming the field.
    let with_init = |name: &str, url: &str| {
        let path = cluster.write_spec(name, 2, 2, "");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("depth = 2\n", &format!("depth = 2\ninit_from = \"{url}\"\n"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let missing = cluster.path("no-such-model").display().to_string();
    let out = cluster.cli(&["submit", with_init("interop-missing", &missing).to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.init_from") && err.contains("does not exist"),
        "{err}"
    );

    // A run from it: both ranks hold run 1's final weights at step 0, not their seeded init.
    let spec2 = with_init("interop-2", &init_from);
    let run2 = cluster.submit(&spec2);
    let detail2 = cluster.wait_for_end(&run2);
    assert_eq!(detail2["run"]["state"], "Completed", "{detail2}");
    cluster.wait_workers_exit(Duration::from_secs(30));
    cluster.kill_coordinator();
    let seeded = model_config(&spec)
        .unwrap()
        .init_seeded::<Cpu>(&Default::default(), spec.seed)
        .unwrap();
    assert_ne!(params::weights_checksum(&seeded), run1_sha);
    let store = coordinator::store::Store::open(&cluster.path("db")).unwrap();
    let checksums = store.checksums(&run2).unwrap();
    let at = |step: u64| -> Vec<&String> {
        checksums
            .iter()
            .filter(|(s, _, _)| *s == step)
            .map(|(_, _, c)| c)
            .collect()
    };
    assert_eq!(at(0), [&run1_sha, &run1_sha], "{checksums:?}");
    let after = at(1);
    assert_eq!(after.len(), 2, "{checksums:?}");
    assert_eq!(after[0], after[1]);
    assert_ne!(after[0], &run1_sha, "run 2 trained from there");
}

#[test]
fn model_info_reports_pytorchs_parameter_count_and_refuses_a_bad_input() {
    let out = run_ok(Command::new(BIN).args(["model", "info", "unet", "--json"]));
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    // PyTorch's count: the state dict without BatchNorm's buffers.
    let spec = protocol::spec::ModelSpec::preset("unet", protocol::spec::Preset::Suprem).unwrap();
    let config = worker::model::ModelConfig::from_spec(&spec, protocol::classes::NUM_CLASSES).unwrap();
    let params: usize = torch_state_dict(&config.init::<Cpu>(&Default::default()), &config)
        .iter()
        .filter(|(k, _)| {
            !k.ends_with("running_mean") && !k.ends_with("running_var") && !k.ends_with("num_batches_tracked")
        })
        .map(|(_, d)| d.num_elements())
        .sum();
    assert_eq!(info["params"], params, "{info}");
    assert_eq!(info["input"], serde_json::json!([1, 1, 96, 96, 96]));
    assert!(!info["stages"].as_array().unwrap().is_empty(), "{info}");
    let table = run_ok(Command::new(BIN).args(["model", "info", "unet", "--preset", "tiny", "--input", "32,32,32"]));
    assert!(table.contains("STAGE") && table.contains("total params"), "{table}");
    let out = Command::new(BIN)
        .args(["model", "info", "unet", "--input", "96,96,95"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--input"), "{err}");
}

/// The U-Net fixture torch wrote (width 4, depth 4, 3 outputs, fp16, under `net`).
const FIXTURE_PTH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../worker/tests/fixtures/models/unet_tiny.pth"
);

/// A copy of the fixture with `entry` (`unet_tiny/data/0`: the first conv weight, 108 fp16
/// values) replaced by `edit` of its bytes.
fn edited_fixture(out: &Path, entry: &str, edit: impl Fn(Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    let mut src = zip::ZipArchive::new(std::fs::File::open(FIXTURE_PTH).unwrap()).unwrap();
    let mut dst = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..src.len() {
        let mut file = src.by_index(i).unwrap();
        let name = file.name().to_string();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        dst.start_file(name.as_str(), options).unwrap();
        dst.write_all(&if name == entry { edit(bytes) } else { bytes }).unwrap();
    }
    dst.finish().unwrap();
}

/// Issue 18: `model import` of a `.pth` whose storage held half the bytes its shape needs
/// succeeded with other weights (the missing half read as zeros), and one holding an all-NaN conv
/// weight imported too. Both are refused now, naming the file and the tensor, and write nothing.
#[test]
fn model_import_refuses_short_storage_and_non_finite_weights_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let import = |pth: &Path, out: &Path| {
        Command::new(BIN)
            .args(["model", "import"])
            .arg(pth)
            .args(["--arch", "unet", "--set", "base_width=4", "--set", "depth=4", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let short = tmp.path().join("short.pth");
    edited_fixture(&short, "unet_tiny/data/0", |mut b| {
        b.truncate(b.len() / 2);
        b
    });
    let out = tmp.path().join("short-model");
    let result = import(&short, &out);
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success()
            && err.contains("short.pth")
            && err.contains("net.module.backbone.down_tr64.ops.0.conv1.weight")
            && err.contains("holds 108 bytes"),
        "{err}"
    );
    assert!(!out.exists());

    let nan = tmp.path().join("nan.pth");
    // fp16 NaN (0x7e00), little-endian, in every value.
    edited_fixture(&nan, "unet_tiny/data/0", |b| {
        b.chunks(2).flat_map(|_| [0x00, 0x7e]).collect()
    });
    let out = tmp.path().join("nan-model");
    let result = import(&nan, &out);
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success()
            && err.contains("nan.pth")
            && err.contains("`down_tr64.ops.0.conv1.weight`")
            && err.contains("108 non-finite"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Issue 18: a run started from weights holding an all-NaN conv weight trained to completion
/// with a finite loss, and its final checkpoint held the NaNs. Now every rank stops it at step 0,
/// naming the tensor, it ends Failed (not retried), and nothing is checkpointed. Its model
/// directory at another depth is refused at submit, naming the field.
#[test]
fn a_run_from_nan_weights_fails_at_step_0_naming_the_tensor_and_commits_nothing() {
    use burn::module::{Module, ModuleMapper, Param};
    use burn::tensor::Tensor;
    use burn::tensor::backend::Backend;
    struct PoisonFirst(bool);
    impl<B: Backend> ModuleMapper<B> for PoisonFirst {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if std::mem::replace(&mut self.0, false) {
                param.map(|t| t.mul_scalar(f32::NAN))
            } else {
                param
            }
        }
    }

    let mut cluster = Cluster::start();
    cluster.write_dataset(6);
    cluster.spawn_workers(2);
    let spec_path = cluster.write_spec("nan-init", 2, 3, "");
    let text = std::fs::read_to_string(&spec_path).unwrap();
    let spec = RunSpec::from_toml(&text, "test spec").unwrap();
    let config = model_config(&spec).unwrap();
    let model = config
        .init_seeded::<Cpu>(&Default::default(), 5)
        .unwrap()
        .map(&mut PoisonFirst(true));
    let tensor = worker::train::finite::slot_names(&model)[0].0.clone();
    let dir = cluster.path("nan-model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("model.bin"), codec::model_to_bytes(&model).unwrap()).unwrap();
    let manifest = |depth: u32| {
        serde_json::json!({
            "format": 1, "arch": "unet", "model": {"arch": "unet", "base_width": 4, "depth": depth},
            "out_channels": protocol::classes::NUM_CLASSES, "params": 1,
            "weights_sha256": params::weights_checksum(&model), "loaded": 1, "unused": [],
            "created_unix_ms": 0, "source": {"file": "nan.pth", "sha256": "y", "bytes": 3},
        })
        .to_string()
    };
    let with_init = text.replace(
        "depth = 2\n",
        &format!("depth = 2\ninit_from = \"{}\"\n", dir.display()),
    );
    std::fs::write(&spec_path, &with_init).unwrap();

    // Imported at depth 3, run at depth 2: refused at submit, naming the field.
    std::fs::write(dir.join("voxelfleet-model.json"), manifest(3)).unwrap();
    let out = cluster.cli(&["submit", spec_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("model.init_from")
            && err.contains("model.depth is 2, the model was imported with 3"),
        "{err}"
    );

    std::fs::write(dir.join("voxelfleet-model.json"), manifest(2)).unwrap();
    let run = cluster.submit(&spec_path);
    let detail = cluster.wait_for_end(&run);
    assert_eq!(detail["run"]["state"], "Failed", "{detail}");
    let message = detail["run"]["message"].as_str().unwrap();
    assert!(
        message.contains("step 0") && message.contains(&format!("weight `{tensor}`")) && message.contains("non-finite"),
        "{message}"
    );
    assert_eq!(detail["checkpoints"], serde_json::json!([]), "{detail}");
}
