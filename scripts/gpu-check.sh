#!/usr/bin/env bash
# GPU check and costed plan for SuPreM's pre-training on all 9,262 AbdomenAtlas 1.1 volumes.
#
#   scripts/gpu-check.sh                      # on a machine with an NVIDIA GPU: measure, then plan
#   scripts/gpu-check.sh --plan-from 0.42     # plan only, from a step time in seconds (any machine)
#   scripts/gpu-check.sh --plan-from unet=0.42,segresnet=0.31,swinunetr=0.95
#
# Measure: builds the worker with --features cuda (and the `coordinator` CLI),
# starts a coordinator on loopback, writes phantom CTs, and for each backbone (U-Net, SegResNet,
# Swin UNETR, SuPreM presets) runs a real one-GPU training run at 96^3 with 2 crops per step
# (STEPS steps, default 40) in a fresh worker process. It prints the median step time the worker
# reports (train/step_seconds, first window dropped: it holds kernel compilation) and the peak
# GPU memory nvidia-smi saw during the run, minus what was in use before the worker started.
#
# Plan: from the step time at batch B (2) per GPU,
#   GPU-hours per epoch = (9,262 volumes x 2 crops) / B x step_seconds / 3600
#   GPU-hours for SuPreM = 2,000 epochs x that          (SuPreM: --max_epoch 2000)
#   wall-clock hours     = GPU-hours / GPUS             (default 32: 4 nodes x 8 GPUs)
# An epoch is 18,524 crops because SuPreM draws --num_samples 2 crops per volume. This assumes
# the step time at batch B holds per crop at SuPreM's larger per-GPU batches (larger batches
# usually run more crops per second, so it errs high) and data-parallel scaling with no
# all-reduce overhead (which errs low); measure at scale before budgeting tightly.
#
# Options: --plan-from S | arch=S,...   --batch B (2)   --gpus N (32)   --epochs E (2000)
#          --usd-per-gpu-hour P (prints cost)   --steps N (40, measure mode)
# The last line is machine-readable: `PLAN arch=... gpu_hours_per_epoch=... gpu_hours_suprem=...`.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "error: scripts/gpu-check.sh: $*" >&2; exit 1; }

VOLUMES=9262
CROPS_PER_VOLUME=2
ARCHS=(unet segresnet swinunetr)
plan_from="" batch=2 gpus=32 epochs=2000 usd="" steps=40
while [[ $# -gt 0 ]]; do
  case $1 in
    --plan-from) plan_from=${2:?--plan-from needs step seconds}; shift 2 ;;
    --batch) batch=${2:?}; shift 2 ;;
    --gpus) gpus=${2:?}; shift 2 ;;
    --epochs) epochs=${2:?}; shift 2 ;;
    --usd-per-gpu-hour) usd=${2:?}; shift 2 ;;
    --steps) steps=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v x="$1" 'BEGIN { exit !(x > 0) }'; }
for v in "$batch" "$gpus" "$epochs" "$steps"; do is_number "$v" || die "'$v' is not a positive number"; done
[[ -z $usd ]] || is_number "$usd" || die "--usd-per-gpu-hour '$usd' is not a positive number"

# Prints the plan for "arch=seconds" pairs (arch may be `any`).
plan() {
  local pair arch seconds per_epoch total wall cost
  echo
  echo "Costed plan: $VOLUMES volumes x $CROPS_PER_VOLUME crops per epoch, step times at batch $batch per GPU,"
  echo "SuPreM's schedule = $epochs epochs, wall-clock on $gpus GPUs (linear data-parallel scaling assumed)"
  printf '%-10s %9s %17s %16s %14s%s\n' backbone step_s GPU-h/epoch GPU-h/SuPreM wall-h/SuPreM "${usd:+ USD/SuPreM}"
  local machine="PLAN"
  for pair in "$@"; do
    arch=${pair%%=*} seconds=${pair#*=}
    is_number "$seconds" || die "step time for $arch: '$seconds' is not a positive number of seconds"
    read -r per_epoch total wall cost < <(awk -v v="$VOLUMES" -v c="$CROPS_PER_VOLUME" -v b="$batch" -v s="$seconds" \
                 -v e="$epochs" -v g="$gpus" -v p="${usd:-0}" 'BEGIN {
      per_epoch = v * c / b * s / 3600; total = per_epoch * e
      printf "%.3f %.1f %.1f %.0f\n", per_epoch, total, total / g, total * p }')
    printf '%-10s %9s %17s %16s %14s%s\n' "$arch" "$seconds" "$per_epoch" "$total" "$wall" "${usd:+ $cost}"
    machine+=" $arch.step_seconds=$seconds $arch.gpu_hours_per_epoch=$per_epoch $arch.gpu_hours_suprem=$total"
    machine+=" $arch.wall_hours_suprem=$wall${usd:+ $arch.usd_suprem=$cost}"
  done
  echo "$machine"
}

if [[ -n $plan_from ]]; then
  pairs=()
  IFS=, read -ra items <<<"$plan_from"
  for item in "${items[@]}"; do
    if [[ $item == *=* ]]; then pairs+=("$item"); else pairs+=("any=$item"); fi
  done
  plan "${pairs[@]}"
  exit 0
fi

# --- measure on the GPU ----------------------------------------------------------------------
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: measuring needs an NVIDIA GPU (or use --plan-from SECONDS)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/voxelfleet/target}
echo "== building the CUDA worker and the control-plane CLI"
cargo build --release -p worker --features cuda
cargo build --release --bin coordinator
bin=$CARGO_TARGET_DIR/release
work=$(mktemp -d)
coord_pid="" worker_pid="" smi_pid=""
cleanup() {
  set +e
  for p in "$smi_pid" "$worker_pid" "$coord_pid"; do [[ -n $p ]] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/coordinator" serve --listen 127.0.0.1:0 --data-dir "$work/coord" >"$work/coord.out" 2>"$work/coord.log" &
coord_pid=$!
for _ in $(seq 30); do grep -q "listening on" "$work/coord.out" && break; sleep 1; done
addr=$(sed -n 's/^coordinator listening on \([^ ]*\).*/\1/p' "$work/coord.out")
[[ -n $addr ]] || die "the coordinator did not start: $(cat "$work/coord.log")"
export VOXELFLEET_COORDINATOR="http://$addr" VOXELFLEET_TOKEN_FILE="$work/coord/token"
"$bin/coordinator" dataset synth --cases 4 --shape 128,128,128 --out "$work/dataset"

used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }
measured=()
for arch in "${ARCHS[@]}"; do
  echo "== $arch: $steps steps at 96^3, batch $batch, one GPU"
  cat >"$work/$arch.toml" <<EOF
name = "gpu-check-$arch"
world_size = 1
device = "cuda"
[dataset]
url = "$work/dataset"
[model]
arch = "$arch"
preset = "suprem"
[train]
steps = $steps
batch_size = $batch
patch = [96, 96, 96]
lr = 1e-3
warmup_steps = 1
checkpoint_every = 0
metrics_every = 10
checksum_every = 10
eval = false
[artifacts]
url = "$work/store"
EOF
  baseline=$(used_mib)
  "$bin/worker" --device cuda:0 --max-runs 1 --cache-dir "$work/cache" >"$work/$arch.worker.out" 2>"$work/$arch.worker.log" &
  worker_pid=$!
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$work/$arch.mem" &
  smi_pid=$!
  run=$("$bin/coordinator" submit "$work/$arch.toml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
  timeout 1800 "$bin/coordinator" metrics "$run" --follow >/dev/null || die "$arch: run $run did not end within 30 min"
  kill "$smi_pid"; wait "$smi_pid" 2>/dev/null || true; smi_pid=""
  wait "$worker_pid" || true; worker_pid=""
  state=$("$bin/coordinator" show "$run" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["state"])')
  [[ $state == Completed ]] || die "$arch: run $run ended $state: $("$bin/coordinator" show "$run"); worker log: $(tail -20 "$work/$arch.worker.log")"
  step_s=$("$bin/coordinator" metrics "$run" --json | python3 -c '
import json, statistics, sys
points = sorted((m["step"], m["value"]) for m in map(json.loads, sys.stdin) if m["name"] == "train/step_seconds")
later = [v for _, v in points[1:]] or [v for _, v in points]
print(f"{statistics.median(later):.4f}")')
  peak=$(sort -n "$work/$arch.mem" | tail -1)
  echo "$arch: step ${step_s} s (median over windows after the first), peak GPU memory $((peak - baseline)) MiB (nvidia-smi, above the ${baseline} MiB in use before)"
  measured+=("$arch=$step_s")
done
plan "${measured[@]}"
