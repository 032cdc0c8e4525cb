#!/usr/bin/env bash
# Trace replay through the real cluster: origin + broker + one edge per region (eu, us) on
# loopback, QUIC with a generated CA, memory-only edge caches sized as a share of the trace's
# working set. For each cache size and mode (plain: a plain cache, no shadowing and no peer
# fill; peer: demand misses filled from the other region's edge when the broker saw it serve
# the key, no shadowing; baseline: peer fill and shadowing with the seasonal-naive forecaster;
# lstm: peer fill and shadowing with models/lstm.onnx) it starts a fresh cluster,
# replays the trace time-compressed, and appends a run to bench/results/replay-TRACE.json
# (with a timeline of the broker's cost ledger sampled every SAMPLE_SECS=3600 trace seconds).
# Then it redraws bench/results/timeline-TRACE.svg (threshold, net benefit, precision/recall
# over trace time) and, when the offline results exist, byte-miss-TRACE.svg with the live points.
# CARGO_LOCK=/path runs the build under flock(1) on that file (a machine shared by builds);
# BUILD=0 skips the build and uses the binaries already in target/release; OUT=file writes
# the report there instead (smoke runs that must not touch bench/results).
# SHIFT_HOURS="0,-8" shifts each region's requests by that many hours (eu,us), as if the
# regions' clients lived in different time zones.
# ADMIT=1 (default) lets an edge cache objects up to its whole cache (as libCacheSim's
# policies do; the memory tier has one shard so that it can); ADMIT=0.25 caches up to a quarter.
# HELD_OUT=1 replays only the forecaster's held-out test tail (the last 15% of the trace's
# time); FOLD_GAPS=1 shortens silences longer than two weeks by whole weeks; SIZE_DIVISOR=N
# divides object sizes by N and multiplies the per-GB prices by N (same ratios and dollars,
# 1/N of the bytes); TICK_SECS=S sets the planner tick and stats poll (default 1 wall second:
# one trace hour at 3600x; 0.25 keeps that at 14400x). BROKER_LOG / EDGE_LOG set the processes'
# RUST_LOG (default warn; e.g. BROKER_LOG=warn,broker::cost=debug logs each settled shadow);
# the logs stay in var/replay/run until the next run. COACCESS adds lines to the broker's
# [signals.coaccess] (e.g. COACCESS='calibrate = false'), PLANNER to its [planner] (e.g.
# PLANNER='calibrate = false').
#
#   bench/replay.sh [TRACE=apache] [SPEEDUP=1800] ["PERCENTS"="1 5 10"] ["MODES"="plain peer baseline lstm"] [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
TRACE=${1:-apache}
SPEEDUP=${2:-1800}
PCTS=${3:-"1 5 10"}
MODES=${4:-"plain peer baseline lstm"}
LIMIT=${5:-}
TRACES=${TRACES:-${SHADOWCDN_TRACES:-../shared/traces}}
SAMPLE_SECS=${SAMPLE_SECS:-3600}
bash deploy/setup.sh >/dev/null
[ "${BUILD:-1}" = 0 ] || ${CARGO_LOCK:+flock "$CARGO_LOCK"} cargo build --release -q -p edge-node -p broker -p shadowcdn-bench
WORK=var/replay
# What the results are named by: a held-out replay's are its own trace's.
NAME=$TRACE; [ "${HELD_OUT:-0}" = 0 ] || NAME=$TRACE-heldout
OUT=${OUT:-bench/results/replay-$NAME.json}
OPERATOR=replay-operator-token-0123456789
EDGE_TOKEN=replay-edge-token
rm -rf "$WORK"
mkdir -p "$WORK/bin"
# Run copies, so that a rebuild of target/release during the runs cannot mix binaries.
for b in edge-node broker origin replay; do cp target/release/$b "$WORK/bin/"; done
B=$WORK/bin
SHIFT=()
[ -z "${SHIFT_HOURS:-}" ] || SHIFT=(--region-shift-hours "$SHIFT_HOURS")
DIVISOR=${SIZE_DIVISOR:-1}
TICK=${TICK_SECS:-1}
SHIFT+=(--size-divisor "$DIVISOR")
[ "${HELD_OUT:-0}" = 0 ] || SHIFT+=(--held-out)
[ "${FOLD_GAPS:-0}" = 0 ] || SHIFT+=(--fold-gaps)
# A limited run's working set (the cache sizes' base) and sizes are of the requests it replays.
[ -z "${LIMIT:-}" ] || SHIFT+=(--limit "$LIMIT")
read -r FIRST WS N < <($B/replay --trace "$TRACE" --traces-dir "$TRACES" --first-ts "${SHIFT[@]}")
$B/replay --trace "$TRACE" --traces-dir "$TRACES" --write-sizes "$WORK/sizes.txt" "${SHIFT[@]}"
echo "trace $TRACE: $N requests from $FIRST, working set $WS bytes, speedup $SPEEDUP"

PKI=$WORK/pki
$B/edge-node certs ca --dir "$PKI" >/dev/null
for n in eu-1 us-1; do $B/edge-node certs issue --ca-dir "$PKI" --name "$n" >/dev/null; done
$B/edge-node certs issue --ca-dir "$PKI" --name broker --broker >/dev/null
MAX_AGE=$(( 86400 / ${SPEEDUP%.*} )); [ "$MAX_AGE" -ge 1 ] || MAX_AGE=1

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
# A signal ends the script (bash runs a trap only once the foreground replay returns, and a
# trap that did not exit would go on to the next size); leaving runs stop_all.
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A server left on one of the cluster's ports (another benchmark's) would be measured instead.
for port in 18080 17081 18101 19101 18201 19201 19000; do
  if [ -n "$(ss -ltnH "sport = :$port" 2>/dev/null)" ]; then
    echo "port $port is already in use: stop what listens there first" >&2
    exit 1
  fi
done

edge_config() { # id port admin bytes maxobj
  cat <<TOML
node_id = "$1"
[server]
listen = "127.0.0.1:$2"
threads = 1
[admin]
listen = "127.0.0.1:$3"
token = "$EDGE_TOKEN"
[cache]
dir = "$WORK/run/$1"
memory_capacity = $4
disk_capacity = 0
max_object_size = $5
memory_shards = 1
[sync]
listen = "127.0.0.1:$2"
ca_cert = "$PKI/ca.pem"
cert = "$PKI/$1.pem"
key = "$PKI/$1.key"
TOML
}

broker_config() { # mode
  local planner coaccess peer
  case $1 in
    plain) planner='enabled = false'; coaccess='enabled = false'; peer='enabled = false' ;;
    peer) planner='enabled = false'; coaccess='enabled = false'; peer='enabled = true' ;;
    baseline) planner="model = \"$WORK/no-model.onnx\""; coaccess='enabled = true'; peer='enabled = true' ;;
    lstm) planner='model = "models/lstm.onnx"'; coaccess='enabled = true'; peer='enabled = true' ;;
    *) echo "unknown mode $1 (plain, peer, baseline, lstm)" >&2; exit 2 ;;
  esac
  cat <<TOML
listen = "127.0.0.1:18080"
threads = 2
data_dir = "$WORK/run/broker"
[admin]
listen = "127.0.0.1:17081"
operator_token = "$OPERATOR"
edge_token = "$EDGE_TOKEN"
allow_private_upstreams = true
allow_local_hosts = true
[client_region]
trust_header = true
default = "eu"
# The replayer names each trace client in X-Forwarded-For (a 2001:db8:: address per client).
trusted_proxies = ["127.0.0.1/32", "::1/128"]
[clock]
speedup = $SPEEDUP
start_unix = $FIRST
[monitor]
bucket_secs = 60
[planner]
interval_secs = $TICK
$planner
${PLANNER:-}
[cost]
origin_egress_per_gb = $(awk -v d="$DIVISOR" 'BEGIN { print 0.09 * d }')
inter_edge_per_gb = $(awk -v d="$DIVISOR" 'BEGIN { print 0.02 * d }')
storage_per_gb_hour = $(awk -v d="$DIVISOR" 'BEGIN { printf "%.12g", 0.08 / 730 * d }')
origin_mbit_per_sec = $(awk -v d="$DIVISOR" 'BEGIN { printf "%.12g", 100 / d }')
client_mbit_per_sec = $(awk -v d="$DIVISOR" 'BEGIN { printf "%.12g", 250 / d }')
[signals.coaccess]
$coaccess
${COACCESS:-}
[peer_fill]
$peer
[control]
ca_cert = "$PKI/ca.pem"
cert = "$PKI/broker.pem"
key = "$PKI/broker.key"
stats_interval_secs = $TICK
[[regions]]
name = "eu"
neighbours = ["us"]
[[regions]]
name = "us"
neighbours = ["eu"]
[[edges]]
id = "eu-1"
region = "eu"
addr = "127.0.0.1:18101"
admin = "127.0.0.1:19101"
sync = "127.0.0.1:18101"
[[edges]]
id = "us-1"
region = "us"
addr = "127.0.0.1:18201"
admin = "127.0.0.1:19201"
sync = "127.0.0.1:18201"
TOML
}

wait_http() { for _ in $(seq 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }

for pct in $PCTS; do
  per_region=$(( WS * pct / 100 / 2 ))
  maxobj=$(awk -v c="$per_region" -v a="${ADMIT:-1}" 'BEGIN { printf "%d", c * a }')
  for mode in $MODES; do
    rm -rf "$WORK/run"; mkdir -p "$WORK/run"
    $B/origin --listen 127.0.0.1:19000 --max-age "$MAX_AGE" --sizes "$WORK/sizes.txt" >"$WORK/run/origin.log" 2>&1 &
    pids+=($!)
    edge_config eu-1 18101 19101 "$per_region" "$maxobj" >"$WORK/run/eu-1.toml"
    edge_config us-1 18201 19201 "$per_region" "$maxobj" >"$WORK/run/us-1.toml"
    for e in eu-1 us-1; do
      RUST_LOG=${EDGE_LOG:-warn} $B/edge-node --config "$WORK/run/$e.toml" >"$WORK/run/$e.log" 2>&1 &
      pids+=($!)
    done
    broker_config "$mode" >"$WORK/run/broker.toml"
    RUST_LOG=${BROKER_LOG:-warn} $B/broker run --config "$WORK/run/broker.toml" >"$WORK/run/broker.log" 2>&1 &
    pids+=($!)
    wait_http http://127.0.0.1:17081/healthz
    token=$($B/broker api --api http://127.0.0.1:17081 --token "$OPERATOR" create-provider replay \
      | sed -n 's/.*"token": "\(.*\)".*/\1/p')
    host=$( [ "$TRACE" = apache ] && echo semicomplete.com || echo opendap.lpdaac )
    $B/broker api --api http://127.0.0.1:17081 --token "$token" set-origin "$host" http://127.0.0.1:19000 >/dev/null || [ $? -eq 3 ]
    for a in 19101 19201; do
      for i in $(seq 101); do
        curl -fsS -H "Authorization: Bearer $EDGE_TOKEN" "http://127.0.0.1:$a/origins" | grep -q "$host" && break
        [ "$i" -le 100 ] || { echo "the edge on $a never got the origin of $host; not replaying" >&2; exit 1; }
        sleep 0.1
      done
    done
    $B/replay --trace "$TRACE" --traces-dir "$TRACES" "${SHIFT[@]}" --speedup "$SPEEDUP" --mode "$mode" \
      --broker http://127.0.0.1:18080 --api http://127.0.0.1:17081 --operator-token "$OPERATOR" \
      --origin http://127.0.0.1:19000 --edges 127.0.0.1:19101,127.0.0.1:19201 \
      --cache-bytes "$per_region" --max-object-bytes "$maxobj" --sample-secs "$SAMPLE_SECS" --out "$OUT" \
      >"$WORK/run/replay.json"
    tail -n +1 "$WORK/run/replay.json" | grep -E '"(mode|byte_miss_ratio|hit_ratio|shadow_hits|net)"' | tr -d '\n'; echo
    stop_all
  done
done
echo "report: $OUT"
[ "$OUT" = "bench/results/replay-$NAME.json" ] || exit 0
PY=bench/offline/.venv/bin/python; [ -x "$PY" ] || PY=python3
$PY bench/offline/timeline.py "$NAME" --report "$OUT"
if [ -f "bench/results/offline-$NAME.json" ] && [ -x bench/offline/.venv/bin/python ]; then
  bench/offline/.venv/bin/python bench/offline/simulate.py "$NAME" --plot-only --live "$OUT"
fi
