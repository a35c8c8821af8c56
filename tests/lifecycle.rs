//! The run lifecycle under faults that must not cost the user work or intent, against a real
//! coordinator process: a coordinator that stalls (SIGSTOP) does not kill its runs; an
//! interrupted run keeps its place in the queue; a pending pause outlives an interruption; a
//! resume never throws steps away unasked; and the retry budget stops a crash loop, not a run
//! that keeps making progress. Ranks are played over the real worker API where a test needs to
//! choose exactly when a rank fails and at which step.

use std::process::Command;
use std::time::Duration;

use crate::common::{Cluster, fake_worker, poll};
use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use protocol::pb::worker_service_client::WorkerServiceClient;

type Client = WorkerServiceClient<AuthChannel>;

const LONG: Duration = Duration::from_secs(300);

/// The next assignment for `worker`, which must come within a few seconds.
async fn assignment(client: &mut Client, worker: &str) -> pb::Assignment {
    for _ in 0..20 {
        if let Some(Outcome::Assignment(a)) = poll(client, worker, 1000).await {
            return a;
        }
    }
    panic!("no assignment for {worker}");
}

/// Rank `a.rank` reports that it completed `step`.
async fn report_step(client: &mut Client, worker: &str, a: &pb::Assignment, step: u64) {
    let req = pb::ReportMetricsRequest {
        worker_id: worker.into(),
        run_id: a.run_id.clone(),
        rank: a.rank,
        attempt: a.attempt,
        metrics: vec![pb::Metric {
            rank: a.rank,
            step,
            name: "train/loss".into(),
            value: 1.0,
            unix_ms: 0,
        }],
        checksums: vec![],
    };
    let resp = client.report_metrics(req).await.unwrap().into_inner();
    assert!(!resp.stop_run, "{}", resp.stop_reason);
}

/// Rank `a.rank` loses its ring peer: the run is interrupted (resumable), as when a node dies.
async fn lose_peer(client: &mut Client, worker: &str, a: &pb::Assignment) {
    let req = pb::ReportFailureRequest {
        worker_id: worker.into(),
        run_id: a.run_id.clone(),
        rank: a.rank,
        attempt: a.attempt,
        message: "link to rank 1 closed".into(),
        peer_lost: true,
        ..Default::default()
    };
    client.report_failure(req).await.unwrap();
}

fn state(cluster: &Cluster, run: &str) -> serde_json::Value {
    cluster.cli_json(&["show", run])["run"].clone()
}

#[tokio::test]
async fn interruptions_after_progress_spend_no_budget_and_a_crash_loop_does() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);
    let spec = cluster.write_spec_with("churn", 1, 1000, "max_retries = 2", "");
    let run = cluster.submit(&spec);
    let (mut client, worker) = fake_worker(&cluster, "127.0.0.1:11").await;

    // Five node losses, each after the run got further than ever before: torchft's routine
    // churn. More than max_retries = 2, and the run goes on.
    for (i, step) in [10, 24, 28, 35, 41].into_iter().enumerate() {
        let a = assignment(&mut client, &worker).await;
        assert_eq!(a.attempt as usize, i + 1);
        report_step(&mut client, &worker, &a, step).await;
        lose_peer(&mut client, &worker, &a).await;
    }
    let info = state(&cluster, &run);
    assert_ne!(info["state"], "Failed", "{info}");
    let budget = info["retry_budget"].as_str().unwrap().to_string();
    assert!(budget.starts_with("1 of 2 automatic resumes left"), "{budget}");
    assert!(budget.contains("5 in all"), "{budget}");

    // Then the same step, again and again: a crash loop. The third interruption in a row
    // without getting past step 41 spends the budget.
    for _ in 0..2 {
        let a = assignment(&mut client, &worker).await;
        report_step(&mut client, &worker, &a, 41).await;
        lose_peer(&mut client, &worker, &a).await;
    }
    let info = cluster.wait_for_state(&run, &["Failed"], Duration::from_secs(30))["run"].clone();
    let message = info["message"].as_str().unwrap();
    assert!(
        message.contains("interrupted 3 times in a row without getting past step 41")
            && message.contains("max_retries = 2"),
        "{message}"
    );
    assert_eq!(message.matches("lost a ring peer").count(), 3, "{message}");
}

#[tokio::test]
async fn a_pending_pause_survives_the_loss_of_a_worker_and_resume_never_discards_steps_unasked() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);
    let run = cluster.submit(&cluster.write_spec("pausing", 1, 1000, ""));
    let (mut client, worker) = fake_worker(&cluster, "127.0.0.1:11").await;
    let a = assignment(&mut client, &worker).await;
    report_step(&mut client, &worker, &a, 27).await;
    cluster.cli_json(&["pause", &run]);
    // The worker dies before rank 0 could write the pause checkpoint.
    lose_peer(&mut client, &worker, &a).await;
    let info = cluster.wait_for_state(&run, &["Paused", "Queued", "Assigned", "Running"], LONG)["run"].clone();
    assert_eq!(info["state"], "Paused", "the pause was dropped: {info}");
    assert!(
        info["message"].as_str().unwrap().contains("pause was pending"),
        "{info}"
    );
    // Nothing was queued behind the user's back, however long we look.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(&cluster, &run)["state"], "Paused");

    // 27 steps and no checkpoint: a plain resume would start over from step 0. Refused.
    let out = cluster.cli(&["resume", &run]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resumed from scratch unasked");
    assert!(err.contains("step 27") && err.contains("--from-scratch"), "{err}");
    assert_eq!(state(&cluster, &run)["state"], "Paused");
    // A world size of 0 is an error, not "unchanged".
    let out = cluster.cli(&["resume", &run, "--world-size", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--world-size"));
    // Asked for, it starts over.
    let resumed = cluster.cli_json(&["resume", &run, "--from-scratch"]);
    assert!(
        ["Queued", "Assigned"].contains(&resumed["state"].as_str().unwrap()),
        "{resumed}"
    );
    let a = assignment(&mut client, &worker).await;
    assert_eq!(a.resume_step, 0);
    assert!(a.resume_from.is_empty());
}

#[tokio::test]
async fn an_interrupted_run_keeps_its_place_ahead_of_runs_queued_behind_it() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);
    let first = cluster.submit(&cluster.write_spec("first", 1, 1000, ""));
    let (mut client, worker) = fake_worker(&cluster, "127.0.0.1:11").await;
    let a = assignment(&mut client, &worker).await;
    assert_eq!(a.run_id, first);
    report_step(&mut client, &worker, &a, 3).await;
    let behind = cluster.submit(&cluster.write_spec("behind", 1, 1000, ""));
    // The worker is freed by the interruption and asks for work at once, before the automatic
    // resume has queued the interrupted run again: the run behind it must not get it.
    lose_peer(&mut client, &worker, &a).await;
    let next = assignment(&mut client, &worker).await;
    assert_eq!(
        next.run_id, first,
        "a run queued behind the interrupted one took its worker"
    );
    assert_eq!(state(&cluster, &behind)["state"], "Queued");
}

#[test]
fn a_coordinator_that_stalls_does_not_kill_its_runs() {
    // Workers are dead after 2 s of silence; the coordinator is stopped for three times that,
    // as a GC pause, a VM hiccup or a stalled disk would stop it.
    let mut cluster = Cluster::start_with_dead_after(2);
    cluster.write_dataset(6);
    cluster.spawn_workers_with(2, &[]);
    let run = cluster.submit(&cluster.write_spec("stalled", 2, 100, ""));
    cluster.wait_for_step(&run, 3, LONG);
    let pid = cluster.coordinator.as_ref().unwrap().0.id().to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    std::thread::sleep(Duration::from_secs(6));
    signal("-CONT");
    let detail = cluster.wait_for_state(&run, &["Completed", "Failed", "Cancelled"], LONG);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    let kinds = Cluster::event_kinds(&detail);
    assert!(!kinds.contains(&"interrupted".to_string()), "{kinds:?}");
    assert_eq!(detail["run"]["attempt"], 1, "{detail}");
    assert_eq!(detail["run"]["retries"], 0, "{detail}");
}
