//! The `logserver` process, one replica: parses the flags, opens the log store and the state
//! machine (refusing to start when Raft state exists without its vote file, which could let it
//! vote twice in one term), starts Raft and its network, initialises the group on `--init`
//! (only on a replica that has never held state), and serves DKSP until SIGINT or SIGTERM, or
//! until Raft stops (a failed disk write): a replica is either fully working or gone.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use logserver::log_store::LogStore;
use logserver::server::{parse_peers, Batcher, LogServer};
use logserver::state_machine::StateMachine;
use logserver::types::{NodeId, Raft};

/// The dtkv logserver: one replica of the durable write-ahead log, replicated with Raft.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// This replica's id (a member of --peers).
    #[arg(long)]
    id: NodeId,
    /// Address to serve DKSP on.
    #[arg(long, default_value = "127.0.0.1:10002")]
    listen: String,
    /// Address for Raft traffic from the other replicas.
    #[arg(long, default_value = "127.0.0.1:10003")]
    raft_listen: String,
    /// Directory for this replica's log, vote and snapshot.
    #[arg(long, default_value = "data/log-1")]
    data_dir: PathBuf,
    /// The initial group: `id=raft_addr/dksp_addr,...` (used by --init).
    #[arg(long, default_value = "")]
    peers: String,
    /// Initialise the group from --peers if this replica has never held any state. Give it to
    /// one replica, on the group's first start only; a replica with state ignores it.
    #[arg(long)]
    init: bool,
    /// Leader heartbeat, ms (also openraft's deadline for each replication call; an append
    /// that takes longer keeps going in the background, see --raft-min-rate).
    #[arg(long, default_value_t = 50)]
    heartbeat_ms: u64,
    /// Election timeout range, ms: a follower that hears no leader for this long campaigns.
    #[arg(long, default_value_t = 250)]
    election_min_ms: u64,
    #[arg(long, default_value_t = 450)]
    election_max_ms: u64,
    /// Take a snapshot after this many Raft entries (besides after every checkpoint).
    #[arg(long, default_value_t = 20_000)]
    snapshot_every: u64,
    /// Raft entries kept after a snapshot, for followers that are slightly behind.
    #[arg(long, default_value_t = 5_000)]
    keep_after_snapshot: u64,
    /// Batches of writes in flight at once (group commit).
    #[arg(long, default_value_t = 4)]
    max_inflight: usize,
    /// Longest request line accepted, in bytes. The default (8 MiB) holds the `APPEND` of any
    /// transaction the kvstore accepts by default; a smaller limit makes the log refuse large
    /// commits (the kvstore answers them `ABORTED TOO_LARGE`).
    #[arg(long, default_value_t = protocol::log::LOG_MAX_LINE)]
    max_line: usize,
    #[command(flatten)]
    conn: protocol::server::ConnArgs,
    /// Bytes of log entries per Raft AppendEntries (at least one entry is always sent).
    #[arg(long, default_value_t = logserver::network::DEFAULT_APPEND_BYTES)]
    raft_append_bytes: usize,
    /// Slowest replica-to-replica transfer rate assumed, bytes/s: a Raft append of N bytes is
    /// given up on after heartbeat + N / rate.
    #[arg(long, default_value_t = logserver::network::DEFAULT_MIN_RATE)]
    raft_min_rate: u64,
    /// Raft appends in flight per follower at once (1 = wait for each reply before the next).
    #[arg(long, default_value_t = logserver::pipeline::DEFAULT_DEPTH)]
    raft_pipeline_depth: usize,
    /// For measurement: while following, hand each append's fdatasync to the flusher thread
    /// as the leader does, instead of doing it on the Raft thread (which saves two thread
    /// wake-ups per replication round: measured 2026-12-02, a follower's flush to its ack at
    /// the leader took 37-55 µs at p50 instead of 60-77 µs).
    #[arg(long, hide = true)]
    follower_sync_on_flusher: bool,
    /// Bytes per snapshot chunk sent to a replica that must catch up from a snapshot.
    #[arg(long, default_value_t = logserver::network::DEFAULT_SNAPSHOT_CHUNK)]
    snapshot_chunk_bytes: usize,
    /// Seconds allowed for each snapshot chunk to reach a replica and be stored.
    #[arg(long, default_value_t = 10)]
    snapshot_chunk_timeout_secs: u64,
    /// Largest checkpoint a client may upload, MiB. Every replica holds the upload in
    /// memory (staged) and in its Raft log until it is committed; a chunk past this answers
    /// `ERR TOO_LARGE`. A 1M-key kvstore makes a checkpoint of about 115 MB.
    #[arg(long, default_value_t = 1024)]
    max_checkpoint_mib: u64,
    /// Accept `APPEND` payloads that are not kvstore records (by default each is parsed as the
    /// kvstore's `EPOCH`/`COMMIT` lines and refused `ERR REJECTED` if it is not): for tests and
    /// benchmarks of the log alone.
    #[arg(long)]
    any_payload: bool,
    /// Testing hook: after this many bytes of Raft log records, every log write fails with
    /// ENOSPC, as on a full disk.
    #[arg(long, hide = true)]
    fail_writes_after_bytes: Option<u64>,
    /// Testing hook: `id=addr,...` dials `addr` for Raft traffic to peer `id` instead of the
    /// address in the membership (the fault-injection tests route each link through a proxy).
    #[arg(long, default_value = "")]
    raft_route: String,
    /// Diagnostic: record per-hop timestamps of every log entry (a bounded ring of 65,536
    /// marks) for the `HOPS` command; see docs/performance.md "Where a commit's time goes".
    #[arg(long, hide = true)]
    trace_hops: bool,
    #[command(flatten)]
    runtime: protocol::server::RuntimeArgs,
    #[command(flatten)]
    trust: protocol::trust::TrustArgs,
}

// As in the kvstore: glibc's malloc was a large share of CPU under write load (many small,
// short-lived buffers and Bytes); mimalloc's thread-local free lists are cheaper.
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
        tracing::info!("--trace-hops: recording per-hop timestamps for HOPS");
    }
    let trust = args.trust.load()?;
    tracing::info!("cluster members are trusted by {}", trust.describe());
    let peers = parse_peers(&args.peers).map_err(anyhow::Error::msg)?;
    let routes = parse_routes(&args.raft_route).map_err(anyhow::Error::msg)?;
    let config = openraft::Config {
        cluster_name: "dtkv-log".into(),
        heartbeat_interval: args.heartbeat_ms,
        election_timeout_min: args.election_min_ms,
        election_timeout_max: args.election_max_ms,
        install_snapshot_timeout: args.snapshot_chunk_timeout_secs.saturating_mul(1000),
        snapshot_max_chunk_size: u64::try_from(args.snapshot_chunk_bytes)
            .context("--snapshot-chunk-bytes")?,
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(args.snapshot_every),
        max_in_snapshot_log_to_keep: args.keep_after_snapshot,
        purge_batch_size: 256,
        ..Default::default()
    }
    .validate()
    .context("invalid Raft timing options")?;

    anyhow::ensure!(
        args.raft_append_bytes > 0
            && args.snapshot_chunk_bytes > 0
            && args.raft_min_rate > 0
            && args.raft_pipeline_depth > 0,
        "--raft-append-bytes, --snapshot-chunk-bytes, --raft-min-rate and \
         --raft-pipeline-depth must be positive"
    );
    let net = logserver::network::NetConfig {
        append_bytes: args.raft_append_bytes,
        min_rate: args.raft_min_rate,
        max_frame: logserver::network::max_frame(
            args.max_line,
            args.raft_append_bytes,
            args.snapshot_chunk_bytes,
        ),
        pipeline_depth: args.raft_pipeline_depth,
        trust: trust.clone(),
    };
    let max_frame = net.max_frame;

    let log = LogStore::open(&args.data_dir.join("raft"))?;
    let pristine = log.is_pristine();
    // openraft saves the vote before it accepts any entry or snapshot from a leader, so Raft
    // state without a vote means the vote file was lost. Starting would let this replica vote
    // again in a term it already voted in: two leaders in one term. Refuse (crash-only).
    let snapshot_path = args.data_dir.join("snapshot");
    if !log.has_vote() && (!pristine || snapshot_path.exists()) {
        anyhow::bail!(
            "{}: the vote file is missing but this replica holds Raft state (log entries, a \
             purge record or {}); refusing to start, as it could vote twice in one term and let \
             two leaders be elected. To rebuild this replica from the others, stop it, move \
             {} away (or wipe it) and start it again empty: it rejoins as a new copy",
            args.data_dir.join("raft").join("vote").display(),
            snapshot_path.display(),
            args.data_dir.display()
        );
    }
    let sm = StateMachine::open(&args.data_dir)
        .with_context(|| format!("loading the snapshot in {}", args.data_dir.display()))?;

    let dksp = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let raft_listener = TcpListener::bind(&args.raft_listen)
        .await
        .with_context(|| format!("binding {}", args.raft_listen))?;

    if let Some(bytes) = args.fail_writes_after_bytes {
        tracing::warn!("testing hook: Raft log writes fail with ENOSPC after {bytes} bytes");
        log.fail_writes_after_bytes(bytes);
    }
    let raft_addr = raft_listener.local_addr()?;
    let gate = log.flush_gate();
    if !args.follower_sync_on_flusher {
        log.sync_inline_when_following(args.id);
    }
    let raft: Raft = Raft::new(
        args.id,
        Arc::new(config),
        logserver::network::Network {
            routes,
            config: net,
            feed: Some(log.feed()),
        },
        log,
        sm.clone(),
    )
    .await
    .context("starting Raft")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(exit_when_raft_stops(raft.clone(), shutdown.clone()));
    tokio::spawn(logserver::network::serve(
        raft_listener,
        raft.clone(),
        shutdown.clone(),
        max_frame,
        trust.clone(),
    ));

    if args.init {
        if !pristine {
            tracing::info!("--init ignored: this replica already has state");
        } else {
            anyhow::ensure!(
                peers.contains_key(&args.id),
                "--init needs --peers that include this replica's id {}",
                args.id
            );
            match raft.initialize(peers.clone()).await {
                Ok(()) => tracing::info!("initialised the group with {} replicas", peers.len()),
                Err(e) => tracing::warn!("initialise: {e}"),
            }
        }
    }

    let srv = Arc::new(LogServer {
        id: args.id,
        raft: raft.clone(),
        sm,
        batcher: Batcher::start(raft.clone(), args.max_inflight, Some(gate)),
        max_checkpoint_bytes: args.max_checkpoint_mib.saturating_mul(1024 * 1024),
        check_payloads: !args.any_payload,
    });
    if args.any_payload {
        tracing::warn!("--any-payload: APPEND takes payloads that are not kvstore records");
    }
    tracing::info!(
        "logserver {} serving DKSP on {}, Raft on {}, data in {}",
        args.id,
        dksp.local_addr()?,
        raft_addr,
        args.data_dir.display()
    );
    let mut opts = args.conn.options(args.max_line, 256, 0);
    opts.trust = trust;
    opts.port = protocol::server::Port::Cluster { status_open: true };
    let serving = tokio::spawn(protocol::server::serve_with(
        dksp,
        opts,
        shutdown.clone(),
        move |conn, token| logserver::server::handle(conn, srv.clone(), token),
    ));
    protocol::server::shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = serving.await;
    let _ = raft.shutdown().await;
    Ok(())
}

/// Crash-only: once openraft's core stops by itself (a storage error such as a full disk, or
/// any other fatal error), this replica can no longer take part in Raft, and staying up would
/// leave it half alive (answering PING and stale READs). Exit instead, with the reason, so a
/// supervisor or the operator sees it down and restarts it once the cause is fixed. Every
/// acknowledged write is already on disk, so exiting loses nothing. Our own shutdown (SIGTERM)
/// cancels `stopping` before it shuts Raft down, and is not reported as a failure.
async fn exit_when_raft_stops(raft: Raft, stopping: CancellationToken) {
    let mut metrics = raft.metrics();
    let why = loop {
        {
            let m = metrics.borrow_and_update();
            if let Err(fatal) = &m.running_state {
                break format!("Raft stopped: {fatal}");
            }
            if m.state == openraft::ServerState::Shutdown {
                break "Raft shut down".to_string();
            }
        }
        if metrics.changed().await.is_err() {
            break "Raft's core is gone".to_string();
        }
    };
    if stopping.is_cancelled() {
        return;
    }
    tracing::error!(
        "{why}; exiting so this replica is not left half alive (fix the cause, e.g. free disk \
         space, then start it again: it rejoins from its data)"
    );
    std::process::exit(3);
}

/// `--raft-route`: `id=addr,...`.
fn parse_routes(s: &str) -> Result<std::collections::BTreeMap<NodeId, String>, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| format!("route {part:?} is not id=addr"))?;
            let id = id
                .parse()
                .map_err(|_| format!("route id {id:?} is not a number"))?;
            Ok((id, addr.to_string()))
        })
        .collect()
}
