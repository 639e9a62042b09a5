//! Storage faults of a log replica (issue #18): a replica that lost its vote file refuses to
//! start; a replica whose disk fills up exits (crash-only) while the other two keep serving, and
//! rejoins once restarted; checkpoint staging is bounded.

use bytes::Bytes;
use cluster_tests::LogCluster;
use protocol::{ErrorCode, LogClient, Response};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_log_entries_but_no_vote_file_refuses_to_start() {
    let mut c = LogCluster::start(&["--any-payload"]).await;
    let mut log = LogClient::new(c.addrs());
    for seq in 1..=20u64 {
        log.append(b"c", seq, b"x").await.unwrap();
    }
    c.wait_applied(2, 20).await;
    c.kill9(2);
    let vote = c.replicas[2].data_dir.join("raft").join("vote");
    std::fs::remove_file(&vote).unwrap();

    let log_path = c.dir.path().join("refused.log");
    let mut p = c.spawn_unready(2, false, &log_path);
    let status = p
        .wait_exit(Duration::from_secs(20))
        .expect("a replica without its vote file must not start");
    assert!(!status.success());
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("vote file is missing") && text.contains("refusing to start"),
        "log: {text}"
    );

    // The documented recovery: wipe it, and it rejoins as a new copy.
    c.wipe(2);
    c.restart(2).await;
    assert_eq!(log.append(b"c", 21, b"x").await.unwrap(), 21);
    c.wait_applied(2, 21).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_fills_exits_and_the_others_keep_serving_then_it_rejoins() {
    let mut c = LogCluster::new(&["--any-payload"]);
    c.replicas[2].extra = vec!["--fail-writes-after-bytes".into(), "65536".into()];
    c.launch().await;
    let mut log = LogClient::new(c.addrs());
    let value = vec![b'v'; 1000];
    let mut seq = 0u64;
    // Write until replica 3's (simulated) disk is full and it exits by itself.
    let exited = loop {
        seq += 1;
        log.append(b"c", seq, &value).await.unwrap();
        let p = c.replicas[2].proc_.as_mut().unwrap();
        if !p.running() {
            break p.wait_exit(Duration::from_secs(1)).unwrap();
        }
        assert!(
            seq < 100_000,
            "replica 3 never exited; log:\n{}",
            p.log_tail(20)
        );
    };
    assert!(!exited.success(), "exit status {exited:?}");
    let text = c.replicas[2].proc_.as_ref().unwrap().log_tail(50);
    assert!(
        text.contains("No space left on device") && text.contains("not left half alive"),
        "log:\n{text}"
    );
    c.replicas[2].proc_ = None;

    // The other two keep committing.
    for _ in 0..50 {
        seq += 1;
        log.append(b"c", seq, &value).await.unwrap();
    }

    // Space back: restarted without the hook, it rejoins and catches up.
    c.replicas[2].extra.clear();
    c.restart(2).await;
    seq += 1;
    let last = log.append(b"c", seq, &value).await.unwrap();
    c.wait_applied(2, last).await;

    // A deliberate stop (SIGTERM) also stops Raft, but is not reported as a failure.
    let mut p = c.replicas[2].proc_.take().unwrap();
    let stopped = p.terminate().unwrap();
    assert!(
        stopped.success(),
        "SIGTERM: {stopped:?}\n{}",
        p.log_tail(10)
    );
    assert!(!p.log_tail(10).contains("not left half alive"));
}

/// `CKPT_PUT id offset <n bytes of 'x'>` on the leader.
async fn put_chunk(log: &mut LogClient, id: u64, offset: u64, n: usize) -> Response {
    let req = protocol::log::Request::CkptPut {
        id,
        offset,
        data: Bytes::from(vec![b'x'; n]),
    };
    log.call_leader(&req.encode()).await.unwrap()
}

fn assert_err(r: &Response, code: ErrorCode) {
    match r {
        Response::Err(e) => assert_eq!(e.code, code, "{e:?}"),
        r => panic!("expected ERR {code:?}, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_upload_past_the_staging_limit_is_refused_and_a_new_upload_replaces_an_old_one(
) {
    let c = LogCluster::start(&["--any-payload", "--max-checkpoint-mib", "1"]).await;
    let mut log = LogClient::new(c.addrs());
    log.append(b"c", 1, b"x").await.unwrap();
    let staged = |n: u64| Response::Ok(vec![n.to_string().into()]);
    let chunk = 400_000;

    assert_eq!(put_chunk(&mut log, 1, 0, chunk).await, staged(400_000));
    assert_eq!(
        put_chunk(&mut log, 1, 400_000, chunk).await,
        staged(800_000)
    );
    // 1,200,000 > 1 MiB: refused, and nothing more is staged.
    let r = put_chunk(&mut log, 1, 800_000, chunk).await;
    assert_err(&r, ErrorCode::TooLarge);
    // An offset near 2^64 is refused too (no overflow).
    let r = put_chunk(&mut log, 1, u64::MAX - 10, 100).await;
    assert_err(&r, ErrorCode::TooLarge);
    // The upload is still at 800,000 and can finish within the limit.
    assert_eq!(
        put_chunk(&mut log, 1, 800_000, 200_000).await,
        staged(1_000_000)
    );

    // A new upload (offset 0) abandons the old one: its staged bytes are dropped.
    let ckpt = cluster_tests::kv_checkpoint(1, 1000);
    let req = protocol::log::Request::CkptPut {
        id: 2,
        offset: 0,
        data: Bytes::from(ckpt.clone()),
    };
    assert_eq!(
        log.call_leader(&req.encode()).await.unwrap(),
        staged(ckpt.len() as u64)
    );
    let r = put_chunk(&mut log, 1, 1_000_000, 1000).await;
    assert_err(&r, ErrorCode::Rejected);
    let req = protocol::log::Request::CkptCommit {
        id: 2,
        index: 1,
        len: ckpt.len() as u64,
        crc: crc32c::crc32c(&ckpt),
    };
    assert_eq!(
        log.call_leader(&req.encode()).await.unwrap(),
        Response::ok()
    );
}
