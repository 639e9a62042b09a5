//! Recovery: load the latest checkpoint, replay the log after it, take over with `EPOCH`.
//!
//! **Fencing.** Each kvstore has an epoch (its first timestamp) and starts by appending
//! `EPOCH <e>`. Log indices are dense, so when an append comes back at an index other than the
//! next one, another writer has appended in between; the committer reads the gap
//! ([`Engine::read_gap`]), and if it holds a newer `EPOCH` this kvstore has been replaced: it
//! acknowledges nothing more and answers `ERR FENCED`. Replay skips commits made under an
//! epoch older than the newest `EPOCH` before them, which are exactly the ones a fenced
//! kvstore never acknowledged.
//!
//! A failed attempt starts over from an empty store with a new epoch, unless the failure is
//! one that trying again cannot mend ([`RecoveryError::is_fatal`]): the log holds an epoch
//! newer than the sequencer's (it would hand out used timestamps), a newer kvstore took
//! over while this one started (starting again would take the log back from it), or an entry
//! or the checkpoint is not what a kvstore of this cluster writes ([`super::vet`]: every entry
//! is vetted before it is applied, and neither applying nor skipping it is safe).

use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

use protocol::kvlog::Checkpoint;
use protocol::log::Request as LogRequest;
use protocol::{ClientError, ErrorCode, LogClient, Response};

use super::checkpoint::{connect_alongside, CKPT_CHUNK, CKPT_WINDOW};
use super::error::{CheckpointError, GapError, RecoveryError};
use super::vet::{vet_checkpoint, BadRecord, Fault};
use super::Engine;
use crate::lifecycle::{lock, Mode};
use crate::mvcc::Store;
use crate::record::Record;

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Replayed {
    /// The last index applied.
    last: u64,
    /// Entries applied.
    entries: u64,
}

impl Engine {
    /// Applies one log entry (`bytes` of payload) in order and counts the commits it applied.
    pub(super) fn apply_counted(&self, records: Vec<Record>, bytes: usize, epoch: &mut u64) {
        let n = self.apply_records(records, epoch);
        self.commits.fetch_add(n, Ordering::Relaxed);
        self.checkpointer.count(n, bytes as u64);
    }

    fn apply_records(&self, records: Vec<Record>, epoch: &mut u64) -> u64 {
        let mut applied = 0;
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        for r in records {
            match r {
                Record::Epoch(e) => *epoch = (*epoch).max(e),
                Record::Commit {
                    ts,
                    epoch: e,
                    writes,
                } => {
                    if e >= *epoch {
                        store.apply(ts, &writes);
                        applied += 1;
                    }
                }
            }
        }
        applied
    }

    /// Replays from `from` to the end of the log. A task of its own reads and parses pages
    /// ahead on a second connection, so the logserver's work, the network and parsing overlap
    /// with applying.
    async fn replay(&self, from: u64, epoch: &mut u64) -> Result<Replayed, GapError> {
        let mut pages = prefetch_pages(self.cfg.log.clone(), self.cfg.trust.clone(), from);
        let mut last = from.saturating_sub(1);
        let mut entries = 0;
        while let Some(page) = pages.recv().await {
            for (i, bytes, records) in page? {
                self.vet_entry(i, &records).await?;
                self.apply_counted(records, bytes, epoch);
                last = i;
                entries += 1;
            }
            if let Mode::Replaying { total, .. } = self.life.mode() {
                self.life.set_mode(Mode::Replaying {
                    done: last,
                    total: total.max(last),
                });
            }
        }
        Ok(Replayed { last, entries })
    }

    /// Loads the checkpoint, replays the log, fences older kvstores, then serves.
    pub(super) async fn recover(&self, log: &mut LogClient) -> Result<(), RecoveryError> {
        // A failed attempt is retried from scratch with an empty store: what it counted goes.
        self.commits.store(0, Ordering::Relaxed);
        self.checkpointer.reset();
        // The epoch must come from the sequencer now, not from a block fetched before an
        // earlier attempt: it orders kvstores by start, and a stale one would lose to (or be
        // refused behind) every kvstore started meanwhile, attempt after attempt.
        lock(&self.txns).discard_block();
        self.refill().await.map_err(RecoveryError::Sequencer)?;
        // The epoch is a timestamp: it orders kvstores by start.
        let my_epoch = lock(&self.txns).take().ok_or_else(|| {
            RecoveryError::Sequencer(super::EngineError::Unavailable(
                "the sequencer gave an empty block".into(),
            ))
        })?;
        self.life.set_epoch(my_epoch);
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Store::new();

        let mut seen_epoch = 0u64;
        let mut index = 0u64;
        let started = std::time::Instant::now();
        if let Some((ck, len, info)) = load_checkpoint(log).await? {
            self.vet_checkpoint(&ck, &info).await?;
            let fetched = started.elapsed().as_secs_f64();
            self.checkpointer.loaded(len);
            let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
            *store = Store::from_latest(ck.entries);
            index = ck.index;
            seen_epoch = ck.epoch;
            tracing::info!(
                "loaded checkpoint at log index {index} ({} keys) in {:.2} s ({fetched:.2} s fetching and decoding)",
                store.stats().keys,
                started.elapsed().as_secs_f64()
            );
        }
        let total = log.status().await?.last;
        self.life.set_mode(Mode::Replaying { done: index, total });
        let started = std::time::Instant::now();
        let commits_before = self.commits.load(Ordering::Relaxed);
        let after = index
            .checked_add(1)
            .ok_or(RecoveryError::NoSuccessor(index))?;
        let replayed = self.replay(after, &mut seen_epoch).await?;
        index = replayed.last.max(index);
        let took = started.elapsed().as_secs_f64();
        let commits = self.commits.load(Ordering::Relaxed) - commits_before;
        tracing::info!(
            "replayed {} entries ({commits} commits) up to index {index} in {took:.2} s ({:.0} commits/s)",
            replayed.entries,
            commits as f64 / took.max(1e-6)
        );
        if seen_epoch > my_epoch {
            return Err(RecoveryError::SequencerBehind {
                log: seen_epoch,
                ours: my_epoch,
            });
        }

        // Take over: EPOCH, then whatever was appended between the replay and it.
        let client = format!("kv-{my_epoch}");
        let mut payload = Vec::new();
        Record::Epoch(my_epoch).encode(&mut payload);
        let at = log.append(client.as_bytes(), 0, &payload).await?;
        let after = index
            .checked_add(1)
            .ok_or(RecoveryError::NoSuccessor(index))?;
        if at > after {
            let mut next = after;
            self.read_gap(log, &mut next, at - 1, &mut seen_epoch)
                .await?;
        }
        if seen_epoch > my_epoch {
            self.life.set_mode(Mode::Fenced(seen_epoch));
            return Err(RecoveryError::FencedWhileStarting(seen_epoch));
        }
        self.life.set_applied_index(at);
        self.life.set_mode(Mode::Serving);
        let stats = self.store.read().unwrap_or_else(|p| p.into_inner()).stats();
        tracing::info!(
            "serving: epoch {my_epoch}, log index {at}, {} keys, {} versions, {} bytes",
            stats.keys,
            stats.versions,
            stats.bytes
        );
        Ok(())
    }

    /// [`vet_checkpoint`] for the checkpoint `ck` that `CKPT_INFO` described as `info`, asking
    /// the sequencer for `CURRENT` only if what is known handed out does not cover it.
    async fn vet_checkpoint(
        &self,
        ck: &Checkpoint,
        info: &protocol::log_client::CheckpointInfo,
    ) -> Result<(), RecoveryError> {
        let header = protocol::kvlog::CheckpointHeader {
            index: ck.index,
            max_ts: ck.max_ts,
            epoch: ck.epoch,
            keys: ck.entries.len() as u64,
        };
        let known = self.handed_out.load(Ordering::SeqCst);
        if vet_checkpoint(info.index, &header, known).is_ok() {
            return Ok(());
        }
        let current = self
            .sequencer_current()
            .await
            .map_err(|e| RecoveryError::Sequencer(super::EngineError::Unavailable(e)))?;
        vet_checkpoint(info.index, &header, current).map_err(|fault| {
            RecoveryError::Checkpoint(CheckpointError::Bad {
                id: info.id,
                index: info.index,
                why: fault.to_string(),
            })
        })
    }

    /// Reads and applies the entries `*next..=to`, advancing `*next` past each one applied, so
    /// a caller that retries after an error neither skips nor repeats one.
    pub(super) async fn read_gap(
        &self,
        log: &mut LogClient,
        next: &mut u64,
        to: u64,
        epoch: &mut u64,
    ) -> Result<(), GapError> {
        let mut empty = 0;
        while *next <= to {
            let page = match log.read(*next, Some(to - *next + 1)).await {
                Ok(page) => page,
                Err(ClientError::Server(e)) if e.code == ErrorCode::Compacted => {
                    return Err(match e.compacted_first() {
                        Some(first) => GapError::Compacted(first),
                        None => GapError::BadCompacted(e),
                    });
                }
                Err(e) => return Err(GapError::Log(e)),
            };
            if page.is_empty() {
                // A lagging replica: ask again until it has the entries we know exist, but not
                // forever: a replica cut off from the leader never will.
                empty += 1;
                if empty >= 100 {
                    let replica = log.connected_to().unwrap_or("?").to_string();
                    log.rotate();
                    return Err(GapError::Lagging {
                        replica,
                        next: *next,
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            empty = 0;
            if page.first().map(|(i, _)| *i) != Some(*next) {
                // Out of step with the replica (a reply left over from a failed call): only a
                // new connection is known good.
                log.rotate();
                return Err(GapError::OutOfStep(*next));
            }
            for (i, payload) in page.into_iter().take_while(|(i, _)| *i <= to) {
                let records = Record::parse_entry(&payload).map_err(|e| unparseable(i, e))?;
                self.vet_entry(i, &records).await?;
                self.apply_counted(records, payload.len(), epoch);
                *next = i.checked_add(1).ok_or(GapError::NoSuccessor(i))?;
            }
        }
        Ok(())
    }
}

/// Entry `index` does not parse as kvstore records.
fn unparseable(index: u64, e: crate::record::RecordError) -> GapError {
    GapError::Bad(BadRecord {
        index,
        fault: Fault::Unparseable(e),
    })
}

/// One page of parsed log entries (index, payload bytes, records), or the error that ended the
/// stream.
type Page = Result<Vec<(u64, usize, Vec<Record>)>, GapError>;

/// Pages of parsed log entries from `from` to the end (an empty page), read ahead of the
/// consumer on a connection of their own.
fn prefetch_pages(
    addrs: Vec<String>,
    trust: protocol::trust::Trust,
    from: u64,
) -> mpsc::Receiver<Page> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut log = LogClient::new(addrs).with_trust(trust);
        log.deadline = Duration::from_secs(5);
        let mut next = from;
        loop {
            let page = match log.read(next, None).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Err(GapError::Log(e))).await;
                    return;
                }
            };
            let Some(&(last, _)) = page.last() else {
                return;
            };
            let after = last.checked_add(1);
            let parsed: Page = page
                .into_iter()
                .map(|(i, payload)| {
                    let records = Record::parse_entry(&payload).map_err(|e| unparseable(i, e))?;
                    Ok((i, payload.len(), records))
                })
                .collect();
            if tx.send(parsed).await.is_err() {
                return;
            }
            let Some(after) = after else {
                let _ = tx.send(Err(GapError::NoSuccessor(last))).await;
                return;
            };
            next = after;
        }
    });
    rx
}

/// The latest checkpoint and its size in bytes, if there is one.
async fn load_checkpoint(
    log: &mut LogClient,
) -> Result<Option<(Checkpoint, u64, protocol::log_client::CheckpointInfo)>, CheckpointError> {
    let Some(info) = log.checkpoint_info().await? else {
        return Ok(None);
    };
    let (id, len, committed_at) = (info.id, info.len, info.index);
    // Chunks are requested CKPT_WINDOW at a time on one connection to the replica that
    // answered, so its work and ours overlap instead of taking turns.
    let (addr, mut conn) = connect_alongside(log).await?;
    let replica = |e| CheckpointError::Replica(addr.clone(), e);
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut requested = 0u64;
    let mut outstanding = 0usize;
    while (data.len() as u64) < len {
        while outstanding < CKPT_WINDOW && requested < len {
            let req = LogRequest::CkptRead {
                id,
                offset: requested,
                max: CKPT_CHUNK as u64,
            };
            conn.send(&req.encode());
            requested = requested.saturating_add(CKPT_CHUNK as u64);
            outstanding += 1;
        }
        conn.flush().await.map_err(replica)?;
        match conn.recv().await.map_err(replica)? {
            Response::Value(chunk) if !chunk.is_empty() && chunk.len() <= CKPT_CHUNK => {
                data.extend_from_slice(&chunk);
                outstanding -= 1;
                // A short chunk anywhere but at the end would misalign the requests in flight.
                if chunk.len() < CKPT_CHUNK && (data.len() as u64) < len {
                    return Err(CheckpointError::Corrupt(format!(
                        "CKPT_READ: short chunk at offset {}",
                        data.len()
                    )));
                }
            }
            r => return Err(CheckpointError::Refused("CKPT_READ", format!("{r:?}"))),
        }
    }
    if data.len() as u64 != len {
        return Err(CheckpointError::Corrupt(format!(
            "checkpoint is {} bytes, expected {len}",
            data.len()
        )));
    }
    if crc32c::crc32c(&data) != info.crc {
        return Err(CheckpointError::Corrupt("checkpoint fails its CRC".into()));
    }
    tracing::info!("fetched checkpoint {id}: {len} bytes");
    // The bytes are the ones the log committed (length and CRC match), and every replica holds
    // the same: a checkpoint that does not decode will never load, so this is fatal.
    Checkpoint::decode(&data)
        .map(|ck| Some((ck, len, info)))
        .map_err(|e| CheckpointError::Bad {
            id,
            index: committed_at,
            why: e.to_string(),
        })
}
