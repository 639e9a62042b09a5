//! The log store and state machine against openraft's own storage test suite, and the
//! properties the suite does not check: durability across reopen, torn tails, corruption.

use bytes::Bytes;
use logserver::log_store::{LogStore, LogStoreError};
use logserver::state_machine::{CheckpointInfo, ReadError, StateMachine};
use logserver::types::{Batch, BatchResult, Entry, Node, Op, OpResult, StorageError, TypeConfig};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{EntryPayload, RaftLogReader};
use std::fs;
use std::path::Path;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft")).expect("open log");
        let sm = StateMachine::open(dir.path()).expect("open sm");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite: {e}");
    }
}

fn append_entry(index: u64, client: &str, seq: u64, payload: &str) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Batch(vec![Op::Append {
            client: Bytes::from(client.to_string()),
            seq,
            payload: Bytes::from(payload.to_string()),
        }])),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The last log id of the log in `dir`, opened afresh (as after a restart).
async fn last_after_reopen(dir: &Path) -> Option<openraft::LogId<u64>> {
    let mut log = LogStore::open(dir).unwrap();
    log.get_log_state().await.unwrap().last_log_id
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

#[test]
fn log_vote_and_purge_survive_reopen() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            log.save_vote(&openraft::Vote::new(7, 2)).await.unwrap();
            log.blocking_append((1..=20).map(|i| append_entry(i, "c", i, "x")))
                .await
                .unwrap();
            log.purge(log_id(1, 1, 5)).await.unwrap();
            log.truncate(log_id(1, 1, 18)).await.unwrap();
        }
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(openraft::Vote::new(7, 2))
        );
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 5)));
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 17)));
        let entries = log.try_get_log_entries(0..100).await.unwrap();
        let idx: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(idx, (6..=17).collect::<Vec<_>>());
        // Appending after a reopen continues the same log.
        log.blocking_append([append_entry(18, "c", 18, "y")])
            .await
            .unwrap();
        drop(log);
        assert_eq!(last_after_reopen(dir.path()).await, Some(log_id(1, 1, 18)));
    });
}

#[test]
fn torn_or_corrupt_final_record_is_truncated() {
    rt().block_on(async {
        for damage in ["cut", "flip"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut log = LogStore::open(dir.path()).unwrap();
                log.blocking_append((1..=10).map(|i| append_entry(i, "c", i, "payload")))
                    .await
                    .unwrap();
            }
            let seg = segments(dir.path()).pop().unwrap();
            let mut bytes = fs::read(&seg).unwrap();
            match damage {
                "cut" => bytes.truncate(bytes.len() - 3),
                _ => {
                    let n = bytes.len();
                    bytes[n - 2] ^= 0xff;
                }
            }
            fs::write(&seg, &bytes).unwrap();
            let mut log = LogStore::open(dir.path()).unwrap();
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id, Some(log_id(1, 1, 9)), "damage: {damage}");
            // The file was cut back to the last good record, and appends carry on from there.
            log.blocking_append([append_entry(10, "c", 10, "again")])
                .await
                .unwrap();
            drop(log);
            assert_eq!(last_after_reopen(dir.path()).await, Some(log_id(1, 1, 10)));
        }
    });
}

#[test]
fn corrupt_record_in_the_middle_refuses_to_open() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            log.blocking_append((1..=10).map(|i| append_entry(i, "c", i, "payload")))
                .await
                .unwrap();
        }
        let seg = segments(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[20] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        match LogStore::open(dir.path()) {
            Err(e @ LogStoreError::Corrupt { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("corrupt record") && msg.contains("refusing"),
                    "{msg}"
                );
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a log with a corrupt record in the middle"),
        }
    });
}

#[test]
fn segments_rotate_and_purge_drops_whole_files() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        // ~1 MiB entries so a few segments fill quickly.
        let big = "z".repeat(1 << 20);
        let per_segment = logserver::log_store::SEGMENT_BYTES >> 20;
        let n = per_segment * 2 + 5;
        for i in 1..=n {
            log.blocking_append([append_entry(i, "c", i, &big)])
                .await
                .unwrap();
        }
        let segs = segments(dir.path());
        assert!(
            segs.len() >= 3,
            "expected rotation, got {} segments",
            segs.len()
        );
        log.purge(log_id(1, 1, per_segment + 2)).await.unwrap();
        assert!(
            segments(dir.path()).len() < segs.len(),
            "a fully purged segment stays"
        );
        drop(log);
        let mut log = LogStore::open(dir.path()).unwrap();
        let entries = log.try_get_log_entries(0..).await.unwrap();
        assert_eq!(entries.first().unwrap().log_id.index, per_segment + 3);
        assert_eq!(entries.last().unwrap().log_id.index, n);
    });
}

fn normal(index: u64, ops: Vec<Op>) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Batch(ops)),
    }
}

fn app(client: &str, seq: u64, payload: &str) -> Op {
    Op::Append {
        client: Bytes::from(client.to_string()),
        seq,
        payload: Bytes::from(payload.to_string()),
    }
}

#[test]
fn state_machine_dedupes_checkpoints_and_compacts() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let r = sm
            .apply([
                Entry {
                    log_id: log_id(1, 1, 1),
                    payload: EntryPayload::Blank,
                },
                normal(
                    2,
                    vec![app("a", 1, "one"), app("b", 1, "two"), app("a", 1, "dup")],
                ),
                normal(3, vec![app("a", 2, "three")]),
            ])
            .await
            .unwrap();
        assert_eq!(
            r,
            vec![
                BatchResult(vec![]),
                BatchResult(vec![
                    OpResult::Appended(1),
                    OpResult::Appended(2),
                    OpResult::Duplicate(1)
                ]),
                BatchResult(vec![OpResult::Appended(3)]),
            ]
        );
        let read: Vec<(u64, Bytes)> = sm.read(1, 10, usize::MAX).unwrap();
        assert_eq!(
            read,
            vec![(1, "one".into()), (2, "two".into()), (3, "three".into())]
        );
        // A page stops at the byte cap, but never comes back empty while entries remain.
        assert_eq!(
            sm.read(1, 10, 4).unwrap(),
            vec![(1, "one".into()), (2, "two".into())]
        );
        assert_eq!(sm.read(2, 10, 1).unwrap(), vec![(2, "two".into())]);
        assert_eq!(sm.lookup(b"a", 2), Some(3));

        // A checkpoint upload in two chunks, committed at index 2, compacts entries 1..=2.
        // (The logserver commits only a real kvstore checkpoint stating the index.)
        let ckpt = protocol::kvlog::Checkpoint {
            index: 2,
            max_ts: 7,
            epoch: 1,
            entries: vec![(Bytes::from("k"), 7, Bytes::from("state-as-of-2"))],
        }
        .encode()
        .unwrap();
        assert!(ckpt.len() > 7);
        let crc = crc32c::crc32c(&ckpt);
        let r = sm
            .apply([normal(
                4,
                vec![
                    Op::CkptChunk {
                        id: 9,
                        offset: 0,
                        data: Bytes::copy_from_slice(&ckpt[..5]),
                    },
                    Op::CkptChunk {
                        id: 9,
                        offset: 7,
                        data: Bytes::from_static(b"bad"),
                    },
                    Op::CkptChunk {
                        id: 9,
                        offset: 5,
                        data: Bytes::copy_from_slice(&ckpt[5..]),
                    },
                    Op::CkptCommit {
                        id: 9,
                        index: 2,
                        len: ckpt.len() as u64,
                        crc: crc ^ 1,
                    },
                    Op::CkptCommit {
                        id: 9,
                        index: 2,
                        len: ckpt.len() as u64,
                        crc,
                    },
                ],
            )])
            .await
            .unwrap();
        let results = &r[0].0;
        assert_eq!(results[0], OpResult::Done);
        assert!(
            matches!(results[1], OpResult::Rejected(_)),
            "out-of-order chunk accepted"
        );
        assert_eq!(results[2], OpResult::Done);
        assert!(
            matches!(results[3], OpResult::Rejected(_)),
            "bad CRC accepted"
        );
        assert_eq!(results[4], OpResult::Done);
        assert_eq!(sm.read(1, 10, usize::MAX), Err(ReadError::Compacted(3)));
        assert_eq!(
            sm.read(3, 10, usize::MAX).unwrap(),
            vec![(3, Bytes::from("three"))]
        );
        assert_eq!(
            sm.checkpoint_info(),
            Some(CheckpointInfo {
                id: 9,
                index: 2,
                len: ckpt.len() as u64,
                crc
            })
        );
        assert_eq!(&sm.checkpoint_read(9, 0, 100).unwrap()[..], &ckpt[..]);

        // A snapshot carries all of it to a fresh replica.
        use openraft::RaftSnapshotBuilder;
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let mut sm2 = StateMachine::open(dir2.path()).unwrap();
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(
            sm2.read(3, 10, usize::MAX).unwrap(),
            vec![(3, Bytes::from("three"))]
        );
        assert_eq!(
            sm2.lookup(b"a", 1),
            Some(1),
            "dedupe table travels with the snapshot"
        );
        assert_eq!(sm2.checkpoint_info(), sm.checkpoint_info());
        // And it survives a restart of that replica.
        drop(sm2);
        let sm3 = StateMachine::open(dir2.path()).unwrap();
        assert_eq!(sm3.positions().first, 3);
        let _ = Node::default();
    });
}
