# Shared helpers of the benchmark scripts (sourced). Expects WORK, DURATION and CONNS.

# wrk prints latency percentiles with --latency; parse req/s, p50, p99 (in ms).
run_wrk() { # addr path [scheme=http]
  local addr=$1 path=$2 scheme=${3:-http}
  wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H 'Host: bench.local' "$scheme://$addr$path" >"$WORK/wrk.out" 2>&1
  local rps p50 p99
  rps=$(awk '/Requests\/sec/{print $2}' "$WORK/wrk.out")
  p50=$(awk '$1=="50%"{print $2}' "$WORK/wrk.out")
  p99=$(awk '$1=="99%"{print $2}' "$WORK/wrk.out")
  errs=$(awk '/Non-2xx|Socket errors/{print}' "$WORK/wrk.out" | tr '\n' ' ')
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $errs"
}
to_ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); print v+0} else if (v ~ /s$/) {sub(/s/,"",v); print v*1000} else print v }'; }

# cpu_ticks PID...: user+system clock ticks these processes (all their threads) have used.
cpu_ticks() {
  local t=0 p f
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    # Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    f=$(sed 's/^.*) //' "/proc/$p/stat")
    t=$((t + $(echo "$f" | awk '{print $12 + $13}')))
  done
  echo "$t"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# Install nginx, varnish and wrk from Debian when missing; sets NGINX and VARNISHD.
ensure_peers() {
  for pkg in nginx varnishd wrk; do
    if ! command -v "$pkg" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$pkg" ]; then
      sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
      $sudo apt-get update -qq
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx varnish wrk >/dev/null
      # The benchmarks start their own instances; the packages' system services (on :80 and
      # :6081) would stay running beside them, on the same cores.
      if command -v systemctl >/dev/null 2>&1; then
        $sudo systemctl disable --now nginx varnish >/dev/null 2>&1 || true
      fi
      break
    fi
  done
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  VARNISHD=$(command -v varnishd || echo /usr/sbin/varnishd)
}

# start_nginx ADDR ORIGIN THREADS: nginx proxy_cache in front of ORIGIN, state under $WORK.
start_nginx() {
  local addr=$1 origin=$2 threads=$3
  mkdir -p "$WORK/nginx-cache" "$WORK/nginx-tmp"
  cat >"$WORK/nginx.conf" <<EOF
worker_processes $threads;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush off;
  tcp_nodelay on;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx-tmp;
  proxy_temp_path $WORK/nginx-tmp;
  fastcgi_temp_path $WORK/nginx-tmp;
  uwsgi_temp_path $WORK/nginx-tmp;
  scgi_temp_path $WORK/nginx-tmp;
  proxy_cache_path $WORK/nginx-cache levels=1:2 keys_zone=c:64m max_size=1g inactive=1h use_temp_path=off;
  upstream origin { server $origin; keepalive 32; }
  server {
    listen $addr;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_cache c;
      proxy_cache_lock on;
      proxy_cache_key \$host\$request_uri;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
EOF
  "$NGINX" -c "$WORK/nginx.conf" -p "$WORK" >"$WORK/nginx.out" 2>&1
}
