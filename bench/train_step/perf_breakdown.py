"""Where a training step's CPU time goes, from `perf script` output of a dwarf call-graph profile.

    RAYON_NUM_THREADS=1 perf record -F 999 --call-graph dwarf,16384 -o step.data \\
        target/release/bench-train-step --child --arch unet --patch 32 --warmup 1 --steps 4
    perf script -i step.data | python3 bench/train_step/perf_breakdown.py

Every sample is charged to one kernel: the innermost `burn_flex::ops::<file>::<function>` on its
stack (a closure or a libc memset/memcpy/page fault inside a kernel is charged to the kernel),
else to the innermost burn-autodiff / burn-optim / worker frame, else to its leaf symbol. burn
runs its kernels on rayon's pool, so a kernel's stack does not say whether the forward or the
backward pass called it; the step's phase timings (the benchmark's phase table) say that. The
groups below sort kernels into what a reader asks about (convolutions, norms, attention, loss
elementwise work, optimizer, allocation).
"""
import collections
import re
import sys

KERNEL = re.compile(r"burn_flex::ops::(\w+)::(\w+)")
OTHER = re.compile(r"(burn_autodiff::[\w:]+|burn_optim::[\w:]+|burn_core::optim::[\w:]+|worker::[\w:]+|gemm_\w+::[\w:]+)")

GROUPS = [
    ("conv3d (im2col + gemm)", ("conv::", "conv_common::")),
    ("conv_transpose3d", ("conv_transpose::",)),
    ("matmul (gemm)", ("matmul::",)),
    ("gemm (caller unknown)", ("gemm_",)),
    ("pool", ("pool::",)),
    ("interpolate", ("interpolate::",)),
    ("softmax / attention", ("attention::", "activation::softmax")),
    ("reductions (sum/mean/var: norms, loss)", ("reduce::",)),
    ("elementwise (unary/binary/activation)", ("unary::", "binary::", "activation::", "float::", "comparison::", "mask::")),
    ("copies (cat/slice/expand/gather/permute)", ("cat::", "slice::", "expand::", "gather_scatter::", "repeat_dim::", "layout", "tensor::", "flip::")),
    ("optimizer", ("burn_optim", "burn_core::optim", "adam")),
    ("autodiff bookkeeping", ("burn_autodiff",)),
]


def charge(frames):
    for f in frames:
        m = KERNEL.search(f)
        if m:
            return f"{m.group(1)}::{m.group(2)}"
    for f in frames:
        m = OTHER.search(f)
        if m:
            return "::".join(m.group(1).split("::")[:4])
    return frames[0] if frames else "?"


def group_of(kernel, frames):
    if any("adamw" in f.lower() or "burn_optim" in f for f in frames):
        return "optimizer"
    for name, keys in GROUPS:
        if any(k in kernel for k in keys):
            return name
    leaf = frames[0] if frames else ""
    if any(k in leaf for k in ("page_fault", "clear_page", "memset", "alloc", "free", "munmap", "mmap")):
        return "allocation / page faults (outside kernels)"
    return "other"


def samples(stream):
    frames = []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if frames:
                yield frames
            frames = []
            continue
        if not line.startswith((" ", "\t")):
            continue  # the sample's header line
        parts = line.strip().split(" ", 1)
        if len(parts) == 2:
            frames.append(re.sub(r"\+0x[0-9a-f]+ \(.*\)$|\+0x[0-9a-f]+$| \(.*\)$", "", parts[1]))
    if frames:
        yield frames


def main():
    kernels = collections.Counter()
    groups = collections.Counter()
    total = 0
    for frames in samples(sys.stdin):
        kernel = charge(frames)
        kernels[kernel] += 1
        groups[group_of(kernel, frames)] += 1
        total += 1
    if total == 0:
        sys.exit("no samples on stdin")
    print(f"{total} samples")
    print("\nby group:")
    for name, n in groups.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nby kernel (top 25):")
    for name, n in kernels.most_common(25):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
