//! Splitting a DKSP line into arguments, and writing arguments back.
//!
//! An argument is either a *bare token* (no whitespace, no `"`, no control bytes, valid UTF-8) or a
//! *quoted string* `"..."` with the escapes `\\ \" \n \r \t \xHH`. Quoting lets any byte string
//! cross the wire while `PUT user:1 "John Doe"` stays typeable in `nc`.
//!
//! The parser is liberal (raw non-UTF-8 bytes are accepted inside quotes and in bare tokens) and the
//! writer is strict (it always produces valid UTF-8, escaping what is not), so that
//! `split(join(args)) == args` for every byte string, which a property test checks.

use bytes::Bytes;

/// Why a line could not be split into arguments. The message is one human-readable line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Bytes that may never appear raw in a bare token.
fn is_bare_forbidden(b: u8) -> bool {
    b <= 0x20 || b == 0x7f || b == b'"'
}

/// Splits one line (without its terminator) into arguments. Runs of spaces and tabs separate
/// arguments; leading and trailing whitespace is ignored.
pub fn split(line: &[u8]) -> Result<Vec<Bytes>, TokenError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        if is_space(line[i]) {
            i += 1;
            continue;
        }
        let start = i;
        if line[i] == b'"' {
            let (arg, next) = parse_quoted(line, i)?;
            if next < line.len() && !is_space(line[next]) {
                return Err(TokenError(format!(
                    "closing quote of argument at column {} must be followed by a space",
                    start + 1
                )));
            }
            args.push(Bytes::from(arg));
            i = next;
        } else {
            while i < line.len() && !is_space(line[i]) {
                let b = line[i];
                if b == b'"' {
                    return Err(TokenError(format!(
                        "unexpected '\"' inside a bare argument at column {}; quote the whole argument",
                        i + 1
                    )));
                }
                if b < 0x20 || b == 0x7f {
                    return Err(TokenError(format!(
                        "control byte 0x{b:02x} at column {}; use a quoted string with \\xHH",
                        i + 1
                    )));
                }
                i += 1;
            }
            args.push(Bytes::copy_from_slice(&line[start..i]));
        }
    }
    Ok(args)
}

/// Parses a quoted string starting at `line[start] == b'"'`; returns the bytes and the index just
/// past the closing quote.
fn parse_quoted(line: &[u8], start: usize) -> Result<(Vec<u8>, usize), TokenError> {
    let mut out = Vec::with_capacity(64);
    let mut i = start + 1;
    while i < line.len() {
        match line[i] {
            b'"' => return Ok((out, i + 1)),
            b'\\' => {
                let esc = *line
                    .get(i + 1)
                    .ok_or_else(|| TokenError(format!("unfinished escape at column {}", i + 1)))?;
                match esc {
                    b'\\' => out.push(b'\\'),
                    b'"' => out.push(b'"'),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'x' => {
                        let hex = line.get(i + 2..i + 4).ok_or_else(|| {
                            TokenError(format!("\\x needs two hex digits at column {}", i + 1))
                        })?;
                        let hi = hex_val(hex[0]);
                        let lo = hex_val(hex[1]);
                        match (hi, lo) {
                            (Some(h), Some(l)) => out.push(h << 4 | l),
                            _ => {
                                return Err(TokenError(format!(
                                    "\\x needs two hex digits at column {}",
                                    i + 1
                                )))
                            }
                        }
                        i += 2;
                    }
                    other => {
                        return Err(TokenError(format!(
                        "unknown escape '\\{}' at column {}; valid: \\\\ \\\" \\n \\r \\t \\xHH",
                        char::from(other).escape_default(),
                        i + 1
                    )))
                    }
                }
                i += 2;
            }
            _ => {
                // Copy the run up to the next quote or escape in one go.
                let run = line[i..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\')
                    .unwrap_or(line.len() - i);
                out.extend_from_slice(&line[i..i + run]);
                i += run;
            }
        }
    }
    Err(TokenError(format!(
        "unterminated quoted string starting at column {}",
        start + 1
    )))
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True if `arg` can be written without quotes.
pub fn is_bare(arg: &[u8]) -> bool {
    !arg.is_empty()
        && !arg.iter().any(|&b| is_bare_forbidden(b))
        && std::str::from_utf8(arg).is_ok()
}

/// Appends `arg` to `out`, bare when it can be and quoted otherwise.
pub fn write_arg(out: &mut Vec<u8>, arg: &[u8]) {
    if is_bare(arg) {
        out.extend_from_slice(arg);
        return;
    }
    out.reserve(arg.len() + 2);
    out.push(b'"');
    for chunk in arg.utf8_chunks() {
        // Valid UTF-8 goes out as it is, except the few ASCII bytes that need an escape; runs
        // between those are copied whole.
        let valid = chunk.valid().as_bytes();
        let mut from = 0;
        for (i, &b) in valid.iter().enumerate() {
            let esc: &[u8] = match b {
                b'\\' => b"\\\\",
                b'"' => b"\\\"",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                b if b < 0x20 || b == 0x7f => b"",
                _ => continue,
            };
            out.extend_from_slice(&valid[from..i]);
            if esc.is_empty() {
                push_hex_escape(out, b);
            } else {
                out.extend_from_slice(esc);
            }
            from = i + 1;
        }
        out.extend_from_slice(&valid[from..]);
        for &b in chunk.invalid() {
            push_hex_escape(out, b);
        }
    }
    out.push(b'"');
}

/// The length of what [`write_arg`] writes for `arg`, without writing it.
pub fn encoded_len(arg: &[u8]) -> usize {
    if is_bare(arg) {
        arg.len()
    } else {
        quoted_body_len(arg) + 2
    }
}

/// The length of `arg` quoted, without the two quote marks. For pieces that are each valid
/// UTF-8 it adds up: the body of their concatenation is the sum of their bodies (the kvstore
/// sizes a log entry's `APPEND` line from its records this way, before building it).
pub fn quoted_body_len(arg: &[u8]) -> usize {
    let mut n = 0;
    for chunk in arg.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            n += match b {
                b'\\' | b'"' | b'\n' | b'\r' | b'\t' => 2,
                b if b < 0x20 || b == 0x7f => 4,
                _ => 1,
            };
        }
        n += 4 * chunk.invalid().len();
    }
    n
}

fn push_hex_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 15)],
    ]);
}

/// Writes arguments separated by single spaces.
pub fn join<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        write_arg(&mut out, a.as_ref());
    }
    out
}

/// Bytes of an argument that [`display`] shows; the rest is summarised by its length.
const DISPLAY_MAX: usize = 64;

/// Renders bytes for a human message (error texts, logs): the quoted form when not bare, cut
/// to its first `DISPLAY_MAX` bytes, so an error echoing a client's token stays one short
/// line however long (and, quoted, up to 4x longer) the token was.
pub fn display(arg: &[u8]) -> String {
    let mut out = Vec::new();
    write_arg(&mut out, &arg[..arg.len().min(DISPLAY_MAX)]);
    let mut s = String::from_utf8_lossy(&out).into_owned();
    if arg.len() > DISPLAY_MAX {
        s.push_str(&format!("... ({} bytes)", arg.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(line: &str) -> Vec<Vec<u8>> {
        split(line.as_bytes())
            .unwrap()
            .into_iter()
            .map(|b| b.to_vec())
            .collect()
    }

    #[test]
    fn display_cuts_a_long_argument_to_a_short_line() {
        assert_eq!(display(b"FOO"), "FOO");
        assert_eq!(display(b"a b"), "\"a b\"");
        let long = display(&[0xff; 1 << 20]);
        assert!(long.len() < 400, "{} bytes", long.len());
        assert!(long.ends_with("... (1048576 bytes)"), "{long}");
    }

    #[test]
    fn splits_bare_and_quoted() {
        assert_eq!(
            s("PUT user:1 \"John Doe\""),
            vec![b"PUT".to_vec(), b"user:1".to_vec(), b"John Doe".to_vec()]
        );
        assert_eq!(s("  a\t b  "), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(s("\"\""), vec![Vec::<u8>::new()]);
        assert_eq!(s("\"\\x00\\xff\\n\""), vec![vec![0u8, 0xff, b'\n']]);
        assert!(s("").is_empty());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "\"abc",
            "a\"b",
            "\"a\"b",
            "\"\\q\"",
            "\"\\x4\"",
            "\"\\xzz\"",
            "\"\\",
        ] {
            assert!(split(bad.as_bytes()).is_err(), "{bad:?} should not parse");
        }
        assert!(split(b"a\x01b").is_err());
    }

    #[test]
    fn encoded_len_is_what_write_arg_writes() {
        let cases: [&[u8]; 10] = [
            b"abc",
            b"a b",
            b"",
            "h\u{e9}llo \u{85}".as_bytes(),
            &[0xff, b'"', b'\\', 0x01, 0x7f, b'\n', b'\r', b'\t'],
            &[0xe2, 0x82],
            &[b'a', 0xe2, 0x82, 0xac, 0xe2, b'b'],
            b"back\\slash",
            b"COMMIT 1 2 PUT k \"v w\"",
            &[0u8; 7],
        ];
        for arg in cases {
            let mut out = Vec::new();
            write_arg(&mut out, arg);
            assert_eq!(encoded_len(arg), out.len(), "{arg:?}");
        }
    }

    #[test]
    fn writes_bare_when_possible() {
        assert_eq!(join(&[b"abc".as_slice()]), b"abc");
        assert_eq!(join(&[b"a b".as_slice()]), b"\"a b\"");
        assert_eq!(join(&[b"".as_slice()]), b"\"\"");
        assert_eq!(join(&["héllo".as_bytes()]), "héllo".as_bytes());
        assert_eq!(join(&[[0xffu8, b'"'].as_slice()]), b"\"\\xff\\\"\"");
    }
}
