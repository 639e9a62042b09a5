//! Unit tests of the state machine's encodings and its apply step.

use super::*;

/// The layout of `StoredSnapshot` before its data became `Bytes`.
#[derive(Serialize)]
struct VecSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

#[test]
fn snapshot_files_written_with_a_vec_still_decode() {
    let meta = SnapshotMeta {
        last_log_id: None,
        last_membership: StoredMembership::default(),
        snapshot_id: "T1-N1-42-0".into(),
    };
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let old = postcard::to_stdvec(&VecSnapshot {
        meta: meta.clone(),
        data: data.clone(),
    })
    .unwrap();
    let new = StoredSnapshot {
        meta,
        data: Bytes::from(data.clone()),
    };
    assert_eq!(
        postcard::to_stdvec(&new).unwrap(),
        old,
        "same bytes on disk"
    );
    let file = encode_snapshot_file(&new).unwrap();
    let back = decode_snapshot_file(&file).unwrap();
    assert_eq!(back.data, data);
    assert_eq!(back.meta.snapshot_id, "T1-N1-42-0");
}

fn append(d: &mut SmData, seq: u64, payload: &'static [u8]) -> OpResult {
    apply_op(
        d,
        Op::Append {
            client: Bytes::from_static(b"kv-1"),
            seq,
            payload: Bytes::from_static(payload),
        },
    )
}

#[test]
fn a_seq_left_unused_does_not_disturb_the_next_appends() {
    // The kvstore skips the seq of an APPEND the log refused (too large, say): seqs are
    // remembered as a set, not as a counter that must advance by one.
    let mut d = SmData::default();
    assert!(matches!(append(&mut d, 1, b"a"), OpResult::Appended(1)));
    assert!(matches!(append(&mut d, 3, b"c"), OpResult::Appended(2)));
    assert!(matches!(append(&mut d, 4, b"d"), OpResult::Appended(3)));
    // Retries still answer the original index; the skipped seq was never taken.
    assert!(matches!(append(&mut d, 3, b"c"), OpResult::Duplicate(2)));
    assert!(matches!(append(&mut d, 1, b"a"), OpResult::Duplicate(1)));
    assert_eq!(d.next_index, 4);
    assert_eq!(d.entries.len(), 3);
}

/// The layout snapshots used when the staged bytes were one `Vec<u8>`.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct OldStaging {
    id: u64,
    data: Vec<u8>,
}

#[test]
fn staged_chunks_are_stored_in_snapshots_exactly_as_the_old_contiguous_bytes() {
    let mut data = Chunks::default();
    for part in [&b"hello "[..], b"", b"checkpoint", b" world"] {
        data.push(Bytes::copy_from_slice(part));
    }
    assert_eq!(data.len(), 22);
    assert_eq!(data.crc32c(), crc32c::crc32c(b"hello checkpoint world"));
    let new = postcard::to_allocvec(&Staging { id: 7, data }).unwrap();
    let old = OldStaging {
        id: 7,
        data: b"hello checkpoint world".to_vec(),
    };
    assert_eq!(new, postcard::to_allocvec(&old).unwrap());
    let back: Staging = postcard::from_bytes(&postcard::to_allocvec(&old).unwrap()).unwrap();
    assert_eq!(back.id, 7);
    assert_eq!(&back.data.join()[..], b"hello checkpoint world");
}

#[test]
fn a_damaged_snapshot_file_refuses_to_open_and_says_what_is_wrong() {
    let stored = StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "--0".into(),
        },
        data: Bytes::from(postcard::to_stdvec(&SmData::default()).unwrap()),
    };
    let good = encode_snapshot_file(&stored).unwrap();
    assert!(decode_snapshot_file(&good).is_ok());
    assert!(matches!(
        decode_snapshot_file(&good[..good.len() - 1]),
        Err(RecordError::Truncated { .. })
    ));
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(
        decode_snapshot_file(&flipped).err(),
        Some(RecordError::Checksum)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snapshot"), &flipped).unwrap();
    let err = StateMachine::open(dir.path())
        .err()
        .expect("a damaged snapshot must not open");
    let msg = err.to_string();
    assert!(
        msg.contains("snapshot file: checksum mismatch") && msg.contains("move it away"),
        "{msg}"
    );
}

/// Stages `data` as upload `id` and commits it at `index`.
fn commit_upload(d: &mut SmData, id: u64, index: u64, data: &[u8]) -> OpResult {
    let staged = apply_op(
        d,
        Op::CkptChunk {
            id,
            offset: 0,
            data: Bytes::copy_from_slice(data),
        },
    );
    assert!(matches!(staged, OpResult::Done));
    apply_op(
        d,
        Op::CkptCommit {
            id,
            index,
            len: data.len() as u64,
            crc: crc32c::crc32c(data),
        },
    )
}

/// A checkpoint as the kvstore encodes it, stating `index`.
fn kv_checkpoint(index: u64) -> Vec<u8> {
    postcard::to_stdvec(&protocol::kvlog::Checkpoint {
        index,
        max_ts: 20,
        epoch: 3,
        entries: vec![(Bytes::from("k"), 20, Bytes::from("v"))],
    })
    .unwrap()
}

fn with_entries(n: u64) -> SmData {
    let mut d = SmData::default();
    for seq in 1..=n {
        assert!(matches!(
            append(&mut d, seq, b"EPOCH 1"),
            OpResult::Appended(_)
        ));
    }
    d
}

fn rejected(r: OpResult) -> String {
    match r {
        OpResult::Rejected(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_checkpoint_of_junk_is_refused_and_the_log_stays_whole() {
    // The attack: `CKPT_PUT 424242 0 x`, then a commit at the last index with the
    // right length and CRC.
    let mut d = with_entries(5);
    let why = rejected(commit_upload(&mut d, 424242, 5, b"x"));
    assert!(
        why.contains("does not decode as a kvstore checkpoint"),
        "{why}"
    );
    assert_eq!((d.first_index, d.entries.len()), (1, 5));
    assert!(d.checkpoint.is_none());
    // The junk upload is gone: it can never commit.
    assert!(d.staging.is_none());
}

#[test]
fn a_checkpoint_must_cover_entries_that_exist_above_the_current_one() {
    let mut d = with_entries(5);
    let why = rejected(commit_upload(&mut d, 1, 6, &kv_checkpoint(6)));
    assert!(why.contains("beyond the last entry 5"), "{why}");
    let why = rejected(commit_upload(&mut d, 1, 0, &kv_checkpoint(0)));
    assert!(why.contains("index 0 covers no entry"), "{why}");
    assert!(matches!(
        commit_upload(&mut d, 1, 3, &kv_checkpoint(3)),
        OpResult::Done
    ));
    assert_eq!((d.first_index, d.entries.len()), (4, 2));
    for index in [2, 3] {
        let why = rejected(commit_upload(&mut d, 2, index, &kv_checkpoint(index)));
        assert!(
            why.contains("not above the current checkpoint's (3)"),
            "{why}"
        );
    }
    assert_eq!(d.checkpoint.as_ref().map(|c| c.index), Some(3));
}

#[test]
fn a_checkpoint_stating_another_index_than_its_commit_is_refused() {
    let mut d = with_entries(5);
    let why = rejected(commit_upload(&mut d, 1, 4, &kv_checkpoint(2)));
    assert!(
        why.contains("says it covers index 2, the commit says 4"),
        "{why}"
    );
    assert_eq!((d.first_index, d.entries.len()), (1, 5));
}

#[test]
fn an_incomplete_or_damaged_upload_is_refused() {
    let mut d = with_entries(5);
    let data = kv_checkpoint(4);
    let staged = apply_op(
        &mut d,
        Op::CkptChunk {
            id: 1,
            offset: 0,
            data: Bytes::copy_from_slice(&data[..data.len() - 1]),
        },
    );
    assert!(matches!(staged, OpResult::Done));
    let commit = |crc| Op::CkptCommit {
        id: 1,
        index: 4,
        len: data.len() as u64,
        crc,
    };
    let why = rejected(apply_op(&mut d, commit(crc32c::crc32c(&data))));
    assert!(why.contains("bytes staged, commit says"), "{why}");
    let rest = Op::CkptChunk {
        id: 1,
        offset: data.len() as u64 - 1,
        data: Bytes::copy_from_slice(&data[data.len() - 1..]),
    };
    assert!(matches!(apply_op(&mut d, rest), OpResult::Done));
    let why = rejected(apply_op(&mut d, commit(crc32c::crc32c(&data) ^ 1)));
    assert!(why.contains("fails its CRC"), "{why}");
    assert!(matches!(
        apply_op(&mut d, commit(crc32c::crc32c(&data))),
        OpResult::Done
    ));
    assert_eq!(d.first_index, 5);
}
