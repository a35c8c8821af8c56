//! `dataset scan`, `datasets` and `dataset quarantine`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use protocol::classes::CLASSES;
use protocol::pb;
use serde_json::{Value, json};

use super::Remote;
use super::client::connect;
use super::output::*;
use super::remote::Effect;

/// A scan that went unanswered may have been stored.
const SCAN: Effect = Effect::Write("check `coordinator datasets` (its SCANNED time) before scanning again");

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line redrawn in place on a terminal; plain lines (at most one a second) otherwise.
struct Progress {
    tty: bool,
    last: Option<Instant>,
    started: Instant,
}

impl Progress {
    fn show(&mut self, p: &pb::ScanProgress) {
        let line = format!(
            "scanning: {} objects, {} folders, {:.1}s",
            p.objects,
            p.folders,
            self.started.elapsed().as_secs_f64()
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            println!("{line}");
            self.last = Some(Instant::now());
        }
    }

    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

pub async fn scan(remote: &Remote, url: &str, name: Option<&str>) -> anyhow::Result<ExitCode> {
    let url = absolute_local(url)?;
    let req = pb::ScanDatasetRequest {
        url: url.clone(),
        name: name.unwrap_or_default().to_string(),
    };
    let mut stream = remote.call_as(SCAN, connect(remote).await?.scan_dataset(req)).await?;
    let mut progress = Progress {
        tty: !remote.json && std::io::stderr().is_terminal() && std::io::stdout().is_terminal(),
        last: None,
        started: Instant::now(),
    };
    let summary = loop {
        let event = match remote.within_as(SCAN, stream.message()).await {
            Ok(Some(event)) => event.event,
            Ok(None) => anyhow::bail!("the coordinator closed the scan of {url} without a summary"),
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        match event {
            Some(pb::scan_dataset_event::Event::Progress(p)) if !remote.json => progress.show(&p),
            Some(pb::scan_dataset_event::Event::Summary(s)) => break s,
            _ => {}
        }
    };
    progress.finish();
    if remote.json {
        println!("{}", summary_json(&summary));
    } else {
        print_summary(&summary);
    }
    Ok(ExitCode::SUCCESS)
}

/// A plain relative path means the caller's directory, not the coordinator's.
fn absolute_local(url: &str) -> anyhow::Result<String> {
    if !url.contains("://") && Path::new(url).is_relative() {
        return Ok(super::spec_files::under_cwd(&std::env::current_dir()?, url));
    }
    Ok(url.to_string())
}

fn summary_json(s: &pb::ScanSummary) -> Value {
    let masks: serde_json::Map<String, Value> = CLASSES
        .iter()
        .zip(&s.masks_missing)
        .map(|(c, n)| (c.to_string(), json!(n)))
        .collect();
    json!({
        "dataset": s.dataset.as_ref().map(dataset_json), "objects": s.objects,
        "total_bytes": s.total_bytes, "masks_missing": masks, "missing_ct": s.missing_ct,
        "ignored": s.ignored.iter().map(|i| json!({"name": i.name, "reason": i.reason})).collect::<Vec<_>>(),
        "rescanned": s.rescanned, "added": s.added, "removed": s.removed, "seconds": s.seconds,
        "notes": s.notes,
    })
}

fn print_summary(s: &pb::ScanSummary) {
    let d = s.dataset.clone().unwrap_or_default();
    println!(
        "dataset {} ({}): {} cases, {}, {} objects listed in {:.2}s",
        d.name,
        d.url,
        d.cases,
        human_bytes(s.total_bytes),
        s.objects,
        s.seconds
    );
    if s.rescanned {
        let list = |ids: &[String]| {
            let shown: Vec<&str> = ids.iter().take(10).map(String::as_str).collect();
            let more = ids.len().saturating_sub(shown.len());
            if ids.is_empty() {
                String::new()
            } else if more > 0 {
                format!(" ({} and {more} more)", shown.join(", "))
            } else {
                format!(" ({})", shown.join(", "))
            }
        };
        println!(
            "rescanned: {} cases added{}, {} removed{}",
            s.added.len(),
            list(&s.added),
            s.removed.len(),
            list(&s.removed)
        );
    }
    if !s.missing_ct.is_empty() {
        println!(
            "\nWARNING: {} case folder(s) have NO ct.nii.gz. They keep their place in the seeded \
             order but are QUARANTINED and skipped by every run until fixed and rescanned (or \
             cleared with `coordinator dataset quarantine {} --clear`):",
            s.missing_ct.len(),
            d.name
        );
        for id in &s.missing_ct {
            println!("  {id}");
        }
    }
    let missing: Vec<String> = CLASSES
        .iter()
        .zip(&s.masks_missing)
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    if missing.is_empty() {
        println!(
            "class masks: every case has all {} (absent ones train as empty masks)",
            CLASSES.len()
        );
    } else {
        println!(
            "cases missing a class mask (trained as an empty mask): {}",
            missing.join(", ")
        );
    }
    if !s.ignored.is_empty() {
        println!("ignored {} name(s) that are not case folders:", s.ignored.len());
        for i in &s.ignored {
            println!("  {}: {}", i.name, i.reason);
        }
    }
    if d.quarantined > 0 {
        println!(
            "quarantined: {} case(s); see `coordinator dataset quarantine {}`",
            d.quarantined, d.name
        );
    }
    for note in &s.notes {
        println!("\nNOTE: {note}");
    }
}

fn dataset_json(d: &pb::DatasetInfo) -> Value {
    json!({
        "name": d.name, "url": d.url, "cases": d.cases, "missing_ct": d.missing_ct,
        "quarantined": d.quarantined, "scanned_unix_ms": d.scanned_unix_ms, "total_bytes": d.total_bytes,
    })
}

pub async fn list(remote: &Remote) -> anyhow::Result<ExitCode> {
    let datasets = remote
        .call_as(
            Effect::Read,
            connect(remote).await?.list_datasets(pb::ListDatasetsRequest {}),
        )
        .await?
        .datasets;
    if remote.json {
        println!("{}", json!(datasets.iter().map(dataset_json).collect::<Vec<_>>()));
    } else if datasets.is_empty() {
        println!("no datasets (scan one with `coordinator dataset scan URL`; a submit scans its URL too)");
    } else {
        let rows: Vec<Vec<String>> = datasets
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.url.clone(),
                    d.cases.to_string(),
                    d.missing_ct.to_string(),
                    d.quarantined.to_string(),
                    human_bytes(d.total_bytes),
                    unix_ms(d.scanned_unix_ms),
                ]
            })
            .collect();
        let headers = ["NAME", "URL", "CASES", "MISSING CT", "QUARANTINED", "SIZE", "SCANNED"];
        println!("{}", table(&headers, &rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Lists a dataset's quarantine, or clears it (`clear`: Some("") for all, Some(case) for one).
pub async fn quarantine(remote: &Remote, dataset: Option<&str>, clear: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut client = connect(remote).await?;
    if let Some(case) = clear {
        let Some(dataset) = dataset else {
            anyhow::bail!("--clear needs the dataset: `coordinator dataset quarantine NAME --clear [CASE]`");
        };
        let req = pb::ClearQuarantineRequest {
            dataset: dataset.to_string(),
            case_id: case.to_string(),
        };
        let effect = Effect::Write("check `coordinator dataset quarantine` before clearing again");
        let cleared = remote.call_as(effect, client.clear_quarantine(req)).await?.cleared;
        // Clearing all passes over cases without a CT (no run could read them): say which stay.
        let kept = if case.is_empty() {
            let req = pb::ListQuarantineRequest {
                dataset: dataset.to_string(),
            };
            remote.call_as(Effect::Read, client.list_quarantine(req)).await?.cases
        } else {
            vec![]
        };
        if remote.json {
            let kept: Vec<Value> = kept
                .iter()
                .map(|q| json!({"case_id": q.case_id, "error": q.error}))
                .collect();
            println!("{}", json!({"dataset": dataset, "cleared": cleared, "kept": kept}));
        } else if case.is_empty() {
            println!("cleared {cleared} quarantined case(s) of {dataset}; later runs use them again");
            if !kept.is_empty() {
                println!(
                    "{} case(s) stay quarantined: no run could read them (add the missing file and \
                     rescan with `coordinator dataset scan`, which lifts these by itself):",
                    kept.len()
                );
                for q in &kept {
                    println!("  {}: {}", q.case_id, q.error);
                }
            }
        } else {
            println!("cleared {case} of {dataset}; later runs use it again");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let req = pb::ListQuarantineRequest {
        dataset: dataset.unwrap_or_default().to_string(),
    };
    let cases = remote.call_as(Effect::Read, client.list_quarantine(req)).await?.cases;
    if remote.json {
        let list: Vec<Value> = cases
            .iter()
            .map(|q| {
                json!({
                    "dataset": q.dataset_name, "dataset_url": q.dataset_url, "case_id": q.case_id,
                    "error": q.error, "unix_ms": q.unix_ms, "run_id": q.run_id, "worker_id": q.worker_id,
                })
            })
            .collect();
        println!("{}", json!(list));
    } else if cases.is_empty() {
        println!("no quarantined cases");
    } else {
        let rows: Vec<Vec<String>> = cases
            .iter()
            .map(|q| {
                let by = if q.run_id.is_empty() {
                    "scan".to_string()
                } else {
                    format!("{} on {}", q.worker_id, q.run_id)
                };
                let dataset = if q.dataset_name.is_empty() {
                    &q.dataset_url
                } else {
                    &q.dataset_name
                };
                vec![
                    dataset.clone(),
                    q.case_id.clone(),
                    q.error.clone(),
                    unix_ms(q.unix_ms),
                    by,
                ]
            })
            .collect();
        println!("{}", table(&["DATASET", "CASE", "ERROR", "WHEN", "REPORTED BY"], &rows));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(700_000_000_000), "700.0 GB");
    }
}
