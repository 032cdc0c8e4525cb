#!/usr/bin/env bash
# Offline libCacheSim baselines on the real traces (issue 6, "End-to-end proof").
# Usage: bench/offline/run.sh [TRACE...] [simulate.py options]   (default: apache nasa)
# Creates bench/offline/.venv if missing, installs requirements.txt, then runs simulate.py, which
# writes bench/results/offline-<trace>.json and bench/results/byte-miss-<trace>.svg.
# Traces are read from ../shared/traces (override with SHADOWCDN_TRACES); nothing is copied.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
py="${PYTHON:-python3}"

run() { echo "+ $*"; "$@"; }

t0=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  run "$py" -m venv "$venv"
fi
run "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
t1=$(date +%s)
echo "setup: $((t1 - t0)) s"

cd "$repo"
if [ $# -eq 0 ]; then set -- apache nasa; fi
# Single-threaded and niced: the machine is shared with builds and benchmarks.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
run nice -n 10 "$venv/bin/python" bench/offline/simulate.py "$@"
t2=$(date +%s)
echo "simulate: $((t2 - t1)) s (total $((t2 - t0)) s)"
