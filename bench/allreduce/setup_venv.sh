#!/usr/bin/env bash
# Creates (or refreshes) the venv for the gloo side of bench/allreduce: torch 2.15.0 from PyPI,
# used on the CPU (torch.distributed with the gloo backend). The same pinned, lean install as
# bench/preprocess and bench/train_step (see bench/preprocess/setup_venv.sh for why torch needs
# some NVIDIA runtime wheels just to import), so the three benchmarks can share one venv.
#
#   ./setup_venv.sh VENV_DIR
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../preprocess/setup_venv.sh" "$@"
