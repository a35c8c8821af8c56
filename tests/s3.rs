//! A two-worker run with its dataset and its artifacts in a real S3-compatible server (moto, which
//! `.ci/run` starts on 127.0.0.1): the coordinator lists the bucket and verifies checkpoints there,
//! the workers read cases from it and write checkpoints to it. The processes inherit the AWS_*
//! environment, as a deployment's would.

use std::time::Duration;

use crate::common::Cluster;
use object_store::ObjectStore;
use object_store::path::Path;
use sha2::{Digest, Sha256};

/// Copies the local phantom dataset into the bucket, as a lab stages AbdomenAtlas.
fn stage_dataset(local: &std::path::Path, url: &str) -> usize {
    let (store, prefix) = data::store_from_url(url).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(data::store::put_dir(local, store.as_ref(), &prefix))
        .unwrap()
}

fn read_object(url: &str, key: &str) -> Vec<u8> {
    let (store, prefix) = data::store_from_url(url).unwrap();
    let key = Path::from(format!("{prefix}/{key}"));
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { store.get(&key).await?.bytes().await })
        .unwrap_or_else(|e| panic!("{url} {key}: {e}"))
        .to_vec()
}

/// A two-rank run on the scanned dataset `dataset` (by name), checkpointing to `artifacts_url`.
fn write_spec(cluster: &Cluster, dataset: &str, artifacts_url: &str) -> std::path::PathBuf {
    let text = format!(
        r#"name = "e2e-s3"
world_size = 2
seed = 11

[dataset]
name = "{dataset}"
eval_cases = 2

[model]
arch = "unet"
base_width = 4
depth = 2

[train]
steps = 4
patch = [16, 16, 16]
lr = 0.003
warmup_steps = 1
checksum_every = 1
metrics_every = 2
checkpoint_every = 2

[artifacts]
url = "{artifacts_url}"
"#
    );
    let path = cluster.path("e2e-s3.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
#[ignore = "needs the S3-compatible test server (VOXELFLEET_TEST_S3_ENDPOINT); .ci/run starts moto and runs this with --ignored"]
fn two_workers_train_from_s3_and_checkpoint_to_s3() {
    let s3 = data::reference::reference_s3("two_workers_train_from_s3_and_checkpoint_to_s3");
    let mut cluster = Cluster::start();
    let local = cluster.write_dataset(6);
    let dataset_url = s3.unique_url("e2e-dataset");
    let artifacts_url = s3.unique_url("e2e-artifacts");
    assert_eq!(stage_dataset(&local, &dataset_url), 6 * 26);
    // Nothing can fall back to the local copy.
    std::fs::remove_dir_all(&local).unwrap();

    // The bucket is scanned by prefix listing into a named dataset, which the run then uses.
    let out = cluster.cli(&["dataset", "scan", &dataset_url, "--name", "atlas-s3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let datasets = cluster.cli_json(&["datasets"]);
    let listed = datasets
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "atlas-s3")
        .unwrap_or_else(|| panic!("scanned dataset listed: {datasets}"));
    assert_eq!(listed["cases"], 6, "{listed}");
    assert_eq!(listed["missing_ct"], 0, "{listed}");

    let spec = write_spec(&cluster, "atlas-s3", &artifacts_url);
    cluster.spawn_workers(2);
    let run_id = cluster.submit(&spec);
    let detail = cluster.wait_for_end(&run_id);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    assert_eq!(detail["run"]["step"], 4);
    assert_eq!(detail["train_cases"], 4);
    assert_eq!(detail["eval_cases"], 2);
    assert_eq!(detail["run"]["workers"].as_array().unwrap().len(), 2);

    // Checkpoints at steps 2 and 4 are committed, and their objects in the bucket hold what the
    // workers claimed and the coordinator verified.
    let checkpoints = detail["checkpoints"].as_array().unwrap();
    let steps: Vec<u64> = checkpoints.iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4]);
    for c in checkpoints {
        let files = c["files"].as_array().unwrap();
        assert_eq!(files.len(), 3, "{c}");
        for f in files {
            let key = f["key"].as_str().unwrap();
            assert!(key.starts_with(&format!("runs/{run_id}/checkpoints/")), "{key}");
            let bytes = read_object(&artifacts_url, key);
            assert_eq!(bytes.len() as u64, f["bytes"].as_u64().unwrap(), "{key}");
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                f["sha256"].as_str().unwrap(),
                "{key}"
            );
        }
    }
    assert!(!cluster.path("artifacts").exists(), "no checkpoint went to local disk");

    // The final checkpoint's state names the last step and the weights both ranks finished with.
    cluster.wait_workers_exit(Duration::from_secs(30));
    cluster.kill_coordinator();
    let store = coordinator::store::Store::open(&cluster.path("db")).unwrap();
    let run = store.run(&run_id).unwrap().unwrap();
    assert_eq!(run.final_checkpoint, Some(4));
    let finished: Vec<&String> = run.finished.values().map(|f| &f.weights_sha256).collect();
    assert_eq!(finished.len(), 2);
    assert_eq!(finished[0], finished[1]);
    let last = checkpoints[1]["prefix"].as_str().unwrap().trim_end_matches('/');
    let state: serde_json::Value =
        serde_json::from_slice(&read_object(&artifacts_url, &format!("{last}/state.json"))).unwrap();
    assert_eq!(state["step"], 4);
    assert_eq!(state["weights_sha256"].as_str().unwrap(), finished[0]);
}
