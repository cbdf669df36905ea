#!/usr/bin/env bash
# Quickstart: one command from a fresh clone to a running proxy in front of a local beanstalkd.
#   - installs beanstalkd (apt) if missing and the package into .venv
#   - makes development certificates in certs/dev (never committed)
#   - starts beanstalkd on 127.0.0.1:11300 (loopback only)
#   - starts the client tunnel on 127.0.0.1:11301 (plain TCP for unmodified client libraries)
#   - runs the proxy on 127.0.0.1:11400 (mutual TLS) in the foreground; Ctrl-C stops everything
set -euo pipefail
cd "$(dirname "$0")/.."

BEANSTALKD_PORT=${BEANSTALKD_PORT:-11300}
TUNNEL_PORT=${TUNNEL_PORT:-11301}

if ! command -v beanstalkd >/dev/null 2>&1; then
    echo "== installing beanstalkd (apt-get)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq beanstalkd >/dev/null
fi
if [ ! -x .venv/bin/beanstalk-proxy ]; then
    echo "== installing beanstalk-proxy into .venv"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[fast]'
fi
BP=.venv/bin/beanstalk-proxy

"$BP" certs dev certs/dev
"$BP" check-config --config config/proxy.yaml

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

beanstalkd -l 127.0.0.1 -p "$BEANSTALKD_PORT" &
pids+=($!)
"$BP" client --listen "127.0.0.1:$TUNNEL_PORT" --connect 127.0.0.1:11400 --server-name localhost \
    --cert certs/dev/dev-client.pem --key certs/dev/dev-client.key --ca certs/dev/ca.pem &
pids+=($!)

cat <<MSG
== beanstalkd  127.0.0.1:$BEANSTALKD_PORT (loopback only)
== proxy       127.0.0.1:11400 (mutual TLS; client certs from certs/dev)
== tunnel      127.0.0.1:$TUNNEL_PORT (plain; any beanstalkd client library can use it)
== metrics     http://127.0.0.1:9400/metrics  /healthz  /readyz
Try, in another shell:
  .venv/bin/python scripts/demo_client.py 127.0.0.1 $TUNNEL_PORT      # put + reserve + delete
  openssl s_client -quiet -connect 127.0.0.1:11400 -CAfile certs/dev/ca.pem \\
      -cert certs/dev/dev-client.pem -key certs/dev/dev-client.key
MSG
"$BP" serve --config config/proxy.yaml &
pids+=($!)
wait "${pids[-1]}"
