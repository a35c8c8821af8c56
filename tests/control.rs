//! The coordinator's control plane over real gRPC, with the test acting as the workers: the
//! assignment cycle, gang scheduling, divergence detection, cancellation, and spec validation.

use std::time::Duration;

use crate::common::{Cluster, fake_worker, poll, worker_client_request};
use protocol::auth::AuthChannel;
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use protocol::pb::worker_service_client::WorkerServiceClient;

async fn told_to_stop(client: &mut WorkerServiceClient<AuthChannel>, req: pb::ReportMetricsRequest) -> bool {
    client.report_metrics(req).await.unwrap().into_inner().stop_run
}

async fn state(cluster: &Cluster, run_id: &str) -> pb::RunInfo {
    let req = pb::GetRunRequest { run_id: run_id.into() };
    cluster
        .control()
        .await
        .get_run(req)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
}

#[tokio::test]
async fn gang_assignment_cycle_and_checksum_divergence() {
    let cluster = Cluster::start();
    cluster.write_dataset(5);
    let spec = cluster.write_spec("cycle", 2, 4, "");
    let (mut w0, id0) = fake_worker(&cluster, "127.0.0.1:9").await;
    let run_id = cluster.submit(&spec);

    // One worker is not a gang of two: the run stays queued and the poll times out idle.
    assert!(matches!(poll(&mut w0, &id0, 300).await, Some(Outcome::Idle(_))));
    assert_eq!(state(&cluster, &run_id).await.state, "Queued");

    let (mut w1, id1) = fake_worker(&cluster, "127.0.0.1:10").await;
    let Some(Outcome::Assignment(a0)) = poll(&mut w0, &id0, 5000).await else {
        panic!("no assignment for rank 0")
    };
    assert_eq!(
        state(&cluster, &run_id).await.state,
        "Assigned",
        "not every rank has picked up its assignment"
    );
    let Some(Outcome::Assignment(a1)) = poll(&mut w1, &id1, 5000).await else {
        panic!("no assignment for rank 1")
    };
    assert_eq!((a0.rank, a1.rank, a0.world_size), (0, 1, 2));
    assert_eq!(a0.peers, ["127.0.0.1:9", "127.0.0.1:10"]);
    // Case lists travel as a frozen manifest and two counts, the same for every rank.
    assert_eq!(a0.manifest_id, a1.manifest_id);
    assert_eq!((a0.train_count, a0.eval_count), (3, 2));
    let manifest = w0
        .get_manifest(pb::GetManifestRequest {
            manifest_id: a0.manifest_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(manifest.cases.len(), 5);
    assert_eq!(state(&cluster, &run_id).await.state, "Running");

    // Matching checksums are fine; a mismatch fails the run and tells the ranks to stop.
    let report = |worker_id: &str, rank: u32, step: u64, sha: &str| pb::ReportMetricsRequest {
        worker_id: worker_id.into(),
        run_id: run_id.clone(),
        rank,
        metrics: vec![pb::Metric {
            rank,
            step,
            name: "train/loss".into(),
            value: 1.0,
            unix_ms: 0,
        }],
        checksums: vec![pb::WeightsChecksum {
            step,
            // 64 hex characters, the shape of a SHA-256; the coordinator refuses any other.
            sha256: sha.repeat(16),
        }],
        attempt: 1,
    };
    assert!(!told_to_stop(&mut w0, report(&id0, 0, 1, "aaaa")).await);
    assert!(!told_to_stop(&mut w1, report(&id1, 1, 1, "aaaa")).await);
    assert!(!told_to_stop(&mut w0, report(&id0, 0, 2, "bbbb")).await);
    let resp = w1
        .report_metrics(report(&id1, 1, 2, "cccc"))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.stop_run);
    assert!(resp.stop_reason.contains("diverged"), "{}", resp.stop_reason);
    let run = state(&cluster, &run_id).await;
    assert_eq!(run.state, "Failed");
    assert!(run.message.contains("step 2"), "{}", run.message);

    // The other rank learns of it through its heartbeat, and both workers are idle again.
    let hb = pb::HeartbeatRequest {
        worker_id: id0.clone(),
        run_id: run_id.clone(),
        step: 2,
        attempt: 1,
    };
    assert!(w0.heartbeat(hb).await.unwrap().into_inner().stop_run);
    let workers = cluster
        .control()
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(workers.iter().all(|w| w.state == "Idle"), "{workers:?}");
}

#[tokio::test]
async fn cancel_frees_the_gang() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);
    let spec = cluster.write_spec("to-cancel", 1, 1000, "");
    let (mut w0, id0) = fake_worker(&cluster, "127.0.0.1:9").await;
    let run_id = cluster.submit(&spec);
    assert!(matches!(poll(&mut w0, &id0, 5000).await, Some(Outcome::Assignment(_))));
    assert_eq!(state(&cluster, &run_id).await.state, "Running");

    let out = cluster.cli(&["cancel", &run_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(state(&cluster, &run_id).await.state, "Cancelled");
    let hb = pb::HeartbeatRequest {
        worker_id: id0.clone(),
        run_id: run_id.clone(),
        step: 5,
        attempt: 1,
    };
    assert!(w0.heartbeat(hb).await.unwrap().into_inner().stop_run);

    // A second cancel is refused with the reason; an unknown run is "not found".
    let again = cluster.cli(&["cancel", &run_id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"));
    let missing = cluster.cli(&["show", "run-999999-00000000"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    // The freed worker takes the next queued run.
    let next = cluster.submit(&spec);
    let Some(Outcome::Assignment(a)) = poll(&mut w0, &id0, 5000).await else {
        panic!("freed worker got no work")
    };
    assert_eq!(a.run_id, next);
}

#[tokio::test]
async fn bad_specs_are_rejected_with_the_field_named() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);

    // Client side: the CLI validates before it sends, naming file and field.
    let bad_patch = cluster.write_spec("bad-patch", 1, 5, "").to_str().unwrap().to_string();
    let text = std::fs::read_to_string(&bad_patch)
        .unwrap()
        .replace("patch = [16, 16, 16]", "patch = [16, 15, 16]");
    std::fs::write(&bad_patch, text).unwrap();
    let out = cluster.cli(&["submit", &bad_patch]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("train.patch") && stderr.contains("bad-patch.toml"),
        "{stderr}"
    );

    let typo = cluster.write_spec("typo", 1, 5, "learning_rate = 0.1");
    let out = cluster.cli(&["submit", typo.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("learning_rate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Server side: a hand-rolled client gets InvalidArgument naming the field.
    let good = std::fs::read_to_string(cluster.write_spec("good", 1, 5, "")).unwrap();
    let mut control = cluster.control().await;
    let req = |spec: String| pb::SubmitRunRequest {
        spec_toml: spec,
        source_name: "rpc.toml".into(),
    };
    let err = control
        .submit_run(req(good.replace("world_size = 1", "world_size = 0")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("world_size") && err.message().contains("rpc.toml"),
        "{}",
        err.message()
    );

    // The dataset must hold enough cases for the requested split.
    let err = control
        .submit_run(req(good.replace("eval_cases = 2", "eval_cases = 2\ntrain_cases = 50")))
        .await
        .unwrap_err();
    assert!(err.message().contains("dataset.train_cases"), "{}", err.message());

    // Nothing was stored for any rejected spec.
    let runs = control
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(runs.is_empty(), "{runs:?}");
}

#[tokio::test]
async fn metrics_follow_ends_when_the_run_ends() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);
    let spec = cluster.write_spec("follow", 1, 3, "");
    let (mut w0, id0) = fake_worker(&cluster, "127.0.0.1:9").await;
    let run_id = cluster.submit(&spec);
    assert!(matches!(poll(&mut w0, &id0, 5000).await, Some(Outcome::Assignment(_))));
    let mut follow = cluster
        .control()
        .await
        .stream_metrics(pb::StreamMetricsRequest {
            run_id: run_id.clone(),
            follow: true,
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let point = pb::Metric {
        rank: 0,
        step: 1,
        name: "train/loss".into(),
        value: 0.5,
        unix_ms: 1,
    };
    let req = pb::ReportMetricsRequest {
        worker_id: id0.clone(),
        run_id: run_id.clone(),
        rank: 0,
        metrics: vec![point],
        checksums: vec![],
        attempt: 1,
    };
    w0.report_metrics(req).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), follow.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.metric.unwrap().value, 0.5);
    let fail = pb::ReportFailureRequest {
        worker_id: id0,
        run_id: run_id.clone(),
        rank: 0,
        message: "disk full".into(),
        attempt: 1,
        ..Default::default()
    };
    w0.report_failure(fail).await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(5), follow.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(last.run_state, "Failed");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), follow.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    assert!(state(&cluster, &run_id).await.message.contains("disk full"));
}

#[tokio::test]
async fn requests_without_the_shared_token_are_refused() {
    let cluster = Cluster::start();
    cluster.write_dataset(4);

    // No token at all: refused before any handler runs, for the CLI API and the worker API.
    let mut bare = pb::control_service_client::ControlServiceClient::connect(cluster.endpoint.clone())
        .await
        .unwrap();
    let err = bare.list_runs(pb::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("VOXELFLEET_TOKEN"), "{}", err.message());
    let mut bare_worker = WorkerServiceClient::connect(cluster.endpoint.clone()).await.unwrap();
    let err = bare_worker
        .register(worker_client_request("127.0.0.1:9"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // A wrong token through the CLI: a clear message, and nothing submitted.
    let spec = cluster.write_spec("intruder", 1, 5, "");
    let out = std::process::Command::new(crate::common::BIN)
        .args(["submit", spec.to_str().unwrap(), "--coordinator", &cluster.endpoint])
        .env(protocol::auth::TOKEN_ENV, "not-the-right-token-at-all")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("wrong bearer token"), "{stderr}");
    let runs = cluster
        .control()
        .await
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(runs.is_empty());
}

#[tokio::test]
async fn an_assignment_nobody_picks_up_goes_back_to_the_queue_at_no_cost() {
    let cluster = Cluster::start_with_dead_after(2);
    cluster.write_dataset(4);
    let spec = cluster.write_spec("unpicked", 2, 1000, "");
    let (mut w0, id0) = fake_worker(&cluster, "127.0.0.1:9").await;
    let (_w1, _id1) = fake_worker(&cluster, "127.0.0.1:10").await;
    let run_id = cluster.submit(&spec);
    // Rank 0 picks its assignment up and keeps heartbeating; rank 1's worker has died after its
    // last heartbeat and never polls.
    let Some(Outcome::Assignment(a0)) = poll(&mut w0, &id0, 5000).await else {
        panic!("no assignment for rank 0")
    };
    assert_eq!(a0.attempt, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let heartbeat = pb::HeartbeatRequest {
        worker_id: id0.clone(),
        run_id: run_id.clone(),
        step: 0,
        attempt: 1,
    };
    let run = loop {
        w0.heartbeat(heartbeat.clone()).await.unwrap();
        let run = state(&cluster, &run_id).await;
        if run.state == "Queued" {
            break run;
        }
        assert!(std::time::Instant::now() < deadline, "still {} after 15 s", run.state);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Rank 0 still believes it holds the assignment: its next heartbeat must stop it, or it
    // would train alone on a run that went back to the queue.
    let told = w0.heartbeat(heartbeat).await.unwrap().into_inner();
    assert!(
        told.stop_run,
        "rank 0 of the requeued run was not told to stop: {told:?}"
    );
    assert!(told.stop_reason.contains(&run_id), "{told:?}");
    // Not an interruption: the retry budget is untouched, and no interrupted event was written.
    assert_eq!(run.retries, 0, "{run:?}");
    let detail = cluster.cli_json(&["show", &run_id]);
    let kinds = Cluster::event_kinds(&detail);
    assert!(kinds.contains(&"requeued".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"interrupted".to_string()), "{kinds:?}");
    // The stale attempt is told to stop at its next heartbeat.
    let hb = pb::HeartbeatRequest {
        worker_id: id0.clone(),
        run_id: run_id.clone(),
        step: 0,
        attempt: 1,
    };
    let resp = w0.heartbeat(hb).await.unwrap().into_inner();
    assert!(resp.stop_run, "{resp:?}");
}
