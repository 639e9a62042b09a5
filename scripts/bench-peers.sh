#!/usr/bin/env bash
# `make bench-peers`: the standard set (`dtkv-bench list`) against dtkv, PostgreSQL, a 3-member
# etcd cluster and Redis on loopback, in interleaved rounds, then one table with the ratios.
#
# Rounds: every system is started and loaded once, and all stay up; then for each experiment,
# round 1 runs it on dtkv, PostgreSQL, etcd and Redis one after another, round 2 again, and so
# on, so a noisy minute on this shared machine lands on one round of every system rather than
# on all of one system's figures. Rows carry their round in the results file; `dtkv-bench
# compare` shows each system's median ops/s over the rounds, the slowest and fastest round as %
# off that median, the median p99, and the ratio of the medians. The whole standard set takes
# about rows × rounds × systems × BENCH_SECONDS (9 × 3 × 4 × 10 s = 18 min by default).
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
# on free ports (dtkv on its default ports, which must be free) and is stopped on exit, also on
# failure or Ctrl-C.
#   BENCH_SECONDS=10           seconds per experiment and round
#   BENCH_ROUNDS=3             rounds per experiment (a positive integer; under 3 the median
#                              is no better than a single run, and the script says so)
#   BENCH_ONLY=rmw,put         only the experiments whose list line has one of the words
#   BENCH_SYSTEMS="dtkv postgresql etcd redis"   (and their order within a round)
#   BENCH_DATE=2026-11-23      results file name: bench/results/<date>-peers.json and .md
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

secs=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
  echo "BENCH_ROUNDS must be a positive integer, not '$rounds'" >&2
  exit 2
fi
if [ "$rounds" -lt 3 ]; then
  echo "note: BENCH_ROUNDS=$rounds: the median of fewer than 3 rounds does not set a noisy one aside" >&2
fi
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
    pg_data=
  fi
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  pids=()
  stop_dtkv
  rm -rf "$work"
  set -e
}
trap cleanup EXIT
# Ctrl-C or kill: leave through the EXIT trap as soon as the command under way returns. Without
# this bash goes on with the next command when that one (pgbench) handles SIGINT itself, and
# the next experiments run against servers the same Ctrl-C stopped.
trap 'exit 130' INT
trap 'exit 143' TERM HUP

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

# Each system has up_<name> (start it, load the keys once) and exp_<name> workload dist clients
# depth round (one experiment for one round: rows appended to $res, one line printed).

up_dtkv() {
  start_dtkv
  "$bench" load --addr 127.0.0.1:10000
}

exp_dtkv() { # workload dist clients depth round
  "$bench" run --addr 127.0.0.1:10000 --workload "$1" --dist "$2" --clients "$3" --depth "$4" \
    --duration "${secs}s" --quiet --system dtkv --round "$5" --date "$date" --json "$res" |
    tail -n 1
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

PGBIN=
pgport=
pg_dir=

up_postgresql() {
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  pg_dir=$work/pg
  pgport=$(port)
  mkdir -p "$pg_dir"
  chown postgres: "$pg_dir" 2>/dev/null || true
  pg_data=$pg_dir/data
  as_pg "$PGBIN/initdb" -D "$pg_data" -U postgres --auth=trust -E UTF8 >"$pg_dir/initdb.log"
  as_pg "$PGBIN/pg_ctl" -D "$pg_data" -l "$pg_dir/server.log" -w -o "-p $pgport \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories=$pg_dir \
    -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
    -c default_transaction_isolation='repeatable read' -c max_connections=200 \
    -c shared_buffers=256MB" start >/dev/null
  local psql=(psql -q -h 127.0.0.1 -p "$pgport" -U postgres -v ON_ERROR_STOP=1)
  "${psql[@]}" -c "CREATE TABLE kv (k text PRIMARY KEY, v text NOT NULL)" \
    -c "INSERT INTO kv SELECT 'key' || lpad(i::text, 7, '0'), repeat('x', $vsize)
      FROM generate_series(0, $((keys - 1))) i" \
    -c "VACUUM ANALYZE kv"
}

exp_postgresql() { # workload dist clients depth round
  local workload=$1 dist=$2 clients=$3 depth=$4 round=$5
  if [ "$depth" != 1 ]; then return 0; fi # pgbench waits for each statement
  local scripts=() note=
  if [ "$workload" = mixed ]; then
    pg_script put "$dist" >"$pg_dir/put.sql"
    pg_script get "$dist" >"$pg_dir/get.sql"
    scripts=(-f "$pg_dir/put.sql@1" -f "$pg_dir/get.sql@1")
  else
    pg_script "$workload" "$dist" >"$pg_dir/$workload.sql"
    scripts=(-f "$pg_dir/$workload.sql")
  fi
  [ "$dist" = zipfian ] && note="pgbench's zipfian exponent is 1.001 (pgbench's minimum), ours 0.99"
  local prefix=$pg_dir/tx-$workload-$dist-$clients report=$pg_dir/pgbench-$workload-$dist-$clients.out
  # Serialization failures are counted as failed transactions (pgbench >= 15), not retried.
  (cd "$pg_dir" && pgbench -h 127.0.0.1 -p "$pgport" -U postgres -n -M prepared \
    -c "$clients" -j 2 -T "$secs" "${scripts[@]}" \
    --log --log-prefix="$prefix" postgres >"$report" 2>&1) || {
    echo "pgbench failed; see below" >&2
    tail -n 20 "$report" >&2
  }
  "$bench" import-pgbench --system postgresql --workload "$workload" --dist "$dist" \
    --clients "$clients" --keys "$keys" --value-size "$vsize" --seconds "$secs" \
    --note "$note" --round "$round" --date "$date" --json "$res" "$prefix".* | tail -n 1
  rm -f "$prefix".*
}

# --- etcd ----------------------------------------------------------------------------------------

etcd_endpoints=

up_etcd() {
  local i cluster= cport=() pport=()
  for i in 1 2 3; do
    cport[i]=$(port)
    pport[i]=$(port)
    cluster+="${cluster:+,}m$i=http://127.0.0.1:${pport[i]}"
    etcd_endpoints+="${etcd_endpoints:+,}127.0.0.1:${cport[i]}"
  done
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
  wait_for "etcd" env ETCDCTL_API=3 etcdctl --endpoints="$etcd_endpoints" endpoint health
  "$bench" load --target etcd --addr "$etcd_endpoints"
}

exp_etcd() { # workload dist clients depth round
  "$bench" run --target etcd --addr "$etcd_endpoints" --workload "$1" --dist "$2" \
    --clients "$3" --depth "$4" --duration "${secs}s" --quiet --system etcd --round "$5" \
    --date "$date" --json "$res" | tail -n 1
}

# --- Redis ---------------------------------------------------------------------------------------

rport=
redis_dir=
redis_value=
# redis-benchmark counts requests, not seconds: -n is sized from a short calibration run, once
# per experiment (the first round), so every round sends the same number of requests.
declare -A redis_n=()

up_redis() {
  redis_dir=$work/redis
  rport=$(port)
  mkdir -p "$redis_dir"
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$redis_dir" --appendonly yes \
    --appendfsync always --save '' --daemonize no --protected-mode no \
    --logfile "$redis_dir/server.log" &
  pids+=($!)
  wait_for "redis" redis-cli -p "$rport" ping
  # redis-benchmark's -r keys are key:<12 digits>; load each once.
  redis_value=$(head -c "$vsize" </dev/zero | tr '\0' x)
  seq 0 $((keys - 1)) | awk -v v="$redis_value" '{ printf "SET key:%012d %s\r\n", $1, v }' |
    redis-cli -p "$rport" --pipe >/dev/null
}

exp_redis() { # workload dist clients depth round
  local workload=$1 dist=$2 clients=$3 depth=$4 round=$5
  # redis-benchmark draws keys uniformly, runs one command type at a time.
  if [ "$dist" != uniform ] || [ "$workload" = mixed ]; then return 0; fi
  local lua="redis.call('GET', KEYS[1]) redis.call('GET', KEYS[2]) redis.call('SET', KEYS[1], ARGV[1]) redis.call('SET', KEYS[2], ARGV[1]) return 1"
  local cmd=() note=
  case $workload in
    put) cmd=(-t set -d "$vsize") ;;
    get) cmd=(-t get -d "$vsize") ;;
    rmw)
      cmd=(EVAL "$lua" 2 key:__rand_int__ key:__rand_int__ "$redis_value")
      note="one EVAL script (GET, GET, SET, SET run atomically, nothing to abort), not an interactive transaction"
      ;;
  esac
  local base=(redis-benchmark -h 127.0.0.1 -p "$rport" -c "$clients" -P "$depth" -r "$keys" --csv)
  local exp="$workload $dist $clients $depth" n rps
  if [ -z "${redis_n[$exp]:-}" ]; then
    n=$((clients * depth * 500))
    # (a custom command's name holds commas, so split on the quotes around them)
    rps=$("${base[@]}" -n "$n" "${cmd[@]}" | tail -n 1 | awk -F'","' '{ print $2 }')
    redis_n[$exp]=$(awk -v r="$rps" -v s="$secs" -v m="$n" 'BEGIN { n = int(r * s); print (n > m ? n : m) }')
  fi
  n=${redis_n[$exp]}
  "${base[@]}" -n "$n" "${cmd[@]}" >"$redis_dir/$workload.csv"
  "$bench" import-redis --system redis --workload "$workload" --dist "$dist" \
    --clients "$clients" --depth "$depth" --keys "$keys" --value-size "$vsize" \
    --requests "$n" --note "$note" --round "$round" --date "$date" --json "$res" \
    "$redis_dir/$workload.csv" | tail -n 1
}

# --- the run -------------------------------------------------------------------------------------

for s in $systems; do
  if ! declare -F "up_$s" >/dev/null; then
    echo "unknown system '$s' in BENCH_SYSTEMS (dtkv postgresql etcd redis)" >&2
    exit 2
  fi
done
if [ ! -x "$bench" ]; then
  echo "$bench is not built (make build)" >&2
  exit 2
fi
install_missing
mapfile -t lines < <(experiments)
if [ ${#lines[@]} -eq 0 ]; then
  echo "no experiment of \`dtkv-bench list\` matches BENCH_ONLY=${BENCH_ONLY:-}" >&2
  exit 2
fi
for s in $systems; do
  echo "== $s: start and load"
  "up_$s"
done
echo "== ${#lines[@]} experiments × $rounds rounds × {$systems}, ${secs} s each"
for line in "${lines[@]}"; do
  read -r workload dist clients depth <<<"$line"
  for r in $(seq 1 "$rounds"); do
    echo "-- $line, round $r of $rounds"
    for s in $systems; do
      "exp_$s" "$workload" "$dist" "$clients" "$depth" "$r"
    done
  done
done
# Stop the servers before the table; the trap does it too on any other way out.
cleanup
trap - EXIT
peers=$(for s in $systems; do [ "$s" != dtkv ] && echo "$s"; done | paste -sd, -)
echo
"$bench" compare --ours dtkv ${peers:+--peers "$peers"} --markdown "$out/$date-peers.md" "$res"
echo
echo "wrote $res and $out/$date-peers.md"
