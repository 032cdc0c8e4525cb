#!/usr/bin/env bash
# Starts the local shadowcdn cluster on loopback: a demo origin, the broker, and two regions
# (eu, us) of edges, each with two active edges and a warm standby. Registers a demo provider
# whose origin serves a copy of this repository's documents (var/local/www). Ctrl-C or SIGTERM
# stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/setup.sh
cargo build --release -q -p edge-node -p broker -p shadowcdn-bench
mkdir -p var/local
# The operator token the broker is configured with, read from its config (one place to change).
OPERATOR=$(sed -n 's/^operator_token *= *"\(.*\)".*/\1/p' deploy/local/broker.toml)

pids=()
# Stops every process started here and exits (a signal that comes during the build or the
# start-up must not let the script go on starting processes with no trap left).
# The processes run in sessions of their own (below), so a closed terminal reaches this script
# alone: the kills come first and nothing here may fail before them (an echo to a terminal
# that is gone would, under `set -e`).
cleanup() {
  set +e
  # A second signal (Ctrl-C pressed twice, or sent to the whole process group) must not cut
  # the loop of kills short and leave servers running; once they are signalled, it may end
  # the wait for them.
  trap '' INT TERM HUP
  trap - EXIT
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  trap - INT TERM HUP
  { echo; echo "stopping..."; } 2>/dev/null
  wait 2>/dev/null
  echo "stopped" 2>/dev/null
  exit "$1"
}
trap 'cleanup $?' EXIT
trap 'cleanup 130' INT
trap 'cleanup 129' HUP
trap 'cleanup 143' TERM

# Every port this cluster listens on must be free: an old cluster still running would answer
# the readiness checks below in this one's place.
for port in 8080 7081 7091 9000 8101 8102 8103 8201 8202 8203 9101 9102 9103 9201 9202 9203; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "run.sh: port $port is in use (another cluster still running?); stop it first" >&2
    exit 1
  fi
done

# What the demo origin serves: documents only, never var/local (the cluster's keys, tokens).
WWW=var/local/www
mkdir -p "$WWW"
cp README.md "$WWW/"
cp bench/RESULTS.md "$WWW/RESULTS.md"
cp models/MODEL_CARD.md "$WWW/MODEL_CARD.md"
cp broker/openapi.yaml "$WWW/openapi.yaml"

# The cluster CA, its revocation list and one certificate per node, for QUIC between broker
# and edges (`edge-node certs revoke --ca-dir var/local/pki var/local/pki/us-2.pem` cuts us-2
# off from the others when they next read the list, every 30 s).
PKI=var/local/pki
if [ ! -s "$PKI/ca.pem" ]; then
  target/release/edge-node certs ca --dir "$PKI" >/dev/null
fi
# (A CA made by an older run.sh has no list yet: start an empty one.)
[ -s "$PKI/ca.crl" ] || target/release/edge-node certs revoke --init --ca-dir "$PKI" >/dev/null
for n in eu-1 eu-2 eu-standby us-1 us-2 us-standby; do
  [ -s "$PKI/$n.pem" ] || target/release/edge-node certs issue --ca-dir "$PKI" --name "$n" >/dev/null
done
[ -s "$PKI/broker.pem" ] || target/release/edge-node certs issue --ca-dir "$PKI" --name broker --broker >/dev/null

# Each process in a session of its own (setsid): Ctrl-C reaches this script alone, whose trap
# sends SIGTERM, the signal that drains (pingora takes SIGINT as a fast stop: no drain, no
# snapshot of the broker's monitor).
setsid target/release/origin --listen 127.0.0.1:9000 --root "$WWW" --max-age 60 &
pids+=($!)
for e in eu-1:8101:9101 eu-2:8102:9102 eu-standby:8103:9103 us-1:8201:9201 us-2:8202:9202 us-standby:8203:9203; do
  IFS=: read -r id port admin <<<"$e"
  # QUIC listens on the HTTP port number, over UDP.
  RUST_LOG=${RUST_LOG:-warn} \
  SHADOWCDN_EDGE_SYNC__LISTEN="127.0.0.1:$port" SHADOWCDN_EDGE_SYNC__CA_CERT="$PKI/ca.pem" \
  SHADOWCDN_EDGE_SYNC__CERT="$PKI/$id.pem" SHADOWCDN_EDGE_SYNC__KEY="$PKI/$id.key" \
  SHADOWCDN_EDGE_SYNC__CRL="$PKI/ca.crl" \
  setsid target/release/edge-node --config deploy/local/edge.toml --node-id "$id" \
    --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --cache-dir "var/local/$id" &
  pids+=($!)
done
RUST_LOG=${RUST_LOG:-warn} setsid target/release/broker run --config deploy/local/broker.toml &
pids+=($!)

# Wait until `url` answers 2xx, trying $2 times 0.1 s apart (each try at most 2 s); say so and
# stop otherwise.
wait_for() {
  for _ in $(seq "$2"); do
    curl -fsS --max-time 2 -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "run.sh: $1 did not answer; process logs are above" >&2
  exit 1
}
wait_for http://127.0.0.1:7081/healthz 300

# A demo provider owning "localhost" (idempotent across restarts: the registry is durable).
TOKEN_FILE=var/local/demo-provider.token
# Tokens go by environment (not visible in `ps`) and the file is the user's alone.
new_token() {
  (umask 077
   SHADOWCDN_TOKEN="$OPERATOR" target/release/broker api --api http://127.0.0.1:7081 create-provider demo \
     | sed -n 's/.*"token": "\(.*\)".*/\1/p' >"$TOKEN_FILE")
}
# Exit 3: registered, but an edge still starting did not confirm the purge of old copies.
set_origin() {
  SHADOWCDN_TOKEN="$(cat "$TOKEN_FILE")" target/release/broker api --api http://127.0.0.1:7081 \
    set-origin localhost http://127.0.0.1:9000 >/dev/null || [ $? -eq 3 ]
}
[ -s "$TOKEN_FILE" ] || new_token
# A token kept from before var/local/broker was reset names a provider the registry lost.
set_origin || { new_token && set_origin; }
wait_for http://localhost:8080/README.md 200

cat <<INFO

shadowcdn local cluster is up
  users   : http://localhost:8080           curl -si http://localhost:8080/README.md | grep -i -e x-cache -e x-shadowcdn-edge
            (header "x-client-region: us" routes to the us edges; try it twice: MISS then HIT)
  provider: http://127.0.0.1:7081/v1/...    token in $TOKEN_FILE; see broker/openapi.yaml or 'broker api --help'
  metrics : http://127.0.0.1:7091/metrics (broker), http://127.0.0.1:9101/metrics … 9203 (edges)
  access  : var/local/broker-access.log (one JSON line per client request)
  QUIC    : broker → edges and edge ↔ edge on udp/8101 … 8203, mutual TLS from $PKI/ca.pem
  origin  : http://127.0.0.1:9000           (serves $WWW: README.md, RESULTS.md, MODEL_CARD.md, openapi.yaml; or ?size=N synthetic bodies)
Ctrl-C to stop.
INFO
wait -n "${pids[@]}"
