#!/usr/bin/env bash
# Broker overhead benchmark, all on loopback in one run:
#   broker(recorder on) → edge, the same broker over HTTPS (HTTP/1.1 over TLS 1.3, keep-alive),
#   broker(recorder off) → edge, edge alone, and nginx proxy_cache alone, alternating within
#   each round on the same cached 1 KiB object.
# Prints req/s, p50 and p99 medians and the ratios recorder-on/off, HTTPS/HTTP and broker/nginx.
#
# Usage: bench/broker_overhead.sh [duration_secs=10] [rounds=3]
# Env: THREADS (workers per server, default 2), CONNS (wrk connections, default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${1:-10}
ROUNDS=${2:-3}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}

bash deploy/setup.sh
ensure_peers
cargo build --release -q -p edge-node -p broker -p shadowcdn-bench

WORK=$(mktemp -d)
chmod 755 "$WORK"   # nginx workers drop privileges and must reach their cache dir
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ORIGIN=127.0.0.1:19100
EDGE=127.0.0.1:18180
EDGE_ADMIN=127.0.0.1:18181
ON=127.0.0.1:18190
ON_ADMIN=127.0.0.1:18191
OFF=127.0.0.1:18192
OFF_ADMIN=127.0.0.1:18193
TLS=127.0.0.1:18194
NGX=127.0.0.1:18182
OPERATOR=bench-operator-token-0123456789
# A server left on one of these ports (an earlier run's broker, say) would be measured instead.
for a in $ORIGIN $EDGE $EDGE_ADMIN $ON $ON_ADMIN $OFF $OFF_ADMIN $TLS $NGX; do
  if [ -n "$(ss -ltnH "sport = :${a##*:}" 2>/dev/null)" ]; then
    echo "port ${a##*:} is already in use: stop what listens there first" >&2
    exit 1
  fi
done

target/release/origin --listen $ORIGIN --max-age 3600 >"$WORK/origin.log" 2>&1 &
pids+=($!)
cat >"$WORK/edge.toml" <<EOF
node_id = "bench"
[server]
listen = "$EDGE"
threads = $THREADS
[admin]
listen = "$EDGE_ADMIN"
token = "bench-admin-token"
[cache]
dir = "$WORK/edge-cache"
memory_capacity = "256 MiB"
disk_capacity = "1 GiB"
max_object_size = "8 MiB"
EOF
RUST_LOG=warn target/release/edge-node --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
pids+=($!)

# The HTTPS listener's certificate, from the cluster CA tool (wrk does not verify it).
target/release/edge-node certs ca --dir "$WORK/pki" >/dev/null
target/release/edge-node certs issue --ca-dir "$WORK/pki" --name bench-broker --broker >/dev/null

broker_conf() { # name listen admin recorder [extra]
  cat >"$WORK/$1.toml" <<EOF
listen = "$2"
threads = $THREADS
data_dir = "$WORK/$1"
[admin]
listen = "$3"
operator_token = "$OPERATOR"
edge_token = "bench-admin-token"
allow_private_upstreams = true
allow_local_hosts = true
[monitor]
enabled = $4
${5:-}
[[regions]]
name = "local"
[[edges]]
id = "bench"
region = "local"
addr = "$EDGE"
admin = "$EDGE_ADMIN"
EOF
}
broker_conf on $ON $ON_ADMIN true "[tls]
listen = \"$TLS\"
[[tls.certs]]
cert = \"$WORK/pki/bench-broker.pem\"
key = \"$WORK/pki/bench-broker.key\""
broker_conf off $OFF $OFF_ADMIN false
wait_http() { for _ in $(seq 200); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "$1 not up" >&2; exit 1; }
start_broker() { # name
  RUST_LOG=warn target/release/broker run --config "$WORK/$1.toml" >>"$WORK/$1.log" 2>&1 &
  pids+=($!)
}
# The host is registered once, through the first broker, whose data directory (registry)
# the second then starts from: both push the same registration to the edge. Two separate
# registrations would carry two registration times, and the edge, taking each push as a new
# owner of the host, would drop its copies on every push (every 3 s) during the runs.
start_broker on
wait_http "http://$ON_ADMIN/healthz"
tok=$(target/release/broker api --api "http://$ON_ADMIN" --token $OPERATOR create-provider bench | sed -n 's/.*"token": "\(.*\)".*/\1/p')
# Exit 3: registered, but an edge not yet up did not confirm the purge that comes with it.
target/release/broker api --api "http://$ON_ADMIN" --token "$tok" set-origin bench.local "http://$ORIGIN" >/dev/null || [ $? -eq 3 ]
on_pid=${pids[-1]}
kill -TERM "$on_pid"
wait "$on_pid" || true
unset 'pids[-1]'
cp -a "$WORK/on" "$WORK/off"
start_broker on
start_broker off
start_nginx "$NGX" "$ORIGIN" "$THREADS"
wait_http "http://$ON_ADMIN/healthz"
wait_http "http://$OFF_ADMIN/healthz"

OBJ="/obj/one-kib?size=1024"
for a in $ON $OFF $EDGE $NGX; do
  for _ in $(seq 50); do
    curl -fsS -o /dev/null -H 'Host: bench.local' "http://$a$OBJ" 2>/dev/null && break
    sleep 0.1
  done
  for _ in 1 2 3; do curl -fsS -o /dev/null -H 'Host: bench.local' "http://$a$OBJ"; done
done
for _ in 1 2 3; do curl -fsSk -o /dev/null -H 'Host: bench.local' "https://$TLS$OBJ"; done
echo "via broker: $(curl -sS -o /dev/null -D - -H 'Host: bench.local' "http://$ON$OBJ" | tr -d '\r' | grep -i -e '^x-cache' -e '^x-shadowcdn-edge' | tr '\n' ' ')"

edge_misses() { curl -sS "http://$EDGE_ADMIN/metrics" | awk '/^shadowcdn_edge_requests_total\{/ && !/cache_status="hit"/{s += $2} END{print s + 0}'; }
misses_before=$(edge_misses)
declare -A RPS P50 P99
for round in $(seq "$ROUNDS"); do
  for sys in broker-on broker-https broker-off edge nginx; do
    scheme=http
    case $sys in broker-on) addr=$ON;; broker-https) addr=$TLS; scheme=https;; broker-off) addr=$OFF;; edge) addr=$EDGE;; nginx) addr=$NGX;; esac
    read -r rps p50 p99 errs < <(run_wrk "$addr" "$OBJ" $scheme)
    echo "round $round $sys: $rps req/s p50 ${p50}ms p99 ${p99}ms $errs"
    [ -z "${errs// /}" ] || { echo "wrk reported errors against $sys; aborting" >&2; exit 1; }
    RPS[$sys]="${RPS[$sys]:-} $rps"; P50[$sys]="${P50[$sys]:-} $p50"; P99[$sys]="${P99[$sys]:-} $p99"
  done
done

misses=$(( $(edge_misses) - misses_before ))
echo "edge requests not answered from its cache during the runs: $misses"
[ "$misses" -le 10 ] || { echo "the edge did not serve the object from its cache: not a hit-path measurement" >&2; exit 1; }

echo
echo "## medians over $ROUNDS rounds (wrk -t2 -c$CONNS -d${DURATION}s, 1 KiB cached object)"
printf "%-10s %12s %10s %10s\n" system "req/s" "p50 ms" "p99 ms"
for sys in broker-on broker-https broker-off edge nginx; do
  printf "%-10s %12s %10s %10s\n" "$sys" "$(echo "${RPS[$sys]}" | median)" "$(echo "${P50[$sys]}" | median)" "$(echo "${P99[$sys]}" | median)"
done
on=$(echo "${RPS[broker-on]}" | median); off=$(echo "${RPS[broker-off]}" | median); ngx=$(echo "${RPS[nginx]}" | median)
tls=$(echo "${RPS[broker-https]}" | median)
echo "recorder on/off req/s = $(awk -v a="$on" -v b="$off" 'BEGIN{printf "%.3f", a/b}')"
echo "broker HTTPS/HTTP req/s = $(awk -v a="$tls" -v b="$on" 'BEGIN{printf "%.3f", a/b}')"
echo "broker→edge / nginx single hop req/s = $(awk -v a="$on" -v b="$ngx" 'BEGIN{printf "%.2f", a/b}')"
broker_metrics() { curl -sS -H "authorization: Bearer $OPERATOR" "http://$ON_ADMIN/metrics"; }
echo "recorded by the broker: $(broker_metrics | awk '/^shadowcdn_broker_recorded_total/{print $2}'), dropped: $(broker_metrics | awk '/^shadowcdn_broker_recorder_drops_total/{print $2}')"
