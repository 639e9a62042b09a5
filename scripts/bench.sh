#!/usr/bin/env bash
# `make bench`: starts dtkv from a clean data dir (./bench/data), runs dtkv-bench's standard set
# against it, writes bench/results/<date>.json and <date>.md, and stops what it started, also
# on failure or Ctrl-C.
#   BENCH_SECONDS=10  seconds per experiment
#   BENCH_ONLY=rmw,put  only the experiments whose `dtkv-bench list` line has one of the words
#   BENCH_DATE=2026-11-23  the results file name (default: today)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

date=${BENCH_DATE:-$(date +%F)}
out=bench/results
mkdir -p "$out"
trap stop_dtkv EXIT
start_dtkv
rm -f "$out/$date.json"
"$BENCH_BIN/dtkv-bench" suite --addr 127.0.0.1:10000 --load \
  --duration "${BENCH_SECONDS:-10}s" ${BENCH_ONLY:+--only "$BENCH_ONLY"} \
  --date "$date" --json "$out/$date.json" --markdown "$out/$date.md"
echo "wrote $out/$date.json and $out/$date.md"
