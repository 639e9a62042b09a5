//! Properties: quoting round-trips any byte string, and no input makes a parser panic.

use bytes::Bytes;
use proptest::prelude::*;
use protocol::{kv, log, seq, token, Response};

fn bytes_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "[ -~]{0,32}".prop_map(|s| s.into_bytes()),
        "\\PC{0,16}".prop_map(|s| s.into_bytes()),
    ]
}

fn key_strategy() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 1..32).prop_map(Bytes::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn split_join_is_identity(args in prop::collection::vec(bytes_strategy(), 0..6)) {
        let line = token::join(&args);
        prop_assert!(!line.contains(&b'\n'));
        prop_assert!(std::str::from_utf8(&line).is_ok(), "encoded line is always UTF-8");
        let back: Vec<Vec<u8>> = token::split(&line).unwrap().into_iter().map(|b| b.to_vec()).collect();
        prop_assert_eq!(back, args);
    }

    #[test]
    fn kv_put_roundtrips(key in key_strategy(), value in bytes_strategy()) {
        let req = kv::Request::Put { key, value: Bytes::from(value) };
        prop_assert_eq!(kv::Request::parse(&req.encode()).unwrap(), Some(req));
    }

    #[test]
    fn kv_scan_roundtrips(start in bytes_strategy(), end in bytes_strategy(), limit in any::<Option<u64>>()) {
        let req = kv::Request::Scan { start: start.into(), end: end.into(), limit };
        prop_assert_eq!(kv::Request::parse(&req.encode()).unwrap(), Some(req));
    }

    #[test]
    fn log_append_roundtrips(client in key_strategy(), seq in any::<u64>(), payload in bytes_strategy()) {
        let req = log::Request::Append { client, seq, payload: payload.into() };
        prop_assert_eq!(log::Request::parse(&req.encode()).unwrap(), Some(req));
    }

    #[test]
    fn replies_roundtrip(k in bytes_strategy(), v in bytes_strategy(), n in any::<u64>()) {
        for r in [
            Response::Value(v.clone().into()),
            Response::Kv(k.clone().into(), v.clone().into()),
            Response::Entry(n, v.clone().into()),
            Response::Committed(n),
            Response::Ts { first: n, count: Some(n / 2 + 1) },
            Response::Aborted(vec![Bytes::from_static(b"CONFLICT"), k.clone().into()]),
        ] {
            prop_assert_eq!(Response::parse(&r.to_line()).unwrap(), r);
        }
    }

    #[test]
    fn parsers_never_panic(line in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = kv::Request::parse(&line);
        let _ = seq::Request::parse(&line);
        let _ = log::Request::parse(&line);
        let _ = Response::parse(&line);
    }

    #[test]
    fn parsers_never_panic_on_near_misses(line in "(GET|PUT|SCAN|NEXT|READ|APPEND|ERR|TS|\") [ -~\\t]{0,40}") {
        let _ = kv::Request::parse(line.as_bytes());
        let _ = seq::Request::parse(line.as_bytes());
        let _ = log::Request::parse(line.as_bytes());
        let _ = Response::parse(line.as_bytes());
    }
}

fn record_like_line() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        Just(b"COMMIT".to_vec()),
        Just(b"EPOCH".to_vec()),
        Just(b"PUT".to_vec()),
        Just(b"DEL".to_vec()),
        Just(b"\"PUT\"".to_vec()),
        Just(b"\"P\\x55T\"".to_vec()),
        Just(b"\"1\\x32\"".to_vec()),
        "[0-9]{1,21}".prop_map(|s| s.into_bytes()),
        bytes_strategy(),
        bytes_strategy().prop_map(|b| token::join(&[b])),
    ];
    let sep = prop_oneof![
        Just(b" ".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"  ".to_vec())
    ];
    prop::collection::vec((word, sep), 0..8).prop_map(|parts| {
        let mut line = Vec::new();
        for (w, s) in parts {
            line.extend_from_slice(&w);
            line.extend_from_slice(&s);
        }
        line.retain(|&b| b != b'\n');
        line
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    /// The logserver's fast scan accepts a line only if the kvstore's parse does (and, on
    /// these lines, exactly when it does), so the log never takes what the kvstore cannot read.
    #[test]
    fn the_append_check_accepts_exactly_what_the_kvstore_parses(line in record_like_line()) {
        use protocol::kvlog::{scan_line, Record, Scan};
        let mut args = Vec::new();
        let fast = scan_line(&line, &mut args) == Scan::Record;
        let full = Record::parse_line(&line).is_ok();
        if fast {
            prop_assert!(full, "fast scan accepted what the parse refuses: {:?}", String::from_utf8_lossy(&line));
        }
        // Lines with escapes in a significant position go to the parse; otherwise they agree.
        let escaped_significant = line.windows(2).any(|w| w == b"\\x" || w == b"\\\"" || w == b"\\\\");
        if !fast && full && !escaped_significant {
            prop_assert!(false, "fast scan refused what the parse accepts: {:?}", String::from_utf8_lossy(&line));
        }
    }

    #[test]
    fn encoded_records_pass_the_fast_scan(ts in 1u64.., epoch in 1u64.., writes in prop::collection::vec((key_strategy(), prop::option::of(bytes_strategy())), 0..5)) {
        use protocol::kvlog::{scan_line, Record, Scan};
        let mut line = Vec::new();
        Record::Commit { ts, epoch, writes: writes.into_iter().map(|(k, v)| (k, v.map(Bytes::from))).collect() }.encode(&mut line);
        let mut args = Vec::new();
        prop_assert_eq!(scan_line(&line, &mut args), Scan::Record);
        prop_assert_eq!(protocol::kvlog::check_entry(&line), Ok(()));
    }
}
