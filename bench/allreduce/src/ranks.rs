//! Runs one all-reduce implementation as N separate processes and reads back what each rank
//! measured. Both sides speak the same line protocol on stdout, so one parser scores both:
//!
//! - `ADDR host:port` — ours only: the rank's collective endpoint; the parent answers every rank
//!   with `PEERS <rank> <addr0>,<addr1>,...` on its stdin once all have bound (gloo finds its
//!   peers through its own rendezvous instead);
//! - `TIME <mib> <seconds>` — the rank's mean seconds per timed all-reduce of that size;
//! - `RSS <kib>` — the rank's peak resident memory, last. The parent then closes every rank's
//!   stdin, and ours exit only at that EOF: a rank that finished its last all-reduce must not
//!   tear down its links while a neighbour still receives the final chunks from it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{Context, bail};

/// What one rank reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RankReport {
    /// MiB -> mean seconds per timed all-reduce.
    pub seconds: BTreeMap<usize, f64>,
    pub peak_rss_kib: u64,
}

/// One size at one N, one side: the slowest rank's mean (a collective is as fast as its slowest
/// member) and the memory its processes peaked at.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub seconds: f64,
    pub max_rss_kib: u64,
    pub total_rss_kib: u64,
}

/// The slowest rank's time per size, over `reports`.
pub fn combine(reports: &[RankReport]) -> BTreeMap<usize, Measured> {
    let mut out: BTreeMap<usize, Measured> = BTreeMap::new();
    for r in reports {
        for (&mib, &s) in &r.seconds {
            let m = out.entry(mib).or_insert(Measured {
                seconds: 0.0,
                max_rss_kib: 0,
                total_rss_kib: 0,
            });
            m.seconds = m.seconds.max(s);
        }
    }
    let max_rss = reports.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
    let total_rss = reports.iter().map(|r| r.peak_rss_kib).sum();
    for m in out.values_mut() {
        m.max_rss_kib = max_rss;
        m.total_rss_kib = total_rss;
    }
    out
}

/// Reads a rank's protocol lines (after any `ADDR`) into its report, up to its `RSS` line or the
/// end of its output; other lines are echoed, since a Python side may print warnings there.
pub fn parse_report(rank: usize, lines: impl Iterator<Item = String>) -> anyhow::Result<RankReport> {
    let mut report = RankReport::default();
    for line in lines {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("TIME") => {
                let (mib, secs) = (words.next(), words.next());
                let mib: usize = mib
                    .and_then(|m| m.parse().ok())
                    .with_context(|| format!("rank {rank}: bad TIME line {line:?}"))?;
                let secs: f64 = secs
                    .and_then(|s| s.parse().ok())
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .with_context(|| format!("rank {rank}: bad TIME line {line:?}"))?;
                report.seconds.insert(mib, secs);
            }
            Some("RSS") => {
                report.peak_rss_kib = words
                    .next()
                    .and_then(|k| k.parse().ok())
                    .with_context(|| format!("rank {rank}: bad RSS line {line:?}"))?;
                break;
            }
            _ => println!("  rank {rank}: {line}"),
        }
    }
    Ok(report)
}

/// Children killed if the group is abandoned half-way (one rank failed), so none is left
/// waiting on a ring that will never form.
struct Group(Vec<Child>);

impl Drop for Group {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts one process per command (rank = index), performs the `ADDR`/`PEERS` exchange when
/// `exchange_addresses`, and returns every rank's report once all have exited successfully.
pub fn run_group(commands: Vec<Command>, exchange_addresses: bool) -> anyhow::Result<Vec<RankReport>> {
    let world = commands.len();
    let mut group = Group(Vec::with_capacity(world));
    for (rank, mut cmd) in commands.into_iter().enumerate() {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        group
            .0
            .push(cmd.spawn().with_context(|| format!("starting rank {rank}"))?);
    }
    let mut outputs: Vec<BufReader<ChildStdout>> = group
        .0
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("piped")))
        .collect();
    if exchange_addresses {
        let mut addrs = Vec::with_capacity(world);
        for (rank, out) in outputs.iter_mut().enumerate() {
            let mut line = String::new();
            out.read_line(&mut line)
                .with_context(|| format!("reading rank {rank}'s address"))?;
            match line.trim().strip_prefix("ADDR ") {
                Some(addr) => addrs.push(addr.to_string()),
                None => bail!("rank {rank} did not report its address (said {:?})", line.trim()),
            }
        }
        let peers = addrs.join(",");
        for (rank, child) in group.0.iter_mut().enumerate() {
            let stdin = child.stdin.as_mut().expect("piped");
            writeln!(stdin, "PEERS {rank} {peers}").with_context(|| format!("sending rank {rank} its peers"))?;
        }
    }
    let mut reports = Vec::with_capacity(world);
    let mut rest = Vec::with_capacity(world);
    for (rank, out) in outputs.into_iter().enumerate() {
        let mut lines = out.lines().map_while(Result::ok);
        reports.push(parse_report(rank, &mut lines)?);
        rest.push(lines);
    }
    // Every rank has reported: now they may go.
    for child in &mut group.0 {
        drop(child.stdin.take());
    }
    for (rank, lines) in rest.into_iter().enumerate() {
        for line in lines {
            println!("  rank {rank}: {line}");
        }
        let status = group.0[rank]
            .wait()
            .with_context(|| format!("waiting for rank {rank}"))?;
        if !status.success() {
            bail!("rank {rank} failed ({status})");
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> impl Iterator<Item = String> + '_ {
        text.lines().map(str::to_string)
    }

    #[test]
    fn a_rank_report_is_read_from_its_lines() {
        let r = parse_report(0, lines("warning: something\nTIME 4 0.01\nTIME 64 0.2\nRSS 1234\n")).unwrap();
        assert_eq!(r.seconds[&4], 0.01);
        assert_eq!(r.seconds[&64], 0.2);
        assert_eq!(r.peak_rss_kib, 1234);
    }

    #[test]
    fn a_bad_time_names_the_rank() {
        let err = parse_report(3, lines("TIME 4 nan\n")).unwrap_err().to_string();
        assert!(err.contains("rank 3"), "{err}");
        assert!(parse_report(0, lines("TIME 4 0\n")).is_err());
    }

    #[test]
    fn the_slowest_rank_decides_and_memory_is_summed() {
        let a = parse_report(0, lines("TIME 4 0.1\nRSS 100\n")).unwrap();
        let b = parse_report(1, lines("TIME 4 0.3\nRSS 300\n")).unwrap();
        let m = combine(&[a, b])[&4];
        assert_eq!(m.seconds, 0.3);
        assert_eq!((m.max_rss_kib, m.total_rss_kib), (300, 400));
    }

    #[test]
    fn a_failing_rank_fails_the_group() {
        let cmd = |script: &str| {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let err = run_group(vec![cmd("echo TIME 4 0.1; echo RSS 1"), cmd("exit 3")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1"), "{err}");
        let ok = run_group(vec![cmd("echo TIME 4 0.1; echo RSS 1")], false).unwrap();
        assert_eq!(ok[0].seconds[&4], 0.1);
    }

    #[test]
    fn addresses_are_exchanged_before_the_reports() {
        // Each "rank" announces an address, then echoes the PEERS line it gets as a warning.
        let cmd = |addr: &str| {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("echo ADDR {addr}; read l; echo \"$l\" > /dev/stderr; case \"$l\" in 'PEERS '*' a:1,b:2') echo TIME 4 0.5;; esac; echo RSS 1")]);
            c
        };
        let reports = run_group(vec![cmd("a:1"), cmd("b:2")], true).unwrap();
        assert!(reports.iter().all(|r| r.seconds.get(&4) == Some(&0.5)));
    }

    #[test]
    fn ranks_are_released_only_after_all_have_reported() {
        // Each rank waits for its stdin to close after reporting, as ours do; the group must
        // still finish, and a rank that fails after its report still fails it.
        let cmd = |script: &str| {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let ok = run_group(
            vec![
                cmd("echo TIME 4 0.1; echo RSS 1; cat >/dev/null"),
                cmd("echo RSS 1; cat >/dev/null"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let err = run_group(vec![cmd("echo RSS 1; cat >/dev/null; exit 2")], false).unwrap_err();
        assert!(err.to_string().contains("rank 0"), "{err}");
    }
}
