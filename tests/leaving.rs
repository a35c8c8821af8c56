//! Workers leaving and keeping their identity, with real processes (issue 18, items 8 and 9): a
//! worker's id cannot be taken over by a raw Register, and a worker that gets SIGTERM (a pod
//! terminating, a Slurm step cancelled) deregisters, drains the run it holds into the queue
//! without spending a retry, and exits 0 within its drain timeout.

use std::time::{Duration, Instant};

use crate::common::{Cluster, worker_client_request};

const ENDED: [&str; 4] = ["Completed", "Failed", "Cancelled", "Interrupted"];

fn sigterm(cluster: &Cluster, index: usize) {
    let pid = cluster.workers[index].0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for worker process `index` to exit, returning its status and how long it took.
fn wait_exit(cluster: &mut Cluster, index: usize, timeout: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = cluster.workers[index].0.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < timeout,
            "worker {index} still running {timeout:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn worker_ids(cluster: &Cluster) -> Vec<String> {
    cluster.worker_states().into_iter().map(|(id, _)| id).collect()
}

fn idle_workers(cluster: &Cluster, n: usize) -> Vec<String> {
    cluster.wait_until(&format!("{n} idle workers"), Duration::from_secs(60), || {
        cluster.worker_states().iter().filter(|(_, s)| s == "Idle").count() == n
    });
    worker_ids(cluster)
}

/// Before: an idle worker died of SIGTERM at once (status 143), silently, and stayed on the
/// coordinator's books, offered work, until `dead_after`.
#[test]
fn an_idle_worker_on_sigterm_deregisters_and_exits_0() {
    let mut cluster = Cluster::start_with_dead_after(30);
    cluster.spawn_workers_with(1, &[]);
    let ids = idle_workers(&cluster, 1);

    sigterm(&cluster, 0);
    let (status, took) = wait_exit(&mut cluster, 0, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{status:?}");
    // Gone from the books at once, not after dead_after (30 s).
    let left = worker_ids(&cluster);
    assert!(!left.contains(&ids[0]), "{left:?} still lists {}", ids[0]);
    eprintln!("idle worker: SIGTERM to exit 0 in {took:?}");
}

/// Spawns one long-lived worker whose collective endpoint is on a port the test knows, and
/// returns that address: `workers --json` lists it, which maps worker ids to processes.
fn spawn_worker_at(cluster: &mut Cluster) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    cluster.spawn_workers_with(1, &["--peer-listen", &address]);
    address
}

/// The index of the worker process whose id is `worker_id`, given each process's address.
fn process_of(cluster: &Cluster, addresses: &[String], worker_id: &str) -> usize {
    let list = cluster.cli_json(&["workers"]);
    let address = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == worker_id)
        .unwrap_or_else(|| panic!("{worker_id} not in {list}"))["peer_address"]
        .as_str()
        .unwrap()
        .to_string();
    addresses.iter().position(|a| *a == address).unwrap()
}

/// Before: SIGTERM killed the worker at once (status 143); its run was lost with it, interrupted
/// at `dead_after` with a retry charged, and nothing said why. Rank 0 leaving checkpoints itself;
/// another rank leaving has rank 0 checkpoint, told at its next report or heartbeat.
fn a_rank_on_sigterm_drains_its_run(leaving_rank: usize) {
    let mut cluster = Cluster::start_with_dead_after(10);
    cluster.write_dataset(6);
    let mut addresses = vec![spawn_worker_at(&mut cluster), spawn_worker_at(&mut cluster)];
    idle_workers(&cluster, 2);
    let spec = cluster.write_spec("long", 2, 100_000, "");
    let run_id = cluster.submit(&spec);
    cluster.wait_for_step(&run_id, 2, Duration::from_secs(120));
    // The spare the run moves to; it joins after the run was placed, so it is idle.
    addresses.push(spawn_worker_at(&mut cluster));
    cluster.wait_until("the spare worker to be idle", Duration::from_secs(60), || {
        cluster.worker_states().iter().filter(|(_, s)| s == "Idle").count() == 1
    });
    let before = cluster.cli_json(&["show", &run_id]);
    let gone = before["run"]["workers"][leaving_rank].as_str().unwrap().to_string();
    let index = process_of(&cluster, &addresses, &gone);

    sigterm(&cluster, index);
    let (status, took) = wait_exit(&mut cluster, index, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let left = worker_ids(&cluster);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&gone), "{gone} is still listed: {left:?}");

    // The run went back to the queue from a checkpoint, without spending a retry, and resumes
    // on the two workers left.
    cluster.wait_until("the run's next attempt to train", Duration::from_secs(60), || {
        let detail = cluster.cli_json(&["show", &run_id]);
        detail["run"]["attempt"] == 2 && detail["run"]["state"] == "Running"
    });
    let detail = cluster.cli_json(&["show", &run_id]);
    let kinds = Cluster::event_kinds(&detail);
    assert!(
        kinds.contains(&"leaving".to_string()) && kinds.contains(&"requeued".to_string()),
        "{kinds:?}"
    );
    assert!(!kinds.contains(&"interrupted".to_string()), "{kinds:?}");
    assert_eq!(detail["run"]["retries"], 0, "{detail}");
    let requeued = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "requeued")
        .unwrap();
    let from = requeued["step"].as_u64().unwrap();
    assert!(from >= 2, "{requeued}");
    let now_on: Vec<&str> = detail["run"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(!now_on.contains(&gone.as_str()), "{now_on:?}");
    cluster.wait_for_step(&run_id, from + 2, Duration::from_secs(120));
    assert!(cluster.cli(&["cancel", &run_id]).status.success());
    eprintln!("rank {leaving_rank}: SIGTERM to exit 0 in {took:?}; the run resumed from step {from}");
}

#[test]
fn rank_0_on_sigterm_drains_its_run_which_resumes_elsewhere_without_a_retry() {
    a_rank_on_sigterm_drains_its_run(0);
}

#[test]
fn rank_1_on_sigterm_drains_its_run_which_resumes_elsewhere_without_a_retry() {
    a_rank_on_sigterm_drains_its_run(1);
}

/// Before: a raw Register naming a live worker's id with the peer address 127.0.0.1:1 was
/// accepted; the next two-worker run dialled 127.0.0.1:1 and hung at "Running 0/N".
#[test]
fn a_live_workers_id_cannot_be_taken_over() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(6);
    cluster.spawn_workers_with(2, &[]);
    idle_workers(&cluster, 2);
    let before = cluster.cli_json(&["workers"]);
    let victim = before[0]["worker_id"].as_str().unwrap().to_string();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let mut client = protocol::pb::worker_service_client::WorkerServiceClient::new(cluster.channel().await);
        let mut req = worker_client_request("127.0.0.1:1");
        req.worker_id = victim.clone();
        client.register(req).await.expect_err("took a live worker's id over")
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&victim) && status.message().contains("worker_secret"),
        "{}",
        status.message()
    );
    assert_eq!(
        cluster.cli_json(&["workers"])[0]["peer_address"],
        before[0]["peer_address"]
    );

    let run_id = cluster.submit(&cluster.write_spec("after", 2, 3, ""));
    let detail = cluster.wait_for_state(&run_id, &ENDED, Duration::from_secs(60));
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
}
