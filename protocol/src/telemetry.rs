//! Log set-up shared by the worker and coordinator binaries: `RUST_LOG` wins, `default`
//! otherwise, to stderr so stdout stays free for command output.
//!
//! Clusters collect stderr into files and log pipelines, so colour is used only when stderr is a
//! terminal, and `--log-format json` (or `VOXELFLEET_LOG_FORMAT=json`) writes one JSON object a
//! line for collectors (Loki, Fluent Bit, Cloud Logging) to parse without regexes.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

/// The variable `--log-format` reads when the flag is absent.
pub const LOG_FORMAT_ENV: &str = "VOXELFLEET_LOG_FORMAT";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `fields` (with `message`), `span`.
    Json,
}

impl LogFormat {
    pub const NAMES: [&'static str; 2] = ["text", "json"];
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format `{other}`; known: {}",
                LogFormat::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Installs the global subscriber once; later calls (tests, an embedded worker) are no-ops.
pub fn init(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        // Collectors want the span context and the event's fields as keys, never colour.
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::LogFormat;

    #[test]
    fn log_format_parses_known_names_and_names_the_bad_one() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!(" Text ".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let err = "xml".parse::<LogFormat>().unwrap_err();
        assert!(err.contains("`xml`") && err.contains("text, json"), "{err}");
        for name in LogFormat::NAMES {
            assert_eq!(name.parse::<LogFormat>().unwrap().to_string(), name);
        }
    }
}
