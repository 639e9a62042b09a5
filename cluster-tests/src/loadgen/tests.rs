//! Unit tests of the load generator's pure parts: parsing, keys, histograms, imports and tables.

use super::*;
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn durations_parse_with_and_without_units() {
    assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("0").is_err());
    assert!(parse_duration("5h").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn zipf_puts_most_weight_on_the_first_ranks() {
    let z = Zipf::new(1000, 0.99);
    let mut rng = StdRng::seed_from_u64(7);
    let mut counts = vec![0u32; 1000];
    for _ in 0..100_000 {
        counts[z.sample(&mut rng) as usize] += 1;
    }
    // p(rank 0) = 1 / H(1000, 0.99) ≈ 0.13; uniform would give 0.001.
    assert!(counts[0] > 10_000, "rank 0 drew {}", counts[0]);
    assert!(counts[0] > counts[1] && counts[1] > counts[9]);
    assert!(counts[999] < 100);
}

#[test]
fn summary_takes_percentiles_from_the_merged_histogram() {
    let mut a = histogram();
    let mut b = histogram();
    for us in 1..=50 {
        a.saturating_record(us * 100);
    }
    for us in 51..=100 {
        b.saturating_record(us * 100);
    }
    a.add(&b).unwrap();
    let spec = Spec {
        target: Target::Dtkv,
        addrs: vec!["x".into()],
        workload: Workload::Rmw,
        clients: 4,
        depth: 1,
        limit: Limit::Ops(1),
        keys: 10,
        dist: Dist::Zipfian,
        zipf_s: 0.99,
        value_size: 100,
        rmw_ops: 4,
        progress: false,
    };
    let r = summarize(&meta("dtkv", &spec), &a, 100, 25, 3, 2.0);
    assert_eq!(r.workload, "rmw4");
    assert_eq!(r.per_sec, 50.0);
    assert_eq!(r.abort_rate(), 0.2);
    // 3 significant digits: within 0.1% of the exact value.
    assert!((4990..=5010).contains(&r.p50_us), "p50 {}", r.p50_us);
    assert!((9890..=9910).contains(&r.p99_us), "p99 {}", r.p99_us);
    assert!((9990..=10010).contains(&r.max_us), "max {}", r.max_us);
}

#[test]
fn pgbench_log_counts_failed_transactions_apart() {
    let log = "0 0 1200 0 1700000000 100\n0 1 failed 0 1700000000 200\n1 0 800 0 1700000000 300\n\ngarbage\n";
    let (hist, ok, failed, bad) = import_pgbench_log(log);
    assert_eq!((ok, failed, bad), (2, 1, 1));
    assert!((1195..=1205).contains(&hist.max()));
}

#[test]
fn redis_csv_is_read_by_column_name() {
    let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"36231.88\",\"0.426\",\"0.112\",\"0.399\",\"0.655\",\"1.015\",\"5.671\"\n";
    let f = import_redis_csv(csv).unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].test, "SET");
    assert_eq!(f[0].rps, 36231.88);
    assert_eq!((f[0].p50_us, f[0].p99_us, f[0].max_us), (399, 1015, 5671));
    assert!(import_redis_csv("\"test\",\"rps\"\n").is_err());
    // A custom command's name is its whole command line, commas included.
    let eval = csv.replace("\"SET\"", "\"EVAL redis.call('GET', KEYS[1]) \"\"x\"\"\"");
    let f = import_redis_csv(&eval).unwrap();
    assert_eq!(f[0].test, "EVAL redis.call('GET', KEYS[1]) \"x\"");
    assert_eq!(f[0].p99_us, 1015);
}

/// A hand-made row: 16 × 1 uniform, p99 in ms.
fn row(system: &str, workload: &str, round: Option<u32>, per_sec: f64, p99_ms: u64) -> Row {
    Row {
        system: system.into(),
        workload: workload.into(),
        dist: "uniform".into(),
        clients: 16,
        depth: 1,
        keys: 10_000,
        value_size: 100,
        seconds: 1.0,
        ops: per_sec as u64,
        aborts: 0,
        errors: 0,
        per_sec,
        p50_us: 1000,
        p95_us: 2000,
        p99_us: p99_ms * 1000,
        max_us: 40_000,
        note: String::new(),
        round,
    }
}

#[test]
fn comparison_divides_ours_by_theirs_for_matching_rows_only() {
    // One round each, as in files written before rounds: no spread, no legend.
    let rows = vec![
        row("dtkv", "rmw4", None, 9000.0, 3),
        row("dtkv", "get", None, 100_000.0, 3),
        row("postgresql", "rmw4", None, 3000.0, 3),
    ];
    let table = compare(&rows, "dtkv", &["postgresql"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[2].contains("| 1 | 9,000 (3.0) |") && lines[2].ends_with("| 3.00× |"),
        "{}",
        lines[2]
    );
    assert!(lines[3].ends_with("| — | — |"), "{}", lines[3]);
}

#[test]
fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
    assert_eq!(median(&[]), None);
    assert_eq!(median(&[7.0]), Some(7.0));
    assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    // A NaN sorts last instead of panicking the sort.
    assert_eq!(median(&[f64::NAN, 1.0, 2.0]), Some(2.0));
}

#[test]
fn rounds_reduce_to_the_median_the_spread_and_a_ratio_of_medians() {
    // Four rounds of ours (an even count), three of theirs with one noisy round.
    let ours: Vec<Row> = [
        (1, 9000.0, 2),
        (2, 11_000.0, 4),
        (3, 10_000.0, 3),
        (4, 8000.0, 5),
    ]
    .into_iter()
    .map(|(n, ops, p99)| row("dtkv", "put", Some(n), ops, p99))
    .collect();
    let theirs: Vec<Row> = [(1, 5000.0, 2), (2, 2000.0, 9), (3, 4000.0, 3)]
        .into_iter()
        .map(|(n, ops, p99)| row("postgresql", "put", Some(n), ops, p99))
        .collect();
    let us = Rounds::of(&ours.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(us.rounds, 4);
    assert_eq!((us.median, us.min, us.max), (9500.0, 8000.0, 11_000.0));
    assert_eq!(us.p99_us, 3500.0);
    assert_eq!(us.ops, 38_000);
    let (lo, hi) = us.spread_pct();
    assert!(
        (lo + 15.79).abs() < 0.01 && (hi - 15.79).abs() < 0.01,
        "{lo} {hi}"
    );
    let them = Rounds::of(&theirs.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!((them.median, them.p99_us), (4000.0, 3000.0));
    // The ratio of medians, not the median of per-round ratios nor a ratio of means.
    assert_eq!(us.ratio(&them), Some(2.375));
    let stalled = Rounds {
        median: 0.0,
        ..them.clone()
    };
    assert_eq!(us.ratio(&stalled), None);
    assert_eq!(stalled.spread_pct(), (0.0, 0.0));
    assert_eq!(Rounds::of(&[]), None);
}

#[test]
fn the_comparison_shows_medians_and_spreads_and_a_dash_for_a_missing_peer_row() {
    let mut rows = Vec::new();
    for (n, put, get, pg) in [
        (1, 9000.0, 100_000.0, 5000.0),
        (2, 11_000.0, 90_000.0, 2000.0),
    ] {
        rows.push(row("dtkv", "put", Some(n), put, 2 + u64::from(n)));
        rows.push(row("dtkv", "get", Some(n), get, 1));
        rows.push(row("postgresql", "put", Some(n), pg, 4));
    }
    // A third PostgreSQL put round: its rounds differ from ours, which the cell says.
    rows.push(row("postgresql", "put", Some(3), 4000.0, 6));
    rows[2].aborts = 10;
    rows[2].note = "one node".into();
    let table = compare(&rows, "dtkv", &["postgresql", "etcd"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("| rounds | dtkv ops/s [spread] (p99 ms) |"),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[2],
        "| put | uniform | 16 × 1 | 2 | 10,000 [-10/+10%] (3.5) \
         | 4,000 [-50/+25%] (4.0), 3 rounds, 0.1% aborted | 2.50× | — | — |"
    );
    assert_eq!(
        lines[3],
        "| get | uniform | 16 × 1 | 2 | 95,000 [-5/+5%] (1.0) | — | — | — | — |"
    );
    assert!(
        lines[5].starts_with("ops/s: the median over rounds"),
        "{}",
        lines[5]
    );
    assert_eq!(lines[7], "- postgresql, put uniform: one node");
    assert_eq!(lines.len(), 8, "{table}");
}

#[test]
fn results_files_without_rounds_still_load_and_rounds_are_kept() {
    let old = r#"{"date":"2026-11-24","machine":"m","rows":[{"system":"dtkv","workload":"put",
        "dist":"uniform","clients":16,"depth":1,"keys":10000,"value_size":100,"seconds":10.0,
        "ops":100,"aborts":0,"errors":0,"per_sec":10.0,"p50_us":1,"p95_us":2,"p99_us":3,
        "max_us":4}]}"#;
    let r: Results = serde_json::from_str(old).unwrap();
    assert_eq!(r.rows[0].round, None);
    assert!(!serde_json::to_string(&r.rows[0]).unwrap().contains("round"));
    let with = row("dtkv", "put", Some(3), 1.0, 1);
    let back: Row = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
    assert_eq!(back.round, Some(3));
}

#[test]
fn values_have_the_requested_size() {
    assert_eq!(value(100, 3, 42).len(), 100);
    assert_eq!(value(4, 3, 42), b"c3-4".to_vec());
    assert_eq!(key_name(42), "key0000042");
}
