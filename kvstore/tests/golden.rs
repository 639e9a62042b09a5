//! Data-driven tests of the commit path's decisions and of the in-flight registry, run without
//! processes (see the `golden` crate; `UPDATE_GOLDEN=1` rewrites the scripts).
//!
//! `scripts/decide.txt`: `decide expected=E returned=R epoch=X seen=S [fenced=F]
//! [gap=read:N|unusable|fenced:N]` prints the committer's step for an entry that came back
//! at `R`; when that step is to read a gap, `gap=` says how the read ended and the script
//! prints the newest epoch after it and the step decided then.
//!
//! `scripts/registry.txt`: one [`Registry`] per script, driven by `refill <first>`, `take`,
//! `register <ts> <key>...`, `resolve <ts>...`, `open <s>`, `close <s>`, `blocks <s> <key>`,
//! `blocks_range <s> <start> <end>`, `racing <start> <key>`, `watermark` and `counts`.

use bytes::Bytes;
use kvstore::engine::decide::{after_gap, decide, GapEnd, Returned, Step};
use kvstore::engine::{Registry, UNKNOWN_EPOCH};
use std::collections::HashMap;
use std::path::Path;

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(name)
}

fn epoch(e: u64) -> String {
    if e == UNKNOWN_EPOCH {
        "unknown".into()
    } else {
        e.to_string()
    }
}

fn show(step: Step) -> String {
    match step {
        Step::Apply => "apply".into(),
        Step::ReadGap { from, to } => format!("read gap {from}..={to}"),
        Step::Fence(by) => format!("fence by epoch {}", epoch(by)),
        Step::Skip => "skip: already applied".into(),
    }
}

fn num(args: &HashMap<&str, &str>, name: &str) -> u64 {
    let v = args.get(name).unwrap_or_else(|| panic!("missing {name}="));
    v.parse()
        .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
}

fn run_decide(input: &str) -> String {
    let mut words = input.split_whitespace();
    assert_eq!(words.next(), Some("decide"), "unknown command: {input}");
    let args: HashMap<&str, &str> = words
        .map(|w| w.split_once('=').unwrap_or_else(|| panic!("not k=v: {w}")))
        .collect();
    let mut r = Returned {
        expected: num(&args, "expected"),
        returned: num(&args, "returned"),
        epoch: num(&args, "epoch"),
        seen_epoch: num(&args, "seen"),
        fenced_by: args.contains_key("fenced").then(|| num(&args, "fenced")),
    };
    let step = decide(r);
    let mut out = show(step);
    if let (Step::ReadGap { .. }, Some(gap)) = (step, args.get("gap")) {
        let end = match gap.split_once(':') {
            Some(("read", n)) => GapEnd::Read(n.parse().expect("gap=read:N")),
            Some(("fenced", n)) => GapEnd::FencedMeanwhile(n.parse().expect("gap=fenced:N")),
            None if *gap == "unusable" => GapEnd::Unusable,
            _ => panic!("bad gap={gap}"),
        };
        let seen = after_gap(r.seen_epoch, end);
        r.expected = r.returned;
        r.seen_epoch = seen;
        r.fenced_by = None;
        out.push_str(&format!(
            "\nafter the gap: newest epoch {}\n{}",
            epoch(seen),
            show(decide(r))
        ));
    }
    out
}

#[test]
fn every_branch_of_the_commit_decision_is_scripted() {
    golden::check_script(&script("decide.txt"), run_decide);
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn run_registry(reg: &mut Registry, input: &str) -> String {
    let words: Vec<&str> = input.split_whitespace().collect();
    let n = |i: usize| -> u64 {
        words
            .get(i)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} of {input:?} is not a number"))
    };
    let key = |i: usize| -> &[u8] {
        words
            .get(i)
            .unwrap_or_else(|| panic!("argument {i} of {input:?} missing"))
            .as_bytes()
    };
    match words.first().copied() {
        Some("refill") => match reg.refill(n(1)) {
            Ok(()) => "ok".into(),
            Err(e) => format!("refused: {e}"),
        },
        Some("take") => reg
            .take()
            .map_or_else(|| "block used up".into(), |ts| ts.to_string()),
        Some("register") => {
            let keys = words[2..]
                .iter()
                .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                .collect();
            reg.register(n(1), keys);
            "ok".into()
        }
        Some("resolve") => {
            let tss: Vec<u64> = (1..words.len()).map(n).collect();
            reg.resolve(&tss);
            "ok".into()
        }
        Some("open") => {
            reg.open_snapshot(n(1));
            "ok".into()
        }
        Some("close") => {
            reg.close_snapshot(n(1));
            "ok".into()
        }
        Some("blocks") => yes(reg.blocks(n(1), key(2))),
        Some("blocks_range") => {
            let (start, end) = (key(2), key(3));
            yes(reg.blocks_any(n(1), |k| k >= start && k < end))
        }
        Some("racing") => yes(reg.racing(n(1), key(2))),
        Some("watermark") => reg.watermark().to_string(),
        Some("counts") => format!(
            "in flight {}, open snapshots {}",
            reg.inflight(),
            reg.open_snapshots()
        ),
        _ => panic!("unknown command: {input}"),
    }
}

#[test]
fn the_in_flight_registry_is_scripted() {
    let mut reg = Registry::default();
    golden::check_script(&script("registry.txt"), |input| {
        run_registry(&mut reg, input)
    });
}
