//! The users file: who may connect to the kvstore (`--users FILE`), with what password, and
//! which keys each may read and write.
//!
//! The file is text, one user per line, in DKSP tokens (bare, or `"quoted"` with the escapes of
//! [`protocol::token`], so a prefix can hold any bytes); `#` starts a comment line:
//!
//! ```text
//! # user <name> <argon2id PHC hash> [admin] [read|write|readwrite <prefix>]...
//! user app $argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA readwrite app: read config:
//! user root $argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA admin readwrite ""
//! ```
//!
//! Invariants:
//! - **A loaded file is valid as a whole or refused**: every line parses, every name is unique
//!   and well-formed, every hash is an argon2id PHC string; the error names the line and, once
//!   known, the user. A kvstore never runs on half a users file.
//! - **Grants are the only key rights.** A key may be read (written) iff some grant with read
//!   (write) access has a prefix of the key; the empty prefix covers every key. `admin` is the
//!   right to the server's own commands (`STATUS`, `HOPS`), not a key right.
//! - **A password is never stored or shown**, only its argon2id hash, and hashes are never
//!   listed ([`User`]'s `Debug` leaves them out). Checking one always runs one argon2 verify
//!   (constant-time in its comparison), also for an unknown user, against a dummy hash with
//!   the same parameters, so the time taken does not tell whether a name exists.
//! - **Writes are atomic**: a temp file (mode 0600), fsync, rename, fsync of the directory; a
//!   crash leaves the old file or the new one.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use protocol::token;

/// User names are 1 to this many bytes of `A-Z a-z 0-9 _ . @ -`.
pub const MAX_NAME_LEN: usize = 64;

/// What a grant allows on the keys under its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `GET` and `SCAN`.
    Read,
    /// `PUT` and `DEL`.
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    /// The word in the users file.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
        }
    }

    fn parse(word: &[u8]) -> Option<Access> {
        match word {
            b"read" => Some(Access::Read),
            b"write" => Some(Access::Write),
            b"readwrite" => Some(Access::ReadWrite),
            _ => None,
        }
    }

    /// Whether it allows reads.
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    /// Whether it allows writes.
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// A right on every key starting with `prefix` (`""`: every key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The key prefix.
    pub prefix: Bytes,
    /// What it allows.
    pub access: Access,
}

impl Grant {
    /// A grant of `access` on the keys under `prefix`.
    pub fn new(prefix: impl Into<Bytes>, access: Access) -> Grant {
        Grant {
            prefix: prefix.into(),
            access,
        }
    }
}

/// One user: name, password hash, grants, admin right.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    name: String,
    /// The argon2id PHC string; checked to parse when the user is made.
    hash: String,
    grants: Vec<Grant>,
    admin: bool,
}

/// Leaves the hash out: whatever prints a user (a log line, a failed assertion) never shows it.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("grants", &self.grants)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl User {
    /// A user whose password is `password`, hashed with argon2id's default parameters
    /// (19 MiB, 2 passes, 1 lane: OWASP's recommendation) and a fresh random salt.
    pub fn new(
        name: &str,
        password: &[u8],
        grants: Vec<Grant>,
        admin: bool,
    ) -> Result<User, UsersError> {
        User::with_params(name, password, grants, admin, Params::default())
    }

    /// [`User::new`] with other argon2 parameters (tests use cheap ones).
    pub fn with_params(
        name: &str,
        password: &[u8],
        grants: Vec<Grant>,
        admin: bool,
        params: Params,
    ) -> Result<User, UsersError> {
        check_name(name)?;
        if password.is_empty() {
            return Err(UsersError::EmptyPassword);
        }
        let hash = hash_password(password, params)?;
        Ok(User {
            name: name.to_string(),
            hash,
            grants,
            admin,
        })
    }

    /// A user with an existing hash (as read from a file), which must be an argon2id PHC
    /// string.
    pub fn with_hash(
        name: &str,
        hash: &str,
        grants: Vec<Grant>,
        admin: bool,
    ) -> Result<User, UsersError> {
        check_name(name)?;
        check_hash(hash).map_err(|why| UsersError::BadHash {
            user: name.to_string(),
            why,
        })?;
        Ok(User {
            name: name.to_string(),
            hash: hash.to_string(),
            grants,
            admin,
        })
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The user's grants, in file order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Whether the user may run the server's own commands (`STATUS`, `HOPS`).
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// Whether some grant lets the user read `key`.
    pub fn may_read(&self, key: &[u8]) -> bool {
        self.grants
            .iter()
            .any(|g| g.access.reads() && key.starts_with(&g.prefix))
    }

    /// Whether some grant lets the user write `key`.
    pub fn may_write(&self, key: &[u8]) -> bool {
        self.grants
            .iter()
            .any(|g| g.access.writes() && key.starts_with(&g.prefix))
    }

    /// The smallest key in `[start, end)` the user may not read, or `None` if it may read the
    /// whole range. Computed from the bounds and the grants alone (not from the keys stored),
    /// so it costs nothing per key and tells nothing about which keys exist.
    pub fn first_unreadable(&self, start: &[u8], end: &[u8]) -> Option<Bytes> {
        // The keys with prefix `p` are exactly the interval [p, prefix_end(p)).
        let readable: Vec<(&[u8], Option<Vec<u8>>)> = self
            .grants
            .iter()
            .filter(|g| g.access.reads())
            .map(|g| (&g.prefix[..], prefix_end(&g.prefix)))
            .collect();
        // Keys are never empty: the smallest key at or after "" is "\0".
        let mut cur: Vec<u8> = if start.is_empty() {
            vec![0]
        } else {
            start.to_vec()
        };
        // Each step moves `cur` to the end of the furthest interval holding it, a strictly
        // larger key, one of finitely many: the loop ends.
        loop {
            if cur.as_slice() >= end {
                return None;
            }
            // The furthest end among the intervals holding `cur`; `Some(None)`: unbounded.
            let mut furthest: Option<Option<&[u8]>> = None;
            for (lo, hi) in &readable {
                let holds =
                    *lo <= cur.as_slice() && hi.as_deref().is_none_or(|h| cur.as_slice() < h);
                if !holds {
                    continue;
                }
                furthest = match (furthest, hi.as_deref()) {
                    (_, None) | (Some(None), _) => Some(None),
                    (None, Some(h)) => Some(Some(h)),
                    (Some(Some(f)), Some(h)) => Some(Some(f.max(h))),
                };
            }
            match furthest {
                None => return Some(Bytes::from(cur)),
                Some(None) => return None,
                Some(Some(h)) => cur = h.to_vec(),
            }
        }
    }

    /// Whether `other` has the same password hash (after a reload: the same password).
    pub fn same_password(&self, other: &User) -> bool {
        self.hash == other.hash
    }

    /// Whether `password` is this user's (one argon2 verify: tens of ms with the default
    /// parameters; call it off the async runtime).
    pub fn check_password(&self, password: &[u8]) -> bool {
        verify(&self.hash, password)
    }
}

/// The first key after every key starting with `prefix`; `None` if there is none (the prefix
/// is empty or all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn check_name(name: &str) -> Result<(), UsersError> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(UsersError::BadName(token::display(name.as_bytes())))
    }
}

/// Why `hash` is not an argon2id PHC string, if it is not.
fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC hash string: {e}"))?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!("algorithm {} is not argon2id", parsed.algorithm));
    }
    Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    if parsed.hash.is_none() {
        return Err("no hash output".to_string());
    }
    Ok(())
}

fn hash_password(password: &[u8], params: Params) -> Result<String, UsersError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Hashing(e.to_string()))
}

/// One argon2 verify of `password` against the PHC string `hash`, with the hash's own
/// parameters. A hash that does not parse verifies nothing (files are checked on load).
fn verify(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default().verify_password(password, &h).is_ok(),
        Err(_) => false,
    }
}

/// The users of one users file.
#[derive(Debug, Default)]
pub struct Users {
    users: BTreeMap<String, Arc<User>>,
    /// Verified against for an unknown name, made with the first user's parameters on first
    /// need (see [`Users::prepare`]).
    dummy: OnceLock<String>,
}

impl Users {
    /// No users.
    pub fn new() -> Users {
        Users::default()
    }

    /// Reads and validates the users file at `path`.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read(path).map_err(|source| UsersError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Users::parse(&text, &path.display().to_string())
    }

    /// Parses a users file's contents; `origin` names it in errors.
    pub fn parse(text: &[u8], origin: &str) -> Result<Users, UsersError> {
        let mut users = Users::new();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let bad = |user: Option<&str>, what: String| UsersError::Line {
                origin: origin.to_string(),
                line: i + 1,
                user: user.map(str::to_string),
                what,
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let trimmed = line.trim_ascii_start();
            if trimmed.is_empty() || trimmed.starts_with(b"#") {
                continue;
            }
            let words = token::split(line).map_err(|e| bad(None, e.0))?;
            let user = parse_user(&words).map_err(|(name, what)| bad(name.as_deref(), what))?;
            let name = user.name.clone();
            if users.users.insert(name.clone(), Arc::new(user)).is_some() {
                return Err(bad(Some(&name), "the user is defined twice".to_string()));
            }
        }
        Ok(users)
    }

    /// The file's text: a header comment, then one line per user, by name.
    pub fn to_text(&self) -> Vec<u8> {
        let mut out =
            b"# dtkv users file (see docs/operations.md); edit with dtkv-admin user add|del.\n\
            # user <name> <argon2id hash> [admin] [read|write|readwrite <prefix>]...\n"
                .to_vec();
        for u in self.users.values() {
            let mut words: Vec<&[u8]> = vec![b"user", u.name.as_bytes(), u.hash.as_bytes()];
            if u.admin {
                words.push(b"admin");
            }
            for g in &u.grants {
                words.push(g.access.as_str().as_bytes());
                words.push(&g.prefix);
            }
            out.extend_from_slice(&token::join(&words));
            out.push(b'\n');
        }
        out
    }

    /// Writes the file atomically (see the module header), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), UsersError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| UsersError::Io { path: p, source }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| UsersError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            })?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(&self.to_text()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        protocol::record::sync_dir(&dir).map_err(|e| UsersError::Io {
            path: dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The users, by name.
    pub fn iter(&self) -> impl Iterator<Item = &User> {
        self.users.values().map(|u| &**u)
    }

    /// The user named `name`.
    pub fn get(&self, name: &str) -> Option<&User> {
        self.users.get(name).map(|u| &**u)
    }

    /// The user named `name`, shared.
    pub fn get_arc(&self, name: &str) -> Option<Arc<User>> {
        self.users.get(name).cloned()
    }

    /// Adds `user`; one of that name already there is an error unless `replace`.
    pub fn add(&mut self, user: User, replace: bool) -> Result<(), UsersError> {
        if !replace && self.users.contains_key(&user.name) {
            return Err(UsersError::Exists(user.name));
        }
        self.users.insert(user.name.clone(), Arc::new(user));
        Ok(())
    }

    /// Removes the user named `name`; an error if there is none.
    pub fn remove(&mut self, name: &str) -> Result<(), UsersError> {
        self.users
            .remove(name)
            .map(drop)
            .ok_or_else(|| UsersError::NotFound(token::display(name.as_bytes())))
    }

    /// Makes the dummy hash now (one argon2 hash), so the first `AUTH` of an unknown name
    /// takes no longer than any other.
    pub fn prepare(&self) {
        self.dummy();
    }

    fn dummy(&self) -> &str {
        self.dummy.get_or_init(|| {
            // The first user's parameters, so an unknown name costs what a known one does.
            let params = self
                .users
                .values()
                .next()
                .and_then(|u| {
                    let h = PasswordHash::new(&u.hash).ok()?;
                    Params::try_from(&h).ok()
                })
                .unwrap_or_default();
            let mut random = [0u8; 16];
            argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut random);
            hash_password(&random, params).unwrap_or_default()
        })
    }

    /// The user `name` if `password` is theirs. Always one argon2 verify, also for an unknown
    /// name (against the dummy hash), so the answer takes the same time either way. CPU-heavy:
    /// call it off the async runtime.
    pub fn check_password(&self, name: &[u8], password: &[u8]) -> Option<Arc<User>> {
        let user = std::str::from_utf8(name)
            .ok()
            .and_then(|n| self.users.get(n));
        match user {
            Some(u) => u.check_password(password).then(|| u.clone()),
            None => {
                let _ = verify(self.dummy(), password);
                None
            }
        }
    }
}

/// A user from a line's words, or the user's name (once known) and what is wrong.
fn parse_user(words: &[Bytes]) -> Result<User, (Option<String>, String)> {
    let mut it = words.iter();
    match it.next() {
        Some(w) if &w[..] == b"user" => {}
        Some(w) => {
            return Err((
                None,
                format!(
                    "expected `user <name> <hash> ...`, found {}",
                    token::display(w)
                ),
            ))
        }
        None => return Err((None, "empty line".to_string())),
    }
    let name = it.next().ok_or((None, "no user name".to_string()))?;
    let name = std::str::from_utf8(name)
        .ok()
        .filter(|n| check_name(n).is_ok())
        .ok_or_else(|| (None, UsersError::BadName(token::display(name)).to_string()))?
        .to_string();
    let fail = |what: String| (Some(name.clone()), what);
    let hash = it
        .next()
        .ok_or_else(|| fail("no password hash".to_string()))?;
    let hash = std::str::from_utf8(hash).map_err(|_| fail("the hash is not text".to_string()))?;
    check_hash(hash).map_err(|why| fail(format!("bad password hash: {why}")))?;
    let mut grants = Vec::new();
    let mut admin = false;
    while let Some(word) = it.next() {
        if &word[..] == b"admin" {
            admin = true;
            continue;
        }
        let Some(access) = Access::parse(word) else {
            return Err(fail(format!(
                "unknown word {}: expected admin, read, write or readwrite",
                token::display(word)
            )));
        };
        let prefix = it.next().ok_or_else(|| {
            fail(format!(
                "{} needs a key prefix (\"\" for every key)",
                access.as_str()
            ))
        })?;
        grants.push(Grant::new(prefix.clone(), access));
    }
    Ok(User {
        name,
        hash: hash.to_string(),
        grants,
        admin,
    })
}

/// What is wrong with a users file or a change to it.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (or its temp file, or directory).
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line of the file is wrong.
    #[error("{origin} line {line}{}: {what}", user.as_ref().map(|u| format!(" (user {u})")).unwrap_or_default())]
    Line {
        /// The file.
        origin: String,
        /// The line number, from 1.
        line: usize,
        /// The user the line defines, once known.
        user: Option<String>,
        /// What is wrong.
        what: String,
    },
    /// A user name that is not 1 to 64 of `A-Z a-z 0-9 _ . @ -`.
    #[error("bad user name {0}: 1 to 64 of A-Z a-z 0-9 _ . @ -")]
    BadName(String),
    /// A hash that is not an argon2id PHC string.
    #[error("user {user}: bad password hash: {why}")]
    BadHash {
        /// The user.
        user: String,
        /// What is wrong with it.
        why: String,
    },
    /// An empty password.
    #[error("the password is empty")]
    EmptyPassword,
    /// Hashing failed (argon2 parameters out of range).
    #[error("hashing the password: {0}")]
    Hashing(String),
    /// `add` of a user already there.
    #[error("user {0} exists (--replace to change it)")]
    Exists(String),
    /// `remove` of a user not there.
    #[error("no user {0}")]
    NotFound(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap argon2 parameters: the tests check logic, not the cost.
    fn cheap() -> Params {
        Params::new(8, 1, 1, None).expect("valid params")
    }

    fn user(grants: &[(&'static [u8], Access)], admin: bool) -> User {
        let grants = grants
            .iter()
            .map(|&(p, a)| Grant::new(Bytes::from_static(p), a))
            .collect();
        User::with_params("u", b"pw", grants, admin, cheap()).expect("user")
    }

    #[test]
    fn a_key_is_readable_or_writable_only_under_a_grant_of_that_kind() {
        let u = user(
            &[
                (&b"app:"[..], Access::ReadWrite),
                (&b"conf:"[..], Access::Read),
                (&b"log:"[..], Access::Write),
            ],
            false,
        );
        assert!(u.may_read(b"app:1") && u.may_write(b"app:1"));
        assert!(
            u.may_read(b"app:") && u.may_write(b"app:"),
            "the prefix itself"
        );
        assert!(u.may_read(b"conf:x") && !u.may_write(b"conf:x"));
        assert!(!u.may_read(b"log:x") && u.may_write(b"log:x"));
        assert!(!u.may_read(b"ap") && !u.may_write(b"other"));
        assert!(!u.is_admin());
        let all = user(&[(&b""[..], Access::Read)], true);
        assert!(all.may_read(b"anything") && all.may_read(b"\xff"));
        assert!(!all.may_write(b"anything"), "admin is no key right");
        assert!(all.is_admin());
        assert!(!user(&[], false).may_read(b"k"), "no grants, no keys");
    }

    #[test]
    fn a_range_is_readable_only_if_every_key_in_it_is() {
        let u = user(
            &[
                (&b"a"[..], Access::Read),
                (&b"b"[..], Access::ReadWrite),
                (&b"d"[..], Access::Read),
                (&b"e"[..], Access::Write),
            ],
            false,
        );
        let first = |s: &str, e: &str| u.first_unreadable(s.as_bytes(), e.as_bytes());
        assert_eq!(first("a", "b"), None);
        assert_eq!(first("a", "c"), None, "two adjacent prefixes: a.. and b..");
        assert_eq!(first("a1", "a2"), None);
        assert_eq!(
            first("a", "c\x00"),
            Some(Bytes::from("c")),
            "c itself is not readable"
        );
        assert_eq!(first("a", "z"), Some(Bytes::from("c")));
        assert_eq!(
            first("d", "f"),
            Some(Bytes::from("e")),
            "e is only writable"
        );
        assert_eq!(first("", "b"), Some(Bytes::from("\x00")), "keys before a");
        assert_eq!(first("x", "x"), None, "an empty range reads nothing");
        assert_eq!(first("z", "a"), None, "a reversed range reads nothing");
        let all = user(&[(&b""[..], Access::Read)], false);
        assert_eq!(all.first_unreadable(b"", b"\xff\xff\xff"), None);
        let ff = user(&[(&b"a\xff"[..], Access::Read)], false);
        assert_eq!(
            ff.first_unreadable(b"a\xff", b"b"),
            None,
            "a\\xff.. ends at b"
        );
        assert_eq!(
            ff.first_unreadable(b"a\xfe", b"b"),
            Some(Bytes::from_static(b"a\xfe"))
        );
        let top = user(&[(&b"\xff"[..], Access::Read)], false);
        assert_eq!(top.first_unreadable(b"\xff", b"\xff\xff\xff\xff"), None);
        // Nested and overlapping prefixes: the furthest end wins.
        let nested = user(
            &[(&b"k"[..], Access::Read), (&b"k1"[..], Access::Read)],
            false,
        );
        assert_eq!(nested.first_unreadable(b"k1", b"l"), None);
    }

    /// The range rule against the per-key rule on every short key over a small alphabet.
    #[test]
    fn the_range_rule_agrees_with_checking_each_key() {
        let alphabet = [0u8, 1, 0xfe, 0xff];
        let mut keys: Vec<Vec<u8>> = vec![vec![]];
        for _ in 0..3 {
            let longer: Vec<Vec<u8>> = keys
                .iter()
                .flat_map(|k| {
                    alphabet.iter().map(move |&b| {
                        let mut k = k.clone();
                        k.push(b);
                        k
                    })
                })
                .collect();
            keys.extend(longer);
        }
        keys.sort();
        keys.dedup();
        let nonempty: Vec<&Vec<u8>> = keys.iter().filter(|k| !k.is_empty()).collect();
        let grant_sets: [&[&[u8]]; 5] = [
            &[b"\x01"],
            &[b"\x00", b"\x01"],
            &[b"\xff"],
            &[b"\x00\xff", b"\x01\x00"],
            &[b"\xfe\xff\xff"],
        ];
        for grants in grant_sets {
            let u = User::with_params(
                "u",
                b"pw",
                grants
                    .iter()
                    .map(|p| Grant::new(Bytes::copy_from_slice(p), Access::Read))
                    .collect(),
                false,
                cheap(),
            )
            .expect("user");
            for s in keys.iter().step_by(3) {
                for e in keys.iter().step_by(5) {
                    // Over keys this short, a gap beyond them may hide, so compare only when
                    // the rule says the range is readable or names a key of the alphabet.
                    let want = nonempty
                        .iter()
                        .find(|k| {
                            k.as_slice() >= s.as_slice()
                                && k.as_slice() < e.as_slice()
                                && !u.may_read(k)
                        })
                        .map(|k| Bytes::copy_from_slice(k));
                    let got = u.first_unreadable(s, e);
                    if let Some(g) = &got {
                        assert!(
                            !u.may_read(g),
                            "{grants:?} [{s:?},{e:?}) names readable {g:?}"
                        );
                        assert!(g.as_ref() >= s.as_slice() && g.as_ref() < e.as_slice());
                    }
                    if got.is_none() {
                        assert_eq!(
                            want, None,
                            "{grants:?} [{s:?},{e:?}) passed but has {want:?}"
                        );
                    } else if let Some(w) = &want {
                        assert!(
                            got.as_ref().is_some_and(|g| g <= w),
                            "{grants:?} [{s:?},{e:?}): {got:?} after {w:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_password_checks_only_against_its_own_user() {
        let mut users = Users::new();
        for (name, pw) in [("alice", "a-pass"), ("bob", "b-pass")] {
            let u = User::with_params(name, pw.as_bytes(), vec![], false, cheap()).expect("user");
            users.add(u, false).expect("new user");
        }
        let ok = users.check_password(b"alice", b"a-pass").expect("alice");
        assert_eq!(ok.name(), "alice");
        assert!(users.check_password(b"alice", b"b-pass").is_none());
        assert!(
            users.check_password(b"carol", b"a-pass").is_none(),
            "unknown"
        );
        assert!(
            users.check_password(b"\xff", b"a-pass").is_none(),
            "not UTF-8"
        );
        assert!(users.check_password(b"alice", b"").is_none());
        assert!(
            users.dummy.get().is_some_and(|d| d.contains("m=8,t=1,p=1")),
            "the dummy hash has the users' parameters: {:?}",
            users.dummy.get()
        );
    }

    #[test]
    fn a_users_file_round_trips_through_its_text() {
        let mut users = Users::new();
        let grants = vec![
            Grant::new("app:", Access::ReadWrite),
            Grant::new("", Access::Read),
            Grant::new(Bytes::from_static(b"bin \"\x00\xff\n"), Access::Write),
        ];
        users
            .add(
                User::with_params("app", b"pw", grants, false, cheap()).expect("user"),
                false,
            )
            .expect("new");
        users
            .add(
                User::with_params("root", b"pw2", vec![], true, cheap()).expect("user"),
                false,
            )
            .expect("new");
        let text = users.to_text();
        let again = Users::parse(&text, "test").expect("parses");
        assert_eq!(
            again.iter().collect::<Vec<_>>(),
            users.iter().collect::<Vec<_>>()
        );
        assert!(again.check_password(b"root", b"pw2").is_some());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users");
        users.save(&path).expect("saved");
        let loaded = Users::load(&path).expect("loaded");
        assert_eq!(loaded.len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "owner only");
        }
        assert!(
            !format!("{:?}", loaded.get("app")).contains("argon2"),
            "no hash in Debug"
        );
    }

    #[test]
    fn a_bad_users_file_is_refused_naming_the_line_and_user() {
        let hash = User::with_params("x", b"pw", vec![], false, cheap())
            .expect("user")
            .hash;
        let cases = [
            (
                format!("# c\n\nuser a {hash}\nuser a {hash}\n"),
                "line 4 (user a): the user is defined twice",
            ),
            (
                format!("user b {hash} read\n"),
                "line 1 (user b): read needs a key prefix",
            ),
            (
                format!("user b {hash} delete x\n"),
                "line 1 (user b): unknown word delete",
            ),
            (
                "user c notahash\n".to_string(),
                "line 1 (user c): bad password hash: not a PHC",
            ),
            (
                "user c $argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\n".to_string(),
                "line 1 (user c): bad password hash: algorithm argon2i is not argon2id",
            ),
            ("user\n".to_string(), "line 1: no user name"),
            (
                format!("user \"a b\" {hash}\n"),
                "line 1: bad user name \"a b\"",
            ),
            (
                format!("grant a {hash}\n"),
                "line 1: expected `user <name> <hash> ...`, found grant",
            ),
            ("user \"open\n".to_string(), "line 1: "),
            ("user d\n".to_string(), "line 1 (user d): no password hash"),
        ];
        for (text, want) in cases {
            let e = Users::parse(text.as_bytes(), "users.txt").expect_err(&text);
            let msg = e.to_string();
            assert!(msg.starts_with("users.txt "), "{msg}");
            assert!(msg.contains(want), "{text:?}: {msg}");
        }
        assert!(matches!(
            Users::load(Path::new("/nonexistent/users")),
            Err(UsersError::Io { .. })
        ));
    }

    #[test]
    fn add_refuses_a_duplicate_unless_replacing_and_remove_needs_the_user() {
        let mut users = Users::new();
        let u = || User::with_params("a", b"pw", vec![], false, cheap()).expect("user");
        users.add(u(), false).expect("new");
        assert!(matches!(users.add(u(), false), Err(UsersError::Exists(_))));
        users.add(u(), true).expect("replaced");
        users.remove("a").expect("removed");
        assert!(matches!(users.remove("a"), Err(UsersError::NotFound(_))));
        assert!(matches!(
            User::with_params("a", b"", vec![], false, cheap()),
            Err(UsersError::EmptyPassword)
        ));
        for bad in ["", "a b", "é", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(
                matches!(
                    User::new(bad, b"pw", vec![], false),
                    Err(UsersError::BadName(_))
                ),
                "{bad}"
            );
        }
    }
}
