//! Whether a training step fits in this worker's memory, decided before the first tensor is
//! allocated. A step that does not fit would otherwise kill the worker on allocation (the OOM
//! killer on a CPU, an allocation panic on a GPU), and the run would show only "missed its
//! heartbeats" and be retried on the next worker to die the same way. Refusing up front fails
//! the run once, with a message that names the fields to change.
//!
//! The estimate is per backbone, under burn's autodiff on the CPU backend: the activations the
//! forward pass keeps for the backward pass (scaled with the batch), the largest convolution's
//! im2col buffer (burn-flex materialises one per sample and frees it, so it does not scale with
//! the batch), the parameters with their gradients, AdamW moments and the all-reduce's copies,
//! and the step's input buffers. The per-architecture factors are calibrated against the peak RSS
//! of one training step in a fresh process (`bench/train_step`'s child mode, forward + BCE/Dice +
//! backward + AdamW), tiny and SuPreM presets, patches 32³ to 96³, batch 1 and 2, 2 threads: the
//! estimate exceeds every measured peak, by 1 to 30 % where the activations dominate and by up
//! to 2x on the smallest steps, where the process overhead does (the table is in the tests). It
//! leaves out the case cache, whose size depends on the dataset's volumes.

use std::path::Path;

use protocol::classes::NUM_CLASSES;
use protocol::spec::{ModelSpec, RunSpec};

use crate::backend::DeviceSpec;

const F32: u64 = 4;

/// Per class and voxel: the head's logits, the targets, and the loss's elementwise
/// intermediates (log-sigmoid, products, sigmoid, the Dice products) and their gradients.
const LOSS_TENSORS: u64 = 12;
/// Per parameter: weights, gradients, AdamW's two moments, and the flat and unflattened
/// gradient copies the all-reduce goes through.
pub const PARAM_COPIES: u64 = 6;
/// Measured peaks over the kept-tensor counts below, per backbone, with ~8 % headroom: what the
/// counts leave out (autodiff's saved inputs, the backward pass's temporaries, allocator slack)
/// differs by architecture: the U-Net's count overstates what burn keeps, Swin UNETR's misses
/// the attention's softmax and mask temporaries.
const CALIBRATION_UNET: f64 = 0.48;
const CALIBRATION_SEGRESNET: f64 = 0.62;
const CALIBRATION_SWINUNETR: f64 = 1.75;
/// The process itself: runtime, thread stacks, kernels' scratch, the gRPC buffers. The bench
/// process peaks at 89 MiB on the smallest step.
const PROCESS_OVERHEAD: u64 = 64 << 20;

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

/// Per-sample element counts of one backbone at one patch size.
struct Counts {
    /// Elements the step keeps per sample.
    kept: u64,
    /// Elements of the largest im2col buffer (27 x input channels x output voxels).
    im2col: u64,
    /// Parameters, counted as PyTorch counts them.
    params: u64,
    calibration: f64,
}

/// The memory one step of `model` needs for `batch` patches of `patch` voxels (each side a
/// multiple of the backbone's downsampling).
pub fn estimate_step(model: &ModelSpec, patch: [u32; 3], batch: u32) -> StepFootprint {
    let classes = NUM_CLASSES as u64;
    let n = batch as u64;
    let voxels = |level: u32| patch.iter().map(|&p| (p >> level) as u64).product::<u64>();
    let v0 = voxels(0);
    let counts = match model {
        ModelSpec::Unet(u) => unet_counts(u.resolved_base_width() as u64, u.resolved_depth(), &voxels),
        ModelSpec::Segresnet(s) => segresnet_counts(s.resolved_init_filters() as u64, &voxels),
        ModelSpec::Swinunetr(s) => swin_counts(s.resolved_feature_size() as u64, &voxels),
    };
    let kept = counts.kept + LOSS_TENSORS * classes * v0 + v0;
    let activations = (n * kept * F32) as f64 * counts.calibration + (counts.im2col * F32) as f64;
    StepFootprint {
        activations: activations as u64,
        model_state: PARAM_COPIES * counts.params * F32,
        other: 2 * n * v0 * (1 + classes) * F32 + PROCESS_OVERHEAD,
    }
}

/// The parameter count [`estimate_step`] assumes for `model`, as PyTorch counts it.
pub fn estimated_params(model: &ModelSpec) -> u64 {
    estimate_step(model, [32; 3], 1).model_state / (PARAM_COPIES * F32)
}

/// A 3x3x3 conv from `i` to `o` channels with bias.
fn conv3(i: u64, o: u64) -> u64 {
    27 * i * o + o
}

/// The Models Genesis U-Net: level `i` convolves to `c = w 2^i` then `2c` channels (conv, BN,
/// ReLU: about 7 kept tensors each), the decoder at level `i` keeps the transposed conv's `4c`,
/// the concatenation's `6c` and two conv blocks of `2c`. The largest im2col is the finest
/// decoder's first conv (`6w` channels in, full resolution).
fn unet_counts(w: u64, depth: u32, voxels: &dyn Fn(u32) -> u64) -> Counts {
    let (mut kept, mut params) = (0, 0);
    let mut channels = 1;
    for level in 0..depth {
        let c = w << level;
        kept += 7 * 3 * c * voxels(level);
        params += conv3(channels, c) + conv3(c, 2 * c) + 2 * c + 4 * c;
        channels = 2 * c;
        if level + 1 < depth {
            kept += 2 * c * voxels(level + 1) + 38 * c * voxels(level);
            params += 8 * (4 * c) * (4 * c) + 4 * c; // the transposed conv from level + 1
            params += conv3(6 * c, 2 * c) + conv3(2 * c, 2 * c) + 8 * c;
        }
    }
    let im2col = if depth > 1 {
        27 * 6 * w * voxels(0)
    } else {
        27 * w * voxels(0)
    };
    Counts {
        kept,
        im2col,
        params: params + 2 * w * NUM_CLASSES as u64 + NUM_CLASSES as u64,
        calibration: CALIBRATION_UNET,
    }
}

/// MONAI's SegResNet (blocks 1,2,2,4 down, 1,1,1 up): a residual block keeps about 12 tensors of
/// its width (two GroupNorms, activations, convs, the sum). Largest im2col: a full-resolution
/// conv of `f` channels.
fn segresnet_counts(f: u64, voxels: &dyn Fn(u32) -> u64) -> Counts {
    let (mut kept, mut params) = (2 * f * voxels(0), conv3(1, f) - f);
    for (level, blocks) in [1u64, 2, 2, 4].into_iter().enumerate() {
        let c = f << level;
        let v = voxels(level as u32);
        kept += 12 * blocks * c * v;
        params += blocks * (2 * (27 * c * c) + 4 * c);
        if level > 0 {
            kept += c * v;
            params += 27 * (c / 2) * c;
            // The up path: 1x1x1 conv, trilinear upsampling, the skip sum, one residual block.
            kept += (c / 2) * (voxels(level as u32 - 1) * 3 + v) + 12 * (c / 2) * voxels(level as u32 - 1);
            params += c * (c / 2) + 2 * (27 * (c / 2) * (c / 2)) + 2 * c;
        }
    }
    Counts {
        kept: kept + 3 * f * voxels(0),
        im2col: 27 * f * voxels(0),
        params: params + 2 * f + f * NUM_CLASSES as u64 + NUM_CLASSES as u64,
        calibration: CALIBRATION_SEGRESNET,
    }
}

/// MONAI's SwinUNETR (v1): four Swin stages (tokens at 1/2 to 1/16 of each side, width `f 2^s`,
/// two blocks of about 14 kept token-sized tensors, the 4x MLP, and the 343x343 attention
/// matrices per window and head), then the UNETR decoder's residual blocks at every level.
/// Largest im2col: the finest decoder block's first conv (`2f` channels in, full resolution).
fn swin_counts(f: u64, voxels: &dyn Fn(u32) -> u64) -> Counts {
    const WINDOW: u64 = 343;
    let heads = [3u64, 6, 12, 24];
    let mut kept = 0u64;
    for (stage, heads) in heads.into_iter().enumerate() {
        let c = f << stage;
        let tokens = voxels(stage as u32 + 1);
        let attention = heads * tokens.div_ceil(WINDOW).max(1) * WINDOW * WINDOW.min(tokens);
        kept += 2 * (14 * c * tokens + 3 * 4 * c * tokens + 3 * attention);
    }
    // Decoder: a residual block (about 10 kept tensors) per level at the encoder's widths, and
    // an up block (transposed conv, concatenation, residual block) per level.
    for level in 0..6u32 {
        let c = f << level.saturating_sub(1);
        kept += 2 * 10 * c * voxels(level);
    }
    Counts {
        kept,
        im2col: 27 * 2 * f * voxels(0),
        params: swin_params(f),
        calibration: CALIBRATION_SWINUNETR,
    }
}

/// SwinUNETR's exact parameter count at feature size `f` (depths 2,2,2,2, heads 3,6,12,24,
/// window 7, 25 outputs): MONAI's modules, counted one by one.
fn swin_params(f: u64) -> u64 {
    let mut params = 8 * f + f; // patch embedding: 2x2x2 stride-2 conv with bias
    for (stage, heads) in [3u64, 6, 12, 24].into_iter().enumerate() {
        let c = f << stage;
        // Two blocks: 2 LayerNorms, qkv and proj Linears, the 13^3 bias table per head, the
        // 4x MLP; then patch merging (LayerNorm of 8c, Linear 8c -> 2c without bias).
        params += 2 * (12 * c * c + 13 * c + 2197 * heads) + 16 * c * c + 16 * c;
    }
    // UnetResBlocks (bias-free 3x3x3 convs, affine-free InstanceNorm): encoder1 (1 -> f, with
    // its 1x1x1 projection), encoder2..4 and encoder10 (f, 2f, 4f, 16f, two convs each).
    params += 27 * f + 27 * f * f + f + 2 * 27 * f * f * (1 + 4 + 16 + 256);
    // Up blocks decoder5..1: a bias-free 2x2x2 transposed conv in -> out, then a residual block
    // 2 out -> out with its 1x1x1 projection.
    for (inner, outer) in [(16u64, 8u64), (8, 4), (4, 2), (2, 1), (1, 1)] {
        params += (8 * inner * outer + 27 * 2 * outer * outer + 27 * outer * outer + 2 * outer * outer) * f * f;
    }
    params + f * NUM_CLASSES as u64 + NUM_CLASSES as u64
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
    use protocol::spec::Preset;

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
        // Measured: 143 MiB peak RSS for this step (the tiny U-Net, 32³, batch 1; table below).
        assert!(need.total() < GIB / 2, "{need:?}");
        assert!(need.total() > 143 << 20, "{need:?}");
    }

    #[test]
    fn the_per_rank_batch_scales_the_activations() {
        let one = estimate_step(&unet(8, 3), [64; 3], 1);
        let four = estimate_step(&unet(8, 3), [64; 3], 4);
        // Kept activations scale with the batch; the largest im2col buffer (one sample at a
        // time) does not.
        assert!(2 * four.activations > 3 * one.activations, "{one:?} {four:?}");
        assert!(four.activations < 4 * one.activations, "{one:?} {four:?}");
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

    /// Peak RSS (MiB) of one training step in a fresh process: `bench-train-step --child`
    /// (forward, BCE + Dice over 25 classes, backward, AdamW; 2 rayon threads; burn-flex),
    /// measured 2026-11-30 on the 2-core CPU machine with each backbone's branch build.
    /// (arch, preset, cube side, batch, MiB).
    const MEASURED_PEAKS: [(&str, Preset, u32, u32, u64); 23] = [
        ("unet", Preset::Tiny, 32, 1, 143),
        ("unet", Preset::Tiny, 32, 2, 169),
        ("unet", Preset::Tiny, 64, 1, 1019),
        ("unet", Preset::Tiny, 64, 2, 1108),
        ("unet", Preset::Tiny, 96, 1, 2798),
        ("unet", Preset::Tiny, 96, 2, 3324),
        ("unet", Preset::Suprem, 32, 1, 969),
        ("unet", Preset::Suprem, 32, 2, 1119),
        ("unet", Preset::Suprem, 64, 1, 6522),
        ("unet", Preset::Suprem, 96, 1, 21447),
        ("segresnet", Preset::Tiny, 32, 1, 89),
        ("segresnet", Preset::Tiny, 64, 1, 611),
        ("segresnet", Preset::Tiny, 64, 2, 884),
        ("segresnet", Preset::Tiny, 96, 1, 1610),
        ("segresnet", Preset::Suprem, 32, 1, 176),
        ("segresnet", Preset::Suprem, 32, 2, 252),
        ("segresnet", Preset::Suprem, 64, 1, 1195),
        ("segresnet", Preset::Suprem, 96, 1, 3158),
        ("swinunetr", Preset::Tiny, 32, 1, 530),
        ("swinunetr", Preset::Tiny, 32, 2, 954),
        ("swinunetr", Preset::Tiny, 64, 1, 2884),
        ("swinunetr", Preset::Suprem, 32, 1, 1110),
        ("swinunetr", Preset::Suprem, 64, 1, 5851),
    ];

    #[test]
    fn estimates_cover_measured_peaks_without_gross_excess() {
        for (arch, preset, side, batch, mib) in MEASURED_PEAKS {
            let spec = ModelSpec::preset(arch, preset).unwrap();
            let estimate = estimate_step(&spec, [side; 3], batch);
            let measured = mib << 20;
            // The benchmark has no all-reduce, so it never holds the two gradient copies the
            // estimate counts for it; "gross excess" is judged against the peak with them.
            let all_reduce = 2 * estimated_params(&spec) * F32;
            let ratio = estimate.total() as f64 / (measured + all_reduce) as f64;
            println!(
                "{arch:>9} {:>6} {side}^3 x{batch}: measured {mib} MiB, estimate {} MiB \
                 ({ratio:.2}x the peak plus the all-reduce's copies)",
                preset.name(),
                estimate.total() >> 20
            );
            assert!(
                estimate.total() > measured,
                "{arch} {preset:?} {side} {batch}: {estimate:?}"
            );
            assert!(ratio < 2.0, "{arch} {preset:?} {side} {batch}: {ratio:.2}x");
        }
    }

    #[test]
    fn estimated_params_are_the_architectures_counts() {
        // The SuPreM figures, and PyTorch's counts of the tiny presets
        // (bench/train_step/train_step.py builds them from the same specs).
        for (arch, suprem, tiny) in [
            ("unet", 19_075_225, 299_209),
            ("segresnet", 4_701_305, 1_176_393),
            ("swinunetr", 62_187_835, 4_078_363),
        ] {
            let count = |preset| estimated_params(&ModelSpec::preset(arch, preset).unwrap());
            assert_eq!(count(Preset::Suprem), suprem, "{arch}");
            assert_eq!(count(Preset::Tiny), tiny, "{arch}");
        }
    }

    #[test]
    fn estimated_params_match_the_built_models() {
        // Every backbone this build has, at its tiny preset (the count is per-architecture
        // arithmetic, so the width does not matter for exactness).
        for arch in protocol::spec::KNOWN_ARCHS {
            let spec = ModelSpec::preset(arch, Preset::Tiny).unwrap();
            let Ok(config) = crate::model::ModelConfig::from_spec(&spec, NUM_CLASSES) else {
                println!("{arch}: not in this build, skipped");
                continue;
            };
            let model = config.init::<crate::backend::Cpu>(&Default::default());
            let built = crate::model::param_count(&model) as u64;
            assert_eq!(estimated_params(&spec), built, "{arch}");
        }
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
