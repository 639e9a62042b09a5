//! Tests of the Raft network: wire round trips, the client against stand-in followers, the
//! server against a real single-replica Raft.

use super::*;
use crate::log_store::LogStore;
use crate::pipeline::Feed;
use crate::state_machine::StateMachine;
use crate::types::{Batch, BatchResult, Entry, Op, OpResult};
use crate::types::{Raft, RaftError};
use bytes::Bytes;
use client::AppendReply;
use futures::{SinkExt, StreamExt};
use openraft::error::{Fatal, SnapshotMismatch};
use openraft::error::{InstallSnapshotError, RPCError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork};
use openraft::raft::{AppendEntriesResponse, InstallSnapshotResponse, VoteResponse};
use openraft::testing::log_id;
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, Membership, SnapshotMeta, SnapshotSegmentId,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn node(addr: &str) -> Node {
    Node {
        raft_addr: addr.into(),
        dksp_addr: "127.0.0.1:1".into(),
    }
}

fn membership() -> Membership<NodeId, Node> {
    let nodes = BTreeMap::from([(1, node("a:1")), (2, node("b:2")), (3, node("c:3"))]);
    Membership::new(
        vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 2])],
        nodes,
    )
}

/// Encodes and decodes `v`, comparing `Debug` renderings because several openraft types
/// (the requests, `RaftError`) have no `PartialEq`.
fn roundtrip<T: Serialize + DeserializeOwned + Debug>(v: &T) -> T {
    let bytes = postcard::to_stdvec(v).expect("encode");
    let back: T = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(format!("{back:?}"), format!("{v:?}"));
    back
}

fn append_request() -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id(3, 1, 9)),
        entries: vec![
            Entry {
                log_id: log_id(3, 1, 10),
                payload: EntryPayload::Normal(Batch(vec![
                    Op::Append {
                        client: Bytes::from_static(b"c"),
                        seq: 1,
                        payload: Bytes::from_static(b"\x00\xffpayload"),
                    },
                    Op::CkptChunk {
                        id: 7,
                        offset: 0,
                        data: Bytes::new(),
                    },
                    Op::CkptCommit {
                        id: 7,
                        index: 9,
                        len: 0,
                        crc: u32::MAX,
                    },
                ])),
            },
            Entry {
                log_id: log_id(3, 1, 11),
                payload: EntryPayload::Membership(membership()),
            },
            Entry {
                log_id: log_id(3, 1, 12),
                payload: EntryPayload::Blank,
            },
        ],
        leader_commit: Some(log_id(3, 1, 8)),
    }
}

fn snapshot_request(offset: u64) -> InstallSnapshotRequest<TypeConfig> {
    InstallSnapshotRequest {
        vote: Vote::new_committed(3, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(3, 1, 40)),
            last_membership: StoredMembership::new(Some(log_id(2, 1, 5)), membership()),
            snapshot_id: "3-1-40-17".into(),
        },
        offset,
        data: vec![0, 1, 2, 255],
        done: true,
    }
}

#[test]
fn requests_roundtrip_through_postcard() {
    let req = append_request();
    match roundtrip(&RaftRpc::Append(req.clone())) {
        RaftRpc::Append(back) => assert_eq!(back.entries, req.entries),
        _ => panic!("wrong variant"),
    }
    // Heartbeats: no entries, nothing committed yet.
    let heartbeat = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new(1, 2),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    roundtrip(&RaftRpc::Append(heartbeat));

    let vote = VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 1, 12)));
    assert!(matches!(roundtrip(&RaftRpc::Vote(vote.clone())), RaftRpc::Vote(v) if v == vote));
    roundtrip(&RaftRpc::Vote(VoteRequest::new(Vote::new(1, 1), None)));

    let snap = snapshot_request(3);
    match roundtrip(&RaftRpc::Snapshot(snap.clone())) {
        RaftRpc::Snapshot(back) => {
            assert_eq!(back.meta, snap.meta);
            assert_eq!(back.data, snap.data);
        }
        _ => panic!("wrong variant"),
    }

    // Not wire types, but a batch result is what openraft stores in client replies; cheap
    // to pin down alongside.
    roundtrip(&BatchResult(vec![
        OpResult::Appended(1),
        OpResult::Duplicate(0),
        OpResult::Done,
        OpResult::Rejected("old".into()),
    ]));
}

#[test]
fn replies_roundtrip_through_postcard() {
    type AppendReply = Result<AppendEntriesResponse<NodeId>, RaftError>;
    // The responses are not `Clone`: build each twice.
    let append_replies = || {
        [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 4))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(5, 3)),
        ]
    };
    for (sent, expected) in append_replies().into_iter().zip(append_replies()) {
        let back = roundtrip::<AppendReply>(&Ok(sent));
        assert_eq!(back.ok(), Some(expected));
    }

    type VoteReply = Result<VoteResponse<NodeId>, RaftError>;
    let granted = VoteResponse {
        vote: Vote::new(4, 2),
        vote_granted: true,
        last_log_id: Some(log_id(3, 1, 12)),
    };
    assert_eq!(
        roundtrip::<VoteReply>(&Ok(granted.clone())).ok(),
        Some(granted)
    );

    // Remote errors: the storage error carries an `AnyError` with a source chain, the
    // part most likely to use serde features postcard lacks.
    let io = io::Error::other("disk on fire");
    let storage: StorageError<NodeId> =
        StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, AnyError::new(&io)).into();
    for fatal in [
        Fatal::Stopped,
        Fatal::Panicked,
        Fatal::StorageError(storage),
    ] {
        let back = roundtrip::<VoteReply>(&Err(openraft::error::RaftError::Fatal(fatal)));
        assert!(back.is_err());
    }

    type SnapshotReply = Result<InstallSnapshotResponse<NodeId>, RaftError<InstallSnapshotError>>;
    let ok = || InstallSnapshotResponse {
        vote: Vote::new_committed(3, 1),
    };
    assert_eq!(roundtrip::<SnapshotReply>(&Ok(ok())).ok(), Some(ok()));
    let mismatch = InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
        expect: SnapshotSegmentId {
            id: "a".into(),
            offset: 0,
        },
        got: SnapshotSegmentId {
            id: "b".into(),
            offset: 9,
        },
    });
    let back =
        roundtrip::<SnapshotReply>(&Err(openraft::error::RaftError::APIError(mismatch.clone())));
    assert!(matches!(back, Err(openraft::error::RaftError::APIError(m)) if m == mismatch));
}

fn client_for(addr: &str) -> PeerClient {
    PeerClient::new(2, addr.into(), NetConfig::default())
}

fn free_port_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    drop(l);
    addr
}

#[tokio::test]
async fn new_client_does_not_dial_and_a_dead_peer_is_unreachable() {
    let addr = free_port_addr();
    let mut client = Network::default().new_client(2, &node(&addr)).await;
    assert!(client.conn.is_none());
    let r = client
        .vote(
            VoteRequest::new(Vote::new(1, 1), None),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await;
    assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
    let r = client
        .append_entries(append_request(), RPCOption::new(Duration::from_secs(1)))
        .await;
    assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
}

#[tokio::test]
async fn a_route_overrides_the_membership_address_for_its_peer_only() {
    let routed = Network {
        routes: [(2, "127.0.0.1:7".to_string())].into(),
        ..Default::default()
    };
    let mut net = routed.clone();
    assert_eq!(
        net.new_client(2, &node("127.0.0.1:9")).await.addr,
        "127.0.0.1:7"
    );
    assert_eq!(
        net.new_client(3, &node("127.0.0.1:9")).await.addr,
        "127.0.0.1:9"
    );
}

/// A stand-in peer that answers each vote with the request's own vote, after `delay` for
/// term 1: enough to tell whose reply a call received.
async fn echo_voter(listener: TcpListener, delay: Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut conn = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
            while let Some(Ok(frame)) = conn.next().await {
                let Ok(RaftRpc::Vote(req)) = postcard::from_bytes::<RaftRpc>(&frame) else {
                    return;
                };
                if req.vote.leader_id().get_term() == 1 {
                    tokio::time::sleep(delay).await;
                }
                let reply: Result<VoteResponse<NodeId>, RaftError> = Ok(VoteResponse {
                    vote: req.vote,
                    vote_granted: true,
                    last_log_id: None,
                });
                let bytes = postcard::to_stdvec(&reply).expect("encode");
                if conn.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test]
async fn a_cancelled_call_does_not_leave_its_reply_for_the_next() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(echo_voter(listener, Duration::from_millis(300)));
    let mut client = client_for(&addr);
    let vote = |term| VoteRequest::new(Vote::new(term, 1), None);

    // Cancelled by our own `hard_ttl`. The next call goes out at once, before the late
    // reply to term 1 exists: the cancelled exchange kept its connection, so this one dials.
    let r = client
        .vote(vote(1), RPCOption::new(Duration::from_millis(50)))
        .await;
    assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
    assert!(client.conn.is_none());
    let r = client
        .vote(vote(2), RPCOption::new(Duration::from_secs(1)))
        .await
        .expect("vote");
    assert_eq!(r.vote, Vote::new(2, 1));

    // Cancelled the way openraft does it: its own timeout drops our future.
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        client.vote(vote(1), RPCOption::new(Duration::from_secs(5))),
    )
    .await;
    assert!(dropped.is_err());
    assert!(client.conn.is_none());
    let r = client
        .vote(vote(3), RPCOption::new(Duration::from_secs(1)))
        .await
        .expect("vote");
    assert_eq!(r.vote, Vote::new(3, 1));
    assert!(client.conn.is_some());
}

#[tokio::test]
async fn a_peer_closing_mid_call_is_a_network_error_and_the_next_call_redials() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut client = client_for(&addr);
    // First connection: read the request, then hang up without replying.
    let first = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
        let _ = conn.next().await;
        drop(conn);
        listener
    });
    let r = client
        .vote(
            VoteRequest::new(Vote::new(2, 1), None),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await;
    assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
    assert!(client.conn.is_none());

    let listener = first.await.expect("join");
    tokio::spawn(echo_voter(listener, Duration::ZERO));
    let r = client
        .vote(
            VoteRequest::new(Vote::new(2, 1), None),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await
        .expect("vote after redial");
    assert_eq!(r.vote, Vote::new(2, 1));
}

/// Sends a stand-in follower's answer to one append.
async fn answer(conn: &mut Conn, resp: AppendEntriesResponse<NodeId>) -> io::Result<()> {
    let reply: AppendReply = Ok(resp);
    let bytes = postcard::to_stdvec(&reply).expect("encode");
    conn.send(Bytes::from(bytes)).await
}

/// A stand-in follower that answers every append with `Success`, recording the number of
/// entries each carried; the first append with entries is answered after `delay`.
async fn recording_follower(
    listener: TcpListener,
    delay: Duration,
    seen: Arc<std::sync::Mutex<Vec<usize>>>,
) {
    let delayed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (seen, delayed) = (seen.clone(), delayed.clone());
        tokio::spawn(async move {
            let mut conn = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
            while let Some(Ok(frame)) = conn.next().await {
                let Ok(RaftRpc::Append(req)) = postcard::from_bytes::<RaftRpc>(&frame) else {
                    return;
                };
                seen.lock().expect("lock").push(req.entries.len());
                if !req.entries.is_empty()
                    && !delayed.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    tokio::time::sleep(delay).await;
                }
                if answer(&mut conn, AppendEntriesResponse::Success)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Entries 10..=12 of leader (3, 1), each carrying `len` payload bytes.
fn big_append(len: usize) -> AppendEntriesRequest<TypeConfig> {
    let entry = |i| Entry {
        log_id: log_id(3, 1, i),
        payload: EntryPayload::Normal(Batch(vec![Op::Append {
            client: Bytes::from_static(b"c"),
            seq: i,
            payload: Bytes::from(vec![b'x'; len]),
        }])),
    };
    AppendEntriesRequest {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id(3, 1, 9)),
        entries: (10..=12).map(entry).collect(),
        leader_commit: Some(log_id(3, 1, 9)),
    }
}

/// Calls `append_entries` with `req` as openraft does: again from what was acknowledged,
/// until the follower holds it all. Returns how many calls it took.
async fn replicate(client: &mut PeerClient, mut req: AppendEntriesRequest<TypeConfig>) -> usize {
    for calls in 1..=100 {
        let r = client
            .append_entries(req.clone(), RPCOption::new(Duration::from_secs(5)))
            .await
            .expect("append");
        match r {
            AppendEntriesResponse::Success => return calls,
            AppendEntriesResponse::PartialSuccess(Some(held)) => {
                req.entries.retain(|e| e.log_id.index > held.index);
                req.prev_log_id = Some(held);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("never acknowledged")
}

#[tokio::test]
async fn an_append_over_the_byte_budget_goes_as_several_requests_within_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(recording_follower(listener, Duration::ZERO, seen.clone()));
    let config = NetConfig {
        append_bytes: 250_000,
        ..NetConfig::default()
    };
    let mut client = PeerClient::new(2, addr, config);
    // Three entries of 100 kB: two fit the budget, the third goes in a request of its own.
    replicate(&mut client, big_append(100_000)).await;
    assert_eq!(*seen.lock().expect("lock"), vec![2, 1]);
    // openraft asking from 9 again sends nothing: the follower acknowledged it all.
    replicate(&mut client, big_append(100_000)).await;
    assert_eq!(*seen.lock().expect("lock"), vec![2, 1]);
    // One entry over the budget still goes, alone: there is no smaller unit.
    let fresh = client.addr.clone();
    let mut client = PeerClient::new(2, fresh, client.config.clone());
    replicate(&mut client, big_append(300_000)).await;
    assert_eq!(*seen.lock().expect("lock"), vec![2, 1, 1, 1, 1]);
}

#[tokio::test]
async fn a_slow_append_keeps_going_heartbeats_pass_it_and_it_is_not_resent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(recording_follower(
        listener,
        Duration::from_millis(400),
        seen.clone(),
    ));
    let mut client = PeerClient::new(2, addr, NetConfig::default());
    let short = || RPCOption::new(Duration::from_millis(50));

    // openraft's 50 ms pass with the follower still busy: no progress to report yet.
    let r = client.append_entries(big_append(1000), short()).await;
    assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");

    // A heartbeat meanwhile is answered over its own connection.
    let heartbeat = AppendEntriesRequest::<TypeConfig> {
        entries: vec![],
        ..big_append(0)
    };
    let r = client
        .append_entries(heartbeat, short())
        .await
        .expect("heartbeat while the append is in flight");
    assert_eq!(r, AppendEntriesResponse::Success);

    // openraft retries the same entries; the call waits for the request in flight and
    // sends nothing again.
    assert_eq!(replicate(&mut client, big_append(1000)).await, 1);
    assert_eq!(*seen.lock().expect("lock"), vec![3, 0]);
}

/// Entries `from..=to` of leader (3, 1), as the log store would publish them.
fn entries(from: u64, to: u64) -> Vec<Entry> {
    let mut req = big_append(10);
    req.entries = (from..=to)
        .map(|i| Entry {
            log_id: log_id(3, 1, i),
            payload: EntryPayload::Normal(Batch(vec![])),
        })
        .collect();
    req.entries
}

/// Waits (bounded) until the follower has seen `n` requests.
async fn seen_requests(seen: &Arc<std::sync::Mutex<Vec<usize>>>, n: usize) -> Vec<usize> {
    for _ in 0..500 {
        let s = seen.lock().expect("lock").clone();
        if s.len() >= n {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen.lock().expect("lock").clone()
}

#[tokio::test]
async fn the_leaders_new_entries_go_out_without_waiting_for_openraft() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(recording_follower(listener, Duration::ZERO, seen.clone()));
    let feed = Feed::default();
    let mut client = PeerClient::new(2, addr, NetConfig::default());
    client.feed = Some(feed.clone());
    // openraft's first call starts the chain at 9.
    replicate(&mut client, big_append(10)).await;
    // The log store takes 13 and 14: they go at once, in one request, with no call.
    feed.publish(entries(13, 14));
    assert_eq!(seen_requests(&seen, 2).await, vec![3, 2]);
    // An entry that does not follow on (15 is missing) is not sent; openraft's call for
    // 12..=16 then sends the rest, and nothing twice.
    feed.publish(entries(16, 16));
    let mut req = big_append(10);
    req.prev_log_id = Some(log_id(3, 1, 12));
    req.entries = entries(13, 16);
    replicate(&mut client, req).await;
    assert_eq!(seen.lock().expect("lock").clone(), vec![3, 2, 2]);
    // Entries another leader made (a replica that stopped leading appends them as a
    // follower) are never sent under this leader's vote.
    let mut other = entries(17, 17);
    other[0].log_id = log_id(4, 2, 17);
    feed.publish(other);
    feed.publish(entries(17, 17));
    assert_eq!(seen_requests(&seen, 4).await, vec![3, 2, 2, 1]);
}

/// A follower that answers nothing until it has read `hold` requests, then answers all:
/// only a pipelined leader gets replies from it.
async fn holding_follower(
    listener: TcpListener,
    hold: usize,
    seen: Arc<std::sync::Mutex<Vec<usize>>>,
) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let mut conn = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
    let mut read = 0;
    while let Some(Ok(frame)) = conn.next().await {
        if let Ok(RaftRpc::Append(req)) = postcard::from_bytes::<RaftRpc>(&frame) {
            seen.lock().expect("lock").push(req.entries.len());
        }
        read += 1;
        if read == hold {
            for _ in 0..hold {
                if answer(&mut conn, AppendEntriesResponse::Success)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        } else if read > hold {
            let _ = answer(&mut conn, AppendEntriesResponse::Success).await;
        }
    }
}

#[tokio::test]
async fn several_appends_are_in_flight_to_one_follower_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(holding_follower(listener, 3, seen.clone()));
    let feed = Feed::default();
    let mut client = PeerClient::new(2, addr, NetConfig::default());
    client.feed = Some(feed.clone());
    let first = client.append_entries(big_append(10), RPCOption::new(Duration::from_millis(50)));
    // Nothing is answered before three requests are out, so the call cannot succeed yet.
    assert!(first.await.is_err());
    feed.publish(entries(13, 13));
    feed.publish(entries(14, 14));
    // Three requests out with no reply yet: the pipeline did not wait for one.
    assert_eq!(seen_requests(&seen, 3).await, vec![3, 1, 1]);
    let mut req = big_append(10);
    req.prev_log_id = Some(log_id(3, 1, 9));
    req.entries.extend(entries(13, 14));
    replicate(&mut client, req).await;
}

#[tokio::test]
async fn with_a_depth_of_one_the_next_append_waits_for_the_reply_to_the_one_before() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Answers nothing before it has two requests: a depth-1 pipeline never sends two.
    tokio::spawn(holding_follower(listener, 2, seen.clone()));
    let feed = Feed::default();
    let config = NetConfig {
        pipeline_depth: 1,
        ..NetConfig::default()
    };
    let mut client = PeerClient::new(2, addr, config);
    client.feed = Some(feed.clone());
    let short = || RPCOption::new(Duration::from_millis(50));
    assert!(client
        .append_entries(big_append(10), short())
        .await
        .is_err());
    feed.publish(entries(13, 13));
    // The entry waits in `pending`: another call still finds one request out, unanswered.
    let mut req = big_append(10);
    req.entries.extend(entries(13, 13));
    assert!(client.append_entries(req, short()).await.is_err());
    assert_eq!(seen_requests(&seen, 1).await, vec![3]);
}

/// A follower whose first connection reads and never answers; later ones answer `Success`.
async fn mute_then_answering_follower(
    listener: TcpListener,
    seen: Arc<std::sync::Mutex<Vec<usize>>>,
) {
    let mut first = true;
    while let Ok((stream, _)) = listener.accept().await {
        let (mute, seen) = (first, seen.clone());
        first = false;
        tokio::spawn(async move {
            let mut conn = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
            while let Some(Ok(frame)) = conn.next().await {
                if let Ok(RaftRpc::Append(req)) = postcard::from_bytes::<RaftRpc>(&frame) {
                    seen.lock().expect("lock").push(req.entries.len());
                }
                if !mute
                    && answer(&mut conn, AppendEntriesResponse::Success)
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
    }
}

#[tokio::test]
async fn an_append_unanswered_by_its_deadline_drops_the_connection_and_goes_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(mute_then_answering_follower(listener, seen.clone()));
    let mut client = PeerClient::new(2, addr, NetConfig::default());
    // The call waits past the request's deadline (1 s + bytes / rate): the pipeline gives up
    // on that connection and the call hears of it as a network error, not a conflict.
    let r = client
        .append_entries(big_append(10), RPCOption::new(Duration::from_secs(5)))
        .await;
    assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
    // openraft asks again: the entries go over a new connection, and are acknowledged.
    assert_eq!(replicate(&mut client, big_append(10)).await, 1);
    assert_eq!(seen.lock().expect("lock").clone(), vec![3, 3]);
}

/// A follower that refuses every append.
async fn refusing_follower(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut conn = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
            while let Some(Ok(_)) = conn.next().await {
                if answer(&mut conn, AppendEntriesResponse::Conflict)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

#[tokio::test]
async fn a_refusal_is_a_conflict_for_the_call_whose_prev_log_id_it_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(refusing_follower(listener));
    let mut client = PeerClient::new(2, addr, NetConfig::default());
    let opt = || RPCOption::new(Duration::from_secs(5));
    let r = client.append_entries(big_append(10), opt()).await;
    assert_eq!(r.expect("answer"), AppendEntriesResponse::Conflict);
    // openraft probes further back: that request is refused too, and reported as such.
    let mut req = big_append(10);
    req.prev_log_id = Some(log_id(3, 1, 5));
    req.entries = entries(6, 12);
    let r = client.append_entries(req, opt()).await;
    assert_eq!(r.expect("answer"), AppendEntriesResponse::Conflict);
}

/// A real single-replica Raft on the project's storage, served on a loopback port.
async fn served_raft() -> (tempfile::TempDir, Raft, String, CancellationToken) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(&dir.path().join("raft")).expect("log store");
    let sm = StateMachine::open(dir.path()).expect("state machine");
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 10_000,
        election_timeout_max: 20_000,
        ..Default::default()
    }
    .validate()
    .expect("config");
    let raft = Raft::new(1, Arc::new(config), Network::default(), log, sm)
        .await
        .expect("raft");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        raft.clone(),
        shutdown.clone(),
        NetConfig::default().max_frame,
        protocol::trust::Trust::none(),
    ));
    (dir, raft, addr, shutdown)
}

#[tokio::test]
async fn server_answers_rpcs_survives_garbage_and_maps_remote_errors() {
    let (_dir, raft, addr, shutdown) = served_raft().await;

    // Garbage: the server closes that connection and keeps serving others.
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut raw = Framed::new(Stream::from(stream), codec(NetConfig::default().max_frame));
    raw.send(Bytes::from_static(b"\xff\xff\xff\xff\xff\xffnot postcard"))
        .await
        .expect("send garbage");
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.next())
        .await
        .expect("server must close the connection");
    assert!(closed.as_ref().is_none_or(|r| r.is_err()), "{closed:?}");

    let mut client = client_for(&addr);
    let opt = || RPCOption::new(Duration::from_secs(5));
    let vote = client
        .vote(VoteRequest::new(Vote::new(7, 2), None), opt())
        .await
        .expect("vote");
    assert!(vote.vote_granted, "{vote:?}");
    assert_eq!(vote.vote, Vote::new(7, 2));

    // An empty append from the candidate it just voted for: it has no log, so a conflict
    // only if prev_log_id is set; with none it is a success.
    let heartbeat = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(7, 2),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let r = client
        .append_entries(heartbeat, opt())
        .await
        .expect("append");
    assert_eq!(r, AppendEntriesResponse::Success);

    // A snapshot chunk at a non-zero offset with no transfer under way is an API error of
    // the remote Raft, which must arrive as such. (With a lower vote than the one it holds,
    // the Raft would just answer with its vote instead.)
    let mut chunk = snapshot_request(4);
    chunk.vote = Vote::new_committed(7, 2);
    let r = client.install_snapshot(chunk, opt()).await;
    assert!(
        matches!(
            r,
            Err(RPCError::RemoteError(RemoteError {
                target: 2,
                source: openraft::error::RaftError::APIError(
                    InstallSnapshotError::SnapshotMismatch(_)
                ),
                ..
            }))
        ),
        "{r:?}"
    );

    // A stopped Raft answers with a fatal error, again remote, not a network failure.
    raft.shutdown().await.expect("shutdown");
    let r = client
        .vote(VoteRequest::new(Vote::new(8, 2), None), opt())
        .await;
    assert!(
        matches!(
            r,
            Err(RPCError::RemoteError(RemoteError {
                source: openraft::error::RaftError::Fatal(_),
                ..
            }))
        ),
        "{r:?}"
    );

    // Shutdown ends the accept loop and the open connection. A replica restarted on the
    // same address is then reached on the first try: the client notices its connection
    // was closed and redials instead of failing the call.
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(client.conn.is_some());
    let listener = TcpListener::bind(&addr).await.expect("rebind");
    tokio::spawn(echo_voter(listener, Duration::ZERO));
    let r = client
        .vote(VoteRequest::new(Vote::new(9, 2), None), opt())
        .await
        .expect("vote to the restarted replica");
    assert_eq!(r.vote, Vote::new(9, 2));
}

#[test]
fn appends_that_continue_one_another_merge_and_others_do_not() {
    let mut first = big_append(10);
    first.entries.truncate(1); // 10, after 9
    let mut second = big_append(10);
    second.prev_log_id = Some(log_id(3, 1, 10));
    second.entries = entries(11, 12);
    second.leader_commit = Some(log_id(3, 1, 10));
    assert!(serve::merge(&mut first, second).is_ok());
    let got: Vec<u64> = first.entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(got, vec![10, 11, 12]);
    assert_eq!(first.leader_commit, Some(log_id(3, 1, 10)));
    // A gap (13 is missing) or another vote is not merged, and comes back unchanged.
    let mut gap = big_append(10);
    gap.prev_log_id = Some(log_id(3, 1, 13));
    gap.entries = entries(14, 14);
    let back = serve::merge(&mut first, gap).expect_err("a gap does not merge");
    assert_eq!(back.entries.len(), 1);
    let mut other_vote = big_append(10);
    other_vote.vote = Vote::new_committed(4, 2);
    other_vote.prev_log_id = Some(log_id(3, 1, 12));
    other_vote.entries = entries(13, 13);
    assert!(serve::merge(&mut first, other_vote).is_err());
    assert_eq!(first.entries.len(), 3);
}
