//! What the forged requests do now (#19 items 4 and 5), even from a cluster member.
//!
//! The logserver refuses what the kvstore could not read: an `APPEND` that is not kvstore
//! records, a `CKPT_COMMIT` of bytes that are not a kvstore checkpoint. A record that is well
//! formed but was written by no kvstore of this cluster (a timestamp or epoch the sequencer never
//! handed out), appended straight to the logserver as the issue did, stops the kvstore with one
//! line naming the record's log index, whether it meets the record while serving or while
//! replaying after a restart, instead of applying it or retrying forever.

use cluster_tests::{LogCluster, Proc, System};
use protocol::{Client, ErrorCode, LogClient, Response};
use std::time::Duration;

/// Long enough for anything that is not a hang.
const GENEROUS: Duration = Duration::from_secs(60);

/// Waits for `p` to exit by itself and returns the last line it wrote (its stderr reason).
fn exit_reason(p: &mut Proc) -> String {
    let status = p
        .wait_exit(GENEROUS)
        .unwrap_or_else(|| panic!("the kvstore did not exit; log:\n{}", p.log_tail(30)));
    assert!(!status.success(), "{status:?}");
    let tail = p.log_tail(30);
    assert!(!tail.contains("recovery failed, retrying"), "{tail}");
    p.log_tail(1)
}

/// Starts a kvstore that is expected to stop by itself, logging to `name` in the system's dir.
fn spawn_kv(sys: &System, name: &str) -> Proc {
    let log = sys.log.dir.path().join(name);
    Proc::spawn("kvstore", &sys.kv_args(sys.kv_addr), &log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_far_future_commit_stops_the_kvstore_naming_its_index_now_and_after_a_restart() {
    let mut sys = System::start(&[]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.put("k", "v").await.unwrap();
    // Well formed, so the logserver takes it; its timestamp was never handed out.
    let mut log = LogClient::new(sys.log.addrs());
    let forged = log
        .append(b"forger", 1, b"COMMIT 18446744073709551000 1 PUT k forged")
        .await
        .unwrap();

    // The running kvstore meets it in the gap before its next commit: that commit is not
    // acknowledged, and the process stops naming the entry.
    assert!(c.put("after", "x").await.is_err());
    let mut kv = sys.kv.take().expect("the kvstore runs");
    let reason = exit_reason(&mut kv);
    assert!(
        reason.contains(&format!(
            "log index {forged}: COMMIT timestamp 18446744073709551000"
        )),
        "{reason}"
    );

    // Restarted, it stops at the same entry during replay.
    let mut kv = spawn_kv(&sys, "kvstore-restarted.log");
    let reason = exit_reason(&mut kv);
    assert!(
        reason.contains(&format!(
            "recovery stopped at log index {forged}: COMMIT timestamp"
        )),
        "{reason}"
    );
    assert!(
        reason.contains("beyond every timestamp the sequencer has handed out"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_epoch_near_the_end_of_time_stops_the_kvstore_instead_of_fencing_it_for_good() {
    let mut sys = System::start(&[]).await;
    let mut log = LogClient::new(sys.log.addrs());
    let forged = log
        .append(b"forger", 1, b"EPOCH 18446744073709551615")
        .await
        .unwrap();
    // The follower sees the EPOCH, fences, and the sequencer never handed it out: stop.
    let mut kv = sys.kv.take().expect("the kvstore runs");
    let reason = exit_reason(&mut kv);
    assert!(
        reason.contains(&format!(
            "log index {forged}: EPOCH 18446744073709551615 is beyond"
        )),
        "{reason}"
    );
    let mut kv = spawn_kv(&sys, "kvstore-restarted.log");
    let reason = exit_reason(&mut kv);
    assert!(
        reason.contains(&format!("recovery stopped at log index {forged}: EPOCH")),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_is_not_records_stops_a_restarted_kvstore_naming_its_index() {
    // A log that takes any payload (as it did before it checked them), to show the kvstore's
    // own line of defence.
    let log = LogCluster::start(&["--any-payload"]).await;
    let mut sys = System::assemble(log, &[]).await;
    sys.start_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.put("k", "v").await.unwrap();
    drop(c);
    sys.kill_kv();
    let mut log = LogClient::new(sys.log.addrs());
    let junk = log.append(b"junk", 1, b"hello").await.unwrap();
    let mut kv = spawn_kv(&sys, "kvstore-restarted.log");
    let reason = exit_reason(&mut kv);
    assert!(
        reason.contains(&format!(
            "recovery stopped at log index {junk}: the entry is not kvstore records (unknown record hello)"
        )),
        "{reason}"
    );
}

fn refused(r: &Response) -> String {
    match r {
        Response::Err(e) if e.code == ErrorCode::Rejected => e.message.clone(),
        r => panic!("expected ERR REJECTED, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_refuses_appends_and_checkpoints_the_kvstore_could_not_read() {
    let c = LogCluster::start(&[]).await;
    let leader = c.wait_for_leader().await;
    let mut l = Client::connect(c.replicas[leader].dksp).await.unwrap();
    for line in [
        &b"APPEND junk 1 hello"[..],
        b"APPEND junk 1 \"\"",
        b"APPEND junk 1 \"EPOCH 5\\nCOMMIT 6 5 PUT k\"",
        b"APPEND junk 1 \"EPOCH x\"",
    ] {
        let why = refused(&l.call(line).await.unwrap());
        assert!(why.starts_with("payload is not kvstore records"), "{why}");
    }
    // A refused append takes no index and no seq.
    assert_eq!(
        l.call(b"APPEND kv 1 \"EPOCH 5\\nCOMMIT 6 5 PUT k v\"")
            .await
            .unwrap(),
        Response::Ok(vec!["1".into()])
    );
    assert_eq!(
        l.call(b"APPEND kv 2 \"COMMIT 7 5 DEL k\"").await.unwrap(),
        Response::Ok(vec!["2".into()])
    );

    // The compaction by junk: a one-byte upload with the right length and CRC.
    assert_eq!(
        l.call(b"CKPT_PUT 424242 0 x").await.unwrap(),
        Response::Ok(vec!["1".into()])
    );
    let commit = format!("CKPT_COMMIT 424242 2 1 {}", crc32c::crc32c(b"x"));
    let why = refused(&l.call(commit.as_bytes()).await.unwrap());
    assert!(
        why.contains("does not decode as a kvstore checkpoint"),
        "{why}"
    );
    let entries = l.read_log(1, None).await.unwrap();
    assert_eq!(entries.len(), 2, "the log is untouched: {entries:?}");
    assert!(matches!(
        l.call(b"CKPT_INFO").await.unwrap(),
        Response::Err(e) if e.code == ErrorCode::NotFound
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_formed_checkpoint_with_timestamps_never_handed_out_stops_a_restarted_kvstore() {
    let mut sys = System::start(&[]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.put("k", "v").await.unwrap();
    drop(c);
    sys.kill_kv();
    let last: u64 = sys.log.status(0).await.unwrap()["last"].parse().unwrap();
    // The log takes it: it decodes and states the index it is committed at.
    let forged = protocol::kvlog::Checkpoint {
        index: last,
        max_ts: 1 << 60,
        epoch: 1,
        entries: vec![(
            bytes::Bytes::from("k"),
            1 << 60,
            bytes::Bytes::from("forged"),
        )],
    }
    .encode()
    .unwrap();
    let mut log = LogClient::new(sys.log.addrs());
    let put = protocol::log::Request::CkptPut {
        id: 77,
        offset: 0,
        data: bytes::Bytes::from(forged.clone()),
    };
    assert_eq!(
        log.call_leader(&put.encode()).await.unwrap(),
        Response::Ok(vec![forged.len().to_string().into()])
    );
    let commit = protocol::log::Request::CkptCommit {
        id: 77,
        index: last,
        len: forged.len() as u64,
        crc: crc32c::crc32c(&forged),
    };
    assert_eq!(
        log.call_leader(&commit.encode()).await.unwrap(),
        Response::ok()
    );
    let mut kv = spawn_kv(&sys, "kvstore-restarted.log");
    let reason = exit_reason(&mut kv);
    assert!(
        reason.contains(&format!(
            "the log's checkpoint 77 (at log index {last}) cannot be loaded: checkpoint's newest timestamp 1152921504606846976 is beyond"
        )),
        "{reason}"
    );
}
