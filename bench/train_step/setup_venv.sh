#!/usr/bin/env bash
# Creates (or refreshes) the venv for the PyTorch side of bench/train_step: torch 2.15.0 (used on
# the CPU) and MONAI 1.6.1 from PyPI. The same pinned, lean install as bench/preprocess (see its
# README for why torch needs some NVIDIA runtime wheels just to import); that script also adds
# nibabel and scipy, which this benchmark does not use.
#
#   ./setup_venv.sh VENV_DIR
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../preprocess/setup_venv.sh" "$@"
