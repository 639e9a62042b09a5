//! A history: every transaction the clients ran, with what they asked, what they saw, when,
//! and how it ended.
//!
//! The data model is Elle's list-append. Each key holds a list of unique integers; a
//! transaction is a list of micro-operations, each a read of a whole list or an append of one
//! element. dtkv stores opaque byte strings, so the client implements an append as a read and
//! a write inside the transaction (`GET k`, then `PUT k "<old>,<e>"`), and records that read as
//! a read micro-operation just before the append. Every read thus reveals the order of every
//! write to that key before it.
//!
//! An outcome is `Ok` (`COMMITTED`), `Fail` (certainly not committed: `ABORTED`, or an error
//! before `COMMIT` was sent) or `Info` (indeterminate: `COMMIT` was sent and no verdict came
//! back). For an indeterminate transaction only its appends are kept, as Jepsen does: whether
//! its reads happened in a committed transaction is unknown.

use serde_json::json;
use std::fmt;

/// A key's list of appended elements.
pub type List = Vec<u64>;

/// One micro-operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mop {
    /// `value` is `None` while unknown (an invocation, an indeterminate transaction).
    Read {
        /// The key read.
        key: u64,
        /// The list read (`None` while unknown).
        value: Option<List>,
    },
    /// Appends `elem` to `key`'s list.
    Append {
        /// The key appended to.
        key: u64,
        /// The element, unique over the run.
        elem: u64,
    },
}

/// How a transaction ended, in Jepsen's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It committed.
    Ok,
    /// It certainly did not commit (aborted, or refused before `COMMIT`).
    Fail,
    /// Indeterminate: the connection failed after `COMMIT` was sent.
    Info,
}

/// One transaction, invocation and completion together.
#[derive(Clone, Debug)]
pub struct Txn {
    /// Its position in the history; reports name transactions `T<id>`.
    pub id: usize,
    /// The client process. A process whose transaction ends `Info` gets a new number, since
    /// that transaction may still be in flight.
    pub process: u64,
    /// Its reads and appends, in order.
    pub mops: Vec<Mop>,
    /// How it ended.
    pub outcome: Outcome,
    /// `BEGIN`'s reply (the snapshot timestamp), if it came.
    pub start_ts: Option<u64>,
    /// `COMMITTED <ts>`.
    pub commit_ts: Option<u64>,
    /// Nanoseconds since the run began: before `BEGIN` was sent, after the verdict arrived.
    pub invoked_ns: u64,
    /// Nanoseconds since the run began when its verdict arrived.
    pub completed_ns: u64,
    /// The read of every key after the run and recovery: what durability is checked against.
    pub is_final: bool,
    /// The abort reason or error, for the report.
    pub note: String,
}

impl Txn {
    /// A transaction for hand-made histories: committed, no timestamps, `invoked..completed`.
    pub fn new(
        process: u64,
        mops: Vec<Mop>,
        outcome: Outcome,
        invoked: u64,
        completed: u64,
    ) -> Txn {
        Txn {
            id: 0,
            process,
            mops,
            outcome,
            start_ts: None,
            commit_ts: None,
            invoked_ns: invoked,
            completed_ns: completed,
            is_final: false,
            note: String::new(),
        }
    }
}

impl fmt::Display for Txn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "T{} p{} {:?} [", self.id, self.process, self.outcome)?;
        for (i, m) in self.mops.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match m {
                Mop::Read {
                    key,
                    value: Some(v),
                } => write!(f, "r {key} {v:?}")?,
                Mop::Read { key, value: None } => write!(f, "r {key} ?")?,
                Mop::Append { key, elem } => write!(f, "append {key} {elem}")?,
            }
        }
        f.write_str("]")?;
        if let Some(ts) = self.start_ts {
            write!(f, " start={ts}")?;
        }
        if let Some(ts) = self.commit_ts {
            write!(f, " commit={ts}")?;
        }
        if self.is_final {
            f.write_str(" (final read)")?;
        }
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

/// What happened during a run besides transactions: faults injected and healed.
#[derive(Clone, Debug)]
pub struct Event {
    /// Nanoseconds since the run began.
    pub at_ns: u64,
    /// What happened, e.g. `kill -9 kvstore`.
    pub what: String,
}

/// A run's record: every transaction and every nemesis event.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// The transactions, numbered by position.
    pub txns: Vec<Txn>,
    /// The nemesis events, in order.
    pub events: Vec<Event>,
}

impl History {
    /// Builds a history from transactions, numbering them in order.
    pub fn from_txns(txns: Vec<Txn>) -> History {
        let mut h = History {
            txns,
            events: Vec::new(),
        };
        h.renumber();
        h
    }

    /// Sets every transaction's id to its position.
    pub fn renumber(&mut self) {
        for (i, t) in self.txns.iter_mut().enumerate() {
            t.id = i;
        }
    }

    /// Transactions that ended with `o`.
    pub fn count(&self, o: Outcome) -> usize {
        self.txns.iter().filter(|t| t.outcome == o).count()
    }

    /// The history as Jepsen/Elle JSON lines (one op per line, invocations and completions
    /// interleaved by time), the format `adya` and `elle-cli` read. A completion's `index` is
    /// `2 * id + 1`, so tools' reports can be mapped back to `T<id>`.
    pub fn to_elle_json(&self) -> String {
        self.elle_json(false)
    }

    /// The same history as read/write registers (an append writes its unique element, a read
    /// returns the last element of the list, or `null` for the empty list), with the commit
    /// order: completion index -> position.
    ///
    /// adya sorts a key's writes by position and puts writes without one first, so every
    /// written transaction needs a true position. Committed ones have their commit timestamp
    /// (doubled). An indeterminate one that somebody observed committed, somewhere between the
    /// writes around its element in the lists read: it gets one more than the position of the
    /// write before it. One nobody observed is left out: nothing could have depended on it.
    pub fn to_register_json(&self) -> (String, std::collections::HashMap<u64, i64>) {
        use std::collections::HashMap;
        let mut writer: HashMap<(u64, u64), usize> = HashMap::new();
        for t in &self.txns {
            for m in &t.mops {
                if let Mop::Append { key, elem } = m {
                    writer.insert((*key, *elem), t.id);
                }
            }
        }
        let mut pos: HashMap<usize, i64> = self
            .txns
            .iter()
            .filter(|t| t.outcome == Outcome::Ok && !t.is_final)
            .filter_map(|t| Some((t.id, 2 * t.commit_ts? as i64)))
            .collect();
        let mut longest: std::collections::BTreeMap<u64, &List> = Default::default();
        for t in self.txns.iter().filter(|t| t.outcome == Outcome::Ok) {
            for m in &t.mops {
                if let Mop::Read {
                    key,
                    value: Some(v),
                } = m
                {
                    let l = longest.entry(*key).or_insert(v);
                    if v.len() > l.len() {
                        *l = v;
                    }
                }
            }
        }
        for (key, order) in longest {
            let mut last = 0;
            for e in order {
                let Some(&w) = writer.get(&(key, *e)) else {
                    continue;
                };
                if self.txns[w].outcome == Outcome::Info {
                    let p = pos.entry(w).or_insert(last + 1);
                    *p = (*p).max(last + 1);
                }
                last = pos.get(&w).copied().unwrap_or(last);
            }
        }
        let kept = History {
            txns: self
                .txns
                .iter()
                .filter(|t| t.outcome != Outcome::Info || pos.contains_key(&t.id))
                .cloned()
                .collect(),
            events: Vec::new(),
        };
        let order = pos
            .into_iter()
            .map(|(id, p)| ((2 * id + 1) as u64, p))
            .collect();
        (kept.elle_json(true), order)
    }

    fn elle_json(&self, register: bool) -> String {
        let mut lines: Vec<(u64, u8, usize, String)> = Vec::new();
        for t in &self.txns {
            let invoke: Vec<Mop> = t
                .mops
                .iter()
                .map(|m| match m {
                    Mop::Read { key, .. } => Mop::Read {
                        key: *key,
                        value: None,
                    },
                    m => m.clone(),
                })
                .collect();
            let done = match t.outcome {
                Outcome::Ok => &t.mops,
                Outcome::Fail | Outcome::Info => &invoke,
            };
            let kind = match t.outcome {
                Outcome::Ok => "ok",
                Outcome::Fail => "fail",
                Outcome::Info => "info",
            };
            let mops = |ms: &[Mop]| -> Vec<serde_json::Value> {
                ms.iter().map(|m| mop_json(m, register)).collect()
            };
            let op = |kind: &str, index: usize, time: u64, ms: &[Mop]| {
                json!({"type": kind, "f": "txn", "process": t.process, "index": index,
                       "time": time, "value": mops(ms)})
                .to_string()
            };
            // Sort key: time, then completions before invocations at the same instant.
            lines.push((
                t.invoked_ns,
                1,
                2 * t.id,
                op("invoke", 2 * t.id, t.invoked_ns, &invoke),
            ));
            lines.push((
                t.completed_ns,
                0,
                2 * t.id + 1,
                op(kind, 2 * t.id + 1, t.completed_ns, done),
            ));
        }
        lines.sort();
        let mut out = String::new();
        for (_, _, _, l) in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }

    /// Every transaction and event, one per line, in time order.
    pub fn dump(&self) -> String {
        let mut lines: Vec<(u64, String)> = self
            .txns
            .iter()
            .map(|t| {
                (
                    t.invoked_ns,
                    format!(
                        "{:>10.3}s..{:.3}s {t}",
                        secs(t.invoked_ns),
                        secs(t.completed_ns)
                    ),
                )
            })
            .collect();
        lines.extend(self.events.iter().map(|e| {
            (
                e.at_ns,
                format!("{:>10.3}s nemesis: {}", secs(e.at_ns), e.what),
            )
        }));
        lines.sort();
        lines.into_iter().map(|(_, l)| l + "\n").collect()
    }
}

/// Nanoseconds as seconds, for reports.
pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn mop_json(m: &Mop, register: bool) -> serde_json::Value {
    match (m, register) {
        (Mop::Append { key, elem }, false) => json!(["append", key, elem]),
        (Mop::Append { key, elem }, true) => json!(["w", key, elem]),
        (Mop::Read { key, value: None }, _) => json!(["r", key, null]),
        (
            Mop::Read {
                key,
                value: Some(v),
            },
            false,
        ) => json!(["r", key, v]),
        (
            Mop::Read {
                key,
                value: Some(v),
            },
            true,
        ) => json!(["r", key, v.last()]),
    }
}
