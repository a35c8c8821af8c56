//! Sweeps and the queue over real gRPC and a real store, with the test playing the workers:
//! a sweep expands into nesting subsets of one frozen manifest, a bad sweep stores nothing,
//! priorities order the queue, a large run at the head is not starved by small ones, a CUDA run
//! never gets a CPU worker, and a worker that stopped beating gets no new work.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Cluster, fake_worker, fake_worker_on, poll};
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use serde_json::Value;

/// A sweep over `dataset.train_cases` × `seed` with the test cluster's tiny spec as its base.
fn write_sweep(cluster: &Cluster, name: &str, axes: &str) -> PathBuf {
    cluster.write_spec(&format!("{name}-base"), 1, 4, "");
    let text = format!("name = \"{name}\"\nbase = \"{name}-base.toml\"\n[axes]\n{axes}\n");
    let path = cluster.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn runs(cluster: &Cluster) -> Vec<Value> {
    cluster.cli_json(&["runs"]).as_array().unwrap().clone()
}

fn run_by_id<'a>(runs: &'a [Value], id: &str) -> &'a Value {
    runs.iter().find(|r| r["run_id"] == id).unwrap()
}

#[test]
fn a_sweep_expands_into_children_whose_subsets_nest() {
    let cluster = Cluster::start();
    cluster.write_dataset(12);
    let sweep = write_sweep(
        &cluster,
        "scaling",
        "\"dataset.train_cases\" = [2, 4, 8]\nseed = [1, 2]",
    );
    let info = cluster.cli_json(&["sweep", sweep.to_str().unwrap()]);
    let sweep_id = info["sweep_id"].as_str().unwrap().to_string();
    assert_eq!(info["runs"], 6);

    let detail = cluster.cli_json(&["sweep", "show", &sweep_id]);
    let children = detail["children"].as_array().unwrap();
    let values: Vec<(i64, i64)> = children
        .iter()
        .map(|c| {
            (
                c["values"]["dataset.train_cases"].as_i64().unwrap(),
                c["values"]["seed"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(values, [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)]);
    assert!(children.iter().all(|c| c["state"] == "Queued"));
    // No worker has registered: each child says where it stands and why.
    let message = children[1]["message"].as_str().unwrap();
    assert!(
        message.starts_with("#2 in the queue") && message.contains("none are registered"),
        "{message}"
    );
    let counts: Vec<i64> = children.iter().map(|c| c["train_cases"].as_i64().unwrap()).collect();
    assert_eq!(counts, [2, 2, 4, 4, 8, 8]);

    // One frozen manifest for all of them: every training subset is a prefix of its order.
    let manifests = detail["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{detail}");
    let listed = cluster.cli_json(&["dataset", "manifests"]);
    let cases: Vec<String> = serde_json::from_value(listed[0]["cases"].clone()).unwrap();
    assert_eq!(cases.len(), 12);

    // `runs --sweep` lists exactly the children, and they carry the sweep id.
    let filtered = cluster.cli_json(&["runs", "--sweep", &sweep_id]);
    assert_eq!(filtered.as_array().unwrap().len(), 6);
    assert!(filtered.as_array().unwrap().iter().all(|r| r["sweep_id"] == sweep_id));

    // The bucket grows; a later run over it still draws from the frozen order, so it nests.
    data::write_phantom_dataset(
        &cluster.path("dataset"),
        &data::SynthOptions {
            cases: 16,
            seed: 3,
            shape: [16, 16, 16],
            ..Default::default()
        },
    )
    .unwrap();
    let later = cluster.write_spec("later", 1, 4, "");
    let run_id = cluster.submit(&later);
    let shown = cluster.cli_json(&["show", &run_id]);
    assert_eq!(shown["train_cases"], 10, "12 frozen cases minus 2 held out: {shown}");
    assert_eq!(cluster.cli_json(&["dataset", "manifests"]).as_array().unwrap().len(), 1);

    // The sweep-wide actions.
    let cancelled = cluster.cli_json(&["sweep", "cancel", &sweep_id]);
    assert_eq!(cancelled["sweep"]["states"]["Cancelled"], 6, "{cancelled}");
    let listed = cluster.cli_json(&["sweeps"]);
    assert_eq!(listed[0]["states"]["Cancelled"], 6);
    let resumed = cluster.cli_json(&["sweep", "resume", &sweep_id]);
    assert_eq!(
        resumed["sweep"]["states"]["Queued"], 6,
        "never-started children resume from step 0: {resumed}"
    );
}

#[test]
fn a_bad_sweep_stores_nothing() {
    let cluster = Cluster::start();
    cluster.write_dataset(8);
    // An unknown key is caught by the CLI, naming it.
    let unknown = write_sweep(&cluster, "unknown", "\"train.lrr\" = [0.1, 0.2]");
    let out = cluster.cli(&["sweep", unknown.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("axis `train.lrr`"), "{err}");
    // Only the coordinator can see that 50 training cases are more than the dataset has: it
    // rejects the whole sweep, although its first child would fit.
    let too_many = write_sweep(&cluster, "too-many", "\"dataset.train_cases\" = [2, 50]");
    let out = cluster.cli(&["sweep", too_many.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("dataset.train_cases") && err.contains("= 50"),
        "{err}"
    );
    assert!(runs(&cluster).is_empty());
    assert!(cluster.cli_json(&["sweeps"]).as_array().unwrap().is_empty());
    // A dry run expands without queueing.
    let good = write_sweep(&cluster, "good", "seed = [1, 2, 3]");
    let dry = cluster.cli_json(&["sweep", good.to_str().unwrap(), "--dry-run"]);
    assert_eq!(dry["runs"].as_array().unwrap().len(), 3);
    assert!(runs(&cluster).is_empty());
}

#[tokio::test]
async fn priorities_order_the_queue_and_a_large_head_run_is_not_starved() {
    let cluster = Cluster::start();
    cluster.write_dataset(6);
    let low = cluster.submit(&cluster.write_spec("low", 1, 4, ""));
    let high = cluster.submit(&cluster.write_spec_with("high", 1, 4, "priority = 5", ""));
    let queue = runs(&cluster);
    assert_eq!(run_by_id(&queue, &high)["queue_position"], 1);
    assert_eq!(run_by_id(&queue, &low)["queue_position"], 2);

    // The first worker takes the higher priority, though it came second.
    let (mut w1, id1) = fake_worker(&cluster, "127.0.0.1:11").await;
    let Some(Outcome::Assignment(a)) = poll(&mut w1, &id1, 5000).await else {
        panic!("no assignment")
    };
    assert_eq!(a.run_id, high);
    let (mut w2, id2) = fake_worker(&cluster, "127.0.0.1:12").await;
    let Some(Outcome::Assignment(a)) = poll(&mut w2, &id2, 5000).await else {
        panic!("no assignment")
    };
    assert_eq!(a.run_id, low);

    // Three workers, two busy. A large run reserves the idle one; small runs behind it wait.
    let (mut w3, id3) = fake_worker(&cluster, "127.0.0.1:13").await;
    let large = cluster.submit(&cluster.write_spec("large", 3, 4, ""));
    let small: Vec<String> = (0..3)
        .map(|i| cluster.submit(&cluster.write_spec(&format!("small-{i}"), 1, 4, "")))
        .collect();
    assert!(matches!(poll(&mut w3, &id3, 1500).await, Some(Outcome::Idle(_))));
    let queue = runs(&cluster);
    let reason = run_by_id(&queue, &large)["waiting_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("needs 3 workers, 1 idle"), "{reason}");
    let behind = run_by_id(&queue, &small[0])["waiting_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(behind.contains(&format!("waiting behind {large}")), "{behind}");
    let table = String::from_utf8_lossy(&cluster.cli(&["runs"]).stdout).to_string();
    assert!(table.contains("#1 in the queue: needs 3 workers"), "{table}");

    // The two runs end; the large run gets all three workers before any small one starts.
    cluster.cli_json(&["cancel", &high]);
    cluster.cli_json(&["cancel", &low]);
    let mut got = vec![];
    for (client, id) in [(&mut w1, &id1), (&mut w2, &id2), (&mut w3, &id3)] {
        match poll(client, id, 5000).await {
            Some(Outcome::Assignment(a)) => got.push(a.run_id),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(got, [large.clone(), large.clone(), large.clone()]);
    assert!(small.iter().all(|s| run_by_id(&runs(&cluster), s)["state"] == "Queued"));
}

#[tokio::test]
async fn a_run_no_group_can_hold_does_not_block_the_queue() {
    // Tried as a new user: world_size = 3 with two workers blocked every later run, silently.
    let cluster = Cluster::start();
    cluster.write_dataset(6);
    let (mut w1, id1) = fake_worker(&cluster, "127.0.0.1:11").await;
    let (_w2, _id2) = fake_worker(&cluster, "127.0.0.1:12").await;
    let big = cluster.submit(&cluster.write_spec("big", 3, 4, ""));
    let small = cluster.submit(&cluster.write_spec("small", 1, 4, ""));
    let Some(Outcome::Assignment(a)) = poll(&mut w1, &id1, 5000).await else {
        panic!("the small run was not placed")
    };
    assert_eq!(a.run_id, small);
    let queue = runs(&cluster);
    let reason = run_by_id(&queue, &big)["waiting_reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("needs 3 workers") && reason.contains("largest group"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_cuda_run_never_gets_a_cpu_worker() {
    let cluster = Cluster::start();
    cluster.write_dataset(6);
    let gpu = cluster.submit(&cluster.write_spec_with("gpu", 1, 4, "device = \"cuda\"", ""));
    let (mut cpu, cpu_id) = fake_worker(&cluster, "127.0.0.1:11").await;
    assert!(matches!(poll(&mut cpu, &cpu_id, 1500).await, Some(Outcome::Idle(_))));
    let reason = run_by_id(&runs(&cluster), &gpu)["waiting_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("cuda") && reason.contains("none are registered"),
        "{reason}"
    );
    let (mut cuda, cuda_id) = fake_worker_on(&cluster, "127.0.0.1:12", "cuda:0").await;
    let Some(Outcome::Assignment(a)) = poll(&mut cuda, &cuda_id, 5000).await else {
        panic!("the cuda worker got nothing")
    };
    assert_eq!(a.run_id, gpu);
    // An unknown device is refused at submit, naming the field.
    let bad = cluster.write_spec_with("tpu", 1, 4, "device = \"tpu\"", "");
    let out = cluster.cli(&["submit", bad.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("field `device`"));
}

#[tokio::test]
async fn a_worker_that_stopped_beating_gets_no_new_work() {
    // dead_after 8 s: beats every 2 s, stale after 5 s of silence, dead after 8.
    let cluster = Cluster::start_with_dead_after(8);
    cluster.write_dataset(6);
    let (mut silent, silent_id) = fake_worker(&cluster, "127.0.0.1:11").await;
    tokio::time::sleep(Duration::from_millis(5600)).await;
    let run_id = cluster.submit(&cluster.write_spec("r", 1, 4, ""));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queue = runs(&cluster);
    assert_eq!(
        run_by_id(&queue, &run_id)["state"],
        "Queued",
        "placed on a silent worker"
    );
    // It speaks again: it is fresh, and takes the run.
    let beat = pb::HeartbeatRequest {
        worker_id: silent_id.clone(),
        ..Default::default()
    };
    silent.heartbeat(beat).await.unwrap();
    let Some(Outcome::Assignment(a)) = poll(&mut silent, &silent_id, 5000).await else {
        panic!("no assignment after the worker came back")
    };
    assert_eq!(a.run_id, run_id);
}
