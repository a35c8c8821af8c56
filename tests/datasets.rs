//! Datasets end to end, against a real coordinator on loopback with the test playing the
//! workers: a scan reports and quarantines a case folder whose ct.nii.gz was deleted, the frozen
//! order still holds every case folder (so nested subsets keep their positions), a run named by
//! dataset trains on the requested count of good cases, a worker quarantines a bad case, and
//! `--clear` lifts it; case-id list files pick a subset in the dataset's order, and an unknown
//! id in one is refused by name.

use std::path::{Path, PathBuf};

use crate::common::{Cluster, fake_worker, poll};
use coordinator::manifest::seeded_order;
use protocol::pb;
use protocol::pb::await_assignment_response::Outcome;
use serde_json::Value;

fn case_ids(dataset: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(dataset)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("BDMAP_"))
        .collect();
    ids.sort();
    ids
}

/// The cluster's tiny spec, with `dataset_lines` in place of its `url = ...` line.
fn spec_with_dataset(cluster: &Cluster, name: &str, dataset_lines: &str) -> PathBuf {
    let path = cluster.write_spec(name, 1, 4, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let url_line = format!("url = \"{}\"", cluster.path("dataset").display());
    assert!(text.contains(&url_line));
    std::fs::write(&path, text.replace(&url_line, dataset_lines)).unwrap();
    path
}

fn quarantine(cluster: &Cluster, dataset: &str) -> Vec<Value> {
    cluster
        .cli_json(&["dataset", "quarantine", dataset])
        .as_array()
        .unwrap()
        .clone()
}

async fn manifest(cluster: &Cluster, id: &str) -> Vec<String> {
    let listed = cluster
        .control()
        .await
        .list_manifests(pb::ListManifestsRequest {})
        .await
        .unwrap()
        .into_inner()
        .manifests;
    listed
        .into_iter()
        .find(|m| m.manifest_id == id)
        .expect("manifest listed")
        .cases
}

#[tokio::test]
async fn a_deleted_ct_is_reported_quarantined_and_skipped_without_shifting_the_order() {
    let cluster = Cluster::start();
    let dataset = cluster.write_dataset(8);
    let ids = case_ids(&dataset);
    let gone = ids[2].clone();
    std::fs::remove_file(dataset.join(&gone).join("ct.nii.gz")).unwrap();

    // The scan names the case, loudly, and quarantines it.
    let out = cluster.cli(&["dataset", "scan", dataset.to_str().unwrap(), "--name", "atlas"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("8 cases") && stdout.contains("WARNING"), "{stdout}");
    assert!(stdout.contains(&gone) && stdout.contains("QUARANTINED"), "{stdout}");

    let listed = cluster.cli_json(&["datasets"]);
    let atlas = &listed.as_array().unwrap()[0];
    assert_eq!(
        (atlas["name"].as_str(), atlas["cases"].as_u64()),
        (Some("atlas"), Some(8))
    );
    assert_eq!(
        (atlas["missing_ct"].as_u64(), atlas["quarantined"].as_u64()),
        (Some(1), Some(1))
    );
    let held = quarantine(&cluster, "atlas");
    assert_eq!(held.len(), 1);
    assert_eq!(held[0]["case_id"], gone.as_str());
    assert_eq!(held[0]["error"], "missing ct.nii.gz");

    // A run named by dataset: 5 training cases asked for, 5 good ones given.
    let spec = spec_with_dataset(&cluster, "by-name", "name = \"atlas\"\ntrain_cases = 5");
    let run_id = cluster.submit(&spec);
    let detail = cluster.cli_json(&["show", &run_id]);
    assert_eq!(detail["train_cases"], 5);
    assert!(
        detail["spec_toml"]
            .as_str()
            .unwrap()
            .contains(dataset.to_str().unwrap()),
        "{detail}"
    );

    let (mut worker, worker_id) = fake_worker(&cluster, "127.0.0.1:11").await;
    let Some(Outcome::Assignment(a)) = poll(&mut worker, &worker_id, 5000).await else {
        panic!("no assignment")
    };
    assert_eq!(a.run_id, run_id);
    assert_eq!(a.quarantined, std::slice::from_ref(&gone));
    // The frozen order holds all 8 folders, the CT-less one included, in the seeded order of
    // the full listing: the other cases keep their positions.
    let order = manifest(&cluster, &a.manifest_id).await;
    assert_eq!(order, seeded_order(ids.clone(), 0));
    let cases = data::split::slice_cases(&order, a.train_count, a.eval_count, &a.quarantined).unwrap();
    assert_eq!(cases.train.len(), 5);
    assert!(!cases.train.contains(&gone) && !cases.eval.contains(&gone));

    // A worker reports a case it cannot decode: quarantined with its error, run and worker.
    let bad = cases.train[0].clone();
    let report = |case: &str| pb::ReportBadCaseRequest {
        run_id: run_id.clone(),
        worker_id: worker_id.clone(),
        case_id: case.to_string(),
        error: "truncated gzip in ct.nii.gz".into(),
        rank: a.rank,
        attempt: a.attempt,
    };
    // Only a rank of the run's current attempt may quarantine: not a worker that does not
    // exist, not another worker, not an older attempt. Each is refused and nothing is held.
    let other = cases.train[1].clone();
    for forged in [
        pb::ReportBadCaseRequest {
            worker_id: "w-999999".into(),
            ..report(&other)
        },
        pb::ReportBadCaseRequest {
            rank: 1,
            ..report(&other)
        },
        pb::ReportBadCaseRequest {
            attempt: a.attempt + 1,
            ..report(&other)
        },
    ] {
        let status = worker.report_bad_case(forged.clone()).await.unwrap_err();
        assert!(
            status.message().contains("refused to quarantine"),
            "{forged:?}: {}",
            status.message()
        );
    }
    // A registered worker that is not in the run.
    let (mut stranger, stranger_id) = fake_worker(&cluster, "127.0.0.1:12").await;
    let forged = pb::ReportBadCaseRequest {
        worker_id: stranger_id,
        ..report(&other)
    };
    let status = stranger.report_bad_case(forged).await.unwrap_err();
    assert!(status.message().contains("refused"), "{}", status.message());
    let answer = worker.report_bad_case(report(&bad)).await.unwrap().into_inner();
    assert!(answer.newly_quarantined);
    assert!(
        !worker
            .report_bad_case(report(&bad))
            .await
            .unwrap()
            .into_inner()
            .newly_quarantined
    );
    let status = worker.report_bad_case(report("BDMAP_99999999")).await.unwrap_err();
    assert!(status.message().contains("BDMAP_99999999"), "{}", status.message());
    let held = quarantine(&cluster, &dataset.display().to_string());
    let reported = held
        .iter()
        .find(|q| q["case_id"] == bad.as_str())
        .expect("reported case");
    assert_eq!(
        (reported["run_id"].as_str(), reported["worker_id"].as_str()),
        (Some(run_id.as_str()), Some(worker_id.as_str()))
    );
    let events = Cluster::event_kinds(&cluster.cli_json(&["show", &run_id]));
    assert!(events.contains(&"quarantined".to_string()), "{events:?}");
    assert!(
        !held.iter().any(|q| q["case_id"] == other.as_str()),
        "a refused report quarantined nothing: {held:?}"
    );
    // Once the run has ended, even its own rank's report is refused.
    cluster.cli_json(&["cancel", &run_id]);
    let status = worker.report_bad_case(report(&other)).await.unwrap_err();
    assert!(status.message().contains("Cancelled"), "{}", status.message());

    // A later run skips both and still gets the count it asks for; one asking for more good
    // cases than the 6 positions before the held-out set hold is refused, naming the quarantine.
    let later = cluster.submit(&spec_with_dataset(
        &cluster,
        "later",
        "name = \"atlas\"\ntrain_cases = 4",
    ));
    assert_eq!(cluster.cli_json(&["show", &later])["train_cases"], 4);
    let too_many = spec_with_dataset(&cluster, "too-many", "name = \"atlas\"\ntrain_cases = 6");
    let out = cluster.cli(&["submit", too_many.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("dataset.train_cases") && err.contains("quarantined"),
        "{err}"
    );

    // Clearing one case, then the rest; the case without a CT stays (no run could read it).
    let cleared = cluster.cli_json(&["dataset", "quarantine", "atlas", "--clear", &bad]);
    assert_eq!(cleared["cleared"], 1);
    assert_eq!(quarantine(&cluster, "atlas").len(), 1);
    let out = cluster.cli(&["dataset", "quarantine", "atlas", "--clear", "BDMAP_99999999"]);
    assert!(!out.status.success());
    let cleared = cluster.cli_json(&["dataset", "quarantine", "atlas", "--clear"]);
    assert_eq!(cleared["cleared"], 0);
    assert_eq!(cleared["kept"][0]["case_id"], gone.as_str(), "{cleared}");
    assert_eq!(quarantine(&cluster, "atlas").len(), 1);

    // The CT comes back; a rescan says nothing changed in the case set, lists no missing CT,
    // and lifts the case's quarantine.
    std::fs::copy(
        dataset.join(&ids[0]).join("ct.nii.gz"),
        dataset.join(&gone).join("ct.nii.gz"),
    )
    .unwrap();
    let again = cluster.cli_json(&["dataset", "scan", dataset.to_str().unwrap()]);
    assert_eq!(again["rescanned"], true);
    assert_eq!(again["dataset"]["name"], "atlas");
    assert!(again["missing_ct"].as_array().unwrap().is_empty() && again["added"].as_array().unwrap().is_empty());
    assert!(quarantine(&cluster, "atlas").is_empty());
    let table = String::from_utf8_lossy(&cluster.cli(&["dataset", "quarantine", "atlas"]).stdout).to_string();
    assert!(table.contains("no quarantined cases"), "{table}");
}

#[tokio::test]
async fn a_case_list_file_picks_a_subset_in_the_dataset_order() {
    let cluster = Cluster::start();
    let dataset = cluster.write_dataset(10);
    let ids = case_ids(&dataset);
    std::fs::create_dir_all(cluster.path("lists")).unwrap();
    let listed = [&ids[7], &ids[1], &ids[4], &ids[9], &ids[0], &ids[5]];
    let text = format!(
        "# a SuPreM-style subset\n{}\n\n{}\n{}\n{}\n{}\n{}\n",
        listed[0], listed[1], listed[2], listed[3], listed[4], listed[5]
    );
    std::fs::write(cluster.path("lists/sub.txt"), text).unwrap();

    // By URL, never scanned: the submit scans it first.
    let url_line = format!("url = \"{}\"", dataset.display());
    let spec = spec_with_dataset(
        &cluster,
        "subset",
        &format!("{url_line}\ncase_list = \"lists/sub.txt\"\ntrain_cases = 3"),
    );
    let run_id = cluster.submit(&spec);
    let datasets = cluster.cli_json(&["datasets"]);
    assert_eq!(datasets[0]["name"], "dataset");
    assert_eq!(datasets[0]["cases"], 10);

    let detail = cluster
        .control()
        .await
        .get_run(pb::GetRunRequest { run_id: run_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((detail.train_cases, detail.eval_cases), (3, 2));
    assert!(detail.spec_toml.contains("cases = ["), "{}", detail.spec_toml);
    let subset = manifest(&cluster, &detail.manifest_id).await;
    let full = seeded_order(ids.clone(), 0);
    let expect: Vec<String> = full.iter().filter(|c| listed.contains(c)).cloned().collect();
    assert_eq!(subset, expect, "the list's cases in the dataset's order");

    // An unknown id, and a malformed line, are named.
    std::fs::write(
        cluster.path("lists/unknown.txt"),
        format!("{}\nBDMAP_99999999\n", ids[0]),
    )
    .unwrap();
    let spec = spec_with_dataset(
        &cluster,
        "unknown",
        &format!("{url_line}\ncase_list = \"lists/unknown.txt\""),
    );
    let out = cluster.cli(&["submit", spec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("BDMAP_99999999") && err.contains("dataset.cases"),
        "{err}"
    );
    std::fs::write(cluster.path("lists/bad.txt"), format!("{}\nBDMAP 7\n", ids[0])).unwrap();
    let spec = spec_with_dataset(&cluster, "bad", &format!("{url_line}\ncase_list = \"lists/bad.txt\""));
    let out = cluster.cli(&["submit", spec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.txt:2"), "{err}");

    // A name nobody scanned is refused with the field.
    let spec = spec_with_dataset(&cluster, "nameless", "name = \"nope\"");
    let out = cluster.cli(&["submit", spec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("dataset.name") && err.contains("nope"),
        "{err}"
    );
}

/// A case whose CT is a truncated gzip fails to load on a worker: it is quarantined with the
/// error, the two-worker run still completes on the other cases, and the next run of the dataset
/// skips it without reading it.
#[test]
fn a_corrupt_case_is_quarantined_and_the_two_worker_run_goes_on() {
    let mut cluster = Cluster::start();
    let dataset = cluster.write_dataset(8);
    let ids = case_ids(&dataset);
    // 6 training cases read in the first 3 steps (2 ranks × 1 sample) and 2 held out, read by the
    // first evaluation: wherever the seeded order puts the broken case, the run reads it.
    let broken = ids[3].clone();
    let ct = dataset.join(&broken).join("ct.nii.gz");
    let bytes = std::fs::read(&ct).unwrap();
    std::fs::write(&ct, &bytes[..bytes.len() / 2]).unwrap();

    let spec = cluster.write_spec("corrupt", 2, 6, "");
    cluster.spawn_workers(2);
    let run_id = cluster.submit(&spec);
    let detail = cluster.wait_for_end(&run_id);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    assert_eq!(detail["run"]["step"], 6);

    let url = dataset.display().to_string();
    let held = quarantine(&cluster, &url);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["case_id"], broken.as_str());
    let error = held[0]["error"].as_str().unwrap();
    assert!(error.contains(&broken) && error.contains("ct.nii.gz"), "{error}");
    assert_eq!(held[0]["run_id"], run_id.as_str());

    // The next run is told about it at submit and never reads it: no new report arrives. (The
    // cluster's workers exit after one run.)
    cluster.spawn_workers(2);
    let again = cluster.write_spec("after", 2, 2, "");
    let second = cluster.submit(&again);
    let detail = cluster.wait_for_end(&second);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    let held = quarantine(&cluster, &url);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0]["run_id"], run_id.as_str());
}
