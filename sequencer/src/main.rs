//! The `sequencer` process: parses the flags, opens the state file, and either writes a
//! `--reset-to` mark and exits, or starts the [`Oracle`] and serves DKSP until SIGINT or
//! SIGTERM. A state file it cannot trust (unreadable, corrupt) stops it with a one-line reason
//! before it listens: timestamps handed out from a guessed mark could repeat ones already
//! issued.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use sequencer::{server, Oracle, StateFile};

/// The dtkv sequencer: strictly increasing transaction timestamps over DKSP.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to serve DKSP on.
    #[arg(long, default_value = "127.0.0.1:10001")]
    listen: String,
    /// Directory for the reserved-mark file.
    #[arg(long, default_value = "data/sequencer")]
    data_dir: PathBuf,
    /// Timestamps reserved per fsync; a crash skips at most this many.
    #[arg(long, default_value_t = 1_000_000)]
    window: u64,
    /// Longest request line accepted, in bytes.
    #[arg(long, default_value_t = protocol::DEFAULT_MAX_LINE)]
    max_line: usize,
    #[command(flatten)]
    conn: protocol::server::ConnArgs,
    #[command(flatten)]
    trust: protocol::trust::TrustArgs,
    /// Write this reserved mark and exit (recovery from a corrupt state file). Refused if a
    /// readable mark is higher, or if it is 2^64-1 (no timestamp would be left to hand out).
    #[arg(long)]
    reset_to: Option<u64>,
}

// glibc's malloc showed as ~12% of the kvstore's CPU under write load (many small,
// short-lived buffers and Bytes across threads); mimalloc's thread-local free lists are cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    protocol::server::init_logging();
    let args = Args::parse();
    let state = StateFile::open(&args.data_dir)?;
    if let Some(mark) = args.reset_to {
        anyhow::ensure!(
            mark < u64::MAX,
            "refusing --reset-to {mark}: timestamps are handed out above the mark and {mark} is \
             the last one, so the sequencer would start exhausted"
        );
        if let Ok(old) = state.load() {
            anyhow::ensure!(
                old <= mark,
                "refusing to lower the reserved mark from {old} to {mark}"
            );
        }
        state.store(mark)?;
        println!("reserved mark set to {mark} in {}", state.path().display());
        return Ok(());
    }
    let trust = args.trust.load()?;
    tracing::info!("cluster members are trusted by {}", trust.describe());
    let oracle = Oracle::start(state, args.window)?;
    if oracle.current() == u64::MAX {
        tracing::error!(
            "the timestamp space is exhausted (mark is 2^64-1): every NEXT will answer \
             ERR UNAVAILABLE; the store needs a new timestamp domain (a fresh cluster)"
        );
    }
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        "sequencer listening on {}, data in {}, resuming after {}",
        listener.local_addr()?,
        args.data_dir.display(),
        oracle.current()
    );
    let shutdown = CancellationToken::new();
    let mut opts = args.conn.options(args.max_line, 256, 0);
    opts.trust = trust;
    // Only members may take timestamps; before the handshake, PING alone is answered.
    opts.port = protocol::server::Port::Cluster { status_open: false };
    let serving = tokio::spawn(protocol::server::serve_with(
        listener,
        opts,
        shutdown.clone(),
        move |conn, token| server::handle(conn, oracle.clone(), token),
    ));
    protocol::server::shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = serving.await;
    Ok(())
}
