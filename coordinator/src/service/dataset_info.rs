//! Datasets and quarantine as the CLI sees them.

use protocol::classes::CLASSES;
use protocol::pb;

use crate::core::ScanOutcome;
use crate::records::{DatasetRecord, QuarantineRecord};

pub fn dataset_info(d: &DatasetRecord, quarantined: u32) -> pb::DatasetInfo {
    pb::DatasetInfo {
        name: d.name.clone(),
        url: d.url.clone(),
        cases: d.cases.len() as u32,
        missing_ct: d.missing_ct().len() as u32,
        quarantined,
        scanned_unix_ms: d.scanned_unix_ms,
        total_bytes: d.total_bytes(),
    }
}

pub fn scan_summary(o: &ScanOutcome) -> pb::ScanSummary {
    let d = &o.record;
    let mut masks_missing = vec![0u32; CLASSES.len()];
    for case in &d.cases {
        for (c, missing) in masks_missing.iter_mut().enumerate() {
            if !case.has_mask(c) {
                *missing += 1;
            }
        }
    }
    pb::ScanSummary {
        dataset: Some(dataset_info(d, o.quarantined)),
        objects: d.objects,
        total_bytes: d.total_bytes(),
        masks_missing,
        missing_ct: d.missing_ct(),
        ignored: d
            .ignored
            .iter()
            .map(|i| pb::IgnoredName {
                name: i.name.clone(),
                reason: i.reason.clone(),
            })
            .collect(),
        rescanned: o.change.rescanned,
        added: o.change.added.clone(),
        removed: o.change.removed.clone(),
        seconds: o.seconds,
        notes: o.notes.clone(),
    }
}

pub fn quarantined_case(dataset_name: String, q: QuarantineRecord) -> pb::QuarantinedCase {
    pb::QuarantinedCase {
        dataset_name,
        dataset_url: q.dataset_url,
        case_id: q.case_id,
        error: q.error,
        unix_ms: q.unix_ms,
        run_id: q.run_id,
        worker_id: q.worker_id,
    }
}
