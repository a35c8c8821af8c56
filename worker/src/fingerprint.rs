//! The numeric fingerprint: what decides the bits a training step produces on this worker.
//!
//! Data-parallel ranks must end every step with bit-identical weights. They do when they run the
//! same kernels: the same build of the tensor code, on the same kind of device, with the same
//! SIMD paths. burn-flex's kernels pick their SIMD path from the CPU features detected at run
//! time, and a different path may sum in another order. So a worker reports this fingerprint
//! when it registers, and the coordinator forms rings only from workers that share it.

use crate::backend::DeviceSpec;

/// `<crate version>/<arch>-<os>/<device>/<features>`, e.g.
/// `0.1.0/x86_64-linux/cpu/avx,avx2,fma,sse4.1`.
pub fn numeric_fingerprint(device: DeviceSpec) -> String {
    let device = match device {
        DeviceSpec::Cpu => "cpu".to_string(),
        // Every CUDA device of one build runs the same NVRTC kernels per architecture; the
        // device ordinal is not part of what decides the bits.
        DeviceSpec::Cuda(_) => "cuda".to_string(),
    };
    format!(
        "{}/{}-{}/{device}/{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        kernel_features().join(",")
    )
}

/// The CPU features that select SIMD kernels, as detected at run time.
pub fn kernel_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found: Vec<&'static str> = vec![];
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        macro_rules! detect {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    found.push($f);
                }
            )*};
        }
        detect!("sse4.1", "avx", "avx2", "fma", "avx512f");
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_names_build_target_device_and_features() {
        let f = numeric_fingerprint(DeviceSpec::Cpu);
        assert!(f.starts_with(env!("CARGO_PKG_VERSION")), "{f}");
        assert!(f.contains(std::env::consts::ARCH) && f.contains("/cpu/"), "{f}");
        assert_eq!(f, numeric_fingerprint(DeviceSpec::Cpu), "stable within a process");
        assert_ne!(f, numeric_fingerprint(DeviceSpec::Cuda(0)));
    }
}
