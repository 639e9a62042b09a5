#!/usr/bin/env bash
# `make bench-latency`: where a commit's time goes at 1, 2, 4 and 8 clients (issue #20 item 2).
# Starts dtkv from a clean data dir (./bench/data) with --trace-hops on the kvstore and every
# logserver, runs `dtkv-bench hops` (PUTs, one in flight per client; per-hop breakdown from the
# servers' HOPS marks; the floor, fdatasync on the data dir's disk and a loopback round trip,
# measured before each client count), writes bench/results/<date>-latency.md, and stops what it
# started, also on failure or Ctrl-C.
#   BENCH_SECONDS=5        seconds per client count
#   BENCH_CLIENTS=1,2,4,8  the client counts
#   BENCH_DATE=2026-12-02  the results file name (default: today)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

date=${BENCH_DATE:-$(date +%F)}
out=bench/results
mkdir -p "$out"
trap stop_dtkv EXIT
DTKV_LOG_ARGS="${DTKV_LOG_ARGS:-} --trace-hops" DTKV_KV_ARGS="${DTKV_KV_ARGS:-} --trace-hops" \
  start_dtkv
# HOPS on the logservers is for cluster members: the bench proves membership with the secret
# scripts/dtkv.sh made.
DTKV_CLUSTER_SECRET_FILE="$BENCH_DATA/cluster.secret" "$BENCH_BIN/dtkv-bench" hops --addr 127.0.0.1:10000 \
  --log 127.0.0.1:10002,127.0.0.1:10012,127.0.0.1:10022 --data-dir "$BENCH_DATA" \
  --clients "${BENCH_CLIENTS:-1,2,4,8}" --duration "${BENCH_SECONDS:-5}s" \
  --date "$date" --markdown "$out/$date-latency.md"
echo "wrote $out/$date-latency.md"
