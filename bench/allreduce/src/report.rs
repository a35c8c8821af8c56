//! The comparison table and the machine-readable `RESULT` line.

use crate::plan::bus_bandwidth_gbps;
use crate::ranks::Measured;

/// One (size, N) cell of the sweep, both sides.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub mib: usize,
    pub world: usize,
    pub ours: Option<Measured>,
    pub gloo: Option<Measured>,
}

impl Row {
    pub fn ours_gbps(&self) -> Option<f64> {
        self.ours
            .map(|m| bus_bandwidth_gbps(self.mib << 20, self.world, m.seconds))
    }

    pub fn gloo_gbps(&self) -> Option<f64> {
        self.gloo
            .map(|m| bus_bandwidth_gbps(self.mib << 20, self.world, m.seconds))
    }

    /// Our bus bandwidth over gloo's (above 1 is faster).
    pub fn ratio(&self) -> Option<f64> {
        Some(self.ours_gbps()? / self.gloo_gbps()?)
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn mib(kib: u64) -> String {
    format!("{}", kib / 1024)
}

pub fn print_table(rows: &[Row]) {
    println!(
        "{:>7} {:>2} | {:>9} {:>9} | {:>9} {:>9} | {:>6} | {:>14} {:>14}",
        "size", "N", "ours ms", "ours GB/s", "gloo ms", "gloo GB/s", "ratio", "ours RSS MiB", "gloo RSS MiB"
    );
    for r in rows {
        let rss = |m: Option<Measured>| {
            m.map_or("-".into(), |m| {
                format!("{}/{}", mib(m.max_rss_kib), mib(m.total_rss_kib))
            })
        };
        println!(
            "{:>4} MB {:>2} | {:>9} {:>9} | {:>9} {:>9} | {:>6} | {:>14} {:>14}",
            r.mib,
            r.world,
            cell(r.ours.map(|m| m.seconds * 1e3), 1),
            cell(r.ours_gbps(), 3),
            cell(r.gloo.map(|m| m.seconds * 1e3), 1),
            cell(r.gloo_gbps(), 3),
            cell(r.ratio(), 2),
            rss(r.ours),
            rss(r.gloo),
        );
    }
    println!("(ms: slowest rank's mean per all-reduce; GB/s: bus bandwidth 2(N-1)/N x bytes / time, 1e9 bytes;");
    println!(" RSS: peak per rank process / summed over the N processes, over the whole sweep at that N)");
}

/// `RESULT ratio_vs_gloo_64MB_n2=X ratio_vs_gloo_256MB_n4=Y busbw_64MB_n2_GBps=Z`; a point
/// that was not measured is `nan`.
pub fn result_line(rows: &[Row]) -> String {
    let find = |mib: usize, world: usize| rows.iter().find(|r| r.mib == mib && r.world == world);
    let fmt = |v: Option<f64>, digits: usize| v.map_or("nan".into(), |v| format!("{v:.digits$}"));
    format!(
        "RESULT ratio_vs_gloo_64MB_n2={} ratio_vs_gloo_256MB_n4={} busbw_64MB_n2_GBps={}",
        fmt(find(64, 2).and_then(Row::ratio), 3),
        fmt(find(256, 4).and_then(Row::ratio), 3),
        fmt(find(64, 2).and_then(Row::ours_gbps), 3),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(seconds: f64) -> Option<Measured> {
        Some(Measured {
            seconds,
            max_rss_kib: 0,
            total_rss_kib: 0,
        })
    }

    #[test]
    fn the_result_line_reads_the_named_points() {
        let rows = [
            Row {
                mib: 64,
                world: 2,
                ours: measured(0.1),
                gloo: measured(0.2),
            },
            Row {
                mib: 256,
                world: 4,
                ours: measured(0.5),
                gloo: None,
            },
        ];
        let line = result_line(&rows);
        // 64 MiB at N=2 in 0.1 s: 2 * 1/2 * 67,108,864 B / 0.1 s = 0.671 GB/s.
        assert_eq!(
            line,
            "RESULT ratio_vs_gloo_64MB_n2=2.000 ratio_vs_gloo_256MB_n4=nan busbw_64MB_n2_GBps=0.671"
        );
    }

    #[test]
    fn an_empty_sweep_gives_nan_everywhere() {
        assert_eq!(
            result_line(&[]),
            "RESULT ratio_vs_gloo_64MB_n2=nan ratio_vs_gloo_256MB_n4=nan busbw_64MB_n2_GBps=nan"
        );
    }
}
