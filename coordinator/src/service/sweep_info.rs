//! Sweeps and manifests as the CLI sees them: children with their axis values and the final loss
//! and Dice each reached, read from the newest value of each metric.

use protocol::pb;
use tonic::Status;

use super::control_api::{latest_by_name, run_info_waiting};
use super::paging;
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

/// One page of a sweep's children, from the child at index `from` (the previous page's token).
pub fn sweep_detail(
    coord: &Coordinator,
    view: &SweepView,
    from: Option<u64>,
    limit: u32,
) -> Result<pb::SweepDetail, Status> {
    // The children as `runs` shows them: queued ones with their place and why they wait.
    let waiting = coord.list_runs(Some(&view.sweep.id), None)?.waiting;
    let mut manifests: Vec<&str> = vec![];
    let mut children = vec![];
    let skip = from.map_or(0, |last| last as usize + 1);
    for (index, (child, run)) in view.children.iter().enumerate().skip(skip) {
        let latest = latest_by_name(coord.store().latest_metrics(&run.id).map_err(CoordError::from)?);
        let loss = latest.get(FINAL_LOSS).map(|m| m.value);
        let dice = latest.get(FINAL_DICE).map(|m| m.value);
        if !manifests.contains(&run.manifest_id.as_str()) {
            manifests.push(&run.manifest_id);
        }
        let child = pb::SweepChild {
            run: Some(run_info_waiting(run, waiting.get(&run.id))),
            values: child.values.clone(),
            final_loss: loss.unwrap_or(0.0),
            has_final_loss: loss.is_some(),
            final_dice: dice.unwrap_or(0.0),
            has_final_dice: dice.is_some(),
            train_cases: run.train_count,
        };
        children.push((index as u64, child));
        // Read the metrics of one child past the page at most: `page` decides where it ends.
        if children.len() > paging::items_per_page(limit) {
            break;
        }
    }
    let (children, next) = paging::page(children, limit);
    Ok(pb::SweepDetail {
        sweep: Some(sweep_info(view)),
        children,
        manifest_ids: manifests.join(","),
        next_page_token: next.map(|i| i.to_string()).unwrap_or_default(),
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
