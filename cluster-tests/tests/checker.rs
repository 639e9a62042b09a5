//! The checkers against hand-made histories: each anomaly snapshot isolation forbids must be
//! flagged by our checker and by adya, write skew must pass both under snapshot isolation, and
//! adya must flag it when asked for serializability. A checker that passes everything would
//! pass every real run too, so these are what make the nemesis tests mean something.

use cluster_tests::jepsen::checker::check;
use cluster_tests::jepsen::elle;
use cluster_tests::jepsen::history::{History, Mop, Outcome, Txn};

fn r(key: u64, v: &[u64]) -> Mop {
    Mop::Read {
        key,
        value: Some(v.to_vec()),
    }
}

fn a(key: u64, elem: u64) -> Mop {
    Mop::Append { key, elem }
}

/// A transaction of process `p` over `[from, to]` (arbitrary time units).
fn t(p: u64, outcome: Outcome, from: u64, to: u64, mops: Vec<Mop>) -> Txn {
    Txn::new(p, mops, outcome, from, to)
}

fn ok(p: u64, from: u64, to: u64, mops: Vec<Mop>) -> Txn {
    t(p, Outcome::Ok, from, to, mops)
}

const X: u64 = 0;
const Y: u64 = 1;

/// Each case: a name, the history, the anomaly kind our checker must report.
fn cases() -> Vec<(&'static str, History, &'static str)> {
    let mut lost_commit_final = ok(9, 50, 60, vec![r(X, &[])]);
    lost_commit_final.is_final = true;
    let mut ts_writer = ok(0, 0, 10, vec![r(X, &[]), a(X, 1)]);
    ts_writer.commit_ts = Some(20);
    let mut ts_reader = ok(1, 5, 30, vec![r(X, &[1])]);
    ts_reader.start_ts = Some(10);
    vec![
        (
            "aborted read",
            History::from_txns(vec![
                t(0, Outcome::Fail, 0, 10, vec![a(X, 1)]),
                ok(1, 20, 30, vec![r(X, &[1])]),
            ]),
            "G1a",
        ),
        (
            "intermediate read",
            History::from_txns(vec![
                ok(0, 0, 20, vec![a(X, 1), a(X, 2)]),
                ok(1, 5, 15, vec![r(X, &[1])]),
            ]),
            "G1b",
        ),
        (
            "lost update",
            History::from_txns(vec![
                ok(0, 0, 10, vec![r(X, &[]), a(X, 1)]),
                ok(1, 0, 10, vec![r(X, &[]), a(X, 2)]),
                ok(2, 20, 30, vec![r(X, &[2])]),
            ]),
            "lost-update",
        ),
        (
            "read skew",
            History::from_txns(vec![
                ok(0, 0, 10, vec![a(X, 1), a(Y, 2)]),
                ok(1, 5, 15, vec![r(X, &[1]), r(Y, &[])]),
            ]),
            "G-single",
        ),
        (
            "circular information flow",
            History::from_txns(vec![
                ok(0, 0, 10, vec![a(X, 1), r(Y, &[2])]),
                ok(1, 0, 10, vec![a(Y, 2), r(X, &[1])]),
            ]),
            "G1c",
        ),
        (
            "write cycle",
            History::from_txns(vec![
                ok(0, 0, 10, vec![a(X, 1), a(Y, 4)]),
                ok(1, 0, 10, vec![a(X, 3), a(Y, 2)]),
                ok(2, 20, 30, vec![r(X, &[1, 3]), r(Y, &[2, 4])]),
            ]),
            "G0",
        ),
        (
            "lost acknowledged commit",
            History::from_txns(vec![ok(0, 0, 10, vec![a(X, 1)]), lost_commit_final]),
            "lost-commit",
        ),
        (
            "stale read",
            History::from_txns(vec![
                ok(0, 0, 10, vec![a(X, 1)]),
                ok(1, 20, 30, vec![r(X, &[])]),
            ]),
            "stale-read",
        ),
        (
            "non-repeatable read",
            History::from_txns(vec![
                ok(0, 0, 30, vec![r(X, &[]), r(X, &[1])]),
                ok(1, 5, 10, vec![a(X, 1)]),
            ]),
            "internal",
        ),
        (
            "diverging versions",
            History::from_txns(vec![
                ok(0, 0, 10, vec![a(X, 1)]),
                ok(1, 0, 10, vec![a(X, 2)]),
                ok(2, 20, 30, vec![r(X, &[1])]),
                ok(3, 20, 30, vec![r(X, &[2])]),
            ]),
            "incompatible-order",
        ),
        (
            "future read",
            History::from_txns(vec![
                ok(0, 0, 10, vec![r(X, &[1])]),
                ok(1, 20, 30, vec![a(X, 1)]),
            ]),
            "future-read",
        ),
        (
            "garbage read",
            History::from_txns(vec![ok(0, 0, 10, vec![r(X, &[7])])]),
            "garbage-read",
        ),
        (
            "snapshot sees a later commit",
            History::from_txns(vec![ts_writer, ts_reader]),
            "snapshot-timestamp",
        ),
    ]
}

/// Write skew: both read x and y empty, each appends to a different one. SI allows it.
fn write_skew() -> History {
    History::from_txns(vec![
        ok(0, 0, 10, vec![r(X, &[]), r(Y, &[]), a(X, 1)]),
        ok(1, 0, 10, vec![r(X, &[]), r(Y, &[]), a(Y, 2)]),
        ok(2, 20, 30, vec![r(X, &[1]), r(Y, &[2])]),
    ])
}

#[test]
fn our_checker_flags_each_anomaly() {
    for (name, h, kind) in cases() {
        let found = check(&h);
        assert!(
            found.iter().any(|a| a.kind == kind),
            "{name}: expected {kind}, got {found:#?}\n{}",
            h.dump()
        );
    }
}

#[test]
fn adya_flags_each_anomaly_as_not_strong_snapshot_isolation() {
    for (name, h, _) in cases() {
        if name == "garbage read" || name == "snapshot sees a later commit" {
            // adya reports an unknown element as unknown, not as a violation; and it knows
            // nothing of dtkv's timestamps.
            continue;
        }
        let v = elle::list_append(&h, elle::PROMISED);
        assert_eq!(
            v.valid,
            adya::Valid::False,
            "{name}: adya said {}\n{}",
            v.line(),
            h.to_elle_json()
        );
    }
}

#[test]
fn write_skew_is_snapshot_isolation_but_not_serializable() {
    let h = write_skew();
    assert!(check(&h).is_empty(), "{:#?}", check(&h));
    assert_eq!(
        elle::list_append(&h, elle::PROMISED).valid,
        adya::Valid::True
    );
    let v = elle::list_append(&h, "serializable");
    assert_eq!(v.valid, adya::Valid::False, "{}", v.line());
    assert_eq!(v.anomaly_types, ["G2-item"]);
    // The register view with the commit order sees it too.
    let v = elle::register(&h, "serializable");
    assert_eq!(v.valid, adya::Valid::False, "{}", v.line());
}

#[test]
fn a_serial_history_with_every_outcome_is_valid() {
    let h = History::from_txns(vec![
        ok(0, 0, 10, vec![r(X, &[]), a(X, 1)]),
        t(1, Outcome::Fail, 11, 19, vec![a(X, 2)]),
        // Indeterminate and never seen: treated as aborted.
        t(2, Outcome::Info, 20, 25, vec![a(Y, 3)]),
        ok(0, 30, 40, vec![r(X, &[1]), a(X, 4), r(X, &[1, 4]), a(Y, 5)]),
        // Indeterminate but seen: it committed, before the next reader.
        t(1, Outcome::Info, 41, 45, vec![a(X, 6)]),
        ok(3, 50, 60, vec![r(X, &[1, 4, 6]), r(Y, &[5])]),
    ]);
    let found = check(&h);
    assert!(found.is_empty(), "{found:#?}");
    for v in elle::promised(&h) {
        assert_eq!(v.valid, adya::Valid::True, "{}", v.line());
    }
}
