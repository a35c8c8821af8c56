//! Every file in configs/ parses and validates as the CLI would check it before a submit (run
//! specs) or a sweep (sweep files, every child expanded), so a config can never rot; and the
//! SuPreM presets say what the README and their comments claim.

use std::path::{Path, PathBuf};

use coordinator::sweep::SweepFile;
use protocol::spec::{ModelSpec, RunSpec};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

/// What one config file is: a sweep has `[axes]`; anything else must be a run spec.
#[derive(Debug)]
enum Config {
    Run(Box<RunSpec>),
    Sweep(usize),
}

fn check(path: &Path) -> Result<Config, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
    let dir = path.parent().unwrap();
    if table.contains_key("axes") {
        let sweep = SweepFile::parse(&text, &name, |base| {
            std::fs::read_to_string(dir.join(base)).map_err(|e| format!("{base}: {e}"))
        })
        .map_err(|e| e.to_string())?;
        let children = sweep.expand(&name).map_err(|e| e.to_string())?;
        for child in &children {
            case_list_exists(&child.spec, dir, &name)?;
        }
        return Ok(Config::Sweep(children.len()));
    }
    let spec = RunSpec::from_toml(&text, &name).map_err(|e| e.to_string())?;
    case_list_exists(&spec, dir, &name)?;
    Ok(Config::Run(Box::new(spec)))
}

/// A `dataset.case_list` is read by the CLI next to the spec; a missing one fails the submit.
fn case_list_exists(spec: &RunSpec, dir: &Path, name: &str) -> Result<(), String> {
    match &spec.dataset.case_list {
        Some(list) if !dir.join(list).is_file() => Err(format!("{name}: dataset.case_list `{list}` is not a file")),
        _ => Ok(()),
    }
}

fn all_configs() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_config_file_parses_and_validates() {
    let paths = all_configs();
    assert!(paths.len() >= 6, "configs/ holds {} files: {paths:?}", paths.len());
    let mut failures = vec![];
    for path in &paths {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            failures.push(format!(
                "{}: configs/ holds only TOML run specs and sweeps",
                path.display()
            ));
            continue;
        }
        match check(path) {
            Ok(Config::Sweep(0)) => failures.push(format!("{}: the sweep expands to no run", path.display())),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "invalid configs:\n{}", failures.join("\n"));
}

#[test]
fn a_broken_config_is_caught() {
    // The check above must be able to fail: the same check on a spec with a bad key, and on a
    // sweep whose axis makes an invalid child.
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(configs_dir().join("suprem-unet.toml")).unwrap();
    // The check's error for `text` written to `name` in the scratch directory.
    let error_for = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        check(&path).unwrap_err()
    };
    let bad_key = good.replace("patch = [96, 96, 96]", "patch = [96, 96, 96]\npatchh = 1");
    assert!(error_for("bad-key.toml", &bad_key).contains("patchh"));
    let bad_patch = good.replace("patch = [96, 96, 96]", "patch = [96, 96, 90]");
    assert!(error_for("bad-patch.toml", &bad_patch).contains("train.patch"));
    std::fs::copy(configs_dir().join("suprem-unet.toml"), dir.path().join("base.toml")).unwrap();
    let sweep = "name = \"s\"\nbase = \"base.toml\"\n[axes]\n\"train.lr\" = [1e-3, -1.0]\n";
    assert!(error_for("sweep.toml", sweep).contains("train.lr"));
    let missing_list = good.replace("train_cases = 0", "case_list = \"lists/none.txt\"");
    assert!(error_for("missing-list.toml", &missing_list).contains("lists/none.txt"));
}

#[test]
fn suprem_presets_train_every_volume_at_96_cubed_with_supr_ems_per_gpu_crops() {
    // SuPreM's train_abdomenatlas1.1_multigpu.sh: volumes per GPU, times train.py's
    // --num_samples 2 crops per volume.
    for (arch, volumes_per_gpu) in [("unet", 8), ("segresnet", 16), ("swinunetr", 2)] {
        let path = configs_dir().join(format!("suprem-{arch}.toml"));
        let Config::Run(spec) = check(&path).unwrap() else {
            panic!("{} is not a run spec", path.display())
        };
        assert_eq!(spec.model.arch(), arch);
        assert_eq!(
            spec.model,
            ModelSpec::preset(arch, protocol::spec::Preset::Suprem).unwrap()
        );
        assert_eq!(spec.train.patch, [96, 96, 96]);
        assert_eq!(spec.train.per_rank_batch(spec.world_size).unwrap(), volumes_per_gpu * 2);
        assert_eq!(spec.dataset.train_cases, 0, "all volumes");
        assert_eq!(spec.dataset.eval_cases, 0, "all volumes");
        assert!(spec.dataset.case_list.is_none() && spec.dataset.cases.is_none());
        assert_eq!(spec.device.as_deref(), Some("cuda"));
        // 2,000 epochs of 9,262 volumes x 2 crops, and 20 of warmup, rounded up.
        let crops_per_step = u64::from(spec.train.per_rank_batch(spec.world_size).unwrap() * spec.world_size);
        assert_eq!(spec.train.steps, (2000 * 9262 * 2u64).div_ceil(crops_per_step));
        assert_eq!(spec.train.warmup_steps, (20 * 9262 * 2u64).div_ceil(crops_per_step));
    }
}
