//! The one place the tensor backend is chosen.
//!
//! Models and training math are generic over `B: Backend` / `B: AutodiffBackend`; everything
//! else names the aliases below. A burn upgrade or a backend swap should touch only this file.

use std::fmt;
use std::str::FromStr;

/// Pure-Rust CPU backend (rayon + SIMD); what tests, CI and CPU-only workers run on.
pub type Cpu = burn::backend::Flex;
/// [`Cpu`] with reverse-mode autodiff, for training.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;
/// The device type of [`Cpu`] (there is only one CPU device).
pub type CpuDevice = burn::backend::flex::FlexDevice;

/// CUDA backend (NVRTC, kernels compiled at run time, so building needs no CUDA toolkit).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
/// [`Gpu`] with reverse-mode autodiff, for training.
#[cfg(feature = "cuda")]
pub type GpuTrain = burn::backend::Autodiff<Gpu>;
/// The device type of [`Gpu`].
#[cfg(feature = "cuda")]
pub type GpuDevice = burn::backend::cuda::CudaDevice;

/// Which device a worker trains on, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceSpecError {
    #[error("unknown device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    Unknown(String),
    #[error("bad CUDA device index in {0:?}: expected \"cuda:N\" with N a non-negative integer")]
    BadIndex(String),
    #[error("device {0:?} requested, but this worker was built without the `cuda` feature")]
    CudaNotBuilt(String),
}

impl DeviceSpec {
    /// Whether this binary can run on the device at all; parsing already refuses CUDA when it
    /// cannot, this is for specs built in code.
    pub fn is_available(&self) -> bool {
        match self {
            DeviceSpec::Cpu => true,
            DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// The concrete CUDA device, `None` for the CPU.
    #[cfg(feature = "cuda")]
    pub fn cuda_device(&self) -> Option<GpuDevice> {
        match self {
            DeviceSpec::Cpu => None,
            DeviceSpec::Cuda(index) => Some(GpuDevice::new(*index)),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let spec = match lower.as_str() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(index) => DeviceSpec::Cuda(index.parse().map_err(|_| DeviceSpecError::BadIndex(s.to_string()))?),
                None => return Err(DeviceSpecError::Unknown(s.to_string())),
            },
        };
        // Refuse at parse time so a misconfigured worker fails before it joins a run.
        if !spec.is_available() {
            return Err(DeviceSpecError::CudaNotBuilt(s.to_string()));
        }
        Ok(spec)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!(" CPU ".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::Cpu.to_string(), "cpu");
        assert!(matches!("tpu".parse::<DeviceSpec>(), Err(DeviceSpecError::Unknown(_))));
        assert!(matches!(
            "cuda:x".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadIndex(_))
        ));
        assert!(matches!(
            "cuda:-1".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadIndex(_))
        ));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = "cuda:1".parse::<DeviceSpec>().unwrap_err();
        assert_eq!(err, DeviceSpecError::CudaNotBuilt("cuda:1".into()));
        assert!(err.to_string().contains("built without the `cuda` feature"));
        assert!("cuda".parse::<DeviceSpec>().is_err());
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_parses_with_feature() {
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(2)] {
            if spec.is_available() {
                assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
            }
        }
    }
}
