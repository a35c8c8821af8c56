//! Two real worker processes train the tiny U-Net through a real coordinator: the full cycle of
//! register → assign → run → complete, bit-identical weights across ranks, and checkpoints that
//! land both in the object store and in sled.

mod common;

use std::time::Duration;

use common::Cluster;
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

    // Held-out evaluation ran before and after training, on rank 0.
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

    // Workers leave after their one run (--max-runs 1).
    cluster.wait_workers_exit(Duration::from_secs(30));

    // After a SIGKILL of the coordinator, sled still holds everything it acknowledged.
    cluster.kill_coordinator();
    let store = coordinator::store::Store::open(&cluster.path("db")).unwrap();
    let run = store.run(&run_id).unwrap().unwrap();
    assert_eq!(run.state, coordinator::records::RunState::Completed);
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
