#!/usr/bin/env bash
# Prepares the Python venv the tests compare against and serve S3 from:
#   nibabel, scipy, numpy  the independent NIfTI/resampling reference (data::reference)
#   moto[s3] + flask       a real S3-compatible server on 127.0.0.1 (.ci/s3.sh)
#
#   .ci/venv.sh VENV LOG
#
# A venv that already holds exactly these pins (a stamp file records them, and the imports are
# checked) is reused as is, so a warm CI machine spends no time here. pip's output goes to LOG and
# only its tail is shown on failure. Bounded: each download gives up after VOXELFLEET_PIP_TIMEOUT
# seconds without data (pip --timeout), and the whole install after VOXELFLEET_VENV_DEADLINE.
set -euo pipefail

PINS=(
  "nibabel==5.4.2" "numpy==2.4.6" "scipy==1.17.1"
  # moto[s3] + flask is all the S3 server needs (~140 MB); moto[server] pulls every service.
  "moto[s3]==5.2.5" "flask==3.1.3" "flask-cors==6.0.5"
)
IMPORTS="import nibabel, scipy, numpy, moto.server, flask, flask_cors"
PIP_TIMEOUT=${VOXELFLEET_PIP_TIMEOUT:-60}
DEADLINE=${VOXELFLEET_VENV_DEADLINE:-900}

die() { echo "error: .ci/venv.sh: $*" >&2; exit 1; }

[[ $# == 2 ]] || die "usage: $0 VENV LOG"
venv=$1 log=$2
stamp=$venv/.voxelfleet-pins
want=$(printf '%s\n' "${PINS[@]}")

if [[ -x $venv/bin/python ]] && [[ $(cat "$stamp" 2>/dev/null) == "$want" ]] \
   && "$venv/bin/python" -c "$IMPORTS" 2>/dev/null; then
  echo "reusing $venv"
  exit 0
fi

start=$SECONDS
command -v python3 >/dev/null || die "python3 not found; the tests need Python 3 with the venv module"
# A venv without a working interpreter (an interrupted creation, a Python upgraded underneath)
# is rebuilt; one that only lacks some pins is topped up, and pip keeps what already matches.
if ! "$venv/bin/python" -c "" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv" >"$log" 2>&1 \
    || { tail -20 "$log" >&2; die "python3 -m venv $venv failed (Debian/Ubuntu: apt-get install python3-venv)"; }
fi
rm -f "$stamp"
if ! timeout "$DEADLINE" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
       --timeout "$PIP_TIMEOUT" --retries 3 "${PINS[@]}" >>"$log" 2>&1; then
  tail -30 "$log" >&2
  die "pip install ${PINS[*]} into $venv failed or ran past ${DEADLINE}s (no PyPI access?); full log: $log"
fi
"$venv/bin/python" -c "$IMPORTS" 2>>"$log" || { tail -20 "$log" >&2; die "installed, but the imports fail: $IMPORTS"; }
echo "$want" > "$stamp"
echo "prepared $venv in $((SECONDS - start)) s"
