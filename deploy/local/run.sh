#!/usr/bin/env bash
# Starts the local shadowcdn cluster on loopback: the demo origin and an edge node.
# Ctrl-C stops everything cleanly (SIGTERM: in-flight requests finish, cache is flushed).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/setup.sh
cargo build --release -q -p edge-node -p shadowcdn-bench
mkdir -p var/local

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap cleanup INT TERM EXIT

target/release/origin --listen 127.0.0.1:9000 --root . --max-age 60 &
pids+=($!)
target/release/edge-node --config deploy/local/edge.toml &
pids+=($!)

for _ in $(seq 100); do
  curl -fsS -o /dev/null http://127.0.0.1:9080/healthz 2>/dev/null && break
  sleep 0.1
done
cat <<INFO

shadowcdn local cluster is up
  origin : http://127.0.0.1:9000        (serves this repository's files, or ?size=N synthetic bodies)
  edge   : http://127.0.0.1:8080        try: curl -i http://localhost:8080/README.md   (twice: MISS then HIT)
  admin  : http://127.0.0.1:9080/metrics (Prometheus)
           curl -X PURGE -H 'Authorization: Bearer local-admin-token' http://127.0.0.1:9080/cache/localhost/README.md
Ctrl-C to stop.
INFO
wait -n "${pids[@]}"
