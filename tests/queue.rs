//! Sweeps and the queue over real gRPC and a real store, with the test playing the workers:
//! a sweep expands into nesting subsets of one frozen manifest, a bad sweep stores nothing,
//! priorities order the queue, a large run at the head is not starved by small ones, a CUDA run
//! never gets a CPU worker, and a worker that stopped beating gets no new work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{Cluster, fake_worker, fake_worker_on, poll};
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

/// Runs the CLI against `cluster` from the working directory `cwd`.
fn cli_in(cluster: &Cluster, cwd: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::common::BIN)
        .args(args)
        .args(["--coordinator", &cluster.endpoint, "--json"])
        .env(protocol::auth::TOKEN_ENV, crate::common::TOKEN)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_priority_axis_sets_each_childs_priority_and_the_sweep_shows_it() {
    // Tried: `priority = 7` and an axis `priority = [1, 100]` named children priority=1 and
    // priority=100 that both ran at 7.
    let cluster = Cluster::start();
    cluster.write_dataset(8);
    cluster.write_spec("prio-base", 1, 4, "");
    let path = cluster.path("prio.toml");
    std::fs::write(
        &path,
        "name = \"prio\"\npriority = 7\nbase = \"prio-base.toml\"\n[axes]\npriority = [1, 100]\n",
    )
    .unwrap();
    let info = cluster.cli_json(&["sweep", path.to_str().unwrap()]);
    assert_eq!(info["priority"], Value::Null, "no one priority is the sweep's: {info}");
    let sweep_id = info["sweep_id"].as_str().unwrap().to_string();
    let mut got: Vec<(String, i64)> = runs(&cluster)
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["priority"].as_i64().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, [("prio priority=1".into(), 1), ("prio priority=100".into(), 100)]);
    let detail = cluster.cli_json(&["sweep", "show", &sweep_id]);
    for child in detail["children"].as_array().unwrap() {
        assert_eq!(child["priority"], child["values"]["priority"], "{child}");
    }
    let text = String::from_utf8_lossy(&cluster.cli(&["sweep", "show", &sweep_id]).stdout).to_string();
    assert!(text.contains("priority by axis") && text.contains("PRI"), "{text}");

    // Without the axis the sweep's priority is every child's, and the base's when it gives none.
    let base_priority = cluster.write_spec_with("base-3", 1, 4, "priority = 3", "");
    let path = cluster.path("plain.toml");
    let text = format!(
        "name = \"plain\"\nbase = \"{}\"\n[axes]\nseed = [1, 2]\n",
        base_priority.file_name().unwrap().to_str().unwrap()
    );
    std::fs::write(&path, &text).unwrap();
    let info = cluster.cli_json(&["sweep", path.to_str().unwrap()]);
    assert_eq!(info["priority"], 3, "{info}");
    std::fs::write(&path, format!("priority = 9\n{text}")).unwrap();
    let info = cluster.cli_json(&["sweep", path.to_str().unwrap()]);
    assert_eq!(info["priority"], 9, "{info}");
    let listed = cluster.cli_json(&["runs", "--sweep", info["sweep_id"].as_str().unwrap()]);
    assert!(
        listed.as_array().unwrap().iter().all(|r| r["priority"] == 9),
        "{listed}"
    );
}

#[test]
fn overlapping_axes_and_repeated_values_are_refused_and_nothing_is_queued() {
    // Tried: `dataset.train_cases = [4]` with `dataset = [{...}]` named a child train_cases=4
    // that trained on 10 cases; `seed = [1, 1, 1]` queued three identical runs.
    let cluster = Cluster::start();
    cluster.write_dataset(8);
    let dataset = cluster.path("dataset").display().to_string();
    let overlap = write_sweep(
        &cluster,
        "overlap",
        &format!(
            "\"dataset.train_cases\" = [4]\ndataset = [{{ url = \"{dataset}\", eval_cases = 2, train_cases = 6 }}]"
        ),
    );
    let repeated = write_sweep(&cluster, "repeated", "seed = [1, 1, 1]");
    for (path, expect) in [
        (&overlap, "axes `dataset.train_cases` and `dataset` overlap"),
        (&repeated, "axis `seed`: value 1 is given twice"),
    ] {
        for dry in [true, false] {
            let mut args = vec!["sweep", path.to_str().unwrap()];
            if dry {
                args.push("--dry-run");
            }
            let out = cluster.cli(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains(expect), "{expect}: {err}");
        }
    }
    assert!(runs(&cluster).is_empty());
    assert!(cluster.cli_json(&["sweeps"]).as_array().unwrap().is_empty());
}

#[test]
fn relative_paths_resolve_against_the_file_that_wrote_them_from_any_directory() {
    // Tried: the base was found beside the sweep, but its relative dataset.url was resolved
    // against the current directory, so a sweep queued from one directory failed from another.
    let cluster = Cluster::start();
    cluster.write_dataset(8);
    let root = cluster.path("");
    for dir in ["specs/lists", "sweeps", "a/b"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let spec = std::fs::read_to_string(cluster.write_spec("rel", 1, 4, ""))
        .unwrap()
        .replace(&cluster.path("dataset").display().to_string(), "../dataset")
        .replace(&cluster.path("artifacts").display().to_string(), "./../artifacts")
        .replace("eval_cases = 2", "eval_cases = 2\ncase_list = \"lists/six.txt\"");
    std::fs::write(root.join("specs/base.toml"), spec).unwrap();
    let six: Vec<String> = (1..=6).map(|i| format!("BDMAP_{i:08}")).collect();
    std::fs::write(root.join("specs/lists/six.txt"), six.join("\n")).unwrap();
    std::fs::write(
        root.join("sweeps/s.toml"),
        "name = \"rel\"\nbase = \"../specs/base.toml\"\n[axes]\n\"dataset.train_cases\" = [2, 4]\n",
    )
    .unwrap();

    let mut specs = vec![];
    for (cwd, sweep) in [
        (root.clone(), "sweeps/s.toml"),
        (root.join("a/b"), "../../sweeps/s.toml"),
    ] {
        let info = json_of(&cli_in(&cluster, &cwd, &["sweep", sweep]));
        let listed = json_of(&cli_in(
            &cluster,
            &cwd,
            &["runs", "--sweep", info["sweep_id"].as_str().unwrap()],
        ));
        specs.extend(
            listed
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["run_id"].as_str().unwrap().to_string()),
        );
        let run = json_of(&cli_in(
            &cluster,
            &cwd,
            &["submit", &sweep.replace("sweeps/s.toml", "specs/base.toml")],
        ));
        specs.push(run["run_id"].as_str().unwrap().to_string());
    }
    assert_eq!(specs.len(), 6);
    for run_id in &specs {
        let shown = cluster.cli_json(&["show", run_id]);
        let spec = protocol::spec::RunSpec::from_toml(shown["spec_toml"].as_str().unwrap(), run_id).unwrap();
        assert_eq!(
            spec.dataset.url,
            cluster.path("dataset").display().to_string(),
            "{run_id}"
        );
        assert_eq!(
            spec.artifacts.url,
            cluster.path("artifacts").display().to_string(),
            "{run_id}"
        );
        assert_eq!(spec.dataset.cases.as_deref(), Some(&six[..]), "{run_id}");
    }
    // One dataset URL, whichever directory queued them.
    let manifests = cluster.cli_json(&["dataset", "manifests"]);
    let urls: Vec<&str> = manifests
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["dataset_url"].as_str().unwrap())
        .collect();
    assert!(
        urls.iter().all(|u| *u == cluster.path("dataset").display().to_string()),
        "{urls:?}"
    );
}

#[test]
fn a_base_spec_or_case_list_that_never_ends_is_refused_naming_it() {
    // Tried: `base = "/dev/zero"` ran out of memory after 3.3 s.
    let cluster = Cluster::start();
    let root = cluster.path("");
    std::fs::write(
        root.join("zero.toml"),
        "name = \"zero\"\nbase = \"/dev/zero\"\n[axes]\nseed = [1]\n",
    )
    .unwrap();
    let list = std::fs::read_to_string(cluster.write_spec("list", 1, 4, ""))
        .unwrap()
        .replace("eval_cases = 2", "eval_cases = 2\ncase_list = \"/dev/zero\"");
    std::fs::write(root.join("list.toml"), list).unwrap();
    for (args, expect) in [
        (
            vec!["sweep", "zero.toml"],
            "base spec /dev/zero is larger than 1024 KiB",
        ),
        (
            vec!["submit", "/dev/zero"],
            "run spec /dev/zero is larger than 1024 KiB",
        ),
        (
            vec!["sweep", "/dev/zero"],
            "sweep file /dev/zero is larger than 1024 KiB",
        ),
        (
            vec!["submit", "list.toml"],
            "case list /dev/zero is larger than 2048 KiB",
        ),
    ] {
        let started = std::time::Instant::now();
        let out = cli_in(&cluster, &root, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expect), "{args:?}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}
