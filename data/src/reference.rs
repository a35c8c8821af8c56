//! The independent implementations our data plane is checked against: a Python interpreter with
//! nibabel, scipy and numpy, which `.ci/run` installs into a venv and names in
//! `VOXELFLEET_PYTHON`. Tests that compare against it call [`reference_python`]. Outside CI a
//! machine may lack it; such a test then says so on stderr and checks nothing, unless
//! `VOXELFLEET_REQUIRE_REFERENCE=1` (set by `.ci/run`) makes the absence a failure, so CI can
//! never pass by skipping.

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
