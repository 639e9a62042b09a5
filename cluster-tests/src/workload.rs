//! A transactional workload and the checks the recovery tests and `make drill` run on it.
//!
//! Each transaction of client `c` (number `t`) writes the value `c-t` to three keys of its own
//! and to one of five shared keys (so conflicts abort some). After any fault: every committed
//! transaction's writes are present (the newest one per client, or a later indeterminate one),
//! no aborted transaction's write is visible anywhere, and the three own keys always agree (a
//! transaction is all or nothing).

use bytes::Bytes;
use protocol::{ClientError, CommitOutcome};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the workload saw: per client, each transaction's outcome.
#[derive(Default)]
pub struct History {
    /// (client, txn) -> committed?  None = indeterminate (the connection broke).
    pub outcomes: BTreeMap<(u64, u64), Option<bool>>,
}

/// Each transaction of client `c` (number `t`) writes the value `c-t` to its three own keys and
/// to one of five shared hot keys, so conflicts abort some, and a torn transaction would show
/// up as own keys that disagree.
pub async fn workload(
    addr: std::net::SocketAddr,
    prefix: String,
    c: u64,
    hist: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut conn) = crate::Credentials::from_env()
            .connect_any(&addr.to_string())
            .await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            t += 1;
            let value = format!("{c}-{t}");
            let hot = rng.gen_range(0..5);
            let result: Result<CommitOutcome, ClientError> = async {
                conn.begin().await?;
                for k in 0..3 {
                    conn.put(format!("{prefix}own-{c}-{k}"), value.clone())
                        .await?;
                }
                conn.get(format!("{prefix}hot-{hot}")).await?;
                conn.put(format!("{prefix}hot-{hot}"), value.clone())
                    .await?;
                conn.commit().await
            }
            .await;
            let outcome = match result {
                Ok(CommitOutcome::Committed(_)) => Some(true),
                Ok(CommitOutcome::Aborted(_)) => Some(false),
                Err(ClientError::Server(_)) => Some(false), // e.g. UNAVAILABLE before COMMIT
                Err(_) => None,
            };
            if matches!(result, Err(ClientError::Server(_))) {
                // The session is now in an aborted block (or still holds the transaction):
                // end it, as DKSP asks, before the next BEGIN.
                if conn.kv(&protocol::kv::Request::Abort).await.is_err() {
                    hist.lock().unwrap().outcomes.insert((c, t), outcome);
                    break;
                }
            }
            hist.lock().unwrap().outcomes.insert((c, t), outcome);
            if outcome.is_none() {
                break; // reconnect
            }
        }
    }
}

fn parse_value(v: &Bytes) -> Result<(u64, u64), String> {
    let bad = || format!("unexpected value {v:?}");
    let s = std::str::from_utf8(v).map_err(|_| bad())?;
    let (c, t) = s.split_once('-').ok_or_else(bad)?;
    Ok((c.parse().map_err(|_| bad())?, t.parse().map_err(|_| bad())?))
}

/// Every committed transaction is present; nothing aborted is; each is all-or-nothing.
pub async fn check_history(
    addr: std::net::SocketAddr,
    prefix: &str,
    hist: &History,
    clients: u64,
) -> Result<(), String> {
    let mut c = crate::Credentials::from_env()
        .connect_any(&addr.to_string())
        .await
        .map_err(|e| e.to_string())?;
    for client in 0..clients {
        let vals: Vec<Option<Bytes>> = {
            let mut v = Vec::new();
            for k in 0..3 {
                v.push(
                    c.get(format!("{prefix}own-{client}-{k}"))
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            v
        };
        if !vals.windows(2).all(|w| w[0] == w[1]) {
            return Err(format!("client {client}: torn transaction {vals:?}"));
        }
        let last_committed = hist
            .outcomes
            .iter()
            .filter(|((cl, _), o)| *cl == client && **o == Some(true))
            .map(|((_, t), _)| *t)
            .max();
        match (&vals[0], last_committed) {
            (None, None) => {}
            (None, Some(t)) => return Err(format!("client {client}: committed txn {t} lost")),
            (Some(v), last) => {
                let (cl, t) = parse_value(v)?;
                if cl != client || last.is_some_and(|l| t < l) {
                    return Err(format!(
                        "client {client}: committed txn {last:?} lost, found {cl}-{t}"
                    ));
                }
                if hist.outcomes.get(&(client, t)) == Some(&Some(false)) {
                    return Err(format!("aborted txn {client}-{t} is visible"));
                }
            }
        }
    }
    for hot in 0..5 {
        if let Some(v) = c
            .get(format!("hot-{hot}"))
            .await
            .map_err(|e| e.to_string())?
        {
            let (cl, t) = parse_value(&v)?;
            if hist.outcomes.get(&(cl, t)) == Some(&Some(false)) {
                return Err(format!("aborted txn {cl}-{t} is visible in hot-{hot}"));
            }
        }
    }
    Ok(())
}

impl History {
    /// Transactions known to have committed.
    pub fn committed(&self) -> usize {
        self.outcomes.values().filter(|o| **o == Some(true)).count()
    }

    /// One line: committed, aborted and indeterminate counts.
    pub fn summary(&self) -> String {
        let aborted = self
            .outcomes
            .values()
            .filter(|o| **o == Some(false))
            .count();
        let unknown = self.outcomes.values().filter(|o| o.is_none()).count();
        format!(
            "{} transactions: {} committed, {aborted} aborted, {unknown} indeterminate (connection lost)",
            self.outcomes.len(),
            self.committed()
        )
    }
}
