//! The run state machine: the states a run goes through, the moves between them, and
//! `RunRecord::transition`, the one way a run's state changes. It checks the move and adds the
//! event that records it to the record, and the store writes that event in the transaction that
//! writes the new state (see `store::Store::put_transition`). `RunRecord::state` is private to
//! this module and its parent, so no other code can set it.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{RunEvent, RunRecord, now_unix_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Queued,
    /// A gang of workers is reserved; they have not all picked the assignment up yet.
    Assigned,
    Running,
    /// Stopped on request after a checkpoint at a step boundary; `resume` queues it again.
    Paused,
    Completed,
    Failed,
    Cancelled,
    /// Lost its workers or its coordinator mid-flight; resumable from its newest checkpoint.
    Interrupted,
}

impl RunState {
    pub const ALL: [RunState; 8] = [
        RunState::Queued,
        RunState::Assigned,
        RunState::Running,
        RunState::Paused,
        RunState::Completed,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Interrupted,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, RunState::Completed | RunState::Failed | RunState::Cancelled)
    }

    /// Holds workers: the run is between assignment and its end.
    pub fn is_active(self) -> bool {
        matches!(self, RunState::Assigned | RunState::Running)
    }

    /// The state machine of DESIGN.md; anything else is a bug or a stale message. Failed and
    /// Cancelled runs go back to Queued only through a manual resume from a checkpoint. A run
    /// changes state only through `RunRecord::transition`, which checks this.
    pub fn can_move_to(self, next: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, next),
            (Queued, Assigned | Cancelled | Paused)
                // An assignment nobody picked up goes back to the queue.
                | (Assigned, Queued | Running)
                | (Running, Completed | Paused)
                // A worker leaving on SIGTERM drains its run: rank 0 checkpoints and the run goes
                // back to the queue from there. Nothing failed, so it is not interrupted and
                // spends no retry.
                | (Running, Queued)
                | (Assigned | Running, Failed | Cancelled | Interrupted)
                | (Interrupted, Queued | Cancelled | Failed)
                // A pause pending when the run was interrupted outlives the fault: the run stops
                // there instead of being resumed.
                | (Interrupted, Paused)
                | (Paused, Queued | Cancelled)
                | (Failed | Cancelled, Queued)
        )
    }

    /// The kind of the event that records the move from `self` to `next`.
    fn event_kind(self, next: RunState) -> &'static str {
        use RunState::*;
        match (self, next) {
            // Back in the queue straight from a placement (unstarted, or drained): the run never
            // stopped, so nothing is resumed.
            (Assigned | Running, Queued) => "requeued",
            (_, Queued) => "resumed",
            (_, Assigned) => "assigned",
            (_, Running) => "running",
            (_, Paused) => "paused",
            (_, Completed) => "completed",
            (_, Failed) => "failed",
            (_, Cancelled) => "cancelled",
            (_, Interrupted) => "interrupted",
        }
    }

    /// The state named `name` as `Display` writes it, in any case.
    pub fn from_name(name: &str) -> Option<RunState> {
        RunState::ALL
            .into_iter()
            .find(|s| s.to_string().eq_ignore_ascii_case(name))
    }

    /// States `coordinator resume` accepts (with a committed checkpoint, except Paused).
    pub fn is_resumable(self) -> bool {
        matches!(
            self,
            RunState::Paused | RunState::Interrupted | RunState::Failed | RunState::Cancelled
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A move `RunState::can_move_to` forbids; the record is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("run {run} cannot go from {from} to {to}")]
pub struct TransitionError {
    pub run: String,
    pub from: RunState,
    pub to: RunState,
}

/// Why a run changes state, as the transition's event says it: the step it concerns (where the
/// run stands, or where its next attempt starts) and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub step: u64,
    pub message: String,
}

impl Cause {
    pub fn at(step: u64, message: impl Into<String>) -> Self {
        Cause {
            step,
            message: message.into(),
        }
    }
}

impl RunRecord {
    /// A run as submitted: Queued (where the state machine starts), on no attempt yet, with no
    /// cases; the caller fills in the frozen case list it trains on.
    pub fn submitted(id: String, seq: u64, spec: &protocol::spec::RunSpec, sweep_id: Option<String>) -> Self {
        let now = now_unix_ms();
        RunRecord {
            id,
            name: spec.name.clone(),
            spec_toml: spec.to_toml(),
            state: RunState::Queued,
            world_size: spec.world_size,
            total_steps: spec.train.steps,
            step: 0,
            message: String::new(),
            submitted_unix_ms: now,
            updated_unix_ms: now,
            workers: vec![],
            started_ranks: vec![],
            manifest_id: String::new(),
            train_count: 0,
            eval_count: 0,
            quarantined: vec![],
            legacy_train_cases: vec![],
            legacy_eval_cases: vec![],
            artifacts_url: spec.artifacts.url.clone(),
            finished: Default::default(),
            final_checkpoint: None,
            attempt: 0,
            max_retries: spec.max_retries,
            interruptions: vec![],
            interrupted_at_step: None,
            total_interruptions: 0,
            resume_step: None,
            pause_requested: false,
            live_state: None,
            recovering_live: false,
            priority: spec.priority,
            seq,
            device: spec.device.clone(),
            sweep_id,
            unwritten: vec![],
        }
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// The only way a run changes state. A move `can_move_to` allows sets the state and adds
    /// the event that records it to the record, for the store to write in the same transaction
    /// as the record (see `unwritten_events`); any other is refused and changes nothing.
    pub fn transition(&mut self, to: RunState, cause: Cause) -> Result<(), TransitionError> {
        let from = self.state;
        if !from.can_move_to(to) {
            return Err(TransitionError {
                run: self.id.clone(),
                from,
                to,
            });
        }
        let event = RunEvent::new(from.event_kind(to), cause.step, cause.message);
        self.state = to;
        self.updated_unix_ms = event.unix_ms;
        self.unwritten.push(event);
        Ok(())
    }

    /// Events of the transitions made to this copy that the store has not written yet, oldest
    /// first.
    pub fn unwritten_events(&self) -> &[RunEvent] {
        &self.unwritten
    }

    /// Called by the store once a transaction wrote the record with its `unwritten_events`.
    pub(crate) fn events_written(&mut self) {
        self.unwritten.clear();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::RunState::{self, *};
    use super::*;

    /// Every move the state machine allows, with the kind of the event that records it. A change
    /// to the rules has to change this table.
    const ALLOWED: [(RunState, RunState, &str); 22] = [
        (Queued, Assigned, "assigned"),
        (Queued, Paused, "paused"),
        (Queued, Cancelled, "cancelled"),
        (Assigned, Queued, "requeued"),
        (Assigned, Running, "running"),
        (Assigned, Failed, "failed"),
        (Assigned, Cancelled, "cancelled"),
        (Assigned, Interrupted, "interrupted"),
        (Running, Queued, "requeued"),
        (Running, Paused, "paused"),
        (Running, Completed, "completed"),
        (Running, Failed, "failed"),
        (Running, Cancelled, "cancelled"),
        (Running, Interrupted, "interrupted"),
        (Paused, Queued, "resumed"),
        (Paused, Cancelled, "cancelled"),
        (Interrupted, Queued, "resumed"),
        (Interrupted, Paused, "paused"),
        (Interrupted, Failed, "failed"),
        (Interrupted, Cancelled, "cancelled"),
        (Failed, Queued, "resumed"),
        (Cancelled, Queued, "resumed"),
    ];

    /// A run record in `state`, as the store would hand it back.
    pub(crate) fn run_in(id: &str, state: RunState) -> RunRecord {
        let json = format!(
            r#"{{"id":"{id}","name":"{id}","spec_toml":"","state":"{state}","world_size":1,
            "total_steps":10,"step":4,"message":"","submitted_unix_ms":0,"updated_unix_ms":0,
            "workers":[],"started_ranks":[],"artifacts_url":"","finished":{{}},"final_checkpoint":null}}"#
        );
        let run: RunRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(run.state(), state);
        run
    }

    #[test]
    fn every_pair_of_states_is_allowed_or_refused_as_the_table_says() {
        let mut allowed = 0;
        for from in RunState::ALL {
            for to in RunState::ALL {
                let expected = ALLOWED.iter().find(|(f, t, _)| (*f, *t) == (from, to));
                assert_eq!(from.can_move_to(to), expected.is_some(), "{from} -> {to}");
                let mut run = run_in("r", from);
                let before = serde_json::to_value(&run).unwrap();
                let result = run.transition(to, Cause::at(7, "why"));
                match expected {
                    Some((_, _, kind)) => {
                        allowed += 1;
                        assert_eq!(result, Ok(()), "{from} -> {to}");
                        assert_eq!(run.state(), to);
                        let events = run.unwritten_events();
                        assert_eq!(events.len(), 1, "{from} -> {to}: {events:?}");
                        assert_eq!((events[0].kind.as_str(), events[0].step), (*kind, 7));
                        assert_eq!(events[0].message, "why");
                        assert_eq!(run.updated_unix_ms, events[0].unix_ms);
                    }
                    None => {
                        let refused = TransitionError {
                            run: "r".into(),
                            from,
                            to,
                        };
                        assert_eq!(result, Err(refused), "{from} -> {to}");
                        assert_eq!(serde_json::to_value(&run).unwrap(), before, "{from} -> {to}");
                        assert!(run.unwritten_events().is_empty(), "{from} -> {to}");
                    }
                }
            }
        }
        assert_eq!(allowed, ALLOWED.len(), "the table lists each move once");
    }

    #[test]
    fn a_refusal_names_the_run_and_both_states() {
        let mut run = run_in("run-000007-abc", Completed);
        let e = run.transition(Queued, Cause::at(0, "again")).unwrap_err();
        assert_eq!(e.to_string(), "run run-000007-abc cannot go from Completed to Queued");
    }

    #[test]
    fn moves_accumulate_their_events_in_order_until_written() {
        let mut run = run_in("r", Running);
        run.transition(Interrupted, Cause::at(4, "lost a peer")).unwrap();
        run.transition(Paused, Cause::at(4, "a pause was pending")).unwrap();
        let kinds: Vec<&str> = run.unwritten_events().iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["interrupted", "paused"]);
        // The events are never part of the stored record itself.
        let stored: RunRecord = serde_json::from_value(serde_json::to_value(&run).unwrap()).unwrap();
        assert_eq!(stored.state(), Paused);
        assert!(stored.unwritten_events().is_empty());
        run.events_written();
        assert!(run.unwritten_events().is_empty());
    }
}
