//! The numeric fingerprint: what decides the bits a training step produces on this worker.
//!
//! Data-parallel ranks must end every step with bit-identical weights, and a resumed run must end
//! with the weights of the run left alone. On the CPU backend that holds for any number of rayon
//! threads (gemm never splits a reduction across threads, and the one whole-tensor sum that does,
//! above 4M elements, feeds only the logged loss), but only between workers that pick the same
//! kernels, and those are chosen at run time:
//! - macerator (sums, norms, bias gradients) picks its SIMD level (scalar, v2, v3 = AVX2+FMA,
//!   v4 = AVX-512) from the CPU, and the lane count changes the order of additions;
//! - gemm (matmul and every convolution) picks its FMA or scalar kernel from the CPU, and sizes
//!   its K blocks from the L1 data cache it detects: 48 KiB 12-way and 32 KiB 8-way machines
//!   with the same instruction set sum in different blocks;
//! - glibc's `expf` picks an FMA variant by CPU too.
//!
//! So a worker reports all of that, with its build, when it registers, and the coordinator forms
//! rings only from workers whose fingerprints are equal.

use crate::backend::DeviceSpec;

/// `bin=…;arch=…;device=…;simd=…;gemm=…;l1d=bytes/ways/line;glibc=…`.
pub fn numeric_fingerprint(device: DeviceSpec) -> String {
    let device = match device {
        DeviceSpec::Cpu => "cpu",
        // CUDA kernels are compiled per architecture by NVRTC at run time; the device ordinal
        // does not decide the bits. (Mixing GPU models in one ring is not checked yet.)
        DeviceSpec::Cuda(_) => "cuda",
    };
    let mut parts = vec![
        format!("bin={}", env!("CARGO_PKG_VERSION")),
        format!("arch={}", std::env::consts::ARCH),
        format!("device={device}"),
    ];
    parts.extend(kernel_choices());
    let l1 = gemm_common::cache::CACHE_INFO[0];
    parts.push(format!(
        "l1d={}/{}/{}",
        l1.cache_bytes, l1.associativity, l1.cache_line_bytes
    ));
    if let Some(glibc) = glibc_version() {
        parts.push(format!("glibc={glibc}"));
    }
    parts.join(";")
}

/// The SIMD level macerator dispatches to and the gemm kernel, as detected at run time.
fn kernel_choices() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let v2 = has!("sse3") && has!("ssse3") && has!("sse4.1") && has!("sse4.2") && has!("popcnt");
        let v3 = v2
            && has!("avx")
            && has!("avx2")
            && has!("bmi1")
            && has!("bmi2")
            && has!("fma")
            && has!("lzcnt")
            && has!("f16c");
        let v4 = v3 && has!("avx512f") && has!("avx512bw") && has!("avx512cd") && has!("avx512dq") && has!("avx512vl");
        let simd = if v4 {
            "v4"
        } else if v3 {
            "v3"
        } else if v2 {
            "v2"
        } else {
            "scalar"
        };
        let gemm = if has!("fma") { "fma" } else { "scalar" };
        vec![format!("simd={simd}"), format!("gemm={gemm}")]
    }
    #[cfg(target_arch = "aarch64")]
    {
        let neon = if std::arch::is_aarch64_feature_detected!("neon") {
            "neon"
        } else {
            "scalar"
        };
        vec![format!("simd={neon}"), format!("gemm={neon}")]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        vec!["simd=scalar".into(), "gemm=scalar".into()]
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_version() -> Option<String> {
    unsafe extern "C" {
        fn gnu_get_libc_version() -> *const std::ffi::c_char;
    }
    // SAFETY: glibc returns a pointer to a static NUL-terminated string.
    let version = unsafe { std::ffi::CStr::from_ptr(gnu_get_libc_version()) };
    Some(version.to_string_lossy().into_owned())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_version() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_names_build_target_kernels_and_cache() {
        let f = numeric_fingerprint(DeviceSpec::Cpu);
        for key in ["bin=", "arch=", "device=cpu", "simd=", "gemm=", "l1d="] {
            assert!(f.contains(key), "{key} missing from {f}");
        }
        assert_eq!(f, numeric_fingerprint(DeviceSpec::Cpu), "stable within a process");
        assert_ne!(f, numeric_fingerprint(DeviceSpec::Cuda(0)));
    }
}
