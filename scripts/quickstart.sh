#!/usr/bin/env bash
# Quickstart: one command from a fresh clone to a running proxy in front of a local beanstalkd.
#   - checks first that every port it needs is free on 127.0.0.1, and stops with the name of
#     the busy port and the variable that moves it otherwise: it only ever fronts a beanstalkd
#     it started itself (never someone else's queue, with the development ACL that allows all)
#   - installs beanstalkd (apt) if missing and the package into .venv
#   - makes development certificates in certs/dev (never committed)
#   - starts beanstalkd on 127.0.0.1:$BEANSTALKD_PORT (default 11300, loopback only)
#   - starts the proxy on 127.0.0.1:$PROXY_PORT (default 11400, mutual TLS), with its metrics on
#     127.0.0.1:$METRICS_PORT (default 9400), from config/proxy.yaml with these ports filled in
#   - starts the client tunnel on 127.0.0.1:$TUNNEL_PORT (default 11301, plain TCP for
#     unmodified client libraries)
# Ctrl-C (or SIGTERM to this script) stops all three; if one of them exits, the others are
# stopped too.
set -euo pipefail
cd "$(dirname "$0")/.."

BEANSTALKD_PORT=${BEANSTALKD_PORT:-11300}
PROXY_PORT=${PROXY_PORT:-11400}
TUNNEL_PORT=${TUNNEL_PORT:-11301}
METRICS_PORT=${METRICS_PORT:-9400}
PORT_VARS=(BEANSTALKD_PORT PROXY_PORT TUNNEL_PORT METRICS_PORT)
export BEANSTALKD_PORT PROXY_PORT TUNNEL_PORT METRICS_PORT

# -- 1. every port valid, distinct and free, before anything is installed or started ---------
if ! python3 - "${PORT_VARS[@]}" <<'PY'; then
import os, socket, sys

names = sys.argv[1:]
what = {"BEANSTALKD_PORT": "beanstalkd", "PROXY_PORT": "the proxy (mutual TLS)",
        "TUNNEL_PORT": "the client tunnel", "METRICS_PORT": "the proxy's metrics"}
ports = {}
for name in names:
    value = os.environ.get(name, "")
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        sys.exit(f"quickstart: {name}={value!r} is not a port number (1..65535)")
    ports[name] = int(value)
seen = {}
for name, port in ports.items():
    if port in seen:
        sys.exit(f"quickstart: {seen[port]} and {name} are both {port}; give each its own port")
    seen[port] = name
busy = []
for name, port in ports.items():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is ok
    try:
        s.bind(("127.0.0.1", port))
    except OSError as exc:
        busy.append((name, port, exc.strerror or str(exc)))
    finally:
        s.close()
for name, port, why in busy:
    print(f"quickstart: port {port} on 127.0.0.1 is busy ({why}); it is the port for "
          f"{what[name]}. Free it or move it with {name}=<port>.", file=sys.stderr)
if busy:
    print("quickstart: nothing was started. It only fronts a beanstalkd it starts itself. "
          "Example: BEANSTALKD_PORT=11310 PROXY_PORT=11410 TUNNEL_PORT=11311 METRICS_PORT=9410 "
          "bash scripts/quickstart.sh", file=sys.stderr)
    sys.exit(1)
PY
    exit 1
fi

# -- 2. install what is missing, make certificates, generate the config ---------------------
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

pids=()
RUN_DIR=""
cleanup() {
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$RUN_DIR" ]; then rm -rf "$RUN_DIR"; fi
}
trap cleanup EXIT
trap 'echo "== stopping"; cleanup; exit 0' INT TERM

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/beanstalk-quickstart.XXXXXX")
CONFIG="$RUN_DIR/proxy.yaml"
# config/proxy.yaml with the three addresses moved; relative paths stay relative to this
# directory (the proxy's working directory).
sed -e "s/^listen: 127\.0\.0\.1:11400\$/listen: 127.0.0.1:$PROXY_PORT/" \
    -e "s/^upstream: 127\.0\.0\.1:11300\$/upstream: 127.0.0.1:$BEANSTALKD_PORT/" \
    -e "s/^  listen: 127\.0\.0\.1:9400\$/  listen: 127.0.0.1:$METRICS_PORT/" \
    config/proxy.yaml >"$CONFIG"
for want in "^listen: 127.0.0.1:$PROXY_PORT\$" "^upstream: 127.0.0.1:$BEANSTALKD_PORT\$" \
        "^  listen: 127.0.0.1:$METRICS_PORT\$"; do
    if ! grep -q "$want" "$CONFIG"; then
        echo "quickstart: config/proxy.yaml no longer has the expected listen/upstream/metrics" \
            "lines; cannot move its ports" >&2
        exit 1
    fi
done
"$BP" check-config --config "$CONFIG"

# -- 3. start the three pieces, each only once the previous one is up ----------------------
# Wait until process $1 itself listens on 127.0.0.1:$2 (not merely: something answers there).
owns_port() {
    python3 - "$1" "$2" <<'PY'
import os, sys, time

pid, port = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 20


def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening():
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


while not listening():
    if not alive() or time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
PY
}

start() {  # start NAME PORT VAR COMMAND...: run COMMAND in the background, wait until it listens
    local name=$1 port=$2 var=$3
    shift 3
    "$@" &
    pids+=($!)
    if ! owns_port "$!" "$port"; then
        echo "quickstart: $name did not start listening on 127.0.0.1:$port (its messages are" \
            "above; move it with $var=<port>); stopping" >&2
        exit 1
    fi
}

start beanstalkd "$BEANSTALKD_PORT" BEANSTALKD_PORT \
    beanstalkd -l 127.0.0.1 -p "$BEANSTALKD_PORT"
start "the proxy" "$PROXY_PORT" PROXY_PORT "$BP" serve --config "$CONFIG"
start "the tunnel" "$TUNNEL_PORT" TUNNEL_PORT \
    "$BP" client --listen "127.0.0.1:$TUNNEL_PORT" --connect "127.0.0.1:$PROXY_PORT" \
    --server-name localhost \
    --cert certs/dev/dev-client.pem --key certs/dev/dev-client.key --ca certs/dev/ca.pem

cat <<MSG
== beanstalkd  127.0.0.1:$BEANSTALKD_PORT (loopback only; started by this script)
== proxy       127.0.0.1:$PROXY_PORT (mutual TLS; client certs from certs/dev)
== tunnel      127.0.0.1:$TUNNEL_PORT (plain; any beanstalkd client library can use it)
== metrics     http://127.0.0.1:$METRICS_PORT/metrics  /healthz  /readyz
Try, in another shell:
  .venv/bin/python scripts/demo_client.py 127.0.0.1 $TUNNEL_PORT      # put + reserve + delete
  openssl s_client -quiet -crlf -connect 127.0.0.1:$PROXY_PORT -CAfile certs/dev/ca.pem \\
      -cert certs/dev/dev-client.pem -key certs/dev/dev-client.key
Stop: Ctrl-C here, or kill $$ (stops the proxy, the tunnel and this beanstalkd; its jobs are
in memory and are lost).
MSG

# Run until stopped, or until one piece exits (then stop the others and report it).
status=0
wait -n "${pids[@]}" || status=$?
echo "quickstart: a process exited (status $status); stopping the others" >&2
exit "$([ "$status" -eq 0 ] && echo 1 || echo "$status")"
