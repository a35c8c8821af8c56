//! The tables and the RESULT line.

use crate::Point;
use crate::burn_step::StepReport;

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(report: Option<&StepReport>) -> String {
    match report {
        Some(r) if r.error.is_none() => format!("{:.1}", r.median_ms()),
        Some(_) => "failed".into(),
        None => "-".into(),
    }
}

/// Ours over PyTorch's median step, when both ran.
pub fn ratio(point: &Point) -> Option<f64> {
    let torch = point.torch.as_ref().filter(|t| t.error.is_none())?;
    Some(point.ours.median_ms() / torch.median_ms())
}

pub fn progress_line(
    arch: &str,
    patch: usize,
    threads: usize,
    ours: &StepReport,
    torch: Option<&StepReport>,
) -> String {
    let mut line = format!(
        "{arch} {patch}^3 T={threads}: ours {} ms, PyTorch {}",
        ms(Some(ours)),
        match torch {
            Some(t) if t.error.is_none() => format!("{:.1} ms", t.median_ms()),
            Some(_) => "failed".into(),
            None => "skipped".into(),
        }
    );
    if let Some(err) = torch.and_then(|t| t.error.as_deref()) {
        line += &format!(" (PyTorch: {err})");
    }
    line
}

pub fn print_tables(points: &[Point]) {
    println!("Median step time (forward + loss + backward + AdamW), ms:");
    println!(
        "{:<10} {:>6} {:>3} {:>11} {:>11} {:>10} {:>10} {:>7}",
        "backbone", "input", "T", "params", "torch params", "ours", "PyTorch", "ratio"
    );
    for p in points {
        let torch_params = p
            .torch
            .as_ref()
            .filter(|t| t.error.is_none())
            .map_or("-".into(), |t| t.params.to_string());
        println!(
            "{:<10} {:>6} {:>3} {:>11} {:>11} {:>10} {:>10} {:>7}",
            p.arch,
            format!("{}^3", p.patch),
            p.threads,
            p.ours.params,
            torch_params,
            ms(Some(&p.ours)),
            ms(p.torch.as_ref()),
            ratio(p).map_or("-".into(), |r| format!("{r:.2}x"))
        );
        if let Some(t) = p
            .torch
            .as_ref()
            .filter(|t| t.error.is_none() && t.params != p.ours.params)
        {
            println!(
                "  note: the architectures differ ({} parameters ours, {} PyTorch's)",
                p.ours.params, t.params
            );
        }
    }
    println!();
    println!("Phases (median ms) and peak RSS (MiB) per process:");
    println!(
        "{:<10} {:>3} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "backbone", "T", "side", "forward", "loss", "backward", "AdamW", "peak RSS"
    );
    for p in points {
        for (side, r) in [("ours", Some(&p.ours)), ("PyTorch", p.torch.as_ref())] {
            let Some(r) = r.filter(|r| r.error.is_none()) else {
                continue;
            };
            println!(
                "{:<10} {:>3} {:<8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.0}",
                p.arch, p.threads, side, r.forward_ms, r.loss_ms, r.backward_ms, r.optim_ms, r.peak_rss_mib
            );
        }
    }
    // Thread scaling: the speed-up from the fewest to the most threads, per side.
    let mut archs: Vec<&str> = points.iter().map(|p| p.arch.as_str()).collect();
    archs.dedup();
    let scaling: Vec<String> = archs
        .iter()
        .filter_map(|arch| {
            let mine: Vec<&Point> = points.iter().filter(|p| p.arch == *arch).collect();
            let (first, last) = (mine.first()?, mine.last()?);
            if first.threads == last.threads {
                return None;
            }
            let speedup = |a: Option<&StepReport>, b: Option<&StepReport>| match (a, b) {
                (Some(a), Some(b)) if a.error.is_none() && b.error.is_none() => {
                    format!("{:.2}x", a.median_ms() / b.median_ms())
                }
                _ => "-".into(),
            };
            Some(format!(
                "{arch} T={}->{}: ours {}, PyTorch {}",
                first.threads,
                last.threads,
                speedup(Some(&first.ours), Some(&last.ours)),
                speedup(first.torch.as_ref(), last.torch.as_ref())
            ))
        })
        .collect();
    if !scaling.is_empty() {
        println!();
        println!("Thread scaling (speed-up): {}", scaling.join("; "));
    }
    println!();
}

/// `RESULT ratio_vs_torch=X a=… b=…`: per backbone, ours / PyTorch at `threads`; `nan` where a
/// side did not run; X the geometric mean of the finite ratios.
pub fn result_line(points: &[Point], archs: &[&str], threads: usize) -> String {
    let ratios: Vec<(&str, Option<f64>)> = archs
        .iter()
        .map(|arch| {
            let r = points
                .iter()
                .find(|p| p.arch == *arch && p.threads == threads)
                .and_then(ratio);
            (*arch, r.filter(|r| r.is_finite()))
        })
        .collect();
    let finite: Vec<f64> = ratios.iter().filter_map(|(_, r)| *r).collect();
    let geomean = if finite.is_empty() {
        f64::NAN
    } else {
        (finite.iter().map(|r| r.ln()).sum::<f64>() / finite.len() as f64).exp()
    };
    let fmt = |r: Option<f64>| r.map_or("nan".into(), |r| format!("{r:.2}"));
    let mut line = format!("RESULT ratio_vs_torch={}", fmt(Some(geomean).filter(|g| g.is_finite())));
    for (arch, r) in ratios {
        line += &format!(" {arch}={}", fmt(r));
    }
    line
}
