//! Logserver throughput, latency and failover: `make bench-log`.
//!
//! Starts a real 3-replica cluster (release binaries, temp dirs, free ports) and appends
//! 100-byte payloads from 1, 16 and 128 concurrent clients, each with one request in flight,
//! from 128 clients with four each, and from one pipelining client; then measures the time from `kill -9` of the leader to the first
//! acknowledged append. All replicas and the load share this machine's cores and disk, so
//! compare rows of one run.

use cluster_tests::loadgen::percentile as pct;
use cluster_tests::LogCluster;
use protocol::Response;
use std::time::{Duration, Instant};

const SECONDS: f64 = 5.0;

async fn run(leader: String, clients: usize, depth: usize) -> (f64, Vec<u32>) {
    let payload = "x".repeat(100);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(SECONDS);
    let tasks: Vec<_> = (0..clients)
        .map(|w| {
            let leader = leader.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let Ok(mut c) = cluster_tests::Credentials::from_env()
                    .connect_any(leader.as_str())
                    .await
                else {
                    return Vec::new();
                };
                let mut lat = Vec::new();
                let mut inflight = std::collections::VecDeque::new();
                let mut seq = 0u64;
                loop {
                    let now = Instant::now();
                    if now < deadline {
                        while inflight.len() < depth {
                            seq += 1;
                            c.send(format!("APPEND bench-{w} {seq} {payload}").as_bytes());
                            inflight.push_back(now);
                        }
                    } else if inflight.is_empty() {
                        break;
                    }
                    match c.recv().await {
                        Ok(Response::Ok(_)) => {}
                        // The failover rounds kill this server under the load: the replies
                        // turn into errors, redirects or a closed connection.
                        Ok(_) | Err(_) => break,
                    }
                    let Some(t0) = inflight.pop_front() else {
                        break;
                    };
                    lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client"));
    }
    (start.elapsed().as_secs_f64(), lat)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // BENCH_LOG_ARGS adds logserver flags, to compare settings in one place.
        let extra = std::env::var("BENCH_LOG_ARGS").unwrap_or_default();
        // The payloads are not kvstore records: the log alone is measured.
        let mut extra: Vec<&str> = extra.split_whitespace().collect();
        extra.push("--any-payload");
        let mut c = LogCluster::start(&extra).await;
        let leader = c.replicas[c.wait_for_leader().await].dksp.to_string();
        println!("\nlogserver appends, 100-byte payloads, 3 replicas, {SECONDS} s per row\n");
        println!("| clients | in flight each | appends/s | p50 µs | p99 µs |");
        println!("|---:|---:|---:|---:|---:|");
        for (clients, depth) in [(1, 1), (16, 1), (128, 1), (128, 4), (1, 256)] {
            let (elapsed, mut lat) = run(leader.clone(), clients, depth).await;
            lat.sort_unstable();
            println!(
                "| {clients} | {depth} | {:.0} | {} | {} |",
                lat.len() as f64 / elapsed,
                pct(&lat, 0.5),
                pct(&lat, 0.99)
            );
        }

        println!("\nfailover: kill -9 the leader under 16-client load, time to the next acknowledged append\n");
        for round in 1..=3 {
            let l = c.wait_for_leader().await;
            let load = tokio::spawn(run(c.replicas[l].dksp.to_string(), 16, 1));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut probe = c.log_client();
            probe.deadline = Duration::from_secs(30);
            let killed = Instant::now();
            c.kill9(l);
            let mut seq = 0;
            // The first append that any surviving leader acknowledges.
            loop {
                seq += 1;
                if probe.append(b"probe", seq + round * 1_000_000, b"p").await.is_ok() {
                    break;
                }
            }
            let took = killed.elapsed();
            println!("round {round}: first append acknowledged {:.0} ms after the kill", took.as_secs_f64() * 1000.0);
            load.abort();
            c.restart(l).await;
        }
    });
}
