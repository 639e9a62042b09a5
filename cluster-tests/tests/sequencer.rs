//! The sequencer as a process: its guarantees under SIGKILL, and its manners on the wire.

use bytes::Bytes;
use cluster_tests::{Proc, Sequencer};
use protocol::{Client, Response};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What one client connection saw: (first, count) per reply, in order.
type Stream = Vec<(u64, u64)>;

/// Drives NEXT / NEXT n with a pipeline until the connection drops, checking on the way that
/// each reply is above everything any client had seen complete before the request was sent.
async fn load(addr: std::net::SocketAddr, seed: u64, max_seen: Arc<AtomicU64>) -> Stream {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = Stream::new();
    let Ok(mut c) = Client::connect(addr).await else {
        return seen;
    };
    let depth = rng.gen_range(1..=8);
    let mut inflight = std::collections::VecDeque::new();
    loop {
        while inflight.len() < depth {
            let n = if rng.gen_bool(0.3) {
                rng.gen_range(1..=500)
            } else {
                1
            };
            let line = if n == 1 {
                "NEXT".to_string()
            } else {
                format!("NEXT {n}")
            };
            c.send(line.as_bytes());
            inflight.push_back((n, max_seen.load(Ordering::SeqCst)));
        }
        let reply = match c.recv().await {
            Ok(r) => r,
            Err(_) => return seen, // killed: replies in flight are unknown
        };
        let Some((n, floor)) = inflight.pop_front() else {
            unreachable!()
        };
        let (first, count) = match reply {
            Response::Ts { first, count } => (first, count.unwrap_or(1)),
            other => panic!("unexpected reply {other:?}"),
        };
        assert_eq!(count, n, "block size echoed");
        assert!(
            first > floor,
            "timestamp {first} not above {floor}, seen before it was asked for"
        );
        max_seen.fetch_max(first + count - 1, Ordering::SeqCst);
        seen.push((first, count));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sigkills_under_load_never_reissue_or_go_backwards() {
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (SEED={seed} reproduces the schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // A small window makes the reservation path run constantly, so kills land mid-persist too.
    let mut seq = Sequencer::start(dir.path(), &["--window", "2000"]).await;
    let max_seen = Arc::new(AtomicU64::new(0));
    let mut all: Vec<(u64, u64)> = Vec::new();
    let mut prev_incarnation_max = 0u64;
    for round in 0..50 {
        let clients: Vec<_> = (0..8)
            .map(|i| tokio::spawn(load(seq.addr, seed ^ (round * 64 + i), max_seen.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..60))).await;
        seq.proc_.kill9();
        let mut round_min = u64::MAX;
        let mut round_max = 0;
        for c in clients {
            let stream = c.await.expect("client task panicked");
            for w in stream.windows(2) {
                assert!(
                    w[1].0 >= w[0].0 + w[0].1,
                    "a connection saw time go backwards: {w:?}"
                );
            }
            for &(f, n) in &stream {
                round_min = round_min.min(f);
                round_max = round_max.max(f + n - 1);
            }
            all.extend(stream);
        }
        if round_min != u64::MAX {
            assert!(
                round_min > prev_incarnation_max,
                "round {round}: {round_min} handed out after {prev_incarnation_max} was, before the crash"
            );
            prev_incarnation_max = round_max;
        }
        seq.crash_and_restart().await;
        let mut c = Client::connect(seq.addr).await.unwrap();
        let current = c.current_ts().await.unwrap();
        assert!(
            current >= prev_incarnation_max,
            "CURRENT {current} below {prev_incarnation_max} after restart"
        );
    }
    // No timestamp handed out twice, across all incarnations.
    all.sort_unstable();
    for w in all.windows(2) {
        assert!(w[1].0 >= w[0].0 + w[0].1, "overlapping grants {w:?}");
    }
    let total: u64 = all.iter().map(|&(_, n)| n).sum();
    println!(
        "{} replies, {total} timestamps across 50 crashes",
        all.len()
    );
    assert!(
        all.len() > 500,
        "the load barely ran: {} replies",
        all.len()
    );
}

#[tokio::test]
async fn bad_input_gets_err_and_the_connection_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &["--max-line", "64"]).await;
    let mut c = Client::connect(seq.addr).await.unwrap();
    let big = vec![b'x'; 10_000];
    let cases: Vec<(&[u8], &str)> = vec![
        (b"FROB", "UNKNOWN_COMMAND"),
        (b"NEXT 0", "SYNTAX"),
        (b"NEXT -5", "SYNTAX"),
        (b"NEXT 1000001", "SYNTAX"),
        (b"NEXT \"unterminated", "SYNTAX"),
        (b"\xff\xfe\x00garbage", "SYNTAX"),
        (&big, "TOO_LARGE"),
    ];
    for (line, code) in cases {
        match c.call(line).await.unwrap() {
            Response::Err(e) => assert_eq!(
                e.code.as_str(),
                code,
                "for {:?}",
                String::from_utf8_lossy(&line[..line.len().min(20)])
            ),
            r => panic!("expected ERR {code}, got {r:?}"),
        }
        // Still usable, and still handing out fresh timestamps.
        assert!(c.next_ts().await.unwrap() > 0);
    }
    assert_eq!(c.call(b"ping").await.unwrap(), Response::Pong);
    assert_eq!(c.call(b"QUIT").await.unwrap(), Response::ok());
    assert!(c.recv().await.is_err(), "QUIT closes the connection");
}

#[tokio::test]
async fn pipelined_requests_answer_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &[]).await;
    let mut c = Client::connect(seq.addr).await.unwrap();
    for i in 0..10_000 {
        c.send(if i % 2 == 0 { b"NEXT" } else { b"NEXT 3" });
    }
    c.flush().await.unwrap();
    let mut last = 0;
    for i in 0..10_000 {
        match c.recv().await.unwrap() {
            Response::Ts { first, count } => {
                assert_eq!(count, if i % 2 == 0 { None } else { Some(3) });
                assert!(first > last);
                last = first + count.unwrap_or(1) - 1;
            }
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(c.current_ts().await.unwrap(), last);
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_stall_others() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &[]).await;
    // Flood requests without reading: its replies fill the socket buffers and its handler blocks.
    let mut hog = tokio::net::TcpStream::connect(seq.addr).await.unwrap();
    let flood = Bytes::from("NEXT\n".repeat(200_000));
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), hog.write_all(&flood)).await;
        hog
    });
    let mut c = Client::connect(seq.addr).await.unwrap();
    for _ in 0..100 {
        tokio::time::timeout(Duration::from_secs(5), c.next_ts())
            .await
            .expect("a well-behaved client was stalled")
            .unwrap();
    }
    drop(writer.await);
}

#[tokio::test]
async fn corrupt_state_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut seq = Sequencer::start(dir.path(), &[]).await;
    let mut c = Client::connect(seq.addr).await.unwrap();
    let t = c.next_ts().await.unwrap();
    seq.proc_.kill9();
    let state = dir.path().join("sequencer.state");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();

    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--data-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().display().to_string()])
        .collect();
    let mut p = Proc::spawn("sequencer", &args, &dir.path().join("refused.log"));
    let status = p.wait_exit(Duration::from_secs(20)).expect("should exit");
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("refused.log")).unwrap();
    assert!(
        log.contains("corrupt") && log.contains("refusing to start"),
        "log: {log}"
    );

    // The documented recovery: reset to a mark above anything issued, then start.
    let mut args_reset = args.clone();
    args_reset.extend(["--reset-to".to_string(), (t + 1_000_000_000).to_string()]);
    let mut p = Proc::spawn("sequencer", &args_reset, &dir.path().join("reset.log"));
    assert!(p.wait_exit(Duration::from_secs(20)).unwrap().success());
    drop(seq);
    let seq = Sequencer::start(dir.path(), &[]).await;
    let mut c = Client::connect(seq.addr).await.unwrap();
    assert!(c.next_ts().await.unwrap() > t + 1_000_000_000);
}

/// Runs `sequencer --reset-to <mark>` on `dir` and returns (success, its log).
fn reset_to(dir: &std::path::Path, mark: u64) -> (bool, String) {
    let log = dir.join(format!("reset-{mark}.log"));
    let args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--reset-to".into(),
        mark.to_string(),
    ];
    let mut p = Proc::spawn("sequencer", &args, &log);
    let ok = p.wait_exit(Duration::from_secs(20)).unwrap().success();
    (ok, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Asserts `NEXT` (or `NEXT n`) answers `ERR UNAVAILABLE` saying the timestamps are exhausted.
async fn assert_exhausted(c: &mut Client, line: &[u8]) {
    match c.call(line).await.unwrap() {
        Response::Err(e) => {
            assert_eq!(e.code.as_str(), "UNAVAILABLE");
            assert!(e.message.contains("exhausted"), "message: {}", e.message);
        }
        r => panic!("expected ERR UNAVAILABLE ... exhausted, got {r:?}"),
    }
}

#[tokio::test]
async fn the_sequencer_never_wraps_past_the_last_timestamp_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The repro: a mark of 2^64-1 leaves nothing to hand out, so it is refused.
    let (ok, log) = reset_to(dir.path(), u64::MAX);
    assert!(!ok, "--reset-to 2^64-1 must be refused; log: {log}");
    assert!(log.contains("exhausted"), "log: {log}");

    let (ok, log) = reset_to(dir.path(), u64::MAX - 3);
    assert!(ok, "log: {log}");
    let mut seq = Sequencer::start(dir.path(), &[]).await;
    let mut c = Client::connect(seq.addr).await.unwrap();
    assert_eq!(c.next_ts().await.unwrap(), u64::MAX - 2);
    // A block that would cross the end is refused whole, not handed out in part.
    assert_exhausted(&mut c, b"NEXT 3").await;
    assert_eq!(c.next_ts().await.unwrap(), u64::MAX - 1);
    assert_eq!(c.next_ts().await.unwrap(), u64::MAX);
    for _ in 0..3 {
        assert_exhausted(&mut c, b"NEXT").await;
    }
    // The connection stays fine.
    assert_eq!(c.call(b"PING").await.unwrap(), Response::Pong);

    seq.crash_and_restart().await;
    let mut c = Client::connect(seq.addr).await.unwrap();
    assert_exhausted(&mut c, b"NEXT").await;
    assert_exhausted(&mut c, b"NEXT 1").await;
    match c.call(b"CURRENT").await.unwrap() {
        Response::Ts { first, .. } => assert_eq!(first, u64::MAX),
        r => panic!("CURRENT: {r:?}"),
    }
}
