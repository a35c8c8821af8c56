//! CLI commands that stop and restart runs: cancel, pause, resume, and the checkpoint listing
//! that says where a resume would start.

use std::process::ExitCode;

use protocol::pb;
use serde_json::json;

use super::Remote;
use super::client::{connect, run_detail};
use super::output::*;

fn print_run(remote: &Remote, run: &pb::RunInfo, what: &str) {
    if remote.json {
        println!("{}", run_json(run));
    } else {
        println!("{} is now {}: {what}", run.run_id, run.state);
    }
}

pub async fn cancel(remote: &Remote, run_id: &str) -> anyhow::Result<ExitCode> {
    let req = pb::CancelRunRequest { run_id: run_id.into() };
    let run = remote.call(connect(remote).await?.cancel_run(req)).await?;
    print_run(remote, &run, "its workers stop and take other work");
    Ok(ExitCode::SUCCESS)
}

pub async fn pause(remote: &Remote, run_id: &str) -> anyhow::Result<ExitCode> {
    let req = pb::PauseRunRequest { run_id: run_id.into() };
    let run = remote.call(connect(remote).await?.pause_run(req)).await?;
    let what = if run.state == "Paused" {
        "resume it with `coordinator resume`"
    } else {
        "rank 0 checkpoints at the next step boundary, then the run pauses"
    };
    print_run(remote, &run, what);
    Ok(ExitCode::SUCCESS)
}

pub async fn resume(
    remote: &Remote,
    run_id: &str,
    world_size: Option<u32>,
    from_scratch: bool,
) -> anyhow::Result<ExitCode> {
    let req = pb::ResumeRunRequest {
        run_id: run_id.into(),
        world_size,
        from_scratch,
    };
    let run = remote.call(connect(remote).await?.resume_run(req)).await?;
    print_run(remote, &run, &run.message);
    Ok(ExitCode::SUCCESS)
}

pub async fn checkpoints(remote: &Remote, run_id: &str) -> anyhow::Result<ExitCode> {
    let detail = run_detail(remote, run_id).await?;
    if remote.json {
        println!(
            "{}",
            json!(detail.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>())
        );
    } else if detail.checkpoints.is_empty() {
        println!("run {run_id} has no committed checkpoints");
    } else {
        let rows: Vec<Vec<String>> = detail
            .checkpoints
            .iter()
            .map(|c| {
                vec![
                    if c.resume_candidate { "*".into() } else { String::new() },
                    c.step.to_string(),
                    checkpoint_marks(c),
                    unix_ms(c.committed_unix_ms),
                    checkpoint_bytes(c).to_string(),
                    checkpoint_digest(c)[..16].to_string(),
                    // Empty for a checkpoint committed by a worker of an earlier release.
                    c.weights_sha256.get(..16).unwrap_or_default().to_string(),
                    c.unusable.clone(),
                ]
            })
            .collect();
        println!(
            "{}",
            table(
                &[
                    "",
                    "STEP",
                    "KIND",
                    "COMMITTED",
                    "BYTES",
                    "SHA-256",
                    "WEIGHTS",
                    "UNUSABLE"
                ],
                &rows
            )
        );
        println!(
            "\n* = where `coordinator resume {run_id}` would start: its files exist with their committed sizes \
             (the resume reads them back and checks their hashes before it trusts them)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
