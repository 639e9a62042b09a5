//! The `kvstore` process: parses and checks the flags, binds its port, starts the [`Engine`]
//! (which recovers from the log in the background, answering `ERR UNAVAILABLE` meanwhile) and
//! serves DKSP until SIGINT or SIGTERM, or until recovery fails in a way retrying cannot fix
//! (the sequencer behind the log, a takeover while starting, a log record or checkpoint no
//! kvstore wrote, met while starting or while serving): then it exits 1 with the one-line
//! reason. It keeps nothing on disk.

use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use kvstore::engine::{Config, Engine};
use kvstore::limits::{Budget, Limits};
use kvstore::server::{AuthConfig, ClientAuth};
use kvstore::users::Users;
use std::sync::Arc;

/// The dtkv kvstore: MVCC transactions with snapshot isolation over DKSP. It keeps no durable
/// state: commits go to the logserver, and it rebuilds itself from the log on start.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to serve DKSP on.
    #[arg(long, default_value = "127.0.0.1:10000")]
    listen: String,
    /// The sequencer's address.
    #[arg(long, default_value = "127.0.0.1:10001")]
    sequencer: String,
    /// The logserver replicas' DKSP addresses, comma-separated.
    #[arg(
        long,
        default_value = "127.0.0.1:10002,127.0.0.1:10012,127.0.0.1:10022"
    )]
    log: String,
    /// Write a checkpoint to the log after this many commits...
    #[arg(long, default_value_t = 100_000)]
    checkpoint_every: u64,
    /// ...or after this many MiB of log entries, whichever comes first (large values make
    /// few commits weigh many bytes, and replay time follows the bytes).
    #[arg(long, default_value_t = 64)]
    checkpoint_mib: u64,
    /// ...but not before the log since the last checkpoint holds this fraction of that
    /// checkpoint's size: with a large store, checkpoints then cost at most 1/ratio bytes
    /// written per byte of commits (0 checkpoints on the two triggers alone).
    #[arg(long, default_value_t = 0.5, value_parser = parse_ratio)]
    checkpoint_ratio: f64,
    /// Abort a transaction idle for this many seconds.
    #[arg(long, default_value_t = 60)]
    txn_timeout_secs: u64,
    /// Abort a transaction whose snapshot is older than this many seconds, busy or not, so
    /// garbage collection always progresses (`ABORTED TOO_OLD`); a `SCAN` streaming to a slow
    /// reader ends with an `ERR` line then.
    #[arg(long, default_value_t = kvstore::limits::DEFAULT_MAX_SNAPSHOT_AGE_SECS)]
    max_snapshot_age_secs: u64,
    /// Largest write set of one transaction, in bytes of keys plus values plus 16 per write (a DEL counts its
    /// key): a PUT/DEL past it answers ERR TOO_LARGE (and aborts the transaction).
    #[arg(long, default_value_t = kvstore::limits::DEFAULT_MAX_TXN_BYTES)]
    max_txn_bytes: usize,
    /// MiB that all open transactions (and pipelined autocommit writes not yet answered) may
    /// buffer together; a transaction's write past it answers ERR UNAVAILABLE and aborts the
    /// transaction. At least --max-txn-bytes.
    #[arg(long, default_value_t = kvstore::limits::DEFAULT_MAX_BUFFERED_MIB)]
    max_buffered_mib: usize,
    /// A commit not durable in the log within this many seconds (no log majority, full
    /// disks) is answered `ERR UNAVAILABLE commit outcome unknown: ...` instead of waiting on.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    commit_timeout_secs: u64,
    /// Log entries the committer sends without waiting for the log's reply to the one before,
    /// each holding whatever commits are queued (1: the next entry waits for the last reply,
    /// unless that entry was full).
    #[arg(long, default_value_t = kvstore::engine::DEFAULT_LOG_PIPELINE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=8))]
    log_pipeline: usize,
    /// Longest request line accepted, in bytes.
    #[arg(long, default_value_t = protocol::DEFAULT_MAX_LINE)]
    max_line: usize,
    /// The users file (see docs/operations.md; made with `dtkv-admin user add`). With it,
    /// clients must `AUTH` and get only the keys their grants allow; without it, the kvstore
    /// serves loopback clients only (protected mode) unless --no-protected-mode. Reloaded on
    /// SIGHUP (a file that does not load is logged and the old users stay).
    #[arg(long)]
    users: Option<std::path::PathBuf>,
    /// Close a connection at its Nth failed AUTH.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    max_auth_failures: u32,
    /// Answer a failed AUTH only after this many milliseconds, to slow down guessing.
    #[arg(long, default_value_t = 250)]
    auth_fail_delay_ms: u64,
    /// With no --users, serve clients from any address, not only loopback: an open store,
    /// for a trusted network only.
    #[arg(long)]
    no_protected_mode: bool,
    #[command(flatten)]
    conn: protocol::server::ConnArgs,
    /// Do not follow the log with TAIL. A newer kvstore taking over is then noticed only at
    /// this one's next commit (for tests of that path, and for diagnosis).
    #[arg(long)]
    no_tail: bool,
    /// Diagnostic: record per-hop timestamps of a sample of commits (at most one per ms, in a
    /// bounded ring of 65,536 marks) for the `HOPS` command; see docs/performance.md "Where a
    /// commit's time goes".
    #[arg(long, hide = true)]
    trace_hops: bool,
    #[command(flatten)]
    trust: protocol::trust::TrustArgs,
    #[command(flatten)]
    runtime: protocol::server::RuntimeArgs,
}

// glibc's malloc showed as ~12% of the kvstore's CPU under write load (many small,
// short-lived buffers and Bytes across threads); mimalloc's thread-local free lists are cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    protocol::server::init_logging();
    let args = Args::parse();
    args.runtime
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.trace_hops {
        protocol::hops::enable();
        tracing::info!("--trace-hops: recording per-hop timestamps of sampled commits for HOPS");
    }
    let log: Vec<String> = args
        .log
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    anyhow::ensure!(
        !log.is_empty(),
        "--log needs at least one logserver address"
    );
    let trust = args.trust.load()?;
    tracing::info!(
        "the sequencer and the log are dialled with {}; clients connect {}",
        trust.describe(),
        if trust.tls.is_some() {
            "under TLS"
        } else {
            "in plain TCP"
        }
    );
    let auth = Arc::new(client_auth(&args).await?);
    #[cfg(unix)]
    if let (Some(path), Some(_)) = (&args.users, &auth.users) {
        // Registered before serving, so no SIGHUP after the first client can kill the process.
        use tokio::signal::unix::{signal, SignalKind};
        let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(reload_on_sighup(hup, path.clone(), auth.clone()));
    }
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    if auth.users.is_none() && auth.protected && !local.ip().to_canonical().is_loopback() {
        tracing::warn!(
            "listening on {local} in protected mode: clients from other hosts will be refused \
             until users are configured (--users)"
        );
    }
    let engine = Engine::start(Config {
        sequencer: args.sequencer.clone(),
        log,
        checkpoint_every: args.checkpoint_every.max(1),
        checkpoint_bytes: args.checkpoint_mib.max(1) << 20,
        checkpoint_ratio: args.checkpoint_ratio,
        follow_log: !args.no_tail,
        commit_timeout: Duration::from_secs(args.commit_timeout_secs),
        log_pipeline: args.log_pipeline,
        trust: trust.clone(),
    });
    tracing::info!(
        "kvstore listening on {}; sequencer {}, log {}",
        listener.local_addr()?,
        args.sequencer,
        args.log
    );
    anyhow::ensure!(
        args.max_buffered_mib.max(1).saturating_mul(1 << 20) >= args.max_txn_bytes,
        "--max-buffered-mib ({} MiB) must hold at least one transaction of --max-txn-bytes ({} bytes)",
        args.max_buffered_mib,
        args.max_txn_bytes
    );
    let limits = Arc::new(Limits {
        idle_timeout: Duration::from_secs(args.txn_timeout_secs.max(1)),
        max_snapshot_age: Duration::from_secs(args.max_snapshot_age_secs.max(1)),
        max_txn_bytes: args.max_txn_bytes.max(1),
        budget: Budget::new(args.max_buffered_mib.max(1).saturating_mul(1 << 20)),
    });
    let shutdown = CancellationToken::new();
    let serving_engine = engine.clone();
    let mut opts = args
        .conn
        .options(args.max_line, 1024, 3600.max(args.txn_timeout_secs));
    // TLS for clients when configured; users authenticate with AUTH, not the cluster gate.
    opts.trust = trust;
    let serving = tokio::spawn(protocol::server::serve_with(
        listener,
        opts,
        shutdown.clone(),
        move |conn, token| {
            kvstore::server::handle(
                conn,
                serving_engine.clone(),
                limits.clone(),
                auth.clone(),
                token,
            )
        },
    ));
    // A recovery that cannot succeed stops the process with its reason (one line).
    let stopped = tokio::select! {
        () = protocol::server::shutdown_signal() => None,
        err = engine.stopped() => Some(err),
    };
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = serving.await;
    if let Some(err) = stopped {
        // One line, whatever RUST_BACKTRACE says: this is the operator's answer, not a bug.
        eprintln!("Error: {err}");
        std::process::exit(1);
    }
    Ok(())
}

/// `--users` and protected mode: who may use the kvstore. Loads and checks the users file
/// (a bad file stops the start, naming the line), and says at start which mode it runs in.
async fn client_auth(args: &Args) -> anyhow::Result<ClientAuth> {
    let Some(path) = &args.users else {
        if args.no_protected_mode {
            tracing::warn!(
                "--no-protected-mode without --users: ANY client that can reach {} may read \
                 and write every key; use this on a trusted network only",
                args.listen
            );
        } else {
            tracing::info!(
                "protected mode: no users are configured (--users), so only loopback clients \
                 are served (see docs/operations.md)"
            );
        }
        return Ok(ClientAuth {
            users: None,
            protected: !args.no_protected_mode,
        });
    };
    let users = Users::load(path).context("loading --users")?;
    if users.is_empty() {
        tracing::warn!(
            "{} has no users: no client can AUTH, so no command but PING will work",
            path.display()
        );
    }
    let users = Arc::new(users);
    // The dummy hash for unknown names, made now so the first such AUTH is not slower.
    let prepared = users.clone();
    tokio::task::spawn_blocking(move || prepared.prepare())
        .await
        .context("preparing the password checker")?;
    tracing::info!(
        "{} users from {}; clients must AUTH (at most {} failures per connection, {} ms \
         delay after each)",
        users.len(),
        path.display(),
        args.max_auth_failures,
        args.auth_fail_delay_ms
    );
    Ok(ClientAuth {
        users: Some(AuthConfig::new(
            users,
            args.max_auth_failures,
            Duration::from_millis(args.auth_fail_delay_ms),
            AuthConfig::default_verifies(),
        )),
        protected: !args.no_protected_mode,
    })
}

/// Reloads `--users` on every SIGHUP. A file that does not load is logged and the users
/// loaded before stay, so a typo never locks everyone out (or in).
#[cfg(unix)]
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: std::path::PathBuf,
    auth: Arc<ClientAuth>,
) {
    let Some(config) = &auth.users else { return };
    while hup.recv().await.is_some() {
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let users = Users::load(&p)?;
            users.prepare();
            Ok::<_, kvstore::users::UsersError>(users)
        })
        .await;
        match loaded {
            Ok(Ok(users)) => {
                let n = users.len();
                config.replace_users(Arc::new(users));
                tracing::info!("SIGHUP: reloaded {n} users from {}", path.display());
            }
            Ok(Err(e)) => tracing::error!(
                "SIGHUP: reloading --users failed, keeping the {} users loaded before: {e}",
                config.users().len()
            ),
            Err(e) => tracing::error!("SIGHUP: reloading --users failed: {e}"),
        }
    }
}

/// `--checkpoint-ratio`: a finite number from 0 to 100 (an infinite or NaN ratio would stop
/// checkpoints, and with them log compaction, for good).
fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=100.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number from 0 to 100")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn checkpoint_ratio_must_be_finite_and_in_range() {
        assert_eq!(super::parse_ratio("0.5"), Ok(0.5));
        assert_eq!(super::parse_ratio("0"), Ok(0.0));
        for bad in ["inf", "NaN", "-1", "1e309", "101", "x"] {
            assert!(super::parse_ratio(bad).is_err(), "{bad}");
        }
    }
}
