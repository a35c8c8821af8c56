//! The end-to-end tests: real `coordinator serve` and `coordinator worker` processes on loopback,
//! one module per area. They are one test binary (registered in coordinator/cli/Cargo.toml, where cargo
//! hands them the path of the `coordinator` executable) so that the shared harness in `common`
//! and every dependency link once, not once per area. Run one area with
//! `cargo test --release --workspace --test e2e control::`.

mod common;

mod cache;
// Errors a user can act on, a closed stdout, scans that survive a bad entry (issue 18).
mod cli_errors;
mod collective;
// Not end to end: every file in configs/ parses and validates, so a config cannot rot.
mod configs;
mod control;
mod datasets;
mod durability;
mod failures;
mod interop;
// Workers keeping their identity, and leaving on SIGTERM (deregister, drain, exit 0).
mod leaving;
mod lifecycle;
// Logs a cluster can read: no colour on a pipe, --log-format json, RUST_LOG.
mod logs;
mod queue;
mod resume;
mod s3;
mod security;
mod training;
