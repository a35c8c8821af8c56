#!/usr/bin/env bash
# Create (or refresh) a venv for the MONAI side of bench/preprocess.
#
#   ./setup_venv.sh VENV_DIR            # lean torch install (default)
#   TORCH_MODE=full ./setup_venv.sh VENV_DIR   # plain `pip install torch` (≈5.3 GB)
#
# Why "lean": PyPI's Linux x86_64 torch wheel is a CUDA build. libtorch.so is
# linked against libtorch_cuda.so, which needs libcudart, cublas, cudnn, nccl, ...
# at load time, so `pip install torch --no-deps` alone fails at `import torch`
# ("libcublasLt.so.*[0-9] not found"). There is no CPU-only torch on PyPI and
# download.pytorch.org is unreachable. The lean mode therefore installs torch
# --no-deps plus only the nvidia runtime libraries that libtorch actually links
# (all --no-deps), and skips triton (~1 GB), cuda-bindings, cusolver, nvtx and
# cccl, which are not needed for CPU work. Result ≈4.0 GB instead of ≈5.3 GB.
# The CPU code path (libtorch_cpu.so) is identical in both modes.
#
# Idempotent: re-running only re-checks what is installed.
set -euo pipefail

VENV="${1:?usage: $0 VENV_DIR}"
PY="${PYTHON:-python3}"
MODE="${TORCH_MODE:-lean}"

# Pinned set (resolved from torch 2.15.0's own metadata, Requires-Dist).
TORCH_VER=2.15.0
MONAI_VER=1.6.1
NIBABEL_VER=5.4.2
NVIDIA_PINS=(
  nvidia-cuda-runtime==13.2.86
  nvidia-cublas==13.4.1.3
  nvidia-cuda-nvrtc==13.2.86
  nvidia-cuda-cupti==13.2.86
  nvidia-cufft==12.2.0.57
  nvidia-cufile==1.17.1.22
  nvidia-cusparse==12.7.10.12
  "nvidia-nvjitlink>=13.2.86,<14"
  nvidia-cudnn-cu13==9.26.0.51
  nvidia-cusparselt-cu13==0.8.1
  nvidia-nccl-cu13==2.30.7
  nvidia-nvshmem-cu13==3.7.2
)
# torch's pure-Python runtime deps (setuptools>=77 is only for cpp_extension).
TORCH_PY_DEPS=(filelock "typing-extensions>=4.13.0" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5")

say() { printf '\n==> %s\n' "$*"; }
T0=$(date +%s)

if [[ -x "$VENV/bin/python" ]]; then
  say "venv $VENV exists, reusing it"
else
  say "creating venv $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "numpy, scipy, nibabel"
"${PIP[@]}" install "numpy<3" scipy "nibabel==$NIBABEL_VER"

torch_ok() {
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import torch
t = torch.zeros(3)
assert t.sum().item() == 0.0
print("torch", torch.__version__, "OK:", t, "cuda available:", torch.cuda.is_available())
EOF
}

if [[ "$MODE" == "full" ]]; then
  say "torch==$TORCH_VER, full dependency set (includes triton + all nvidia-* wheels)"
  "${PIP[@]}" install "torch==$TORCH_VER"
else
  say "torch==$TORCH_VER --no-deps + its pure-Python deps"
  "${PIP[@]}" install --no-deps "torch==$TORCH_VER"
  "${PIP[@]}" install "${TORCH_PY_DEPS[@]}"
  say "checking whether torch imports as installed so far"
  if torch_ok; then
    if ls -d "$VENV"/lib/python3*/site-packages/nvidia >/dev/null 2>&1; then
      echo "yes (nvidia runtime libs already present from an earlier run)"
    else
      echo "yes, torch works without any nvidia libs"
    fi
  else
    echo "torch --no-deps does NOT import (libtorch.so links libtorch_cuda.so -> libcudart/cublas/cudnn/...)."
    say "installing only the nvidia runtime libs libtorch links against (--no-deps; no triton)"
    "${PIP[@]}" install --no-deps "${NVIDIA_PINS[@]}"
  fi
fi

say "monai==$MONAI_VER (--no-deps: its only deps are torch and numpy, already present;"
echo "    letting pip resolve would pull torch's full CUDA dependency set back in)"
"${PIP[@]}" install --no-deps "monai==$MONAI_VER"

say "verifying"
if ! torch_ok; then
  echo "lean torch install failed to import; falling back to full 'pip install torch'" >&2
  "${PIP[@]}" install "torch==$TORCH_VER"
  torch_ok
fi
"$VENV/bin/python" -c "import monai, nibabel, numpy, scipy; print('monai', monai.__version__, '| nibabel', nibabel.__version__, '| numpy', numpy.__version__, '| scipy', scipy.__version__)"

T1=$(date +%s)
say "done in $((T1 - T0)) s; venv size: $(du -sh "$VENV" | cut -f1)"
du -sh "$VENV"/lib/python3*/site-packages/{torch,nvidia,triton,scipy,numpy,monai} 2>/dev/null || true
