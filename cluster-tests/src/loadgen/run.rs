//! Running: the closed-loop clients, their shared progress counters and budget, and the merge of
//! their histograms into a [`Row`].

use hdrhistogram::Histogram;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Conn, Outcome};
use super::{
    histogram, key_name, meta, summarize, value, Dist, Limit, Row, Spec, Target, Workload, Zipf,
};

/// Shared by the clients: what the progress line shows, and the operation budget.
struct Shared {
    ops: AtomicU64,
    aborts: AtomicU64,
    errors: AtomicU64,
    /// Operations (transactions) still to start, for `Limit::Ops`.
    remaining: AtomicI64,
    deadline: Option<Instant>,
}

impl Shared {
    /// Whether the client may start another operation.
    fn take(&self) -> bool {
        match self.deadline {
            Some(d) => Instant::now() < d,
            None => self.remaining.fetch_sub(1, Ordering::Relaxed) > 0,
        }
    }
}

struct ClientTotals {
    hist: Histogram<u64>,
    ops: u64,
    aborts: u64,
    errors: u64,
}

/// Keeps a client connected: after a failure it waits a little, so a dead server costs one
/// error per 100 ms per client rather than a busy loop.
async fn reconnect(
    target: Target,
    addr: &str,
    shared: &Shared,
    t: &mut ClientTotals,
) -> Option<Conn> {
    loop {
        if let Some(d) = shared.deadline {
            if Instant::now() >= d {
                return None;
            }
        } else if shared.remaining.load(Ordering::Relaxed) <= 0 {
            return None;
        }
        match Conn::connect(target, addr).await {
            Ok(c) => return Some(c),
            Err(_) => {
                t.errors += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn client(
    spec: Arc<Spec>,
    id: usize,
    shared: Arc<Shared>,
    zipf: Option<Arc<Zipf>>,
) -> ClientTotals {
    let addr = spec.addrs[id % spec.addrs.len()].clone();
    let mut rng = StdRng::seed_from_u64(id as u64);
    let mut t = ClientTotals {
        hist: histogram(),
        ops: 0,
        aborts: 0,
        errors: 0,
    };
    let pick = |rng: &mut StdRng| match &zipf {
        Some(z) => z.sample(rng),
        None => rng.gen_range(0..spec.keys),
    };
    let mut seq = 0u64;
    let Some(mut conn) = reconnect(spec.target, &addr, &shared, &mut t).await else {
        return t;
    };
    if spec.workload == Workload::Rmw {
        let reads = spec.rmw_ops.div_ceil(2).max(1);
        let writes = (spec.rmw_ops / 2).min(reads);
        while shared.take() {
            let keys: Vec<String> = (0..reads).map(|_| key_name(pick(&mut rng))).collect();
            seq += 1;
            let v = value(spec.value_size, id, seq);
            let t0 = Instant::now();
            match conn.rmw(&keys, writes, &v).await {
                Ok(Outcome::Done) => {
                    t.hist.saturating_record(t0.elapsed().as_micros() as u64);
                    t.ops += 1;
                    shared.ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Aborted) => {
                    t.aborts += 1;
                    shared.aborts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Failed) | Err(_) => {
                    t.errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    // The transaction state on the connection is unknown after a failure.
                    match reconnect(spec.target, &addr, &shared, &mut t).await {
                        Some(c) => conn = c,
                        None => break,
                    }
                }
            }
        }
        return t;
    }
    let mut inflight: VecDeque<Instant> = VecDeque::with_capacity(spec.depth);
    loop {
        while inflight.len() < spec.depth && shared.take() {
            let key = key_name(pick(&mut rng));
            let put = match spec.workload {
                Workload::Put => true,
                Workload::Get => false,
                _ => rng.gen_bool(0.5),
            };
            if put {
                seq += 1;
                conn.send_put(&key, &value(spec.value_size, id, seq));
            } else {
                conn.send_get(&key);
            }
            inflight.push_back(Instant::now());
        }
        let Some(&t0) = inflight.front() else {
            break;
        };
        match conn.recv().await {
            Ok(outcome) => {
                inflight.pop_front();
                if outcome == Outcome::Done {
                    t.hist.saturating_record(t0.elapsed().as_micros() as u64);
                    t.ops += 1;
                    shared.ops.fetch_add(1, Ordering::Relaxed);
                } else {
                    t.errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                let lost = inflight.len() as u64;
                inflight.clear();
                t.errors += lost;
                shared.errors.fetch_add(lost, Ordering::Relaxed);
                match reconnect(spec.target, &addr, &shared, &mut t).await {
                    Some(c) => conn = c,
                    None => break,
                }
            }
        }
    }
    t
}

/// Runs one experiment and returns its row (`system` names it in the tables).
pub async fn run(system: &str, spec: &Spec) -> Row {
    let spec = Arc::new(spec.clone());
    let zipf = (spec.dist == Dist::Zipfian).then(|| Arc::new(Zipf::new(spec.keys, spec.zipf_s)));
    let start = Instant::now();
    let shared = Arc::new(Shared {
        ops: AtomicU64::new(0),
        aborts: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        remaining: AtomicI64::new(match spec.limit {
            Limit::Ops(n) => n as i64,
            Limit::Time(_) => i64::MAX,
        }),
        deadline: match spec.limit {
            Limit::Time(d) => Some(start + d),
            Limit::Ops(_) => None,
        },
    });
    let label = format!(
        "{system} {} {} c{} d{}",
        spec.workload.name(spec.rmw_ops),
        spec.dist.name(),
        spec.clients,
        spec.depth
    );
    let progress = spec.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(progress_line(label, shared, start))
    });
    let tasks: Vec<_> = (0..spec.clients)
        .map(|id| tokio::spawn(client(spec.clone(), id, shared.clone(), zipf.clone())))
        .collect();
    let mut hist = histogram();
    let (mut ops, mut aborts, mut errors) = (0, 0, 0);
    for task in tasks {
        match task.await {
            Ok(t) => {
                // Same bounds on both sides, so adding cannot fail.
                let _ = hist.add(&t.hist);
                ops += t.ops;
                aborts += t.aborts;
                errors += t.errors;
            }
            Err(_) => errors += 1,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    summarize(&meta(system, &spec), &hist, ops, aborts, errors, seconds)
}

async fn progress_line(label: String, shared: Arc<Shared>, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let ops = shared.ops.load(Ordering::Relaxed);
        let line = format!(
            "  {label}: {:>4.0} s, {ops} done, {}/s now, {} aborted, {} errors",
            start.elapsed().as_secs_f64(),
            ops - last,
            shared.aborts.load(Ordering::Relaxed),
            shared.errors.load(Ordering::Relaxed)
        );
        last = ops;
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Writes every key once (pipelined, 16 connections) so reads find values; returns the errors.
pub async fn preload(spec: &Spec) -> u64 {
    let conns = 16.min(spec.keys as usize).max(1);
    let tasks: Vec<_> = (0..conns)
        .map(|id| {
            let spec = spec.clone();
            tokio::spawn(async move {
                let addr = &spec.addrs[id % spec.addrs.len()];
                let Ok(mut c) = Conn::connect(spec.target, addr).await else {
                    return 1u64;
                };
                let mine: Vec<u64> = (id as u64..spec.keys).step_by(conns).collect();
                let (mut sent, mut errors) = (0, 0u64);
                for done in 0..mine.len() {
                    while sent < mine.len() && sent - done < 64 {
                        c.send_put(&key_name(mine[sent]), &value(spec.value_size, id, 0));
                        sent += 1;
                    }
                    match c.recv().await {
                        Ok(Outcome::Done) => {}
                        Ok(_) => errors += 1,
                        Err(_) => return errors + (mine.len() - done) as u64,
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = 0;
    for t in tasks {
        errors += t.await.unwrap_or(1);
    }
    errors
}
