//! Runs move only as the state machine allows, through the coordinator's real paths, and each
//! move leaves exactly one event in the run's log; a refused move leaves the store as it was.

use super::membership::tests::{goodbye, request, spec};
use super::*;

/// A coordinator on a temp dir with a phantom dataset, two workers and one run placed on them.
async fn placed_run(dir: &Path) -> (Arc<Coordinator>, [membership::Admitted; 2], RunRecord) {
    let opts = data::SynthOptions {
        cases: 6,
        seed: 3,
        shape: [16, 16, 16],
        ..Default::default()
    };
    data::write_phantom_dataset(&dir.join("dataset"), &opts).unwrap();
    let coord = Coordinator::open(&dir.join("db"), Timing::default()).await.unwrap();
    let a = coord.admit(request("127.0.0.1:4200")).await.unwrap();
    let b = coord.admit(request("127.0.0.1:4201")).await.unwrap();
    let run = coord.submit(&spec(dir), "transitions.toml").await.unwrap();
    let run = coord.get_run(&run.id).unwrap();
    assert_eq!(run.state(), RunState::Assigned);
    (coord, [a, b], run)
}

fn kinds(coord: &Coordinator, run_id: &str) -> Vec<String> {
    coord
        .store()
        .events(run_id)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

/// The run as stored, as JSON, and its event log.
fn stored(coord: &Coordinator, run_id: &str) -> (serde_json::Value, Vec<RunEvent>) {
    let run = coord.store().run(run_id).unwrap().unwrap();
    (
        serde_json::to_value(&run).unwrap(),
        coord.store().events(run_id).unwrap(),
    )
}

#[tokio::test]
async fn a_refused_move_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, _workers, run) = placed_run(dir.path()).await;
    let before = stored(&coord, &run.id);
    let refused = {
        let mut m = coord.lock();
        coord.end_run(&mut m, run.clone(), RunState::Completed, "no rank finished".into())
    };
    match refused {
        Err(CoordError::Rejected(message)) => {
            assert_eq!(message, format!("run {} cannot go from Assigned to Completed", run.id))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(stored(&coord, &run.id), before, "the store is untouched");
    assert_eq!(
        coord.get_run(&run.id).unwrap().state(),
        RunState::Assigned,
        "and the model"
    );
}

/// Every move of a run's life through the coordinator, one event each: placed, started, a pause
/// pending when a worker leaves (interrupted, then paused, as the user asked), resumed, placed
/// again.
#[tokio::test]
async fn each_move_of_a_run_leaves_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, [a, b], run) = placed_run(dir.path()).await;
    assert_eq!(kinds(&coord, &run.id), ["submitted", "assigned"]);
    for w in [&a, &b] {
        coord
            .await_assignment(&w.worker.id, Duration::from_secs(1))
            .await
            .unwrap();
    }
    assert_eq!(coord.get_run(&run.id).unwrap().state(), RunState::Running);
    assert_eq!(kinds(&coord, &run.id), ["submitted", "assigned", "running"]);

    coord.pause(&run.id).await.unwrap();
    assert!(coord.deregister(goodbye(&b, &b.secret, None)).await.is_ok());
    let paused = coord.get_run(&run.id).unwrap();
    assert_eq!(paused.state(), RunState::Paused, "{}", paused.message);
    assert!(paused.interruptions.is_empty(), "a pause spends no retry");
    assert_eq!(
        kinds(&coord, &run.id),
        [
            "submitted",
            "assigned",
            "running",
            "pause-requested",
            "interrupted",
            "paused"
        ]
    );

    coord.admit(request("127.0.0.1:4202")).await.unwrap();
    coord.resume(&run.id, None, false).await.unwrap();
    let resumed = coord.get_run(&run.id).unwrap();
    assert_eq!(resumed.state(), RunState::Assigned, "{}", resumed.message);
    assert_eq!(
        kinds(&coord, &run.id)[6..],
        ["resumed", "assigned"],
        "{:?}",
        kinds(&coord, &run.id)
    );
}

#[tokio::test]
async fn a_restart_puts_an_unstarted_run_back_in_the_queue_with_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, _workers, run) = placed_run(dir.path()).await;
    drop(coord);
    let coord = Coordinator::open(&dir.path().join("db"), Timing::default())
        .await
        .unwrap();
    let requeued = coord.get_run(&run.id).unwrap();
    assert_eq!(requeued.state(), RunState::Queued);
    assert_eq!(kinds(&coord, &run.id), ["submitted", "assigned", "requeued"]);
}
