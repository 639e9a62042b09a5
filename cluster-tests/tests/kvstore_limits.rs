//! The kvstore's session limits as a process (issue #18): a transaction aborted under the
//! client stays aborted until the client ends it, writes over `--max-txn-bytes` or the
//! server-wide buffer budget are refused, blank lines are not activity, old snapshots are
//! aborted so GC progresses, and SCAN streams to a slow reader without holding up others.
//! Every limit is set small through its flag so the tests stay fast.

use bytes::Bytes;
use cluster_tests::{wait_until, System};
use protocol::{Client, CommitOutcome, ErrorCode, Response};
use std::net::SocketAddr;
use std::time::Duration;

/// A field of the kvstore's STATUS.
async fn stat(addr: SocketAddr, field: &str) -> u64 {
    cluster_tests::status(addr)
        .await
        .and_then(|s| s.get(field)?.parse().ok())
        .unwrap_or_else(|| panic!("STATUS has no {field}"))
}

async fn wait_stat(addr: SocketAddr, field: &str, what: &str, cond: impl Fn(u64) -> bool + Copy) {
    wait_until(Duration::from_secs(20), what, || async move {
        cond(stat(addr, field).await)
    })
    .await;
}

/// Asserts `r` is `ERR NO_TXN current transaction is aborted (<reason>...`.
fn assert_aborted_state(r: &Response, reason: &str) {
    match r {
        Response::Err(e) => {
            assert_eq!(e.code, ErrorCode::NoTxn, "{e}");
            assert!(
                e.message
                    .starts_with(&format!("current transaction is aborted ({reason}:")),
                "{e}"
            );
            assert!(e.message.ends_with("end it with COMMIT or ABORT"), "{e}");
        }
        r => panic!("expected the aborted state, got {r:?}"),
    }
}

fn assert_err(r: &Response, code: ErrorCode, contains: &str) {
    match r {
        Response::Err(e) => {
            assert_eq!(e.code, code, "{e}");
            assert!(e.message.contains(contains), "{e}");
        }
        r => panic!("expected ERR {code}, got {r:?}"),
    }
}

/// The repro of issue #18 item 3: BEGIN, idle past the timeout, then a pipelined PUT, PUT, PUT,
/// COMMIT. It once answered ERR, OK, OK, ERR and committed the last two as autocommit writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_transaction_after_an_idle_timeout_writes_nothing() {
    let sys = System::start(&["--txn-timeout-secs", "1"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.begin().await.unwrap();
    wait_stat(
        sys.kv_addr,
        "open_txns",
        "the idle transaction to time out",
        |n| n == 0,
    )
    .await;
    for line in ["PUT ta 1", "PUT tb 2", "PUT tc 3", "COMMIT"] {
        c.send(line.as_bytes());
    }
    c.flush().await.unwrap();
    for _ in 0..3 {
        assert_aborted_state(&c.recv().await.unwrap(), "TIMEOUT");
    }
    assert_eq!(
        c.recv().await.unwrap(),
        Response::Aborted(vec![Bytes::from("TIMEOUT")])
    );
    let mut other = Client::connect(sys.kv_addr).await.unwrap();
    for k in ["ta", "tb", "tc"] {
        assert_eq!(other.get(k).await.unwrap(), None, "{k} was written");
    }
    // COMMIT ended the aborted block: the session works as usual again.
    c.put("after", "1").await.unwrap();
    assert_eq!(c.get("after").await.unwrap(), Some(Bytes::from("1")));
    // ABORT ends it too, and BEGIN is refused until then.
    c.begin().await.unwrap();
    wait_stat(
        sys.kv_addr,
        "open_txns",
        "the second transaction to time out",
        |n| n == 0,
    )
    .await;
    assert_aborted_state(&c.call(b"BEGIN").await.unwrap(), "TIMEOUT");
    assert_aborted_state(&c.call(b"PING").await.unwrap(), "TIMEOUT");
    assert_eq!(c.call(b"ABORT").await.unwrap(), Response::ok());
    assert_eq!(c.call(b"ABORT").await.unwrap(), {
        Response::err(ErrorCode::NoTxn, "no transaction is open")
    });
}

/// Blank lines (and lines that are not commands) do not keep a transaction alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_kept_alive_by_blank_lines_times_out() {
    let sys = System::start(&["--txn-timeout-secs", "1"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.begin().await.unwrap();
    c.put("kept", "v").await.unwrap();
    let addr = sys.kv_addr;
    let mut ticks = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // A blank line every 200 ms, five per timeout, until the transaction is gone.
    while stat(addr, "open_txns").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "blank lines kept the transaction open"
        );
        c.send(b"");
        c.send(b"   ");
        c.flush().await.unwrap();
        ticks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ticks >= 2, "timed out before any blank line was sent");
    assert_eq!(
        c.commit().await.unwrap(),
        CommitOutcome::Aborted(vec![Bytes::from("TIMEOUT")])
    );
    assert_eq!(c.get("kept").await.unwrap(), None);
}

/// A snapshot past `--max-snapshot-age-secs` is aborted (`TOO_OLD`) whether its session is
/// busy or idle, so the GC watermark moves on and old versions are freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_the_age_limit_is_aborted_even_while_active() {
    let sys = System::start(&["--max-snapshot-age-secs", "1", "--txn-timeout-secs", "600"]).await;
    let addr = sys.kv_addr;
    // An idle transaction pins the watermark while another client rewrites one key.
    let mut idle = Client::connect(addr).await.unwrap();
    idle.begin().await.unwrap();
    let mut w = Client::connect(addr).await.unwrap();
    for i in 0..50 {
        w.put("hot", i.to_string()).await.unwrap();
    }
    // An active transaction, reading all the time.
    let mut busy = Client::connect(addr).await.unwrap();
    busy.begin().await.unwrap();
    busy.put("mine", "v").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an active transaction never got too old"
        );
        match busy.call(b"GET mine").await.unwrap() {
            Response::Value(v) => assert_eq!(v, "v"),
            r => break r,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_aborted_state(&refused, "TOO_OLD");
    assert_eq!(
        busy.commit().await.unwrap(),
        CommitOutcome::Aborted(vec![Bytes::from("TOO_OLD")])
    );
    assert_eq!(w.get("mine").await.unwrap(), None);
    // The idle one went too, on its own deadline: GC then frees the 49 old versions.
    wait_stat(
        addr,
        "open_txns",
        "the idle old snapshot to be aborted",
        |n| n == 0,
    )
    .await;
    wait_stat(addr, "versions", "GC to free the old versions", |n| n <= 3).await;
    assert_eq!(
        idle.commit().await.unwrap(),
        CommitOutcome::Aborted(vec![Bytes::from("TOO_OLD")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_max_txn_bytes_is_refused_and_aborts_its_transaction() {
    let sys = System::start(&["--max-txn-bytes", "1000"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    // Autocommit: key + value + 16 over the limit is refused, at the limit is fine.
    let r = c
        .call(format!("PUT k {}", "x".repeat(984)).as_bytes())
        .await
        .unwrap();
    assert_err(&r, ErrorCode::TooLarge, "1001 bytes");
    assert_err(&r, ErrorCode::TooLarge, "--max-txn-bytes");
    assert_eq!(c.get("k").await.unwrap(), None);
    c.put("k", "x".repeat(983)).await.unwrap();
    // In a transaction: a key rewritten counts once, at its last value.
    c.begin().await.unwrap();
    c.put("a", "y".repeat(500)).await.unwrap();
    c.put("a", "z".repeat(500)).await.unwrap();
    c.del("b").await.unwrap();
    // Each write counts 16 bytes besides its key and value: 517 + 17 + 466 = 1000 still fits;
    // one more write does not.
    c.put("c", "w".repeat(449)).await.unwrap();
    c.send(b"PUT d 1");
    // Pipelined after the refused write: none of these may run as autocommit.
    c.send(b"PUT e 1");
    c.send(b"DEL k");
    c.send(b"COMMIT");
    c.flush().await.unwrap();
    assert_err(
        &c.recv().await.unwrap(),
        ErrorCode::TooLarge,
        "would total 1018 bytes",
    );
    assert_aborted_state(&c.recv().await.unwrap(), "TOO_LARGE");
    assert_aborted_state(&c.recv().await.unwrap(), "TOO_LARGE");
    assert_eq!(
        c.recv().await.unwrap(),
        Response::Aborted(vec![Bytes::from("TOO_LARGE")])
    );
    for k in ["a", "c", "d", "e"] {
        assert_eq!(c.get(k).await.unwrap(), None, "{k}");
    }
    assert_eq!(c.get("k").await.unwrap().map(|v| v.len()), Some(983));
}

/// A line over `--max-line` (or a key over its limit) inside a transaction is a refused write
/// too: it aborts the transaction, so a pipelined COMMIT cannot commit the writes around it.
/// It once answered ERR TOO_LARGE and then COMMITTED the other writes without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_put_line_in_a_transaction_aborts_it() {
    let sys = System::start(&["--max-line", "1000"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    for (i, bad) in [
        format!("PUT lb {}", "x".repeat(1000)),
        format!("PUT {} 1", "k".repeat(1025)),
    ]
    .iter()
    .enumerate()
    {
        c.begin().await.unwrap();
        for line in ["PUT la 1", bad.as_str(), "PUT lc 3", "COMMIT"] {
            c.send(line.as_bytes());
        }
        c.flush().await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Response::ok(), "case {i}");
        assert_err(
            &c.recv().await.unwrap(),
            ErrorCode::TooLarge,
            "the transaction is aborted",
        );
        assert_aborted_state(&c.recv().await.unwrap(), "TOO_LARGE");
        assert_eq!(
            c.recv().await.unwrap(),
            Response::Aborted(vec![Bytes::from("TOO_LARGE")]),
            "case {i}"
        );
        for k in ["la", "lb", "lc"] {
            assert_eq!(c.get(k).await.unwrap(), None, "case {i}: {k} was written");
        }
    }
    // Outside a transaction an over-long line is refused and nothing else changes.
    let r = c
        .call(format!("PUT lb {}", "x".repeat(1000)).as_bytes())
        .await
        .unwrap();
    assert_err(&r, ErrorCode::TooLarge, "line exceeds 1000 bytes");
    c.put("la", "1").await.unwrap();
    assert_eq!(c.get("la").await.unwrap(), Some(Bytes::from("1")));
}

/// A client pipelining autocommit writes without pause holds at most `--max-txn-bytes` of the
/// shared budget, so other clients' transactions still get theirs. It once took the whole
/// budget, and every other client's transaction write answered ERR UNAVAILABLE and aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_cannot_take_the_whole_write_budget() {
    let sys = System::start(&["--max-txn-bytes", "1000", "--max-buffered-mib", "1"]).await;
    let addr = sys.kv_addr;
    let mut loader = Client::connect(addr).await.unwrap();
    // 2,000 writes of 900 bytes (1.8 MB, over the whole budget), sent at once, never read.
    let v = "x".repeat(900);
    for i in 0..2000 {
        loader.send(format!("PUT p{i} {v}").as_bytes());
    }
    loader.flush().await.unwrap();
    wait_stat(addr, "commits", "the loader's writes to commit", |n| {
        n >= 20
    })
    .await;
    let mut c = Client::connect(addr).await.unwrap();
    for i in 0..20 {
        c.begin().await.unwrap();
        let r = c
            .call(format!("PUT t{i} {}", "y".repeat(900)).as_bytes())
            .await
            .unwrap();
        assert_eq!(r, Response::ok(), "transaction {i}");
        let held = stat(addr, "buffered_bytes").await;
        assert!(held <= 2 * 1000, "{held} bytes buffered by two sessions");
        assert!(matches!(
            c.commit().await.unwrap(),
            CommitOutcome::Committed(_)
        ));
    }
    assert!(
        stat(addr, "commits").await < 2000 + 20,
        "the loader finished before the transactions ran: the test proved nothing"
    );
}

/// All sessions' buffered writes share `--max-buffered-mib`; a write past it is refused with
/// ERR UNAVAILABLE and aborts its transaction, and the budget comes back when a transaction
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffered_write_budget_is_shared_by_all_connections() {
    let sys = System::start(&["--max-buffered-mib", "1"]).await;
    let addr = sys.kv_addr;
    let big = "v".repeat(600_000);
    let mut a = Client::connect(addr).await.unwrap();
    let mut b = Client::connect(addr).await.unwrap();
    a.begin().await.unwrap();
    a.put("a", big.clone()).await.unwrap();
    assert_eq!(stat(addr, "buffered_bytes").await, 600_017);
    // An autocommit write with nothing of its own in flight is refused outright...
    let mut c = Client::connect(addr).await.unwrap();
    let r = c.call(format!("PUT c {big}").as_bytes()).await.unwrap();
    assert_err(&r, ErrorCode::Unavailable, "--max-buffered-mib");
    b.begin().await.unwrap();
    b.put("small", "1").await.unwrap();
    let r = b.call(format!("PUT b {big}").as_bytes()).await.unwrap();
    assert_err(&r, ErrorCode::Unavailable, "--max-buffered-mib");
    assert_aborted_state(&b.call(b"GET small").await.unwrap(), "UNAVAILABLE");
    assert_eq!(
        b.commit().await.unwrap(),
        CommitOutcome::Aborted(vec![Bytes::from("UNAVAILABLE")])
    );
    assert_eq!(
        stat(addr, "buffered_bytes").await,
        600_017,
        "b's aborted transaction gave its share back"
    );
    // a commits, which frees its share; then b fits.
    assert!(matches!(
        a.commit().await.unwrap(),
        CommitOutcome::Committed(_)
    ));
    assert_eq!(stat(addr, "buffered_bytes").await, 0);
    b.begin().await.unwrap();
    b.put("b", big.clone()).await.unwrap();
    assert!(matches!(
        b.commit().await.unwrap(),
        CommitOutcome::Committed(_)
    ));
    assert_eq!(a.get("a").await.unwrap().map(|v| v.len()), Some(600_000));
    assert_eq!(a.get("b").await.unwrap().map(|v| v.len()), Some(600_000));
    assert_eq!(a.get("small").await.unwrap(), None);
    // ...while one that pipelines many waits for its own writes in the log instead: 10 x 600 KB
    // through a 1 MiB budget all succeed.
    for i in 0..10 {
        c.send(format!("PUT c{i} {big}").as_bytes());
    }
    c.flush().await.unwrap();
    for _ in 0..10 {
        assert_eq!(c.recv().await.unwrap(), Response::ok());
    }
    assert_eq!(c.get("c9").await.unwrap().map(|v| v.len()), Some(600_000));
    assert_eq!(stat(addr, "buffered_bytes").await, 0);
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Writes `n` keys `scan00000`.. of 8 KiB each (32 MB for 4,000), pipelined 500 at a time.
/// Returns the value written.
async fn load_scan_keys(addr: std::net::SocketAddr, n: usize) -> String {
    let value = "s".repeat(8 * 1024);
    let mut w = Client::connect(addr).await.unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        for i in chunk {
            w.send(format!("PUT scan{i:05} {value}").as_bytes());
        }
        w.flush().await.unwrap();
        for _ in chunk {
            assert_eq!(w.recv().await.unwrap(), Response::ok());
        }
    }
    value
}

/// SCAN streams: a client that asks for a 32 MB range and never reads holds its snapshot
/// (the scan is under way, not materialised), adds far less than the result to the server's
/// memory, does not keep other clients from being answered, and once its snapshot is older
/// than the age limit gets the rows sent so far and then one ERR line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_to_a_reader_that_never_reads_streams_and_holds_up_no_one() {
    let sys = System::start(&["--max-snapshot-age-secs", "4"]).await;
    let addr = sys.kv_addr;
    let pid = sys.kv.as_ref().and_then(|p| p.pid()).expect("kvstore pid");
    let n = 4000usize;
    let value = load_scan_keys(addr, n).await;
    let before = rss_bytes(pid);
    let mut reader = Client::connect(addr).await.unwrap();
    reader.send(b"SCAN scan scan~");
    reader.flush().await.unwrap();
    // The scan's snapshot stays registered while it streams to a reader that does not read.
    wait_stat(addr, "open_txns", "the scan to be under way", |n| n == 1).await;
    let mut other = Client::connect(addr).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        other.ping().await.unwrap();
        other.put("other", "1").await.unwrap();
        assert_eq!(
            other.get("scan00007").await.unwrap().map(|v| v.len()),
            Some(value.len())
        );
        other
            .scan("scan0000", "scan0001", None)
            .await
            .unwrap()
            .len()
    })
    .await
    .expect("another client was held up by the blocked scan");
    assert_eq!(answered, 10);
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "the server grew by {grown} bytes for a blocked 32 MB scan"
    );
    // Past the age limit the blocked scan lets go of its snapshot...
    wait_stat(addr, "open_txns", "the blocked scan to be too old", |n| {
        n == 0
    })
    .await;
    // ...and its reader gets the rows sent so far, in order, then one ERR line.
    let mut rows = 0usize;
    let last = loop {
        match reader.recv().await.unwrap() {
            Response::Kv(k, v) => {
                assert_eq!(k, format!("scan{rows:05}"));
                assert_eq!(v.len(), value.len());
                rows += 1;
            }
            r => break r,
        }
    };
    assert!(
        rows < n,
        "all {rows} rows were sent to a reader that did not read"
    );
    assert_err(
        &last,
        ErrorCode::Unavailable,
        &format!("SCAN stopped after {rows} rows"),
    );
    assert_err(&last, ErrorCode::Unavailable, "--max-snapshot-age-secs");
    // The connection is fine, and a scan that is read completes.
    reader.ping().await.unwrap();
    let all = reader.scan("scan", "scan~", Some(300)).await.unwrap();
    assert_eq!(all.len(), 300);
}

/// A transaction's idle time counts from when its last reply was sent: a SCAN that streams to a
/// slow reader for longer than `--txn-timeout-secs` is activity. Its transaction was once
/// aborted (TIMEOUT) the moment the scan ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_longer_than_the_idle_timeout_does_not_time_its_transaction_out() {
    let sys = System::start(&["--txn-timeout-secs", "1", "--max-snapshot-age-secs", "600"]).await;
    let addr = sys.kv_addr;
    let n = 4000usize;
    let value = load_scan_keys(addr, n).await;
    let mut reader = Client::connect(addr).await.unwrap();
    reader.begin().await.unwrap();
    reader.send(b"SCAN scan scan~");
    reader.flush().await.unwrap();
    // A slow reader: 32 MB cannot sit in the socket buffers, so the scan streams for longer
    // than the idle timeout while the reader waits (this wait is the behaviour under test).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut rows = 0usize;
    loop {
        match reader.recv().await.unwrap() {
            Response::Kv(..) => rows += 1,
            Response::End => break,
            r => panic!("after {rows} rows: {r:?}"),
        }
    }
    assert_eq!(rows, n);
    assert_eq!(
        reader.get("scan00001").await.unwrap().map(|v| v.len()),
        Some(value.len()),
        "the transaction was aborted right after its scan"
    );
    reader.put("after-scan", "1").await.unwrap();
    assert!(matches!(
        reader.commit().await.unwrap(),
        CommitOutcome::Committed(_)
    ));
}

/// A transaction open when a newer kvstore takes over is aborted under its client: it could
/// only ever read stale data and never commit. (Its reads once went on from the old state.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_when_the_kvstore_is_fenced_is_aborted() {
    let mut sys = System::start(&[]).await;
    let old = sys.kv_addr;
    let mut c = Client::connect(old).await.unwrap();
    c.put("k", "1").await.unwrap();
    c.begin().await.unwrap();
    c.put("mine", "v").await.unwrap();
    let _newer = sys
        .spawn_kv(cluster_tests::local(cluster_tests::free_port()))
        .await;
    wait_until(
        Duration::from_secs(20),
        "the old kvstore to fence",
        || async move {
            cluster_tests::status(old)
                .await
                .is_some_and(|s| s.get("state").map(String::as_str) == Some("fenced"))
        },
    )
    .await;
    for line in ["GET k", "PUT x 1", "COMMIT"] {
        c.send(line.as_bytes());
    }
    c.flush().await.unwrap();
    assert_aborted_state(&c.recv().await.unwrap(), "FENCED");
    assert_aborted_state(&c.recv().await.unwrap(), "FENCED");
    assert_eq!(
        c.recv().await.unwrap(),
        Response::Aborted(vec![Bytes::from("FENCED")])
    );
    // Outside a transaction the fenced kvstore answers ERR FENCED as before.
    assert_err(
        &c.call(b"GET k").await.unwrap(),
        ErrorCode::Fenced,
        "replaced",
    );
    // A BEGIN that fails opens an aborted block: the writes pipelined behind it are refused
    // as part of it, never run as autocommit writes, until the client ends it.
    for line in ["BEGIN", "PUT x 1", "COMMIT", "ABORT"] {
        c.send(line.as_bytes());
    }
    c.flush().await.unwrap();
    assert_err(
        &c.recv().await.unwrap(),
        ErrorCode::Fenced,
        "end it with ABORT",
    );
    assert_aborted_state(&c.recv().await.unwrap(), "FENCED");
    assert_eq!(
        c.recv().await.unwrap(),
        Response::Aborted(vec![Bytes::from("FENCED")])
    );
    assert_err(&c.recv().await.unwrap(), ErrorCode::NoTxn, "no transaction");
}
