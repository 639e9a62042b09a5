//! A snapshot-isolation checker for list-append histories.
//!
//! The idea is Adya's and Elle's: infer from the history alone which transaction must have
//! come before which, and look for contradictions. In a list-append history every read shows
//! the order of all the appends before it, so each key's *version order* is simply its longest
//! read (every other read must be a prefix of it), and three kinds of dependency follow:
//!
//! - `ww`: T1 appended the element just before T2's on the same key;
//! - `wr`: T2 read a list ending in T1's element;
//! - `rw`: T1 read a list that T2's element extended (T1 did not see T2's write).
//!
//! Snapshot isolation forbids every cycle of these in which no two `rw` edges are adjacent
//! (Adya's G0, G1c and G-single, Elle's G-nonadjacent); cycles with adjacent `rw` edges (write
//! skew) are allowed. Such a cycle is found as a cycle of "`ww`/`wr` edge, optionally followed
//! by one `rw` edge" steps, then expanded and classified by its `rw` count: none is G1c (G0 if
//! all `ww`), one is G-single (read skew), more is G-nonadjacent.
//!
//! Besides cycles, direct checks over individual transactions:
//! - G1a (aborted read): a read includes an element whose transaction failed;
//! - G1b (intermediate read): a read shows part of another transaction's appends to a key;
//! - lost update: two committed transactions read the same version of a key and both appended
//!   to it;
//! - incompatible order: two reads of a key where neither is a prefix of the other;
//! - internal: a transaction's read disagrees with its own earlier reads and appends (this
//!   includes non-repeatable reads);
//! - garbage and duplicate elements;
//! - real time: a transaction that began after another's `COMMITTED` reply must see it
//!   (stale read), and no transaction can see a write invoked after it finished (future read);
//! - durability: the final read after recovery contains every append of every committed
//!   transaction (and of indeterminate ones that anyone observed: they committed);
//! - dtkv's own contract, when timestamps were recorded: a snapshot read sees exactly the
//!   writes with a smaller commit timestamp, and each key's version order follows commit
//!   timestamps.
//!
//! Transactions that ended `Info` and whose appends nobody observed are treated as aborted;
//! if they did commit, nothing depends on them. A committed append nobody observed still came
//! after every version anyone did observe, which gives it `ww` and `rw` edges (as in Elle).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::history::{History, List, Mop, Outcome, Txn};

mod graph;
mod report;

pub use report::Report;

/// One violation the checker found.
#[derive(Clone, Debug)]
pub struct Anomaly {
    /// Its name, e.g. `G1a`, `lost-update`, `G-single`.
    pub kind: &'static str,
    /// The transactions involved (ids into the history).
    pub txns: Vec<usize>,
    /// Why the transactions amount to it, for the report.
    pub explanation: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rel {
    Ww,
    Wr,
    Rw,
}

impl Rel {
    fn name(self) -> &'static str {
        match self {
            Rel::Ww => "ww",
            Rel::Wr => "wr",
            Rel::Rw => "rw",
        }
    }
}

/// A dependency edge, with the key it is about.
#[derive(Clone, Copy, Debug)]
struct Edge {
    to: usize,
    rel: Rel,
    key: u64,
}

struct Checker<'h> {
    txns: &'h [Txn],
    out: Vec<Anomaly>,
    /// (key, element) -> the transaction that appended it.
    writer: HashMap<(u64, u64), usize>,
    /// (transaction, key) -> its appends to that key, in order.
    appends: HashMap<(usize, u64), Vec<u64>>,
    /// key -> version order (the longest read), and each element's position in it.
    order: BTreeMap<u64, List>,
    position: HashMap<(u64, u64), usize>,
    /// Keys whose reads do not form one chain: their edges would be guesses.
    broken: HashSet<u64>,
    committed: Vec<bool>,
    edges: Vec<Vec<Edge>>,
}

/// Checks a history; an empty result means no anomaly was found.
pub fn check(h: &History) -> Vec<Anomaly> {
    let mut c = Checker {
        txns: &h.txns,
        out: Vec::new(),
        writer: HashMap::new(),
        appends: HashMap::new(),
        order: BTreeMap::new(),
        position: HashMap::new(),
        broken: HashSet::new(),
        committed: vec![false; h.txns.len()],
        edges: vec![Vec::new(); h.txns.len()],
    };
    for (i, t) in h.txns.iter().enumerate() {
        assert_eq!(t.id, i, "history ids must be positions (History::renumber)");
    }
    c.index_writes();
    c.internal();
    c.reads();
    c.version_orders();
    c.lost_updates();
    c.committed_set();
    c.durability();
    c.real_time();
    c.timestamps();
    // The dependency graph and its forbidden cycles: see `graph`.
    c.graph();
    c.cycles();
    c.out
}

/// Reads of a committed transaction with known values: `(key, list)`.
fn reads(t: &Txn) -> impl Iterator<Item = (u64, &List)> {
    t.mops.iter().filter_map(|m| match m {
        Mop::Read {
            key,
            value: Some(v),
        } => Some((*key, v)),
        _ => None,
    })
}

/// The reads whose value came from other transactions: each key's reads before the
/// transaction's own first append to it.
fn external_reads(t: &Txn) -> Vec<(u64, &List)> {
    let mut written = HashSet::new();
    let mut out = Vec::new();
    for m in &t.mops {
        match m {
            Mop::Append { key, .. } => {
                written.insert(*key);
            }
            Mop::Read {
                key,
                value: Some(v),
            } if !written.contains(key) => out.push((*key, v)),
            _ => {}
        }
    }
    out
}

impl<'h> Checker<'h> {
    fn push(&mut self, kind: &'static str, txns: Vec<usize>, explanation: String) {
        self.out.push(Anomaly {
            kind,
            txns,
            explanation,
        });
    }

    /// The committed transactions (borrowing the history, not the checker).
    fn oks(&self) -> impl Iterator<Item = &'h Txn> + 'h {
        let txns: &'h [Txn] = self.txns;
        txns.iter().filter(|t| t.outcome == Outcome::Ok)
    }

    fn index_writes(&mut self) {
        for t in self.txns {
            for m in &t.mops {
                if let Mop::Append { key, elem } = *m {
                    if let Some(w) = self.writer.insert((key, elem), t.id) {
                        self.push(
                            "duplicate-append",
                            vec![w, t.id],
                            format!("element {elem} was appended to key {key} twice; the workload must make elements unique"),
                        );
                    }
                    self.appends.entry((t.id, key)).or_default().push(elem);
                }
            }
        }
        for t in self.txns {
            if t.note.contains("GARBAGE") {
                self.push(
                    "garbage-read",
                    vec![t.id],
                    format!("T{} read a value that is not a list: {}", t.id, t.note),
                );
            }
        }
    }

    /// Each committed transaction's reads agree with its own earlier reads and appends.
    fn internal(&mut self) {
        let mut found = Vec::new();
        for t in self.oks() {
            // key -> (known prefix?, elements): exactly the list, or a list ending in them.
            let mut state: HashMap<u64, (bool, List)> = HashMap::new();
            for m in &t.mops {
                match m {
                    Mop::Append { key, elem } => {
                        state
                            .entry(*key)
                            .or_insert((false, Vec::new()))
                            .1
                            .push(*elem);
                    }
                    Mop::Read {
                        key,
                        value: Some(v),
                    } => {
                        if let Some((exact, s)) = state.get(key) {
                            let ok = if *exact { v == s } else { v.ends_with(s) };
                            if !ok {
                                found.push((
                                    t.id,
                                    format!(
                                        "T{} read key {key} as {v:?} but its own earlier operations imply {}{s:?} (a non-repeatable read or a lost own write)",
                                        t.id,
                                        if *exact { "" } else { "... followed by " }
                                    ),
                                ));
                                break;
                            }
                        }
                        state.insert(*key, (true, v.clone()));
                    }
                    Mop::Read { value: None, .. } => {}
                }
            }
        }
        for (id, e) in found {
            self.push("internal", vec![id], e);
        }
    }

    /// Per read: elements exist, are unique, come from transactions that did not fail, are
    /// not a partial view of one transaction's appends, and were not written in the future.
    fn reads(&mut self) {
        let mut found = Vec::new();
        for t in self.oks() {
            for (key, v) in reads(t) {
                let mut seen = HashSet::new();
                for (pos, &e) in v.iter().enumerate() {
                    if !seen.insert(e) {
                        found.push((
                            "duplicate-elements",
                            vec![t.id],
                            format!("T{} read key {key} as {v:?}: element {e} twice", t.id),
                        ));
                    }
                    let Some(&w) = self.writer.get(&(key, e)) else {
                        found.push((
                            "garbage-read",
                            vec![t.id],
                            format!(
                                "T{} read element {e} of key {key}, which no transaction appended",
                                t.id
                            ),
                        ));
                        continue;
                    };
                    if w == t.id {
                        continue;
                    }
                    let wt = &self.txns[w];
                    if wt.outcome == Outcome::Fail {
                        found.push(("G1a", vec![t.id, w], format!("T{} read element {e} of key {key}, appended by T{w}, which did not commit ({}) (aborted read)", t.id, wt.note)));
                    }
                    let mine = &self.appends[&(w, key)];
                    let j = mine.iter().position(|&x| x == e).expect("indexed append");
                    if j + 1 < mine.len() && v.get(pos + 1) != Some(&mine[j + 1]) {
                        found.push(("G1b", vec![t.id, w], format!("T{} read key {key} as {v:?}, which holds T{w}'s element {e} but not the {} that T{w} appended right after it (intermediate read)", t.id, mine[j + 1])));
                    }
                    if wt.invoked_ns > t.completed_ns {
                        found.push(("future-read", vec![t.id, w], format!("T{} read element {e} of key {key}, but T{w}, which appended it, began only after T{} had finished", t.id, t.id)));
                    }
                }
            }
        }
        for (k, t, e) in found {
            self.push(k, t, e);
        }
    }

    /// Each key's version order is its longest read; every read must be a prefix of it.
    fn version_orders(&mut self) {
        let mut lists: BTreeMap<u64, Vec<(&List, usize)>> = BTreeMap::new();
        for t in self.oks() {
            for (key, v) in reads(t) {
                lists.entry(key).or_default().push((v, t.id));
            }
        }
        let mut found = Vec::new();
        for (key, mut vs) in lists {
            vs.sort_by_key(|(v, _)| v.len());
            let (longest, _) = *vs.last().expect("non-empty");
            if let Some((v, t)) = vs.iter().find(|(v, _)| !longest.starts_with(v)) {
                let lt = vs.last().expect("non-empty").1;
                found.push((
                    vec![*t, lt],
                    format!(
                        "key {key} was read as {v:?} by T{t} and as {longest:?} by T{lt}: neither extends the other, so some committed write was lost or reordered"
                    ),
                ));
                self.broken.insert(key);
            }
            for (i, &e) in longest.iter().enumerate() {
                self.position.entry((key, e)).or_insert(i);
            }
            self.order.insert(key, longest.clone());
        }
        for (t, e) in found {
            self.push("incompatible-order", t, e);
        }
    }

    /// Two committed transactions that read the same version of a key and both appended to it.
    fn lost_updates(&mut self) {
        let mut groups: BTreeMap<(u64, &List), Vec<usize>> = BTreeMap::new();
        for t in self.oks() {
            let appended: HashSet<u64> = t
                .mops
                .iter()
                .filter_map(|m| match m {
                    Mop::Append { key, .. } => Some(*key),
                    _ => None,
                })
                .collect();
            let mut seen = HashSet::new();
            for (key, v) in external_reads(t) {
                if appended.contains(&key) && seen.insert(key) {
                    groups.entry((key, v)).or_default().push(t.id);
                }
            }
        }
        let mut found = Vec::new();
        for ((key, v), ts) in groups {
            if ts.len() > 1 {
                let names: Vec<String> = ts.iter().map(|t| format!("T{t}")).collect();
                found.push((
                    ts,
                    format!(
                        "{} all read key {key} as {v:?} and appended to it, and all committed: all but one of those updates is lost (lost update)",
                        names.join(", ")
                    ),
                ));
            }
        }
        for (t, e) in found {
            self.push("lost-update", t, e);
        }
    }

    /// Committed: `Ok`, or `Info` with an append someone observed.
    fn committed_set(&mut self) {
        for t in self.txns {
            self.committed[t.id] = match t.outcome {
                Outcome::Ok => true,
                Outcome::Fail => false,
                Outcome::Info => t.mops.iter().any(|m| {
                    matches!(m, Mop::Append { key, elem } if self.position.contains_key(&(*key, *elem)))
                }),
            };
        }
    }

    /// The final read holds every append of every committed transaction.
    fn durability(&mut self) {
        let Some(fin) = self
            .txns
            .iter()
            .rev()
            .find(|t| t.is_final && t.outcome == Outcome::Ok)
        else {
            return;
        };
        let finals: HashMap<u64, HashSet<u64>> = reads(fin)
            .map(|(k, v)| (k, v.iter().copied().collect()))
            .collect();
        let mut found = Vec::new();
        for t in self
            .txns
            .iter()
            .filter(|t| self.committed[t.id] && !t.is_final)
        {
            for m in &t.mops {
                let Mop::Append { key, elem } = *m else {
                    continue;
                };
                if finals.get(&key).is_some_and(|s| !s.contains(&elem)) {
                    let (kind, why) = if t.outcome == Outcome::Ok {
                        ("lost-commit", "was acknowledged COMMITTED")
                    } else {
                        (
                            "partial-commit",
                            "had another of its appends observed, so it committed",
                        )
                    };
                    found.push((
                        kind,
                        vec![t.id, fin.id],
                        format!(
                            "T{} appended {elem} to key {key} and {why}, but the final read after recovery (T{}) does not hold it",
                            t.id, fin.id
                        ),
                    ));
                }
            }
        }
        for (k, t, e) in found {
            self.push(k, t, e);
        }
    }

    /// A transaction invoked after another's `COMMITTED` reply reads all of its appends.
    fn real_time(&mut self) {
        // key -> (completion time, elements a later reader must see at least, writer).
        let mut writes: HashMap<u64, Vec<(u64, usize, usize)>> = HashMap::new();
        for (&(id, key), elems) in &self.appends {
            let t = &self.txns[id];
            if t.outcome != Outcome::Ok || t.is_final {
                continue;
            }
            let last = *elems.last().expect("non-empty");
            let need = self
                .position
                .get(&(key, last))
                .map_or(usize::MAX, |p| p + 1);
            writes
                .entry(key)
                .or_default()
                .push((t.completed_ns, need, id));
        }
        // Prefix maxima over completion time, so each read is one binary search.
        // key -> (completion times, best (elements needed, writer) so far).
        type Frontier = (Vec<u64>, Vec<(usize, usize)>);
        let mut frontier: HashMap<u64, Frontier> = HashMap::new();
        for (key, mut ws) in writes {
            ws.sort();
            let mut best = (0, usize::MAX);
            let (times, maxes) = ws
                .iter()
                .map(|&(at, need, w)| {
                    if best.1 == usize::MAX || need > best.0 {
                        best = (need, w);
                    }
                    (at, best)
                })
                .unzip();
            frontier.insert(key, (times, maxes));
        }
        let mut found = Vec::new();
        for t in self.oks().filter(|t| !t.is_final) {
            for (key, v) in external_reads(t) {
                let Some((times, maxes)) = frontier.get(&key) else {
                    continue;
                };
                let n = times.partition_point(|&c| c < t.invoked_ns);
                if n == 0 {
                    continue;
                }
                let (need, w) = maxes[n - 1];
                if w != t.id && v.len() < need {
                    found.push((
                        vec![w, t.id],
                        format!(
                            "T{} began after T{w} was acknowledged COMMITTED, yet read key {key} as {v:?}, without T{w}'s append{} (stale read)",
                            t.id,
                            if need == usize::MAX { ", which no read ever showed".to_string() } else { format!(" at position {}", need - 1) }
                        ),
                    ));
                }
            }
        }
        for (t, e) in found {
            self.push("stale-read", t, e);
        }
    }

    /// dtkv's contract: a snapshot at `start` sees exactly the commits below `start`; version
    /// order follows commit timestamps.
    fn timestamps(&mut self) {
        let mut found = Vec::new();
        let commit_ts = |w: usize| -> Option<u64> {
            let t = &self.txns[w];
            (t.outcome == Outcome::Ok && !t.is_final)
                .then_some(t.commit_ts)
                .flatten()
        };
        for (&key, order) in &self.order {
            if self.broken.contains(&key) {
                continue;
            }
            let ts: Vec<(usize, u64)> = order
                .iter()
                .filter_map(|e| {
                    let w = self.writer.get(&(key, *e))?;
                    Some((*w, commit_ts(*w)?))
                })
                .collect();
            for p in ts.windows(2) {
                if p[0].0 != p[1].0 && p[0].1 >= p[1].1 {
                    found.push(("commit-order", vec![p[0].0, p[1].0], format!(
                        "on key {key} T{}'s append comes before T{}'s, but their commit timestamps are {} and {}",
                        p[0].0, p[1].0, p[0].1, p[1].1
                    )));
                }
            }
        }
        for t in self.oks().filter(|t| !t.is_final) {
            let Some(start) = t.start_ts else { continue };
            for (key, v) in external_reads(t) {
                if self.broken.contains(&key) {
                    continue;
                }
                let seen = v.last().and_then(|e| self.writer.get(&(key, *e)).copied());
                let next = self
                    .order
                    .get(&key)
                    .and_then(|o| o.get(v.len()))
                    .and_then(|e| self.writer.get(&(key, *e)).copied());
                if let Some((w, c)) = seen.and_then(|w| Some((w, commit_ts(w)?))) {
                    if c >= start {
                        found.push(("snapshot-timestamp", vec![w, t.id], format!(
                            "T{} (snapshot {start}) read key {key} as {v:?}, including T{w}, which committed at {c}, not before the snapshot",
                            t.id
                        )));
                    }
                }
                if let Some((w, c)) = next.and_then(|w| Some((w, commit_ts(w)?))) {
                    if c < start && w != t.id {
                        found.push(("snapshot-timestamp", vec![w, t.id], format!(
                            "T{} (snapshot {start}) read key {key} as {v:?}, missing T{w}'s next append, which committed at {c}, before the snapshot",
                            t.id
                        )));
                    }
                }
            }
        }
        for (k, t, e) in found {
            self.push(k, t, e);
        }
    }
}
