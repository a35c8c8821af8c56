//! The independent implementations our data plane is checked against: a Python interpreter with
//! nibabel, scipy and numpy, which `.ci/run` installs into a venv and names in
//! `VOXELFLEET_PYTHON`. Tests that compare against it call [`reference_python`]. Outside CI a
//! machine may lack it; such a test then says so on stderr and checks nothing, unless
//! `VOXELFLEET_REQUIRE_REFERENCE=1` (set by `.ci/run`) makes the absence a failure, so CI can
//! never pass by skipping. The same holds for the S3-compatible test server ([`reference_s3`]).

use std::path::PathBuf;
use std::process::Command;

/// Names the interpreter with nibabel, scipy and numpy.
pub const PYTHON_ENV: &str = "VOXELFLEET_PYTHON";
/// Set to `1` where a missing reference must fail the test rather than skip it.
pub const REQUIRE_ENV: &str = "VOXELFLEET_REQUIRE_REFERENCE";

/// The reference interpreter, or `None` (after a note on stderr) where this machine has none and
/// none is required. Panics where one is required but missing or broken.
pub fn reference_python(test: &str) -> Option<PathBuf> {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    let Some(python) = std::env::var_os(PYTHON_ENV).map(PathBuf::from) else {
        assert!(
            !required,
            "{test}: {REQUIRE_ENV}=1 but {PYTHON_ENV} is unset; .ci/run prepares the venv"
        );
        eprintln!("{test}: skipped, no reference Python ({PYTHON_ENV} unset; .ci/run sets it)");
        return None;
    };
    let probe = Command::new(&python)
        .args(["-c", "import nibabel, scipy, numpy"])
        .output();
    match probe {
        Ok(out) if out.status.success() => Some(python),
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

/// The test S3 server, or `None` (after a note on stderr) where none is configured and
/// `VOXELFLEET_REQUIRE_REFERENCE=1` does not require one. Panics where one is required, or where
/// the environment is half set up: store URLs must reach the same server (through
/// `AWS_ENDPOINT_URL`, `AWS_ENDPOINT` or `VOXELFLEET_S3_ENDPOINT`) with credentials, and the
/// server must accept a connection.
pub fn reference_s3(test: &str) -> Option<TestS3> {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(endpoint) = var(S3_ENDPOINT_ENV) else {
        assert!(
            !required,
            "{test}: {REQUIRE_ENV}=1 but {S3_ENDPOINT_ENV} is unset; .ci/run starts the S3 server"
        );
        eprintln!("{test}: skipped, no test S3 server ({S3_ENDPOINT_ENV} unset; .ci/run sets it)");
        return None;
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
    Some(TestS3 { endpoint, bucket })
}
