# Shared by scripts/bench.sh and scripts/bench-peers.sh: start and stop a dtkv system of our
# own (release binaries, default ports, its own data dir wiped first), and pick free ports.
# shellcheck shell=bash

BENCH_DATA=${BENCH_DATA:-./bench/data}
BENCH_BIN=./target/release

# True if nothing accepts connections on the loopback port.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A loopback port that was free a moment ago (random in 20000-29999).
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 10000))
    if port_free "$p"; then echo "$p"; return 0; fi
  done
  echo "no free port found" >&2
  return 1
}

DTKV_STARTED=
start_dtkv() {
  # scripts/dtkv.sh uses fixed ports: refuse to run next to a system that is already up
  # (it would be measured instead, or collide).
  for port in 10000 10001 10002 10003 10012 10013 10022 10023; do
    if ! port_free "$port"; then
      echo "port $port is in use: stop the running system first (make stop)" >&2
      return 1
    fi
  done
  rm -rf "$BENCH_DATA"
  DTKV_STARTED=1
  DATA=$BENCH_DATA scripts/dtkv.sh start
}

stop_dtkv() {
  if [ -n "$DTKV_STARTED" ]; then
    DATA=$BENCH_DATA scripts/dtkv.sh stop || true
    DTKV_STARTED=
  fi
}
