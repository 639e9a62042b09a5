//! What a run's checks concluded: counts, the anomalies found, `adya`'s opinion, the nemesis
//! events, rendered with the transactions involved.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use super::super::history::{self, History, Outcome};
use super::Anomaly;

/// What a run's checks concluded, printed at the end of every run.
pub struct Report {
    /// Transactions in the history.
    pub txns: usize,
    /// Of those, committed.
    pub ok: usize,
    /// Of those, known not to have committed.
    pub fail: usize,
    /// Of those, indeterminate (the client never learned the outcome).
    pub info: usize,
    /// What dtkv's own checker found.
    pub anomalies: Vec<Anomaly>,
    /// What `adya` said, one line per model checked.
    pub adya: Vec<String>,
    /// Whether `adya` found a violation of the model dtkv promises.
    pub adya_failed: bool,
    /// The nemesis events, with their times.
    pub events: Vec<String>,
}

impl Report {
    /// The report of `h` with the checker's `anomalies`, before `adya` is asked.
    pub fn new(h: &History, anomalies: Vec<Anomaly>) -> Report {
        Report {
            txns: h.txns.len(),
            ok: h.count(Outcome::Ok),
            fail: h.count(Outcome::Fail),
            info: h.count(Outcome::Info),
            anomalies,
            adya: Vec::new(),
            adya_failed: false,
            events: h
                .events
                .iter()
                .map(|e| format!("{:8.3}s {}", history::secs(e.at_ns), e.what))
                .collect(),
        }
    }

    /// Whether neither checker found a violation.
    pub fn valid(&self) -> bool {
        self.anomalies.is_empty() && !self.adya_failed
    }

    /// Renders the report, showing the transactions involved in (up to 10) anomalies.
    pub fn render(&self, h: &History) -> String {
        self.to_string() + &self.details(h)
    }

    fn details(&self, h: &History) -> String {
        let mut s = String::new();
        for a in self.anomalies.iter().take(10) {
            let _ = writeln!(s, "  {}: {}", a.kind, a.explanation);
            for &t in a.txns.iter().take(6) {
                let _ = writeln!(s, "      {}", h.txns[t]);
            }
        }
        if self.anomalies.len() > 10 {
            let _ = writeln!(s, "  ... and {} more", self.anomalies.len() - 10);
        }
        s
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} transactions: {} committed, {} aborted, {} indeterminate",
            self.txns, self.ok, self.fail, self.info
        )?;
        for e in &self.events {
            writeln!(f, "  {e}")?;
        }
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &self.anomalies {
            *kinds.entry(a.kind).or_default() += 1;
        }
        if kinds.is_empty() {
            writeln!(f, "checker: no anomalies")?;
        } else {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            writeln!(f, "checker: ANOMALIES {}", list.join(", "))?;
        }
        for a in &self.adya {
            writeln!(f, "adya: {a}")?;
        }
        writeln!(f, "{}", if self.valid() { "VALID" } else { "INVALID" })
    }
}
