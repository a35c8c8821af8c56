//! Log set-up shared by the worker and coordinator binaries: `RUST_LOG` wins, `default`
//! otherwise, to stderr so stdout stays free for command output.

pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
