//! Failure handling with real processes: a worker killed mid-run interrupts the run without
//! leaving its peer hanging, a cancelled run stops its workers, and a coordinator killed (or
//! stopped with SIGTERM) and restarted on the same store adopts the running run.

use std::time::Duration;

use crate::common::Cluster;

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
    // Whichever notices first, the coordinator (heartbeats) or the peer (its ring link), the
    // run is interrupted, not failed, and goes back to the queue by itself to wait for a gang.
    cluster.wait_until(
        "the run to be interrupted and queued again",
        Duration::from_secs(30),
        || {
            let detail = cluster.cli_json(&["show", &run_id]);
            detail["run"]["state"] == "Queued" && Cluster::event_kinds(&detail).contains(&"interrupted".to_string())
        },
    );
    let detail = cluster.cli_json(&["show", &run_id]);
    let events = detail["events"].as_array().unwrap();
    let cause = events.iter().find(|e| e["kind"] == "interrupted").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cause.contains("missed its heartbeats") || cause.contains("lost a ring peer"),
        "{detail}"
    );

    // The survivor, blocked on the dead peer, is stopped by the coordinator well before its
    // 60 s collective deadline, and takes new work once the waiting run is out of the way.
    cluster.wait_until("the surviving worker to be idle", Duration::from_secs(20), || {
        idle_count(&cluster) == 1
    });
    assert!(cluster.worker_states().iter().any(|(_, s)| s == "Dead"));
    assert!(cluster.cli(&["cancel", &run_id]).status.success());
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
    let detail = cluster.cli_json(&["show", &run_id]);
    assert_eq!(detail["run"]["state"], "Cancelled");

    // Marking workers idle in the store proves nothing about the processes. A two-rank run needs
    // both of them to have left the cancelled run's ring and taken new work; it completes only
    // if they really stopped.
    let next = cluster.submit(&cluster.write_spec("after-cancel", 2, 3, ""));
    let after = cluster.wait_for_state(&next, &ENDED, Duration::from_secs(120));
    assert_eq!(after["run"]["state"], "Completed", "{after}");
    let cancelled = cluster.cli_json(&["show", &run_id]);
    assert_eq!(cancelled["run"]["state"], "Cancelled");
    assert_eq!(
        cancelled["run"]["step"], detail["run"]["step"],
        "the cancelled run reported progress after the cancel"
    );
}

#[test]
fn a_restarted_coordinator_adopts_the_running_run_and_its_workers() {
    let (mut cluster, run_id) = cluster_with_long_run(10);
    let before = cluster.worker_states();

    cluster.kill_coordinator();
    cluster.restart_coordinator();
    let detail = cluster.cli_json(&["show", &run_id]);
    assert_eq!(detail["run"]["state"], "Running", "{detail}");
    let step = detail["run"]["step"].as_u64().unwrap();

    // The workers trained on and reattach under the ids they had; the run keeps moving.
    wait_for_progress(&cluster, &run_id, step + 4);
    assert_eq!(cluster.worker_states(), before);
    assert_eq!(cluster.cli_json(&["show", &run_id])["run"]["attempt"], 1);
    assert!(cluster.cli(&["cancel", &run_id]).status.success());
}

#[test]
fn sigterm_stops_the_coordinator_cleanly_and_the_run_survives_it() {
    let (mut cluster, run_id) = cluster_with_long_run(10);
    let mut coordinator = cluster.coordinator.take().unwrap();
    let pid = coordinator.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = coordinator.0.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM should end the coordinator cleanly: {status:?}"
    );
    cluster.restart_coordinator();
    let step = cluster.step(&run_id);
    wait_for_progress(&cluster, &run_id, step + 4);
    let detail = cluster.cli_json(&["show", &run_id]);
    assert_eq!(detail["run"]["attempt"], 1, "{}", detail["events"]);
}
