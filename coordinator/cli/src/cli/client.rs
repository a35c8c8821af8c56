//! CLI commands that talk to a running coordinator over gRPC.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use protocol::auth::AuthChannel;
use protocol::auth::SharedToken;
use protocol::pb;
use protocol::pb::control_service_client::ControlServiceClient;
use protocol::spec::RunSpec;
use serde_json::json;

use super::Remote;
use super::output::*;
use super::remote::Effect;

pub async fn connect(remote: &Remote) -> anyhow::Result<ControlServiceClient<AuthChannel>> {
    remote.connect().await
}

/// A client of an in-process coordinator (the demo's) whose requests carry `token`.
pub async fn connect_with(endpoint: &str, token: &SharedToken) -> anyhow::Result<ControlServiceClient<AuthChannel>> {
    let channel = async {
        tonic::transport::Endpoint::from_shared(endpoint.to_string())?
            .connect()
            .await
    };
    let channel = channel
        .await
        .with_context(|| format!("cannot reach the coordinator at {endpoint} (is `coordinator serve` running?)"))?;
    Ok(ControlServiceClient::new(token.channel(channel)))
}

/// Reads and validates a spec file; errors name the file and the field. Its relative paths are
/// made absolute against the file's directory (see `spec_files`), so the coordinator and workers
/// (which may run elsewhere in the file system) read what the user meant.
pub fn load_spec(path: &Path) -> anyhow::Result<RunSpec> {
    let text = super::spec_files::read_capped(path, super::spec_files::SPEC_FILE_CAP, "run spec")?;
    let mut spec = RunSpec::from_toml(&text, &path.display().to_string())?;
    let spec_dir = super::spec_files::dir_of(path)?;
    super::spec_files::resolve_spec(&mut spec, &spec_dir).with_context(|| format!("run spec {}", path.display()))?;
    Ok(spec)
}

pub fn submit_request(spec: &RunSpec, source: &str) -> pb::SubmitRunRequest {
    pb::SubmitRunRequest {
        spec_toml: spec.to_toml(),
        source_name: source.to_string(),
    }
}

/// Submits without a deadline: the demo's own coordinator, in this process.
pub async fn submit_spec(
    client: &mut ControlServiceClient<AuthChannel>,
    spec: &RunSpec,
    source: &str,
) -> anyhow::Result<pb::RunInfo> {
    let req = submit_request(spec, source);
    Ok(client.submit_run(req).await.map_err(status_error)?.into_inner())
}

pub async fn submit(remote: &Remote, path: &Path, priority: Option<i32>) -> anyhow::Result<ExitCode> {
    let mut spec = load_spec(path)?;
    if let Some(p) = priority {
        spec.priority = p;
    }
    let req = submit_request(&spec, &path.display().to_string());
    let effect = Effect::Write("check `coordinator runs` for the run before submitting it again");
    let run = remote.call_as(effect, connect(remote).await?.submit_run(req)).await?;
    if remote.json {
        println!("{}", run_json(&run));
    } else {
        println!(
            "submitted {} ({}): {}, needs {} workers",
            run.run_id, run.name, run.state, run.world_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What `coordinator runs` asks for.
pub struct RunsFilter {
    pub sweep: Option<String>,
    pub state: Option<String>,
    pub limit: Option<u32>,
    /// Follow the pages to the end.
    pub all: bool,
}

pub async fn runs(remote: &Remote, filter: &RunsFilter) -> anyhow::Result<ExitCode> {
    let mut client = connect(remote).await?;
    let mut req = pb::ListRunsRequest {
        sweep_id: filter.sweep.clone().unwrap_or_default(),
        state: filter.state.clone().unwrap_or_default(),
        limit: filter.limit.unwrap_or(0),
        page_token: String::new(),
    };
    let mut runs = vec![];
    let total = loop {
        let page = remote.call_as(Effect::Read, client.list_runs(req.clone())).await?;
        runs.extend(page.runs);
        let more = !page.next_page_token.is_empty();
        let wanted = filter.limit.is_none_or(|n| runs.len() < n as usize);
        if !(more && wanted && (filter.all || filter.limit.is_some())) {
            break page.total as usize;
        }
        req.page_token = page.next_page_token;
    };
    if let Some(n) = filter.limit {
        runs.truncate(n as usize);
    }
    if runs.len() < total {
        // On stderr, so a JSON or piped listing stays what it was.
        eprintln!(
            "showing the newest {} of {total} runs; `--all` lists every one, `--limit N` the newest N",
            runs.len()
        );
    }
    if remote.json {
        println!("{}", json!(runs.iter().map(run_json).collect::<Vec<_>>()));
    } else if runs.is_empty() {
        println!("no runs");
    } else {
        println!("{}", table(&RUN_HEADERS, &runs.iter().map(run_row).collect::<Vec<_>>()));
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's message is written for people; the gRPC code and metadata are not.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Everything the coordinator knows of one run.
pub async fn run_detail(remote: &Remote, run_id: &str) -> anyhow::Result<pb::RunDetail> {
    let req = pb::GetRunRequest { run_id: run_id.into() };
    remote.call_as(Effect::Read, connect(remote).await?.get_run(req)).await
}

pub async fn show(remote: &Remote, run_id: &str) -> anyhow::Result<ExitCode> {
    let detail = run_detail(remote, run_id).await?;
    let run = detail.run.clone().unwrap_or_default();
    if remote.json {
        println!(
            "{}",
            json!({
                "run": run_json(&run),
                "spec_toml": detail.spec_toml,
                "train_cases": detail.train_cases,
                "eval_cases": detail.eval_cases,
                "checkpoints": detail.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>(),
                "latest_metrics": detail.latest_metrics.iter().map(metric_json).collect::<Vec<_>>(),
                "events": detail.events.iter().map(event_json).collect::<Vec<_>>(),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", table(&RUN_HEADERS, &[run_row(&run)]));
    println!(
        "\ncases: {} train, {} held out; workers: {}\nretry budget: {}",
        detail.train_cases,
        detail.eval_cases,
        run.workers.join(", "),
        run.retry_budget
    );
    if detail.checkpoints.is_empty() {
        println!("\nno checkpoints yet");
    } else {
        let rows: Vec<Vec<String>> = detail
            .checkpoints
            .iter()
            .map(|c| {
                let bytes = checkpoint_bytes(c);
                vec![
                    c.step.to_string(),
                    checkpoint_marks(c),
                    c.prefix.clone(),
                    bytes.to_string(),
                    unix_ms(c.committed_unix_ms),
                ]
            })
            .collect();
        println!("\n{}", table(&["STEP", "", "PREFIX", "BYTES", "COMMITTED"], &rows));
    }
    if !detail.events.is_empty() {
        let rows: Vec<Vec<String>> = detail
            .events
            .iter()
            .map(|e| {
                vec![
                    unix_ms(e.unix_ms),
                    e.kind.clone(),
                    e.step.to_string(),
                    e.message.clone(),
                ]
            })
            .collect();
        println!("\n{}", table(&["WHEN", "EVENT", "STEP", "DETAIL"], &rows));
    }
    if !detail.latest_metrics.is_empty() {
        let rows: Vec<Vec<String>> = detail
            .latest_metrics
            .iter()
            .map(|m| vec![m.name.clone(), format!("{:.6}", m.value), m.step.to_string()])
            .collect();
        println!("\n{}", table(&["METRIC", "LATEST", "STEP"], &rows));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn metrics(remote: &Remote, run_id: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let req = pb::StreamMetricsRequest {
        run_id: run_id.into(),
        follow,
        from_seq: 0,
    };
    let mut stream = remote
        .call_as(Effect::Read, connect(remote).await?.stream_metrics(req))
        .await?;
    if !remote.json {
        println!("{}", table(&["STEP", "RANK", "METRIC", "VALUE"], &[]));
    }
    let mut final_state = String::new();
    loop {
        // Points of a followed run come as it trains, however slowly; only a finite listing
        // has a deadline per message.
        let next = if follow {
            match stream.message().await {
                Ok(next) => next,
                Err(status) => return Err(remote.failed(status, Effect::Read).await),
            }
        } else {
            remote.within_as(Effect::Read, stream.message()).await?
        };
        let Some(record) = next else { break };
        if !record.run_state.is_empty() {
            final_state = record.run_state;
        }
        let Some(m) = record.metric else { continue };
        if remote.json {
            println!("{}", metric_json(&m));
        } else {
            println!("{:<6}  {:<4}  {:<32}  {:.6}", m.step, m.rank, m.name, m.value);
        }
    }
    if follow && !remote.json {
        println!("run {run_id} ended: {final_state}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn workers(remote: &Remote) -> anyhow::Result<ExitCode> {
    let workers = remote
        .call_as(
            Effect::Read,
            connect(remote).await?.list_workers(pb::ListWorkersRequest {}),
        )
        .await?
        .workers;
    if remote.json {
        let list: Vec<_> = workers
            .iter()
            .map(|w| {
                json!({
                    "worker_id": w.worker_id, "host": w.host, "peer_address": w.peer_address, "device": w.device_kind,
                    "state": w.state, "run_id": w.run_id, "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms,
                    "numeric_fingerprint": w.numeric_fingerprint,
                })
            })
            .collect();
        println!("{}", json!(list));
    } else if workers.is_empty() {
        println!("no workers registered");
    } else {
        let rows: Vec<Vec<String>> = workers
            .iter()
            .map(|w| {
                let seen = unix_ms(w.last_heartbeat_unix_ms);
                vec![
                    w.worker_id.clone(),
                    w.state.clone(),
                    w.device_kind.clone(),
                    w.peer_address.clone(),
                    w.run_id.clone(),
                    seen,
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["WORKER", "STATE", "DEVICE", "PEER", "RUN", "LAST HEARTBEAT"], &rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}
