//! Transactions: timestamps, snapshot isolation, commits through the log, recovery.
//!
//! [`Engine`] is a thin facade over one module per concern:
//! - [`registry`]: timestamps from the sequencer and the in-flight registry (which commits
//!   have a timestamp but are not applied yet, which snapshots are open);
//! - [`snapshot`]: snapshot reads and first-committer-wins commits;
//! - `batch` and `committer`: group commit and pipelining onto the log, in log order;
//! - [`decide`]: the committer's pure decision for an entry that came back from the log;
//! - `recovery`: checkpoint, replay, taking over the log with `EPOCH`;
//! - [`checkpoint`]: writing checkpoints, and the bookkeeping of when one is due;
//! - [`vet`]: the check that stops the kvstore at a log record (or checkpoint) no kvstore of
//!   this cluster wrote, naming its index;
//! - [`error`]: the errors, one enum per boundary.
//!
//! The invariants each keeps are in its header. Those that hold across them: a commit is
//! acknowledged only once its entry is in the log and no newer kvstore got in first; a reader
//! at snapshot `s` sees every commit below `s` (it waits for those in flight); and the store
//! changes only in log order, by the committer or by recovery, never both at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use protocol::{Client, LogClient};

use crate::lifecycle::{lock, Lifecycle};
use crate::mvcc::Store;

mod batch;
pub mod checkpoint;
mod committer;
pub mod decide;
pub mod error;
mod recovery;
pub mod registry;
pub mod snapshot;
#[cfg(test)]
mod tests;
pub mod vet;

pub use crate::lifecycle::{Mode, UNKNOWN_EPOCH};
pub use committer::DEFAULT_LOG_PIPELINE;
pub use error::{EngineError, RecoveryError};
pub use registry::Registry;
pub use snapshot::{Outcome, Queued, Submitted};

/// How the engine is set up (the kvstore's flags).
pub struct Config {
    /// The sequencer's address.
    pub sequencer: String,
    /// The log replicas' addresses.
    pub log: Vec<String>,
    /// Write a checkpoint after this many commit records...
    pub checkpoint_every: u64,
    /// ...or after this many bytes of log payload, whichever comes first...
    pub checkpoint_bytes: u64,
    /// ...but only once the log payload since the last checkpoint is at least this fraction of
    /// that checkpoint's size. A checkpoint rewrites all the data, so without this a large
    /// store would spend most of its log bandwidth on checkpoints; with 0.5, checkpoints write
    /// at most two bytes per byte of commits, and replay stays shorter than loading one.
    pub checkpoint_ratio: f64,
    /// Follow the log with TAIL to notice a takeover at once (see `follow`).
    pub follow_log: bool,
    /// A commit not durable within this long is answered `ERR UNAVAILABLE commit outcome
    /// unknown` (`--commit-timeout-secs`).
    pub commit_timeout: Duration,
    /// Log entries the committer sends ahead without waiting for a reply, however little each
    /// holds (`--log-pipeline`).
    pub log_pipeline: usize,
    /// How the kvstore proves cluster membership to the sequencer and the log (TLS, the
    /// cluster secret).
    pub trust: protocol::trust::Trust,
}

/// Where the engine stands, for `STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    /// The log index applied last.
    pub applied: u64,
    /// This kvstore's epoch.
    pub epoch: u64,
    /// Open snapshots.
    pub open: usize,
    /// Commits with a timestamp, not applied yet.
    pub inflight: usize,
}

/// The kvstore's transactions; see the module header.
pub struct Engine {
    /// The multi-version store (changed only in log order).
    pub store: RwLock<Store>,
    txns: Mutex<Registry>,
    /// Fires when in-flight commits are resolved.
    resolved: Notify,
    committer: mpsc::Sender<batch::CommitReq>,
    life: Arc<Lifecycle>,
    sequencer: tokio::sync::Mutex<Option<Client>>,
    cfg: Config,
    checkpointer: Arc<checkpoint::Checkpointer>,
    /// Commit records applied in total (STATUS).
    pub commits: AtomicU64,
    /// The highest timestamp the sequencer is known to have handed out (the end of our last
    /// block, or a `CURRENT` asked for): records up to it pass [`vet::vet`] without asking.
    handed_out: AtomicU64,
    /// Set when recovery stops for good: why.
    stopped: Mutex<Option<Arc<RecoveryError>>>,
    /// Fires when `stopped` is set.
    stop: Notify,
}

impl Engine {
    /// Creates the engine and starts recovery and the committer in the background; data
    /// commands answer `ERR UNAVAILABLE` until recovery is done. If recovery fails in a way
    /// that trying again cannot mend, [`Engine::stopped`] returns why.
    pub fn start(cfg: Config) -> Arc<Engine> {
        // Small: the committer moves what arrives into its own queue at once (where deadlines
        // are kept); this only has to cover the moments it is busy applying.
        let (tx, rx) = mpsc::channel(4096);
        let engine = Arc::new(Engine {
            store: RwLock::new(Store::new()),
            txns: Mutex::new(Registry::default()),
            resolved: Notify::new(),
            committer: tx,
            life: Arc::new(Lifecycle::default()),
            sequencer: tokio::sync::Mutex::new(None),
            checkpointer: Arc::new(checkpoint::Checkpointer::new(&cfg)),
            cfg,
            commits: AtomicU64::new(0),
            handed_out: AtomicU64::new(0),
            stopped: Mutex::new(None),
            stop: Notify::new(),
        });
        let e = engine.clone();
        tokio::spawn(async move {
            let mut log = LogClient::new(e.cfg.log.clone()).with_trust(e.cfg.trust.clone());
            log.deadline = Duration::from_secs(5);
            loop {
                match e.recover(&mut log).await {
                    Ok(()) => break,
                    Err(err) if err.is_fatal() => {
                        e.halt(err);
                        return;
                    }
                    Err(err) => {
                        tracing::warn!("recovery failed, retrying: {err}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            let from = e.life.applied_index().saturating_add(1);
            if e.cfg.follow_log {
                let e = e.clone();
                tokio::spawn(async move {
                    let followed = crate::follow::follow(
                        e.life.clone(),
                        e.cfg.log.clone(),
                        e.cfg.trust.clone(),
                        from,
                    );
                    let Some(t) = followed.await else {
                        return;
                    };
                    // Fenced already; an epoch the sequencer never handed out is no kvstore
                    // taking over but a forged or corrupt record: stop, naming it.
                    e.vet_takeover(t).await;
                });
            }
            committer::committer_loop(e, rx, log).await;
        });
        let e = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                e.collect_garbage();
            }
        });
        engine
    }

    /// Stops the kvstore for good with `err` (a failure that trying again cannot mend): logged,
    /// and [`Engine::stopped`] returns it, so `main` exits with its one-line message.
    pub(crate) fn halt(&self, err: RecoveryError) {
        tracing::error!("recovery stopped: {err}");
        let mut stopped = lock(&self.stopped);
        if stopped.is_none() {
            *stopped = Some(Arc::new(err));
        }
        drop(stopped);
        self.stop.notify_waiters();
    }

    /// Asks the sequencer for `CURRENT`, the highest timestamp it has handed out, and
    /// remembers it.
    async fn sequencer_current(&self) -> Result<u64, String> {
        let mut seq = self.sequencer.lock().await;
        if seq.is_none() {
            let c = Client::connect(self.cfg.sequencer.as_str())
                .await
                .map_err(|e| format!("{}: {e}", self.cfg.sequencer))?;
            *seq = Some(c);
        }
        let Some(c) = seq.as_mut() else {
            return Err("no sequencer connection".into());
        };
        match c.current_ts().await {
            Ok(current) => {
                self.handed_out.fetch_max(current, Ordering::SeqCst);
                Ok(current)
            }
            Err(e) => {
                *seq = None;
                Err(format!("{}: {e}", self.cfg.sequencer))
            }
        }
    }

    /// [`vet::vet`] for log entry `index`: against what is known to be handed out, and if that
    /// fails, against the sequencer's `CURRENT` asked now.
    pub(crate) async fn vet_entry(
        &self,
        index: u64,
        records: &[crate::record::Record],
    ) -> Result<(), error::GapError> {
        if vet::vet(index, records, self.handed_out.load(Ordering::SeqCst)).is_ok() {
            return Ok(());
        }
        let current = self
            .sequencer_current()
            .await
            .map_err(error::GapError::Sequencer)?;
        vet::vet(index, records, current).map_err(error::GapError::Bad)
    }

    /// The follower saw a newer `EPOCH` and fenced this kvstore: if the sequencer never handed
    /// that epoch out, it is no takeover but a forged or corrupt record, and the process stops.
    async fn vet_takeover(&self, t: crate::follow::Takeover) {
        let records = [crate::record::Record::Epoch(t.epoch)];
        loop {
            match self.vet_entry(t.index, &records).await {
                Ok(()) => return,
                Err(error::GapError::Bad(bad)) => {
                    self.halt(RecoveryError::BadRecord(bad));
                    return;
                }
                Err(err) => {
                    tracing::warn!(
                        "vetting the EPOCH at log index {}: {err}; retrying",
                        t.index
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Waits until recovery stops for good, and returns why (the process should exit with it).
    pub async fn stopped(&self) -> Arc<RecoveryError> {
        loop {
            let notified = self.stop.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(err) = lock(&self.stopped).clone() {
                return err;
            }
            notified.await;
        }
    }

    /// This kvstore's epoch (0 until recovery has chosen it).
    pub fn epoch(&self) -> u64 {
        self.life.epoch()
    }

    /// The log replicas' addresses.
    pub fn log_addrs(&self) -> &[String] {
        &self.cfg.log
    }

    /// A newer kvstore (epoch `by`) has taken over the log: stop serving.
    pub fn fence(&self, by: u64) {
        self.life.fence(by);
    }

    /// Whether a checkpoint is being captured or uploaded (it holds a copy of the live data).
    pub fn checkpointing(&self) -> bool {
        self.checkpointer.running()
    }

    /// The log index applied last: every entry up to it has been read or appended by us.
    pub fn applied_index(&self) -> u64 {
        self.life.applied_index()
    }

    /// What the engine is doing.
    pub fn mode(&self) -> Mode {
        self.life.mode()
    }

    /// `Ok` if data commands may run now.
    pub fn check_serving(&self) -> Result<(), EngineError> {
        match self.mode() {
            Mode::Serving => Ok(()),
            Mode::Starting => Err(EngineError::Unavailable(
                "starting: waiting for the sequencer and the log".into(),
            )),
            Mode::Replaying { done, total } => Err(EngineError::Unavailable(format!(
                "replaying {done}/{total}"
            ))),
            Mode::Fenced(e) => Err(EngineError::Fenced(e)),
        }
    }

    /// Where the engine stands.
    pub fn positions(&self) -> Positions {
        let t = lock(&self.txns);
        Positions {
            applied: self.life.applied_index(),
            epoch: self.life.epoch(),
            open: t.open_snapshots(),
            inflight: t.inflight(),
        }
    }
}
