//! Issue #19's forged requests against a secured system: refused (`ERR NOAUTH`, a dropped Raft
//! connection, a failed handshake) without credentials, answered with them.

use cluster_tests::{Credentials, Security, System};
use protocol::{Client, ErrorCode, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Forged requests a non-member sends to the log leader.
const LOG_FORGERIES: &[&str] = &[
    "APPEND junk 1 hello",
    "CKPT_PUT 424242 0 x",
    "CKPT_COMMIT 424242 1 1 2839306131",
    "REMOVE_REPLICA 2",
    "ADD_REPLICA 4 127.0.0.1:1/127.0.0.1:2",
    "READ 1",
];

fn is_noauth(r: &Response) -> bool {
    matches!(r, Response::Err(e) if e.code == ErrorCode::NoAuth)
}

async fn leader_client(sys: &System, plain: bool) -> Client {
    let l = sys.log.wait_for_leader().await;
    if plain {
        Client::connect(sys.log.replicas[l].dksp).await.unwrap()
    } else {
        sys.connect_log(l).await
    }
}

async fn commit_one(sys: &System, key: &str) {
    let mut c = sys.connect_kv().await;
    c.begin().await.unwrap();
    c.put(key.to_string(), "v".to_string()).await.unwrap();
    assert!(matches!(
        c.commit().await.unwrap(),
        protocol::CommitOutcome::Committed(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_secret_forged_requests_are_refused_and_members_are_answered() {
    let mut sys = System::start_secured(&[], Security::SECRET).await;
    commit_one(&sys, "before").await;

    let mut plain = leader_client(&sys, true).await;
    for line in LOG_FORGERIES.iter().chain(["TAIL 1"].iter()) {
        let r = plain.call(line.as_bytes()).await.unwrap();
        assert!(is_noauth(&r), "{line} answered {r:?}");
    }
    let st: std::collections::HashMap<_, _> = plain.status().await.unwrap().into_iter().collect();
    assert_eq!(st.get("member").map(String::as_str), Some("no"));
    assert!(
        !st.contains_key("commit") && !st.contains_key("voters"),
        "{st:?}"
    );

    let mut seq = Client::connect(sys.seq.addr).await.unwrap();
    seq.ping().await.unwrap();
    for line in ["NEXT", "CURRENT"] {
        let r = seq.call(line.as_bytes()).await.unwrap();
        assert!(is_noauth(&r), "sequencer {line} answered {r:?}");
    }

    let mut member = leader_client(&sys, false).await;
    let st: std::collections::HashMap<_, _> = member.status().await.unwrap().into_iter().collect();
    assert_ne!(st.get("member").map(String::as_str), Some("no"), "{st:?}");
    let mut seq = sys.connect_seq().await;
    assert!(!is_noauth(&seq.call(b"CURRENT").await.unwrap()));

    // Another cluster's secret is refused.
    let other = Credentials::make(Security::SECRET, &sys.log.dir.path().join("other"), "x");
    let l = sys.log.wait_for_leader().await;
    assert!(other
        .connect_member(&sys.log.replicas[l].dksp.to_string())
        .await
        .is_err());
    assert!(other
        .connect_member(&sys.seq.addr.to_string())
        .await
        .is_err());

    // Junk on the Raft port is dropped after at most the pre-auth frame; the cluster works on.
    let mut raw = tokio::net::TcpStream::connect(sys.log.replicas[l].raft)
        .await
        .unwrap();
    let _ = raw.write_all(&[0x5a; 4096]).await;
    let mut buf = vec![0u8; 8192];
    loop {
        match raw.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    commit_one(&sys, "after-raft-junk").await;

    // A kvstore restart recovers; a leader kill -9 fails over.
    sys.restart_kv().await;
    let mut c = sys.connect_kv().await;
    c.begin().await.unwrap();
    assert!(c.get("before").await.unwrap().is_some());
    c.abort().await.unwrap();
    sys.log.kill9(l);
    sys.log.wait_for_leader().await;
    commit_one(&sys, "after-failover").await;

    // With membership the same requests are answered (validation may still refuse them).
    sys.log.restart(l).await;
    let mut member = leader_client(&sys, false).await;
    for line in LOG_FORGERIES.iter().filter(|l| !l.starts_with("APPEND")) {
        // Destructive when admitted, so last; a refusal is immediate, so a reply still pending
        // after the timeout was admitted too.
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            member.call(line.as_bytes()),
        )
        .await;
        if let Ok(r) = r {
            let r = r.unwrap();
            assert!(!is_noauth(&r), "member {line} answered {r:?}");
        } else {
            member = leader_client(&sys, false).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_another_ca_and_plain_clients_are_refused_and_the_system_works() {
    let mut sys = System::start_secured(&[], Security::TLS).await;
    commit_one(&sys, "k").await;
    let l = sys.log.wait_for_leader().await;
    let leader = sys.log.replicas[l].dksp.to_string();

    // A certificate from another CA fails the TLS handshake, on the log and the kvstore.
    let other = Credentials::make(Security::TLS, &sys.log.dir.path().join("other"), "other CA");
    assert!(other.connect_member(&leader).await.is_err());
    assert!(other.connect_kv(&sys.kv_addr.to_string()).await.is_err());

    // A plain client does not get an answer it can use.
    if let Ok(mut plain) = Client::connect(sys.log.replicas[l].dksp).await {
        let r = plain.call(b"READ 1").await;
        assert!(r.as_ref().map_or(true, is_noauth), "{r:?}");
    }

    let mut member = sys.connect_log(l).await;
    assert!(!is_noauth(&member.call(b"READ 1").await.unwrap()));

    sys.restart_kv().await;
    sys.log.kill9(l);
    sys.log.wait_for_leader().await;
    commit_one(&sys, "after-failover").await;
}
