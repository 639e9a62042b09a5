//! Kvstore throughput and recovery: `make bench-kv`.
//!
//! Starts a whole system (3 log replicas, sequencer, kvstore; release binaries, temp dirs) and
//! measures, 3 s per row: autocommit PUT and GET, and a read-modify-write transaction (BEGIN,
//! GET a, GET b, PUT a, PUT b, COMMIT) over 10,000 keys with uniform and zipfian (s = 0.99)
//! key choice, at 1, 16 and 64 clients with one request in flight each (plus pipelined GETs).
//! Then loads 1,000,000 keys (16-byte keys, 100-byte values), reports the kvstore's memory per
//! key, kills it with SIGKILL and times the restart to serving (checkpoint load + replay).
//! Everything shares this machine's two cores: compare rows of one run.

use bytes::Bytes;
use cluster_tests::loadgen::{percentile as pct, Zipf};
use cluster_tests::System;
use protocol::{CommitOutcome, Response};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

const SECONDS: f64 = 3.0;
const KEYS: usize = 10_000;

#[derive(Clone, Copy)]
enum Work {
    Put,
    Get,
    Rmw {
        zipf: bool,
    },
    /// The same transaction in two round trips: `BEGIN`, `GET a`, `GET b` sent together, then
    /// `PUT a`, `PUT b`, `COMMIT` together (DKSP answers in order, so a client may pipeline).
    RmwPipelined {
        zipf: bool,
    },
}

struct RowResult {
    ops: usize,
    aborts: usize,
    lat: Vec<u32>,
    elapsed: f64,
}

async fn run(addr: std::net::SocketAddr, work: Work, clients: usize, depth: usize) -> RowResult {
    let zipf = std::sync::Arc::new(Zipf::new(KEYS as u64, 0.99));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(SECONDS);
    let tasks: Vec<_> = (0..clients)
        .map(|w| {
            let zipf = zipf.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
                let mut c = cluster_tests::Credentials::from_env()
                    .connect_any(&addr.to_string())
                    .await
                    .expect("connect");
                let (mut ops, mut aborts, mut lat) = (0usize, 0usize, Vec::new());
                match work {
                    Work::Put | Work::Get => {
                        let mut inflight = std::collections::VecDeque::new();
                        loop {
                            let now = Instant::now();
                            if now < deadline {
                                while inflight.len() < depth {
                                    let k = rng.gen_range(0..KEYS);
                                    let line = match work {
                                        Work::Put => format!("PUT key{k:07} value-{w}-{ops}"),
                                        _ => format!("GET key{k:07}"),
                                    };
                                    c.send(line.as_bytes());
                                    inflight.push_back(now);
                                }
                            } else if inflight.is_empty() {
                                break;
                            }
                            match c.recv().await.expect("reply") {
                                Response::Err(e) => panic!("{e}"),
                                _ => ops += 1,
                            }
                            let t0 = inflight.pop_front().expect("in flight");
                            lat.push(t0.elapsed().as_micros() as u32);
                        }
                    }
                    Work::Rmw { zipf: z } | Work::RmwPipelined { zipf: z } => {
                        let pipelined = matches!(work, Work::RmwPipelined { .. });
                        while Instant::now() < deadline {
                            let pick = |rng: &mut rand::rngs::StdRng| {
                                if z {
                                    zipf.sample(rng) as usize
                                } else {
                                    rng.gen_range(0..KEYS)
                                }
                            };
                            let (a, b) = (pick(&mut rng), pick(&mut rng));
                            let t0 = Instant::now();
                            let bump =
                                |v: Option<Bytes>| format!("{}x", v.map_or(0, |v| v.len() % 50));
                            if pipelined {
                                c.send(b"BEGIN");
                                c.send(format!("GET key{a:07}").as_bytes());
                                c.send(format!("GET key{b:07}").as_bytes());
                                c.flush().await.expect("send");
                                let mut vals = Vec::new();
                                for _ in 0..3 {
                                    match c.recv().await.expect("reply") {
                                        Response::Value(v) => vals.push(Some(v)),
                                        Response::Nil => vals.push(None),
                                        Response::Ok(_) => {}
                                        r => panic!("{r:?}"),
                                    }
                                }
                                let vb = vals.pop().flatten();
                                let va = vals.pop().flatten();
                                c.send(format!("PUT key{a:07} {}", bump(va)).as_bytes());
                                c.send(format!("PUT key{b:07} {}", bump(vb)).as_bytes());
                                c.send(b"COMMIT");
                                c.flush().await.expect("send");
                                for _ in 0..2 {
                                    c.recv().await.expect("put");
                                }
                                match c.recv().await.expect("commit") {
                                    Response::Committed(_) => ops += 1,
                                    Response::Aborted(_) => aborts += 1,
                                    r => panic!("{r:?}"),
                                }
                                lat.push(t0.elapsed().as_micros() as u32);
                                continue;
                            }
                            c.begin().await.expect("begin");
                            let va = c.get(format!("key{a:07}")).await.expect("get");
                            let vb = c.get(format!("key{b:07}")).await.expect("get");
                            c.put(format!("key{a:07}"), bump(va)).await.expect("put");
                            c.put(format!("key{b:07}"), bump(vb)).await.expect("put");
                            match c.commit().await.expect("commit") {
                                CommitOutcome::Committed(_) => ops += 1,
                                CommitOutcome::Aborted(_) => aborts += 1,
                            }
                            lat.push(t0.elapsed().as_micros() as u32);
                        }
                    }
                }
                (ops, aborts, lat)
            })
        })
        .collect();
    let mut r = RowResult {
        ops: 0,
        aborts: 0,
        lat: Vec::new(),
        elapsed: 0.0,
    };
    for t in tasks {
        let (o, a, l) = t.await.expect("client");
        r.ops += o;
        r.aborts += a;
        r.lat.extend(l);
    }
    r.elapsed = start.elapsed().as_secs_f64();
    r.lat.sort_unstable();
    r
}

/// CPU time (user + system) a process has used so far, in µs, from /proc/<pid>/stat.
fn cpu_us(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 of `rest`.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks * 1_000_000 / 100
}

/// CPU time used so far by the kvstore, the three log replicas together, and this process.
fn cpu_now(sys: &cluster_tests::System) -> [u64; 3] {
    let kv = sys.kv.as_ref().and_then(|p| p.pid()).map_or(0, cpu_us);
    let log = sys
        .log
        .replicas
        .iter()
        .filter_map(|r| r.proc_.as_ref()?.pid())
        .map(cpu_us)
        .sum();
    [kv, log, cpu_us(std::process::id())]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut sys = System::start(&[]).await;
        let addr = sys.kv_addr;
        // Preload the 10,000 keys so GETs find values.
        run(addr, Work::Put, 16, 32).await;
        println!("\nkvstore, 3 log replicas, {SECONDS} s per row, {KEYS} keys\n");
        // CPU columns: CPU time per completed operation (transaction, for RMW) in the kvstore,
        // in the three log replicas together, and in this load generator. Unlike ops/s they
        // barely move with the machine's noise, so they show what a change costs.
        println!("| workload | clients | in flight | ops/s | abort rate | p50 µs | p99 µs | kv CPU µs/op | log CPU µs/op | client CPU µs/op |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let rows: Vec<(&str, Work, usize, usize)> = vec![
            ("autocommit PUT", Work::Put, 1, 1),
            ("autocommit PUT", Work::Put, 16, 1),
            ("autocommit PUT", Work::Put, 64, 1),
            ("autocommit GET", Work::Get, 1, 1),
            ("autocommit GET", Work::Get, 16, 1),
            ("autocommit GET", Work::Get, 64, 1),
            ("autocommit GET", Work::Get, 64, 16),
            ("RMW txn, uniform", Work::Rmw { zipf: false }, 1, 1),
            ("RMW txn, uniform", Work::Rmw { zipf: false }, 16, 1),
            ("RMW txn, uniform", Work::Rmw { zipf: false }, 64, 1),
            ("RMW txn, zipfian", Work::Rmw { zipf: true }, 1, 1),
            ("RMW txn, zipfian", Work::Rmw { zipf: true }, 16, 1),
            ("RMW txn, zipfian", Work::Rmw { zipf: true }, 64, 1),
            ("RMW txn, 2 round trips, uniform", Work::RmwPipelined { zipf: false }, 16, 1),
            ("RMW txn, 2 round trips, uniform", Work::RmwPipelined { zipf: false }, 64, 1),
        ];
        // BENCH_KV_ROWS=put,rmw runs only the rows whose name contains one of the words.
        let only: Vec<String> = std::env::var("BENCH_KV_ROWS")
            .map(|s| s.split(',').map(|w| w.to_lowercase()).collect())
            .unwrap_or_default();
        for (name, work, clients, depth) in rows {
            let lname = name.to_lowercase();
            if !only.is_empty() && !only.iter().any(|w| lname.contains(w.as_str())) {
                continue;
            }
            let cpu0 = cpu_now(&sys);
            let r = run(addr, work, clients, depth).await;
            let cpu1 = cpu_now(&sys);
            let total = r.ops + r.aborts;
            let per_op = |i: usize| (cpu1[i] - cpu0[i]) as f64 / total.max(1) as f64;
            println!(
                "| {name} | {clients} | {depth} | {:.0} | {:.1}% | {} | {} | {:.1} | {:.1} | {:.1} |",
                r.ops as f64 / r.elapsed,
                if total > 0 { 100.0 * r.aborts as f64 / total as f64 } else { 0.0 },
                pct(&r.lat, 0.5),
                pct(&r.lat, 0.99),
                per_op(0),
                per_op(1),
                per_op(2)
            );
        }

        // 1M keys: memory per key, then restart time.
        let n: usize = std::env::var("BENCH_KV_KEYS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
        let value = "v".repeat(100);
        let load_start = Instant::now();
        let per = n / 16;
        let loaders: Vec<_> = (0..16)
            .map(|w| {
                let value = value.clone();
                tokio::spawn(async move {
                    let mut c = cluster_tests::Credentials::from_env().connect_any(&addr.to_string()).await.expect("connect");
                    let mut sent = 0;
                    let mut got = 0;
                    while got < per {
                        while sent < per && sent - got < 256 {
                            c.send(format!("PUT big:{:010} {value}", w * per + sent).as_bytes());
                            sent += 1;
                        }
                        match c.recv().await.expect("reply") {
                            Response::Ok(_) => got += 1,
                            r => panic!("{r:?}"),
                        }
                    }
                })
            })
            .collect();
        for l in loaders {
            l.await.expect("loader");
        }
        let load_s = load_start.elapsed().as_secs_f64();
        let pid = sys.kv.as_ref().and_then(|p| p.pid()).unwrap_or(0);
        // A checkpoint in flight holds a second copy of the data: measure the steady state.
        cluster_tests::wait_until(Duration::from_secs(60), "the checkpoint to finish", || async {
            cluster_tests::status(addr)
                .await
                .is_some_and(|s| s.get("checkpointing").map(String::as_str) == Some("0"))
        })
        .await;
        let st = cluster_tests::status(addr).await.unwrap_or_default();
        let keys: f64 = st.get("keys").and_then(|v| v.parse().ok()).unwrap_or(1.0);
        let rss = rss_kib(pid) as f64 * 1024.0;
        println!("\nloaded {n} keys (16-byte keys, 100-byte values) with pipelined PUTs in {load_s:.1} s ({:.0} PUT/s)", n as f64 / load_s);
        println!("kvstore RSS {:.0} MiB for {keys:.0} keys: {:.0} bytes per key", rss / 1048576.0, rss / keys);
        let killed = Instant::now();
        sys.restart_kv().await;
        let took = killed.elapsed();
        let log = std::fs::read_to_string(sys.log.dir.path().join("kvstore-2.log")).unwrap_or_default();
        let replay = log.lines().find(|l| l.contains("replayed")).unwrap_or("").to_string();
        let ckpt = log.lines().find(|l| l.contains("loaded checkpoint")).unwrap_or("(no checkpoint)").to_string();
        println!("kill -9 and restart: serving again {:.2} s after the kill", took.as_secs_f64());
        println!("  {}", ckpt.split("kvstore::engine::recovery: ").last().unwrap_or(""));
        println!("  {}", replay.split("kvstore::engine::recovery: ").last().unwrap_or(""));
    });
}
