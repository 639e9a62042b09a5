//! Nemeses: the faults a run injects, and schedules of them.
//!
//! A schedule is a list of steps, each one nemesis: inject the fault, hold it for a while,
//! heal it, check the system makes progress again, then leave it alone for a while. Schedules
//! for `make torture` are drawn from a seeded RNG, so a printed seed reproduces the same faults
//! in the same order with the same timings (which process is the leader at the time, and the
//! interleaving of transactions, are up to the system).
//!
//! Some nemeses check a property of their own while they act. Partitioning the log leader away
//! from both other replicas requires the two to elect a new leader, and sends an `APPEND`
//! straight to the isolated leader: it must not be acknowledged while the partition lasts, and
//! if it is acknowledged later, the log must hold it at the index given.

use protocol::Response;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt;
use std::time::{Duration, Instant};

use super::cluster::FaultyCluster;
use super::proxy::Mode;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nemesis {
    /// kill -9 the kvstore; restart it at the heal.
    KillKvstore,
    /// kill -9 the sequencer; restart it at the heal.
    KillSequencer,
    /// kill -9 the log leader; restart it at the heal.
    KillLeader,
    /// kill -9 one log follower; restart it at the heal.
    KillFollower,
    /// Cut the log leader off from both other replicas, both ways (refused or blackholed).
    PartitionLeader(Mode),
    /// Add one-way latency to every link, up to this many milliseconds.
    SlowLinks(u64),
    /// kill -9 every process; start them all again at the heal.
    RestartAll,
}

impl Nemesis {
    /// Every nemesis, with the settings `make test` uses.
    pub const ALL: [Nemesis; 8] = [
        Nemesis::KillKvstore,
        Nemesis::KillSequencer,
        Nemesis::KillLeader,
        Nemesis::KillFollower,
        Nemesis::PartitionLeader(Mode::Blackhole),
        Nemesis::PartitionLeader(Mode::Refuse),
        Nemesis::SlowLinks(20),
        Nemesis::RestartAll,
    ];
}

impl fmt::Display for Nemesis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nemesis::KillKvstore => write!(f, "kill -9 kvstore"),
            Nemesis::KillSequencer => write!(f, "kill -9 sequencer"),
            Nemesis::KillLeader => write!(f, "kill -9 log leader"),
            Nemesis::KillFollower => write!(f, "kill -9 log follower"),
            Nemesis::PartitionLeader(Mode::Refuse) => write!(f, "partition log leader (refuse)"),
            Nemesis::PartitionLeader(_) => write!(f, "partition log leader (blackhole)"),
            Nemesis::SlowLinks(ms) => write!(f, "slow links (up to {ms} ms one way)"),
            Nemesis::RestartAll => write!(f, "kill -9 everything"),
        }
    }
}

/// One step of a schedule.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// The fault to inject.
    pub nemesis: Nemesis,
    /// How long the fault lasts before it is healed.
    pub hold: Duration,
    /// Fault-free time after the system has made progress again.
    pub quiet: Duration,
    /// Seeds the step's own choices (which follower, which delays).
    pub seed: u64,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} for {:.1}s, then {:.1}s quiet",
            self.nemesis,
            self.hold.as_secs_f64(),
            self.quiet.as_secs_f64()
        )
    }
}

/// `repeat` rounds of one nemesis, for `make test`.
pub fn fixed(nemesis: Nemesis, repeat: usize, hold: Duration, quiet: Duration) -> Vec<Step> {
    (0..repeat as u64)
        .map(|seed| Step {
            nemesis,
            hold,
            quiet,
            seed,
        })
        .collect()
}

/// A random schedule of about `total` seconds of faults and quiet, from `seed`.
pub fn random(seed: u64, total: Duration) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut planned = Duration::ZERO;
    while planned < total {
        let nemesis = match rng.gen_range(0..8) {
            0 => Nemesis::KillKvstore,
            1 => Nemesis::KillSequencer,
            2 => Nemesis::KillLeader,
            3 => Nemesis::KillFollower,
            4 => Nemesis::PartitionLeader(Mode::Blackhole),
            5 => Nemesis::PartitionLeader(Mode::Refuse),
            // Up to 100 ms: past the Raft RPC timeout, so replication stalls in the worst case.
            6 => Nemesis::SlowLinks(rng.gen_range(5..=100)),
            _ => Nemesis::RestartAll,
        };
        let step = Step {
            nemesis,
            hold: Duration::from_millis(rng.gen_range(500..=8000)),
            quiet: Duration::from_millis(rng.gen_range(500..=4000)),
            seed: rng.gen(),
        };
        // Progress checks and restarts take time too; count a few seconds per step.
        planned += step.hold + step.quiet + Duration::from_secs(3);
        steps.push(step);
    }
    steps
}

/// A fault in force, with what healing it needs.
pub enum Active {
    /// Every process was killed.
    Everything,
    /// The kvstore was killed.
    Kvstore,
    /// The sequencer was killed.
    Sequencer,
    /// Replica `i` was killed.
    Replica(usize),
    /// The log leader is cut off from the other replicas.
    Partition {
        /// The isolated leader's index.
        old: usize,
        /// An `APPEND` sent to the isolated leader: when and what it answered (it must not answer
        /// `OK` before the heal).
        probe: tokio::task::JoinHandle<(Instant, Result<Response, String>)>,
        /// The probe's payload, which the log must hold at the index the probe was acknowledged at.
        payload: String,
    },
    /// Every link is delayed.
    Slow,
}

/// Injects `step`'s fault. Returns what to heal and a line for the history's events.
pub async fn inject(fc: &mut FaultyCluster, step: &Step) -> (Active, String) {
    let mut rng = StdRng::seed_from_u64(step.seed);
    match step.nemesis {
        Nemesis::KillKvstore => {
            fc.sys.kill_kv();
            (Active::Kvstore, "killed the kvstore".into())
        }
        Nemesis::KillSequencer => {
            fc.sys.seq.proc_.kill9();
            (Active::Sequencer, "killed the sequencer".into())
        }
        Nemesis::KillLeader => {
            let l = fc.leader().await;
            fc.sys.log.kill9(l);
            (Active::Replica(l), format!("killed log-{} (leader)", l + 1))
        }
        Nemesis::KillFollower => {
            let l = fc.leader().await;
            let f = (l + rng.gen_range(1..=2)) % 3;
            fc.sys.log.kill9(f);
            (
                Active::Replica(f),
                format!("killed log-{} (follower)", f + 1),
            )
        }
        Nemesis::PartitionLeader(mode) => {
            let old = fc.leader().await;
            fc.isolate(old, mode);
            // A record the logserver accepts and every kvstore may meet harmlessly if the probe
            // lands: `EPOCH 1` is at most any kvstore's epoch (timestamps start at 1), so it
            // fences nobody and passes the kvstore's check against the sequencer.
            let payload = "EPOCH 1".to_string();
            let addr = fc.sys.log.replicas[old].dksp;
            let line = protocol::log::Request::Append {
                client: "jepsen-probe".into(),
                seq: step.seed,
                payload: payload.clone().into(),
            }
            .encode();
            let probe = tokio::spawn(async move {
                let r = async {
                    let mut c = crate::Credentials::from_env()
                        .connect_any(&addr.to_string())
                        .await
                        .map_err(|e| e.to_string())?;
                    c.call(&line).await.map_err(|e| e.to_string())
                }
                .await;
                (Instant::now(), r)
            });
            let new = fc.wait_new_leader(old).await;
            (
                Active::Partition {
                    old,
                    probe,
                    payload,
                },
                format!(
                    "isolated log-{} (leader) from the other replicas ({mode:?}); log-{} was elected",
                    old + 1,
                    new + 1
                ),
            )
        }
        Nemesis::SlowLinks(max) => {
            let mut delays = Vec::new();
            for p in fc.proxies() {
                let d = rng.gen_range(0..=max);
                p.set_delay(Duration::from_millis(d));
                delays.push(format!("{}={d}ms", p.name()));
            }
            (Active::Slow, format!("slowed links: {}", delays.join(" ")))
        }
        Nemesis::RestartAll => {
            fc.kill_all();
            (Active::Everything, "killed every process".into())
        }
    }
}

/// Heals a fault. An `Err` is a property the nemesis checks that failed.
pub async fn heal(fc: &mut FaultyCluster, active: Active) -> Result<String, String> {
    match active {
        Active::Everything => {
            fc.start_all().await;
            Ok("restarted every process".into())
        }
        Active::Kvstore => {
            fc.sys.start_kv().await;
            Ok("restarted the kvstore".into())
        }
        Active::Sequencer => {
            fc.sys.seq.crash_and_restart().await;
            Ok("restarted the sequencer".into())
        }
        Active::Replica(i) => {
            fc.sys.log.restart(i).await;
            Ok(format!("restarted log-{}", i + 1))
        }
        Active::Slow => {
            fc.heal_network();
            Ok("links back to normal".into())
        }
        Active::Partition {
            old,
            probe,
            payload,
        } => {
            let healed = Instant::now();
            fc.heal_network();
            check_probe(fc, old, probe, healed, &payload).await
        }
    }
}

/// The isolated leader's probe append: no `OK` before the heal, and an `OK` must be true.
async fn check_probe(
    fc: &FaultyCluster,
    old: usize,
    probe: tokio::task::JoinHandle<(Instant, Result<Response, String>)>,
    healed: Instant,
    payload: &str,
) -> Result<String, String> {
    let name = format!("log-{}", old + 1);
    let Ok(joined) = tokio::time::timeout(Duration::from_secs(30), probe).await else {
        return Ok(format!(
            "healed; the probe APPEND to {name} got no reply within 30 s of the heal"
        ));
    };
    let (at, reply) = joined.map_err(|e| format!("probe task: {e}"))?;
    let index = match reply {
        Ok(Response::Ok(args)) if args.len() == 1 => {
            protocol::response::parse_u64(&args[0]).map_err(|e| e.to_string())?
        }
        other => {
            return Ok(format!(
                "healed; the probe APPEND to isolated {name} was not acknowledged: {other:?}"
            ))
        }
    };
    if at < healed {
        return Err(format!(
            "{name}, cut off from the majority, acknowledged APPEND at index {index} during the partition"
        ));
    }
    let leader = fc.leader().await;
    fc.sys.log.wait_applied(leader, index).await;
    let mut c = crate::Credentials::from_env()
        .connect_any(&fc.sys.log.replicas[leader].dksp.to_string())
        .await
        .map_err(|e| e.to_string())?;
    match c.read_log(index, Some(1)).await {
        Ok(entries) if entries.first().is_some_and(|(_, p)| p == payload.as_bytes()) => Ok(
            format!("healed; the probe to {name} was acknowledged after the heal and is in the log"),
        ),
        Ok(entries) => Err(format!(
            "{name} acknowledged the probe APPEND at index {index}, but the log holds {entries:?} there"
        )),
        Err(e) => Ok(format!(
            "healed; the probe acknowledged at {index} could not be read back ({e})"
        )),
    }
}
