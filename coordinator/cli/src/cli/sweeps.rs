//! CLI commands for sweeps: queue one from a file, list them, show a sweep's children with their
//! axis values, final loss and Dice, and cancel or resume every child at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use coordinator::sweep::SweepFile;
use protocol::pb;
use serde_json::{Value, json};

use super::Remote;
use super::client::connect;
use super::output::*;
use super::spec_files::{SPEC_FILE_CAP, dir_of, read_capped, resolve_axis, resolve_table};

/// Reads a sweep file, inlines its base spec (a path relative to the sweep file), makes local
/// paths absolute against the file that wrote them (the base's against the base file, the axes'
/// and an inline base's against the sweep file), and expands it to check every child here first.
pub fn load_sweep(path: &Path) -> anyhow::Result<(SweepFile, usize)> {
    let text = read_capped(path, SPEC_FILE_CAP, "sweep file")?;
    let source = path.display().to_string();
    let dir = dir_of(path)?;
    let mut base_file = None;
    let mut sweep = SweepFile::parse(&text, &source, |base| {
        let base_path = dir.join(base);
        let text = read_capped(&base_path, SPEC_FILE_CAP, "base spec").map_err(|e| format!("{e:#}"));
        base_file = Some(base_path);
        text
    })?;
    let base_dir = match &base_file {
        Some(file) => dir_of(file)?,
        None => dir.clone(),
    };
    let in_file = |file: &Option<PathBuf>| file.as_deref().unwrap_or(path).display().to_string();
    resolve_table(&mut sweep.base, &base_dir).with_context(|| format!("base spec {}", in_file(&base_file)))?;
    for (key, values) in &mut sweep.axes {
        resolve_axis(key, values, &dir).with_context(|| format!("sweep file {}", path.display()))?;
    }
    let children = sweep.expand(&source)?.len();
    Ok((sweep, children))
}

pub async fn submit(remote: &Remote, path: &Path, dry_run: bool) -> anyhow::Result<ExitCode> {
    let (sweep, children) = load_sweep(path)?;
    if dry_run {
        let expanded = sweep.expand(&path.display().to_string())?;
        if remote.json {
            let list: Vec<Value> = expanded
                .iter()
                .map(|c| json!({"name": c.spec.name, "values": c.values.iter().map(coordinator::sweep::literal).collect::<Vec<_>>()}))
                .collect();
            println!(
                "{}",
                json!({"name": sweep.name, "axes": sweep.axis_keys(), "runs": list})
            );
        } else {
            println!("{} expands to {children} valid runs:", path.display());
            for c in expanded {
                println!("  {}", c.spec.name);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let req = pb::SubmitSweepRequest {
        sweep_toml: sweep.to_toml(),
        source_name: path.display().to_string(),
    };
    let info = remote.call(connect(remote).await?.submit_sweep(req)).await?;
    if remote.json {
        println!("{}", sweep_json(&info));
    } else {
        println!(
            "submitted {} ({}): {} runs over {}, priority {}",
            info.sweep_id,
            info.name,
            info.runs,
            info.axes.join(" × "),
            priority_text(&info)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether an axis sets each child's priority, so no single number is the sweep's.
fn priority_by_axis(s: &pb::SweepInfo) -> bool {
    s.axes.iter().any(|a| a == "priority")
}

fn priority_text(s: &pb::SweepInfo) -> String {
    if priority_by_axis(s) {
        "by axis".into()
    } else {
        s.priority.to_string()
    }
}

fn sweep_json(s: &pb::SweepInfo) -> Value {
    // null when an axis sets each child's; the children carry their own.
    let priority = (!priority_by_axis(s)).then_some(s.priority);
    json!({
        "sweep_id": s.sweep_id, "name": s.name, "priority": priority, "axes": s.axes, "runs": s.runs,
        "states": s.states, "submitted_unix_ms": s.submitted_unix_ms,
    })
}

fn states_summary(s: &pb::SweepInfo) -> String {
    let mut states: Vec<(&String, &u32)> = s.states.iter().collect();
    states.sort();
    states
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn list(remote: &Remote) -> anyhow::Result<ExitCode> {
    let sweeps = remote
        .call(connect(remote).await?.list_sweeps(pb::ListSweepsRequest {}))
        .await?
        .sweeps;
    if remote.json {
        println!("{}", json!(sweeps.iter().map(sweep_json).collect::<Vec<_>>()));
    } else if sweeps.is_empty() {
        println!("no sweeps");
    } else {
        let rows: Vec<Vec<String>> = sweeps
            .iter()
            .map(|s| {
                vec![
                    s.sweep_id.clone(),
                    s.name.clone(),
                    priority_text(s),
                    s.runs.to_string(),
                    states_summary(s),
                    unix_ms(s.submitted_unix_ms),
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["SWEEP", "NAME", "PRI", "RUNS", "STATES", "SUBMITTED"], &rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn optional(has: bool, value: f64) -> Option<f64> {
    has.then_some(value)
}

pub async fn show(remote: &Remote, sweep_id: &str) -> anyhow::Result<ExitCode> {
    // A large sweep comes in pages, each under the message limit.
    let mut client = connect(remote).await?;
    let mut req = pb::GetSweepRequest {
        sweep_id: sweep_id.into(),
        ..Default::default()
    };
    let mut detail = remote.call(client.get_sweep(req.clone())).await?;
    while !detail.next_page_token.is_empty() {
        req.page_token = std::mem::take(&mut detail.next_page_token);
        let page = remote.call(client.get_sweep(req.clone())).await?;
        detail.children.extend(page.children);
        for id in page.manifest_ids.split(',').filter(|m| !m.is_empty()) {
            if !detail.manifest_ids.split(',').any(|m| m == id) {
                detail.manifest_ids = [detail.manifest_ids.as_str(), id].join(",");
            }
        }
        detail.next_page_token = page.next_page_token;
    }
    let info = detail.sweep.clone().unwrap_or_default();
    if remote.json {
        let children: Vec<Value> = detail
            .children
            .iter()
            .map(|c| {
                let run = c.run.clone().unwrap_or_default();
                let values: serde_json::Map<String, Value> = info
                    .axes
                    .iter()
                    .zip(&c.values)
                    .map(|(k, v)| (k.clone(), toml_literal_json(v)))
                    .collect();
                json!({
                    "run_id": run.run_id, "values": values, "priority": run.priority, "state": run.state, "step": run.step,
                    "total_steps": run.total_steps, "train_cases": c.train_cases,
                    "final_loss": optional(c.has_final_loss, c.final_loss),
                    "final_dice": optional(c.has_final_dice, c.final_dice),
                    "message": run_message(&run),
                })
            })
            .collect();
        let manifests: Vec<&str> = detail.manifest_ids.split(',').filter(|m| !m.is_empty()).collect();
        println!(
            "{}",
            json!({"sweep": sweep_json(&info), "manifests": manifests, "children": children})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} ({}): {} runs, priority {}; {}\n",
        info.sweep_id,
        info.name,
        info.runs,
        priority_text(&info),
        states_summary(&info)
    );
    let mut headers: Vec<&str> = vec!["RUN"];
    headers.extend(info.axes.iter().map(String::as_str));
    headers.extend(["PRI", "STATE", "STEP", "LOSS", "DICE", "MESSAGE"]);
    let rows: Vec<Vec<String>> = detail
        .children
        .iter()
        .map(|c| {
            let run = c.run.clone().unwrap_or_default();
            let mut row = vec![run.run_id.clone()];
            row.extend(c.values.iter().cloned());
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            row.extend([
                run.priority.to_string(),
                run.state.clone(),
                format!("{}/{}", run.step, run.total_steps),
                fmt(optional(c.has_final_loss, c.final_loss)),
                fmt(optional(c.has_final_dice, c.final_dice)),
                run_message(&run),
            ]);
            row
        })
        .collect();
    println!("{}", table(&headers, &rows));
    Ok(ExitCode::SUCCESS)
}

/// An axis value as JSON: numbers stay numbers, strings lose their TOML quotes.
fn toml_literal_json(literal: &str) -> Value {
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {literal}"));
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v) => serde_json::to_value(v).unwrap_or(Value::String(literal.to_string())),
        None => Value::String(literal.to_string()),
    }
}

pub async fn act(remote: &Remote, sweep_id: &str, resume: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(remote).await?;
    let req = pb::GetSweepRequest {
        sweep_id: sweep_id.into(),
        ..Default::default()
    };
    let resp = if resume {
        remote.call(client.resume_sweep(req)).await?
    } else {
        remote.call(client.cancel_sweep(req)).await?
    };
    if remote.json {
        let results: Vec<Value> = resp
            .results
            .iter()
            .map(|r| json!({"run_id": r.run_id, "changed": r.changed, "message": r.message}))
            .collect();
        let sweep = resp.sweep.as_ref().map(sweep_json);
        println!("{}", json!({"sweep": sweep, "results": results}));
    } else {
        let rows: Vec<Vec<String>> = resp
            .results
            .iter()
            .map(|r| {
                vec![
                    r.run_id.clone(),
                    if r.changed { "yes" } else { "no" }.into(),
                    r.message.clone(),
                ]
            })
            .collect();
        let verb = if resume { "RESUMED" } else { "CANCELLED" };
        println!("{}", table(&["RUN", verb, "DETAIL"], &rows));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn manifests(remote: &Remote) -> anyhow::Result<ExitCode> {
    let manifests = remote
        .call(connect(remote).await?.list_manifests(pb::ListManifestsRequest {}))
        .await?
        .manifests;
    if remote.json {
        let list: Vec<Value> = manifests
            .iter()
            .map(|m| json!({"manifest_id": m.manifest_id, "dataset_url": m.dataset_url, "order_seed": m.order_seed, "cases": m.cases, "frozen_unix_ms": m.frozen_unix_ms}))
            .collect();
        println!("{}", json!(list));
    } else if manifests.is_empty() {
        println!("no frozen manifests (the first submit over a dataset freezes one)");
    } else {
        let rows: Vec<Vec<String>> = manifests
            .iter()
            .map(|m| {
                vec![
                    m.manifest_id.clone(),
                    m.dataset_url.clone(),
                    m.order_seed.to_string(),
                    m.cases.len().to_string(),
                    unix_ms(m.frozen_unix_ms),
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["MANIFEST", "DATASET", "ORDER SEED", "CASES", "FROZEN"], &rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Path-or-subcommand parsing lives in clap; this checks the one combination it cannot.
pub fn require_file(file: Option<&Path>) -> anyhow::Result<&Path> {
    file.ok_or_else(|| {
        anyhow::anyhow!(
            "give a sweep file (`coordinator sweep configs/demo-scaling.toml`) or a subcommand (show, cancel, resume)"
        )
    })
}
