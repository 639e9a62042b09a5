//! The list-append workload over DKSP: concurrent clients running random transactions and
//! recording each one in a [`History`].
//!
//! A transaction is one to four micro-operations on a small pool of hot keys, so transactions
//! overlap and conflict often. Each append writes a globally unique element, which is what lets
//! every read be traced to the writes it saw. A key's list is capped: after [`KEY_LIMIT`]
//! appends the key is retired and a fresh one takes its slot, so values stay short in long runs
//! (reads cost the whole list) while old keys keep their final state for the durability check.
//!
//! Outcomes are classified conservatively: only a transaction whose `COMMIT` was never sent,
//! or that got `ABORTED`, is `Fail`; a lost connection, a timeout or an `ERR` after `COMMIT`
//! is `Info`, and the client continues as a new process on a new connection.

use bytes::Bytes;
use protocol::{Client, ClientError, CommitOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::history::{History, List, Mop, Outcome, Txn};

/// Appends a key receives before it is retired.
pub const KEY_LIMIT: u32 = 24;
/// Hot keys in use at once.
const ACTIVE_KEYS: usize = 6;
/// A transaction stuck longer than this (a stalled kvstore) is given up on: `Info` if its
/// `COMMIT` was sent, `Fail` otherwise.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);

/// The final read's process number: apart from the clients', and small enough for Elle's
/// JSON readers (adya drops ops whose process is not an i64).
const FINAL_PROCESS: u64 = 1_000_000;

/// The dtkv key for list `k`.
pub fn key_name(k: u64) -> String {
    format!("jepsen/{k:08}")
}

/// The list stored in a value: comma-separated decimal elements.
pub fn parse_list(v: &[u8]) -> Result<List, String> {
    let s = std::str::from_utf8(v).map_err(|_| format!("non-UTF-8 value {v:?}"))?;
    s.split(',')
        .map(|e| e.parse().map_err(|_| format!("unparseable list {s:?}")))
        .collect()
}

fn encode_list(l: &[u64]) -> String {
    l.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// The key pool and element counter shared by all clients.
struct Keys {
    slots: Vec<(u64, u32)>,
    next_key: u64,
}

/// State shared by the clients of one run.
pub struct Shared {
    /// The kvstore (or its proxy) the clients connect to.
    pub addr: SocketAddr,
    /// When the run began; history times are measured from it.
    pub start: Instant,
    /// Set to end the run: clients finish their transaction and stop.
    pub stop: AtomicBool,
    /// Every transaction and event so far.
    pub history: Mutex<History>,
    keys: Mutex<Keys>,
    next_elem: AtomicU64,
    /// How many clients run.
    pub clients: u64,
}

impl Shared {
    /// The shared state of a run against `addr` with `clients` clients.
    pub fn new(addr: SocketAddr, clients: u64) -> Arc<Shared> {
        Arc::new(Shared {
            addr,
            start: Instant::now(),
            stop: AtomicBool::new(false),
            history: Mutex::new(History::default()),
            keys: Mutex::new(Keys {
                slots: (0..ACTIVE_KEYS as u64).map(|k| (k, 0)).collect(),
                next_key: ACTIVE_KEYS as u64,
            }),
            next_elem: AtomicU64::new(1),
            clients,
        })
    }

    /// Nanoseconds since the run began.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Every key used so far (those never written simply read as empty).
    pub fn keys_used(&self) -> u64 {
        self.keys.lock().unwrap().next_key
    }

    /// Transactions that committed so far.
    pub fn committed(&self) -> usize {
        self.history.lock().unwrap().count(Outcome::Ok)
    }

    /// Adds a finished transaction to the history, numbering it.
    pub fn record(&self, t: Txn) {
        let mut h = self.history.lock().unwrap();
        let mut t = t;
        t.id = h.txns.len();
        h.txns.push(t);
    }

    /// Records a nemesis event at the current time.
    pub fn event(&self, what: impl Into<String>) {
        let at_ns = self.now_ns();
        self.history
            .lock()
            .unwrap()
            .events
            .push(super::history::Event {
                at_ns,
                what: what.into(),
            });
    }

    /// A random transaction: reads and appends (elements unique) over the hot keys.
    fn generate(&self, rng: &mut StdRng) -> Vec<Mop> {
        let n = rng.gen_range(1..=4);
        let mut keys = self.keys.lock().unwrap();
        (0..n)
            .map(|_| {
                let slot = rng.gen_range(0..keys.slots.len());
                let key = keys.slots[slot].0;
                if rng.gen_bool(0.5) {
                    return Mop::Read { key, value: None };
                }
                keys.slots[slot].1 += 1;
                if keys.slots[slot].1 >= KEY_LIMIT {
                    keys.slots[slot] = (keys.next_key, 0);
                    keys.next_key += 1;
                }
                Mop::Append {
                    key,
                    elem: self.next_elem.fetch_add(1, Ordering::SeqCst),
                }
            })
            .collect()
    }
}

/// How far a transaction got, for classifying a failure.
struct Progress {
    mops: Vec<Mop>,
    start_ts: Option<u64>,
    commit_sent: bool,
}

/// Runs one transaction's micro-operations and commit on `conn`.
async fn execute(
    conn: &mut Client,
    intent: &[Mop],
    p: &mut Progress,
) -> Result<CommitOutcome, ClientError> {
    p.start_ts = Some(conn.begin().await?);
    for m in intent {
        match *m {
            Mop::Read { key, .. } => {
                let v = read(conn, key).await?;
                p.mops.push(Mop::Read {
                    key,
                    value: Some(v),
                });
            }
            Mop::Append { key, elem } => {
                let mut v = read(conn, key).await?;
                p.mops.push(Mop::Read {
                    key,
                    value: Some(v.clone()),
                });
                v.push(elem);
                conn.put(key_name(key), encode_list(&v)).await?;
                p.mops.push(Mop::Append { key, elem });
            }
        }
    }
    p.commit_sent = true;
    conn.commit().await
}

/// `GET` of a list; a value that does not parse is a protocol error (the checker sees it as a
/// failed transaction with the error in its note, and the run reports it).
async fn read(conn: &mut Client, key: u64) -> Result<List, ClientError> {
    match conn.get(key_name(key)).await? {
        None => Ok(Vec::new()),
        Some(v) => parse_list(&v).map_err(|e| ClientError::Protocol(format!("GARBAGE {e}"))),
    }
}

/// One client: transactions until `stop`, reconnecting as needed.
pub async fn client(shared: Arc<Shared>, c: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = c;
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_secs(1),
            crate::Credentials::from_env().connect_any(&shared.addr.to_string()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await; // retry backoff
            continue;
        };
        while !shared.stop.load(Ordering::SeqCst) {
            let intent = shared.generate(&mut rng);
            let invoked_ns = shared.now_ns();
            let mut p = Progress {
                mops: Vec::new(),
                start_ts: None,
                commit_sent: false,
            };
            let result = tokio::time::timeout(TXN_TIMEOUT, execute(&mut conn, &intent, &mut p))
                .await
                .unwrap_or_else(|_| Err(ClientError::Protocol("client timeout".into())));
            let completed_ns = shared.now_ns();
            let (outcome, commit_ts, note) = match result {
                Ok(CommitOutcome::Committed(ts)) => (Outcome::Ok, Some(ts), String::new()),
                Ok(CommitOutcome::Aborted(reason)) => (Outcome::Fail, None, words(&reason)),
                Err(e) if p.commit_sent => (Outcome::Info, None, e.to_string()),
                Err(e) => (Outcome::Fail, None, e.to_string()),
            };
            let mops = match outcome {
                Outcome::Ok => std::mem::take(&mut p.mops),
                // Unknown reads stay unknown; the appends are what may have happened.
                _ => intent,
            };
            let garbage = note.contains("GARBAGE");
            shared.record(Txn {
                id: 0,
                process,
                mops,
                outcome,
                start_ts: p.start_ts,
                commit_ts,
                invoked_ns,
                completed_ns,
                is_final: false,
                note,
            });
            if garbage {
                shared.event(format!("client {c} read an unparseable value"));
            }
            if outcome == Outcome::Info {
                process += shared.clients;
            }
            if result_breaks_connection(outcome, &p) {
                // Retry backoff: an unavailable kvstore would otherwise be hammered.
                tokio::time::sleep(Duration::from_millis(20)).await;
                break;
            }
        }
    }
}

/// After anything but a clean verdict the session may hold an open transaction or be
/// mid-reply, so the client starts over on a fresh connection (closing aborts the old one).
fn result_breaks_connection(outcome: Outcome, p: &Progress) -> bool {
    outcome == Outcome::Info || (outcome == Outcome::Fail && !p.commit_sent)
}

fn words(reason: &[Bytes]) -> String {
    let w: Vec<String> = reason
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    format!("ABORTED {}", w.join(" "))
}

/// Reads every key ever used in one transaction (after recovery), retrying until the kvstore
/// answers, and records it as the final read.
pub async fn final_read(shared: &Shared) -> Result<(), String> {
    let keys = shared.keys_used();
    let mut last_err = String::new();
    for _ in 0..50 {
        let invoked_ns = shared.now_ns();
        match final_read_once(shared.addr, keys).await {
            Ok((start_ts, mops)) => {
                shared.record(Txn {
                    id: 0,
                    process: FINAL_PROCESS,
                    mops,
                    outcome: Outcome::Ok,
                    start_ts: Some(start_ts),
                    commit_ts: Some(start_ts),
                    invoked_ns,
                    completed_ns: shared.now_ns(),
                    is_final: true,
                    note: String::new(),
                });
                return Ok(());
            }
            Err(e) => last_err = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // retry backoff
    }
    Err(format!("the final read kept failing: {last_err}"))
}

async fn final_read_once(addr: SocketAddr, keys: u64) -> Result<(u64, Vec<Mop>), ClientError> {
    let mut conn = crate::Credentials::from_env()
        .connect_any(&addr.to_string())
        .await?;
    let ts = conn.begin().await?;
    let rows = conn.scan(key_name(0), key_name(keys), None).await?;
    let mut lists = std::collections::BTreeMap::new();
    for (k, v) in rows {
        let key = std::str::from_utf8(&k)
            .ok()
            .and_then(|s| s.strip_prefix("jepsen/")?.parse::<u64>().ok())
            .ok_or_else(|| ClientError::Protocol(format!("unexpected key {k:?}")))?;
        lists.insert(key, parse_list(&v).map_err(ClientError::Protocol)?);
    }
    conn.commit().await?;
    Ok((
        ts,
        (0..keys)
            .map(|key| Mop::Read {
                key,
                value: Some(lists.remove(&key).unwrap_or_default()),
            })
            .collect(),
    ))
}
