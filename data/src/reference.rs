//! The independent implementations our data plane is checked against: a Python interpreter with
//! nibabel, scipy and numpy, which `.ci/run` installs into a venv and names in
//! `VOXELFLEET_PYTHON`, and an S3-compatible test server ([`reference_s3`]). Tests that need one
//! are `#[ignore]`d with that reason, so `cargo test` reports them as ignored rather than passing
//! them unchecked; `.ci/run` provides both and runs them with `--ignored`. Run that way without
//! the reference, such a test fails and says what to provide.

use std::path::PathBuf;
use std::process::Command;

/// Names the interpreter with nibabel, scipy and numpy.
pub const PYTHON_ENV: &str = "VOXELFLEET_PYTHON";

/// The reference interpreter. Panics, saying how to provide one, where it is missing or broken:
/// this is test support, and the panic is the test's report.
pub fn reference_python(test: &str) -> PathBuf {
    let Some(python) = std::env::var_os(PYTHON_ENV).map(PathBuf::from) else {
        panic!(
            "{test}: no reference Python: {PYTHON_ENV} is unset. Create one with \
             `.ci/venv.sh ~/.cache/voxelfleet/venv /tmp/pip.log` and set \
             {PYTHON_ENV}=~/.cache/voxelfleet/venv/bin/python"
        );
    };
    let probe = Command::new(&python)
        .args(["-c", "import nibabel, scipy, numpy"])
        .output();
    match probe {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{test}: {} cannot import nibabel, scipy and numpy: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("{test}: cannot run {}: {e}", python.display()),
    }
}

/// Runs `script` under the reference interpreter with `args`, returning its stdout. Panics with
/// the script's stderr when it fails: this is test support, and the panic is the test's report.
pub fn run_reference(python: &std::path::Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "reference script failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("reference output is UTF-8")
}

/// Names the test S3-compatible server (`http://127.0.0.1:PORT`) that `.ci/s3.sh` starts.
pub const S3_ENDPOINT_ENV: &str = "VOXELFLEET_TEST_S3_ENDPOINT";
/// Names an existing bucket on that server the tests may write to.
pub const S3_BUCKET_ENV: &str = "VOXELFLEET_TEST_S3_BUCKET";

/// The test S3 server, as the environment configures it for `data::store_from_url`.
#[derive(Debug, Clone)]
pub struct TestS3 {
    pub endpoint: String,
    pub bucket: String,
}

impl TestS3 {
    /// An `s3://` URL under a prefix no other test or earlier run uses, so tests can share the
    /// bucket and a server that outlives them.
    pub fn unique_url(&self, test: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("s3://{}/{test}-{}-{nanos}", self.bucket, std::process::id())
    }
}

/// The test S3 server. Panics where none is configured, or where the environment is half set
/// up: store URLs must reach the same server (through `AWS_ENDPOINT_URL`, `AWS_ENDPOINT` or
/// `VOXELFLEET_S3_ENDPOINT`) with credentials, and the server must accept a connection.
pub fn reference_s3(test: &str) -> TestS3 {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(endpoint) = var(S3_ENDPOINT_ENV) else {
        panic!(
            "{test}: no test S3 server: {S3_ENDPOINT_ENV} is unset. Start one with \
             `.ci/s3.sh start VENV STATE_DIR` and source STATE_DIR/s3.env"
        );
    };
    let bucket =
        var(S3_BUCKET_ENV).unwrap_or_else(|| panic!("{test}: {S3_ENDPOINT_ENV} is set but {S3_BUCKET_ENV} is not"));
    let configured = [crate::store::S3_ENDPOINT_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|n| var(n));
    assert_eq!(
        configured.as_deref(),
        Some(endpoint.as_str()),
        "{test}: store URLs would not reach the test server; set AWS_ENDPOINT_URL={endpoint} \
         (source the s3.env that .ci/s3.sh writes)"
    );
    assert!(
        var("AWS_ACCESS_KEY_ID").is_some() && var("AWS_SECRET_ACCESS_KEY").is_some(),
        "{test}: {S3_ENDPOINT_ENV} is set but AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not"
    );
    let parsed = url::Url::parse(&endpoint).unwrap_or_else(|e| panic!("{test}: {S3_ENDPOINT_ENV}={endpoint}: {e}"));
    let addr = parsed
        .socket_addrs(|| None)
        .ok()
        .and_then(|a| a.into_iter().next())
        .unwrap_or_else(|| panic!("{test}: {S3_ENDPOINT_ENV}={endpoint} names no host and port"));
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3)) {
        panic!("{test}: the test S3 server at {endpoint} does not accept connections: {e}");
    }
    TestS3 { endpoint, bucket }
}
