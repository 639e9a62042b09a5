//! The shared front half of request parsing: split the line, upper-case the verb, and check
//! argument counts and types with one-line errors that tell a person the command's usage.

use bytes::Bytes;

use crate::response::{parse_u64, ErrorCode, ServerError};
use crate::token;

/// Keys are 1 to this many bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// A split request line: the verb in upper case and its raw arguments.
#[derive(Debug)]
pub struct Cmd {
    /// The verb, upper-cased.
    pub verb: String,
    /// The arguments after the verb, unquoted.
    pub args: Vec<Bytes>,
}

impl Cmd {
    /// `Ok(None)` for a blank line, which servers ignore.
    pub fn parse(line: &[u8]) -> Result<Option<Cmd>, ServerError> {
        let mut args = token::split(line)
            .map_err(|e| ServerError::new(ErrorCode::Syntax, e.0))?
            .into_iter();
        let Some(verb) = args.next() else {
            return Ok(None);
        };
        Ok(Some(Cmd {
            verb: String::from_utf8_lossy(&verb).to_ascii_uppercase(),
            args: args.collect(),
        }))
    }

    /// Checks the argument count; `usage` is the command's synopsis, e.g. `GET <key>`.
    pub fn arity(&self, min: usize, max: usize, usage: &str) -> Result<(), ServerError> {
        let n = self.args.len();
        if n < min || n > max {
            return Err(ServerError::new(
                ErrorCode::Syntax,
                format!("wrong number of arguments ({n}); usage: {usage}"),
            ));
        }
        Ok(())
    }

    /// Argument `i` as a key, checked for length.
    pub fn key(&self, i: usize) -> Result<Bytes, ServerError> {
        let k = self.args[i].clone();
        check_key(&k)?;
        Ok(k)
    }

    /// Argument `i` as a decimal u64; `what` names it in the error.
    pub fn u64(&self, i: usize, what: &str) -> Result<u64, ServerError> {
        parse_u64(&self.args[i])
            .map_err(|e| ServerError::new(ErrorCode::Syntax, format!("{what}: {e}")))
    }

    /// The `ERR UNKNOWN_COMMAND` reply for this verb.
    pub fn unknown(&self) -> ServerError {
        ServerError::new(
            ErrorCode::UnknownCommand,
            format!("unknown command {}", token::display(self.verb.as_bytes())),
        )
    }
}

/// Checks a key's length: 1 to [`MAX_KEY_LEN`] bytes (`ERR SYNTAX` when empty, `ERR TOO_LARGE` when
/// longer).
pub fn check_key(k: &[u8]) -> Result<(), ServerError> {
    if k.is_empty() {
        return Err(ServerError::new(
            ErrorCode::Syntax,
            "keys must not be empty",
        ));
    }
    if k.len() > MAX_KEY_LEN {
        return Err(ServerError::new(
            ErrorCode::TooLarge,
            format!(
                "key is {} bytes; keys are 1 to {MAX_KEY_LEN} bytes",
                k.len()
            ),
        ));
    }
    Ok(())
}

/// Writes a request line: the verb, then each argument bare or quoted.
pub fn encode<A: AsRef<[u8]>>(verb: &str, args: &[A]) -> Vec<u8> {
    let mut out = verb.as_bytes().to_vec();
    for a in args {
        out.push(b' ');
        token::write_arg(&mut out, a.as_ref());
    }
    out
}
