//! Sequencer throughput: `cargo bench -p sequencer` (or `make bench-seq`).
//!
//! Starts the release binary on a free port in a temp dir and drives it from this process over
//! loopback: 1 connection pipelined and 64 connections, with `NEXT` and `NEXT 100`. Prints
//! requests/s, timestamps/s and per-request latency. Client and server share the machine's two
//! cores, so compare rows of one run rather than runs across machines.

use protocol::{Client, Response};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECONDS: f64 = 3.0;

struct Row {
    name: String,
    requests: u64,
    timestamps: u64,
    elapsed: f64,
    lat_us: Vec<u32>,
}

async fn drive(
    addr: SocketAddr,
    conns: usize,
    depth: usize,
    block: u64,
) -> (u64, u64, Vec<u32>, f64) {
    let line = if block == 1 {
        "NEXT".to_string()
    } else {
        format!("NEXT {block}")
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(SECONDS);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let line = line.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.expect("connect");
                let mut sent = std::collections::VecDeque::new();
                let mut lat = Vec::new();
                let (mut reqs, mut ts) = (0u64, 0u64);
                loop {
                    let now = Instant::now();
                    if now < deadline {
                        while sent.len() < depth {
                            c.send(line.as_bytes());
                            sent.push_back(now);
                        }
                    } else if sent.is_empty() {
                        break;
                    }
                    match c.recv().await.expect("reply") {
                        Response::Ts { count, .. } => {
                            reqs += 1;
                            ts += count.unwrap_or(1);
                        }
                        r => panic!("{r:?}"),
                    }
                    let t0 = sent.pop_front().expect("a request in flight");
                    lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                (reqs, ts, lat)
            })
        })
        .collect();
    let (mut reqs, mut ts, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (r, n, l) = t.await.expect("client task");
        reqs += r;
        ts += n;
        lat.extend(l);
    }
    (reqs, ts, lat, start.elapsed().as_secs_f64())
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut server = Command::new(env!("CARGO_BIN_EXE_sequencer"))
        .args(["--listen", &addr.to_string(), "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning sequencer");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let ready = Instant::now();
            while Client::connect(addr).await.is_err() {
                assert!(
                    ready.elapsed() < Duration::from_secs(10),
                    "sequencer did not start"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut rows = Vec::new();
            for (name, conns, depth, block) in [
                ("1 conn, pipeline 64, NEXT", 1, 64, 1),
                ("1 conn, pipeline 64, NEXT 100", 1, 64, 100),
                ("64 conns, 1 in flight, NEXT", 64, 1, 1),
                ("64 conns, 1 in flight, NEXT 100", 64, 1, 100),
                ("64 conns, pipeline 16, NEXT", 64, 16, 1),
                ("64 conns, pipeline 16, NEXT 100", 64, 16, 100),
            ] {
                let (requests, timestamps, mut lat_us, elapsed) =
                    drive(addr, conns, depth, block).await;
                lat_us.sort_unstable();
                rows.push(Row {
                    name: name.to_string(),
                    requests,
                    timestamps,
                    elapsed,
                    lat_us,
                });
            }
            rows
        })
    }));
    let _ = server.kill();
    let _ = server.wait();
    let rows = match result {
        Ok(rows) => rows,
        Err(p) => std::panic::resume_unwind(p),
    };
    println!("\nsequencer throughput ({SECONDS} s per row, client and server on this machine)\n");
    println!("| workload | requests/s | timestamps/s | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.0} | {} | {} |",
            r.name,
            r.requests as f64 / r.elapsed,
            r.timestamps as f64 / r.elapsed,
            pct(&r.lat_us, 0.50),
            pct(&r.lat_us, 0.99)
        );
    }
}
