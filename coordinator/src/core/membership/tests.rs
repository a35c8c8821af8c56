//! Identity (secrets) and leaving (deregistration, drains) against a real coordinator on a
//! temp-dir store, with real checkpoint files.

use super::*;
use crate::core::Timing;

pub(in crate::core) fn request(peer: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        host: "h".into(),
        peer_address: peer.into(),
        device_kind: "cpu".into(),
        ..Default::default()
    }
}

fn again(admitted: &Admitted, peer: &str, secret: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_id: admitted.worker.id.clone(),
        worker_secret: secret.into(),
        ..request(peer)
    }
}

fn peer_of(coord: &Coordinator, id: &str) -> Option<String> {
    coord.workers().into_iter().find(|w| w.id == id).map(|w| w.peer_address)
}

fn denied(result: Result<Admitted>) -> String {
    match result {
        Err(CoordError::Denied(message)) => message,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(a) => panic!("expected a refusal, got {} admitted", a.worker.id),
    }
}

/// Issue 18, item 8: a raw Register reusing a live worker's id with the peer address
/// 127.0.0.1:1 was accepted and moved the worker there.
#[tokio::test]
async fn a_live_id_is_not_taken_over_without_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Timing::default()).await.unwrap();
    let live = coord.admit(request("127.0.0.1:4100")).await.unwrap();
    assert_eq!(live.secret.len(), 32, "{}", live.secret);
    assert!(live.secret.bytes().all(|b| b.is_ascii_hexdigit()));

    let message = denied(coord.admit(again(&live, "127.0.0.1:1", "")).await);
    assert!(
        message.contains(&live.worker.id) && message.contains("worker_secret"),
        "{message}"
    );
    denied(coord.admit(again(&live, "127.0.0.1:1", &"0".repeat(32))).await);
    assert_eq!(peer_of(&coord, &live.worker.id).as_deref(), Some("127.0.0.1:4100"));

    // The process holding the secret reattaches (a blip, a new address), keeping it.
    let back = coord.admit(again(&live, "127.0.0.1:4101", &live.secret)).await.unwrap();
    assert_eq!(
        (back.worker.id.as_str(), back.secret.as_str()),
        (live.worker.id.as_str(), live.secret.as_str())
    );
    assert_eq!(peer_of(&coord, &live.worker.id).as_deref(), Some("127.0.0.1:4101"));
    let stored = coord.store().worker(&live.worker.id).unwrap().unwrap();
    assert_eq!(stored.secret_sha256, digest(&live.secret), "only the hash is stored");

    // A restarted coordinator knows the secret from its store: workers reattach as before,
    // and the id is still not anyone's for the asking.
    drop(coord);
    let coord = Coordinator::open(dir.path(), Timing::default()).await.unwrap();
    denied(coord.admit(again(&live, "127.0.0.1:1", "")).await);
    let back = coord.admit(again(&live, "127.0.0.1:4101", &live.secret)).await.unwrap();
    assert_eq!(back.worker.id, live.worker.id);
}

#[tokio::test]
async fn a_dead_id_comes_back_only_with_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        heartbeat_interval: Duration::from_millis(20),
        dead_after: Duration::from_millis(50),
        forget_dead_after: Duration::from_secs(3600),
    };
    let coord = Coordinator::open(dir.path(), timing).await.unwrap();
    let gone = coord.admit(request("127.0.0.1:4100")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    coord.reap_dead_workers().await.unwrap();
    let state = |id: &str| coord.workers().into_iter().find(|w| w.id == id).map(|w| w.state);
    assert_eq!(state(&gone.worker.id), Some(WorkerState::Dead));

    // Someone else naming the dead id is a new worker, not the dead one revived.
    let other = coord.admit(again(&gone, "127.0.0.1:1", "")).await.unwrap();
    assert_ne!(other.worker.id, gone.worker.id);
    assert_eq!(state(&gone.worker.id), Some(WorkerState::Dead));
    let revived = coord.admit(again(&gone, "127.0.0.1:4100", &gone.secret)).await.unwrap();
    assert_eq!(revived.worker.id, gone.worker.id);
    assert_eq!(state(&gone.worker.id), Some(WorkerState::Idle));
}

/// A record an older build wrote has no secret: its next registration is accepted and
/// issued one, which every later one must show.
#[tokio::test]
async fn a_record_from_before_secrets_is_issued_one_once() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Timing::default()).await.unwrap();
    let old = coord.admit(request("127.0.0.1:4100")).await.unwrap();
    let mut record = coord.store().worker(&old.worker.id).unwrap().unwrap();
    record.secret_sha256.clear();
    coord.store().put_worker(&record).unwrap();
    coord.store().durable().await.unwrap();
    drop(coord);
    let coord = Coordinator::open(dir.path(), Timing::default()).await.unwrap();
    let upgraded = coord.admit(again(&old, "127.0.0.1:4100", "")).await.unwrap();
    assert_eq!(upgraded.worker.id, old.worker.id);
    assert_eq!(upgraded.secret.len(), 32);
    denied(coord.admit(again(&old, "127.0.0.1:1", "")).await);
    denied(coord.admit(again(&old, "127.0.0.1:1", &old.secret)).await);
    coord
        .admit(again(&old, "127.0.0.1:4100", &upgraded.secret))
        .await
        .unwrap();
}

pub(in crate::core) fn goodbye(admitted: &Admitted, secret: &str, run: Option<(&str, u32)>) -> pb::DeregisterRequest {
    pb::DeregisterRequest {
        worker_id: admitted.worker.id.clone(),
        worker_secret: secret.into(),
        run_id: run.map(|(id, _)| id.to_string()).unwrap_or_default(),
        attempt: run.map_or(0, |(_, a)| a),
        reason: "SIGTERM".into(),
    }
}

/// Issue 18, item 9: an idle worker on SIGTERM is offered no more work; only its own
/// process can take it off.
#[tokio::test]
async fn an_idle_worker_that_deregisters_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Timing::default()).await.unwrap();
    let w = coord.admit(request("127.0.0.1:4100")).await.unwrap();
    match coord.deregister(goodbye(&w, "", None)).await {
        Err(CoordError::Denied(m)) => assert!(m.contains("worker_secret"), "{m}"),
        other => panic!("deregistered without the secret: {other:?}"),
    }
    assert!(peer_of(&coord, &w.worker.id).is_some());
    assert!(!coord.deregister(goodbye(&w, &w.secret, None)).await.unwrap());
    assert!(peer_of(&coord, &w.worker.id).is_none(), "forgotten, in memory");
    assert!(
        coord.store().worker(&w.worker.id).unwrap().is_none(),
        "and in the store"
    );
    // A second goodbye (a retry after a lost answer) is harmless.
    assert!(!coord.deregister(goodbye(&w, &w.secret, None)).await.unwrap());
}

pub(in crate::core) fn spec(dir: &std::path::Path) -> String {
    format!(
        r#"name = "drain"
world_size = 2
seed = 11

[dataset]
url = "{dataset}"
eval_cases = 2

[model]
arch = "unet"
base_width = 4
depth = 2

[train]
steps = 1000
patch = [16, 16, 16]
lr = 0.003
warmup_steps = 1

[artifacts]
url = "{artifacts}"
"#,
        dataset = dir.join("dataset").display(),
        artifacts = dir.join("artifacts").display(),
    )
}

/// Writes a one-file checkpoint of `run` where rank 0 would, and the commit naming it.
fn checkpoint(dir: &std::path::Path, run: &RunRecord, worker: &str, step: u64) -> pb::CommitCheckpointRequest {
    let key = format!(
        "{}model.bin",
        crate::verify::checkpoint_prefix(&run.id, step, run.attempt)
    );
    let bytes = format!("weights at {step}").into_bytes();
    let path = dir.join("artifacts").join(&key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    pb::CommitCheckpointRequest {
        worker_id: worker.into(),
        run_id: run.id.clone(),
        step,
        files: vec![pb::CheckpointFile {
            key,
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
        }],
        is_final: false,
        attempt: run.attempt,
        ..Default::default()
    }
}

fn beat(coord: &Coordinator, worker: &str, run: &RunRecord) -> pb::HeartbeatResponse {
    coord
        .heartbeat(pb::HeartbeatRequest {
            worker_id: worker.into(),
            run_id: run.id.clone(),
            step: 0,
            attempt: run.attempt,
        })
        .unwrap()
}

/// Issue 18, item 9: a worker holding a rank deregisters; rank 0 is told to checkpoint, the
/// commit puts the run back in the queue without spending a retry, and its next attempt
/// goes to other workers.
#[tokio::test]
async fn a_leaving_rank_drains_its_run_into_the_queue_and_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let opts = data::SynthOptions {
        cases: 6,
        seed: 3,
        shape: [16, 16, 16],
        ..Default::default()
    };
    data::write_phantom_dataset(&dir.path().join("dataset"), &opts).unwrap();
    let coord = Coordinator::open(&dir.path().join("db"), Timing::default())
        .await
        .unwrap();
    let a = coord.admit(request("127.0.0.1:4100")).await.unwrap();
    let b = coord.admit(request("127.0.0.1:4101")).await.unwrap();
    let run = coord.submit(&spec(dir.path()), "drain.toml").await.unwrap();
    for w in [&a, &b] {
        let got = coord
            .await_assignment(&w.worker.id, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(matches!(
            got.outcome,
            Some(pb::await_assignment_response::Outcome::Assignment(_))
        ));
    }
    let run = coord.get_run(&run.id).unwrap();
    assert_eq!(run.state(), RunState::Running);
    let (rank0, rank1) = if run.workers[0] == a.worker.id {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(!beat(&coord, &rank0.worker.id, &run).pause_run);

    // Rank 1 leaves. Naming the run takes the secret like any other goodbye.
    assert!(
        coord
            .deregister(goodbye(rank1, "", Some((&run.id, run.attempt))))
            .await
            .is_err()
    );
    assert!(
        coord
            .deregister(goodbye(rank1, &rank1.secret, Some((&run.id, run.attempt))))
            .await
            .unwrap()
    );
    assert!(
        beat(&coord, &rank0.worker.id, &run).pause_run,
        "rank 0 checkpoints at the next step"
    );
    assert!(!beat(&coord, &rank1.worker.id, &run).pause_run);
    assert_eq!(coord.get_run(&run.id).unwrap().state(), RunState::Running);

    let resp = coord
        .commit_checkpoint(checkpoint(dir.path(), &run, &rank0.worker.id, 7))
        .await
        .unwrap();
    assert!(resp.stop_run, "{resp:?}");
    let requeued = coord.get_run(&run.id).unwrap();
    assert_eq!(requeued.state(), RunState::Queued, "{}", requeued.message);
    assert_eq!(requeued.resume_step, Some(7));
    assert!(
        requeued.interruptions.is_empty(),
        "no retry spent: {:?}",
        requeued.interruptions
    );
    assert!(requeued.message.contains(&rank1.worker.id), "{}", requeued.message);
    // Both ranks are told to stop.
    assert!(beat(&coord, &rank0.worker.id, &run).stop_run);
    assert!(beat(&coord, &rank1.worker.id, &run).stop_run);

    // A new worker joins: the next attempt takes it and rank 0, never the leaving worker.
    let c = coord.admit(request("127.0.0.1:4102")).await.unwrap();
    let placed = coord.get_run(&run.id).unwrap();
    assert_eq!(placed.state(), RunState::Assigned);
    assert_eq!(placed.attempt, run.attempt + 1);
    let mut gang = placed.workers.clone();
    gang.sort();
    let mut expected = vec![rank0.worker.id.clone(), c.worker.id.clone()];
    expected.sort();
    assert_eq!(gang, expected);

    // Stopped, the leaving worker says goodbye again, idle, and is forgotten.
    assert!(!coord.deregister(goodbye(rank1, &rank1.secret, None)).await.unwrap());
    assert!(peer_of(&coord, &rank1.worker.id).is_none());
}
