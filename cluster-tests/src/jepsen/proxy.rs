//! A TCP proxy the test controls, one per directed link between two processes.
//!
//! Every inter-process connection of a [`super::cluster::FaultyCluster`] goes through one of
//! these, so a test can do to a link what a network does: add latency, refuse new connections,
//! cut the live ones, or swallow everything (a partition in which packets vanish and the
//! sender notices only by its own timeouts).
//!
//! Each accepted connection becomes two one-way pipes. A pipe's reader stamps each chunk with
//! its due time (now + the link's delay) and queues it; its writer sends chunks when they are
//! due. So a delay is latency, not a throughput cap, and bytes keep their order. A pipe that
//! reads EOF lets its writer drain and then closes the whole connection: half-closed
//! connections are not something DKSP or the Raft transport rely on.
//!
//! A blackholed connection has lost bytes from the middle of its stream, which TCP itself never
//! does, so healing a blackhole cuts every connection that was open during it.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a link does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward (after the link's delay).
    Pass = 0,
    /// Close new connections at once and cut the live ones (the peer sees resets).
    Refuse = 1,
    /// Accept and keep connections, but forward nothing in either direction.
    Blackhole = 2,
}

struct Shared {
    name: String,
    target: SocketAddr,
    mode: AtomicU8,
    delay_us: AtomicU64,
    /// Cancelled to cut every live connection; replaced by a fresh token each time.
    live: Mutex<CancellationToken>,
    /// Cancelled when the proxy is dropped.
    shutdown: CancellationToken,
}

impl Shared {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            0 => Mode::Pass,
            1 => Mode::Refuse,
            _ => Mode::Blackhole,
        }
    }
}

/// A proxy listening on `addr` and forwarding to its target. Dropping it stops it and closes
/// its connections.
pub struct Proxy {
    /// Where clients of the proxied link connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port, on the current tokio runtime.
    pub async fn start(name: &str, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            name: name.to_string(),
            target,
            mode: AtomicU8::new(Mode::Pass as u8),
            delay_us: AtomicU64::new(0),
            live: Mutex::new(CancellationToken::new()),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy { addr, shared }
    }

    /// The link's name, for events and reports.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// What the proxy does with traffic now.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Sets the mode. Entering `Refuse` cuts the live connections; leaving `Blackhole` does
    /// too (their streams have holes).
    pub fn set_mode(&self, mode: Mode) {
        let old = self.shared.mode();
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
        if mode == Mode::Refuse || (old == Mode::Blackhole && mode != Mode::Blackhole) {
            self.cut();
        }
    }

    /// One-way latency added to every chunk from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// The one-way latency added now.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.shared.delay_us.load(Ordering::SeqCst))
    }

    /// Closes every live connection; new ones are accepted as the mode says.
    pub fn cut(&self) {
        let mut live = self.shared.live.lock().unwrap();
        live.cancel();
        *live = CancellationToken::new();
    }

    /// Back to a plain pipe: `Pass`, no delay.
    pub fn heal(&self) {
        self.set_mode(Mode::Pass);
        self.set_delay(Duration::ZERO);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = tokio::select! {
        biased;
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        if shared.mode() == Mode::Refuse {
            drop(client);
            continue;
        }
        let conn = shared.live.lock().unwrap().child_token();
        tokio::spawn(connection(client, shared.clone(), conn));
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>, conn: CancellationToken) {
    // A refused dial to the target (a stopped process) is passed on as a closed connection.
    let server = tokio::select! {
        biased;
        _ = conn.cancelled() => return,
        r = TcpStream::connect(shared.target) => match r {
            Ok(s) => s,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pipe(cr, sw, shared.clone(), conn.clone()));
    let down = tokio::spawn(pipe(sr, cw, shared, conn.clone()));
    // Either direction ending ends the connection; dropping the halves closes both sockets.
    conn.cancelled().await;
    let _ = up.await;
    let _ = down.await;
}

async fn pipe(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    shared: Arc<Shared>,
    conn: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let reader = {
        let shared = shared.clone();
        let conn = conn.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::select! {
                biased;
                            _ = conn.cancelled() => return,
                            r = rd.read(&mut buf) => match r {
                                Ok(0) | Err(_) => return, // drops tx: the writer drains, then closes
                                Ok(n) => n,
                            },
                        };
                if shared.mode() == Mode::Blackhole {
                    continue;
                }
                let due =
                    Instant::now() + Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
                if tx.send((due, Bytes::copy_from_slice(&buf[..n]))).is_err() {
                    return;
                }
            }
        }
    };
    let writer = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if shared.mode() == Mode::Blackhole {
                continue; // queued before the partition, still in flight when it began
            }
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        biased;
        _ = conn.cancelled() => {}
        _ = async { tokio::join!(reader, writer) } => {}
    }
    conn.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn passes_delays_cuts_refuses_and_blackholes() {
        let p = Proxy::start("test", echo_server().await).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");

        // Delay: both directions are delayed, so a round trip takes at least twice the delay.
        p.set_delay(Duration::from_millis(30));
        let t = std::time::Instant::now();
        assert_eq!(roundtrip(&mut s, b"slow").await.unwrap(), b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(60),
            "{:?}",
            t.elapsed()
        );
        p.set_delay(Duration::ZERO);

        // Cut: the live connection is closed, a new one works.
        p.cut();
        assert!(roundtrip(&mut s, b"x").await.is_err());
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"again").await.unwrap(), b"again");

        // Refuse: live connections closed, new ones closed at once.
        p.set_mode(Mode::Refuse);
        assert!(roundtrip(&mut s, b"x").await.is_err());
        let mut s2 = TcpStream::connect(p.addr).await.unwrap();
        assert!(roundtrip(&mut s2, b"x").await.is_err());
        p.heal();

        // Blackhole: nothing comes back while it lasts; healing cuts the connection.
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"before").await.unwrap(), b"before");
        p.set_mode(Mode::Blackhole);
        s.write_all(b"lost").await.unwrap();
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        assert!(read.is_err(), "a blackholed link answered: {read:?}");
        p.heal();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"after").await.unwrap(), b"after");
    }
}
