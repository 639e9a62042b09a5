//! Membership changes keep the group able to survive a crash (issue #19 item 5): on a healthy
//! three-replica group `REMOVE_REPLICA` is refused, since two voters survive no crash, unless
//! `FORCE`d; a second removal (to one voter) is refused again; nothing changes on a refusal.

use cluster_tests::LogCluster;
use protocol::{Client, ErrorCode, Response};

fn refused(r: &Response) -> String {
    match r {
        Response::Err(e) if e.code == ErrorCode::Rejected => e.message.clone(),
        r => panic!("expected ERR REJECTED, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_voters_below_three_needs_force_each_time_and_a_refusal_changes_nothing() {
    let c = LogCluster::start(&[]).await;
    let l = c.wait_for_leader().await;
    let leader_id = c.replicas[l].id;
    let others: Vec<u64> = c
        .replicas
        .iter()
        .map(|r| r.id)
        .filter(|&id| id != leader_id)
        .collect();
    let mut conn = Client::connect(c.replicas[l].dksp).await.unwrap();
    let voters = |s: &std::collections::HashMap<String, String>| s["voters"].clone();

    let why = refused(
        &conn
            .call(format!("REMOVE_REPLICA {}", others[0]).as_bytes())
            .await
            .unwrap(),
    );
    assert!(
        why.contains("leave 2 voter(s)") && why.contains("FORCE"),
        "{why}"
    );
    assert_eq!(voters(&c.status(l).await.unwrap()), "1,2,3");

    assert_eq!(
        conn.call(format!("REMOVE_REPLICA {} FORCE", others[0]).as_bytes())
            .await
            .unwrap(),
        Response::ok()
    );
    let mut two = [leader_id, others[1]];
    two.sort();
    let two = format!("{},{}", two[0], two[1]);
    assert_eq!(voters(&c.status(l).await.unwrap()), two);

    // The second step, to a single voter: refused again.
    let why = refused(
        &conn
            .call(format!("REMOVE_REPLICA {}", others[1]).as_bytes())
            .await
            .unwrap(),
    );
    assert!(why.contains("leave 1 voter(s)"), "{why}");
    assert_eq!(voters(&c.status(l).await.unwrap()), two);
    // And the group still takes appends.
    assert_eq!(
        conn.call(b"APPEND kv 1 \"EPOCH 1\"").await.unwrap(),
        Response::Ok(vec!["1".into()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_replaced_without_force_by_adding_the_new_one_first() {
    let mut c = LogCluster::start(&[]).await;
    let l = c.wait_for_leader().await;
    let dead = (l + 1) % 3;
    let dead_id = c.replicas[dead].id;
    c.kill9(dead);
    let mut conn = Client::connect(c.replicas[l].dksp).await.unwrap();
    // Removing the dead one first would leave two voters.
    let why = refused(
        &conn
            .call(format!("REMOVE_REPLICA {dead_id}").as_bytes())
            .await
            .unwrap(),
    );
    assert!(why.contains("leave 2 voter(s)"), "{why}");

    // A fourth replica, started empty without --init: four voters, three of them answering.
    let (dksp, raft, mut p) = c.spawn_new_replica(4).await;
    assert_eq!(
        conn.call(format!("ADD_REPLICA 4 {raft} {dksp}").as_bytes())
            .await
            .unwrap(),
        Response::ok()
    );
    // Then the dead one goes: three voters, all answering.
    assert_eq!(
        conn.call(format!("REMOVE_REPLICA {dead_id}").as_bytes())
            .await
            .unwrap(),
        Response::ok()
    );
    let voters = c.status(l).await.unwrap()["voters"].clone();
    let mut want: Vec<u64> = c
        .replicas
        .iter()
        .map(|r| r.id)
        .filter(|&id| id != dead_id)
        .chain([4])
        .collect();
    want.sort();
    let want: Vec<String> = want.iter().map(u64::to_string).collect();
    assert_eq!(voters, want.join(","));
    assert_eq!(
        conn.call(b"APPEND kv 1 \"EPOCH 1\"").await.unwrap(),
        Response::Ok(vec!["1".into()])
    );
    p.kill9();
}
