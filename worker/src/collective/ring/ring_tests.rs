//! The ring against a serial sum, over real loopback gRPC.

use super::*;
use crate::collective::serve_loopback_ring;
use protocol::auth::SharedToken;

/// Values on `rank` that an f32 reduce would round: above 2^40, some near u64::MAX / 4.
fn values(rank: u64) -> Vec<u64> {
    vec![
        (1 << 40) + 12_345 * rank + 1,
        (1 << 62) - 1 - rank * 999_999_937,
        0,
        rank,
        0xfff_ffff_ffff * (rank + 1),
        u64::MAX / 4 - rank,
        4095,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u64_sums_are_exact_over_a_real_three_rank_ring() {
    let token = SharedToken::new("ring-u64-test-token-0123456789").unwrap();
    let world = 3u64;
    let (hubs, peers) = serve_loopback_ring(world as usize, &token).await.unwrap();
    let mut tasks = vec![];
    for (rank, hub) in hubs.iter().enumerate() {
        let mut ring = Ring::connect(hub, "run-u64", rank as u32, &peers, Duration::from_secs(20))
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut data = values(rank as u64);
            ring.all_reduce_sum_u64(&mut data).await.unwrap();
            data
        }));
    }
    let expected: Vec<u64> = (0..values(0).len())
        .map(|i| (0..world).map(|r| values(r)[i]).sum())
        .collect();
    assert!(expected[0] > 1 << 41 && (expected[0] as f32) as u64 != expected[0]);
    for task in tasks {
        assert_eq!(task.await.unwrap(), expected);
    }
}

fn token() -> SharedToken {
    SharedToken::new("ring-test-token-0123456789abcdef").unwrap()
}

async fn hubs(world: usize) -> (Vec<CollectiveHub>, Vec<String>) {
    serve_loopback_ring(world, &token()).await.unwrap()
}

/// Runs `all_reduce_sum` over a fresh `world`-rank ring on each rank's `inputs`, `ops` times
/// (op k adds k to every input); every rank's results.
async fn reduce_on_ring(run_id: &str, inputs: Vec<Vec<f32>>, options: RingOptions, ops: usize) -> Vec<Vec<Vec<f32>>> {
    let (hubs, peers) = hubs(inputs.len()).await;
    reduce_on(&hubs, &peers, run_id, inputs, options, ops).await
}

/// [`reduce_on_ring`] over endpoints the caller set up.
async fn reduce_on(
    hubs: &[CollectiveHub],
    peers: &[String],
    run_id: &str,
    inputs: Vec<Vec<f32>>,
    options: RingOptions,
    ops: usize,
) -> Vec<Vec<Vec<f32>>> {
    let mut tasks = vec![];
    for (rank, input) in inputs.into_iter().enumerate() {
        let mut ring = Ring::connect_with(&hubs[rank], run_id, rank as u32, peers, options.clone())
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut results = vec![];
            for op in 0..ops {
                let mut data: Vec<f32> = input.iter().map(|v| v + op as f32).collect();
                ring.all_reduce_sum(&mut data).await.unwrap();
                results.push(data);
            }
            results
        }));
    }
    let mut out = vec![];
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

fn options(bucket_bytes: usize, streams: usize) -> RingOptions {
    RingOptions {
        bucket_bytes,
        streams,
        ..RingOptions::new(Duration::from_secs(30))
    }
}

/// Small integers: every order of summation gives the exact sum, so results compare with `==`.
fn integer_inputs(world: usize, n: usize) -> Vec<Vec<f32>> {
    (0..world)
        .map(|r| {
            (0..n)
                .map(|i| ((i * 7 + r * 1_000_003) % 4093) as f32 - 2000.0)
                .collect()
        })
        .collect()
}

/// Values of many magnitudes whose sums round differently in different orders.
fn awkward_inputs(world: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..world)
        .map(|_| {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-6..6)))
                .collect()
        })
        .collect()
}

fn serial_sum(inputs: &[Vec<f32>], op: usize) -> Vec<f32> {
    (0..inputs[0].len())
        .map(|i| inputs.iter().map(|x| x[i] + op as f32).sum())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_match_a_serial_sum_for_one_to_five_ranks_any_size_buckets_and_streams() {
    // 1, 7, a prime spanning two ownership blocks; 64 KiB buckets cut the prime into five.
    for world in 1..=5 {
        for n in [1usize, 7, 300_007] {
            // The kernel's send buffer: the sized default on one, autotuning on the other.
            let cases = [
                (DEFAULT_BUCKET_BYTES, 1, Some(DEFAULT_SEND_BUFFER_BYTES)),
                (64 << 10, 3, None),
            ];
            for (bucket_bytes, streams, send_buffer_bytes) in cases {
                let inputs = integer_inputs(world, n);
                let options = RingOptions {
                    send_buffer_bytes,
                    ..options(bucket_bytes, streams)
                };
                let results = reduce_on_ring("run-serial", inputs.clone(), options, 2).await;
                for (rank, per_op) in results.iter().enumerate() {
                    for (op, got) in per_op.iter().enumerate() {
                        assert!(
                            *got == serial_sum(&inputs, op),
                            "world {world}, n {n}, buckets of {bucket_bytes} B, {streams} streams: rank {rank} op {op} differs"
                        );
                    }
                }
            }
        }
    }
}

/// The links frame their gRPC messages by hand (`framing`); they must stay plain gRPC. Here
/// rank 1's link lands on tonic's generated `Collective` server, whose codec decodes every
/// chunk, while rank 0's goes through the hub's own route: one ring, both framings, exact sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_framed_links_are_plain_grpc_to_a_generated_server() {
    use crate::collective::framing::MAX_MESSAGE_BYTES;
    let (hubs, mut peers) = hubs(2).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    peers[0] = listener.local_addr().unwrap().to_string();
    let generated =
        pb::collective_server::CollectiveServer::new(hubs[0].clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let service = tonic::service::interceptor::InterceptedService::new(generated, token().require());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let inputs = integer_inputs(2, 2 * BLOCK_VALUES + 7);
    for wire in [WireFormat::F32, WireFormat::Bf16] {
        let options = RingOptions {
            wire,
            ..options(DEFAULT_BUCKET_BYTES, 2)
        };
        let run = format!("run-interop-{wire:?}");
        let results = reduce_on(&hubs, &peers, &run, inputs.clone(), options, 2).await;
        for (op, expected) in (0..2).map(|op| (op, serial_sum(&inputs, op))) {
            // bf16 rounds the sums; there the ranks need only agree.
            assert!(results[0][op] == results[1][op], "{wire:?} op {op}: ranks differ");
            if wire == WireFormat::F32 {
                assert!(results[0][op] == expected, "op {op} differs from the serial sum");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rank_gets_the_same_bits_whatever_the_buckets_and_streams() {
    for world in [3, 4] {
        let inputs = awkward_inputs(world, 2 * BLOCK_VALUES + 1234, world as u64);
        let mut reference: Option<Vec<u32>> = None;
        for (bucket_bytes, streams) in [(DEFAULT_BUCKET_BYTES, 1), (40_000, 2), (1 << 20, 4)] {
            let results = reduce_on_ring("run-bits", inputs.clone(), options(bucket_bytes, streams), 1).await;
            for per_op in &results {
                let bits: Vec<u32> = per_op[0].iter().map(|v| v.to_bits()).collect();
                match &reference {
                    None => reference = Some(bits),
                    Some(r) => assert!(
                        *r == bits,
                        "world {world}: {bucket_bytes} B buckets, {streams} streams differ"
                    ),
                }
            }
        }
        // The inputs are awkward enough that summation order matters: the check above is real.
        let naive = serial_sum(&inputs, 0);
        let reversed: Vec<f32> = (0..naive.len())
            .map(|i| inputs.iter().rev().map(|x| x[i]).sum())
            .collect();
        assert!(naive.iter().zip(&reversed).any(|(a, b)| a.to_bits() != b.to_bits()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_on_the_wire_stays_within_its_bound_and_ranks_still_agree() {
    for world in 2..=4usize {
        let inputs = awkward_inputs(world, BLOCK_VALUES + 999, 40 + world as u64);
        let results = reduce_on_ring(
            "run-bf16",
            inputs.clone(),
            RingOptions {
                wire: WireFormat::Bf16,
                ..options(DEFAULT_BUCKET_BYTES, 2)
            },
            1,
        )
        .await;
        // W roundings of partial sums to bf16 (relative error <= 2^-8 each), plus f32's own
        // rounding of the W-1 adds (2^-24 each): see the module docs.
        let u = 2f64.powi(-8);
        let bound_factor = (1.0 + u).powi(world as i32) - 1.0 + world as f64 * 2f64.powi(-24);
        let mut rounded_somewhere = false;
        for i in 0..inputs[0].len() {
            let exact: f64 = inputs.iter().map(|x| x[i] as f64).sum();
            let magnitude: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
            let got = results[0][0][i];
            assert!(
                (got as f64 - exact).abs() <= bound_factor * magnitude,
                "world {world}, element {i}: {got} vs exact {exact}"
            );
            rounded_somewhere |= got as f64 != exact;
            for rank in &results[1..] {
                assert_eq!(rank[0][i].to_bits(), got.to_bits(), "world {world}, element {i}");
            }
        }
        assert!(rounded_somewhere, "bf16 changed nothing: was it on the wire?");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dies_mid_reduce_fails_the_others_naming_it() {
    let (hubs, peers) = hubs(3).await;
    let deadline = Duration::from_secs(20);
    let mut rings = vec![];
    for (rank, hub) in hubs.iter().enumerate() {
        rings.push(
            Ring::connect_with(hub, "run-dies", rank as u32, &peers, options(1 << 20, 2))
                .await
                .unwrap(),
        );
    }
    // 32 MiB: far more than a few milliseconds of work, so the victim is cut off part-way.
    let n = 32 * BLOCK_VALUES;
    let mut victim = rings.pop().unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let dying = tokio::spawn(async move {
        let mut data = vec![1.0f32; n];
        let _ = started_tx.send(());
        // Gone part-way through: its links and inbox disappear with it.
        let _ = tokio::time::timeout(Duration::from_millis(5), victim.all_reduce_sum(&mut data)).await;
    });
    let mut survivors = vec![];
    for mut ring in rings {
        survivors.push(tokio::spawn(async move {
            let mut data = vec![1.0f32; n];
            // The ring is kept until every survivor has failed: a survivor that leaves is lost
            // to its own neighbours in turn, which is not what this test is about.
            (ring.all_reduce_sum(&mut data).await, ring)
        }));
    }
    started_rx.await.unwrap();
    dying.await.unwrap();
    let mut kept = vec![];
    for (rank, survivor) in survivors.into_iter().enumerate() {
        let (result, ring) = tokio::time::timeout(deadline, survivor)
            .await
            .expect("a survivor hung past its deadline")
            .unwrap();
        kept.push(ring);
        let err = result.unwrap_err();
        assert!(err.is_peer_loss(), "rank {rank}: {err}");
        // Rank 0 receives from rank 2 and rank 1 sends to it: both name it; nobody waits on
        // the other survivor.
        assert_eq!(err.lost_peer(), Some(2), "rank {rank}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_rings_of_an_older_generation_are_refused() {
    let (hubs, peers) = hubs(2).await;
    let current = RingOptions {
        generation: 2,
        ..options(DEFAULT_BUCKET_BYTES, 1)
    };
    let _ring = Ring::connect_with(&hubs[0], "run-gen", 0, &peers, current.clone())
        .await
        .unwrap();

    // A rank of the ring before the re-formation still sends.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", peers[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stale = pb::collective_client::CollectiveClient::new(token().channel(channel));
    let hello = pb::CollectiveChunk {
        run_id: "run-gen".into(),
        from_rank: 1,
        hello: true,
        generation: 1,
        ..Default::default()
    };
    let err = stale.link(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("generation 1"), "{err}");

    // A current link that slips in one chunk of the old generation is cut off.
    let hello = pb::CollectiveChunk {
        run_id: "run-gen".into(),
        from_rank: 1,
        hello: true,
        generation: 2,
        ..Default::default()
    };
    let old_chunk = pb::CollectiveChunk {
        hello: false,
        generation: 1,
        ..hello.clone()
    };
    let err = stale
        .link(tokio_stream::iter(vec![hello, old_chunk]))
        .await
        .unwrap_err();
    assert!(err.message().contains("generation 1"), "{err}");

    // And an old ring cannot claim the run's inbox back.
    let old = RingOptions {
        generation: 1,
        ..current
    };
    let err = Ring::connect_with(&hubs[0], "run-gen", 0, &peers, old)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            CollectiveError::Generation {
                got: 1,
                expected: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_whose_ring_never_forms_is_dropped() {
    let (hubs, peers) = hubs(1).await;
    hubs[0].set_unclaimed_ttl(Duration::from_millis(200));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", peers[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::collective_client::CollectiveClient::new(token().channel(channel));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::CollectiveChunk {
        run_id: "run-orphan".into(),
        hello: true,
        ..Default::default()
    };
    tx.send(hello.clone()).await.unwrap();
    tx.send(pb::CollectiveChunk {
        hello: false,
        data: bytes::Bytes::from(vec![0u8; 4096]),
        ..hello
    })
    .await
    .unwrap();
    let link = tokio::spawn(async move { client.link(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let appeared = async {
        while !hubs[0].has_inbox("run-orphan") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), appeared).await.unwrap();
    // No ring claims it: the hub lets it go (and with it what it buffered), and the link is told.
    let ended = tokio::time::timeout(Duration::from_secs(10), link)
        .await
        .unwrap()
        .unwrap();
    assert!(!hubs[0].has_inbox("run-orphan"));
    drop(tx);
    assert_eq!(ended.unwrap_err().code(), tonic::Code::Unavailable);
}
