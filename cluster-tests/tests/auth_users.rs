//! Client authentication and permissions on the kvstore (issue #19 item 2), as processes: a
//! users file made by `dtkv-admin`, `AUTH` with right and wrong passwords, `NOAUTH` before it,
//! grants on GET/PUT/DEL/SCAN (also inside a transaction), the admin right for STATUS and
//! HOPS, the connection closed at the last allowed failed AUTH, and the store without users
//! (protected mode, which admits the loopback clients these tests are).

use cluster_tests::{bin, Auth, System};
use protocol::{Client, ClientError};
use std::path::Path;
use std::process::{Command, Output};

/// Runs `dtkv-admin` with `args`, the password (if any) in `DTKV_PASSWORD`.
fn admin_tool(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = Command::new(bin("dtkv-admin"));
    cmd.args(args).env_remove("DTKV_PASSWORD");
    if let Some(pw) = password {
        cmd.env("DTKV_PASSWORD", pw);
    }
    cmd.output().expect("running dtkv-admin")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "dtkv-admin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The users of these tests: `root` (admin, every key) and `app` (its own keys, reads of
/// `shared:`, writes of `inbox:`).
fn make_users(path: &Path) {
    let f = path.to_str().expect("utf-8 path");
    ok(admin_tool(
        &[
            "user",
            "add",
            "root",
            "--users",
            f,
            "--admin",
            "--readwrite",
            "",
        ],
        Some("root-pw"),
    ));
    ok(admin_tool(
        &[
            "user",
            "add",
            "app",
            "--users",
            f,
            "--readwrite",
            "app:",
            "--read",
            "shared:",
            "--write",
            "inbox:",
        ],
        Some("app pw"),
    ));
}

fn root() -> Auth {
    Auth::new("root", "root-pw")
}

fn app() -> Auth {
    Auth::new("app", "app pw")
}

/// A system whose kvstore has the users of [`make_users`] and `extra` flags.
async fn system_with_users(dir: &Path, extra: &[&str]) -> System {
    let users = dir.join("users");
    make_users(&users);
    let users = users.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["--users", users.as_str()];
    args.extend_from_slice(extra);
    System::start_as(&args, Some(root())).await
}

/// Sends `line` and returns the reply line as text.
async fn call(c: &mut Client, line: &str) -> String {
    let r = c.call(line.as_bytes()).await.expect("a reply");
    String::from_utf8_lossy(&r.to_line()).into_owned()
}

/// Sends `line` (a SCAN) and returns every reply line up to `END` or an `ERR`, as text.
async fn scan(c: &mut Client, line: &str) -> Vec<String> {
    c.send(line.as_bytes());
    let mut out = Vec::new();
    loop {
        let r = c.recv().await.expect("a reply");
        let text = String::from_utf8_lossy(&r.to_line()).into_owned();
        let last = text == "END" || text.starts_with("ERR ");
        out.push(text);
        if last {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_auth_ping_and_quit_run_before_auth_and_a_wrong_password_leaves_the_connection_usable()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = system_with_users(dir.path(), &[]).await;
    let mut c = Client::connect(sys.kv_addr).await.expect("connect");
    assert_eq!(call(&mut c, "PING").await, "PONG");
    for line in [
        "GET app:1",
        "PUT app:1 sneaky",
        "DEL app:1",
        "SCAN a z",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "STATUS",
        "HOPS",
    ] {
        assert_eq!(
            call(&mut c, line).await,
            "ERR NOAUTH authentication required",
            "{line}"
        );
    }
    // Unknown user and wrong password: one answer, so a name cannot be probed.
    for line in [
        "AUTH app guess-xyzzy",
        "AUTH nobody \"app pw\"",
        "AUTH root \"app pw\"",
    ] {
        assert_eq!(
            call(&mut c, line).await,
            "ERR WRONGPASS invalid username or password",
            "{line}"
        );
    }
    assert_eq!(call(&mut c, "AUTH app \"app pw\"").await, "OK");
    assert_eq!(
        call(&mut c, "GET app:1").await,
        "NIL",
        "the PUT before AUTH wrote nothing"
    );
    assert_eq!(call(&mut c, "PUT app:1 v").await, "OK");
    assert_eq!(call(&mut c, "GET app:1").await, "VALUE v");
    // A second AUTH switches users; a failed one keeps the user the connection had.
    assert_eq!(
        call(&mut c, "AUTH root nope-xyzzy").await,
        "ERR WRONGPASS invalid username or password"
    );
    assert_eq!(call(&mut c, "GET app:1").await, "VALUE v");
    assert_eq!(call(&mut c, "AUTH root root-pw").await, "OK");
    assert!(call(&mut c, "STATUS").await.starts_with("OK role=kvstore"));
    assert_eq!(call(&mut c, "BEGIN").await.split(' ').next(), Some("OK"));
    assert_eq!(
        call(&mut c, "AUTH app \"app pw\"").await,
        "ERR TXN_ACTIVE AUTH inside a transaction; end it with COMMIT or ABORT first"
    );
    assert_eq!(call(&mut c, "ABORT").await, "OK");

    let mut q = Client::connect(sys.kv_addr).await.expect("connect");
    assert_eq!(call(&mut q, "QUIT").await, "OK", "QUIT needs no AUTH");
    assert!(matches!(q.recv().await, Err(ClientError::Closed)));

    // Every failure is logged with the user and the peer, never the password.
    let log = std::fs::read_to_string(&sys.kv.as_ref().expect("kvstore").log).expect("log");
    assert!(
        log.contains("failed AUTH as nobody from 127.0.0.1:"),
        "{log}"
    );
    assert!(log.contains("failed AUTH as app from 127.0.0.1:"), "{log}");
    assert!(
        !log.contains("xyzzy") && !log.contains("app pw"),
        "a password in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_enforced_on_every_key_and_the_admin_right_on_status_and_hops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = system_with_users(dir.path(), &[]).await;
    let mut r = sys.connect().await.expect("root");
    for (k, v) in [
        ("app:1", "a1"),
        ("app:2", "a2"),
        ("shared:x", "sx"),
        ("secret", "s"),
    ] {
        assert_eq!(call(&mut r, &format!("PUT {k} {v}")).await, "OK");
    }
    let mut c = cluster_tests::connect(sys.kv_addr, Some(&app()))
        .await
        .expect("app");

    // Autocommit reads and writes.
    assert_eq!(call(&mut c, "GET app:1").await, "VALUE a1");
    assert_eq!(call(&mut c, "GET shared:x").await, "VALUE sx");
    assert_eq!(
        call(&mut c, "GET secret").await,
        "ERR DENIED secret no read permission"
    );
    assert_eq!(
        call(&mut c, "GET \"a b\"").await,
        "ERR DENIED \"a b\" no read permission"
    );
    assert_eq!(
        call(&mut c, "PUT shared:x w").await,
        "ERR DENIED shared:x no write permission"
    );
    assert_eq!(
        call(&mut c, "DEL secret").await,
        "ERR DENIED secret no write permission"
    );
    assert_eq!(call(&mut c, "PUT inbox:1 hi").await, "OK", "write-only");
    assert_eq!(
        call(&mut c, "GET inbox:1").await,
        "ERR DENIED inbox:1 no read permission"
    );
    assert_eq!(call(&mut r, "GET inbox:1").await, "VALUE hi");
    assert_eq!(
        call(&mut r, "GET shared:x").await,
        "VALUE sx",
        "the denied PUT wrote nothing"
    );
    assert_eq!(
        call(&mut r, "GET secret").await,
        "VALUE s",
        "the denied DEL deleted nothing"
    );

    // SCAN: allowed only when the whole range is readable, decided from its bounds.
    assert_eq!(
        scan(&mut c, "SCAN app: app;").await,
        ["KV app:1 a1", "KV app:2 a2", "END"]
    );
    assert_eq!(
        scan(&mut c, "SCAN app:2 app;").await,
        ["KV app:2 a2", "END"]
    );
    assert_eq!(
        scan(&mut c, "SCAN app: b").await,
        ["ERR DENIED app; no read permission (SCAN needs it on the whole range)"]
    );
    assert_eq!(
        scan(&mut c, "SCAN \"\" \"\\xff\"").await,
        ["ERR DENIED \"\\x00\" no read permission (SCAN needs it on the whole range)"]
    );
    assert_eq!(
        scan(&mut c, "SCAN inbox: inbox;").await[0]
            .split(' ')
            .take(2)
            .collect::<Vec<_>>(),
        ["ERR", "DENIED"]
    );
    assert_eq!(
        scan(&mut c, "SCAN shared: shared; LIMIT 5").await,
        ["KV shared:x sx", "END"]
    );

    // In a transaction: a denied read is refused alone and the transaction goes on...
    assert_eq!(call(&mut c, "BEGIN").await.split(' ').next(), Some("OK"));
    assert_eq!(call(&mut c, "PUT app:t1 1").await, "OK");
    assert_eq!(
        call(&mut c, "GET secret").await,
        "ERR DENIED secret no read permission"
    );
    assert_eq!(
        scan(&mut c, "SCAN a z").await,
        ["ERR DENIED a no read permission (SCAN needs it on the whole range)"]
    );
    assert_eq!(
        scan(&mut c, "SCAN app:t app:u").await,
        ["KV app:t1 1", "END"]
    );
    assert_eq!(call(&mut c, "PUT app:t2 2").await, "OK");
    assert!(call(&mut c, "COMMIT").await.starts_with("COMMITTED "));
    assert_eq!(call(&mut r, "GET app:t2").await, "VALUE 2");
    // ...while a denied write aborts it, so a pipelined COMMIT commits nothing.
    for line in [
        "BEGIN",
        "PUT app:u1 1",
        "PUT secret 2",
        "PUT app:u2 3",
        "COMMIT",
    ] {
        c.send(line.as_bytes());
    }
    c.flush().await.expect("flush");
    let replies: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let r = c.recv().await.expect("a reply");
            v.push(String::from_utf8_lossy(&r.to_line()).into_owned());
        }
        v
    };
    assert!(replies[0].starts_with("OK "), "{replies:?}");
    assert_eq!(replies[1], "OK");
    assert_eq!(
        replies[2],
        "ERR DENIED secret no write permission; the transaction is aborted, end it with COMMIT or ABORT"
    );
    assert!(
        replies[3].starts_with(
            "ERR NO_TXN current transaction is aborted (DENIED: no write permission on secret)"
        ),
        "{replies:?}"
    );
    assert_eq!(replies[4], "ABORTED DENIED");
    assert_eq!(call(&mut r, "GET app:u1").await, "NIL");
    assert_eq!(call(&mut r, "GET secret").await, "VALUE s");

    // The server's own commands need the admin right.
    assert_eq!(
        call(&mut c, "STATUS").await,
        "ERR DENIED STATUS needs the admin right"
    );
    assert_eq!(
        call(&mut c, "HOPS").await,
        "ERR DENIED HOPS needs the admin right"
    );
    assert!(call(&mut r, "STATUS").await.starts_with("OK role=kvstore"));
    assert!(
        call(&mut r, "HOPS").await.starts_with("ERR UNAVAILABLE"),
        "an admin gets past the check (tracing is off)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_at_its_last_allowed_failed_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = system_with_users(
        dir.path(),
        &["--max-auth-failures", "3", "--auth-fail-delay-ms", "50"],
    )
    .await;
    let mut c = Client::connect(sys.kv_addr).await.expect("connect");
    for _ in 0..2 {
        assert_eq!(
            call(&mut c, "AUTH app guess").await,
            "ERR WRONGPASS invalid username or password"
        );
    }
    // The last failure is answered and the connection closed; what was pipelined behind it
    // is not run.
    c.send(b"AUTH app guess");
    c.send(b"AUTH app \"app pw\"");
    c.flush().await.expect("flush");
    let last = c.recv().await.expect("the last answer");
    assert_eq!(
        String::from_utf8_lossy(&last.to_line()),
        "ERR WRONGPASS invalid username or password; 3 failed AUTHs on this connection (--max-auth-failures), closing it"
    );
    assert!(matches!(
        c.recv().await,
        Err(ClientError::Closed | ClientError::Io(_))
    ));
    // Other connections are not affected.
    let mut other = cluster_tests::connect(sys.kv_addr, Some(&app()))
        .await
        .expect("app");
    assert_eq!(call(&mut other, "PUT app:ok 1").await, "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_users_the_kvstore_serves_loopback_clients_as_before_and_refuses_auth() {
    let sys = System::start(&[]).await;
    let mut c = Client::connect(sys.kv_addr).await.expect("connect");
    // The README's tour, unchanged.
    assert_eq!(call(&mut c, "BEGIN").await.split(' ').next(), Some("OK"));
    assert_eq!(call(&mut c, "PUT user:1 \"John Doe\"").await, "OK");
    assert_eq!(call(&mut c, "GET user:1").await, "VALUE \"John Doe\"");
    assert!(call(&mut c, "COMMIT").await.starts_with("COMMITTED "));
    assert_eq!(
        scan(&mut c, "SCAN user: user;").await,
        ["KV user:1 \"John Doe\"", "END"]
    );
    assert!(call(&mut c, "STATUS").await.starts_with("OK role=kvstore"));
    assert_eq!(
        call(&mut c, "AUTH root root-pw").await,
        "ERR REJECTED no users are configured (--users), so there is nothing to AUTH as"
    );
    let log = std::fs::read_to_string(&sys.kv.as_ref().expect("kvstore").log).expect("log");
    assert!(
        log.contains("protected mode: no users are configured"),
        "{log}"
    );
}

#[test]
fn dtkv_admin_adds_lists_replaces_and_deletes_users_without_showing_hashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let f = users.to_str().expect("utf-8 path");
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, "from a file\n").expect("password file");
    let pw = pw_file.to_str().expect("utf-8 path");
    ok(admin_tool(
        &[
            "user",
            "add",
            "alice",
            "--users",
            f,
            "--password-file",
            pw,
            "--read",
            "",
            "--write",
            "app:",
        ],
        None,
    ));
    ok(admin_tool(
        &["user", "add", "bob", "--users", f, "--admin"],
        Some("bob-pw"),
    ));
    let list = ok(admin_tool(&["user", "list", "--users", f], None));
    assert_eq!(list, "alice read \"\" write app:\nbob admin\n");
    assert!(!std::fs::read_to_string(&users)
        .expect("file")
        .contains("from a file"));

    let again = admin_tool(&["user", "add", "bob", "--users", f], Some("x"));
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("user bob exists (--replace to change it)")
    );
    ok(admin_tool(
        &[
            "user",
            "add",
            "bob",
            "--users",
            f,
            "--replace",
            "--readwrite",
            "b:",
        ],
        Some("x"),
    ));
    let list = ok(admin_tool(&["user", "list", "--users", f], None));
    assert_eq!(list, "alice read \"\" write app:\nbob readwrite b:\n");

    ok(admin_tool(&["user", "del", "bob", "--users", f], None));
    let list = ok(admin_tool(&["user", "list", "--users", f], None));
    assert_eq!(list, "alice read \"\" write app:\n");
    let gone = admin_tool(&["user", "del", "bob", "--users", f], None);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no user bob"));

    let no_pw = admin_tool(&["user", "add", "carol", "--users", f], None);
    assert!(!no_pw.status.success());
    assert!(String::from_utf8_lossy(&no_pw.stderr).contains("no password"));
    let bad_name = admin_tool(&["user", "add", "car ol", "--users", f], Some("x"));
    assert!(String::from_utf8_lossy(&bad_name.stderr).contains("bad user name"));
    std::fs::write(&users, "user alice nohash\n").expect("corrupt");
    let bad = admin_tool(&["user", "list", "--users", f], None);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 1 (user alice): bad password hash"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Sends SIGHUP to the kvstore and waits until its log has one more line containing `what`.
async fn sighup_and_wait(sys: &System, what: &str) {
    let kv = sys.kv.as_ref().expect("kvstore");
    let count = || {
        std::fs::read_to_string(&kv.log)
            .unwrap_or_default()
            .matches(what)
            .count()
    };
    let before = count();
    let pid = kv.pid().expect("running");
    let sent = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    cluster_tests::wait_until(
        std::time::Duration::from_secs(20),
        &format!("the kvstore to log {what:?}"),
        || async { count() > before },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_reloads_the_users_and_each_connection_sees_it_at_its_next_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = system_with_users(dir.path(), &[]).await;
    let users = dir.path().join("users");
    let mut a = cluster_tests::connect(sys.kv_addr, Some(&app()))
        .await
        .expect("app");
    let mut r = sys.connect().await.expect("root");
    assert_eq!(call(&mut a, "PUT app:1 x").await, "OK");
    assert_eq!(call(&mut r, "PUT k 1").await, "OK");
    assert_eq!(call(&mut a, "BEGIN").await.split(' ').next(), Some("OK"));
    assert_eq!(call(&mut a, "PUT app:t 1").await, "OK");

    // app removed; root keeps its password (the hash untouched) but may now only read.
    ok(admin_tool(
        &[
            "user",
            "del",
            "app",
            "--users",
            users.to_str().expect("utf-8"),
        ],
        None,
    ));
    let text = std::fs::read_to_string(&users).expect("users");
    assert!(text.contains("admin readwrite \"\""), "{text}");
    std::fs::write(
        &users,
        text.replace("admin readwrite \"\"", "admin read \"\""),
    )
    .expect("edit");
    sighup_and_wait(&sys, "SIGHUP: reloaded 1 users").await;
    assert_eq!(
        call(&mut a, "GET app:1").await,
        "ERR NOAUTH authentication required",
        "a removed user's connection must AUTH again"
    );
    assert_eq!(
        call(&mut a, "COMMIT").await,
        "ERR NOAUTH authentication required"
    );
    assert_eq!(
        call(&mut a, "AUTH app \"app pw\"").await,
        "ERR WRONGPASS invalid username or password"
    );
    assert_eq!(
        call(&mut r, "PUT k 2").await,
        "ERR DENIED k no write permission"
    );
    assert_eq!(call(&mut r, "GET k").await, "VALUE 1");
    assert_eq!(
        call(&mut r, "GET app:t").await,
        "NIL",
        "the dropped transaction wrote nothing"
    );

    // Back again (a new hash): the connection logs in anew, its old transaction gone.
    ok(admin_tool(
        &[
            "user",
            "add",
            "app",
            "--users",
            users.to_str().expect("utf-8"),
            "--readwrite",
            "app:",
        ],
        Some("app pw"),
    ));
    sighup_and_wait(&sys, "SIGHUP: reloaded 2 users").await;
    assert_eq!(call(&mut a, "AUTH app \"app pw\"").await, "OK");
    assert_eq!(
        call(&mut a, "BEGIN").await.split(' ').next(),
        Some("OK"),
        "no transaction was left open"
    );
    assert_eq!(call(&mut a, "ABORT").await, "OK");

    // A file that does not load keeps the users loaded before.
    std::fs::write(&users, "user root nohash\n").expect("corrupt");
    sighup_and_wait(&sys, "SIGHUP: reloading --users failed").await;
    let mut again = sys.connect().await.expect("root still logs in");
    assert_eq!(call(&mut again, "GET k").await, "VALUE 1");
}

/// An address of this host that is not loopback (the one it would route outwards from), if
/// it has one: connecting to it from here makes a connection whose peer is not loopback.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    // A UDP connect only picks a route and a source address; nothing is sent. (Documentation
    // and private addresses: whichever this host has a route to.)
    ["10.255.255.255:9", "198.51.100.1:9", "172.31.255.255:9"]
        .into_iter()
        .find_map(|target| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            s.connect(target).ok()?;
            let ip = s.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_mode_refuses_a_client_from_another_address_and_no_protected_mode_serves_it() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("skipped: this host has no non-loopback address to connect from");
        return;
    };
    let log = cluster_tests::LogCluster::start(&[]).await;
    let sys = System::assemble(log, &[]).await;
    let port = cluster_tests::free_port();
    let remote = std::net::SocketAddr::new(ip, port);
    let loopback = cluster_tests::local(port);
    for (extra, protected) in [(None, true), (Some("--no-protected-mode"), false)] {
        let mut args = vec![
            "--listen".to_string(),
            format!("0.0.0.0:{port}"),
            "--sequencer".into(),
            sys.kv_seq_route.clone(),
            "--log".into(),
            sys.kv_log_route.join(","),
        ];
        args.extend(extra.map(str::to_string));
        let log_file = sys.log.dir.path().join(format!("kvstore-{protected}.log"));
        let mut kv = cluster_tests::Proc::spawn("kvstore", &args, &log_file);
        cluster_tests::wait_ready(loopback, &mut kv, std::time::Duration::from_secs(20)).await;
        cluster_tests::wait_serving(loopback, &mut kv).await;
        let mut c = Client::connect(remote).await.expect("connect");
        let first = call(&mut c, "GET k").await;
        if protected {
            assert!(
                first.starts_with(
                    "ERR DENIED protected mode: no users are configured, so only loopback clients are served"
                ),
                "{first}"
            );
            assert!(first.ends_with("(see docs/operations.md)"), "{first}");
            assert!(matches!(
                c.recv().await,
                Err(ClientError::Closed | ClientError::Io(_))
            ));
            let text = std::fs::read_to_string(&log_file).expect("log");
            assert!(
                text.contains("in protected mode: clients from other hosts will be refused"),
                "{text}"
            );
        } else {
            assert_eq!(first, "NIL", "--no-protected-mode serves {remote}");
            let text = std::fs::read_to_string(&log_file).expect("log");
            assert!(
                text.contains("--no-protected-mode without --users"),
                "{text}"
            );
        }
        // The loopback client is served either way.
        let mut l = Client::connect(loopback).await.expect("connect");
        assert_eq!(call(&mut l, "GET k").await, "NIL");
        // One kvstore writes at a time: stop this one before the next takes the log.
        kv.kill9();
    }
}
