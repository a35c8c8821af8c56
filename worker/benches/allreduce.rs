//! Ring all-reduce throughput over gRPC on loopback: the baseline the fast all-reduce issue has
//! to beat (and compare with gloo). All ranks run in this process, each with its own tonic
//! server and client, so on a 2-core machine they also share the CPU.
//!
//! `cargo bench -p worker --bench allreduce -- [--mb M] [--ranks W] [--iters N]`
//! (defaults: 64 MiB of f32, 2 ranks, 5 timed iterations after one warm-up). The last line is
//! machine-readable: `RESULT allreduce_<M>MB_n<W>_ms=<ms> busbw_GBps=<GB/s>`.

use std::time::{Duration, Instant};

use protocol::auth::SharedToken;
use worker::collective::{Ring, serve_collective};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    match args.iter().position(|a| a == name) {
        Some(at) => args
            .get(at + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} needs a number")),
        None => default,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb = arg(&args, "--mb", 64);
    let world = arg(&args, "--ranks", 2).max(2);
    let iters = arg(&args, "--iters", 5).max(1);
    let n = mb * (1 << 20) / 4;
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let per_iter = runtime.block_on(async {
        let mut hubs = vec![];
        let mut peers = vec![];
        for _ in 0..world {
            let (addr, hub) = serve_collective("127.0.0.1:0".parse().unwrap(), &SharedToken::none())
                .await
                .expect("bind loopback");
            hubs.push(hub);
            peers.push(addr.to_string());
        }
        let tasks: Vec<_> = hubs
            .into_iter()
            .enumerate()
            .map(|(rank, hub)| {
                let peers = peers.clone();
                tokio::spawn(async move {
                    let mut ring = Ring::connect(&hub, "bench", rank as u32, &peers, Duration::from_secs(120))
                        .await
                        .expect("ring");
                    let mut data = vec![rank as f32; n];
                    ring.all_reduce_sum(&mut data).await.expect("warm-up"); // connections, buffers
                    let started = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce_sum(&mut data).await.expect("all-reduce");
                    }
                    started.elapsed() / iters as u32
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for t in tasks {
            slowest = slowest.max(t.await.expect("rank task"));
        }
        slowest
    });
    let bytes = (n * 4) as f64;
    // Bus bandwidth: what each link carries, 2(W-1)/W of the buffer, per second (NCCL's convention).
    let busbw = bytes * 2.0 * (world - 1) as f64 / world as f64 / per_iter.as_secs_f64() / 1e9;
    let ms = per_iter.as_secs_f64() * 1e3;
    println!(
        "ring all-reduce, {mb} MiB f32, {world} ranks on loopback: {ms:.1} ms per op, bus bandwidth {busbw:.2} GB/s"
    );
    println!("RESULT allreduce_{mb}MB_n{world}_ms={ms:.1} busbw_GBps={busbw:.3}");
}
