"""PyTorch side of bench/train_step: one backbone's training step (forward, BCE + Dice loss,
backward, AdamW) on the CPU, timed phase by phase, printed as one JSON line.

The architectures are the ones voxelfleet's backbones reproduce:
  unet       SuPreM's Models Genesis 3D U-Net, imported from tools/fixtures/unet.py (the class the
             U-Net parity fixture is built from), UNet3D(1, 25, width, depth)
  segresnet  MONAI SegResNet, blocks_down 1,2,2,4, blocks_up 1,1,1, GroupNorm(8), ReLU,
             non-trainable trilinear upsampling, no dropout
  swinunetr  MONAI SwinUNETR (v1 layout, use_v2=False), depths 2,2,2,2, heads 3,6,12,24, window 7

The loss is voxelfleet's worker::train::loss::bce_dice_loss: BCE-with-logits (mean) + soft Dice
per class over batch and space (smooth 1e-5), averaged over the classes present in the targets.
The optimiser is AdamW(lr=1e-4, weight_decay=1e-5), torch's default (foreach) implementation.

Thread count: OMP/MKL variables are set before torch is imported, then torch.set_num_threads(T)
and one inter-op thread. Every exception becomes {"error": ...}, so the driver can report it.

  python train_step.py --arch unet --width 4 --depth 4 --patch 32 --threads 2 --warmup 1 --steps 5
"""
import argparse
import json
import os
import pathlib
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", required=True, choices=["unet", "segresnet", "swinunetr"])
    p.add_argument("--width", type=int, required=True, help="base_width / init_filters / feature_size")
    p.add_argument("--depth", type=int, default=4, help="U-Net levels")
    p.add_argument("--patch", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=25)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    return p.parse_args()


def build(args):
    import torch.nn as nn  # noqa: F401

    if args.arch == "unet":
        sys.path.insert(0, str(REPO / "tools" / "fixtures"))
        from unet import UNet3D

        return UNet3D(in_channels=1, n_class=args.classes, width=args.width, depth=args.depth)
    if args.arch == "segresnet":
        from monai.networks.nets import SegResNet

        return SegResNet(
            spatial_dims=3,
            init_filters=args.width,
            in_channels=1,
            out_channels=args.classes,
            dropout_prob=None,
            act=("RELU", {"inplace": True}),
            norm=("GROUP", {"num_groups": 8}),
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            upsample_mode="nontrainable",
        )
    import monai.networks.nets.swin_unetr as swin_unetr
    from monai.networks.nets import SwinUNETR

    try:
        import einops  # noqa: F401
    except ImportError:
        # The two einops patterns SwinUNETR uses are plain permutations.
        def rearrange(x, pattern):
            src, dst = (side.split() for side in pattern.split("->"))
            return x.permute(*[src.index(axis) for axis in dst])

        swin_unetr.rearrange = rearrange
    return SwinUNETR(
        in_channels=1,
        out_channels=args.classes,
        feature_size=args.width,
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        use_v2=False,
    )


def bce_dice(logits, targets):
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probs = torch.sigmoid(logits)
    dims = [0, 2, 3, 4]
    intersection = (probs * targets).sum(dims)
    pred_sum = probs.sum(dims)
    target_sum = targets.sum(dims)
    per_class = 1.0 - (2.0 * intersection + 1e-5) / (pred_sum + target_sum + 1e-5)
    present = (target_sum > 0).float()
    dice = (per_class * present).sum() / present.sum().clamp_min(1.0)
    return bce + dice


def median(values):
    s = sorted(values)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run(args):
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(0)
    model = build(args).train()
    params = sum(p.numel() for p in model.parameters())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    shape = (args.batch, 1, args.patch, args.patch, args.patch)
    x = torch.randn(shape)
    y = (torch.rand((args.batch, args.classes) + shape[2:]) < 0.1).float()
    phases = {k: [] for k in ("step", "forward", "loss", "backward", "optim")}
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        logits = model(x)
        t1 = time.perf_counter()
        loss = bce_dice(logits, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optim.step()
        t4 = time.perf_counter()
        value = loss.item()
        if value != value:
            raise RuntimeError(f"step {step}: loss is NaN")
        if step >= args.warmup:
            for key, a, b in (("step", t0, t4), ("forward", t0, t1), ("loss", t1, t2), ("backward", t2, t3), ("optim", t3, t4)):
                phases[key].append((b - a) * 1e3)
    return {
        "params": params,
        "step_ms": phases["step"],
        "forward_ms": median(phases["forward"]),
        "loss_ms": median(phases["loss"]),
        "backward_ms": median(phases["backward"]),
        "optim_ms": median(phases["optim"]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch": torch.__version__,
    }


def main():
    args = parse()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    try:
        report = run(args)
    except Exception as err:  # reported, not raised: the driver prints it in the table
        report = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
