//! The replicated log as processes: election, replication, failover under load with
//! exactly-once appends, full restarts, snapshot catch-up of a wiped replica, torn tails.

use bytes::Bytes;
use cluster_tests::{wait_until, LogCluster};
use protocol::{Client, ErrorCode, LogClient, Response};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_replicate_to_every_replica_in_order() {
    let c = LogCluster::start(&["--any-payload"]).await;
    let mut log = LogClient::new(c.addrs());
    for seq in 1..=200u64 {
        let idx = log
            .append(b"writer", seq, format!("entry {seq}").as_bytes())
            .await
            .unwrap();
        assert_eq!(idx, seq, "dense logical indices");
    }
    // A retry of a committed append returns its index and appends nothing.
    assert_eq!(log.append(b"writer", 7, b"entry 7").await.unwrap(), 7);
    for i in 0..3 {
        c.wait_applied(i, 200).await;
        let entries = c.read_all(i).await;
        assert_eq!(entries.len(), 200, "replica {}", i + 1);
        for (n, (idx, payload)) in entries.iter().enumerate() {
            assert_eq!(*idx, n as u64 + 1);
            assert_eq!(payload, &Bytes::from(format!("entry {}", n + 1)));
        }
    }
}

/// The kvstore pipelines many appends on one connection and relies on them entering the log
/// in the order sent (the logserver proposes several batches concurrently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_appends_enter_the_log_in_the_order_sent() {
    let c = LogCluster::start(&["--any-payload"]).await;
    let leader = c.wait_for_leader().await;
    let mut conn = Client::connect(c.replicas[leader].dksp).await.unwrap();
    let n = 2000u64;
    for seq in 1..=n {
        conn.send(format!("APPEND pipe {seq} p{seq}").as_bytes());
        if seq % 64 == 0 {
            conn.flush().await.unwrap();
        }
    }
    conn.flush().await.unwrap();
    let mut last = 0;
    for seq in 1..=n {
        match conn.recv().await.unwrap() {
            Response::Ok(args) => {
                let idx: u64 = std::str::from_utf8(&args[0]).unwrap().parse().unwrap();
                assert!(idx > last, "append {seq} got index {idx} after {last}");
                last = idx;
            }
            r => panic!("append {seq}: {r:?}"),
        }
    }
    let entries = c.read_all(leader).await;
    let payloads: Vec<Bytes> = entries.into_iter().map(|(_, p)| p).collect();
    let expected: Vec<Bytes> = (1..=n).map(|s| Bytes::from(format!("p{s}"))).collect();
    assert_eq!(payloads, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_redirect_and_bad_input_is_refused() {
    let c = LogCluster::start(&["--any-payload"]).await;
    let leader = c.wait_for_leader().await;
    let follower = (leader + 1) % 3;
    let mut f = Client::connect(c.replicas[follower].dksp).await.unwrap();
    match f.call(b"APPEND x 1 hello").await.unwrap() {
        Response::Redirect(addr) => assert_eq!(addr, c.replicas[leader].dksp.to_string()),
        r => panic!("follower answered {r:?}"),
    }
    let mut l = Client::connect(c.replicas[leader].dksp).await.unwrap();
    for (line, code) in [
        (&b"APPEND x notanumber p"[..], ErrorCode::Syntax),
        (b"READ", ErrorCode::Syntax),
        (b"FROB", ErrorCode::UnknownCommand),
        (b"APPEND \"x 1 p", ErrorCode::Syntax),
        (b"CKPT_COMMIT 1 0 0 0", ErrorCode::Rejected),
        (b"CKPT_INFO", ErrorCode::NotFound),
    ] {
        match l.call(line).await.unwrap() {
            Response::Err(e) => assert_eq!(e.code, code, "{}", String::from_utf8_lossy(line)),
            r => panic!("{} answered {r:?}", String::from_utf8_lossy(line)),
        }
    }
    assert_eq!(
        l.call(b"APPEND x 1 ok").await.unwrap(),
        Response::Ok(vec!["1".into()])
    );
    // Pipelined in one write: the READ must see the APPENDs before it on the same connection.
    l.send(b"APPEND x 2 two");
    l.send(b"APPEND x 3 three");
    l.send(b"READ 2");
    l.flush().await.unwrap();
    assert_eq!(l.recv().await.unwrap(), Response::Ok(vec!["2".into()]));
    assert_eq!(l.recv().await.unwrap(), Response::Ok(vec!["3".into()]));
    assert_eq!(l.recv().await.unwrap(), Response::Entry(2, "two".into()));
    assert_eq!(l.recv().await.unwrap(), Response::Entry(3, "three".into()));
    assert_eq!(l.recv().await.unwrap(), Response::End);
    let st = c.status(leader).await.unwrap();
    assert_eq!(st["role"], "leader");
    assert_eq!(st["voters"], "1,2,3");
}

/// Writers append (client, seq) pairs concurrently; the leader is killed mid-way and brought
/// back. Every acknowledged append must be in every replica's log exactly once, at the index it
/// was acknowledged with, and no (client, seq) may appear twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_under_load_loses_and_duplicates_nothing() {
    let mut c = LogCluster::start(&["--any-payload"]).await;
    let acked: Arc<Mutex<BTreeMap<(u64, u64), u64>>> = Arc::default();
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let (addrs, acked, total, stop) =
                (c.addrs(), acked.clone(), total.clone(), stop.clone());
            tokio::spawn(async move {
                let mut log = LogClient::new(addrs);
                log.deadline = Duration::from_secs(30);
                let mut seq = 0;
                while stop.load(Ordering::SeqCst) == 0 {
                    seq += 1;
                    let payload = format!("w{w}-s{seq}");
                    let idx = log
                        .append(format!("w{w}").as_bytes(), seq, payload.as_bytes())
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} seq {seq}: {e}"));
                    acked.lock().unwrap().insert((w, seq), idx);
                    total.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let t = total.clone();
    wait_until(Duration::from_secs(30), "500 acknowledged appends", || {
        let t = t.clone();
        async move { t.load(Ordering::SeqCst) >= 500 }
    })
    .await;
    let old_leader = c.wait_for_leader().await;
    c.kill9(old_leader);
    let at_kill = total.load(Ordering::SeqCst);
    let t = total.clone();
    wait_until(
        Duration::from_secs(30),
        "appends to resume after failover",
        || {
            let t = t.clone();
            async move { t.load(Ordering::SeqCst) >= at_kill + 500 }
        },
    )
    .await;
    c.restart(old_leader).await;
    let t = total.clone();
    let now = total.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(30),
        "more appends with all three up",
        || {
            let t = t.clone();
            async move { t.load(Ordering::SeqCst) >= now + 300 }
        },
    )
    .await;
    stop.store(1, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer panicked");
    }
    let acked = acked.lock().unwrap().clone();
    let last = *acked.values().max().unwrap();
    for i in 0..3 {
        c.wait_applied(i, last).await;
        let entries = c.read_all(i).await;
        let mut seen: HashMap<Bytes, u64> = HashMap::new();
        for (idx, payload) in &entries {
            if let Some(prev) = seen.insert(payload.clone(), *idx) {
                panic!("replica {}: {payload:?} at both {prev} and {idx}", i + 1);
            }
        }
        for ((w, seq), idx) in &acked {
            let payload = Bytes::from(format!("w{w}-s{seq}"));
            assert_eq!(
                seen.get(&payload),
                Some(idx),
                "replica {}: acknowledged {payload:?} at {idx} missing or moved",
                i + 1
            );
        }
    }
    println!("{} acknowledged appends checked on 3 replicas", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_the_same_log() {
    let mut c = LogCluster::start(&["--any-payload"]).await;
    let mut log = LogClient::new(c.addrs());
    for seq in 1..=100u64 {
        log.append(b"c", seq, format!("p{seq}").as_bytes())
            .await
            .unwrap();
    }
    for i in 0..3 {
        c.wait_applied(i, 100).await;
    }
    let before = c.read_all(0).await;
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        c.restart(i).await;
    }
    c.wait_for_leader().await;
    let mut log = LogClient::new(c.addrs());
    assert_eq!(log.append(b"c", 101, b"p101").await.unwrap(), 101);
    for i in 0..3 {
        c.wait_applied(i, 101).await;
        let after = c.read_all(i).await;
        assert_eq!(&after[..100], &before[..], "replica {}", i + 1);
    }
}

/// Uploads a checkpoint in chunks and commits it at `index`.
async fn checkpoint(log: &mut LogClient, id: u64, index: u64, data: &[u8]) {
    let mut offset = 0;
    for chunk in data.chunks(100_000) {
        let req = protocol::log::Request::CkptPut {
            id,
            offset,
            data: Bytes::copy_from_slice(chunk),
        };
        offset += chunk.len() as u64;
        let r = log.call_leader(&req.encode()).await.unwrap();
        assert_eq!(r, Response::Ok(vec![offset.to_string().into()]));
    }
    let req = protocol::log::Request::CkptCommit {
        id,
        index,
        len: data.len() as u64,
        crc: crc32c::crc32c(data),
    };
    assert_eq!(
        log.call_leader(&req.encode()).await.unwrap(),
        Response::ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replica_rejoins_through_a_snapshot_after_compaction() {
    let mut c = LogCluster::start(&[
        "--any-payload",
        "--snapshot-every",
        "100",
        "--keep-after-snapshot",
        "10",
    ])
    .await;
    let mut log = LogClient::new(c.addrs());
    for seq in 1..=400u64 {
        log.append(b"c", seq, format!("p{seq}").as_bytes())
            .await
            .unwrap();
    }
    let ckpt = cluster_tests::kv_checkpoint(300, 300_000);
    checkpoint(&mut log, 1, 300, &ckpt).await;
    for seq in 401..=500u64 {
        log.append(b"c", seq, format!("p{seq}").as_bytes())
            .await
            .unwrap();
    }
    let leader = c.wait_for_leader().await;
    // The leader's Raft log has been purged below the snapshot.
    let l = leader;
    let addr = c.replicas[l].dksp;
    wait_until(
        Duration::from_secs(20),
        "the leader to purge its Raft log",
        || async move {
            cluster_tests::status(addr)
                .await
                .and_then(|s| s.get("purged")?.parse::<u64>().ok())
                .is_some_and(|p| p > 100)
        },
    )
    .await;
    let victim = (leader + 1) % 3;
    c.kill9(victim);
    c.wipe(victim);
    c.restart(victim).await;
    c.wait_applied(victim, 500).await;
    let mut v = Client::connect(c.replicas[victim].dksp).await.unwrap();
    match v.call(b"READ 1").await.unwrap() {
        Response::Err(e) => {
            assert_eq!(e.code, ErrorCode::Compacted);
            assert_eq!(e.message, "301");
        }
        r => panic!("READ 1 after compaction answered {r:?}"),
    }
    let tail = v.read_log(301, None).await.unwrap();
    assert_eq!(tail.len(), 200);
    assert_eq!(tail[0], (301, Bytes::from("p301")));
    let info: HashMap<String, String> = v.pairs(b"CKPT_INFO").await.unwrap().into_iter().collect();
    assert_eq!(info["index"], "300");
    assert_eq!(info["len"], ckpt.len().to_string());
    match v.call(b"CKPT_READ 1 1000 16").await.unwrap() {
        Response::Value(chunk) => assert_eq!(&chunk[..], &ckpt[1000..1016]),
        r => panic!("{r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_last_record_is_truncated_and_recovered_from_the_others() {
    let mut c = LogCluster::start(&["--any-payload"]).await;
    let mut log = LogClient::new(c.addrs());
    for seq in 1..=50u64 {
        log.append(b"c", seq, format!("p{seq}").as_bytes())
            .await
            .unwrap();
    }
    let leader = c.wait_for_leader().await;
    let victim = (leader + 1) % 3;
    c.wait_applied(victim, 50).await;
    c.kill9(victim);
    let raft_dir = c.replicas[victim].data_dir.join("raft");
    let mut segs: Vec<_> = std::fs::read_dir(&raft_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".log"))
        .collect();
    segs.sort();
    let seg = segs.pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();
    c.restart(victim).await;
    assert_eq!(log.append(b"c", 51, b"p51").await.unwrap(), 51);
    c.wait_applied(victim, 51).await;
    let entries = c.read_all(victim).await;
    assert_eq!(entries.len(), 51);
    let log_text =
        std::fs::read_to_string(c.dir.path().join(format!("log-{}.log", victim + 1))).unwrap();
    assert!(
        log_text.contains("truncating"),
        "the truncation was not logged:\n{log_text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_streams_new_entries() {
    let c = LogCluster::start(&["--any-payload"]).await;
    let mut log = LogClient::new(c.addrs());
    log.append(b"c", 1, b"first").await.unwrap();
    let mut t = Client::connect(c.replicas[2].dksp).await.unwrap();
    t.send(b"TAIL 1");
    t.flush().await.unwrap();
    assert_eq!(t.recv().await.unwrap(), Response::Entry(1, "first".into()));
    for seq in 2..=5u64 {
        log.append(b"c", seq, format!("e{seq}").as_bytes())
            .await
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), t.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r, Response::Entry(seq, format!("e{seq}").into()));
    }
    // With a prefix, only entries holding a line that starts with it are streamed.
    let mut m = Client::connect(c.replicas[1].dksp).await.unwrap();
    m.send(b"TAIL 1 \"EPOCH \"");
    m.flush().await.unwrap();
    log.append(b"c", 6, b"COMMIT 1 1 PUT EPOCH x")
        .await
        .unwrap();
    log.append(b"c", 7, b"COMMIT 2 1 PUT a b\nEPOCH 9")
        .await
        .unwrap();
    log.append(b"c", 8, b"EPOCHS 3").await.unwrap();
    log.append(b"c", 9, b"EPOCH 12").await.unwrap();
    for expected in [
        Response::Entry(7, "COMMIT 2 1 PUT a b\nEPOCH 9".into()),
        Response::Entry(9, "EPOCH 12".into()),
    ] {
        let r = tokio::time::timeout(Duration::from_secs(10), m.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_catches_up_and_a_removed_one_is_not_needed() {
    let mut c = LogCluster::start(&["--any-payload"]).await;
    let mut log = LogClient::new(c.addrs());
    for seq in 1..=50u64 {
        log.append(b"m", seq, format!("before {seq}").as_bytes())
            .await
            .unwrap();
    }
    // A fourth replica, started empty without --init, then added by the leader.
    let (dksp, raft, mut p) = c.spawn_new_replica(4).await;
    match log
        .call_leader(format!("ADD_REPLICA 4 {raft} {dksp}").as_bytes())
        .await
        .unwrap()
    {
        Response::Ok(_) => {}
        r => panic!("ADD_REPLICA answered {r:?}"),
    }
    log.append(b"m", 51, b"after").await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "replica 4 to catch up",
        || async move {
            cluster_tests::status(dksp)
                .await
                .and_then(|s| s.get("last")?.parse::<u64>().ok())
                .is_some_and(|l| l >= 51)
        },
    )
    .await;
    let mut four = Client::connect(dksp).await.unwrap();
    let entries = four.read_log(1, Some(100)).await.unwrap();
    assert_eq!(entries.len(), 51);
    assert_eq!(entries[0].1, Bytes::from("before 1"));
    assert_eq!(entries[50].1, Bytes::from("after"));

    // Removed again, the group is three: with replica 4 and one of the others down, the two
    // left are a majority (of four they would not be).
    match log.call_leader(b"REMOVE_REPLICA 4").await.unwrap() {
        Response::Ok(_) => {}
        r => panic!("REMOVE_REPLICA answered {r:?}"),
    }
    p.kill9();
    let leader = c.wait_for_leader().await;
    c.kill9((leader + 1) % 3);
    assert_eq!(log.append(b"m", 52, b"without 4").await.unwrap(), 52);
}
