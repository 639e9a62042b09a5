# The two commands that matter: `make run` (start the whole system) and `make test`.
.PHONY: run stop status cluster build test torture torture-secure lint drill bench-seq bench-log bench-kv bench bench-peers bench-latency soak clean

DATA ?= ./data

build:
	cargo build --release --workspace --bins

## Build in release and start everything on the default ports, data under ./data.
run: build
	DATA=$(DATA) scripts/dtkv.sh start

## Stop exactly the processes `make run` started (pid files under ./data/pids).
stop:
	DATA=$(DATA) scripts/dtkv.sh stop

status:
	DATA=$(DATA) scripts/dtkv.sh status

## Only the three logserver replicas.
cluster: build
	DATA=$(DATA) scripts/dtkv.sh start 'log-*'
	DATA=$(DATA) scripts/dtkv.sh status 'log-*'

## Every test: unit, data-driven, property and the multi-process tests in cluster-tests.
test:
	cargo build --workspace --bins
	cargo test --workspace

## Jepsen-style torture: a random schedule of faults for SECONDS under a transactional load, then
## the history checked for snapshot isolation and durability. Prints its seed; SEED=n replays
## the same schedule. History and report land in target/jepsen/<seed>/.
SECONDS ?= 600
SEED ?=
torture:
	cargo build --workspace --bins
	TORTURE_SECONDS=$(SECONDS) TORTURE_SEED=$(SEED) \
		cargo test -p cluster-tests --test jepsen -- --ignored --exact torture --nocapture

## The same with TLS and the cluster secret on every process and every test client
## (DTKV_TEST_SECURE=tls+secret; also works for any cluster-tests test or bench, e.g. bench-kv).
torture-secure:
	cargo build --workspace --bins
	DTKV_TEST_SECURE=tls+secret TORTURE_SECONDS=$(SECONDS) TORTURE_SEED=$(SEED) \
		cargo test -p cluster-tests --test jepsen -- --ignored --exact torture --nocapture

## Recovery drill against the running system: kill -9 the kvstore and the log leader under load.
drill: run
	DATA=$(DATA) ./target/release/dtkv-drill --data $(DATA)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench-seq:
	cargo bench -p sequencer

bench-log: build
	cargo bench -p cluster-tests --bench logserver

bench-kv: build
	cargo bench -p cluster-tests --bench kvstore

## The standard load (dtkv-bench suite) against a fresh system under ./bench/data, results in
## bench/results/<date>.json and .md. Needs the default ports free. Not part of `make test`.
bench: build
	scripts/bench.sh

## Where a commit's time goes at 1, 2, 4 and 8 clients: a fresh system with --trace-hops, the
## per-hop breakdown of sampled commits next to the floor (fdatasync, loopback round trip)
## measured in the same run. Needs the default ports free. bench/results/<date>-latency.md.
bench-latency: build
	scripts/bench-latency.sh

## The same load against PostgreSQL, a 3-member etcd and Redis (installed from Debian packages
## if missing), then one table with the ratios. Manual: installs packages, takes minutes.
bench-peers: build
	scripts/bench-peers.sh

## What a careless or hostile client sends, at full size (issue #18): large values under a
## leader kill, unfinished lines, huge and many transactions, unread SCANs, an old snapshot, a
## full SCAN among other clients, thousands of connections. Each row reports the servers' memory
## (before / peak / after), latencies and whether the system still serves; about 5 minutes.
## Summary in bench/results/<date>-soak.md; SOAK_ROWS=1,4 runs only those rows.
soak: build
	cargo bench -p cluster-tests --bench soak

clean: stop
	rm -rf $(DATA)
