//! Two real worker processes train the tiny U-Net through a real coordinator: the full cycle of
//! register → assign → run → complete, bit-identical weights across ranks, and checkpoints that
//! land both in the object store and in sled.

use std::time::Duration;

use crate::common::Cluster;
use sha2::{Digest, Sha256};
use worker::backend::Cpu;

#[test]
fn two_workers_train_to_completion_with_identical_weights_and_committed_checkpoints() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(6);
    cluster.spawn_workers(2);
    let spec = cluster.write_spec("e2e-train", 2, 6, "checkpoint_every = 3");
    let run_id = cluster.submit(&spec);

    let detail = cluster.wait_for_end(&run_id);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    assert_eq!(detail["run"]["step"], 6);
    assert_eq!(detail["train_cases"], 4);
    assert_eq!(detail["eval_cases"], 2);
    let workers = detail["run"]["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);

    // Held-out evaluation ran before and after training (every rank its share; rank 0 reports).
    let metric_names: Vec<&str> = detail["latest_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for name in ["train/loss", "eval/dice/liver", "eval/large_organ_dice"] {
        assert!(metric_names.contains(&name), "missing {name} in {metric_names:?}");
    }

    // Checkpoints: steps 3 and 6 (final) are committed and their files match their hashes.
    let checkpoints = detail["checkpoints"].as_array().unwrap();
    let steps: Vec<u64> = checkpoints.iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [3, 6]);
    assert_eq!(checkpoints[1]["is_final"], true);
    for c in checkpoints {
        let files = c["files"].as_array().unwrap();
        let names: Vec<&str> = files
            .iter()
            .map(|f| f["key"].as_str().unwrap().rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["model.bin", "optimizer.bin", "state.json"]);
        for f in files {
            let key = f["key"].as_str().unwrap();
            assert!(
                key.starts_with(&format!(
                    "runs/{run_id}/checkpoints/{:010}-a1/",
                    c["step"].as_u64().unwrap()
                )),
                "{key}"
            );
            let bytes = std::fs::read(cluster.path("artifacts").join(key)).unwrap();
            assert_eq!(bytes.len() as u64, f["bytes"].as_u64().unwrap());
            assert_eq!(hex::encode(Sha256::digest(&bytes)), f["sha256"].as_str().unwrap());
        }
    }

    // Each checkpoint's record carries the hash of its weights; the listing shows its first 16
    // characters.
    let weights: Vec<&str> = checkpoints
        .iter()
        .map(|c| c["weights_sha256"].as_str().expect("a weights hash"))
        .collect();
    assert_ne!(weights[0], weights[1]);
    let listing = cluster.cli(&["checkpoints", &run_id]);
    let text = String::from_utf8_lossy(&listing.stdout);
    for (step, sha) in ["3", "6"].into_iter().zip(&weights) {
        // A row starts with the step, after a `*` on the one a resume would start from.
        let row = text
            .lines()
            .find(|l| l.split_whitespace().take(2).any(|w| w == step))
            .unwrap_or_else(|| panic!("no row for step {step} in\n{text}"));
        assert!(row.split_whitespace().any(|w| w == &sha[..16]), "{text}");
    }

    // Workers leave after their one run (--max-runs 1).
    cluster.wait_workers_exit(Duration::from_secs(30));

    // After a SIGKILL of the coordinator, sled still holds everything it acknowledged.
    cluster.kill_coordinator();
    let store = coordinator::store::Store::open(&cluster.path("db")).unwrap();
    let run = store.run(&run_id).unwrap().unwrap();
    assert_eq!(run.state(), coordinator::records::RunState::Completed);
    assert_eq!(run.final_checkpoint, Some(6));
    let committed: Vec<u64> = store.checkpoints(&run_id).unwrap().iter().map(|c| c.step).collect();
    assert_eq!(committed, [3, 6]);

    // Every step's weights were bit-identical across both ranks, and they did change.
    let checksums = store.checksums(&run_id).unwrap();
    assert_eq!(
        checksums.len(),
        12,
        "both ranks report a checksum every step: {checksums:?}"
    );
    for step in 1..=6u64 {
        let at: Vec<&String> = checksums
            .iter()
            .filter(|(s, _, _)| *s == step)
            .map(|(_, _, c)| c)
            .collect();
        assert_eq!(at.len(), 2);
        assert_eq!(at[0], at[1], "ranks diverged at step {step}");
    }
    assert_ne!(checksums[0].2, checksums[11].2, "weights never changed");
    let finished: Vec<&String> = run.finished.values().map(|f| &f.weights_sha256).collect();
    assert_eq!(finished.len(), 2);
    assert_eq!(finished[0], finished[1]);
    assert_eq!(finished[0], &checksums[11].2);
    // The checkpoints' weights hashes are the ones the ranks reported at their steps.
    let at = |step: u64| checksums.iter().find(|(s, _, _)| *s == step).unwrap().2.as_str();
    assert_eq!(weights, [at(3), at(6)]);

    // The final checkpoint really holds those weights: decoded into a fresh model, it has the
    // checksum every rank reported at the end, and its state names the step.
    let spec = protocol::spec::RunSpec::from_toml(&run.spec_toml, "stored spec").unwrap();
    let prefix = cluster
        .path("artifacts")
        .join(checkpoints[1]["prefix"].as_str().unwrap());
    let device = Default::default();
    let fresh = worker::train::trainer::model_config(&spec)
        .unwrap()
        .init_seeded::<Cpu>(&device, spec.seed + 1)
        .unwrap();
    let bytes = std::fs::read(prefix.join("model.bin")).unwrap();
    let loaded = worker::train::codec::model_from_bytes(fresh, &bytes, &device).unwrap();
    assert_eq!(&worker::train::params::weights_checksum::<Cpu, _>(&loaded), finished[0]);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(prefix.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 6);
    assert_eq!(state["weights_sha256"].as_str().unwrap(), finished[0]);
}

#[test]
fn periodic_evaluation_runs_on_both_ranks_and_marks_the_best_checkpoint() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(6);
    cluster.spawn_workers(2);
    let spec = cluster.write_spec("e2e-eval", 2, 6, "eval_every = 2");
    let run_id = cluster.submit(&spec);
    let detail = cluster.wait_for_end(&run_id);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    assert_eq!(detail["eval_cases"], 2);

    // Every evaluation after step 0 left a checkpoint carrying its mean Dice; the final one too.
    let checkpoints = detail["checkpoints"].as_array().unwrap();
    let dice: Vec<(u64, f64)> = checkpoints
        .iter()
        .map(|c| (c["step"].as_u64().unwrap(), c["eval_dice"].as_f64().expect("a Dice")))
        .collect();
    assert_eq!(dice.iter().map(|d| d.0).collect::<Vec<_>>(), [2, 4, 6]);
    let top = dice.iter().map(|d| d.1).fold(f64::MIN, f64::max);
    let best_step = dice.iter().rev().find(|d| d.1 == top).unwrap().0;
    let marked: Vec<u64> = checkpoints
        .iter()
        .filter(|c| c["best"] == true)
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(marked, [best_step], "{dice:?}");
    let listing = cluster.cli(&["checkpoints", &run_id]);
    let text = String::from_utf8_lossy(&listing.stdout);
    let best_row = text
        .lines()
        .find(|l| l.contains("best"))
        .unwrap_or_else(|| panic!("no best mark in\n{text}"));
    assert!(
        best_row.split_whitespace().any(|w| w == best_step.to_string()),
        "{text}"
    );
    assert!(Cluster::event_kinds(&detail).contains(&"best-checkpoint".to_string()));

    // Both ranks evaluated their half of the held-out cases at every evaluation; rank 0
    // reported the run's Dice, the one its checkpoint carries.
    cluster.kill_coordinator();
    let store = coordinator::store::Store::open(&cluster.path("db")).unwrap();
    let metrics: Vec<_> = store
        .metrics_from(&run_id, 0)
        .unwrap()
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let at = |name: &str, step: u64| -> Vec<(u32, f64)> {
        metrics
            .iter()
            .filter(|m| m.name == name && m.step == step)
            .map(|m| (m.rank, m.value))
            .collect()
    };
    for step in [0, 2, 4, 6] {
        let mut shards = at("eval/shard_cases", step);
        shards.sort_by_key(|s| s.0);
        assert_eq!(shards, [(0, 1.0), (1, 1.0)], "step {step}");
        assert_eq!(at("eval/shard_seconds", step).len(), 2, "step {step}");
        assert_eq!(at("eval/cases", step), [(0, 2.0)], "step {step}");
        let mean = at("eval/mean_dice", step);
        assert_eq!(mean.len(), 1, "rank 0 alone reports the Dice at step {step}");
        if let Some(&(_, d)) = dice.iter().find(|d| d.0 == step) {
            assert_eq!(mean[0].1, d, "step {step}");
        }
    }
}
