#!/usr/bin/env bash
# Starts, stops and shows the local dtkv system: three logserver replicas, the sequencer and
# the kvstore, on their default ports, with data, logs and pid files under $DATA (./data).
# Used by `make run`, `make stop`, `make status` and `make cluster`.
set -euo pipefail

DATA=${DATA:-./data}
BIN=${BIN:-./target/release}
mkdir -p "$DATA/logs" "$DATA/pids"

# Cluster credentials (docs/operations.md, "Trust"). Every process proves membership to the
# others with the secret in $DATA/cluster.secret, made on first start. With TLS=1 (once: the
# certificates stay in $DATA/tls and are used from then on) every link is TLS, with development
# certificates from `dtkv-admin certs`.
SECRET=$DATA/cluster.secret
TLSDIR=$DATA/tls
if [ ! -s "$SECRET" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET")
fi
if [ "${TLS:-0}" = 1 ] && [ ! -s "$TLSDIR/node.pem" ]; then
  "$BIN/dtkv-admin" certs --dir "$TLSDIR" >/dev/null
fi
TRUST="--cluster-secret-file $SECRET"
DKSP_CLUSTER="--cluster-secret-file $SECRET"
DKSP_KV=""
if [ -s "$TLSDIR/node.pem" ]; then
  TRUST="$TRUST --tls-cert $TLSDIR/node.pem --tls-key $TLSDIR/node.key --tls-ca $TLSDIR/ca.pem"
  DKSP_CLUSTER="--tls --tls-ca $TLSDIR/ca.pem --tls-cert $TLSDIR/node.pem --tls-key $TLSDIR/node.key"
  DKSP_KV="--tls --tls-ca $TLSDIR/ca.pem"
fi

# name port binary args...   (a service whose binary does not exist yet is skipped)
services() {
  cat <<SERVICES
log-1 10002 logserver --id 1 --listen 127.0.0.1:10002 --raft-listen 127.0.0.1:10003 --data-dir $DATA/log-1 --peers 1=127.0.0.1:10003/127.0.0.1:10002,2=127.0.0.1:10013/127.0.0.1:10012,3=127.0.0.1:10023/127.0.0.1:10022
log-2 10012 logserver --id 2 --listen 127.0.0.1:10012 --raft-listen 127.0.0.1:10013 --data-dir $DATA/log-2 --peers 1=127.0.0.1:10003/127.0.0.1:10002,2=127.0.0.1:10013/127.0.0.1:10012,3=127.0.0.1:10023/127.0.0.1:10022
log-3 10022 logserver --id 3 --listen 127.0.0.1:10022 --raft-listen 127.0.0.1:10023 --data-dir $DATA/log-3 --peers 1=127.0.0.1:10003/127.0.0.1:10002,2=127.0.0.1:10013/127.0.0.1:10012,3=127.0.0.1:10023/127.0.0.1:10022
sequencer 10001 sequencer --listen 127.0.0.1:10001 --data-dir $DATA/sequencer
kvstore 10000 kvstore --listen 127.0.0.1:10000 --sequencer 127.0.0.1:10001 --log 127.0.0.1:10002,127.0.0.1:10012,127.0.0.1:10022
SERVICES
}

# True if the pid file names a live process (a killed one can linger as a zombie: not live).
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }
running() { [ -f "$DATA/pids/$1.pid" ] && alive "$(cat "$DATA/pids/$1.pid")"; }

# Sends one request line and prints the reply line (empty if the server does not answer), as a
# cluster member (or, to the kvstore, as a client).
ask() {
  local how=$DKSP_CLUSTER
  [ "$1" = 10000 ] && how=$DKSP_KV
  # shellcheck disable=SC2086
  printf '%s\n' "$2" | timeout 2 "$BIN/dksp" $how "127.0.0.1:$1" 2>/dev/null | head -n 1 || true
}

start() {
  local filter=${1:-}
  services | while read -r name port binary args; do
    [[ -n "$filter" && "$name" != $filter ]] && continue
    if [ ! -x "$BIN/$binary" ]; then
      echo "skip   $name: $BIN/$binary is not built (its issue has not landed yet)"
      continue
    fi
    if running "$name"; then
      echo "up     $name (pid $(cat "$DATA/pids/$name.pid")) already"
      continue
    fi
    # The log group is initialised once, by replica 1, when no replica has any data yet.
    # Replicas restarted later (even wiped ones) rejoin without it.
    if [ "$name" = log-1 ] && ! ls -d "$DATA"/log-*/raft >/dev/null 2>&1; then
      args="$args --init"
    fi
    # Extra flags for experiments: DTKV_LOG_ARGS (every replica), DTKV_KV_ARGS, DTKV_SEQ_ARGS.
    case $binary in
      logserver) args="$args ${DTKV_LOG_ARGS:-}" ;;
      kvstore) args="$args ${DTKV_KV_ARGS:-}" ;;
      sequencer) args="$args ${DTKV_SEQ_ARGS:-}" ;;
    esac
    # shellcheck disable=SC2086
    nohup "$BIN/$binary" $args $TRUST >>"$DATA/logs/$name.log" 2>&1 &
    echo $! >"$DATA/pids/$name.pid"
    for _ in $(seq 1 100); do
      [ "$(ask "$port" PING)" = "PONG" ] && break
      if ! running "$name"; then
        echo "FAILED $name exited; last lines of $DATA/logs/$name.log:" >&2
        tail -n 20 "$DATA/logs/$name.log" >&2
        exit 1
      fi
      sleep 0.1
    done
    if [ "$(ask "$port" PING)" != "PONG" ]; then
      echo "FAILED $name does not answer PING on port $port; see $DATA/logs/$name.log" >&2
      exit 1
    fi
    echo "up     $name on 127.0.0.1:$port (pid $(cat "$DATA/pids/$name.pid")), log $DATA/logs/$name.log"
    # The kvstore answers PING at once but data commands only once it has rebuilt itself from
    # the log: wait for that too, so `make run` hands over a system that serves.
    if [ "$name" = kvstore ]; then
      for _ in $(seq 1 300); do
        ask "$port" STATUS | grep -q 'state=serving' && break
        sleep 0.1
      done
      state=$(ask "$port" STATUS | tr ' ' '\n' | grep '^state=' || echo state=unknown)
      [ "$state" = state=serving ] || echo "note   kvstore is not serving yet ($state); STATUS shows its progress"
    fi
  done
}

# Waits until every logserver replica reports the same leader.
wait_leader() {
  for _ in $(seq 1 100); do
    leaders=$(for port in 10002 10012 10022; do
      ask "$port" STATUS | tr ' ' '\n' | grep '^leader=' || echo leader=none
    done | sort -u)
    if [ "$(echo "$leaders" | wc -l)" = 1 ] && [ "$leaders" != leader=none ]; then
      echo "log group leader: ${leaders#leader=}"
      return 0
    fi
    sleep 0.1
  done
  echo "the log replicas do not agree on a leader after 10 s; see $DATA/logs/log-*.log" >&2
  return 1
}

stop() {
  local filter=${1:-}
  services | tac | while read -r name _; do
    [[ -n "$filter" && "$name" != $filter ]] && continue
    [ -f "$DATA/pids/$name.pid" ] || continue
    pid=$(cat "$DATA/pids/$name.pid")
    if alive "$pid"; then
      kill -TERM "$pid"
      for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
      alive "$pid" && kill -KILL "$pid"
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$DATA/pids/$name.pid"
  done
}

# One line per service. A service that exited by itself (its pid file is still there: `stop`
# removes it) is shown as DOWN with the last error line of its log, e.g. a log replica that
# exited on a full disk or refused to start; one that runs but does not answer is flagged too.
status() {
  local filter=${1:-}
  services | while read -r name port _; do
    [[ -n "$filter" && "$name" != $filter ]] && continue
    if running "$name"; then
      reply=$(ask "$port" STATUS)
      if [ -z "$reply" ]; then
        echo "$name pid=$(cat "$DATA/pids/$name.pid") port=$port NOT ANSWERING (see $DATA/logs/$name.log)"
      else
        echo "$name pid=$(cat "$DATA/pids/$name.pid") port=$port $reply"
      fi
    elif [ -f "$DATA/pids/$name.pid" ]; then
      why=$({ grep -E 'ERROR|Error:' "$DATA/logs/$name.log" 2>/dev/null || true; } | tail -n 1 | cut -c1-300)
      echo "$name DOWN (exited by itself; \`make run\` restarts it) last error in its log: ${why:-none, see $DATA/logs/$name.log}"
    else
      echo "$name down"
    fi
  done
}

case "${1:-}" in
  start) start "${2:-}" && { [ ! -x "$BIN/logserver" ] || wait_leader; } ;;
  stop) stop "${2:-}" ;;
  status) status "${2:-}" ;;
  *) echo "usage: $0 start|stop|status [service-glob]" >&2; exit 2 ;;
esac
