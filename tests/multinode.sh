#!/usr/bin/env bash
# Multi-node test over real network links: three network namespaces joined by veth pairs on a
# bridge, the coordinator in one and a worker in each of the other two, every link shaped to
# 1 Gbit/s (tbf) and, where the kernel has netem, 1 ms of delay. Then:
#   1. a two-worker run completes across the namespaces;
#   2. a second run loses one worker's link mid-run (`ip link set ... down`): it must be
#      interrupted within a bounded wait (not hang), and once the link is back it resumes on
#      its own (automatic re-queue) and completes.
# Workers dial each other on the addresses they advertise (`--advertise`), as on a cluster, and
# log JSON (`--log-format json`); the test checks every worker log line parses.
#
#   tests/multinode.sh            # needs root (CAP_NET_ADMIN) and the release binaries
#
# Binaries: $VOXELFLEET_BIN_DIR, else $CARGO_TARGET_DIR/release (.ci/run builds them first).
# Namespaces, links, processes and files are removed on exit, whatever happens; names carry
# this process's id, so a crashed earlier run cannot collide with this one. Every wait is
# bounded; the whole test takes 1-3 minutes on two cores.
set -euo pipefail

die() { echo "error: tests/multinode.sh: $*" >&2; exit 1; }
log() { echo "multinode: $*"; }

bin_dir=${VOXELFLEET_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/voxelfleet/target}/release}
coordinator_bin=$bin_dir/coordinator
worker_bin=$bin_dir/worker
for b in "$coordinator_bin" "$worker_bin"; do
  [[ -x $b ]] || die "$b not found: build it with 'cargo build --release --bin coordinator --bin worker'"
done
for tool in ip tc python3; do
  command -v "$tool" >/dev/null || die "'$tool' not found (iproute2 and python3 are needed)"
done

# Short unique names: interface names are limited to 15 characters.
tag="vf$$"
bridge="${tag}br"
ns_coord="${tag}-coord" ns_w1="${tag}-w1" ns_w2="${tag}-w2"
subnet=10.231.0
addr_coord=$subnet.1 addr_w1=$subnet.2 addr_w2=$subnet.3
endpoint="http://$addr_coord:7070"
work=$(mktemp -d "${TMPDIR:-/tmp}/voxelfleet-multinode.XXXXXX")
pids=()
created_ns=()

cleanup() {
  local status=$?
  set +e
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  # Anything still running inside our namespaces was started by this script.
  for ns in "${created_ns[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  # Deleting a namespace deletes its veth end and so the pair; the bridge is ours to remove.
  ip link del "$bridge" 2>/dev/null
  if [[ $status != 0 ]]; then
    for f in "$work"/*.log; do
      [[ -f $f ]] || continue
      echo "---- last lines of $(basename "$f")" >&2
      tail -15 "$f" >&2
    done
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- network -----------------------------------------------------------------------------------
if ! ip netns add "$ns_coord" 2>"$work/netns.err"; then
  die "cannot create a network namespace ($(cat "$work/netns.err")); this test needs root or CAP_NET_ADMIN"
fi
created_ns+=("$ns_coord")
ip netns add "$ns_w1" && created_ns+=("$ns_w1")
ip netns add "$ns_w2" && created_ns+=("$ns_w2")

ip link add "$bridge" type bridge
# Bridged frames must not go through the host's iptables (br_netfilter), whose FORWARD policy
# may drop them; older iproute2 lacks the option, and then the host's settings apply.
ip link set "$bridge" type bridge nf_call_iptables 0 2>/dev/null || true
ip link set "$bridge" up

netem_supported=unknown
shaping=""
# Joins namespace $1 to the bridge as $2 (its address) through a veth pair named after $3, and
# shapes the namespace's egress: tbf at 1 Gbit/s always, under netem's 1 ms delay when the
# kernel has netem.
join() {
  local ns=$1 addr=$2 short=$3
  local host_end="${tag}${short}h" ns_end="${tag}${short}n"
  ip link add "$host_end" type veth peer name "$ns_end"
  ip link set "$host_end" master "$bridge" up
  ip link set "$ns_end" netns "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "$ns_end" name eth0
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  if [[ $netem_supported != no ]] && ip netns exec "$ns" tc qdisc add dev eth0 root handle 1: netem delay 1ms 2>/dev/null; then
    netem_supported=yes
    ip netns exec "$ns" tc qdisc add dev eth0 parent 1:1 handle 10: tbf rate 1gbit burst 256kb latency 50ms
    shaping="netem delay 1ms + tbf 1gbit"
  else
    netem_supported=no
    ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate 1gbit burst 256kb latency 50ms
    shaping="tbf 1gbit only (this kernel has no netem: no added delay)"
  fi
}
join "$ns_coord" "$addr_coord" c
join "$ns_w1" "$addr_w1" 1
join "$ns_w2" "$addr_w2" 2
log "namespaces $ns_coord ($addr_coord), $ns_w1 ($addr_w1), $ns_w2 ($addr_w2) on bridge $bridge"
log "link shaping: $shaping"
for ns in "$ns_coord" "$ns_w1" "$ns_w2"; do
  ip netns exec "$ns" tc qdisc show dev eth0 | sed "s/^/multinode:   $ns: /"
done

# --- processes ---------------------------------------------------------------------------------
cli() {
  ip netns exec "$ns_coord" "$coordinator_bin" "$@" --coordinator "$endpoint" --timeout-secs 10
}
json_field() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[k]
print(v)' "$@"; }
# Polls `cond` (a command) every second until it succeeds, for at most $2 seconds.
wait_for() {
  local what=$1 limit=$2 start=$SECONDS
  shift 2
  until "$@"; do
    (( SECONDS - start < limit )) || die "timed out after ${limit}s waiting for $what"
    sleep 1
  done
}

export RUST_LOG=${RUST_LOG:-info}
ip netns exec "$ns_coord" "$coordinator_bin" serve --listen "$addr_coord:7070" --data-dir "$work/coord" \
  --dead-after-secs 3 --log-format json >"$work/coordinator.out" 2>"$work/coordinator.log" &
pids+=($!)
wait_for "the coordinator to listen" 30 grep -q "coordinator listening" "$work/coordinator.out"
wait_for "the coordinator's token file" 10 test -s "$work/coord/token"
# Across the bridge, not loopback: each worker namespace reaches the coordinator's address.
for ns in "$ns_w1" "$ns_w2"; do
  ip netns exec "$ns" timeout 5 bash -c "echo >/dev/tcp/$addr_coord/7070" \
    || die "$ns cannot reach $addr_coord:7070 over the bridge"
done
export VOXELFLEET_TOKEN_FILE=$work/coord/token

"$coordinator_bin" dataset synth --cases 8 --shape 48,48,48 --out "$work/dataset" >/dev/null
start_worker() {
  local ns=$1 addr=$2 name=$3
  ip netns exec "$ns" "$worker_bin" --coordinator "$endpoint" --peer-listen 0.0.0.0:0 --advertise "$addr" \
    --collective-timeout-secs 20 --cache-dir "$work/cache-$name" --log-format json \
    >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
}
start_worker "$ns_w1" "$addr_w1" w1
start_worker "$ns_w2" "$addr_w2" w2
idle_workers() { cli workers --json | python3 -c 'import json,sys; print(sum(w["state"]=="Idle" for w in json.load(sys.stdin)))'; }
two_idle() { [[ $(idle_workers) == 2 ]]; }
wait_for "both workers to register" 60 two_idle
log "coordinator and 2 workers up; peers advertise $addr_w1 and $addr_w2"

spec() {
  local name=$1 steps=$2
  cat >"$work/$name.toml" <<EOF
name = "$name"
world_size = 2
seed = 7
max_retries = 3

[dataset]
url = "$work/dataset"
eval_cases = 2
order_seed = 1

[model]
arch = "unet"
preset = "tiny"

[train]
steps = $steps
batch_size = 1
patch = [32, 32, 32]
lr = 0.01
warmup_steps = 2
checkpoint_every = 5
checksum_every = 5
metrics_every = 1
eval = false

[artifacts]
url = "$work/store"
EOF
  echo "$work/$name.toml"
}
state_of() { cli show "$1" --json | json_field run state; }
step_of() { cli show "$1" --json | json_field run step; }
has_ended() { case $(state_of "$1") in Completed|Failed|Cancelled) return 0;; *) return 1;; esac; }

# --- 1. a run completes across the namespaces ----------------------------------------------------
run1=$(cli submit "$(spec across 12)" --json | json_field run_id)
log "run $run1: 12 steps on two workers in two namespaces"
wait_for "run $run1 to end" 180 has_ended "$run1"
[[ $(state_of "$run1") == Completed ]] || die "run $run1 ended $(state_of "$run1"): $(cli show "$run1")"
log "run $run1 completed"

# --- 2. a link cut mid-run interrupts the run; it resumes when the link is back -------------------
run2=$(cli submit "$(spec cut 60)" --json | json_field run_id)
past_step() { local s; s=$(step_of "$run2"); (( s >= $1 )); }
wait_for "run $run2 to pass step 8" 180 past_step 8
ip link set "${tag}2h" down
log "cut $ns_w2's link at step $(step_of "$run2")"
interrupted() { cli show "$run2" --json | python3 -c 'import json,sys; d=json.load(sys.stdin)
sys.exit(0 if any(e["kind"]=="interrupted" for e in d["events"]) else 1)'; }
wait_for "run $run2 to be interrupted after the cut" 60 interrupted
log "run $run2 interrupted: $(cli show "$run2" --json | python3 -c 'import json,sys; d=json.load(sys.stdin)
print([e["message"] for e in d["events"] if e["kind"]=="interrupted"][0])')"
not_running() { [[ $(state_of "$run2") != Running ]]; }
wait_for "run $run2 to stop running while a worker is cut off" 30 not_running
ip link set "${tag}2h" up
log "link back; run $run2 is $(state_of "$run2")"
wait_for "run $run2 to resume and end" 240 has_ended "$run2"
final=$(cli show "$run2" --json)
[[ $(json_field run state <<<"$final") == Completed ]] || die "run $run2 did not complete after the link came back: $final"
[[ $(json_field run step <<<"$final") == 60 ]] || die "run $run2 completed at step $(json_field run step <<<"$final"), not 60"
log "run $run2 resumed and completed (attempt $(json_field run attempt <<<"$final"))"

# --- logs: every worker line is JSON, no colour codes ----------------------------------------------
for name in w1 w2; do
  python3 - "$work/$name.log" <<'EOF' || die "worker log $name is not one JSON object a line"
import json, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
assert lines, "empty log"
for l in lines:
    assert "\x1b" not in l, l
    json.loads(l)
EOF
done
log "passed ($shaping)"
