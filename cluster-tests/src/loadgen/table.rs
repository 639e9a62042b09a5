//! Tables: rows as markdown, medians over rounds, and the comparison of systems.

use super::{abort_rate, Row};

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One system's rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| system | workload | key choice | clients | in flight | ops/s | abort rate | errors | p50 µs | p95 µs | p99 µs | max µs |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1}% | {} | {} | {} | {} | {} |\n",
            r.system,
            r.workload,
            r.dist,
            r.clients,
            r.depth,
            thousands(r.per_sec),
            100.0 * r.abort_rate(),
            r.errors,
            thousands(r.p50_us as f64),
            thousands(r.p95_us as f64),
            thousands(r.p99_us as f64),
            thousands(r.max_us as f64),
        );
    }
    out
}

/// The median of `values`: the middle one, or the mean of the middle two for an even count;
/// `None` for no values. NaNs sort last (`total_cmp`), so one cannot panic the sort.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One system's rounds of one experiment, reduced to what the side-by-side table shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Rounds {
    /// How many rounds there were.
    pub rounds: usize,
    /// ops/s: the median over rounds, and the slowest and fastest round.
    pub median: f64,
    /// The slowest round's ops/s.
    pub min: f64,
    /// The fastest round's ops/s.
    pub max: f64,
    /// The median of the rounds' p99 latencies, µs.
    pub p99_us: f64,
    /// Summed over rounds.
    pub ops: u64,
    /// Aborted transactions, summed over rounds.
    pub aborts: u64,
    /// Failed operations, summed over rounds.
    pub errors: u64,
}

impl Rounds {
    /// The rounds of `rows` (all of one system and experiment); `None` for no rows.
    pub fn of(rows: &[&Row]) -> Option<Rounds> {
        let per_sec: Vec<f64> = rows.iter().map(|r| r.per_sec).collect();
        let p99: Vec<f64> = rows.iter().map(|r| r.p99_us as f64).collect();
        Some(Rounds {
            rounds: rows.len(),
            median: median(&per_sec)?,
            min: per_sec.iter().copied().fold(f64::INFINITY, f64::min),
            max: per_sec.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            p99_us: median(&p99)?,
            ops: rows.iter().map(|r| r.ops).sum(),
            aborts: rows.iter().map(|r| r.aborts).sum(),
            errors: rows.iter().map(|r| r.errors).sum(),
        })
    }

    /// The slowest and the fastest round as a percentage off the median (-4.0, 2.5); zeros
    /// when the median is zero.
    pub fn spread_pct(&self) -> (f64, f64) {
        if self.median > 0.0 {
            (
                100.0 * (self.min / self.median - 1.0),
                100.0 * (self.max / self.median - 1.0),
            )
        } else {
            (0.0, 0.0)
        }
    }

    /// Aborted transactions as a fraction of those tried, over all rounds.
    pub fn abort_rate(&self) -> f64 {
        abort_rate(self.ops, self.aborts)
    }

    /// Our median ops/s divided by theirs; `None` when theirs is zero.
    pub fn ratio(&self, theirs: &Rounds) -> Option<f64> {
        (theirs.median > 0.0).then(|| self.median / theirs.median)
    }
}

/// The experiments (row keys) `system` ran, in the order its first rows came.
fn experiments_of(rows: &[Row], system: &str) -> Vec<(String, String, usize, usize)> {
    let mut keys = Vec::new();
    for r in rows.iter().filter(|r| r.system == system) {
        if !keys.contains(&r.key()) {
            keys.push(r.key());
        }
    }
    keys
}

/// The side-by-side table: one line per experiment `ours` ran, for each system the median
/// ops/s over its rounds with the slowest and fastest round as % of that median and the median
/// p99, and our median divided by theirs. Every row of a system and experiment is one round
/// (rows of old files carry no round number and are still one each). Notes on other systems'
/// rows go below.
pub fn compare(rows: &[Row], ours: &str, peers: &[&str]) -> String {
    let mut out = format!(
        "| workload | key choice | clients × in flight | rounds | {ours} ops/s [spread] (p99 ms) |"
    );
    let mut rule = String::from("|---|---|---:|---:|---:|");
    for p in peers {
        out += &format!(" {p} ops/s [spread] (p99 ms) | {ours} ÷ {p} |");
        rule += "---:|---:|";
    }
    out += "\n";
    out += &rule;
    out += "\n";
    let cell = |r: &Rounds, rounds: usize| {
        let mut c = thousands(r.median);
        if r.rounds > 1 {
            let (lo, hi) = r.spread_pct();
            c += &format!(" [{lo:.0}/+{hi:.0}%]");
        }
        c += &format!(" ({:.1})", r.p99_us / 1000.0);
        if r.rounds != rounds {
            c += &format!(", {} rounds", r.rounds);
        }
        if r.aborts > 0 {
            c += &format!(", {:.1}% aborted", 100.0 * r.abort_rate());
        }
        if r.errors > 0 {
            c += &format!(", {} errors", r.errors);
        }
        c
    };
    let of = |system: &str, key: &(String, String, usize, usize)| {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.system == system && &r.key() == key)
            .collect();
        Rounds::of(&mine).map(|r| (r, mine))
    };
    let mut notes = Vec::new();
    let mut most_rounds = 0;
    for key in experiments_of(rows, ours) {
        let Some((us, _)) = of(ours, &key) else {
            continue;
        };
        most_rounds = most_rounds.max(us.rounds);
        let (workload, dist, clients, depth) = &key;
        out += &format!(
            "| {workload} | {dist} | {clients} × {depth} | {} | {} |",
            us.rounds,
            cell(&us, us.rounds)
        );
        for p in peers {
            match of(p, &key) {
                Some((them, their_rows)) => {
                    let ratio = us
                        .ratio(&them)
                        .map_or("—".to_string(), |x| format!("{x:.2}×"));
                    out += &format!(" {} | {ratio} |", cell(&them, us.rounds));
                    for o in their_rows {
                        let seen = notes.iter().any(|n: &String| n.ends_with(&o.note));
                        if !o.note.is_empty() && !seen {
                            notes.push(format!("- {p}, {} {}: {}", o.workload, o.dist, o.note));
                        }
                    }
                }
                None => out += " — | — |",
            }
        }
        out += "\n";
    }
    if most_rounds > 1 {
        out += "\nops/s: the median over rounds, in brackets the slowest and the fastest round \
                as % off it; p99: the median of the rounds' p99; the ratio is of the medians.\n";
    }
    if !notes.is_empty() {
        out += "\n";
        out += &notes.join("\n");
        out += "\n";
    }
    out
}
