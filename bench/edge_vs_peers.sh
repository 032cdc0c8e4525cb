#!/usr/bin/env bash
# Hit-path benchmark: edge-node vs nginx (proxy_cache) vs varnish, same origin, same machine.
#
# Builds release binaries, starts the origin, edge-node, nginx and varnish on loopback (each
# with the same worker count), warms each cache, then runs wrk in alternation against each on a
# cached 1 KiB and a 100 KiB object and prints req/s, p50, p99 and the ratios of edge-node to
# each peer from the same run.
#
# Usage: bench/edge_vs_peers.sh [duration_secs=10] [rounds=3]
# Env: THREADS (server workers, default 2), CONNS (wrk connections, default 64),
#      SYSTEMS (default "edge nginx varnish"), EDGE_BIN (an edge-node binary to measure
#      instead of the one built here, e.g. an older commit's for an A/B).
# Besides req/s it reports each server's CPU time per request (its processes' user+system
# time over the run / requests served): wrk shares the 2 cores, so req/s partly measures how
# much CPU a server leaves to the load generator, while CPU per request is the server's own cost.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${1:-10}
ROUNDS=${2:-3}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
SYSTEMS=${SYSTEMS:-edge nginx varnish}

bash deploy/setup.sh
ensure_peers

cargo build --release -q -p edge-node -p shadowcdn-bench

WORK=$(mktemp -d)
chmod 755 "$WORK"   # varnishd drops privileges and must read its working dir
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  pkill -f "varnishd.*$WORK" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ORIGIN=127.0.0.1:19000
EDGE=127.0.0.1:18080
EDGE_ADMIN=127.0.0.1:18081
NGX=127.0.0.1:18082
VARN=127.0.0.1:18083
# A server left on one of these ports (a profiling run's edge, say) would be measured instead.
for a in $ORIGIN $EDGE $EDGE_ADMIN $NGX $VARN; do
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
[[origins]]
host = "bench.local"
upstream = "http://$ORIGIN"
EOF
RUST_LOG=warn "${EDGE_BIN:-target/release/edge-node}" --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
EDGE_PID=$!
pids+=($EDGE_PID)

start_nginx "$NGX" "$ORIGIN" "$THREADS"

cat >"$WORK/default.vcl" <<EOF
vcl 4.1;
backend origin { .host = "${ORIGIN%:*}"; .port = "${ORIGIN#*:}"; }
EOF
"$VARNISHD" -a "$VARN" -f "$WORK/default.vcl" -s malloc,256m -n "$WORK/varnish" \
  -p thread_pools=$THREADS -p thread_pool_min=50 -P "$WORK/varnish.pid" >"$WORK/varnish.out" 2>&1 || { cat "$WORK/varnish.out" >&2; exit 1; }

wait_up() { for _ in $(seq 200); do curl -fsS -o /dev/null -H 'Host: bench.local' "http://$1/health?size=1" 2>/dev/null && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; exit 1; }
for a in $EDGE $NGX $VARN; do wait_up "$a"; done
kill -0 "$EDGE_PID" 2>/dev/null || { echo "edge-node exited; its log:" >&2; cat "$WORK/edge.log" >&2; exit 1; }

OBJ_1K="/obj/one-kib?size=1024"
OBJ_100K="/obj/hundred-kib?size=102400"
for a in $EDGE $NGX $VARN; do
  for o in "$OBJ_1K" "$OBJ_100K"; do
    for _ in 1 2 3; do curl -fsS -o /dev/null -H 'Host: bench.local' "http://$a$o"; done
  done
done
# Every system must answer both objects from its cache before anything is measured: the edge
# and nginx say so in X-Cache, varnish by a hit's two transaction ids in X-Varnish.
for sys in $SYSTEMS; do
  for o in "$OBJ_1K" "$OBJ_100K"; do
    addr=$EDGE; [ $sys = nginx ] && addr=$NGX; [ $sys = varnish ] && addr=$VARN
    h=$(curl -sS -o /dev/null -D - -H 'Host: bench.local' "http://$addr$o" | tr -d '\r')
    case $sys in
      varnish) hit=$(echo "$h" | awk -F': ' 'tolower($1)=="x-varnish" && split($2, ids, " ") == 2 {print "HIT"}') ;;
      *) hit=$(echo "$h" | awk -F': ' 'tolower($1)=="x-cache"{print toupper($2)}') ;;
    esac
    echo "$sys $o: ${hit:-no hit}"
    [ "$hit" = HIT ] || { echo "$sys does not serve $o from its cache; not measuring" >&2; exit 1; }
  done
done

# server_pids SYSTEM: the processes whose CPU time counts for SYSTEM.
server_pids() {
  case $1 in
    edge) echo "$EDGE_PID" ;;
    nginx) local m; m=$(cat "$WORK/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')" ;;
    varnish) pgrep -f "varnishd.*$WORK" | tr '\n' ' ' ;;
  esac
}
TCK=$(getconf CLK_TCK)

declare -A RPS P50 P99 CPU
for round in $(seq "$ROUNDS"); do
  for o in 1k 100k; do
    path=$OBJ_1K; [ "$o" = 100k ] && path=$OBJ_100K
    for sys in $SYSTEMS; do
      addr=$EDGE; [ $sys = nginx ] && addr=$NGX; [ $sys = varnish ] && addr=$VARN
      spids=$(server_pids $sys)
      # shellcheck disable=SC2086
      t0=$(cpu_ticks $spids)
      read -r rps p50 p99 errs < <(run_wrk "$addr" "$path")
      # shellcheck disable=SC2086
      t1=$(cpu_ticks $spids)
      cpu=$(awk -v d=$((t1 - t0)) -v tck="$TCK" -v r="$rps" -v s="$DURATION" 'BEGIN{printf "%.1f", d / tck * 1e6 / (r * s)}')
      echo "round $round $o $sys: $rps req/s p50 ${p50}ms p99 ${p99}ms cpu ${cpu}us/req $errs"
      # Errors or non-2xx answers would count as fast requests: such a round is no measurement.
      [ -z "${errs// /}" ] || { echo "wrk reported errors against $sys; aborting" >&2; exit 1; }
      RPS[$sys,$o]="${RPS[$sys,$o]:-} $rps"; P50[$sys,$o]="${P50[$sys,$o]:-} $p50"; P99[$sys,$o]="${P99[$sys,$o]:-} $p99"
      CPU[$sys,$o]="${CPU[$sys,$o]:-} $cpu"
    done
  done
done

echo
echo "## medians over $ROUNDS rounds (wrk -t2 -c$CONNS -d${DURATION}s, $THREADS server workers)"
printf "%-6s %-8s %12s %10s %10s %14s\n" object system "req/s" "p50 ms" "p99 ms" "cpu us/req"
for o in 1k 100k; do
  for sys in $SYSTEMS; do
    printf "%-6s %-8s %12s %10s %10s %14s\n" "$o" "$sys" "$(echo "${RPS[$sys,$o]}" | median)" "$(echo "${P50[$sys,$o]}" | median)" "$(echo "${P99[$sys,$o]}" | median)" "$(echo "${CPU[$sys,$o]}" | median)"
  done
  [ "$SYSTEMS" = "edge nginx varnish" ] || continue
  e=$(echo "${RPS[edge,$o]}" | median); n=$(echo "${RPS[nginx,$o]}" | median); v=$(echo "${RPS[varnish,$o]}" | median)
  echo "$o ratio edge/nginx req/s = $(awk -v a="$e" -v b="$n" 'BEGIN{printf "%.2f", a/b}')   edge/varnish req/s = $(awk -v a="$e" -v b="$v" 'BEGIN{printf "%.2f", a/b}')"
  ep=$(echo "${P99[edge,$o]}" | median); np=$(echo "${P99[nginx,$o]}" | median); vp=$(echo "${P99[varnish,$o]}" | median)
  echo "$o ratio edge/nginx p99 = $(awk -v a="$ep" -v b="$np" 'BEGIN{printf "%.2f", a/b}')   edge/varnish p99 = $(awk -v a="$ep" -v b="$vp" 'BEGIN{printf "%.2f", a/b}')"
done
