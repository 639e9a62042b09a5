#!/usr/bin/env bash
# `make bench-peers`: the standard set (`dtkv-bench list`) against dtkv, PostgreSQL, a 3-member
# etcd cluster and Redis, one system at a time on loopback, then one table with the ratios.
#
# Same for every system: 10,000 keys loaded before the first run, 100-byte values, the clients
# and in-flight counts of the list, durable commits (dtkv: fdatasync on a majority of 3
# replicas; PostgreSQL: fsync + synchronous_commit, REPEATABLE READ; etcd: WAL fsync on a
# majority of 3; Redis: appendfsync always). How each is driven:
#   dtkv, etcd   dtkv-bench (etcd through its v3 HTTP/JSON gateway, clients spread over members)
#   PostgreSQL   pgbench custom scripts, latencies from its per-transaction log
#   Redis        redis-benchmark (SET/GET; the transaction as one EVAL script)
# Experiments a tool cannot express are left out of its column (shown as —).
#
# Missing packages (postgresql, etcd-server, etcd-client, redis-server) are installed with
# apt-get, with service auto-start blocked; every server runs as our own process in a temp dir
# on free ports and is stopped on exit, also on failure.
#   BENCH_SECONDS=10           seconds per experiment
#   BENCH_ONLY=rmw,put         only the experiments whose list line has one of the words
#   BENCH_SYSTEMS="dtkv postgresql etcd redis"
#   BENCH_DATE=2026-11-23      results file name: bench/results/<date>-peers.json and .md
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

secs=${BENCH_SECONDS:-10}
systems=${BENCH_SYSTEMS:-dtkv postgresql etcd redis}
date=${BENCH_DATE:-$(date +%F)}
out=bench/results
res=$out/$date-peers.json
keys=10000
vsize=100
bench="$BENCH_BIN/dtkv-bench"
mkdir -p "$out"
rm -f "$res"

work=$(mktemp -d /tmp/dtkv-peers.XXXXXX)
chmod 755 "$work"
pids=()
pg_data=
cleanup() {
  set +e
  if [ -n "$pg_data" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1
  fi
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  pids=()
  stop_dtkv
  rm -rf "$work"
}
trap cleanup EXIT

# The experiments, filtered by BENCH_ONLY: "workload dist clients depth" lines.
experiments() {
  "$bench" list | while read -r line; do
    if [ -z "${BENCH_ONLY:-}" ]; then echo "$line"; continue; fi
    local words w
    IFS=, read -ra words <<<"$BENCH_ONLY"
    for w in "${words[@]}"; do
      if [[ "$line" == *"$w"* ]]; then echo "$line"; break; fi
    done
  done
}

wanted() { [[ " $systems " == *" $1 "* ]]; }

# --- packages ----------------------------------------------------------------------------------

install_missing() {
  local need=()
  if wanted postgresql && ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
    need+=(postgresql)
  fi
  if wanted etcd; then
    command -v etcd >/dev/null || need+=(etcd-server)
    command -v etcdctl >/dev/null || need+=(etcd-client)
  fi
  if wanted redis && ! { command -v redis-server && command -v redis-benchmark; } >/dev/null; then
    need+=(redis-server redis-tools)
  fi
  [ ${#need[@]} -eq 0 ] && return 0
  echo "installing ${need[*]}"
  # Debian starts a package's service on install (PostgreSQL on 5432, Redis on 6379, etcd on
  # 2379); we run our own, so block that with policy-rc.d unless the machine has one already.
  local policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  [ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# Ports handed out in this run, so two services never get the same one.
used_ports=" "
port() {
  local p
  while :; do
    p=$(free_port)
    if [[ "$used_ports" != *" $p "* ]]; then used_ports+="$p "; echo "$p"; return; fi
  done
}

wait_for() { # what command...
  local what=$1; shift
  for _ in $(seq 1 100); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$what did not come up" >&2
  return 1
}

# --- dtkv ----------------------------------------------------------------------------------------

run_dtkv() {
  start_dtkv
  "$bench" suite --addr 127.0.0.1:10000 --load --duration "${secs}s" \
    ${BENCH_ONLY:+--only "$BENCH_ONLY"} --system dtkv --date "$date" --json "$res"
  stop_dtkv
}

# --- PostgreSQL ----------------------------------------------------------------------------------

# PostgreSQL refuses to run as root: its own user when we are root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The pgbench script of a workload: `key` expressions as in dtkv (key0000042).
pg_script() { # workload dist
  local pick="random(0, $((keys - 1)))"
  # pgbench's zipfian needs s >= 1.001 (dtkv-bench uses 0.99): the hottest key gets 10.2% of
  # draws instead of 9.8% over 10,000 keys.
  [ "$2" = zipfian ] && pick="random_zipfian(0, $((keys - 1)), 1.001)"
  local k="'key' || lpad(:k::text, 7, '0')"
  case $1 in
    put) printf '\\set k %s\nINSERT INTO kv VALUES (%s, repeat(%s, %d)) ON CONFLICT (k) DO UPDATE SET v = excluded.v;\n' \
      "$pick" "$k" "'p'" "$vsize" ;;
    get) printf '\\set k %s\nSELECT v FROM kv WHERE k = %s;\n' "$pick" "$k" ;;
    rmw)
      # The 4-operation transaction: read a and b, write both. Updates go in key order, as a
      # careful application would, so concurrent transactions do not deadlock.
      cat <<SQL
\\set a $pick
\\set b $pick
\\set lo least(:a, :b)
\\set hi greatest(:a, :b)
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT v FROM kv WHERE k = 'key' || lpad(:a::text, 7, '0');
SELECT v FROM kv WHERE k = 'key' || lpad(:b::text, 7, '0');
UPDATE kv SET v = repeat('r', $vsize) WHERE k = 'key' || lpad(:lo::text, 7, '0');
UPDATE kv SET v = repeat('r', $vsize) WHERE k = 'key' || lpad(:hi::text, 7, '0');
COMMIT;
SQL
      ;;
  esac
}

run_postgresql() {
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  local dir=$work/pg pgport
  pgport=$(port)
  mkdir -p "$dir"
  chown postgres: "$dir" 2>/dev/null || true
  pg_data=$dir/data
  as_pg "$PGBIN/initdb" -D "$pg_data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log"
  as_pg "$PGBIN/pg_ctl" -D "$pg_data" -l "$dir/server.log" -w -o "-p $pgport \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir \
    -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
    -c default_transaction_isolation='repeatable read' -c max_connections=200 \
    -c shared_buffers=256MB" start >/dev/null
  local psql=(psql -q -h 127.0.0.1 -p "$pgport" -U postgres -v ON_ERROR_STOP=1)
  "${psql[@]}" -c "CREATE TABLE kv (k text PRIMARY KEY, v text NOT NULL)" \
    -c "INSERT INTO kv SELECT 'key' || lpad(i::text, 7, '0'), repeat('x', $vsize)
      FROM generate_series(0, $((keys - 1))) i" \
    -c "VACUUM ANALYZE kv"
  local workload dist clients depth
  experiments | while read -r workload dist clients depth; do
    if [ "$depth" != 1 ]; then continue; fi # pgbench waits for each statement
    local scripts=() note=
    if [ "$workload" = mixed ]; then
      pg_script put "$dist" >"$dir/put.sql"
      pg_script get "$dist" >"$dir/get.sql"
      scripts=(-f "$dir/put.sql@1" -f "$dir/get.sql@1")
    else
      pg_script "$workload" "$dist" >"$dir/$workload.sql"
      scripts=(-f "$dir/$workload.sql")
    fi
    [ "$dist" = zipfian ] && note="pgbench's zipfian exponent is 1.001 (pgbench's minimum), ours 0.99"
    local prefix=$dir/tx-$workload-$dist-$clients report=$dir/pgbench-$workload-$dist-$clients.out
    echo "  postgresql $workload $dist c$clients: pgbench for ${secs} s"
    # Serialization failures are counted as failed transactions (pgbench >= 15), not retried.
    (cd "$dir" && pgbench -h 127.0.0.1 -p "$pgport" -U postgres -n -M prepared \
      -c "$clients" -j 2 -T "$secs" "${scripts[@]}" \
      --log --log-prefix="$prefix" postgres >"$report" 2>&1) || {
      echo "pgbench failed; see below" >&2
      tail -n 20 "$report" >&2
    }
    grep -E '^(tps|number of failed|latency average)' "$report" | sed 's/^/    /' || true
    "$bench" import-pgbench --system postgresql --workload "$workload" --dist "$dist" \
      --clients "$clients" --keys "$keys" --value-size "$vsize" --seconds "$secs" \
      --note "$note" --date "$date" --json "$res" "$prefix".* >/dev/null
    rm -f "$prefix".*
  done
  as_pg "$PGBIN/pg_ctl" -D "$pg_data" -m fast stop >/dev/null
  pg_data=
}

# --- etcd ----------------------------------------------------------------------------------------

run_etcd() {
  local i cluster= endpoints= cport=() pport=()
  for i in 1 2 3; do
    cport[i]=$(port)
    pport[i]=$(port)
    cluster+="${cluster:+,}m$i=http://127.0.0.1:${pport[i]}"
    endpoints+="${endpoints:+,}127.0.0.1:${cport[i]}"
  done
  local first=${#pids[@]}
  for i in 1 2 3; do
    etcd --name "m$i" --data-dir "$work/etcd-$i" \
      --listen-client-urls "http://127.0.0.1:${cport[i]}" \
      --advertise-client-urls "http://127.0.0.1:${cport[i]}" \
      --listen-peer-urls "http://127.0.0.1:${pport[i]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${pport[i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new \
      --initial-cluster-token dtkv-bench --logger zap --log-level warn \
      --quota-backend-bytes $((8 * 1024 * 1024 * 1024)) \
      >"$work/etcd-$i.log" 2>&1 &
    pids+=($!)
  done
  wait_for "etcd" env ETCDCTL_API=3 etcdctl --endpoints="$endpoints" endpoint health
  "$bench" suite --target etcd --addr "$endpoints" --load --duration "${secs}s" \
    ${BENCH_ONLY:+--only "$BENCH_ONLY"} --system etcd --date "$date" --json "$res"
  for pid in "${pids[@]:$first}"; do kill "$pid"; wait "$pid" 2>/dev/null || true; done
  pids=("${pids[@]:0:$first}")
}

# --- Redis ---------------------------------------------------------------------------------------

run_redis() {
  local dir=$work/redis rport
  rport=$(port)
  mkdir -p "$dir"
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
    --appendfsync always --save '' --daemonize no --protected-mode no \
    --logfile "$dir/server.log" &
  pids+=($!)
  local pid=$!
  wait_for "redis" redis-cli -p "$rport" ping
  # redis-benchmark's -r keys are key:<12 digits>; load each once.
  local v
  v=$(head -c "$vsize" </dev/zero | tr '\0' x)
  seq 0 $((keys - 1)) | awk -v v="$v" '{ printf "SET key:%012d %s\r\n", $1, v }' |
    redis-cli -p "$rport" --pipe >/dev/null
  local lua="redis.call('GET', KEYS[1]) redis.call('GET', KEYS[2]) redis.call('SET', KEYS[1], ARGV[1]) redis.call('SET', KEYS[2], ARGV[1]) return 1"
  local workload dist clients depth
  experiments | while read -r workload dist clients depth; do
    # redis-benchmark draws keys uniformly, runs one command type at a time.
    if [ "$dist" != uniform ] || [ "$workload" = mixed ]; then continue; fi
    local cmd=() note=
    case $workload in
      put) cmd=(-t set -d "$vsize") ;;
      get) cmd=(-t get -d "$vsize") ;;
      rmw)
        cmd=(EVAL "$lua" 2 key:__rand_int__ key:__rand_int__ "$v")
        note="one EVAL script (GET, GET, SET, SET run atomically, nothing to abort), not an interactive transaction"
        ;;
    esac
    local base=(redis-benchmark -h 127.0.0.1 -p "$rport" -c "$clients" -P "$depth" -r "$keys" --csv)
    # redis-benchmark counts requests, not seconds: size -n from a short calibration run.
    local n rps
    n=$((clients * depth * 500))
    # (a custom command's name holds commas, so split on the quotes around them)
    rps=$("${base[@]}" -n "$n" "${cmd[@]}" | tail -n 1 | awk -F'","' '{ print $2 }')
    n=$(awk -v r="$rps" -v s="$secs" -v m="$n" 'BEGIN { n = int(r * s); print (n > m ? n : m) }')
    echo "  redis $workload c$clients d$depth: redis-benchmark -n $n"
    "${base[@]}" -n "$n" "${cmd[@]}" >"$dir/$workload.csv"
    "$bench" import-redis --system redis --workload "$workload" --dist "$dist" \
      --clients "$clients" --depth "$depth" --keys "$keys" --value-size "$vsize" \
      --requests "$n" --note "$note" --date "$date" --json "$res" "$dir/$workload.csv"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pids=("${pids[@]/$pid/}")
}

# --- the run -------------------------------------------------------------------------------------

install_missing
for s in $systems; do
  echo "== $s"
  "run_$s"
done
peers=$(for s in $systems; do [ "$s" != dtkv ] && echo "$s"; done | paste -sd, -)
echo
"$bench" compare --ours dtkv ${peers:+--peers "$peers"} --markdown "$out/$date-peers.md" "$res"
echo
echo "wrote $res and $out/$date-peers.md"
