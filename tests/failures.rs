//! Failure handling with real processes: a worker killed mid-run interrupts the run without
//! leaving its peer hanging, a cancelled run stops its workers, and a coordinator killed and
//! restarted on the same store marks in-flight runs Interrupted and takes its workers back.

mod common;

use std::time::Duration;

use common::Cluster;

const ENDED: [&str; 4] = ["Completed", "Failed", "Cancelled", "Interrupted"];

fn wait_for_progress(cluster: &Cluster, run_id: &str, min_step: u64) {
    cluster.wait_until(
        &format!("{run_id} to reach step {min_step}"),
        Duration::from_secs(120),
        || {
            let detail = cluster.cli_json(&["show", run_id]);
            detail["run"]["state"] == "Running" && detail["run"]["step"].as_u64().unwrap() >= min_step
        },
    );
}

/// A coordinator, two long-lived workers and a 2-rank run that has made some progress.
fn cluster_with_long_run(dead_after_secs: u64) -> (Cluster, String) {
    let mut cluster = Cluster::start_with_dead_after(dead_after_secs);
    cluster.write_dataset(6);
    cluster.spawn_workers_with(2, &[]);
    let long = cluster.write_spec("long", 2, 100_000, "");
    let run_id = cluster.submit(&long);
    wait_for_progress(&cluster, &run_id, 2);
    (cluster, run_id)
}

fn idle_count(cluster: &Cluster) -> usize {
    cluster.worker_states().iter().filter(|(_, s)| s == "Idle").count()
}

#[test]
fn a_killed_worker_interrupts_the_run_and_its_peer_returns_to_idle() {
    let (mut cluster, run_id) = cluster_with_long_run(2);

    // SIGKILL one rank: no goodbye, only missing heartbeats.
    cluster.workers.remove(1);
    let detail = cluster.wait_for_state(&run_id, &ENDED, Duration::from_secs(30));
    assert_eq!(detail["run"]["state"], "Interrupted", "{detail}");
    // Whichever notices first, the coordinator (heartbeats) or the peer (its ring link), the
    // run is interrupted, not failed: nothing is wrong with the run itself.
    let message = detail["run"]["message"].as_str().unwrap();
    assert!(
        message.contains("missed its heartbeats") || message.contains("lost a ring peer"),
        "{detail}"
    );

    // The survivor, blocked on the dead peer, is stopped by the coordinator well before its
    // 60 s collective deadline, and takes new work.
    cluster.wait_until("the surviving worker to be idle", Duration::from_secs(20), || {
        idle_count(&cluster) == 1
    });
    assert!(cluster.worker_states().iter().any(|(_, s)| s == "Dead"));
    let short = cluster.write_spec("short", 1, 3, "");
    let next = cluster.submit(&short);
    let detail = cluster.wait_for_state(&next, &ENDED, Duration::from_secs(60));
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
}

#[test]
fn cancelling_a_running_run_stops_its_workers() {
    let (cluster, run_id) = cluster_with_long_run(10);

    let out = cluster.cli(&["cancel", &run_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.wait_until("both workers to be idle", Duration::from_secs(20), || {
        idle_count(&cluster) == 2
    });
    let stopped_at = cluster.cli_json(&["show", &run_id])["run"]["step"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let detail = cluster.cli_json(&["show", &run_id]);
    assert_eq!(detail["run"]["state"], "Cancelled");
    assert_eq!(
        detail["run"]["step"].as_u64().unwrap(),
        stopped_at,
        "training went on after the cancel"
    );
}

#[test]
fn a_restarted_coordinator_interrupts_in_flight_runs_and_takes_its_workers_back() {
    let (mut cluster, run_id) = cluster_with_long_run(10);

    cluster.kill_coordinator();
    cluster.restart_coordinator();
    let detail = cluster.cli_json(&["show", &run_id]);
    assert_eq!(detail["run"]["state"], "Interrupted", "{detail}");
    assert!(
        detail["run"]["message"]
            .as_str()
            .unwrap()
            .contains("coordinator restarted")
    );

    // Both workers notice, drop the stale run, register again and are usable.
    cluster.wait_until("both workers to re-register", Duration::from_secs(30), || {
        idle_count(&cluster) == 2
    });
    let short = cluster.write_spec("after-restart", 2, 3, "");
    let next = cluster.submit(&short);
    let detail = cluster.wait_for_state(&next, &ENDED, Duration::from_secs(60));
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
}
