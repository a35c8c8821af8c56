//! A run's state and the event that records its change reach sled together: one transaction
//! per write, the transition's event exactly once, and nothing from a refused move.

use std::sync::atomic::Ordering;

use super::*;
use crate::records::{Cause, RunState, run_in};

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// The run as stored, as JSON, and its event log.
fn stored(store: &Store, id: &str) -> (serde_json::Value, Vec<RunEvent>) {
    let run = store.run(id).unwrap().unwrap();
    (serde_json::to_value(&run).unwrap(), store.events(id).unwrap())
}

#[test]
fn each_allowed_transition_writes_one_event_in_the_write_of_its_state() {
    let (_dir, store) = open();
    let mut moves = 0;
    for from in RunState::ALL {
        for to in RunState::ALL.into_iter().filter(|to| from.can_move_to(*to)) {
            let id = format!("run-{from}-{to}");
            let mut run = run_in(&id, from);
            store.put_transition(&mut run, &[], &[]).unwrap();
            assert!(store.events(&id).unwrap().is_empty());

            run.transition(to, Cause::at(3, format!("{from} to {to}"))).unwrap();
            let writes = store.durability.written.load(Ordering::SeqCst);
            store.put_transition(&mut run, &[], &[]).unwrap();
            assert_eq!(
                store.durability.written.load(Ordering::SeqCst),
                writes + 1,
                "one transaction"
            );
            assert_eq!(store.run(&id).unwrap().unwrap().state(), to);
            let events = store.events(&id).unwrap();
            assert_eq!(events.len(), 1, "{from} -> {to}: {events:?}");
            assert_eq!(
                (events[0].step, events[0].message.as_str()),
                (3, &*format!("{from} to {to}"))
            );
            assert!(run.unwritten_events().is_empty(), "marked written");

            // Written once: the record written again adds no event.
            store.put_transition(&mut run, &[], &[]).unwrap();
            assert_eq!(store.events(&id).unwrap().len(), 1, "{from} -> {to}");
            moves += 1;
        }
    }
    assert_eq!(moves, 22);
}

#[test]
fn a_refused_transition_leaves_the_store_as_it_was() {
    let (_dir, store) = open();
    let mut run = run_in("run-done", RunState::Completed);
    store
        .put_transition(&mut run, &[], &[RunEvent::new("completed", 4, "done")])
        .unwrap();
    let before = stored(&store, "run-done");
    for to in RunState::ALL {
        assert!(run.transition(to, Cause::at(4, "again")).is_err(), "Completed -> {to}");
    }
    // Even a caller that writes the record anyway changes nothing.
    store.put_transition(&mut run, &[], &[]).unwrap();
    assert_eq!(stored(&store, "run-done"), before);
}

#[test]
fn a_writes_own_events_come_first_then_those_of_its_transitions() {
    // As a checkpoint commit that pauses the run: the commit's events, then the pause, and a
    // pause after an interruption as two moves, each with its own event.
    let (_dir, store) = open();
    let mut run = run_in("run-x", RunState::Running);
    store.put_transition(&mut run, &[], &[]).unwrap();
    run.transition(RunState::Interrupted, Cause::at(4, "lost a peer"))
        .unwrap();
    run.transition(RunState::Paused, Cause::at(4, "a pause was pending"))
        .unwrap();
    let own = RunEvent::new("checkpoint", 4, "committed");
    store.put_transition(&mut run, &[], &[own]).unwrap();
    let kinds: Vec<String> = store.events("run-x").unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["checkpoint", "interrupted", "paused"]);
    assert_eq!(store.run("run-x").unwrap().unwrap().state(), RunState::Paused);
}
