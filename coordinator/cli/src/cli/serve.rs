//! `coordinator serve`: the control plane as a long-lived process. Secure by default: it
//! requires a bearer token (its own, created in the data dir, when given none) unless told
//! `--insecure`, and speaks TLS when given a certificate and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use protocol::auth::{SharedToken, TOKEN_ENV, TOKEN_FILE_ENV};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Directory of the sled store (runs, workers, checkpoints, metrics), and of the bearer
    /// token the coordinator creates when given none (`<data-dir>/token`).
    #[arg(long, default_value = "./.voxelfleet")]
    data_dir: PathBuf,
    /// Seconds without a heartbeat after which a worker is dead and its run interrupted.
    #[arg(long, default_value_t = 10)]
    dead_after_secs: u64,
    /// File holding the bearer token every request must carry (else VOXELFLEET_TOKEN; with
    /// neither, `<data-dir>/token`, created on first start).
    #[arg(long, env = TOKEN_FILE_ENV, conflicts_with = "insecure")]
    token_file: Option<PathBuf>,
    /// Serve without a bearer token: anyone who can reach --listen may submit runs, read
    /// metrics and join as a worker. Only for a machine nobody else can reach.
    #[arg(long)]
    insecure: bool,
    /// PEM certificate (chain) to serve TLS with; clients then dial https:// with --tls-ca.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Where the token came from, for the line printed after the address.
enum TokenSource {
    Insecure,
    Env,
    File(PathBuf),
    Created(PathBuf),
}

/// The token to require: --token-file, VOXELFLEET_TOKEN, or the data dir's own (`None` here:
/// created on first start, once the data dir is ours). `--insecure` with a token configured
/// anyway is refused: one of them is a mistake, and guessing which could leave the coordinator
/// open.
fn configured_token(args: &ServeArgs) -> anyhow::Result<Option<(SharedToken, TokenSource)>> {
    let env_token = SharedToken::from_env()?;
    if args.insecure {
        anyhow::ensure!(
            !env_token.is_set(),
            "--insecure, but {TOKEN_ENV} is set: unset it to serve without a token, or drop --insecure"
        );
        return Ok(Some((SharedToken::none(), TokenSource::Insecure)));
    }
    if let Some(path) = &args.token_file {
        // The same check as the data dir's own token gets: a token others can read is a token
        // others can use.
        coordinator::token_file::warn_if_shared(path);
        return Ok(Some((SharedToken::from_file(path)?, TokenSource::File(path.clone()))));
    }
    if env_token.is_set() {
        return Ok(Some((env_token, TokenSource::Env)));
    }
    Ok(None)
}

/// The data dir's own token, created on first start.
fn data_dir_token(data_dir: &Path) -> anyhow::Result<(SharedToken, TokenSource)> {
    let path = data_dir.join(coordinator::token_file::TOKEN_FILE_NAME);
    let (token, origin) = coordinator::token_file::load_or_create(&path)?;
    let source = match origin {
        coordinator::token_file::Origin::Created => TokenSource::Created(path),
        coordinator::token_file::Origin::Existing => TokenSource::File(path),
    };
    Ok((token, source))
}

/// An absolute path to print, so it can be pasted into --token-file from anywhere.
fn shown(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // A reader that took the address line and left must not stop the service.
    super::output::keep_running_on_closed_stdout();
    let timing =
        coordinator::core::Timing::with_dead_after(std::time::Duration::from_secs(args.dead_after_secs.max(1)));
    // Everything that can be refused is checked before the data dir is touched: the flags,
    // the certificate, the port, and then the data dir's lock.
    let configured = configured_token(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(protocol::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let builder = coordinator::server::builder(tls)?;
    let listener = coordinator::server::bind(args.listen).await?;
    let opened = coordinator::server::open(&args.data_dir, timing).await?;
    let (token, source) = match configured {
        Some(configured) => configured,
        None => data_dir_token(&args.data_dir)?,
    };
    let mut server = coordinator::server::serve_on(builder, listener, opened, &token)?;
    if let TokenSource::Insecure = source {
        tracing::warn!(
            "--insecure: no bearer token is required; any process that can reach {} may use this coordinator",
            server.addr
        );
    }
    // Tests and scripts read the bound address from this line; it stays first and unchanged.
    println!(
        "coordinator listening on {} (store: {})",
        server.addr,
        args.data_dir.display()
    );
    let second = match &source {
        TokenSource::Created(path) => Some(format!(
            "bearer token created in {} (mode 0600): give it to workers and CLI users with --token-file",
            shown(path)
        )),
        TokenSource::File(path) => Some(format!("bearer token read from {}", shown(path))),
        // Whoever set the variable knows where the token is; printing nothing here also keeps
        // the output of existing scripts as it was.
        TokenSource::Env => None,
        TokenSource::Insecure => Some("no bearer token required (--insecure)".to_string()),
    };
    if let Some(line) = second {
        println!("{line}");
    }
    tracing::info!("serving {scheme}:// on {}", server.addr);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = tokio::select! {
        r = server.wait() => { r?; return Ok(ExitCode::SUCCESS) }
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
    };
    // Workers keep training through a restart: tell them at their next heartbeat that this
    // coordinator is going away and will be back, make every write durable, then stop.
    let running = server.coordinator.begin_going_away().await?;
    tracing::info!(
        signal,
        running,
        "stopping; every write is flushed, and running runs keep training for the next coordinator to adopt"
    );
    tokio::time::sleep(server.coordinator.timing.heartbeat_interval + std::time::Duration::from_millis(500)).await;
    server.stop().await?;
    tracing::info!("coordinator stopped");
    Ok(ExitCode::SUCCESS)
}
