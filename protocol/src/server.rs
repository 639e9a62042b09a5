//! The accept loop every DKSP server shares: one task per connection, stopped by a
//! cancellation token, with the limits of [`ConnArgs`]:
//!
//! - at most `--max-connections` at once: one more is answered
//!   `ERR UNAVAILABLE too many connections (limit N)` and closed, without a task of its own
//!   beyond a short, bounded drain (at most [`MAX_REFUSING`] of those at once; past that a
//!   connection is closed without the line);
//! - the read-buffer budget, handshake and idle timeouts of [`ConnLimits`], per connection;
//! - the soft open-file limit raised to the hard one at start, and `--max-connections` kept
//!   [`FD_HEADROOM`] below it, so accepting never runs the process out of descriptors for its
//!   data files and its own outgoing links.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::connection::{ConnLimits, Connection, ReadBudget};
use crate::trust::Trust;

/// Descriptors kept free for what a server opens besides client connections (data files, log
/// segments, Raft peer links, its own connections to the sequencer and log).
pub const FD_HEADROOM: u64 = 128;

/// After this many bytes of read buffers were freed, the allocator is asked to give free
/// memory back to the OS (at most once per `RECLAIM_EVERY`).
pub const RECLAIM_AFTER: usize = 16 << 20;
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

/// Refused connections being told so at once; more are closed without the `ERR` line.
pub const MAX_REFUSING: usize = 32;

/// How long a refused connection is given to read its `ERR` line.
const REFUSE_LINGER: Duration = Duration::from_millis(500);

/// Everything [`serve_with`] enforces.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The longest request line accepted (`--max-line`).
    pub max_line: usize,
    /// Connections beyond this many are refused with one `ERR` line (`--max-connections`).
    pub max_connections: usize,
    /// What each accepted connection enforces.
    pub limits: ConnLimits,
    /// TLS for accepted connections, and the cluster secret for [`Port::Cluster`].
    pub trust: Trust,
    /// Who the port serves.
    pub port: Port,
}

/// Who a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Clients: every line goes to the handler (the kvstore authenticates its users itself).
    Client,
    /// Cluster members only (the sequencer, a logserver's DKSP port): connections go behind a
    /// [`crate::trust::Gate`].
    Cluster {
        /// Whether `STATUS` is answered before membership (the handler then answers a
        /// minimal one; see [`Connection::is_member`]).
        status_open: bool,
    },
}

impl ServeOptions {
    /// Only the line limit: no connection cap, budget or timeouts (tests, embedding).
    pub fn unlimited(max_line: usize) -> Self {
        ServeOptions {
            max_line,
            max_connections: usize::MAX >> 4,
            limits: ConnLimits::default(),
            trust: Trust::none(),
            port: Port::Client,
        }
    }
}

/// The connection flags every server has. The defaults that differ by server (the kvstore
/// serves many clients, the sequencer and logserver a few kvstores) are given to
/// [`ConnArgs::options`].
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Most client connections at once; one more is answered `ERR UNAVAILABLE too many
    /// connections` and closed. Default 1024 for the kvstore, 256 for the sequencer and
    /// logserver; lowered (with a warning) to the open-file limit minus 128.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// MiB all connections together may hold in unfinished request lines; a line that would
    /// go past it is refused with `ERR UNAVAILABLE` and its connection closed.
    #[arg(long, default_value_t = 256)]
    pub max_read_buffer_mib: usize,
    /// Close a connection that has not sent one complete line this many seconds after
    /// connecting (0: never).
    #[arg(long, default_value_t = 30)]
    pub handshake_timeout_secs: u64,
    /// Close a connection that has neither sent nor been sent anything for this many seconds
    /// (0: never). Default 3600 for the kvstore (at least its --txn-timeout-secs), 0 for the
    /// sequencer and logserver, whose clients (kvstores) keep connections idle by design.
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
}

impl ConnArgs {
    /// Raises the open-file limit and turns the flags into [`ServeOptions`], with this
    /// server's defaults for the flags not given.
    pub fn options(
        &self,
        max_line: usize,
        default_max_connections: usize,
        default_idle_secs: u64,
    ) -> ServeOptions {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let wanted = self
            .max_connections
            .unwrap_or(default_max_connections)
            .max(1);
        let max_connections = match raise_nofile_limit() {
            Ok(nofile) => clamp_connections(wanted, nofile),
            Err(e) => {
                tracing::warn!("cannot read or raise the open-file limit: {e}");
                wanted
            }
        };
        ServeOptions {
            max_line,
            max_connections,
            limits: ConnLimits {
                handshake_timeout: secs(self.handshake_timeout_secs),
                idle_timeout: secs(self.idle_timeout_secs.unwrap_or(default_idle_secs)),
                read_budget: Some(ReadBudget::new(
                    self.max_read_buffer_mib.saturating_mul(1 << 20),
                )),
            },
            trust: Trust::none(),
            port: Port::Client,
        }
    }
}

/// `wanted`, or less if the open-file limit `nofile` cannot hold that many connections and
/// [`FD_HEADROOM`] more (then at least 1, or half the limit if that is very low).
pub fn clamp_connections(wanted: usize, nofile: u64) -> usize {
    let room = if nofile > FD_HEADROOM * 2 {
        nofile - FD_HEADROOM
    } else {
        (nofile / 2).max(1)
    };
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if wanted > room {
        tracing::warn!(
            "--max-connections {wanted} lowered to {room}: the open-file limit is {nofile} \
             and {FD_HEADROOM} descriptors are kept for data files and peer links"
        );
        room
    } else {
        wanted
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the default soft limit, often 1024 or
/// less, is what a few hundred idle connections exhaust). Returns the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                let e = std::io::Error::last_os_error();
                tracing::warn!("cannot raise the open-file limit from {before}: {e}");
                return Ok(before);
            }
            tracing::info!("open-file limit raised from {before} to {}", lim.rlim_cur);
        }
        Ok(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        Ok(u64::MAX)
    }
}

/// Accepts connections until `shutdown` fires, running `handle` on each in its own task, with
/// only the line limit enforced (see [`serve_with`]).
pub async fn serve<F, Fut>(
    listener: TcpListener,
    max_line: usize,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(Connection, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with(
        listener,
        ServeOptions::unlimited(max_line),
        shutdown,
        handle,
    )
    .await
}

/// Accepts connections until `shutdown` fires, running `handle` on each in its own task. Each
/// handler gets a child token that fires on shutdown, so it can finish its reply and close.
/// Connections past `opts.max_connections` are refused (see the module comment). Under TLS the
/// handshake runs in the connection's task, bounded by [`crate::trust::HANDSHAKE_TIMEOUT`]; on a
/// [`Port::Cluster`] the connection goes behind its [`crate::trust::Gate`].
pub async fn serve_with<F, Fut>(
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(Connection, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let reclaimer = tokio::spawn(reclaim_memory(shutdown.clone()));
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let refusal = format!(
        "ERR UNAVAILABLE too many connections (limit {})\n",
        opts.max_connections
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                reclaimer.abort();
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!("refusing {peer}: {} connections open", opts.max_connections);
                        if let Ok(permit) = refusing.clone().try_acquire_owned() {
                            tokio::spawn(refuse(stream, refusal.clone().into_bytes(), permit));
                        }
                        continue;
                    };
                    let (trust, port, limits) = (opts.trust.clone(), opts.port, opts.limits.clone());
                    let (max_line, token, handle) = (opts.max_line, shutdown.child_token(), handle.clone());
                    tokio::spawn(async move {
                        let stream = match trust.accept(stream).await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::info!("TLS handshake with {peer} failed: {e}");
                                return;
                            }
                        };
                        let mut conn = Connection::accepted(stream, max_line, limits);
                        if let Port::Cluster { status_open } = port {
                            conn.set_gate(trust.gate(conn.stream(), status_open));
                        }
                        handle(conn, token).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Usually EMFILE; back off rather than spin, and keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

extern "C" {
    /// mimalloc's `mi_collect`: with `force`, frees what the calling thread's heap caches and
    /// returns every arena page awaiting its purge delay to the OS. (Declared here because
    /// `libmimalloc-sys` declares it only with its `extended` feature.)
    fn mi_collect(force: bool);
}

/// Returns the memory of a spike of large lines to the OS. mimalloc gives freed pages back only
/// after a delay, and only when the heap is next active: measured, 1,000 connections that held
/// 1 MB partial lines and closed left the process at 1,024 MiB RSS indefinitely, while a forced
/// collect brings it back to a few tens of MiB. Runs only after [`RECLAIM_AFTER`] bytes of
/// buffers were freed, so steady traffic never pays for it.
async fn reclaim_memory(shutdown: CancellationToken) {
    use std::sync::atomic::Ordering;
    // Only a binary that links mimalloc (every dtkv server) is asked; the symbol is there in
    // any case, as this crate links libmimalloc-sys.
    use libmimalloc_sys as _;
    let mut tick = tokio::time::interval(RECLAIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if crate::connection::RELEASED.load(Ordering::Relaxed) >= RECLAIM_AFTER {
            crate::connection::RELEASED.store(0, Ordering::Relaxed);
            // SAFETY: mi_collect takes no pointers and may be called from any thread at any
            // time; with another global allocator it only trims mimalloc's own (empty) heap.
            unsafe { mi_collect(true) };
            tracing::debug!("returned freed read buffers to the OS");
        }
    }
}

/// Tells a connection over the cap why it is closed: the line, then EOF, then a short drain of
/// whatever it sent (closing with unread input would reset the connection before the client
/// reads the line).
async fn refuse(mut stream: TcpStream, line: Vec<u8>, _permit: tokio::sync::OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        stream.write_all(&line).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Resolves on SIGINT or SIGTERM, for binaries' graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Logging for the binaries: to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A server's `--threads`: the tokio runtime it runs on.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Threads for the async runtime: 1 runs every task on this one thread (no wake-ups
    /// across threads; measured the cheaper choice on 2 cores, see docs/performance.md),
    /// N > 1 runs N worker threads, 0 one worker per core. Disk syncs and other blocking work
    /// run on threads of their own either way.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

impl RuntimeArgs {
    /// With 1 thread, a single-threaded runtime where every task runs on the calling thread,
    /// so handing work from task to task needs no wake-up of another thread; with N > 1, N
    /// worker threads; with 0, one per core. Blocking work goes to tokio's blocking pool
    /// either way.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = match self.threads {
            1 => tokio::runtime::Builder::new_current_thread(),
            _ => tokio::runtime::Builder::new_multi_thread(),
        };
        if self.threads > 1 {
            b.worker_threads(self.threads);
        }
        b.enable_all().build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_is_kept_below_the_open_file_limit_with_headroom() {
        assert_eq!(clamp_connections(1024, 65_536), 1024);
        assert_eq!(clamp_connections(1024, 1024), 1024 - FD_HEADROOM as usize);
        assert_eq!(clamp_connections(1024, 200), 100);
        assert_eq!(clamp_connections(1024, 1), 1);
    }

    #[test]
    fn the_read_budget_refuses_a_charge_that_would_cross_it_and_takes_releases_back() {
        let b = ReadBudget::new(100);
        assert!(b.try_charge(60));
        assert!(!b.try_charge(41));
        assert_eq!(b.used(), 60);
        assert!(b.try_charge(40));
        b.release(60);
        assert_eq!(b.used(), 40);
        b.release(1000);
        assert_eq!(b.used(), 0);
    }
}
