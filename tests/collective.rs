//! Ring all-reduce over real gRPC on loopback: sums are exact for 2 and 3 ranks with sizes that
//! do not divide evenly (and span several 1 MiB chunks), every rank ends bit-identical, and a
//! missing peer is reported within the deadline instead of hanging.

use std::time::{Duration, Instant};

use protocol::auth::SharedToken;
use protocol::pb;
use protocol::pb::collective_client::CollectiveClient;
use worker::collective::{CollectiveHub, Ring, serve_loopback_ring};

/// The ranks of these tests authenticate to each other, as deployed workers do.
fn token() -> SharedToken {
    SharedToken::new("collective-test-token-0123456789").unwrap()
}

async fn start_ranks(world: usize) -> (Vec<CollectiveHub>, Vec<String>) {
    serve_loopback_ring(world, &token()).await.unwrap()
}

/// Value of element `i` on `rank`: integers below 2^24, so float sums are exact and comparable.
fn value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 1_000_003) % 4093) as f32 - 2000.0
}

/// Joins `world` ranks into the ring of `run_id` and runs `body` on each, concurrently.
async fn on_every_rank<T, F, Fut>(world: usize, run_id: &'static str, body: F) -> Vec<T>
where
    F: Fn(usize, Ring) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (hubs, peers) = start_ranks(world).await;
    let mut tasks = vec![];
    for (rank, hub) in hubs.iter().enumerate() {
        let ring = Ring::connect(hub, run_id, rank as u32, &peers, Duration::from_secs(20));
        tasks.push(tokio::spawn(body(rank, ring.await.unwrap())));
    }
    let mut results = vec![];
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results
}

async fn all_reduce_across(world: usize, n: usize, ops: usize) {
    let per_rank = on_every_rank(world, "run-000042", move |rank, mut ring| async move {
        let mut results = vec![];
        for op in 0..ops {
            let mut data: Vec<f32> = (0..n).map(|i| value(rank, i) + op as f32).collect();
            ring.all_reduce_sum(&mut data).await.unwrap();
            results.push(data);
        }
        results
    })
    .await;
    for op in 0..ops {
        let expected: Vec<f32> = (0..n)
            .map(|i| (0..world).map(|r| value(r, i) + op as f32).sum())
            .collect();
        for (rank, results) in per_rank.iter().enumerate() {
            assert_eq!(results[op].len(), n);
            let first_bad = results[op].iter().zip(&expected).position(|(a, b)| a != b);
            assert!(first_bad.is_none(), "rank {rank} op {op} wrong at {first_bad:?}");
            let same_bits = results[op]
                .iter()
                .zip(&per_rank[0][op])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same_bits, "rank {rank} differs bitwise from rank 0");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_sum_exactly_with_uneven_multi_chunk_buffer() {
    // 600_001 floats = 2.4 MB: several chunks per segment, and not divisible by 2.
    all_reduce_across(2, 600_001, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ranks_sum_exactly_with_uneven_sizes() {
    all_reduce_across(3, 1_000_003, 2).await;
    // Fewer elements than ranks: some segments are empty.
    all_reduce_across(3, 2, 1).await;
    all_reduce_across(3, 7, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mean_divides_by_world_size() {
    let results = on_every_rank(2, "run-mean", |rank, mut ring| async move {
        let mut data = vec![rank as f32 * 2.0 + 1.0; 5];
        ring.all_reduce_mean(&mut data).await.unwrap();
        data
    })
    .await;
    assert_eq!(results, vec![vec![2.0; 5]; 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out_instead_of_hanging() {
    let (hubs, peers) = start_ranks(2).await;
    // Only rank 0 joins; rank 1's server is up but its ring never sends.
    let mut ring = Ring::connect(&hubs[0], "run-lonely", 0, &peers, Duration::from_millis(700))
        .await
        .unwrap();
    let started = Instant::now();
    let mut data = vec![1.0f32; 1000];
    let err = ring.all_reduce_sum(&mut data).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("nothing from rank 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_fails_to_connect_within_the_deadline() {
    let (hubs, _) = start_ranks(1).await;
    // Port 1 on loopback: nothing listens there.
    let peers = vec!["127.0.0.1:0".to_string(), "127.0.0.1:1".to_string()];
    let err = Ring::connect(&hubs[0], "run-unreach", 0, &peers, Duration::from_millis(500))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot reach rank 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_peer_fails_the_reduce_at_once_not_at_the_deadline() {
    let (hubs, peers) = start_ranks(2).await;
    let deadline = Duration::from_secs(30);
    let mut ring0 = Ring::connect(&hubs[0], "run-departed", 0, &peers, deadline)
        .await
        .unwrap();
    let ring1 = Ring::connect(&hubs[1], "run-departed", 1, &peers, deadline)
        .await
        .unwrap();
    drop(ring1); // rank 1 leaves (its run was stopped) without taking part
    let started = Instant::now();
    let err = ring0.all_reduce_sum(&mut [1.0f32; 64]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.is_peer_loss(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_without_the_shared_token_are_refused() {
    let (_, peers) = start_ranks(1).await;
    let mut intruder = CollectiveClient::connect(format!("http://{}", peers[0])).await.unwrap();
    let hello = pb::CollectiveChunk {
        run_id: "run-000042".into(),
        hello: true,
        ..Default::default()
    };
    let err = intruder.link(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}
