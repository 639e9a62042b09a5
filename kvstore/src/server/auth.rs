//! Who may use a client connection: protected mode, `AUTH`, and the per-request permission
//! checks of the authenticated user.
//!
//! Invariants:
//! - **With no users configured, only loopback clients are served** (protected mode), unless
//!   `--no-protected-mode`: [`admits`] decides, from the peer address alone, before the
//!   connection gets a session.
//! - **With users configured, nothing but `AUTH`, `PING` and `QUIT` runs before a successful
//!   `AUTH`** ([`Gate::refuse`] answers `ERR NOAUTH`); after it, every key a command touches is
//!   checked against the user's grants, and `STATUS`/`HOPS` need the admin right.
//! - **Password checks never run on the runtime thread**: each is one argon2 verify on a
//!   blocking thread, at most [`AuthConfig::verifies`] at once server-wide, so a flood of
//!   `AUTH`s delays other `AUTH`s, not commits.
//! - **A reload (SIGHUP) reaches every connection at its next command**: the users carry a
//!   generation; a session whose user is gone or has a new password hash is back to
//!   unauthenticated, and one whose grants changed gets the new ones. (A transaction's
//!   buffered writes were checked when they arrived.)
//! - **Guessing is slow and bounded per connection**: a failed `AUTH` is answered only after
//!   `--auth-fail-delay-ms`, is logged (user name and peer, never the password), and the
//!   `--max-auth-failures`th failure on a connection closes it. Failures are never forgiven
//!   on a connection (a success does not reset the count), so one valid account cannot be used
//!   to keep guessing another's password.

use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;

use protocol::kv::Request;
use protocol::{token, ErrorCode, Response};

use crate::users::{User, Users};

/// The answer to a client that protected mode refuses.
pub const PROTECTED_MESSAGE: &str = "protected mode: no users are configured, so only loopback \
     clients are served; configure users with --users, or start the kvstore with \
     --no-protected-mode on a trusted network (see docs/operations.md)";

/// The answer to a failed `AUTH`, the same for an unknown user and a wrong password.
pub const WRONGPASS_MESSAGE: &str = "invalid username or password";

/// Whether a client at `peer` is served: always when users are configured (it must `AUTH`)
/// or protected mode is off, else only from a loopback address (127.0.0.0/8, ::1, or an
/// IPv4-mapped loopback address).
pub fn admits(peer: SocketAddr, users_configured: bool, protected: bool) -> bool {
    users_configured || !protected || is_loopback(peer.ip())
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The users and the `AUTH` limits (`--users`, `--max-auth-failures`, `--auth-fail-delay-ms`).
#[derive(Debug)]
pub struct AuthConfig {
    /// The users file's users, replaced whole by a reload.
    users: RwLock<Arc<Users>>,
    /// Bumped by every reload, so sessions notice cheaply.
    generation: AtomicU64,
    /// After this many failed `AUTH`s a connection is closed.
    pub max_failures: u32,
    /// How long a failed `AUTH` waits before it is answered.
    pub fail_delay: Duration,
    /// Password checks running at once, server-wide.
    pub verifies: Arc<Semaphore>,
}

impl AuthConfig {
    /// A configuration allowing `verifies` password checks at once.
    pub fn new(
        users: Arc<Users>,
        max_failures: u32,
        fail_delay: Duration,
        verifies: usize,
    ) -> AuthConfig {
        AuthConfig {
            users: RwLock::new(users),
            generation: AtomicU64::new(0),
            max_failures: max_failures.max(1),
            fail_delay,
            verifies: Arc::new(Semaphore::new(verifies.max(1))),
        }
    }

    /// The users now.
    pub fn users(&self) -> Arc<Users> {
        self.users.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the users (a reload of the file); every session re-checks its user at its
    /// next command.
    pub fn replace_users(&self, users: Arc<Users>) {
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = users;
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Password checks at once by default: half the cores, at least 1 and at most 2, so
    /// `AUTH`s can never take every core from the commit path.
    pub fn default_verifies() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / 2).clamp(1, 2)
    }
}

/// Who may use a client connection: the users (if any) and protected mode.
#[derive(Debug, Default)]
pub struct ClientAuth {
    /// `None`: no users are configured, no `AUTH` is needed.
    pub users: Option<AuthConfig>,
    /// With no users: serve only loopback clients.
    pub protected: bool,
}

impl ClientAuth {
    /// Whether a client at `peer` gets a session (see [`admits`]).
    pub fn admits(&self, peer: SocketAddr) -> bool {
        admits(peer, self.users.is_some(), self.protected)
    }
}

/// One connection's authentication state.
pub(super) struct Gate {
    pub(super) auth: Arc<ClientAuth>,
    /// Who the connection is, once an `AUTH` succeeded.
    pub(super) user: Option<Arc<User>>,
    /// The users' generation `user` was taken from.
    generation: u64,
    /// Failed `AUTH`s on this connection.
    pub(super) failures: u32,
    /// The client's address, for the log.
    pub(super) peer: Option<SocketAddr>,
}

/// What a failed `AUTH` leads to.
pub(super) enum AuthOutcome {
    /// The connection goes on.
    Answer(Response),
    /// The connection is closed after this answer.
    Close(Response),
}

/// `ERR DENIED <thing> <why>`: the thing (a key, token-encoded, or a command) comes first.
pub(super) fn denied(thing: &[u8], why: &str) -> Response {
    let thing = String::from_utf8_lossy(&token::join(&[thing])).into_owned();
    Response::err(ErrorCode::Denied, format!("{thing} {why}"))
}

impl Gate {
    pub(super) fn new(auth: Arc<ClientAuth>, peer: Option<SocketAddr>) -> Gate {
        Gate {
            auth,
            user: None,
            generation: 0,
            failures: 0,
            peer,
        }
    }

    /// After a reload: the session's user as the new users have it, or no user (it must
    /// `AUTH` again) if it is gone or its password changed. True if it lost its user.
    pub(super) fn refresh(&mut self) -> bool {
        let (Some(config), Some(user)) = (&self.auth.users, &self.user) else {
            return false;
        };
        let now = config.generation();
        if now == self.generation {
            return false;
        }
        self.generation = now;
        match config.users().get_arc(user.name()) {
            Some(u) if u.same_password(user) => {
                self.user = Some(u);
                false
            }
            _ => {
                tracing::info!(
                    "{:?}: user {} was removed or its password changed: the connection must AUTH again",
                    self.peer,
                    user.name()
                );
                self.user = None;
                true
            }
        }
    }

    /// The refusal of `req` before it runs, if any: `NOAUTH` before a successful `AUTH`, or
    /// `DENIED` for a key outside the user's grants or an admin command without the right.
    pub(super) fn refuse(&self, req: &Request) -> Option<Refusal> {
        // Without users there is nothing to check.
        self.auth.users.as_ref()?;
        let Some(user) = &self.user else {
            return match req {
                Request::Auth { .. } | Request::Ping | Request::Quit => None,
                _ => Some(Refusal::Read(Response::err(
                    ErrorCode::NoAuth,
                    "authentication required",
                ))),
            };
        };
        match req {
            Request::Get { key } if !user.may_read(key) => {
                Some(Refusal::Read(denied(key, "no read permission")))
            }
            Request::Put { key, .. } | Request::Del { key } if !user.may_write(key) => {
                Some(Refusal::Write(key.clone()))
            }
            Request::Scan { start, end, .. } => user.first_unreadable(start, end).map(|k| {
                Refusal::Read(denied(
                    &k,
                    "no read permission (SCAN needs it on the whole range)",
                ))
            }),
            Request::Status if !user.is_admin() => {
                Some(Refusal::Read(denied(b"STATUS", "needs the admin right")))
            }
            Request::Hops if !user.is_admin() => {
                Some(Refusal::Read(denied(b"HOPS", "needs the admin right")))
            }
            _ => None,
        }
    }

    /// Runs `AUTH user password` (the caller has checked there are users and no transaction
    /// is open): one password check off the runtime, then `OK`, or after the failure delay
    /// `WRONGPASS`, closing the connection at the last allowed failure.
    pub(super) async fn auth(
        &mut self,
        config: &AuthConfig,
        user: Bytes,
        password: Bytes,
    ) -> AuthOutcome {
        // The generation before the users: a reload in between makes the next command
        // refresh the user, never miss the reload.
        let generation = config.generation();
        let found = match config.verifies.clone().acquire_owned().await {
            Ok(permit) => {
                let users = config.users();
                let name = user.clone();
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    users.check_password(&name, &password)
                })
                .await
            }
            // The semaphore is never closed.
            Err(_) => {
                return AuthOutcome::Answer(Response::err(
                    ErrorCode::Internal,
                    "the password checker is closed",
                ))
            }
        };
        match found {
            Ok(Some(u)) => {
                tracing::debug!("{:?}: authenticated as {}", self.peer, u.name());
                self.user = Some(u);
                self.generation = generation;
                AuthOutcome::Answer(Response::ok())
            }
            Ok(None) => {
                self.failures = self.failures.saturating_add(1);
                let peer = self
                    .peer
                    .map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
                tracing::warn!(
                    "failed AUTH as {} from {peer} ({} of {} on this connection)",
                    token::display(&user),
                    self.failures,
                    config.max_failures
                );
                // Rate limiting: every guess costs the guesser this long on this connection.
                tokio::time::sleep(config.fail_delay).await;
                if self.failures >= config.max_failures {
                    AuthOutcome::Close(Response::err(
                        ErrorCode::WrongPass,
                        format!(
                            "{WRONGPASS_MESSAGE}; {} failed AUTHs on this connection \
                             (--max-auth-failures), closing it",
                            self.failures
                        ),
                    ))
                } else {
                    AuthOutcome::Answer(Response::err(ErrorCode::WrongPass, WRONGPASS_MESSAGE))
                }
            }
            Err(e) => AuthOutcome::Answer(Response::err(
                ErrorCode::Internal,
                format!("the password check failed: {e}"),
            )),
        }
    }
}

/// Why a request is refused before it runs.
pub(super) enum Refusal {
    /// Refused alone: the transaction, if any, stays open.
    Read(Response),
    /// A write to a key the user may not write: inside a transaction it aborts the
    /// transaction, as a write over `--max-txn-bytes` does.
    Write(Bytes),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn protected_mode_admits_only_loopback_clients_and_only_without_users() {
        let loopback = [
            "127.0.0.1:5",
            "127.8.9.10:5",
            "[::1]:5",
            "[::ffff:127.0.0.1]:5",
        ];
        let remote = [
            "10.0.0.1:5",
            "192.168.1.2:5",
            "[2001:db8::1]:5",
            "[::ffff:10.0.0.1]:5",
            "0.0.0.0:5",
        ];
        for a in loopback {
            assert!(admits(addr(a), false, true), "{a} is loopback");
        }
        for a in remote {
            assert!(
                !admits(addr(a), false, true),
                "{a} is refused in protected mode"
            );
            assert!(admits(addr(a), true, true), "{a} may AUTH when users exist");
            assert!(
                admits(addr(a), false, false),
                "{a} with --no-protected-mode"
            );
        }
    }

    fn request(line: &str) -> Request {
        Request::parse(line.as_bytes())
            .expect("parses")
            .expect("not blank")
    }

    /// The refusal of `line` as the gate words it: `None`, the reply line, or `write <key>`.
    fn refusal(gate: &Gate, line: &str) -> Option<String> {
        gate.refuse(&request(line)).map(|r| match r {
            Refusal::Read(r) => String::from_utf8_lossy(&r.to_line()).into_owned(),
            Refusal::Write(k) => format!("write {}", token::display(&k)),
        })
    }

    #[test]
    fn the_gate_lets_only_auth_ping_and_quit_through_before_auth_and_then_what_the_grants_allow() {
        use crate::users::{Access, Grant};
        let cheap = argon2::Params::new(8, 1, 1, None).expect("params");
        let grants = vec![
            Grant::new("app:", Access::ReadWrite),
            Grant::new("in:", Access::Write),
        ];
        let app = User::with_params("app", b"pw", grants, false, cheap.clone()).expect("user");
        let root = User::with_params("root", b"pw", vec![], true, cheap).expect("user");
        let mut users = Users::new();
        users.add(app, false).expect("new");
        users.add(root, false).expect("new");
        let users = Arc::new(users);
        let auth = Arc::new(ClientAuth {
            users: Some(AuthConfig::new(users.clone(), 5, Duration::ZERO, 1)),
            protected: true,
        });
        let mut gate = Gate::new(auth, None);
        for line in ["AUTH a b", "PING", "QUIT"] {
            assert_eq!(refusal(&gate, line), None, "{line}");
        }
        for line in [
            "GET app:1",
            "PUT app:1 v",
            "BEGIN",
            "COMMIT",
            "ABORT",
            "STATUS",
            "HOPS",
            "SCAN a b",
        ] {
            assert_eq!(
                refusal(&gate, line).as_deref(),
                Some("ERR NOAUTH authentication required"),
                "{line}"
            );
        }
        gate.user = users.get_arc("app");
        for line in [
            "GET app:1",
            "PUT app:1 v",
            "DEL app:1",
            "PUT in:1 v",
            "SCAN app: app;",
            "BEGIN",
            "COMMIT",
            "ABORT",
        ] {
            assert_eq!(refusal(&gate, line), None, "{line}");
        }
        assert_eq!(
            refusal(&gate, "GET in:1").as_deref(),
            Some("ERR DENIED in:1 no read permission")
        );
        assert_eq!(
            refusal(&gate, "PUT other v").as_deref(),
            Some("write other")
        );
        assert_eq!(refusal(&gate, "DEL other").as_deref(), Some("write other"));
        assert_eq!(
            refusal(&gate, "SCAN app: b").as_deref(),
            Some("ERR DENIED app; no read permission (SCAN needs it on the whole range)")
        );
        assert_eq!(
            refusal(&gate, "STATUS").as_deref(),
            Some("ERR DENIED STATUS needs the admin right")
        );
        assert_eq!(
            refusal(&gate, "HOPS").as_deref(),
            Some("ERR DENIED HOPS needs the admin right")
        );
        gate.user = users.get_arc("root");
        assert_eq!(refusal(&gate, "STATUS"), None);
        assert_eq!(
            refusal(&gate, "GET app:1").as_deref(),
            Some("ERR DENIED app:1 no read permission"),
            "admin is no key right"
        );

        let open = Gate::new(Arc::new(ClientAuth::default()), None);
        for line in ["GET x", "PUT x v", "STATUS", "SCAN \"\" z"] {
            assert_eq!(
                refusal(&open, line),
                None,
                "without users nothing is checked: {line}"
            );
        }
    }

    #[test]
    fn denied_names_the_key_as_a_token_first() {
        let Response::Err(e) = denied(b"a key\n", "no read permission") else {
            panic!("not an error");
        };
        assert_eq!(e.code, ErrorCode::Denied);
        assert_eq!(e.message, "\"a key\\n\" no read permission");
        let first = token::split(e.message.as_bytes()).expect("splits")[0].clone();
        assert_eq!(first, Bytes::from("a key\n"));
    }
}
