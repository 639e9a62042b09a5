//! `dtkv-bench`: the load generator (see `cluster_tests::loadgen`).
//!
//! `run` is one experiment, `suite` the standard set that `make bench` runs, `list` prints that
//! set for scripts driving other systems' tools, `load` writes every key once, `import-pgbench`/
//! `import-redis` turn those tools' output into the same rows, and `compare` prints the
//! side-by-side table of `make bench-peers`. Results files hold rows from any number of
//! invocations: `--json FILE` appends, `--round N` stamps the rows with the round of an
//! interleaved run, and `compare` reduces each system's rounds of an experiment to their median.

use clap::{Args, Parser, Subcommand};
use cluster_tests::loadgen::{self, Dist, Limit, Results, Row, Spec, Target, Workload};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "dtkv-bench",
    about = "Load generator for dtkv (and etcd), and result tables"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One experiment.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "put")]
        workload: Workload,
        #[arg(long, value_enum, default_value = "uniform")]
        dist: Dist,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Requests in flight per connection (autocommit workloads; transactions use 1).
        #[arg(long, default_value_t = 1)]
        depth: usize,
        /// How long to run (10s, 500ms, 2m); ignored with --ops.
        #[arg(long, default_value = "10s", value_parser = loadgen::parse_duration)]
        duration: Duration,
        /// Stop after this many operations (transactions) in total instead.
        #[arg(long)]
        ops: Option<u64>,
    },
    /// The standard set (`list` shows it), each experiment for --duration.
    Suite {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value = "10s", value_parser = loadgen::parse_duration)]
        duration: Duration,
        /// Only the experiments whose `list` line contains one of these words (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also write the table here, with the date and the machine.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// The standard set, one experiment a line: workload dist clients depth.
    List,
    /// Write every key once (what `--load` does before the first experiment), then exit;
    /// fails if any write failed.
    Load {
        #[command(flatten)]
        common: Common,
    },
    /// Where a commit's time goes (`make bench-latency`): PUTs at each client count with one
    /// in flight, the per-hop breakdown from the servers' `HOPS` marks (they must run with
    /// --trace-hops) and the floor (fdatasync, loopback round trip) measured alongside.
    Hops {
        /// The kvstore.
        #[arg(long, default_value = "127.0.0.1:10000")]
        addr: String,
        /// Every log replica (DKSP addresses), comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "127.0.0.1:10002,127.0.0.1:10012,127.0.0.1:10022"
        )]
        log: Vec<String>,
        /// A directory on the log replicas' disk, for the fdatasync probe.
        #[arg(long, default_value = "bench/data")]
        data_dir: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        clients: Vec<usize>,
        /// How long each client count runs.
        #[arg(long, default_value = "5s", value_parser = loadgen::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        shape: Shape,
        /// fdatasyncs and loopback round trips per client count (half before, half after the load).
        #[arg(long, default_value_t = 1000)]
        floor_samples: usize,
        /// Also write the table here, with the date and the machine.
        #[arg(long)]
        markdown: Option<PathBuf>,
        #[arg(long, default_value = "")]
        date: String,
    },
    /// Rows from pgbench per-transaction logs (`--log`) of one experiment.
    ImportPgbench {
        #[command(flatten)]
        row: RowArgs,
        /// The -T the run had.
        #[arg(long)]
        seconds: f64,
        logs: Vec<PathBuf>,
    },
    /// Rows from `redis-benchmark --csv` output of one experiment (one test).
    ImportRedis {
        #[command(flatten)]
        row: RowArgs,
        /// The -n the run had.
        #[arg(long)]
        requests: u64,
        csv: PathBuf,
    },
    /// The side-by-side table of results files: for each experiment and system the median
    /// ops/s over its rounds, their spread and median p99, and the ratio of medians.
    Compare {
        /// The system the ratios are of.
        #[arg(long, default_value = "dtkv")]
        ours: String,
        /// The other systems, in column order (default: every other system in the files).
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        #[arg(long)]
        markdown: Option<PathBuf>,
        files: Vec<PathBuf>,
    },
}

/// What every run against a server shares.
#[derive(Args)]
struct Common {
    #[arg(long, value_enum, default_value = "dtkv")]
    target: Target,
    /// Server addresses, comma-separated; clients are spread over them round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:10000")]
    addr: Vec<String>,
    /// The system's name in the tables (default: the target's).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    shape: Shape,
    /// The zipfian exponent.
    #[arg(long, default_value_t = 0.99)]
    zipf_s: f64,
    /// Write every key once before the first experiment.
    #[arg(long)]
    load: bool,
    #[command(flatten)]
    out: Output,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// The data every system is given.
#[derive(Args)]
struct Shape {
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Operations per read-modify-write transaction: ceil(K/2) reads, floor(K/2) writes.
    #[arg(long, default_value_t = 4)]
    rmw_ops: usize,
}

/// Where rows go besides stdout.
#[derive(Args)]
struct Output {
    /// Append the rows to this results file (created if missing).
    #[arg(long)]
    json: Option<PathBuf>,
    /// The results file's date, when it is created.
    #[arg(long, default_value = "")]
    date: String,
    /// The round of an interleaved run these rows belong to (1, 2, ...), kept in the file.
    #[arg(long)]
    round: Option<u32>,
}

impl Output {
    fn save(&self, rows: &[Row]) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            let rows: Vec<Row> = rows
                .iter()
                .map(|r| Row {
                    round: self.round.or(r.round),
                    ..r.clone()
                })
                .collect();
            Results::append(path, &self.date, &rows)?;
        }
        Ok(())
    }
}

/// The description of an imported experiment.
#[derive(Args)]
struct RowArgs {
    #[arg(long)]
    system: String,
    #[arg(long, value_enum)]
    workload: Workload,
    #[arg(long, value_enum, default_value = "uniform")]
    dist: Dist,
    #[arg(long)]
    clients: usize,
    #[arg(long, default_value_t = 1)]
    depth: usize,
    #[command(flatten)]
    shape: Shape,
    /// How this row differs from ours (shown under the comparison).
    #[arg(long, default_value = "")]
    note: String,
    #[command(flatten)]
    out: Output,
}

impl RowArgs {
    fn meta(&self) -> Row {
        let spec = Spec {
            target: Target::Dtkv,
            addrs: Vec::new(),
            workload: self.workload,
            clients: self.clients,
            depth: self.depth,
            limit: Limit::Ops(0),
            keys: self.shape.keys,
            dist: self.dist,
            zipf_s: 0.0,
            value_size: self.shape.value_size,
            rmw_ops: self.shape.rmw_ops,
            progress: false,
        };
        Row {
            note: self.note.clone(),
            ..loadgen::meta(&self.system, &spec)
        }
    }
}

impl Common {
    fn spec(
        &self,
        workload: Workload,
        dist: Dist,
        clients: usize,
        depth: usize,
        limit: Limit,
    ) -> Spec {
        Spec {
            target: self.target,
            addrs: self.addr.clone(),
            workload,
            clients,
            depth: if workload == Workload::Rmw {
                1
            } else {
                depth.max(1)
            },
            limit,
            keys: self.shape.keys,
            dist,
            zipf_s: self.zipf_s,
            value_size: self.shape.value_size,
            rmw_ops: self.shape.rmw_ops,
            progress: !self.quiet,
        }
    }

    fn system(&self) -> String {
        self.system.clone().unwrap_or_else(|| match self.target {
            Target::Dtkv => "dtkv".into(),
            Target::Etcd => "etcd".into(),
        })
    }

    async fn load(&self, spec: &Spec) {
        if self.load {
            self.preload(spec).await;
        }
    }

    /// Writes every key once; returns the writes that failed.
    async fn preload(&self, spec: &Spec) -> u64 {
        let t = std::time::Instant::now();
        let errors = loadgen::preload(spec).await;
        eprintln!(
            "loaded {} keys of {} bytes in {:.1} s ({errors} errors)",
            spec.keys,
            spec.value_size,
            t.elapsed().as_secs_f64()
        );
        errors
    }
}

fn write_markdown(path: &Path, date: &str, title: &str, table: &str) -> anyhow::Result<()> {
    let text = format!("# {title}\n\n{date}, {}\n\n{table}", loadgen::machine());
    std::fs::write(path, text)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Run {
            common,
            workload,
            dist,
            clients,
            depth,
            duration,
            ops,
        } => {
            let limit = ops.map_or(Limit::Time(duration), Limit::Ops);
            let spec = common.spec(workload, dist, clients, depth, limit);
            let row = rt.block_on(async {
                common.load(&spec).await;
                loadgen::run(&common.system(), &spec).await
            });
            print!("{}", loadgen::markdown(std::slice::from_ref(&row)));
            common.out.save(&[row])?;
        }
        Cmd::Suite {
            common,
            duration,
            only,
            markdown,
        } => {
            let mut rows = Vec::new();
            rt.block_on(async {
                for s in loadgen::standard_suite() {
                    let line = s.line();
                    if !only.is_empty() && !only.iter().any(|w| line.contains(w.as_str())) {
                        continue;
                    }
                    let spec = common.spec(
                        s.workload,
                        s.dist,
                        s.clients,
                        s.depth,
                        Limit::Time(duration),
                    );
                    if rows.is_empty() {
                        common.load(&spec).await;
                    }
                    rows.push(loadgen::run(&common.system(), &spec).await);
                }
            });
            let table = loadgen::markdown(&rows);
            print!("{table}");
            common.out.save(&rows)?;
            if let Some(path) = markdown {
                write_markdown(&path, &common.out.date, "dtkv-bench standard set", &table)?;
            }
        }
        Cmd::Load { common } => {
            let spec = common.spec(Workload::Put, Dist::Uniform, 1, 1, Limit::Ops(0));
            let errors = rt.block_on(common.preload(&spec));
            if errors > 0 {
                anyhow::bail!("{errors} of {} writes failed", spec.keys);
            }
        }
        Cmd::Hops {
            addr,
            log,
            data_dir,
            clients,
            duration,
            shape,
            floor_samples,
            markdown,
            date,
        } => {
            let setup = cluster_tests::hops::Setup {
                kv: addr,
                logs: log,
                data_dir,
                clients,
                duration,
                keys: shape.keys,
                value_size: shape.value_size,
                floor_samples,
            };
            let levels = rt.block_on(cluster_tests::hops::run(&setup))?;
            let table = cluster_tests::hops::table(&levels);
            print!("{table}");
            if let Some(path) = markdown {
                write_markdown(&path, &date, "Where a commit's time goes", &table)?;
            }
        }
        Cmd::List => {
            for s in loadgen::standard_suite() {
                println!("{}", s.line());
            }
        }
        Cmd::ImportPgbench { row, seconds, logs } => {
            let mut text = String::new();
            for l in &logs {
                text += &std::fs::read_to_string(l)?;
            }
            let (hist, ok, failed, bad) = loadgen::import_pgbench_log(&text);
            let r = loadgen::summarize(&row.meta(), &hist, ok, failed, bad, seconds);
            print!("{}", loadgen::markdown(std::slice::from_ref(&r)));
            row.out.save(&[r])?;
        }
        Cmd::ImportRedis { row, requests, csv } => {
            let figures = loadgen::import_redis_csv(&std::fs::read_to_string(&csv)?)?;
            let f = figures
                .first()
                .ok_or_else(|| anyhow::anyhow!("no test in {}", csv.display()))?;
            let r = Row {
                seconds: if f.rps > 0.0 {
                    requests as f64 / f.rps
                } else {
                    0.0
                },
                ops: requests,
                per_sec: f.rps,
                p50_us: f.p50_us,
                p95_us: f.p95_us,
                p99_us: f.p99_us,
                max_us: f.max_us,
                ..row.meta()
            };
            print!("{}", loadgen::markdown(std::slice::from_ref(&r)));
            row.out.save(&[r])?;
        }
        Cmd::Compare {
            ours,
            peers,
            markdown,
            files,
        } => {
            let mut rows = Vec::new();
            let mut date = String::new();
            for f in &files {
                let r = Results::load(f)?;
                date = r.date;
                rows.extend(r.rows);
            }
            let mut peers = peers;
            if peers.is_empty() {
                for r in &rows {
                    if r.system != ours && !peers.contains(&r.system) {
                        peers.push(r.system.clone());
                    }
                }
            }
            let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
            let table = loadgen::compare(&rows, &ours, &peers);
            print!("{table}");
            if let Some(path) = markdown {
                write_markdown(&path, &date, "dtkv-bench side by side", &table)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_arguments_parse_into_a_spec() {
        let cli = Cli::try_parse_from([
            "dtkv-bench",
            "run",
            "--target",
            "etcd",
            "--addr",
            "a:1,b:2",
            "--workload",
            "rmw",
            "--dist",
            "zipfian",
            "--clients",
            "8",
            "--depth",
            "4",
            "--duration",
            "500ms",
        ])
        .unwrap();
        let Cmd::Run {
            common,
            workload,
            dist,
            clients,
            depth,
            duration,
            ops,
        } = cli.cmd
        else {
            panic!("not run");
        };
        assert_eq!(common.addr, vec!["a:1", "b:2"]);
        assert_eq!(common.system(), "etcd");
        assert_eq!(duration, Duration::from_millis(500));
        assert_eq!(ops, None);
        let spec = common.spec(workload, dist, clients, depth, Limit::Time(duration));
        // A transaction has one request in flight whatever --depth says.
        assert_eq!(spec.depth, 1);
        assert_eq!(
            (spec.workload, spec.dist, spec.clients),
            (Workload::Rmw, Dist::Zipfian, 8)
        );
        assert_eq!(loadgen::standard_suite()[5].line(), "rmw uniform 16 1");
        assert!(Cli::try_parse_from(["dtkv-bench", "run", "--duration", "3h"]).is_err());
    }

    #[test]
    fn a_round_given_on_the_command_line_is_kept_in_the_results_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.json");
        let json = file.to_str().unwrap();
        let save = |round: Option<&str>| {
            let mut args = vec![
                "dtkv-bench",
                "import-redis",
                "--system",
                "redis",
                "--workload",
                "put",
                "--clients",
                "16",
                "--requests",
                "1",
                "--json",
                json,
                "out.csv",
            ];
            if let Some(r) = round {
                args.extend(["--round", r]);
            }
            let Cmd::ImportRedis { row, .. } = Cli::try_parse_from(args).unwrap().cmd else {
                panic!("not import-redis");
            };
            row.out.save(&[row.meta()]).unwrap();
        };
        save(Some("2"));
        save(None);
        let rows = Results::load(&file).unwrap().rows;
        assert_eq!(
            rows.iter().map(|r| r.round).collect::<Vec<_>>(),
            vec![Some(2), None]
        );
        assert!(Cli::try_parse_from(["dtkv-bench", "load", "--round", "x"]).is_err());
    }
}
