//! Data-driven parser tests: `tests/scripts/*.txt` hold request and reply lines with the parse
//! result each gives (see the `golden` crate). Inputs start with the parser to use: `kv`, `seq`,
//! `log` for requests of that process, `reply` for a server's reply line.

use protocol::{kv, log, seq, Response};
use std::fmt::Debug;

fn show<R: Debug>(
    parsed: Result<Option<R>, protocol::ServerError>,
    encode: impl Fn(&R) -> Vec<u8>,
) -> String {
    match parsed {
        Ok(None) => "(blank: ignored)".to_string(),
        Ok(Some(r)) => format!("{r:?}\n=> {}", String::from_utf8_lossy(&encode(&r))),
        Err(e) => format!("ERR {} {}", e.code, e.message),
    }
}

fn run(input: &str) -> String {
    let (parser, line) = input.split_once(' ').unwrap_or((input, ""));
    // Scripts write control bytes as ^X so they stay readable text.
    let line = unescape_carets(line);
    match parser {
        "kv" => show(kv::Request::parse(&line), kv::Request::encode),
        "seq" => show(seq::Request::parse(&line), seq::Request::encode),
        "log" => show(log::Request::parse(&line), log::Request::encode),
        "reply" => match Response::parse(&line) {
            Ok(r) => format!("{r:?}\n=> {}", String::from_utf8_lossy(&r.to_line())),
            Err(e) => format!("unparseable: {e}"),
        },
        other => panic!("unknown parser {other}"),
    }
}

fn unescape_carets(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = s.bytes().peekable();
    while let Some(b) = chars.next() {
        if b == b'^' {
            if let Some(&c) = chars.peek() {
                if c.is_ascii_uppercase() {
                    chars.next();
                    out.push(c - b'@');
                    continue;
                }
            }
        }
        out.push(b);
    }
    out
}

#[test]
fn scripts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("scripts dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "txt") {
            golden::check_script(&path, run);
            n += 1;
        }
    }
    assert!(n > 0, "no scripts found in {}", dir.display());
}

#[test]
fn key_length_limit() {
    let ok = format!("GET {}", "k".repeat(protocol::cmd::MAX_KEY_LEN));
    assert!(matches!(kv::Request::parse(ok.as_bytes()), Ok(Some(_))));
    let long = format!("PUT {} v", "k".repeat(protocol::cmd::MAX_KEY_LEN + 1));
    let err = kv::Request::parse(long.as_bytes()).unwrap_err();
    assert_eq!(err.code, protocol::ErrorCode::TooLarge);
}
