//! `--trace-hops` and `HOPS` end to end (issue #20 item 2): a kvstore without the flag refuses
//! `HOPS`; with it on the kvstore and every log replica, one PUT can be followed through every
//! hop the servers mark, and reading the marks clears them.

use cluster_tests::hops::{breakdown, Dumps, Replica, SEGMENTS};
use cluster_tests::{LogCluster, System};
use protocol::hops::Mark;
use protocol::{Client, ErrorCode, Response};
use std::time::{Duration, Instant};

async fn hops(addr: impl tokio::net::ToSocketAddrs) -> Vec<Mark> {
    let mut c = Client::connect(addr).await.unwrap();
    c.call_multi(b"HOPS")
        .await
        .unwrap()
        .iter()
        .map(|l| match l {
            Response::Ok(args) => Mark::parse(args).unwrap(),
            other => panic!("HOPS line {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hops_is_refused_without_the_flag_and_follows_a_put_through_every_hop_with_it() {
    let log = LogCluster::start(&["--trace-hops"]).await;
    let mut sys = System::assemble(log, &[]).await;
    sys.start_kv().await;
    let mut kv = Client::connect(sys.kv_addr).await.unwrap();
    match kv.call(b"HOPS").await.unwrap() {
        Response::Err(e) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
        other => panic!("HOPS without --trace-hops answered {other:?}"),
    }
    // The connection is still fine after the refusal.
    kv.ping().await.unwrap();

    sys.kv_extra.push("--trace-hops".into());
    sys.restart_kv().await;
    let leader = sys.log.wait_for_leader().await;
    for r in &sys.log.replicas {
        hops(r.dksp).await; // clears what the kvstore's recovery left
    }
    hops(sys.kv_addr).await;
    let mut kv = Client::connect(sys.kv_addr).await.unwrap();
    // The first commit after a quiet millisecond is sampled.
    assert_eq!(kv.call(b"PUT k v").await.unwrap(), Response::ok());

    // The follower that did not make the quorum may flush later: gather until every segment
    // the servers mark is there (the leader's AppendEntries send/ack marks may not be).
    let mut d = Dumps {
        leader: Replica {
            id: sys.log.replicas[leader].id,
            marks: Vec::new(),
        },
        followers: Vec::new(),
        ..Dumps::default()
    };
    for (i, r) in sys.log.replicas.iter().enumerate() {
        if i != leader {
            d.followers.push(Replica {
                id: r.id,
                marks: Vec::new(),
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        d.kv.extend(hops(sys.kv_addr).await);
        d.leader
            .marks
            .extend(hops(sys.log.replicas[leader].dksp).await);
        let mut f = 0;
        for (i, r) in sys.log.replicas.iter().enumerate() {
            if i != leader {
                d.followers[f].marks.extend(hops(r.dksp).await);
                f += 1;
            }
        }
        let b = breakdown(&d);
        let complete = SEGMENTS
            .iter()
            .zip(&b.segments)
            .all(|(name, s)| name.ends_with('*') || s.len() == 1);
        if complete || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((b.sampled, b.joined), (1, 1), "{d:?}");
    for (name, s) in SEGMENTS.iter().zip(&b.segments) {
        assert!(
            name.ends_with('*') || s.len() == 1,
            "segment {name:?} has {} samples; marks: {d:?}",
            s.len()
        );
    }
    // Reading cleared them.
    assert!(hops(sys.kv_addr).await.is_empty());
}
