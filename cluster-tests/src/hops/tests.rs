//! Unit tests of the marks join, the quantiles and the floor probe.

use super::*;
use protocol::hops::Hop;

fn m(hop: Hop, key: u64, aux: u64, t_us: u64) -> Mark {
    Mark {
        hop,
        key,
        aux,
        t_ns: t_us * 1000,
    }
}

/// One commit (ts 500) that became logical index 7 in Raft entry 40, replicated to two
/// followers of which follower 3 flushed first; a second commit (ts 501) that the log
/// never saw; and marks of other entries around them.
fn dumps(with_net_marks: bool) -> Dumps {
    let kv = vec![
        m(Hop::KvRecv, 500, 0, 1000),
        m(Hop::KvSend, 500, 9, 1010),
        m(Hop::KvRecv, 501, 0, 1020),
        m(Hop::KvLogOk, 500, 7, 1400),
        m(Hop::KvReply, 500, 0, 1420),
    ];
    let mut leader = vec![
        m(Hop::LogRecv, 6, 39, 900),
        m(Hop::LogRecv, 7, 40, 1040),
        m(Hop::LogPropose, 40, 0, 1050),
        m(Hop::LogAppend, 40, 0, 1060),
        m(Hop::LogFlushed, 40, 0, 1200),
        m(Hop::LogApply, 40, 0, 1350),
        m(Hop::LogReply, 40, 0, 1360),
        // A second flush mark of the same entry (a later group) does not count.
        m(Hop::LogFlushed, 40, 0, 1500),
    ];
    let mut f3 = vec![
        m(Hop::LogAppend, 40, 0, 1100),
        m(Hop::LogFlushed, 40, 0, 1300),
        m(Hop::LogAppend, 41, 0, 1301),
    ];
    if with_net_marks {
        f3.push(m(Hop::RaftRecv, 40, 0, 1080));
        leader.push(m(Hop::RaftSend, 40, 2, 1065));
        leader.push(m(Hop::RaftSend, 40, 3, 1070));
        leader.push(m(Hop::RaftAck, 40, 3, 1330));
        leader.push(m(Hop::RaftAck, 40, 2, 1340));
    }
    Dumps {
        kv,
        leader: Replica {
            id: 1,
            marks: leader,
        },
        followers: vec![
            Replica {
                id: 2,
                marks: vec![
                    m(Hop::LogAppend, 40, 0, 1080),
                    m(Hop::LogFlushed, 40, 0, 1310),
                ],
            },
            Replica { id: 3, marks: f3 },
        ],
    }
}

fn us_of(b: &Breakdown) -> Vec<Option<u64>> {
    b.segments
        .iter()
        .map(|s| match s.as_slice() {
            [] => None,
            [d] => Some(d / 1000),
            more => panic!("one commit joined, got {} samples", more.len()),
        })
        .collect()
}

#[test]
fn a_sampled_commit_is_followed_from_the_kvstore_through_the_quorum_and_back() {
    let b = breakdown(&dumps(true));
    assert_eq!((b.sampled, b.joined), (2, 1));
    // Follower 3 had it in its store at 1100, before the leader's fdatasync (1200).
    assert_eq!(b.follower_after_leader_flush, (0, 1));
    let want = [
        Some(10),  // kv queue
        Some(30),  // kv → leader
        Some(10),  // batcher
        Some(10),  // proposed → leader's store
        Some(140), // leader fdatasync
        Some(20),  // proposed → sent to follower 3 (the quorum one)
        Some(30),  // sent → follower 3's store
        Some(10),  // sent → read by follower 3
        Some(20),  // read → in its store
        Some(50),  // proposed → follower 3's store
        Some(200), // follower 3's fdatasync
        Some(30),  // flushed → ack
        Some(20),  // ack → applied
        Some(50),  // durable on both (1300) → applied
        Some(10),  // applied → replies
        Some(40),  // leader → committer
        Some(20),  // committer → client
        Some(420), // total
    ];
    assert_eq!(want.len(), SEGMENTS.len());
    let probe = Floor {
        fsync_p50: 1,
        fsync_p90: 1,
        rtt_p50: 15_000,
        rtt_p90: 15_000,
    };
    assert_eq!(b.own_floor(&probe), Some((140 + 200 + 30) * 1000));
    assert_eq!(us_of(&b), want);
}

#[test]
fn without_the_network_marks_only_their_segments_are_missing() {
    let b = breakdown(&dumps(false));
    let got = us_of(&b);
    for (i, name) in SEGMENTS.iter().enumerate() {
        assert_eq!(
            got[i].is_none(),
            name.ends_with('*'),
            "{name}: {:?}",
            got[i]
        );
    }
    let mut total = b.segments[SEGMENTS.len() - 1].clone();
    assert_eq!(quantile(&mut total, 0.5), Some(420_000));
}

#[test]
fn a_commit_the_log_never_answered_has_only_its_kvstore_segments() {
    let mut d = dumps(false);
    d.kv.retain(|k| k.key == 501 || k.hop == Hop::KvSend);
    let b = breakdown(&d);
    assert_eq!((b.sampled, b.joined), (1, 0));
    assert!(b.segments.iter().all(|s| s.is_empty()));
}

#[test]
fn the_floor_is_two_fdatasyncs_and_two_round_trips() {
    let f = Floor {
        fsync_p50: 200_000,
        fsync_p90: 900_000,
        rtt_p50: 30_000,
        rtt_p90: 60_000,
    };
    assert_eq!(f.total(), 460_000);
    assert_eq!(quantile(&mut [5, 1, 3], 0.5), Some(3));
    assert_eq!(quantile(&mut [], 0.5), None);
}

#[test]
fn the_floor_is_measured_on_the_given_directory_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let f = measure_floor(dir.path(), 20).unwrap();
    assert!(f.fsync_p50 > 0 && f.rtt_p50 > 0);
    assert!(f.fsync_p50 <= f.fsync_p90 && f.rtt_p50 <= f.rtt_p90);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
