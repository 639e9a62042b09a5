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
