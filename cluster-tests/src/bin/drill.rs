//! `make drill`: a recovery drill against the system `make run` started.
//!
//! Runs a transactional workload (see `cluster_tests::workload`) on the kvstore, `kill -9`s a
//! process in the middle of it (the kvstore, then the logserver leader), restarts it with
//! `scripts/dtkv.sh` (as `make run` started it), keeps the load going, and checks that every
//! `COMMITTED` transaction is there, all or nothing, and nothing aborted is. Keys are written
//! under `drill/<run>/`.
//!
//! The killed log leader stays down until another replica leads in a newer term: restarted at
//! once, it would come back within the election timeout and resume leading in the same term,
//! and no failover would be measured. The report gives, for the leader kill, the time from the
//! kill to a new leader elected and to the first write committed through it.

use clap::Parser;
use cluster_tests::workload::{check_history, workload, History};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Recovery drill against a running dtkv (make run)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:10000")]
    kv: SocketAddr,
    /// The data directory `make run` uses (pid files are under it).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    #[arg(long, default_value_t = 8)]
    clients: u64,
    /// Seconds of load before and after each fault.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// The cluster's credentials; without these flags, `<data>/cluster.secret` and
    /// `<data>/tls/{ca.pem,node.pem,node.key}` (as `make run TLS=1` writes them) when present.
    #[command(flatten)]
    trust: protocol::trust::TrustArgs,
    /// Connect to the kvstore under TLS (implied by the TLS files).
    #[arg(long)]
    tls: bool,
}

/// The credentials drill dials with: the flags, or the files `make run` left under `data`.
fn credentials(args: &Args) -> anyhow::Result<cluster_tests::Credentials> {
    let mut t = args.trust.clone();
    let given = t.cluster_secret_file.is_some() || t.tls_cert.is_some() || t.tls_ca.is_some();
    if !given {
        let secret = args.data.join("cluster.secret");
        if secret.exists() {
            t.cluster_secret_file = Some(secret);
        }
        let tls = args.data.join("tls");
        if tls.join("ca.pem").exists() {
            t.tls_ca = Some(tls.join("ca.pem"));
            t.tls_cert = Some(tls.join("node.pem"));
            t.tls_key = Some(tls.join("node.key"));
        }
    }
    let c = cluster_tests::Credentials::from_files(&t)?;
    anyhow::ensure!(
        !args.tls || c.member.tls.is_some(),
        "--tls needs --tls-cert/--tls-key/--tls-ca or <data>/tls/"
    );
    Ok(c)
}

fn pid_of(data: &std::path::Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(data.join("pids").join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn kill9(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

fn restart(data: &std::path::Path, name: &str) -> Result<(), String> {
    let status = std::process::Command::new("scripts/dtkv.sh")
        .args(["start", name])
        .env("DATA", data)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("running scripts/dtkv.sh: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("scripts/dtkv.sh start {name} failed"))
    }
}

async fn serving(addr: SocketAddr) -> bool {
    cluster_tests::status(addr)
        .await
        .is_some_and(|s| s.get("state").map(String::as_str) == Some("serving"))
}

/// The log replicas as `scripts/dtkv.sh` starts them: name and DKSP port.
const REPLICAS: [(&str, u16); 3] = [("log-1", 10002), ("log-2", 10012), ("log-3", 10022)];

/// The replica that reports itself leader, with its term.
async fn log_leader(except: Option<&str>) -> Option<(String, u64)> {
    for (name, port) in REPLICAS {
        if Some(name) == except {
            continue;
        }
        if let Some(s) = cluster_tests::status(cluster_tests::local(port)).await {
            if s.get("role").map(String::as_str) == Some("leader") {
                let term = s.get("term").and_then(|t| t.parse().ok()).unwrap_or(0);
                return Some((name.to_string(), term));
            }
        }
    }
    None
}

/// Polls the other replicas until one leads in a term after `old_term`.
async fn new_leader(killed: &str, old_term: u64, within: Duration) -> Option<(String, u64)> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some((name, term)) = log_leader(Some(killed)).await {
            if term > old_term {
                return Some((name, term));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Writes a probe key until one commits; the time since `since` when it did.
async fn first_commit(kv: SocketAddr, key: String, since: Instant) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(60) {
        if let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(1),
            cluster_tests::Credentials::from_env().connect_kv(&kv.to_string()),
        )
        .await
        {
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_secs(30), c.put(key.clone(), "x")).await
            {
                return Some(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match credentials(&args) {
        Ok(c) => {
            c.install();
        }
        Err(e) => {
            eprintln!("drill: {e:#}");
            std::process::exit(2);
        }
    }
    // A kvstore just started answers PING before it has rebuilt itself from the log.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serving(args.kv).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !serving(args.kv).await {
        eprintln!(
            "drill: no kvstore serving on {}; start the system with `make run`",
            args.kv
        );
        std::process::exit(2);
    }
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let prefix = format!("drill/{run}/");
    let hist = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..args.clients)
        .map(|c| {
            tokio::spawn(workload(
                args.kv,
                prefix.clone(),
                c,
                hist.clone(),
                stop.clone(),
                run ^ c,
            ))
        })
        .collect();
    let load = Duration::from_secs(args.seconds);
    let mut report = Vec::new();
    let mut failed = false;
    for fault in ["kvstore", "log leader"] {
        tokio::time::sleep(load).await;
        let (name, term) = match fault {
            "kvstore" => (Some("kvstore".to_string()), 0),
            _ => match log_leader(None).await {
                Some((n, t)) => (Some(n), t),
                None => (None, 0),
            },
        };
        let Some(name) = name else {
            report.push(format!("{fault}: not found, skipped"));
            continue;
        };
        let Some(pid) = pid_of(&args.data, &name) else {
            report.push(format!("{fault}: no pid file for {name}, skipped"));
            continue;
        };
        let killed = Instant::now();
        kill9(pid);
        let probe = format!("{prefix}probe");
        if fault == "kvstore" {
            // A killed process may linger as a zombie; the script treats those as down.
            if let Err(e) = restart(&args.data, &name) {
                report.push(format!("{fault}: {e}"));
                failed = true;
                continue;
            }
            // A write issued after the kill: acknowledged only once the system is whole again.
            match first_commit(args.kv, probe, killed).await {
                Some(t) => report.push(format!(
                    "kill -9 {name} (pid {pid}): a new write committed {} after the kill",
                    ms(t)
                )),
                None => {
                    report.push(format!("kill -9 {name}: no commit within 60 s"));
                    failed = true;
                }
            }
            continue;
        }
        // The log leader stays down until another replica leads, so the failover is real.
        let elected = new_leader(&name, term, Duration::from_secs(30)).await;
        let elected_after = killed.elapsed();
        let committed = match &elected {
            Some(_) => first_commit(args.kv, probe, killed).await,
            None => None,
        };
        let restarted = restart(&args.data, &name);
        match (elected, committed) {
            (Some((leader, new_term)), Some(t)) => report.push(format!(
                "kill -9 {name} (pid {pid}, leader in term {term}): {leader} elected in term \
                 {new_term} {} after the kill; first write committed through it {} after the kill",
                ms(elected_after),
                ms(t)
            )),
            (Some((leader, new_term)), None) => {
                report.push(format!(
                    "kill -9 {name}: {leader} elected in term {new_term} after {}, but no \
                     commit within 60 s",
                    ms(elected_after)
                ));
                failed = true;
            }
            (None, _) => {
                report.push(format!("kill -9 {name}: no other replica led within 30 s"));
                failed = true;
            }
        }
        match restarted {
            Ok(()) => report.push(format!(
                "{name} restarted; the replicas agree on a leader again"
            )),
            Err(e) => {
                report.push(format!("{fault}: {e}"));
                failed = true;
            }
        }
    }
    tokio::time::sleep(load).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let hist = std::mem::take(&mut *hist.lock().unwrap_or_else(|p| p.into_inner()));
    println!("\ndrill: {} clients, keys under {prefix}", args.clients);
    for line in &report {
        println!("  {line}");
    }
    println!("  {}", hist.summary());
    match check_history(args.kv, &prefix, &hist, args.clients).await {
        Ok(()) if !failed => println!(
            "PASS: every committed transaction is present, all or nothing; no aborted write is visible"
        ),
        Ok(()) => {
            println!("FAIL: see above");
            std::process::exit(1);
        }
        Err(e) => {
            println!("FAIL: {e}");
            std::process::exit(1);
        }
    }
}
