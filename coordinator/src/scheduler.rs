//! Gang scheduling with priorities, reservation and backfill. Pure: it reads the queue and the
//! workers and says what to place where, and why each run that stays queued waits; the caller
//! records the placements.
//!
//! - The queue is ordered by priority (higher first), then first in, first out.
//! - A run needs all `world_size` workers at once, from one pool: workers of one device class
//!   (`cuda` or `cpu`) and one numeric fingerprint. Ranks whose kernels sum in a different order
//!   would drift apart bit by bit, and one ring never mixes CUDA and CPU workers.
//! - The first run that cannot be placed in a pool reserves that pool's idle workers, so a stream
//!   of small runs cannot starve it; later runs are backfilled only onto workers it cannot use
//!   (other pools). A run larger than any pool could ever hold reserves nothing: it would block
//!   the pool forever.

use std::collections::BTreeMap;

use protocol::spec::device_class;

use crate::records::{RunRecord, RunState, WorkerRecord};

/// What one scheduling pass decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Run id and its gang, index = rank.
    pub placements: Vec<(String, Vec<String>)>,
    /// Runs left in the queue, with their 1-based position and why they wait.
    pub waiting: Vec<Waiting>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub run_id: String,
    pub position: u32,
    pub reason: String,
}

/// Device class and numeric fingerprint: the workers that may share a ring.
type PoolKey = (&'static str, String);

#[derive(Default)]
struct Pool<'a> {
    /// Alive workers of the pool, busy or idle: what the pool could ever give one run.
    capacity: usize,
    /// Idle workers not yet placed in this pass, in id order.
    idle: Vec<&'a WorkerRecord>,
    /// The run that holds this pool's idle workers in reserve, if any.
    reserved_for: Option<String>,
}

fn pool_key(w: &WorkerRecord) -> PoolKey {
    (device_class(&w.device_kind), w.numeric_fingerprint.clone())
}

/// Plans one pass. `queue` is in queue order; `idle` are the workers that may take work now
/// (idle, heartbeating, not suspected); `alive` are all workers not known dead (busy included).
/// Without `explain`, the pass stops once no idle worker is left to place, so its cost does not
/// grow with the queue; with it, every queued run gets its reason (for `coordinator runs`).
pub fn plan<'a>(
    queue: impl IntoIterator<Item = &'a RunRecord>,
    idle: &[&'a WorkerRecord],
    alive: &[&'a WorkerRecord],
    explain: bool,
) -> Plan {
    let mut pools: BTreeMap<PoolKey, Pool> = BTreeMap::new();
    for w in alive {
        pools.entry(pool_key(w)).or_default().capacity += 1;
    }
    for w in idle {
        pools.entry(pool_key(w)).or_default().idle.push(w);
    }
    for pool in pools.values_mut() {
        pool.idle.sort_by(|a, b| a.id.cmp(&b.id));
        pool.capacity = pool.capacity.max(pool.idle.len());
    }
    let mut plan = Plan::default();
    for (index, run) in queue.into_iter().enumerate() {
        let unreserved_idle: usize = pools
            .values()
            .filter(|p| p.reserved_for.is_none())
            .map(|p| p.idle.len())
            .sum();
        if !explain && unreserved_idle == 0 {
            break;
        }
        let need = run.world_size as usize;
        let wants = run.device.as_deref();
        let what = wants.map(|d| format!("{d} ")).unwrap_or_default();
        let waiting = |reason: String| Waiting {
            run_id: run.id.clone(),
            position: index as u32 + 1,
            reason,
        };
        // Pools that could ever hold this run, most idle first.
        let mut candidates: Vec<(&PoolKey, &Pool)> = pools
            .iter()
            .filter(|(key, pool)| wants.is_none_or(|d| d == key.0) && pool.capacity >= need)
            .collect();
        if candidates.is_empty() {
            let largest = pools
                .iter()
                .filter(|(key, _)| wants.is_none_or(|d| d == key.0))
                .map(|(_, p)| p.capacity)
                .max();
            let reason = match largest {
                None => format!("needs {need} {what}workers; none are registered"),
                Some(largest) => format!(
                    "needs {need} {what}workers of one kind; the largest group that can share a ring has {largest} \
                     (workers of another device or numeric fingerprint cannot join it)"
                ),
            };
            plan.waiting.push(waiting(reason));
            continue;
        }
        candidates.sort_by_key(|(_, p)| std::cmp::Reverse(p.idle.len()));
        // An interrupted run is placed only once its automatic resume has queued it again (with
        // the checkpoint it starts from); until then it holds its place and its pool's workers.
        let resuming = run.state() == RunState::Interrupted;
        let fits = candidates
            .iter()
            .find(|(_, p)| !resuming && p.reserved_for.is_none() && p.idle.len() >= need)
            .map(|(key, _)| (*key).clone());
        if let Some(key) = fits {
            let pool = pools.get_mut(&key).expect("candidate pools exist");
            let gang: Vec<String> = pool.idle.drain(..need).map(|w| w.id.clone()).collect();
            plan.placements.push((run.id.clone(), gang));
            continue;
        }
        let free = candidates
            .iter()
            .find(|(_, p)| p.reserved_for.is_none())
            .map(|(key, p)| ((*key).clone(), p.idle.len()));
        let reason = match free {
            Some((key, idle)) => {
                pools.get_mut(&key).expect("candidate pools exist").reserved_for = Some(run.id.clone());
                match idle {
                    _ if resuming => format!("interrupted; holding {idle} idle workers until its automatic resume"),
                    0 => format!("needs {need} {what}workers, none idle; next in line for them"),
                    _ => format!(
                        "needs {need} {what}workers, {idle} idle: holding them until {} more free up",
                        need - idle
                    ),
                }
            }
            None => {
                let (_, pool) = candidates[0];
                let holder = pool.reserved_for.as_deref().unwrap_or("an earlier run");
                format!(
                    "needs {need} {what}workers, {} idle; waiting behind {holder}, which is next in line for them",
                    pool.idle.len()
                )
            }
        };
        plan.waiting.push(waiting(reason));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Cause, RunState, WorkerState};

    fn run(id: &str, world: u32) -> RunRecord {
        let json = format!(
            r#"{{"id":"{id}","name":"{id}","spec_toml":"","state":"Queued","world_size":{world},
            "total_steps":1,"step":0,"message":"","submitted_unix_ms":0,"updated_unix_ms":0,
            "workers":[],"started_ranks":[],"artifacts_url":"","finished":{{}},"final_checkpoint":null}}"#
        );
        let run: RunRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(run.state(), RunState::Queued);
        run
    }

    fn worker(id: &str, device: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            host: "h".into(),
            peer_address: format!("{id}:1"),
            device_kind: device.into(),
            device_memory_bytes: 0,
            registered_unix_ms: 0,
            last_heartbeat_unix_ms: 0,
            state: WorkerState::Idle,
            run_id: None,
            numeric_fingerprint: "x86_64+avx2".into(),
            secret_sha256: String::new(),
            leaving: false,
        }
    }

    fn placed(plan: &Plan) -> Vec<(&str, Vec<&str>)> {
        plan.placements
            .iter()
            .map(|(r, ws)| (r.as_str(), ws.iter().map(String::as_str).collect()))
            .collect()
    }

    #[test]
    fn waits_for_a_whole_gang_and_says_why() {
        let runs = [run("r1", 3)];
        let (w1, w2, w3) = (worker("w1", "cpu"), worker("w2", "cpu"), worker("w3", "cpu"));
        let plan = plan(&runs, &[&w1, &w2], &[&w1, &w2, &w3], true);
        assert!(plan.placements.is_empty());
        assert_eq!(plan.waiting[0].position, 1);
        assert!(
            plan.waiting[0].reason.contains("needs 3 workers, 2 idle"),
            "{:?}",
            plan.waiting
        );
        let p = super::plan(&runs, &[&w1, &w2, &w3], &[&w1, &w2, &w3], true);
        assert_eq!(placed(&p), [("r1", vec!["w1", "w2", "w3"])]);
    }

    #[test]
    fn an_interrupted_run_keeps_its_place_and_its_workers_until_it_is_resumed() {
        // The probe's case: a run interrupted by a coordinator stall freed both workers, and the
        // run queued behind it took them before the automatic resume queued it again.
        let mut interrupted = run("first", 2);
        interrupted
            .transition(RunState::Assigned, Cause::at(0, "placed"))
            .unwrap();
        interrupted
            .transition(RunState::Interrupted, Cause::at(0, "stalled"))
            .unwrap();
        let runs = [interrupted, run("behind", 2)];
        let (w1, w2) = (worker("w1", "cpu"), worker("w2", "cpu"));
        let p = plan(&runs, &[&w1, &w2], &[&w1, &w2], true);
        assert!(p.placements.is_empty(), "{:?}", p.placements);
        assert!(p.waiting[0].reason.contains("automatic resume"), "{:?}", p.waiting);
        assert!(p.waiting[1].reason.contains("waiting behind first"), "{:?}", p.waiting);
        // Once resumed it is queued again, and placed first.
        let runs = [run("first", 2), run("behind", 2)];
        let p = plan(&runs, &[&w1, &w2], &[&w1, &w2], true);
        assert_eq!(placed(&p), [("first", vec!["w1", "w2"])]);
    }

    #[test]
    fn a_run_no_pool_can_hold_does_not_block_the_queue() {
        // The new user's case: world_size = 3 with two workers registered.
        let runs = [run("big", 3), run("small", 1)];
        let (w1, w2) = (worker("w1", "cpu"), worker("w2", "cpu"));
        let plan = plan(&runs, &[&w1, &w2], &[&w1, &w2], true);
        assert_eq!(placed(&plan), [("small", vec!["w1"])]);
        assert_eq!(plan.waiting.len(), 1);
        assert!(plan.waiting[0].reason.contains("largest group"), "{:?}", plan.waiting);
    }

    #[test]
    fn the_head_run_reserves_idle_workers_and_small_runs_do_not_overtake() {
        let runs = [run("large", 3), run("small-1", 1), run("small-2", 1)];
        let (w1, w2, w3) = (worker("w1", "cpu"), worker("w2", "cpu"), worker("w3", "cpu"));
        // w3 is busy: two idle workers are held for the large run.
        let plan = plan(&runs, &[&w1, &w2], &[&w1, &w2, &w3], true);
        assert!(plan.placements.is_empty(), "{:?}", plan.placements);
        assert!(
            plan.waiting[0].reason.contains("holding them until 1 more"),
            "{:?}",
            plan.waiting
        );
        assert!(
            plan.waiting[1].reason.contains("waiting behind large"),
            "{:?}",
            plan.waiting
        );
        assert_eq!(plan.waiting[2].position, 3);
    }

    #[test]
    fn backfill_uses_only_workers_the_head_cannot_use() {
        // The head needs two CUDA workers; one is busy. CPU workers are free for CPU runs.
        let mut large = run("large", 2);
        large.device = Some("cuda".into());
        let runs = [large, run("small", 1)];
        let (g1, g2, c1) = (worker("g1", "cuda:0"), worker("g2", "cuda:1"), worker("c1", "cpu"));
        let plan = plan(&runs, &[&g1, &c1], &[&g1, &g2, &c1], false);
        assert_eq!(placed(&plan), [("small", vec!["c1"])]);
    }

    #[test]
    fn priority_order_is_the_callers_queue_order_and_gangs_come_from_one_pool() {
        let runs = [run("r1", 2)];
        let (w1, mut w2) = (worker("w1", "cpu"), worker("w2", "cpu"));
        w2.numeric_fingerprint = "x86_64+avx512f".into();
        let plan = plan(&runs, &[&w1, &w2], &[&w1, &w2], true);
        assert!(plan.placements.is_empty(), "two idle workers, but of different kernels");
        assert!(plan.waiting[0].reason.contains("largest group"), "{:?}", plan.waiting);
    }

    #[test]
    fn a_cuda_run_never_gets_a_cpu_worker() {
        let mut gpu = run("gpu", 1);
        gpu.device = Some("cuda".into());
        let c1 = worker("c1", "cpu");
        let plan = plan([&gpu], &[&c1], &[&c1], true);
        assert!(plan.placements.is_empty());
        assert!(
            plan.waiting[0]
                .reason
                .contains("needs 1 cuda workers; none are registered"),
            "{:?}",
            plan.waiting
        );
        let g1 = worker("g1", "cuda:0");
        let plan = super::plan([&gpu], &[&c1, &g1], &[&c1, &g1], true);
        assert_eq!(placed(&plan), [("gpu", vec!["g1"])]);
    }

    #[test]
    fn without_explain_the_pass_stops_when_nothing_is_idle() {
        let runs: Vec<RunRecord> = (0..1000).map(|i| run(&format!("r{i}"), 1)).collect();
        let w1 = worker("w1", "cpu");
        let plan = plan(&runs, &[&w1], &[&w1], false);
        assert_eq!(plan.placements.len(), 1);
        assert!(plan.waiting.is_empty());
    }
}
