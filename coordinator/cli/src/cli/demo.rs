//! `coordinator demo`: the whole path on one machine. Synthesises phantoms if the dataset is
//! missing, starts the coordinator in this process, spawns worker processes from this same
//! executable, submits configs/demo.toml, shows progress, and prints held-out Dice of the
//! untrained and the trained model.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::classes::{CLASSES, LARGE_ORGANS};
use protocol::pb;
use protocol::spec::RunSpec;
use tokio::process::{Child, Command};

use protocol::auth::{AuthChannel, SharedToken, TOKEN_ENV, TOKEN_FILE_ENV};

use super::client::{connect_with, submit_spec};

const DEMO_SPEC: &str = include_str!("../../../../configs/demo.toml");

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Directory for the dataset, the sled store, checkpoints and worker logs.
    #[arg(long, default_value = "./demo")]
    pub dir: PathBuf,
    /// Worker processes to spawn (the run's world size).
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Training steps (default: the value in configs/demo.toml).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Phantoms to synthesise when the dataset folder is empty (at least 1).
    #[arg(long, default_value_t = 24, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub cases: usize,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // Its workers must be stopped on the way out, whoever reads its output.
    super::output::keep_running_on_closed_stdout();
    let started = Instant::now();
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let dataset = dir.join("dataset");
    ensure_dataset(&dataset, args.cases).await?;

    // The demo runs with authentication on, as a deployment should: the caller's token, or a
    // fresh one that only this demo's processes know.
    let token = match SharedToken::resolve(
        std::env::var_os(TOKEN_FILE_ENV)
            .filter(|v| !v.is_empty())
            .as_deref()
            .map(Path::new),
    )? {
        t if t.is_set() => t,
        _ => SharedToken::new(&hex::encode(rand::random::<[u8; 16]>()))?,
    };
    let server = coordinator::server::start(
        "127.0.0.1:0".parse()?,
        &dir.join("coordinator"),
        Default::default(),
        &token,
    )
    .await?;
    let endpoint = format!("http://{}", server.addr);
    println!(
        "coordinator listening on {} (store: {})",
        server.addr,
        dir.join("coordinator").display()
    );

    let mut spec = RunSpec::from_toml(DEMO_SPEC, "configs/demo.toml")?;
    spec.dataset.url = dataset.display().to_string();
    spec.artifacts.url = dir.join("store").display().to_string();
    spec.world_size = args.workers;
    if let Some(steps) = args.steps {
        spec.train.steps = steps;
        spec.train.warmup_steps = spec.train.warmup_steps.min(steps / 10);
    }
    spec.validate("demo settings")?;

    let mut children = spawn_workers(&dir, &endpoint, &token, args.workers)?;
    let mut client = connect_with(&endpoint, &token).await?;
    let run = submit_spec(&mut client, &spec, "configs/demo.toml").await?;
    println!(
        "submitted {} ({}): tiny U-Net, {} steps, {} workers, logs in {}",
        run.run_id,
        spec.name,
        spec.train.steps,
        spec.world_size,
        dir.join("logs").display()
    );

    // On Ctrl-C, cancel the run and take the workers down with us rather than orphaning them.
    let mut progress_client = client.clone();
    let state = tokio::select! {
        state = follow_progress(&mut progress_client, &run.run_id, spec.train.steps) => state?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: cancelling {} and stopping the workers", run.run_id);
            let _ = client.cancel_run(pb::CancelRunRequest { run_id: run.run_id.clone() }).await;
            for child in &mut children {
                let _ = child.kill().await;
            }
            server.stop().await?;
            return Ok(ExitCode::from(130));
        }
    };
    let detail = client
        .get_run(pb::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await?
        .into_inner();
    let info = detail.run.clone().unwrap_or_default();
    server.coordinator.begin_shutdown().await;
    for child in &mut children {
        if tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    if state != "Completed" {
        eprintln!("run {} ended {}: {}", run.run_id, state, info.message);
        eprintln!("worker logs: {}", dir.join("logs").display());
        server.stop().await?;
        return Ok(ExitCode::FAILURE);
    }
    print_dice(&mut client, &run.run_id).await?;
    let final_ckpt = detail
        .checkpoints
        .iter()
        .find(|c| c.is_final)
        .map(|c| c.prefix.clone())
        .unwrap_or_default();
    println!("\nfinal checkpoint: {}", dir.join("store").join(final_ckpt).display());
    println!("demo finished in {:.0}s", started.elapsed().as_secs_f64());
    server.stop().await?;
    Ok(ExitCode::SUCCESS)
}

async fn ensure_dataset(dataset: &Path, cases: usize) -> anyhow::Result<()> {
    let (store, root) = data::store_from_url(&dataset.display().to_string())?;
    if data::list_cases(store.as_ref(), &root)
        .await
        .is_ok_and(|c| !c.is_empty())
    {
        return Ok(());
    }
    println!("synthesising {cases} phantom CT cases into {} ...", dataset.display());
    let opts = data::SynthOptions {
        cases,
        ..Default::default()
    };
    let out = dataset.to_path_buf();
    tokio::task::spawn_blocking(move || data::write_phantom_dataset(&out, &opts)).await??;
    Ok(())
}

fn spawn_workers(dir: &Path, endpoint: &str, token: &SharedToken, n: u32) -> anyhow::Result<Vec<Child>> {
    let exe = std::env::current_exe().context("cannot find this executable to spawn workers")?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // Split the cores between the workers instead of letting each rayon pool take them all.
    let threads = (cores / n as usize).max(1).to_string();
    (0..n)
        .map(|i| {
            let log = std::fs::File::create(logs.join(format!("worker-{i}.log")))?;
            Command::new(&exe)
                .args(["worker", "--coordinator", endpoint, "--max-runs", "1"])
                .env("RAYON_NUM_THREADS", &threads)
                .env(TOKEN_ENV, token.expose().unwrap_or_default())
                // The workers take the token above and dial the demo's plain-HTTP coordinator,
                // whatever the caller's shell says.
                .env_remove(TOKEN_FILE_ENV)
                .env_remove(protocol::tls::TLS_CA_ENV)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("cannot spawn a worker process")
        })
        .collect()
}

/// Prints one line per progress report from rank 0 until the run ends; returns its final state.
async fn follow_progress(
    client: &mut pb::control_service_client::ControlServiceClient<AuthChannel>,
    run_id: &str,
    total: u64,
) -> anyhow::Result<String> {
    let req = |from_seq| pb::StreamMetricsRequest {
        run_id: run_id.into(),
        follow: true,
        from_seq,
    };
    let mut stream = client.stream_metrics(req(0)).await?.into_inner();
    let started = Instant::now();
    let mut first_step: Option<(u64, Instant)> = None;
    let mut loss = f64::NAN;
    while let Some(record) = stream.message().await? {
        if record.run_state == "Interrupted" {
            // The coordinator resumes it from its newest checkpoint by itself; follow on.
            println!("run interrupted; it resumes from its newest checkpoint as soon as workers are free");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            stream = client.stream_metrics(req(record.seq)).await?.into_inner();
            continue;
        }
        if !record.run_state.is_empty() {
            return Ok(record.run_state);
        }
        let Some(m) = record.metric.filter(|m| m.rank == 0) else {
            continue;
        };
        match m.name.as_str() {
            "eval/large_organ_dice" if m.step == 0 => {
                println!("untrained model: large-organ Dice {:.3} on held-out cases", m.value)
            }
            "train/loss" => loss = m.value,
            "train/step_seconds" => {
                let (s0, t0) = *first_step.get_or_insert((m.step, Instant::now()));
                let rate = if m.step > s0 {
                    (m.step - s0) as f64 / t0.elapsed().as_secs_f64()
                } else {
                    1.0 / m.value.max(1e-9)
                };
                let eta = total.saturating_sub(m.step) as f64 / rate.max(1e-9);
                println!(
                    "step {:>5}/{total}  loss {loss:.4}  {rate:.2} steps/s  elapsed {:>4.0}s  eta {eta:>4.0}s",
                    m.step,
                    started.elapsed().as_secs_f64()
                );
            }
            _ => {}
        }
    }
    anyhow::bail!("the metrics stream ended before the run did")
}

async fn print_dice(
    client: &mut pb::control_service_client::ControlServiceClient<AuthChannel>,
    run_id: &str,
) -> anyhow::Result<()> {
    let req = pb::StreamMetricsRequest {
        run_id: run_id.into(),
        follow: false,
        from_seq: 0,
    };
    let mut stream = client.stream_metrics(req).await?.into_inner();
    let (mut before, mut after) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut final_step = 0;
    let mut points = vec![];
    while let Some(record) = stream.message().await? {
        if let Some(m) = record.metric.filter(|m| m.name.starts_with("eval/")) {
            final_step = final_step.max(m.step);
            points.push(m);
        }
    }
    for m in points {
        let target = if m.step == 0 {
            &mut before
        } else if m.step == final_step {
            &mut after
        } else {
            continue;
        };
        target.insert(m.name, m.value);
    }
    println!("\nper-class Dice on held-out cases (untrained -> trained):");
    let fmt = |v: Option<&f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    for class in CLASSES {
        let key = format!("eval/dice/{class}");
        let marker = if LARGE_ORGANS.contains(&class) { "  *" } else { "" };
        println!(
            "  {class:<30} {:>6} -> {:>6}{marker}",
            fmt(before.get(&key)),
            fmt(after.get(&key))
        );
    }
    println!(
        "  {:<30} {:>6} -> {:>6}\n  {:<30} {:>6} -> {:>6}   (* large organs: liver, lungs, femurs)",
        "mean over classes",
        fmt(before.get("eval/mean_dice")),
        fmt(after.get("eval/mean_dice")),
        "large-organ mean",
        fmt(before.get("eval/large_organ_dice")),
        fmt(after.get("eval/large_organ_dice")),
    );
    Ok(())
}
