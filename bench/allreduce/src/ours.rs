//! Our side, one rank per process: bind the collective endpoint, learn the peers from the
//! parent, form the ring and time `all_reduce_sum` over each buffer of the plan.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use protocol::auth::SharedToken;
use worker::collective::{Ring, RingOptions, WireFormat, serve_collective};

use crate::plan::SizePlan;

/// How the ring is formed: the knobs of `RingOptions` the benchmark exposes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingKnobs {
    pub timeout: Duration,
    /// Parallel streams per link (`None`: the ring's default).
    pub streams: Option<usize>,
    /// Bucket size in MiB (`None`: the ring's default).
    pub bucket_mb: Option<f64>,
    /// Link `SO_SNDBUF` in KiB, 0 for autotuning (`None`: the ring's default).
    pub send_buffer_kb: Option<u32>,
    /// bf16 on the wire instead of f32.
    pub bf16: bool,
}

impl RingKnobs {
    /// The options as `--rank-child` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--timeout-secs".into(), self.timeout.as_secs().to_string()];
        if let Some(s) = self.streams {
            a.extend(["--streams".into(), s.to_string()]);
        }
        if let Some(b) = self.bucket_mb {
            a.extend(["--bucket-mb".into(), b.to_string()]);
        }
        if let Some(k) = self.send_buffer_kb {
            a.extend(["--send-buffer-kb".into(), k.to_string()]);
        }
        if self.bf16 {
            a.extend(["--wire".into(), "bf16".into()]);
        }
        a
    }

    /// How a table row names these settings.
    pub fn describe(&self) -> String {
        format!(
            "streams {}, bucket {}, send buffer {}, wire {}",
            self.streams.map_or("default".into(), |s| s.to_string()),
            self.bucket_mb.map_or("default".into(), |b| format!("{b} MiB")),
            match self.send_buffer_kb {
                None => "default".into(),
                Some(0) => "autotuned".into(),
                Some(k) => format!("{k} KiB"),
            },
            if self.bf16 { "bf16" } else { "f32" }
        )
    }
}

/// The ring this rank joins, with `knobs` applied.
async fn connect(
    hub: &worker::collective::CollectiveHub,
    rank: u32,
    peers: &[String],
    knobs: &RingKnobs,
) -> anyhow::Result<Ring> {
    let mut options = RingOptions::new(knobs.timeout);
    if let Some(streams) = knobs.streams {
        options.streams = streams.max(1);
    }
    if let Some(mb) = knobs.bucket_mb {
        options.bucket_bytes = ((mb * (1 << 20) as f64) as usize).max(4);
    }
    if let Some(kb) = knobs.send_buffer_kb {
        options.send_buffer_bytes = (kb > 0).then(|| kb.saturating_mul(1024));
    }
    if knobs.bf16 {
        options.wire = WireFormat::Bf16;
    }
    Ring::connect_with(hub, "bench-allreduce", rank, peers, options)
        .await
        .with_context(|| format!("rank {rank}: forming the ring over {peers:?}"))
}

/// The `--rank-child` process: speaks the protocol of [`crate::ranks`] on stdin/stdout.
pub fn rank_main(world: usize, plan: &[SizePlan], knobs: RingKnobs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(async {
        let (addr, hub) = serve_collective("127.0.0.1:0".parse()?, &SharedToken::none())
            .await
            .context("binding the collective endpoint on loopback")?;
        say(&format!("ADDR {addr}"));
        // Read off the runtime: the endpoint keeps serving while this waits for the parent.
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await?
        .context("reading the peer list")?;
        let (rank, peers) = parse_peers(&line, world)?;
        let mut ring = connect(&hub, rank, &peers, &knobs).await?;
        for p in plan {
            let seconds = time_size(&mut ring, rank, world, p, knobs.bf16).await?;
            say(&format!("TIME {} {seconds:.9}", p.mib));
        }
        say(&format!("RSS {}", peak_rss_kib()));
        // Stay up until the parent has every rank's report (it then closes stdin): leaving now
        // could cut a neighbour off from the last chunks still in flight from this rank.
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
        drop(ring);
        Ok(())
    })
}

/// `PEERS <rank> <addr>,<addr>,...` from the parent.
fn parse_peers(line: &str, world: usize) -> anyhow::Result<(u32, Vec<String>)> {
    let mut words = line.split_whitespace();
    let (Some("PEERS"), Some(rank), Some(list)) = (words.next(), words.next(), words.next()) else {
        bail!("expected `PEERS <rank> <addrs>` from the parent, got {:?}", line.trim());
    };
    let rank: u32 = rank.parse().with_context(|| format!("PEERS: bad rank {rank:?}"))?;
    let peers: Vec<String> = list.split(',').map(str::to_string).collect();
    if peers.len() != world || rank as usize >= world {
        bail!("PEERS: rank {rank} of {} peers, but the world is {world}", peers.len());
    }
    Ok((rank, peers))
}

/// Warm-up (the first one checks the sum), a barrier, then the mean of the timed all-reduces.
async fn time_size(ring: &mut Ring, rank: u32, world: usize, p: &SizePlan, bf16: bool) -> anyhow::Result<f64> {
    let mut data = vec![(rank + 1) as f32; p.floats()];
    ring.all_reduce_sum(&mut data).await.context("first all-reduce")?;
    check_sum(&data, world, bf16).with_context(|| format!("{} MiB at N={world}", p.mib))?;
    for _ in 1..p.warmup {
        ring.all_reduce_sum(&mut data).await.context("warm-up all-reduce")?;
    }
    // Everyone starts the clock together, so no rank times another's late start.
    ring.all_reduce_sum(&mut [0.0]).await.context("barrier")?;
    let started = Instant::now();
    for _ in 0..p.iters {
        ring.all_reduce_sum(&mut data).await.context("timed all-reduce")?;
    }
    Ok(started.elapsed().as_secs_f64() / p.iters as f64)
}

/// Every element of rank r's `r + 1` summed: N(N+1)/2 (bf16 on the wire rounds to 8 bits of
/// mantissa, so within 1%).
fn check_sum(data: &[f32], world: usize, bf16: bool) -> anyhow::Result<()> {
    let want = (world * (world + 1) / 2) as f32;
    let tolerance = if bf16 { want * 1e-2 } else { 0.0 };
    if let Some((at, got)) = data.iter().enumerate().find(|(_, v)| (**v - want).abs() > tolerance) {
        bail!("wrong sum at element {at}: {got}, want {want}");
    }
    Ok(())
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// This process's peak resident memory in KiB (getrusage's ru_maxrss is KiB on Linux).
pub fn peak_rss_kib() -> u64 {
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_maxrss.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_list_is_checked_against_the_world() {
        let (rank, peers) = parse_peers("PEERS 1 a:1,b:2\n", 2).unwrap();
        assert_eq!((rank, peers.len()), (1, 2));
        assert!(parse_peers("PEERS 2 a:1,b:2", 2).is_err());
        assert!(parse_peers("PEERS 0 a:1", 2).is_err());
        assert!(parse_peers("HELLO", 2).is_err());
    }

    #[test]
    fn a_wrong_sum_is_caught_exactly_unless_bf16() {
        assert!(check_sum(&[3.0, 3.0], 2, false).is_ok());
        let err = check_sum(&[3.0, 3.01], 2, false).unwrap_err().to_string();
        assert!(err.contains("element 1"), "{err}");
        assert!(check_sum(&[3.0, 3.01], 2, true).is_ok());
        assert!(check_sum(&[3.0, 3.5], 2, true).is_err());
    }

    #[test]
    fn knobs_reach_the_child_command_line() {
        let knobs = RingKnobs {
            timeout: Duration::from_secs(9),
            streams: Some(4),
            bucket_mb: Some(25.0),
            send_buffer_kb: Some(0),
            bf16: true,
        };
        assert_eq!(
            knobs.args().join(" "),
            "--timeout-secs 9 --streams 4 --bucket-mb 25 --send-buffer-kb 0 --wire bf16"
        );
    }
}
