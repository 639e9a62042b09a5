//! The limits every server's accept loop enforces (protocol::server, protocol::connection):
//! the connection cap, the server-wide read-buffer budget, the handshake and idle timeouts,
//! and the open-file limit raised at start. Run against the sequencer (no dependencies, so
//! each test is one process), plus one test that our own kvstore rides through its log
//! connections being closed for idleness.

use cluster_tests::{
    free_port, local, wait_ready, wait_until, LogCluster, Proc, Sequencer, System,
};
use protocol::Client;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends until it closes (bounded by a generous timeout).
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    String::from_utf8_lossy(&out).into_owned()
}

async fn ping(addr: std::net::SocketAddr) -> bool {
    match Client::connect(addr).await {
        Ok(mut c) => c.ping().await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_connection_over_the_cap_gets_one_err_line_and_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &["--max-connections", "3"]).await;
    // The readiness probe's connection may not have been noticed closed by the server yet:
    // until it is, it still counts against the cap.
    let addr = seq.addr;
    let held = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    wait_until(
        Duration::from_secs(10),
        "three connections held",
        move || {
            let h = h.clone();
            async move {
                let mut held = h.lock().await;
                if held.len() < 3 {
                    let mut c = Client::connect(addr).await.unwrap();
                    if c.ping().await.is_ok() {
                        held.push(c);
                    }
                }
                held.len() == 3
            }
        },
    )
    .await;
    let mut held = std::mem::take(&mut *held.lock().await);
    let mut over = TcpStream::connect(seq.addr).await.unwrap();
    let _ = over.write_all(b"PING\n").await;
    assert_eq!(
        read_to_close(&mut over).await,
        "ERR UNAVAILABLE too many connections (limit 3)\n"
    );
    // The held connections are unaffected, and a slot freed is a slot usable again.
    held[0].ping().await.unwrap();
    held.pop();
    wait_until(
        Duration::from_secs(20),
        "a freed slot to take a client",
        || ping(seq.addr),
    )
    .await;
}

/// Whether every byte sent on the loopback connection `client_port` -> `server_port` has been
/// read by the server process (both queues empty in /proc/net/tcp): a readiness check for
/// "the server holds this partial line now".
fn server_has_read(server_port: u16, client_port: u16) -> bool {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut seen = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(l), Some(r), Some(q)) = (f.get(1), f.get(2), f.get(4)) else {
            continue;
        };
        let ends = (port(l), port(r));
        if ends == (Some(server_port), Some(client_port))
            || ends == (Some(client_port), Some(server_port))
        {
            if q != &"00000000:00000000" {
                return false;
            }
            seen += 1;
        }
    }
    seen == 2
}

#[tokio::test]
async fn a_partial_line_crossing_the_read_budget_is_refused_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &["--max-read-buffer-mib", "1"]).await;
    let mut bystander = Client::connect(seq.addr).await.unwrap();
    bystander.ping().await.unwrap();
    // Two unfinished lines of 600 KiB: either fits the 1 MiB budget alone, both do not.
    let chunk = vec![b'x'; 600 * 1024];
    let mut first = TcpStream::connect(seq.addr).await.unwrap();
    first.write_all(b"PING ").await.unwrap();
    first.write_all(&chunk).await.unwrap();
    let first_port = first.local_addr().unwrap().port();
    wait_until(
        Duration::from_secs(20),
        "the server to hold the first line",
        || async { server_has_read(seq.addr.port(), first_port) },
    )
    .await;
    let mut second = TcpStream::connect(seq.addr).await.unwrap();
    second.write_all(b"PING ").await.unwrap();
    // The server may close it before all of it is written.
    let _ = second.write_all(&chunk).await;
    assert_eq!(
        read_to_close(&mut second).await,
        "ERR UNAVAILABLE server read buffers full (1 MiB of partial lines); line refused, closing\n"
    );
    // The first line, already held, completes and is answered; its connection goes on.
    first.write_all(b"\nPING\n").await.unwrap();
    first.shutdown().await.unwrap();
    let answers = read_to_close(&mut first).await;
    assert!(
        answers.starts_with("ERR SYNTAX") && answers.ends_with("\nPONG\n"),
        "{answers:?}"
    );
    // A connection that held no partial line never noticed, and the budget was given back.
    bystander.ping().await.unwrap();
    let mut third = TcpStream::connect(seq.addr).await.unwrap();
    third.write_all(b"PING ").await.unwrap();
    third.write_all(&chunk).await.unwrap();
    third.write_all(b"\n").await.unwrap();
    third.shutdown().await.unwrap();
    assert!(read_to_close(&mut third).await.starts_with("ERR SYNTAX"));
}

#[tokio::test]
async fn a_connection_that_sends_no_line_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &["--handshake-timeout-secs", "1"]).await;
    let mut talker = Client::connect(seq.addr).await.unwrap();
    talker.ping().await.unwrap();
    let mut silent = TcpStream::connect(seq.addr).await.unwrap();
    let mut half = TcpStream::connect(seq.addr).await.unwrap();
    half.write_all(b"PIN").await.unwrap();
    let expected = "ERR UNAVAILABLE no complete request line within 1 s; closing\n";
    assert_eq!(read_to_close(&mut silent).await, expected);
    assert_eq!(read_to_close(&mut half).await, expected);
    // A connection that did send a line has no idle timeout on the sequencer by default.
    talker.ping().await.unwrap();
}

#[tokio::test]
async fn a_connection_idle_past_the_idle_timeout_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::start(dir.path(), &["--idle-timeout-secs", "1"]).await;
    let mut s = TcpStream::connect(seq.addr).await.unwrap();
    s.write_all(b"PING\n").await.unwrap();
    assert_eq!(
        read_to_close(&mut s).await,
        "PONG\nERR UNAVAILABLE idle for 1 s; closing\n"
    );
}

#[tokio::test]
async fn a_server_started_under_a_low_file_limit_raises_it_and_serves_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    let wanted = 200usize;
    if hard.rlim_max < 64 + 2 * wanted as u64 + 200 {
        eprintln!(
            "skipped: the hard open-file limit {} is too low",
            hard.rlim_max
        );
        return;
    }
    let addr = local(free_port());
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--data-dir",
        &dir.path().display().to_string(),
        "--max-connections",
        &wanted.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.path().join("sequencer.log");
    let mut p = Proc::spawn_with_nofile("sequencer", &args, &log, 64);
    wait_ready(addr, &mut p, Duration::from_secs(20)).await;
    let mut clients = Vec::new();
    for i in 0..150 {
        let mut c = Client::connect(addr).await.unwrap();
        assert!(c.ping().await.is_ok(), "connection {i} was not served");
        clients.push(c);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("open-file limit raised from 64"),
        "log: {text}"
    );
}

/// The server side of this host's TCP connections to `ports`, by state, from /proc/net/tcp:
/// (established, close_wait) as seen by the connecting side.
fn client_states(ports: &[u16]) -> (usize, usize) {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let (mut est, mut close_wait) = (0, 0);
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(remote), Some(state)) = (f.get(2), f.get(3)) else {
            continue;
        };
        let port = remote
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        if port.is_some_and(|p| ports.contains(&p)) {
            match *state {
                "01" => est += 1,
                "08" => close_wait += 1,
                _ => {}
            }
        }
    }
    (est, close_wait)
}

#[tokio::test]
async fn the_kvstore_commits_on_after_the_log_closed_its_idle_connections() {
    let log = LogCluster::start(&["--idle-timeout-secs", "1"]).await;
    let ports: Vec<u16> = log.replicas.iter().map(|r| r.dksp.port()).collect();
    let mut sys = System::assemble(log, &["--no-tail"]).await;
    sys.start_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    assert_eq!(
        c.call(b"PUT before 1").await.unwrap(),
        protocol::Response::ok()
    );
    // Every connection the kvstore had to the log is closed by the replicas (the kvstore's
    // side waits in CLOSE_WAIT until it next uses it).
    wait_until(
        Duration::from_secs(30),
        "the log to close idle connections",
        || async {
            let (est, close_wait) = client_states(&ports);
            // Replica-to-replica Raft links use other ports; only DKSP connections count here.
            est == 0 && close_wait > 0
        },
    )
    .await;
    for i in 0..20 {
        let put = format!("PUT after{i} {i}");
        assert_eq!(
            c.call(put.as_bytes()).await.unwrap(),
            protocol::Response::ok(),
            "commit {i} after the idle close"
        );
    }
    let got = c.call(b"GET after19").await.unwrap();
    assert_eq!(
        got,
        protocol::Response::Value(bytes::Bytes::from_static(b"19"))
    );
}
