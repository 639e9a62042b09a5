//! Unit tests of the committer's batching and deadlines, and of the checkpoint triggers.

use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::oneshot;

use protocol::log::Request as LogRequest;
use protocol::log_client::Replicas;

use super::batch::{build_batch, expire, Batch, CommitReq, Outbox, BATCH_BYTES};
use super::checkpoint::Checkpointer;
use super::committer::Leader;
use super::{Config, EngineError, DEFAULT_LOG_PIPELINE};
use crate::record::Record;

fn cfg(ratio: f64) -> Config {
    Config {
        sequencer: String::new(),
        log: Vec::new(),
        checkpoint_every: 100,
        checkpoint_bytes: 1_000_000,
        checkpoint_ratio: ratio,
        follow_log: false,
        commit_timeout: Duration::from_secs(10),
        log_pipeline: DEFAULT_LOG_PIPELINE,
        trust: protocol::trust::Trust::none(),
    }
}

fn commit_req(
    ts: u64,
    writes: Vec<(Bytes, Option<Bytes>)>,
    deadline: tokio::time::Instant,
) -> (CommitReq, oneshot::Receiver<Result<(), EngineError>>) {
    CommitReq::new(
        Record::Commit {
            ts,
            epoch: ts,
            writes,
        },
        deadline,
    )
}

fn outbox() -> Outbox {
    Outbox {
        leader: Leader {
            replicas: Replicas::new(Vec::new()),
            conn: None,
            trust: protocol::trust::Trust::none(),
        },
        inflight: VecDeque::new(),
        queue: VecDeque::new(),
        queued_bytes: 0,
        unsettled: Vec::new(),
        client: Bytes::from(format!("kv-{}", u64::MAX)),
        seq: 0,
    }
}

#[test]
fn the_worst_case_transaction_fits_one_append_under_the_logs_default_line_limit() {
    // 1 MiB of writes (--max-txn-bytes' default), every byte one that is quoted as \xHH,
    // with a key of the largest size, and the longest timestamps, client and seq.
    let max_txn_bytes = 1 << 20;
    let key = Bytes::from(vec![0xffu8; protocol::cmd::MAX_KEY_LEN]);
    let value = Bytes::from(vec![0xffu8; max_txn_bytes - key.len()]);
    let (req, _rx) = commit_req(
        u64::MAX,
        vec![(key, Some(value))],
        tokio::time::Instant::now(),
    );
    let mut queue = VecDeque::from([req]);
    let built = build_batch(&mut queue, &outbox().client, u64::MAX);
    assert_eq!(built.reqs.len(), 1);
    // This is the line the committer sends, byte for byte.
    let parsed = LogRequest::parse(&built.line);
    assert!(matches!(parsed, Ok(Some(LogRequest::Append { .. }))));
    assert!(
        built.line.len() < protocol::log::LOG_MAX_LINE,
        "APPEND line of {} bytes is over the log's default --max-line {}",
        built.line.len(),
        protocol::log::LOG_MAX_LINE
    );
    // About 5x the raw bytes (\xff in the record, \\xff in the APPEND line).
    assert!(built.line.len() > 5 * max_txn_bytes);
}

#[test]
fn commits_share_an_entry_only_up_to_the_batch_limit_counted_as_encoded() {
    let now = tokio::time::Instant::now();
    let mut queue = VecDeque::new();
    let mut keep = Vec::new();
    // Small commits whose raw size is far below BATCH_BYTES but whose quoted size is not.
    for ts in 1..=40u64 {
        let v = Bytes::from(vec![0x01u8; 8 * 1024]);
        let (r, rx) = commit_req(ts, vec![(Bytes::from_static(b"k"), Some(v))], now);
        queue.push_back(r);
        keep.push(rx);
    }
    let big = Bytes::from(vec![b'"'; BATCH_BYTES]);
    let (r, rx) = commit_req(41, vec![(Bytes::from_static(b"big"), Some(big))], now);
    queue.push_back(r);
    keep.push(rx);
    let client = outbox().client;
    let mut seq = 0;
    let mut batches = Vec::new();
    while !queue.is_empty() {
        seq += 1;
        batches.push(build_batch(&mut queue, &client, seq));
    }
    let sizes: Vec<usize> = batches.iter().map(|b| b.reqs.len()).collect();
    // 40 x 8 KiB raw is 320 KiB, but 8 KiB of \x01 is 40 KiB in the APPEND line.
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 41);
    for b in &batches[..batches.len() - 1] {
        assert!(b.line.len() <= BATCH_BYTES, "{}", b.line.len());
        assert!(b.full);
    }
    // The large one goes alone, and last, in order.
    let last = batches.last().map(|b| (b.reqs.len(), b.reqs[0].ts()));
    assert_eq!(last, Some((1, Some(41))));
    let order: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.reqs.iter().filter_map(CommitReq::ts))
        .collect();
    assert_eq!(order, (1..=41).collect::<Vec<_>>());
}

#[test]
fn a_timed_out_commit_is_answered_once_and_never_acknowledged_later() {
    let t0 = tokio::time::Instant::now();
    let timeout = Duration::from_secs(10);
    let mut out = outbox();
    let (sent, mut sent_rx) = commit_req(1, vec![(Bytes::from_static(b"a"), None)], t0);
    let (queued, mut queued_rx) = commit_req(
        2,
        vec![(Bytes::from_static(b"b"), None)],
        t0 + Duration::from_secs(1),
    );
    let (fresh, mut fresh_rx) = commit_req(
        3,
        vec![(Bytes::from_static(b"c"), None)],
        t0 + Duration::from_secs(30),
    );
    out.push(sent);
    let built = build_batch(&mut out.queue, &out.client, 1);
    out.inflight.push_back(Batch {
        line: built.line,
        tss: vec![1],
        reqs: built.reqs,
        bytes: built.bytes,
        answered: 0,
    });
    out.push(queued);
    out.push(fresh);

    let (next, dropped) = expire(&mut out, t0 + Duration::from_secs(2), timeout);
    assert_eq!(next, Some(t0 + Duration::from_secs(30)));
    // The queued one never reached the log: dropped, and said so.
    assert_eq!(dropped, vec![2]);
    assert_eq!(out.queue.len(), 1);
    let msg = |r: Result<Result<(), EngineError>, _>| match r {
        Ok(Err(EngineError::Unavailable(m))) => m,
        other => panic!("{other:?}"),
    };
    assert!(msg(queued_rx.try_recv()).starts_with("commit not made"));
    // The sent one: outcome unknown, and its entry stays in flight to be settled.
    assert!(msg(sent_rx.try_recv()).starts_with("commit outcome unknown"));
    assert_eq!(out.inflight.len(), 1);
    assert!(fresh_rx.try_recv().is_err());

    // The entry lands after all: answering it again sends nothing.
    if let Some(b) = out.inflight.pop_front() {
        for mut r in b.reqs {
            r.answer(Ok(()));
        }
    }
    assert!(sent_rx.try_recv().is_err());
}

#[test]
fn a_checkpoint_is_due_on_either_trigger() {
    let c = Checkpointer::new(&cfg(0.5));
    assert!(!c.is_due(99, 999_999, 0));
    assert!(c.is_due(100, 10, 0));
    assert!(c.is_due(1, 1_000_000, 0));
}

#[test]
fn a_large_last_checkpoint_defers_the_next_until_the_log_has_grown_enough() {
    let c = Checkpointer::new(&cfg(0.5));
    // 100 commits are due against a small checkpoint...
    assert!(c.is_due(100, 5_000, 10_000));
    // ...but not against one of 100 MB: the log must first hold half of that.
    assert!(!c.is_due(100_000, 999_999, 100_000_000));
    assert!(!c.is_due(100_000, 49_999_999, 100_000_000));
    assert!(c.is_due(100_000, 50_000_000, 100_000_000));
    // Ratio 0: the triggers alone.
    assert!(Checkpointer::new(&cfg(0.0)).is_due(100, 1, 100_000_000));
}

#[test]
fn one_checkpoint_runs_at_a_time_and_a_failed_one_gives_back_what_it_was_to_cover() {
    let c = std::sync::Arc::new(Checkpointer::new(&cfg(0.0)));
    c.count(99, 10);
    assert!(c.due().is_none(), "99 commits are not due");
    c.count(1, 10);
    let ticket = c.due().expect("100 commits are due");
    assert!(c.running());
    assert_eq!(c.counted(), (0, 0), "the ticket took them over");
    c.count(100, 10);
    assert!(c.due().is_none(), "a second one while the first runs");
    // The upload fails: the 100 commits it covered count again, on top of the 100 since,
    // but the next try waits CHECKPOINT_RETRY.
    drop(ticket);
    assert!(!c.running());
    assert_eq!(c.counted(), (200, 30));
    assert!(c.due().is_none(), "retried at once after a failure");
}

#[test]
fn only_a_start_that_cannot_succeed_is_fatal() {
    use super::error::{GapError, RecoveryError};
    let fatal = [
        RecoveryError::SequencerBehind { log: 9, ours: 3 },
        RecoveryError::FencedWhileStarting(9),
        RecoveryError::NoSuccessor(u64::MAX),
        RecoveryError::Gap(GapError::NoSuccessor(u64::MAX)),
        // A record or a checkpoint no kvstore wrote: the same bytes are there next time.
        RecoveryError::from(GapError::Bad(super::vet::BadRecord {
            index: 17,
            fault: super::vet::Fault::Zero("EPOCH"),
        })),
        RecoveryError::Checkpoint(super::error::CheckpointError::Bad {
            id: 4,
            index: 40,
            why: "does not decode".into(),
        }),
    ];
    for e in &fatal {
        assert!(e.is_fatal(), "{e}");
    }
    let transient = [
        RecoveryError::Sequencer(EngineError::Unavailable("unreachable".into())),
        RecoveryError::Log(protocol::ClientError::Closed),
        RecoveryError::Gap(GapError::Compacted(5)),
        RecoveryError::Checkpoint(super::error::CheckpointError::NotConnected),
    ];
    for e in &transient {
        assert!(!e.is_fatal(), "{e}");
    }
    // A gap read is retried unless only another kvstore explains the gap.
    assert!(GapError::Log(protocol::ClientError::Closed).is_transient());
    assert!(GapError::OutOfStep(3).is_transient());
    assert!(!GapError::Compacted(5).is_transient());
    assert!(!GapError::NoSuccessor(u64::MAX).is_transient());
    assert!(GapError::Sequencer("unreachable".into()).is_transient());
    // A bad record stops recovery with one line naming its index.
    let msg = fatal[4].to_string();
    assert!(
        msg.starts_with("recovery stopped at log index 17: EPOCH is 0"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    let msg = fatal[5].to_string();
    assert!(
        msg.contains("checkpoint 4 (at log index 40) cannot be loaded"),
        "{msg}"
    );
    // The message names the cause and the remedy, on one line.
    let msg = fatal[0].to_string();
    assert!(msg.contains("sequencer is behind the log") && msg.contains("--reset-to"));
    assert!(!msg.contains('\n'));
}
