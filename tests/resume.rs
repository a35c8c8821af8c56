//! Runs that survive anything, checked with real processes on loopback: workers SIGKILLed and
//! replaced, a coordinator SIGKILLed and restarted within and past the workers' grace period,
//! pause and resume at another world size, a deleted checkpoint object, and churn (more kills
//! than the retry budget, each after progress) that spends none of it. Every run that completes must end with the final weights of the same run left alone,
//! to the bit, and write the same final `model.bin` bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::{Cluster, FinalCheckpoint};

const STEPS: u64 = 60;
const WORLD: u32 = 3;
const DONE: [&str; 3] = ["Completed", "Failed", "Cancelled"];
const LONG: Duration = Duration::from_secs(300);
/// Long enough that a pause requested past step 6 lands well before the end, however slow the
/// machine.
const PAUSED_STEPS: u64 = 80;

/// The spec every bit-identity check runs: 3 ranks, a checkpoint every 5 steps.
fn spec(cluster: &Cluster, name: &str) -> PathBuf {
    cluster.write_spec_with(name, WORLD, STEPS, "", "checkpoint_every = 5")
}

/// A cluster with the dataset and `workers` long-lived workers; dead after 2 s of silence.
fn cluster(workers: usize) -> Cluster {
    let mut cluster = Cluster::start_with_dead_after(2);
    cluster.write_dataset(6);
    cluster.spawn_workers_with(workers, &[]);
    cluster
}

/// The final checkpoint of the run left alone (its weights hash and the hash of its `model.bin`
/// bytes), computed once per test binary.
fn uninterrupted() -> &'static FinalCheckpoint {
    static FINAL: OnceLock<FinalCheckpoint> = OnceLock::new();
    FINAL.get_or_init(|| {
        let cluster = cluster(WORLD as usize);
        let run = cluster.submit(&spec(&cluster, "uninterrupted"));
        let detail = cluster.wait_for_state(&run, &DONE, LONG);
        assert_eq!(detail["run"]["state"], "Completed", "{detail}");
        assert_eq!(detail["run"]["attempt"], 1);
        cluster.final_checkpoint(&detail)
    })
}

fn completed_bit_identical(cluster: &Cluster, run: &str) -> serde_json::Value {
    let detail = cluster.wait_for_state(run, &DONE, LONG);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    assert_eq!(detail["run"]["step"], STEPS);
    // The same weights, and the same model.bin bytes.
    assert_eq!(
        &cluster.final_checkpoint(&detail),
        uninterrupted(),
        "the final checkpoint differs from the uninterrupted run's: {detail}"
    );
    detail
}

#[test]
fn the_rayon_thread_count_does_not_change_the_weights() {
    // The guarantee resume rests on: same binary and kernels, any number of threads.
    let mut cluster = Cluster::start_with_dead_after(2);
    cluster.write_dataset(6);
    cluster.spawn_workers_threads(WORLD as usize, &[], 2);
    let run = cluster.submit(&spec(&cluster, "two-threads"));
    completed_bit_identical(&cluster, &run);
}

#[test]
fn a_killed_worker_is_replaced_and_the_run_ends_bit_identical() {
    let expected = uninterrupted();
    let mut cluster = cluster(WORLD as usize);
    // No periodic checkpoints: the only way not to start over is the survivors' state.
    let run = cluster.submit(&cluster.write_spec("kill-one", WORLD, STEPS, ""));
    cluster.wait_for_step(&run, 8, LONG);
    let step_at_kill = cluster.step(&run);
    let killed_at = std::time::Instant::now();
    cluster.kill_worker(1);
    cluster.spawn_workers_with(1, &[]);
    // The survivors kept the whole state: the re-formed ring starts from it, not from the
    // checkpoint at step 5, and loses only the step that was in flight.
    let mut resumed_from = 0;
    cluster.wait_until("the re-formed ring to complete a step", LONG, || {
        let d = cluster.cli_json(&["show", &run]);
        let resumed = d["events"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["kind"] == "resumed")
            .cloned();
        match resumed {
            Some(e) if d["run"]["state"] == "Running" || d["run"]["state"] == "Completed" => {
                resumed_from = e["step"].as_u64().unwrap();
                d["run"]["step"].as_u64().unwrap() > resumed_from
            }
            _ => false,
        }
    });
    eprintln!(
        "live recovery: killed at step {step_at_kill}, resumed from step {resumed_from}, next step completed {:.2} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    let detail = completed_bit_identical(&cluster, &run);
    let kinds = Cluster::event_kinds(&detail);
    assert!(kinds.contains(&"interrupted".to_string()), "{kinds:?}");
    let resumed = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "resumed")
        .unwrap();
    assert!(
        resumed["message"].as_str().unwrap().contains("live recovery"),
        "{resumed}"
    );
    // The coordinator's step lags the ranks; a survivor stuck in the step that was in flight
    // holds the one before it.
    assert!(
        resumed_from + 1 >= step_at_kill,
        "lost more than the step in flight: {resumed}"
    );
    // Attempt 2 may land on the killed worker before its heartbeats are missed; it then goes
    // back to the queue at no cost, and attempt 3 runs.
    assert!(detail["run"]["attempt"].as_u64().unwrap() >= 2, "{detail}");
    assert_eq!(detail["run"]["retries"], 1, "{detail}");
    assert!(!expected.weights_sha256.is_empty());
}

#[test]
fn two_kills_at_different_steps_still_end_bit_identical() {
    uninterrupted();
    let mut cluster = cluster(WORLD as usize);
    let run = cluster.submit(&spec(&cluster, "kill-two"));
    cluster.wait_for_step(&run, 7, LONG);
    cluster.kill_worker(0);
    cluster.spawn_workers_with(1, &[]);
    cluster.wait_until("the second attempt to pass step 17", LONG, || {
        let d = cluster.cli_json(&["show", &run]);
        d["run"]["attempt"].as_u64().unwrap() >= 2
            && d["run"]["state"] == "Running"
            && d["run"]["step"].as_u64().unwrap() >= 17
    });
    cluster.kill_worker(2);
    cluster.spawn_workers_with(1, &[]);
    let detail = completed_bit_identical(&cluster, &run);
    let interruptions = Cluster::event_kinds(&detail)
        .iter()
        .filter(|k| *k == "interrupted")
        .count();
    assert_eq!(interruptions, 2, "{detail}");
}

#[test]
fn a_coordinator_restarted_within_the_grace_period_costs_no_training() {
    uninterrupted();
    let mut cluster = cluster(WORLD as usize);
    let run = cluster.submit(&spec(&cluster, "coordinator-blip"));
    cluster.wait_for_step(&run, 6, LONG);
    let workers_before = cluster.worker_states();
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_secs(1));
    cluster.restart_coordinator();
    let detail = completed_bit_identical(&cluster, &run);
    // Adopted, never interrupted: still the first attempt, on the same workers under the same ids.
    assert_eq!(detail["run"]["attempt"], 1, "{detail}");
    let kinds = Cluster::event_kinds(&detail);
    assert!(kinds.contains(&"adopting".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"interrupted".to_string()), "{kinds:?}");
    let ids = |states: Vec<(String, String)>| states.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(ids(cluster.worker_states()), ids(workers_before));

    // No step was lost: every rank's weight checksum is on record for every step, all from
    // the one attempt.
    cluster.kill_coordinator();
    let store = coordinator::store::Store::open(&cluster.path("db")).unwrap();
    let mut per_step: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (step, rank, _) in store.checksums(&run).unwrap() {
        per_step.entry(step).or_default().push(rank);
    }
    assert_eq!(per_step.len() as u64, STEPS, "{per_step:?}");
    assert!(per_step.values().all(|ranks| ranks == &[0, 1, 2]), "{per_step:?}");
}

#[test]
fn a_coordinator_down_past_the_grace_period_resumes_from_its_checkpoint() {
    uninterrupted();
    let mut cluster = Cluster::start_with_dead_after(2);
    cluster.write_dataset(6);
    cluster.spawn_workers_with(WORLD as usize, &["--coordinator-grace-secs", "2"]);
    let run = cluster.submit(&spec(&cluster, "coordinator-gone"));
    cluster.wait_for_step(&run, 7, LONG);
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_secs(8));
    cluster.restart_coordinator();
    let detail = completed_bit_identical(&cluster, &run);
    let kinds = Cluster::event_kinds(&detail);
    assert!(kinds.contains(&"interrupted".to_string()), "{kinds:?}");
    assert!(detail["run"]["attempt"].as_u64().unwrap() >= 2, "{detail}");
    let events = detail["events"].as_array().unwrap();
    let step_of = |kind: &str| {
        events.iter().find(|e| e["kind"] == kind).unwrap()["step"]
            .as_u64()
            .unwrap()
    };
    eprintln!(
        "restart after the grace period: interrupted at step {}, resumed from step {}",
        step_of("interrupted"),
        step_of("resumed")
    );
}

/// Runs `name` at 3 ranks, pauses it past step 6, resumes it at 2 ranks, and returns the pause
/// step and, per (step, rank), the global samples that rank read.
fn pause_and_rescale(name: &str, train_extra: &str) -> (u64, BTreeMap<(u64, u64), std::ops::Range<u64>>) {
    let cluster = cluster(WORLD as usize);
    let path = cluster.write_spec_with(name, WORLD, PAUSED_STEPS, "", train_extra);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("metrics_every = 2", "metrics_every = 1");
    std::fs::write(&path, text).unwrap();
    let run = cluster.submit(&path);
    cluster.wait_for_step(&run, 6, LONG);
    let out = cluster.cli(&["pause", &run]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let paused = cluster.wait_for_state(&run, &["Paused"], LONG);
    let pause_step = paused["run"]["step"].as_u64().unwrap();
    let listed = cluster.cli_json(&["checkpoints", &run]);
    let candidate: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["resume_candidate"] == true)
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(candidate, [pause_step], "{listed}");
    // The workers are released: a pause frees the gang.
    cluster.wait_until("the paused run's workers to be idle", LONG, || {
        cluster.worker_states().iter().filter(|(_, s)| s == "Idle").count() == 3
    });

    let out = cluster.cli(&["resume", &run, "--world-size", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let detail = cluster.wait_for_state(&run, &DONE, LONG);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    assert_eq!(detail["run"]["world_size"], 2);

    let out = cluster.cli(&["metrics", &run, "--json"]);
    assert!(out.status.success());
    let mut first: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut count: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (m["step"].as_u64().unwrap(), m["rank"].as_u64().unwrap());
        let value = m["value"].as_f64().unwrap() as u64;
        let into = match m["name"].as_str().unwrap() {
            "data/first_sample" => &mut first,
            "data/samples" => &mut count,
            _ => continue,
        };
        assert!(into.insert(key, value).is_none(), "step {key:?} recorded twice");
    }
    let read = first.iter().map(|(key, f)| (*key, *f..*f + count[key])).collect();
    (pause_step, read)
}

/// Every global sample from 0 on was read exactly once.
fn assert_no_gap_no_repeat(read: &BTreeMap<(u64, u64), std::ops::Range<u64>>) {
    let mut all: Vec<u64> = read.values().flat_map(|r| r.clone()).collect();
    all.sort_unstable();
    let n = all.len() as u64;
    assert_eq!(all, (0..n).collect::<Vec<u64>>(), "a gap or a repeat: {read:?}");
}

#[test]
fn pause_then_resume_at_another_world_size_reads_every_sample_once() {
    let (pause_step, read) = pause_and_rescale("pause-rescale", "");
    assert_no_gap_no_repeat(&read);
    // One sample per rank per step: W=3 up to the pause, W=2 after it.
    assert!(pause_step < PAUSED_STEPS, "the run ended before the pause took effect");
    for step in 1..=PAUSED_STEPS {
        let ranks = read.keys().filter(|(s, _)| *s == step).count();
        assert_eq!(ranks, if step <= pause_step { 3 } else { 2 }, "step {step}");
    }
    assert_eq!(read.len() as u64, 3 * pause_step + 2 * (PAUSED_STEPS - pause_step));
}

#[test]
fn a_global_batch_keeps_the_samples_per_step_across_world_sizes() {
    let (_, read) = pause_and_rescale("global-batch", "global_batch = 6");
    assert_no_gap_no_repeat(&read);
    for step in 1..=PAUSED_STEPS {
        let per_step: u64 = read
            .iter()
            .filter(|((s, _), _)| *s == step)
            .map(|(_, r)| r.end - r.start)
            .sum();
        assert_eq!(per_step, 6, "step {step}: {read:?}");
    }
}

#[test]
fn a_deleted_checkpoint_object_makes_resume_fall_back_to_the_one_before() {
    uninterrupted();
    let cluster = cluster(WORLD as usize);
    let run = cluster.submit(&spec(&cluster, "lost-object"));
    cluster.wait_for_step(&run, 11, LONG);
    assert!(cluster.cli(&["pause", &run]).status.success());
    let paused = cluster.wait_for_state(&run, &["Paused"], LONG);
    let newest = paused["checkpoints"].as_array().unwrap().last().unwrap().clone();
    let newest_step = newest["step"].as_u64().unwrap();
    let victim = newest["files"][0]["key"].as_str().unwrap();
    std::fs::remove_file(cluster.path("artifacts").join(victim)).unwrap();

    let out = cluster.cli(&["resume", &run]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let detail = completed_bit_identical(&cluster, &run);
    let events = detail["events"].as_array().unwrap();
    let unusable = events
        .iter()
        .find(|e| e["kind"] == "checkpoint-unusable")
        .unwrap_or_else(|| panic!("no checkpoint-unusable event: {detail}"));
    assert_eq!(unusable["step"].as_u64().unwrap(), newest_step);
    assert!(unusable["message"].as_str().unwrap().contains(victim), "{unusable}");
    let resumed = events.iter().rev().find(|e| e["kind"] == "resumed").unwrap();
    assert!(resumed["step"].as_u64().unwrap() < newest_step, "{resumed}");
    let marked = detail["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["step"].as_u64() == Some(newest_step));
    // The unusable record is either still marked, or was replaced when the resumed attempt
    // re-reached that step and committed a checkpoint of its own there.
    if let Some(marked) = marked {
        assert!(
            marked["unusable"].is_string() || marked["attempt"] != newest["attempt"],
            "{marked}"
        );
        if marked["attempt"] != newest["attempt"] {
            let stale = newest["files"].as_array().unwrap();
            assert!(
                stale
                    .iter()
                    .all(|f| !cluster.path("artifacts").join(f["key"].as_str().unwrap()).exists()),
                "objects of the replaced checkpoint were left behind"
            );
        }
    }
}

#[test]
fn coordinators_sharing_an_artifacts_url_never_touch_each_others_objects() {
    let first = cluster(1);
    let mut second = cluster(0);
    second.spawn_workers_with(1, &[]);
    let shared = first.path("artifacts");
    let spec_for = |c: &Cluster, name: &str| {
        let path = c.write_spec(name, 1, 6, "checkpoint_every = 2");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            &c.path("artifacts").display().to_string(),
            &shared.display().to_string(),
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let (a, b) = (
        first.submit(&spec_for(&first, "a")),
        second.submit(&spec_for(&second, "b")),
    );
    assert_ne!(a, b, "run ids must differ across coordinators");
    let da = first.wait_for_state(&a, &DONE, LONG);
    let db = second.wait_for_state(&b, &DONE, LONG);
    for (detail, run) in [(&da, &a), (&db, &b)] {
        assert_eq!(detail["run"]["state"], "Completed", "{detail}");
        // Every committed file is under the run's own prefix and still holds its hash.
        for c in detail["checkpoints"].as_array().unwrap() {
            for f in c["files"].as_array().unwrap() {
                let key = f["key"].as_str().unwrap();
                assert!(key.starts_with(&format!("runs/{run}/")), "{key}");
                let bytes = std::fs::read(shared.join(key)).unwrap();
                use sha2::Digest;
                assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), f["sha256"].as_str().unwrap());
            }
        }
    }
    let mut runs: Vec<String> = std::fs::read_dir(shared.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(runs, expected);
}

#[test]
fn five_kills_each_after_progress_spend_no_budget_and_end_bit_identical() {
    // Ordinary churn on a long run: more node losses than max_retries (3), each after the run
    // got further than ever before. The budget stops crash loops (tests/lifecycle.rs), not this.
    uninterrupted();
    let mut cluster = cluster(WORLD as usize);
    let run = cluster.submit(&spec(&cluster, "churn"));
    let mut kills = 0;
    let mut last_kill_step = 0;
    while kills < 5 {
        let attempt_before = cluster.cli_json(&["show", &run])["run"]["attempt"].as_u64().unwrap();
        cluster.wait_until("the run to get past its last interruption", LONG, || {
            let d = cluster.cli_json(&["show", &run]);
            d["run"]["state"] == "Running" && d["run"]["step"].as_u64().unwrap() >= last_kill_step + 3
                || d["run"]["state"] == "Completed"
        });
        let detail = cluster.cli_json(&["show", &run]);
        if detail["run"]["state"] == "Completed" {
            break;
        }
        last_kill_step = detail["run"]["step"].as_u64().unwrap();
        // A different worker each time: the oldest one still alive.
        cluster.kill_worker(kills);
        cluster.spawn_workers_with(1, &[]);
        kills += 1;
        cluster.wait_until("the run to be re-formed after the kill", LONG, || {
            let d = cluster.cli_json(&["show", &run]);
            d["run"]["attempt"].as_u64().unwrap() > attempt_before || d["run"]["state"] == "Completed"
        });
    }
    assert!(
        kills >= 4,
        "the run ended after {kills} kills; too short to test the budget"
    );
    let detail = completed_bit_identical(&cluster, &run);
    let budget = detail["run"]["retry_budget"].as_str().unwrap();
    assert!(budget.contains(&format!("{kills} in all")), "{budget}");
}
