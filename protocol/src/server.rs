//! The accept loop every DKSP server shares: one task per connection, stopped by a
//! cancellation token.

use std::future::Future;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connection::Connection;

/// Accepts connections until `shutdown` fires, running `handle` on each in its own task. Each
/// handler gets a child token that fires on shutdown, so it can finish its reply and close.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    max_line: usize,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(Connection, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let conn = Connection::new(stream, max_line);
                    tokio::spawn(handle(conn, shutdown.child_token()));
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
