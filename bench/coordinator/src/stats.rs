//! Latency histograms per RPC kind, error counts, and the report table.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Every RPC the benchmark times. `Await` is a long-poll: its latency is mostly the poll window,
/// so it is shown but never counted in the steady-state p99.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Submit,
    Register,
    Await,
    Heartbeat,
    Report,
    ListRuns,
    GetRun,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Submit,
        Kind::Register,
        Kind::Await,
        Kind::Heartbeat,
        Kind::Report,
        Kind::ListRuns,
        Kind::GetRun,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Submit => "SubmitRun",
            Kind::Register => "Register",
            Kind::Await => "AwaitAssignment",
            Kind::Heartbeat => "Heartbeat",
            Kind::Report => "ReportMetrics",
            Kind::ListRuns => "ListRuns (CLI)",
            Kind::GetRun => "GetRun (CLI)",
        }
    }

    /// When the samples in its row were taken.
    pub fn phase(self) -> &'static str {
        match self {
            Kind::Submit => "setup",
            Kind::Register => "ramp",
            Kind::Await => "long-poll",
            Kind::Heartbeat | Kind::Report | Kind::ListRuns | Kind::GetRun => "window",
        }
    }

    /// Counted in the headline p99: measured during the steady-state window, and not a long-poll.
    pub fn steady_state(self) -> bool {
        self.phase() == "window"
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).expect("listed")
    }
}

/// Microseconds, 1 µs to one hour, three significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub struct Stats {
    hist: Vec<Mutex<Histogram<u64>>>,
    errors: Vec<AtomicU64>,
    /// The first few error messages, to say what went wrong.
    samples: Mutex<Vec<String>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hist: Kind::ALL.iter().map(|_| Mutex::new(new_histogram())).collect(),
            errors: Kind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            samples: Mutex::new(vec![]),
        }
    }
}

/// One row of the report.
pub struct Row {
    pub kind: Kind,
    pub calls: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn record(&self, kind: Kind, elapsed: Duration) {
        let micros = elapsed.as_micros().clamp(1, u64::MAX as u128) as u64;
        self.hist[kind.index()]
            .lock()
            .expect("histogram lock")
            .saturating_record(micros);
    }

    pub fn error(&self, kind: Kind, status: &tonic::Status) {
        self.errors[kind.index()].fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().expect("error samples lock");
        if samples.len() < 5 {
            samples.push(format!("{}: {:?}: {}", kind.name(), status.code(), status.message()));
        }
    }

    pub fn total_errors(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.samples.lock().expect("error samples lock").clone()
    }

    pub fn rows(&self) -> Vec<Row> {
        Kind::ALL
            .iter()
            .map(|&kind| {
                let h = self.hist[kind.index()].lock().expect("histogram lock");
                let ms = |micros: u64| micros as f64 / 1000.0;
                let empty = h.is_empty();
                Row {
                    kind,
                    calls: h.len(),
                    errors: self.errors[kind.index()].load(Ordering::Relaxed),
                    p50_ms: if empty { 0.0 } else { ms(h.value_at_quantile(0.50)) },
                    p99_ms: if empty { 0.0 } else { ms(h.value_at_quantile(0.99)) },
                    max_ms: if empty { 0.0 } else { ms(h.max()) },
                }
            })
            .collect()
    }
}

/// The rows as an aligned table. Errors are calls that failed (not in the latency columns).
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<18} {:<10} {:>9} {:>7} {:>10} {:>10} {:>10}\n",
        "RPC", "phase", "calls", "errors", "p50 ms", "p99 ms", "max ms"
    );
    for r in rows {
        let marker = if r.kind.steady_state() { "" } else { "  (not in p99)" };
        if r.calls == 0 && r.errors == 0 {
            out.push_str(&format!(
                "{:<18} {:<10} {:>9} {:>7} {:>10} {:>10} {:>10}{marker}\n",
                r.kind.name(),
                r.kind.phase(),
                0,
                0,
                "-",
                "-",
                "-"
            ));
            continue;
        }
        out.push_str(&format!(
            "{:<18} {:<10} {:>9} {:>7} {:>10.2} {:>10.2} {:>10.2}{marker}\n",
            r.kind.name(),
            r.kind.phase(),
            r.calls,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        ));
    }
    out
}

/// The worst p99 over the steady-state kinds that have samples, with that kind.
pub fn worst_steady_p99(rows: &[Row]) -> Option<(Kind, f64)> {
    rows.iter()
        .filter(|r| r.kind.steady_state() && r.calls > 0)
        .map(|r| (r.kind, r.p99_ms))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_p99_ignores_long_polls_and_setup() {
        let stats = Stats::default();
        stats.record(Kind::Await, Duration::from_secs(1));
        stats.record(Kind::Submit, Duration::from_millis(500));
        stats.record(Kind::Heartbeat, Duration::from_millis(2));
        stats.record(Kind::Report, Duration::from_millis(7));
        let (kind, p99) = worst_steady_p99(&stats.rows()).unwrap();
        assert_eq!(kind, Kind::Report);
        assert!((p99 - 7.0).abs() < 0.01, "{p99}");
        assert!(table(&stats.rows()).contains("ReportMetrics"));
    }
}
