//! Whether a training step fits in this worker's memory, decided before the first tensor is
//! allocated. A step that does not fit would otherwise kill the worker on allocation (the OOM
//! killer on a CPU, an allocation panic on a GPU), and the run would show only "missed its
//! heartbeats" and be retried on the next worker to die the same way. Refusing up front fails
//! the run once, with a message that names the fields to change.
//!
//! The estimate is of the U-Net in `model::unet` under burn's autodiff: the activations the
//! forward pass keeps for the backward pass, the backward pass's working set, the parameters
//! with their gradients and AdamW moments, and the step's input buffers. It is calibrated
//! against the peak RSS of `benches/step.rs` on the CPU backend (widths 4 to 32, depths 2 to 4,
//! patches 32³ to 96³): it exceeds every measured peak, by about 10 % at the widths real runs
//! use (16, 32) and by more at small widths, where the loss's per-class tensors dominate. It
//! leaves out the case cache, whose size depends on the dataset's volumes.

use std::path::Path;

use protocol::classes::NUM_CLASSES;
use protocol::spec::{ModelSpec, RunSpec};

use crate::backend::DeviceSpec;

const F32: u64 = 4;

/// Per class and voxel: the head's logits, the targets, and the loss's elementwise
/// intermediates (clamp, product, abs, neg, exp, log1p, sums, sigmoid, the Dice products).
const LOSS_TENSORS: u64 = 12;
/// Per parameter: weights, gradients, AdamW's two moments, and the flat and unflattened
/// gradient copies the all-reduce goes through.
const PARAM_COPIES: u64 = 6;
/// Measured peaks exceed the tensor count above by up to this factor (allocator slack, the conv
/// kernels' NHWC copies and im2col tiles, autodiff bookkeeping).
const CALIBRATION: f64 = 1.3;
/// The process itself: runtime, thread stacks, kernels' scratch, the gRPC buffers.
const PROCESS_OVERHEAD: u64 = 256 << 20;

/// What one step of a run needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFootprint {
    /// Activations kept for the backward pass, plus the backward pass's working set.
    pub activations: u64,
    /// Parameters, gradients, optimiser state and the all-reduce's gradient copies.
    pub model_state: u64,
    /// Input patches and label masks, on the host and as tensors, plus the process overhead.
    pub other: u64,
}

impl StepFootprint {
    pub fn total(&self) -> u64 {
        self.activations + self.model_state + self.other
    }
}

/// The memory one step of `model` needs for `batch` patches of `patch` voxels (each side a
/// multiple of the backbone's downsampling).
pub fn estimate_step(model: &ModelSpec, patch: [u32; 3], batch: u32) -> StepFootprint {
    let classes = NUM_CLASSES as u64;
    let n = batch as u64;
    let voxels = |level: u32| patch.iter().map(|&p| (p >> level) as u64).product::<u64>();
    let v0 = voxels(0);
    // Element counts per sample, and the parameter count.
    let (mut elements, params) = match model {
        ModelSpec::Unet(u) => unet_elements(u.resolved_base_width() as u64, u.resolved_depth(), &voxels),
        ModelSpec::Segresnet(s) => segresnet_elements(s.resolved_init_filters() as u64, &voxels),
        ModelSpec::Swinunetr(s) => swin_elements(s.resolved_feature_size() as u64, &voxels),
    };
    elements += LOSS_TENSORS * classes * v0 + v0;
    let activations = (n * elements * F32) as f64 * CALIBRATION;
    StepFootprint {
        activations: activations as u64,
        model_state: PARAM_COPIES * params * F32,
        other: 2 * n * v0 * (1 + classes) * F32 + PROCESS_OVERHEAD,
    }
}

/// A 3x3x3 conv from `i` to `o` channels with bias.
fn conv3(i: u64, o: u64) -> u64 {
    27 * i * o + o
}

/// The Models Genesis U-Net: level `i` convolves to `c = w 2^i` then `2c` channels (conv, BN,
/// ReLU: about 7 kept tensors each), the decoder at level `i` keeps the transposed conv's `4c`,
/// the concatenation's `6c` and two conv blocks of `2c`.
fn unet_elements(w: u64, depth: u32, voxels: &dyn Fn(u32) -> u64) -> (u64, u64) {
    let (mut elements, mut params) = (0, 0);
    let mut channels = 1;
    for level in 0..depth {
        let c = w << level;
        elements += 7 * 3 * c * voxels(level);
        params += conv3(channels, c) + conv3(c, 2 * c) + 2 * c + 4 * c;
        channels = 2 * c;
        if level + 1 < depth {
            elements += 2 * c * voxels(level + 1) + 38 * c * voxels(level);
            params += 8 * (4 * c) * (4 * c) + 4 * c; // the transposed conv from level + 1
            params += conv3(6 * c, 2 * c) + conv3(2 * c, 2 * c) + 8 * c;
        }
    }
    (elements, params + 2 * w * NUM_CLASSES as u64 + NUM_CLASSES as u64)
}

/// MONAI's SegResNet (blocks 1,2,2,4 down, 1,1,1 up): a residual block keeps about 12 tensors of
/// its width (two GroupNorms, activations, convs, the sum).
fn segresnet_elements(f: u64, voxels: &dyn Fn(u32) -> u64) -> (u64, u64) {
    let (mut elements, mut params) = (2 * f * voxels(0), conv3(1, f) - f);
    for (level, blocks) in [1u64, 2, 2, 4].into_iter().enumerate() {
        let c = f << level;
        let v = voxels(level as u32);
        elements += 12 * blocks * c * v;
        params += blocks * (2 * (27 * c * c) + 4 * c);
        if level > 0 {
            elements += c * v;
            params += 27 * (c / 2) * c;
            // The up path: 1x1x1 conv, trilinear upsampling, the skip sum, one residual block.
            elements += (c / 2) * (voxels(level as u32 - 1) * 3 + v) + 12 * (c / 2) * voxels(level as u32 - 1);
            params += c * (c / 2) + 2 * (27 * (c / 2) * (c / 2)) + 2 * c;
        }
    }
    (
        elements + 3 * f * voxels(0),
        params + 2 * f + f * NUM_CLASSES as u64 + NUM_CLASSES as u64,
    )
}

/// MONAI's SwinUNETR: four Swin stages (tokens at 1/2 to 1/16 of each side, width `f 2^s`, two
/// blocks of about 14 kept token-sized tensors, the 4x MLP, and the 343x343 attention matrices
/// per window and head), then the UNETR decoder's residual blocks at every level.
fn swin_elements(f: u64, voxels: &dyn Fn(u32) -> u64) -> (u64, u64) {
    const WINDOW: u64 = 343;
    let heads = [3u64, 6, 12, 24];
    let (mut elements, mut params) = (0u64, 0u64);
    for (stage, heads) in heads.into_iter().enumerate() {
        let c = f << stage;
        let tokens = voxels(stage as u32 + 1);
        let attention = heads * tokens.div_ceil(WINDOW).max(1) * WINDOW * WINDOW.min(tokens);
        elements += 2 * (14 * c * tokens + 3 * 4 * c * tokens + 3 * attention);
        params += 2 * (12 * c * c + 13 * c + heads * 2197);
        params += 8 * c * 2 * c + 16 * c;
    }
    // Decoder: a residual block (about 10 kept tensors) per level at the encoder's widths, and
    // an up block (transposed conv, concatenation, residual block) per level.
    for level in 0..6u32 {
        let c = f << level.saturating_sub(1);
        elements += 2 * 10 * c * voxels(level);
        params += 2 * (2 * 27 * c * c);
    }
    (elements, params + f * NUM_CLASSES as u64 + NUM_CLASSES as u64)
}

/// Memory this worker can give a run, and where the number came from (for the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    pub source: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "train.patch {patch:?} with {batch} per rank (train.batch_size, or train.global_batch / \
         world_size) needs about {need} per step on this worker (activations {activations}, \
         parameters and optimiser state {model_state}), but it has {have} ({source}); lower \
         train.patch or train.batch_size (or model.base_width)",
        need = gib(*need), activations = gib(*activations), model_state = gib(*model_state),
        have = gib(available.bytes), source = available.source
    )]
    WontFit {
        patch: [u32; 3],
        batch: u32,
        need: u64,
        activations: u64,
        model_state: u64,
        available: Available,
    },
    #[error("run spec: {0}")]
    Spec(String),
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses a run whose step cannot fit in `available`; with nothing known about the device's
/// memory, there is nothing to check against (the caller logs that).
pub fn check_step_fits(
    spec: &RunSpec,
    world_size: u32,
    available: Option<Available>,
) -> Result<StepFootprint, MemoryError> {
    let batch = spec.train.per_rank_batch(world_size).map_err(MemoryError::Spec)?;
    let need = estimate_step(&spec.model, spec.train.patch, batch);
    match available {
        Some(available) if need.total() > available.bytes => Err(MemoryError::WontFit {
            patch: spec.train.patch,
            batch,
            need: need.total(),
            activations: need.activations,
            model_state: need.model_state,
            available,
        }),
        _ => Ok(need),
    }
}

/// What the device has free for a run now: for the CPU, `MemAvailable` capped by the cgroup's
/// remaining limit (a container sees the host's `MemAvailable`); for CUDA, the free memory
/// `nvidia-smi` reports. `None` when that cannot be read.
pub fn available_memory(device: DeviceSpec) -> Option<Available> {
    match device {
        DeviceSpec::Cpu => {
            let host = read("/proc/meminfo").and_then(|t| meminfo_kib(&t, "MemAvailable"))? * 1024;
            match cgroup_headroom(Path::new("/sys/fs/cgroup")) {
                Some(cgroup) if cgroup < host => Some(Available {
                    bytes: cgroup,
                    source: "the cgroup's memory.max less memory.current",
                }),
                _ => Some(Available {
                    bytes: host,
                    source: "MemAvailable in /proc/meminfo",
                }),
            }
        }
        DeviceSpec::Cuda(index) => nvidia_smi(index).map(|(_, free)| Available {
            bytes: free,
            source: "free memory nvidia-smi reports",
        }),
    }
}

/// The device's total memory, as the worker reports it at registration (0 when unknown).
pub fn device_memory_total(device: DeviceSpec) -> u64 {
    match device {
        DeviceSpec::Cpu => read("/proc/meminfo")
            .and_then(|t| meminfo_kib(&t, "MemTotal"))
            .map_or(0, |kib| kib * 1024),
        DeviceSpec::Cuda(index) => nvidia_smi(index).map_or(0, |(total, _)| total),
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A `Key:   123 kB` line of /proc/meminfo, in KiB.
fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Bytes the cgroup (v2) this process is in may still allocate, if it has a limit.
fn cgroup_headroom(root: &Path) -> Option<u64> {
    let value = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    let max: u64 = value("memory.max")?.trim().parse().ok()?; // "max" means no limit
    let current: u64 = value("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// (total, free) bytes of CUDA device `index`. The index is mapped through
/// `CUDA_VISIBLE_DEVICES`, as CUDA maps it, when that lists devices.
fn nvidia_smi(index: usize) -> Option<(u64, u64)> {
    let id = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').nth(index)?.trim().to_string(),
        _ => index.to_string(),
    };
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"])
        .arg(format!("--id={id}"))
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

/// `81559, 80530` (MiB) → bytes.
fn parse_nvidia_smi(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.lines().next()?.split(',').map(|f| f.trim().parse::<u64>().ok());
    let (total, free) = (fields.next()??, fields.next()??);
    Some((total << 20, free << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(base_width: u32, depth: u32) -> ModelSpec {
        ModelSpec::Unet(protocol::spec::UnetSpec {
            base_width: Some(base_width),
            depth: Some(depth),
            ..Default::default()
        })
    }

    const GIB: u64 = 1 << 30;

    fn spec(text_patch: &str, base_width: u32, extra_train: &str) -> RunSpec {
        let text = format!(
            "name='m'\nworld_size=2\n[dataset]\nurl='/d'\n[model]\narch='unet'\nbase_width={base_width}\n\
             [train]\nsteps=10\npatch={text_patch}\nlr=0.01\n{extra_train}\n[artifacts]\nurl='/a'\n"
        );
        RunSpec::from_toml(&text, "m.toml").unwrap()
    }

    #[test]
    fn a_512_cube_at_width_32_does_not_fit_in_24_gib() {
        let big = spec("[512, 512, 512]", 32, "batch_size = 1");
        let available = Some(Available {
            bytes: 24 * GIB,
            source: "test",
        });
        let err = check_step_fits(&big, 2, available).unwrap_err().to_string();
        assert!(err.contains("train.patch") && err.contains("train.batch_size"), "{err}");
        assert!(err.contains("24.0 GiB") && err.contains("[512, 512, 512]"), "{err}");
        // Nor in a whole 141 GiB GPU: it needs terabytes.
        assert!(estimate_step(&unet(32, 4), [512; 3], 1).total() > 1000 * GIB);
    }

    #[test]
    fn the_demo_step_fits_with_room_to_spare() {
        let demo = RunSpec::from_toml(include_str!("../../../configs/demo.toml"), "demo.toml").unwrap();
        let need = check_step_fits(
            &demo,
            demo.world_size,
            Some(Available {
                bytes: GIB,
                source: "test",
            }),
        )
        .unwrap();
        // Measured: ~160 MB peak RSS for this step (benches/step.rs, width 8, depth 3, 32³).
        assert!(need.total() < GIB / 2, "{need:?}");
        assert!(need.total() > 160 << 20, "{need:?}");
    }

    #[test]
    fn the_per_rank_batch_scales_the_activations() {
        let one = estimate_step(&unet(8, 3), [64; 3], 1);
        let four = estimate_step(&unet(8, 3), [64; 3], 4);
        assert!(four.activations >= 4 * one.activations - 4);
        assert_eq!(four.model_state, one.model_state);
        let global = spec("[64, 64, 64]", 8, "global_batch = 8");
        let err = check_step_fits(
            &global,
            2,
            Some(Available {
                bytes: GIB,
                source: "test",
            }),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("with 4 per rank"), "{err}");
        // Unknown device memory: nothing to refuse on.
        assert!(check_step_fits(&global, 2, None).is_ok());
    }

    #[test]
    fn memory_sources_parse() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(20_000_000));
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(24_576_000));
        assert_eq!(meminfo_kib(meminfo, "SwapTotal"), None);
        assert_eq!(parse_nvidia_smi("81559, 80530\n"), Some((81559 << 20, 80530 << 20)));
        assert_eq!(parse_nvidia_smi("[N/A], 3\n"), None);
        assert_eq!(parse_nvidia_smi(""), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.path().join("memory.current"), "1000\n").unwrap();
        assert_eq!(cgroup_headroom(dir.path()), None);
        std::fs::write(dir.path().join("memory.max"), "5000\n").unwrap();
        assert_eq!(cgroup_headroom(dir.path()), Some(4000));
        // This machine has memory to report.
        assert!(available_memory(DeviceSpec::Cpu).is_some_and(|a| a.bytes > 0));
        assert!(device_memory_total(DeviceSpec::Cpu) > 0);
    }
}
