//! `[collective]` of a run spec: how ranks exchange gradients (bucket size, parallel streams,
//! wire format). Kept apart from the rest of the spec, which it does not interact with.

use serde::{Deserialize, Serialize};

/// `[collective]`: the gradient all-reduce's knobs. They change speed, not results, except
/// `wire = "bf16"`, which rounds what is sent (the sum stays f32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectiveSpec {
    /// Gradient bucket size in MB (MiB); a bucket is sent while the next is being flattened.
    pub bucket_mb: f64,
    /// Parallel connections to each ring neighbour.
    pub streams: u32,
    /// `"f32"` or `"bf16"` for what travels between ranks.
    pub wire: String,
}

/// Wire formats `collective.wire` accepts.
pub const COLLECTIVE_WIRES: [&str; 2] = ["f32", "bf16"];

impl Default for CollectiveSpec {
    fn default() -> Self {
        CollectiveSpec {
            bucket_mb: 25.0,
            streams: 1,
            wire: "f32".into(),
        }
    }
}

impl CollectiveSpec {
    pub(super) fn is_default(&self) -> bool {
        *self == CollectiveSpec::default()
    }

    /// `bucket_mb` in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1 << 20) as f64) as usize
    }

    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.bucket_mb.is_finite() && self.bucket_mb >= 0.0625 && self.bucket_mb <= 4096.0) {
            return Err((
                "collective.bucket_mb",
                format!("must be in [0.0625, 4096], got {}", self.bucket_mb),
            ));
        }
        if self.streams == 0 || self.streams > 16 {
            return Err(("collective.streams", format!("must be 1..=16, got {}", self.streams)));
        }
        if !COLLECTIVE_WIRES.contains(&self.wire.as_str()) {
            return Err((
                "collective.wire",
                format!("must be one of {}, got `{}`", COLLECTIVE_WIRES.join(", "), self.wire),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::RunSpec;

    use crate::spec::tests::GOOD as SPEC;

    #[test]
    fn defaults_stay_out_of_the_canonical_toml_and_settings_round_trip() {
        let spec = RunSpec::from_toml(SPEC, "s.toml").unwrap();
        assert_eq!(spec.collective, super::CollectiveSpec::default());
        assert_eq!(spec.collective.bucket_bytes(), 25 << 20);
        assert!(!spec.to_toml().contains("collective"));
        let tuned = format!("{SPEC}[collective]\nbucket_mb = 4\nstreams = 2\nwire = \"bf16\"\n");
        let spec = RunSpec::from_toml(&tuned, "t.toml").unwrap();
        assert_eq!((spec.collective.streams, spec.collective.wire.as_str()), (2, "bf16"));
        assert_eq!(RunSpec::from_toml(&spec.to_toml(), "again").unwrap(), spec);
    }

    #[test]
    fn errors_name_the_key() {
        for (line, key) in [
            ("bucket_mb = 0", "collective.bucket_mb"),
            ("streams = 0", "collective.streams"),
            ("wire = \"fp8\"", "collective.wire"),
        ] {
            let bad = format!("{SPEC}[collective]\n{line}\n");
            let err = RunSpec::from_toml(&bad, "c.toml").unwrap_err().to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }
}
