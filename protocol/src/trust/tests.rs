//! Membership over real sockets: the DKSP gate, the Raft handshake and TLS.

use super::*;
use crate::handler::{self, Cx, Flow, Handler};
use crate::server::{serve_with, Port, ServeOptions};
use crate::{Client, ClientError, Connection};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn secret(s: &[u8]) -> Arc<ClusterSecret> {
    Arc::new(ClusterSecret::new(s).expect("long enough"))
}

fn with_secret(s: &[u8]) -> Trust {
    Trust {
        secret: Some(secret(s)),
        tls: None,
    }
}

const OURS: &[u8] = b"the secret of this test cluster, 32+ bytes";
const THEIRS: &[u8] = b"the secret of some other cluster, 32+ bytes";

/// A sequencer stand-in: `NEXT` is a member request, `PING` and `STATUS` are not.
struct Stub;

impl Handler for Stub {
    type Request = crate::seq::Request;

    async fn dispatch(&mut self, req: Self::Request, cx: &mut Cx<'_>) -> io::Result<Flow> {
        use crate::seq::Request;
        let member = cx.conn.is_member();
        cx.reply(match req {
            Request::Ping => Response::Pong,
            Request::Status => Response::status(&[("member", member.to_string())]),
            Request::Quit => return Ok(Flow::Close),
            _ => Response::Ts {
                first: 7,
                count: None,
            },
        });
        Ok(Flow::Continue)
    }
}

async fn start(trust: Trust, status_open: bool) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let mut opts = ServeOptions::unlimited(1024);
    opts.trust = trust;
    opts.port = Port::Cluster { status_open };
    tokio::spawn(serve_with(
        listener,
        opts,
        stop.clone(),
        |conn: Connection, t| handler::run(conn, Stub, t),
    ));
    (addr, stop)
}

fn code(r: &crate::client::Result<Response>) -> Option<ErrorCode> {
    match r {
        Ok(Response::Err(e)) => Some(e.code),
        Err(ClientError::Server(e)) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn a_member_with_the_secret_is_served_and_one_without_gets_only_ping() {
    let (addr, stop) = start(with_secret(OURS), false).await;
    let mut member = Client::connect_trusted(&addr, &with_secret(OURS))
        .await
        .expect("handshake");
    assert!(matches!(
        member.call(b"NEXT").await,
        Ok(Response::Ts { first: 7, .. })
    ));

    let mut stranger = Client::connect(addr.as_str()).await.expect("connect");
    assert!(matches!(stranger.call(b"PING").await, Ok(Response::Pong)));
    assert_eq!(code(&stranger.call(b"NEXT").await), Some(ErrorCode::NoAuth));
    assert_eq!(
        code(&stranger.call(b"STATUS").await),
        Some(ErrorCode::NoAuth),
        "the sequencer keeps STATUS for members"
    );
    stop.cancel();
}

#[tokio::test]
async fn another_clusters_secret_is_refused_on_both_sides() {
    let (addr, stop) = start(with_secret(OURS), true).await;
    let err = Client::connect_trusted(&addr, &with_secret(THEIRS))
        .await
        .err();
    assert!(
        matches!(err, Some(ClientError::Server(ref e)) if e.code == ErrorCode::NoAuth),
        "{err:?}"
    );

    // And a client holding our secret refuses a server holding another one.
    let (other, stop2) = start(with_secret(THEIRS), true).await;
    let err = Client::connect_trusted(&other, &with_secret(OURS))
        .await
        .err();
    assert!(err.is_some(), "a server of another cluster was accepted");
    stop.cancel();
    stop2.cancel();
}

#[tokio::test]
async fn a_nonce_serves_one_proof_and_failed_proofs_close_the_connection() {
    let (addr, stop) = start(with_secret(OURS), true).await;
    let s = secret(OURS);
    let mut c = Client::connect(addr.as_str()).await.expect("connect");
    let nonce = match c.call(b"HELLO").await {
        Ok(Response::Ok(w)) => w[0].clone(),
        r => panic!("HELLO: {r:?}"),
    };
    let challenge = Challenge::answer(&s, &nonce).expect("nonce");
    assert!(matches!(c.call(&challenge.line).await, Ok(Response::Ok(_))));
    // Replaying the same proof (or any) without a new HELLO is refused.
    let mut replay = Client::connect(addr.as_str()).await.expect("connect");
    assert_eq!(
        code(&replay.call(&challenge.line).await),
        Some(ErrorCode::Rejected)
    );

    let mut guesser = Client::connect(addr.as_str()).await.expect("connect");
    let bogus = format!("CLUSTER {} {}", "00".repeat(32), "11".repeat(32));
    for _ in 1..MAX_HANDSHAKE_FAILURES {
        assert!(matches!(guesser.call(b"HELLO").await, Ok(Response::Ok(_))));
        assert_eq!(
            code(&guesser.call(bogus.as_bytes()).await),
            Some(ErrorCode::NoAuth)
        );
    }
    assert!(matches!(guesser.call(b"HELLO").await, Ok(Response::Ok(_))));
    assert_eq!(
        code(&guesser.call(bogus.as_bytes()).await),
        Some(ErrorCode::NoAuth)
    );
    assert!(
        guesser.call(b"PING").await.is_err(),
        "the connection stays open after {MAX_HANDSHAKE_FAILURES} failures"
    );
    stop.cancel();
}

#[tokio::test]
async fn status_before_membership_is_answered_only_where_it_is_open() {
    let (addr, stop) = start(with_secret(OURS), true).await;
    let mut stranger = Client::connect(addr.as_str()).await.expect("connect");
    let pairs = stranger.status().await.expect("status");
    assert_eq!(pairs, vec![("member".to_string(), "false".to_string())]);
    stop.cancel();
}

#[tokio::test]
async fn without_credentials_loopback_is_trusted() {
    let (addr, stop) = start(Trust::none(), false).await;
    let mut c = Client::connect(addr.as_str()).await.expect("connect");
    assert!(matches!(c.call(b"NEXT").await, Ok(Response::Ts { .. })));
    assert_eq!(
        code(&c.call(b"HELLO").await),
        Some(ErrorCode::Rejected),
        "no secret to prove"
    );
    stop.cancel();
}

#[test]
fn loopback_is_recognised_in_every_spelling() {
    for a in ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"] {
        assert!(is_loopback(a.parse().expect("ip")), "{a}");
    }
    for a in ["10.0.0.1", "192.168.1.1", "::ffff:10.0.0.1", "fe80::1"] {
        assert!(!is_loopback(a.parse().expect("ip")), "{a}");
    }
}

async fn pair() -> (Stream, Stream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (
        Stream::Plain(c.expect("connect")),
        Stream::Plain(s.expect("accept").0),
    )
}

#[tokio::test]
async fn the_raft_handshake_admits_the_same_secret_and_drops_another() {
    let (mut c, mut s) = pair().await;
    let (ours, theirs) = (with_secret(OURS), with_secret(THEIRS));
    let (p, a) = tokio::join!(ours.raft_prove(&mut c), ours.raft_admit(&mut s));
    assert!(p.is_ok() && a.is_ok(), "{p:?} {a:?}");

    let (mut c, mut s) = pair().await;
    let (p, a) = tokio::join!(theirs.raft_prove(&mut c), async {
        let r = ours.raft_admit(&mut s).await;
        drop(s);
        r
    });
    assert!(a.is_err(), "a wrong proof was admitted");
    assert!(p.is_err(), "the client did not notice");
}

#[tokio::test]
async fn the_raft_port_reads_no_more_than_the_preauth_limit_from_a_stranger() {
    let (mut c, mut s) = pair().await;
    let ours = with_secret(OURS);
    let junk = vec![b'x'; 1 << 20];
    let writer = async move {
        let mut hello = [0u8; 40];
        c.read_exact(&mut hello).await.expect("hello");
        // Everything past the limit is never read: the write stalls or fails once the server
        // drops the connection.
        let _ = c.write_all(&junk).await;
    };
    let (admitted, ()) = tokio::join!(ours.raft_admit(&mut s), writer);
    assert!(admitted.is_err());
}

fn tls_trust(dir: &std::path::Path, ca: &str) -> Trust {
    let certs = devcerts::generate(dir, ca, &[]).expect("certs");
    Trust {
        secret: None,
        tls: Some(TlsConfig::member(&certs.cert, &certs.key, &certs.ca).expect("tls")),
    }
}

#[tokio::test]
async fn mutual_tls_with_the_cluster_ca_makes_a_member_and_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let ours = tls_trust(&dir.path().join("ours"), "test CA");
    let theirs = tls_trust(&dir.path().join("theirs"), "another CA");
    let (addr, stop) = start(ours.clone(), false).await;

    let mut member = Client::connect_trusted(&addr, &ours).await.expect("TLS");
    assert!(matches!(
        member.call(b"NEXT").await,
        Ok(Response::Ts { .. })
    ));

    // A certificate from another CA fails the handshake (the server refuses the client's
    // certificate; the client also refuses the server's).
    let refused = match Client::connect_trusted(&addr, &theirs).await {
        Err(_) => true,
        Ok(mut c) => c.call(b"PING").await.is_err(),
    };
    assert!(refused, "a client of another CA got through");

    // A client that only checks the server (a user's dksp --tls) is no member.
    let user = Trust {
        secret: None,
        tls: Some(TlsConfig::client_only(&dir.path().join("ours").join("ca.pem")).expect("ca")),
    };
    let mut c = Client::connect_trusted(&addr, &user)
        .await
        .expect("TLS without a client cert");
    assert!(matches!(c.call(b"PING").await, Ok(Response::Pong)));
    assert_eq!(code(&c.call(b"NEXT").await), Some(ErrorCode::NoAuth));

    // Plain TCP to a TLS port gets nowhere.
    let mut plain = Client::connect(addr.as_str()).await.expect("tcp");
    assert!(plain.call(b"PING").await.is_err());
    stop.cancel();
}

#[tokio::test]
async fn raft_links_under_tls_need_a_cluster_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let ours = tls_trust(&dir.path().join("ours"), "test CA");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let server = ours.clone();
    let accepted = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = server.accept(tcp).await?;
        server.raft_admit(&mut s).await
    });
    let mut c = ours.dial(&addr).await.expect("dial");
    ours.raft_prove(&mut c).await.expect("prove");
    assert!(accepted.await.expect("join").is_ok());
}
