#!/usr/bin/env bash
# Do key purges hold across two graceful restarts of a real edge? Stores 300 objects and purges
# them, restarts, stores and purges 100 more, restarts, then asks for all 400: every answer must
# be a MISS. foyer 0.22.6 alone brings back 100 of them (its tombstone log resumes on its first
# page after a restart; see edge-node/src/storage/tombstone_log.rs).
#
# usage: bench/purges_across_restarts.sh            (builds the release binaries)
#        EDGE_BIN=/path/to/edge-node bench/purges_across_restarts.sh   (another edge build)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${EDGE_BIN:-}" ]; then
  cargo build --release -q --bin edge-node --bin origin
  EDGE_BIN=target/release/edge-node
fi
ORIGIN_BIN=${ORIGIN_BIN:-target/release/origin}
[ -x "$ORIGIN_BIN" ] || cargo build --release -q --bin origin
PROXY=${PROXY:-127.0.0.1:18102}
ADMIN=${ADMIN:-127.0.0.1:18202}
ORIGIN=${ORIGIN:-127.0.0.1:18002}
WORK=$(mktemp -d)
TOKEN=bench-admin-token
EDGE_PID=""
ORIGIN_PID=""
cleanup() {
  [ -n "$EDGE_PID" ] && kill "$EDGE_PID" 2>/dev/null || true
  [ -n "$ORIGIN_PID" ] && kill "$ORIGIN_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/edge.toml" <<EOF
node_id = "purge-bench"
[server]
listen = "$PROXY"
threads = 2
[admin]
listen = "$ADMIN"
token = "$TOKEN"
[cache]
dir = "$WORK/cache"
memory_capacity = "8 MiB"
max_object_size = "1 MiB"
# Room enough that no block holding the purged objects is reused before the last restart.
disk_capacity = "256 MiB"
[[origins]]
host = "purge.bench"
upstream = "http://$ORIGIN"
EOF

"$ORIGIN_BIN" --listen "$ORIGIN" --max-age 3600 >"$WORK/origin.log" 2>&1 &
ORIGIN_PID=$!

start() {
  "$EDGE_BIN" --config "$WORK/edge.toml" >>"$WORK/edge.log" 2>&1 &
  EDGE_PID=$!
  for _ in $(seq 100); do
    curl -fs -o /dev/null "http://$ADMIN/healthz" && return
    sleep 0.1
  done
  echo "edge did not start: $(tail -3 "$WORK/edge.log")" >&2
  exit 1
}
stop() { kill -TERM "$EDGE_PID"; wait "$EDGE_PID" || true; EDGE_PID=""; }
get() { # path → X-Cache
  curl -s -o /dev/null -D - -H "Host: purge.bench" "http://$PROXY$1" |
    tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}'
}
store_and_purge() { # prefix count
  local codes=""
  for i in $(seq 1 "$2"); do get "/obj/$1$i?size=1000" >/dev/null; done
  for i in $(seq 1 "$2"); do
    codes="$codes $(curl -s -o /dev/null -w '%{http_code}' -X PURGE -H "Authorization: Bearer $TOKEN" \
      "http://$ADMIN/cache/purge.bench/obj/$1$i?size=1000")"
  done
  echo "purges of $2 '$1' objects answered:" $(echo $codes | tr ' ' '\n' | sort | uniq -c)
}

start; store_and_purge a 300; stop
start; store_and_purge b 100; stop
start
seen=""
for i in $(seq 1 300); do seen="$seen $(get "/obj/a$i?size=1000")"; done
for i in $(seq 1 100); do seen="$seen $(get "/obj/b$i?size=1000")"; done
stop
echo "after two restarts, the 400 purged objects were:" $(echo $seen | tr ' ' '\n' | sort | uniq -c)
