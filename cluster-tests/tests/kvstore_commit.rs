//! The kvstore's commit path against a log that refuses its entries or cannot take them (issue
//! #18): an entry over the log's line limit fails alone and is never retried (item 1), a log
//! without a majority gets commits answered `ERR UNAVAILABLE` within `--commit-timeout-secs`
//! while reads go on (item 4), a recovery that retries counts each commit once (item 17), and
//! one that cannot succeed (a sequencer behind the log) stops the process with its reason (#13).

use bytes::Bytes;
use cluster_tests::{bin, wait_serving, wait_until, LogCluster, Proc, System};
use protocol::{Client, CommitOutcome, ErrorCode, Response};
use std::time::Duration;

/// Long enough for anything that is not a hang.
const GENEROUS: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GENEROUS, fut)
        .await
        .unwrap_or_else(|_| panic!("no answer within {GENEROUS:?}: {what}"))
}

fn err_code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Err(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_over_the_logs_line_limit_fails_alone_and_the_next_ones_commit() {
    // The log takes lines of 64 KiB at most; the kvstore takes values up to its own 1 MiB line.
    let log = LogCluster::start(&["--max-line", "65536"]).await;
    let mut sys = System::assemble(log, &[]).await;
    sys.start_kv().await;
    let big = "x".repeat(100_000);

    // Pipelined autocommit writes around one too large for the log: small ones before and
    // after it may share its entry, and must still commit.
    let mut p = Client::connect(sys.kv_addr).await.unwrap();
    for i in 0..50 {
        p.send(format!("PUT before{i:02} v{i}").as_bytes());
    }
    p.send(format!("PUT big {big}").as_bytes());
    for i in 0..50 {
        p.send(format!("PUT after{i:02} v{i}").as_bytes());
    }
    p.flush().await.unwrap();
    for i in 0..50 {
        let r = within("a pipelined PUT", p.recv()).await.unwrap();
        assert_eq!(r, Response::ok(), "before{i:02}");
    }
    let r = within("the PUT too large for the log", p.recv())
        .await
        .unwrap();
    assert_eq!(err_code(&r), Some(ErrorCode::TooLarge), "{r:?}");
    for i in 0..50 {
        let r = within("a pipelined PUT", p.recv()).await.unwrap();
        assert_eq!(r, Response::ok(), "after{i:02}");
    }

    // A transaction too large for the log is aborted, as a whole.
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.begin().await.unwrap();
    c.put("txsmall", "v").await.unwrap();
    c.put("txbig", big.clone()).await.unwrap();
    let outcome = within("COMMIT of a transaction too large for the log", c.commit())
        .await
        .unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Aborted(vec![Bytes::from_static(b"TOO_LARGE")])
    );
    // The next commit goes through at once.
    within("a PUT after the refusals", c.put("next", "fine"))
        .await
        .unwrap();
    expect_after_refusals(&mut c).await;
    drop(c);

    // Replay from the log agrees: nothing of the refused entries is in it.
    sys.restart_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    expect_after_refusals(&mut c).await;
    within("a PUT after the restart", c.put("later", "ok"))
        .await
        .unwrap();
}

async fn expect_after_refusals(c: &mut Client) {
    assert_eq!(c.get("next").await.unwrap(), Some(Bytes::from("fine")));
    assert_eq!(c.get("before00").await.unwrap(), Some(Bytes::from("v0")));
    assert_eq!(c.get("after49").await.unwrap(), Some(Bytes::from("v49")));
    for gone in ["big", "txbig", "txsmall"] {
        assert_eq!(c.get(gone).await.unwrap(), None, "{gone}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_log_majority_commits_are_answered_unavailable_and_reads_go_on() {
    // The leader stays, both followers go: it takes appends and never answers them.
    lose_the_log_majority(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_log_leader_and_a_follower_gone_commits_are_answered_unavailable() {
    // One follower stays: it redirects to a dead leader, then answers that there is none.
    lose_the_log_majority(true).await;
}

async fn lose_the_log_majority(with_the_leader: bool) {
    // One entry in flight at a time, so that writes queued behind the COMMIT never reach the
    // log and the "not made" answer is exercised (with more in flight some would be sent).
    let mut sys = System::start(&["--commit-timeout-secs", "2", "--log-pipeline", "1"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.put("before", "1").await.unwrap();

    let leader = sys.log.wait_for_leader().await;
    let lost: Vec<usize> = if with_the_leader {
        vec![leader, (leader + 1) % 3]
    } else {
        (0..3).filter(|&i| i != leader).collect()
    };
    for &i in &lost {
        sys.log.kill9(i);
    }

    // A transactional COMMIT: ERR UNAVAILABLE, outcome unknown.
    c.begin().await.unwrap();
    c.put("tx", "new").await.unwrap();
    c.send(b"COMMIT");
    c.flush().await.unwrap();
    let r = within("COMMIT with no log majority", c.recv())
        .await
        .unwrap();
    match &r {
        Response::Err(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{r:?}");
            assert!(e.message.starts_with("commit outcome unknown"), "{r:?}");
        }
        r => panic!("{r:?}"),
    }
    // Pipelined autocommit writes queued behind it: each answered, none acknowledged.
    let mut p = Client::connect(sys.kv_addr).await.unwrap();
    for i in 0..20 {
        p.send(format!("PUT queued{i:02} v").as_bytes());
    }
    p.flush().await.unwrap();
    // Those that went to the log are "outcome unknown"; those that never left the queue are
    // "not made", and must never be applied.
    let mut not_made = Vec::new();
    for i in 0..20 {
        let r = within("a pipelined PUT with no log majority", p.recv())
            .await
            .unwrap();
        assert_eq!(
            err_code(&r),
            Some(ErrorCode::Unavailable),
            "queued{i:02}: {r:?}"
        );
        let Response::Err(e) = &r else { unreachable!() };
        if e.message.starts_with("commit not made") {
            not_made.push(i);
        } else {
            assert!(e.message.starts_with("commit outcome unknown"), "{r:?}");
        }
    }
    assert!(
        !not_made.is_empty(),
        "every queued write was sent to a log without a majority"
    );
    // Reads of data already applied go on meanwhile.
    assert_eq!(
        within("GET with no log majority", c.get("before"))
            .await
            .unwrap(),
        Some(Bytes::from("1"))
    );
    c.begin().await.unwrap();
    assert_eq!(c.get("before").await.unwrap(), Some(Bytes::from("1")));
    c.abort().await.unwrap();
    let rows = within("SCAN with no log majority", c.scan("b", "c", None))
        .await
        .unwrap();
    assert_eq!(rows, vec![(Bytes::from("before"), Bytes::from("1"))]);

    // The log is back: commits work again.
    for &i in &lost {
        sys.log.restart(i).await;
    }
    sys.log.wait_for_leader().await;
    let addr = sys.kv_addr;
    wait_until(GENEROUS, "a commit to succeed again", || async move {
        let mut c = Client::connect(addr).await.unwrap();
        c.put("after", "2").await.is_ok()
    })
    .await;
    assert_eq!(c.get("after").await.unwrap(), Some(Bytes::from("2")));
    // The writes that never left the queue were dropped, as they were told.
    for &i in &not_made {
        assert_eq!(c.get(format!("queued{i:02}")).await.unwrap(), None);
    }
    // The timed-out COMMIT went to the log: whatever the log decided, replay agrees with what
    // this kvstore applied.
    let tx = c.get("tx").await.unwrap();
    assert!(tx.is_none() || tx == Some(Bytes::from("new")), "{tx:?}");
    drop(c);
    drop(p);
    sys.restart_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    assert_eq!(c.get("tx").await.unwrap(), tx);
    assert_eq!(c.get("after").await.unwrap(), Some(Bytes::from("2")));
    assert_eq!(c.get("before").await.unwrap(), Some(Bytes::from("1")));
}

/// Sets the sequencer's reserved mark (it must be stopped).
fn reset_sequencer(sys: &System, mark: u64) {
    let out = std::process::Command::new(bin("sequencer"))
        .arg("--data-dir")
        .arg(&sys.seq.data_dir)
        .arg("--reset-to")
        .arg(mark.to_string())
        .output()
        .expect("run sequencer --reset-to");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_retries_counts_each_commit_once() {
    let mut sys = System::start(&[]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    for i in 0..5 {
        c.put(format!("k{i}"), "v").await.unwrap();
    }
    drop(c);
    sys.kill_kv();
    let last = sys.log.status(0).await.unwrap()["last"].parse().unwrap();
    for i in 0..3 {
        sys.log.wait_applied(i, last).await;
    }

    // One log replica left: every recovery loads and replays from it, then cannot append its
    // EPOCH without a majority, gives up and retries.
    sys.log.kill9(1);
    sys.log.kill9(2);
    let log = sys.log.dir.path().join("kvstore-retrying.log");
    let mut kv = Proc::spawn("kvstore", &sys.kv_args(sys.kv_addr), &log);
    let log_path = log.clone();
    wait_until(GENEROUS, "two failed recovery attempts", || {
        let log_path = log_path.clone();
        async move {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            text.matches("recovery failed, retrying").count() >= 2
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("replayed"), "{text}");

    // The majority is back; the next attempt succeeds.
    sys.log.restart(1).await;
    sys.log.restart(2).await;
    wait_serving(sys.kv_addr, &mut kv).await;
    let s = cluster_tests::status(sys.kv_addr).await.unwrap();
    assert_eq!(s["commits"], "5", "{s:?}");
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    assert_eq!(c.get("k4").await.unwrap(), Some(Bytes::from("v")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequencer_behind_the_log_stops_the_kvstore_with_a_message_naming_the_cause() {
    let mut sys = System::start(&[]).await;
    // Move the timestamps far up, so a sequencer that loses its state is behind the log.
    sys.kill_kv();
    sys.seq.proc_.kill9();
    reset_sequencer(&sys, 1_000_000_000);
    sys.seq.crash_and_restart().await;
    sys.start_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.put("k", "v").await.unwrap();
    drop(c);
    sys.kill_kv();

    // A sequencer that lost its state would hand out timestamps the log already used:
    // retrying cannot mend that, so the kvstore exits and says why.
    sys.seq.proc_.kill9();
    std::fs::remove_dir_all(&sys.seq.data_dir).unwrap();
    std::fs::create_dir_all(&sys.seq.data_dir).unwrap();
    sys.seq.crash_and_restart().await;
    let log = sys.log.dir.path().join("kvstore-behind.log");
    let mut kv = Proc::spawn("kvstore", &sys.kv_args(sys.kv_addr), &log);
    let status = kv.wait_exit(GENEROUS).expect("the kvstore exits");
    assert!(!status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let reason = text.lines().last().unwrap_or_default();
    assert!(
        reason.contains("the sequencer is behind the log") && reason.contains("--reset-to"),
        "{text}"
    );
    assert!(!text.contains("recovery failed, retrying"), "{text}");

    // Once the operator moves the sequencer past the log, a new kvstore serves the data.
    sys.seq.proc_.kill9();
    reset_sequencer(&sys, 2_000_000_000);
    sys.seq.crash_and_restart().await;
    sys.start_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from("v")));
}
