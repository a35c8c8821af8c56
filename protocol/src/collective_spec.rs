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
    /// Kernel send buffer (`SO_SNDBUF`) of each link connection in KiB; 0 leaves it to the
    /// kernel's autotuning. The default suits loopback and datacentre links (see the worker's
    /// `DEFAULT_SEND_BUFFER_BYTES`); raise it for links of more than ~1 MiB bandwidth x delay.
    pub send_buffer_kb: u32,
}

/// Default `collective.send_buffer_kb`; why this size: the worker's `DEFAULT_SEND_BUFFER_BYTES`.
pub const DEFAULT_SEND_BUFFER_KB: u32 = 512;

/// Largest `collective.send_buffer_kb`: 64 MiB (Linux also caps it at `net.core.wmem_max`).
pub const MAX_SEND_BUFFER_KB: u32 = 64 << 10;

/// Wire formats `collective.wire` accepts.
pub const COLLECTIVE_WIRES: [&str; 2] = ["f32", "bf16"];

impl Default for CollectiveSpec {
    fn default() -> Self {
        CollectiveSpec {
            bucket_mb: 25.0,
            streams: 1,
            wire: "f32".into(),
            send_buffer_kb: DEFAULT_SEND_BUFFER_KB,
        }
    }
}

impl CollectiveSpec {
    pub(super) fn is_default(&self) -> bool {
        *self == CollectiveSpec::default()
    }

    /// `send_buffer_kb` in bytes; `None` for the kernel's autotuning.
    pub fn send_buffer_bytes(&self) -> Option<u32> {
        (self.send_buffer_kb > 0).then(|| self.send_buffer_kb * 1024)
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
        if self.send_buffer_kb > MAX_SEND_BUFFER_KB {
            return Err((
                "collective.send_buffer_kb",
                format!(
                    "must be 0 (autotuning) to {MAX_SEND_BUFFER_KB}, got {}",
                    self.send_buffer_kb
                ),
            ));
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
        assert_eq!(spec.collective.send_buffer_bytes(), Some(512 << 10));
        let tuned = format!("{SPEC}[collective]\nbucket_mb = 4\nstreams = 2\nwire = \"bf16\"\nsend_buffer_kb = 0\n");
        let spec = RunSpec::from_toml(&tuned, "t.toml").unwrap();
        assert_eq!((spec.collective.streams, spec.collective.wire.as_str()), (2, "bf16"));
        assert_eq!(spec.collective.send_buffer_bytes(), None);
        assert_eq!(RunSpec::from_toml(&spec.to_toml(), "again").unwrap(), spec);
    }

    #[test]
    fn errors_name_the_key() {
        for (line, key) in [
            ("bucket_mb = 0", "collective.bucket_mb"),
            ("streams = 0", "collective.streams"),
            ("wire = \"fp8\"", "collective.wire"),
            ("send_buffer_kb = 100000", "collective.send_buffer_kb"),
        ] {
            let bad = format!("{SPEC}[collective]\n{line}\n");
            let err = RunSpec::from_toml(&bad, "c.toml").unwrap_err().to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }
}
