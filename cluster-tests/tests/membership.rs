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
