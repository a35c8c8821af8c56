//! Sweeps and manifests as the CLI sees them: children with their axis values and the final loss
//! and Dice each reached, read from the newest value of each metric.

use protocol::pb;
use tonic::Status;

use super::control_api::{latest_by_name, run_info_waiting};
use crate::core::{CoordError, Coordinator, SweepView};
use crate::records::ManifestRecord;

/// The metrics `sweep show` reports for each child.
const FINAL_LOSS: &str = "train/loss";
const FINAL_DICE: &str = "eval/mean_dice";

pub fn sweep_info(view: &SweepView) -> pb::SweepInfo {
    let s = &view.sweep;
    pb::SweepInfo {
        sweep_id: s.id.clone(),
        name: s.name.clone(),
        priority: s.priority,
        submitted_unix_ms: s.submitted_unix_ms,
        axes: s.axes.clone(),
        runs: s.children.len() as u32,
        states: view.states.clone().into_iter().collect(),
    }
}

pub fn sweep_detail(coord: &Coordinator, view: &SweepView) -> Result<pb::SweepDetail, Status> {
    // The children as `runs` shows them: queued ones with their place and why they wait.
    let infos: std::collections::HashMap<String, pb::RunInfo> = coord
        .list_runs(Some(&view.sweep.id), run_info_waiting)?
        .into_iter()
        .map(|info| (info.run_id.clone(), info))
        .collect();
    let mut children = Vec::with_capacity(view.children.len());
    let mut manifests: Vec<&str> = vec![];
    for (child, run) in &view.children {
        let latest = latest_by_name(coord.store().latest_metrics(&run.id).map_err(CoordError::from)?);
        let loss = latest.get(FINAL_LOSS).map(|m| m.value);
        let dice = latest.get(FINAL_DICE).map(|m| m.value);
        if !manifests.contains(&run.manifest_id.as_str()) {
            manifests.push(&run.manifest_id);
        }
        children.push(pb::SweepChild {
            run: infos.get(&run.id).cloned(),
            values: child.values.clone(),
            final_loss: loss.unwrap_or(0.0),
            has_final_loss: loss.is_some(),
            final_dice: dice.unwrap_or(0.0),
            has_final_dice: dice.is_some(),
            train_cases: run.train_count,
        });
    }
    Ok(pb::SweepDetail {
        sweep: Some(sweep_info(view)),
        children,
        manifest_ids: manifests.join(","),
    })
}

pub fn sweep_action(view: &SweepView, results: Vec<(String, bool, String)>) -> pb::SweepActionResponse {
    pb::SweepActionResponse {
        sweep: Some(sweep_info(view)),
        results: results
            .into_iter()
            .map(|(run_id, changed, message)| pb::SweepActionResult {
                run_id,
                changed,
                message,
            })
            .collect(),
    }
}

pub fn manifest_info(m: &ManifestRecord) -> pb::Manifest {
    pb::Manifest {
        manifest_id: m.id.clone(),
        dataset_url: m.dataset_url.clone(),
        order_seed: m.order_seed,
        cases: m.cases.clone(),
        frozen_unix_ms: m.frozen_unix_ms,
    }
}
