#!/usr/bin/env bash
# A real S3-compatible server for the tests: moto in server mode, from the venv .ci/venv.sh
# prepares, on 127.0.0.1 at a free port.
#
#   .ci/s3.sh start VENV STATE_DIR   # start (or reuse a live one), wait until it answers, create
#                                    # the test bucket, write STATE_DIR/s3.env
#   .ci/s3.sh stop STATE_DIR         # stop the server started from STATE_DIR
#
# Then:  set -a; . STATE_DIR/s3.env; set +a
# Files: STATE_DIR/{moto.pid,moto.port,moto.log,s3.env}
# Overrides: VOXELFLEET_TEST_S3_BUCKET, S3_READY_TIMEOUT (seconds).
set -euo pipefail

BUCKET=${VOXELFLEET_TEST_S3_BUCKET:-voxelfleet-test}
READY_TIMEOUT=${S3_READY_TIMEOUT:-30}

die() { echo "error: .ci/s3.sh: $*" >&2; exit 1; }

alive() { [[ -f $1/moto.pid ]] && kill -0 "$(cat "$1/moto.pid")" 2>/dev/null; }

stop() {
  local state=$1 pid
  [[ -f $state/moto.pid ]] || return 0
  pid=$(cat "$state/moto.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$state/moto.pid" "$state/moto.port"
}

# Polls until the server answers, then creates the bucket (idempotent: 409 = already ours).
# No curl on a fresh CI machine, so the venv's Python does the HTTP.
# Exit 0 ready, 1 timed out, 2 server process died.
wait_ready() {
  "$PY" - "$1" "$2" "$BUCKET" "$READY_TIMEOUT" <<'PYEOF'
import os, sys, time, urllib.request, urllib.error
port, pid, bucket, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(2)
    try:
        urllib.request.urlopen(base + "/moto-api/", timeout=2).read()
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.2)
try:
    urllib.request.urlopen(urllib.request.Request(f"{base}/{bucket}", method="PUT"), timeout=10).read()
except urllib.error.HTTPError as e:
    if e.code != 409:
        print(f"creating bucket {bucket}: HTTP {e.code}: {e.read()[:300]!r}", file=sys.stderr)
        sys.exit(1)
PYEOF
}

# Test credentials moto accepts; only AWS_ENDPOINT_URL names the endpoint (object_store also
# reads AWS_ENDPOINT, and with both set it would pick one by environment order).
write_env() {
  local state=$1 port=$2
  cat > "$state/s3.env.tmp" <<ENVEOF
VOXELFLEET_TEST_S3_ENDPOINT=http://127.0.0.1:$port
VOXELFLEET_TEST_S3_BUCKET=$BUCKET
AWS_ACCESS_KEY_ID=testing
AWS_SECRET_ACCESS_KEY=testing
AWS_REGION=us-east-1
AWS_ENDPOINT_URL=http://127.0.0.1:$port
AWS_ALLOW_HTTP=true
ENVEOF
  mv "$state/s3.env.tmp" "$state/s3.env"
}

start() {
  local venv=$1 state=$2 port pid rc attempt
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
  PY=$venv/bin/python
  "$PY" -c 'import moto.server, flask, flask_cors' 2>/dev/null \
    || die "$venv lacks moto[s3] and flask; run .ci/venv.sh $venv LOG first"
  if alive "$state" && [[ -f $state/moto.port ]] \
     && wait_ready "$(cat "$state/moto.port")" "$(cat "$state/moto.pid")"; then
    write_env "$state" "$(cat "$state/moto.port")"; return 0
  fi
  stop "$state"
  for attempt in 1 2 3; do   # retry: the free port can be taken between probe and bind
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$state/moto.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$state/moto.pid"
    rc=0; wait_ready "$port" "$pid" || rc=$?
    if [[ $rc == 0 ]]; then echo "$port" > "$state/moto.port"; write_env "$state" "$port"; return 0; fi
    stop "$state"
    [[ $rc == 2 ]] || break
    echo ".ci/s3.sh: moto exited at start (attempt $attempt), retrying on another port" >&2
  done
  tail -20 "$state/moto.log" >&2 || true
  die "moto server did not become ready within ${READY_TIMEOUT}s (log: $state/moto.log)"
}

case ${1:-} in
  start) [[ $# == 3 ]] || die "usage: $0 start VENV STATE_DIR"; start "$2" "$3" ;;
  stop)  [[ $# == 2 ]] || die "usage: $0 stop STATE_DIR"; stop "$2" ;;
  *) die "usage: $0 start VENV STATE_DIR | stop STATE_DIR" ;;
esac
