//! `natter-jepsen`: run nemeses against real Natter clusters and check the
//! histories. See jepsen/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use natter_jepsen::nemesis::{Nemesis, ALL};
use natter_jepsen::runner::{self, RunCfg, RunResult};
use natter_jepsen::workload::WorkloadCfg;
use natter_jepsen::{checker, history, report};

#[derive(Parser)]
#[command(name = "natter-jepsen", about = "Fault injection for Natter")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Seed of the fault schedule and the workload (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for histories, node logs and report.md
    /// (default: /tmp/natter-jepsen/<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use loopback addresses instead of network namespaces.
    #[arg(long)]
    loopback: bool,
    /// Drive the workload through the nodes' data API instead of through
    /// routers (the default: two routers, gRPC, one account per process).
    #[arg(long)]
    node_api: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one nemesis (or all) with the given settings.
    Run {
        /// A nemesis name, or "all".
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// Seconds of faults per nemesis.
        #[arg(long, default_value_t = 30)]
        time_limit: u64,
        /// 3 or 5 nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Nodes acknowledge writes they have not made durable
        /// (`--sync-mode unsafe-no-wal`) under kill-all (unless another
        /// nemesis is named): the checkers must report losses.
        #[arg(long)]
        negative_control: bool,
        /// Hold faults 10-20 s (default: 3-5 s below a 60 s time limit).
        #[arg(long)]
        long_faults: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Every nemesis, briefly: the tier the test suite runs (a few minutes).
    Short {
        #[command(flatten)]
        common: Common,
    },
    /// Every nemesis with 10-20 s faults, at least 10 minutes in total.
    Long {
        /// Seconds of faults per nemesis.
        #[arg(long, default_value_t = 70)]
        time_limit: u64,
        /// 3 or 5 nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Runs the checkers over a saved history file.
    Check { history: PathBuf },
}

/// Prints a line to stdout; a closed stdout (a pipe into `head`) is not an
/// error worth a panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// The longest fault phase one nemesis run may have (a day).
const MAX_TIME_LIMIT: u64 = 86_400;

fn short_workload() -> WorkloadCfg {
    WorkloadCfg {
        processes: 5,
        hot: 2,
        cold: 6,
        hot_share: 0.7,
        sync_share: 0.15,
        read_share: 0.05,
        feed_share: 0.05,
        op_timeout: Duration::from_secs(2),
        think: Duration::from_millis(25),
        send_attempts: 3,
    }
}

fn long_workload() -> WorkloadCfg {
    WorkloadCfg {
        processes: 8,
        hot: 3,
        cold: 20,
        op_timeout: Duration::from_secs(3),
        think: Duration::from_millis(20),
        ..short_workload()
    }
}

#[allow(clippy::too_many_arguments)]
fn cfg(
    nemesis: Nemesis,
    seed: u64,
    time_limit: u64,
    nodes: u64,
    long: bool,
    negative_control: bool,
    common: &Common,
    out: &std::path::Path,
) -> RunCfg {
    let s = Duration::from_secs;
    let ms = Duration::from_millis;
    RunCfg {
        nemesis,
        seed,
        time_limit: s(time_limit),
        nodes,
        shards: 3,
        negative_control,
        force_loopback: common.loopback,
        fault: if long { (s(10), s(20)) } else { (s(3), s(5)) },
        quiet: if long {
            (s(5), s(10))
        } else {
            (ms(1500), ms(2500))
        },
        recovery: if long { s(5) } else { ms(1500) },
        workload: if long {
            long_workload()
        } else {
            short_workload()
        },
        out_dir: out.to_path_buf(),
        node_api: common.node_api,
    }
}

fn seed_of(c: &Common) -> u64 {
    c.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

fn out_of(c: &Common, seed: u64) -> PathBuf {
    c.out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/natter-jepsen/{seed}")))
}

async fn run_all(seed: u64, out: PathBuf, cfgs: Vec<RunCfg>) -> Result<bool> {
    let bin = natter_tests::bin_dir().join("natter-node");
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p natter-node) or set NATTER_BIN_DIR",
            bin.display()
        );
    }
    let _lock = natter_jepsen::hosts::RunLock::acquire()?;
    let mut results: Vec<RunResult> = Vec::new();
    let mut errors: Vec<(String, String)> = Vec::new();
    for c in &cfgs {
        eprintln!(
            "== {}{} (seed {seed}, {} s of faults, {} nodes)",
            c.nemesis.name(),
            if c.negative_control {
                " negative control"
            } else {
                ""
            },
            c.time_limit.as_secs(),
            c.nodes
        );
        let r = tokio::select! {
            r = runner::run(c) => r,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the run kills its nodes and removes its namespaces.
                bail!("interrupted");
            }
        };
        match r {
            Ok(r) => {
                eprint!("{}{}", report::HEADER, report::row(&r));
                results.push(r);
            }
            Err(e) => {
                eprintln!("{} failed to run: {e:#}", c.nemesis.name());
                errors.push((c.nemesis.name().to_string(), format!("{e:#}")));
            }
        }
    }
    let text = report::render(seed, &results, &errors);
    let _ = std::fs::write(out.join("report.md"), &text);
    say(&text);
    let passed = results.iter().filter(|r| r.passed()).count();
    let failed = results.len() - passed + errors.len();
    say(&format!("report: {}", out.join("report.md").display()));
    say(&format!("{passed} passed, {failed} failed"));
    Ok(failed == 0)
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("natter_jepsen=info,warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Check { history } => {
                let events = history::load(&history)?;
                let r = checker::check(&events);
                say(&serde_json::to_string_pretty(&r)?);
                Ok(r.anomalies() == 0)
            }
            Cmd::Run {
                nemesis,
                time_limit,
                nodes,
                negative_control,
                long_faults,
                common,
            } => {
                if !(3..=5).contains(&nodes) {
                    bail!("--nodes must be 3, 4 or 5");
                }
                if !(1..=MAX_TIME_LIMIT).contains(&time_limit) {
                    bail!("--time-limit must be 1..={MAX_TIME_LIMIT} seconds");
                }
                let list: Vec<Nemesis> = match nemesis.as_str() {
                    "all" if negative_control => vec![Nemesis::KillAll],
                    "all" => ALL.to_vec(),
                    name => vec![Nemesis::parse(name).ok_or_else(|| {
                        anyhow::anyhow!(
                            "unknown nemesis {name:?}; one of: all, {}",
                            ALL.map(|n| n.name()).join(", ")
                        )
                    })?],
                };
                let seed = seed_of(&common);
                let out = out_of(&common, seed);
                let long = long_faults || time_limit >= 60;
                let cfgs = list
                    .into_iter()
                    .map(|n| {
                        cfg(
                            n,
                            seed,
                            time_limit,
                            nodes,
                            long,
                            negative_control,
                            &common,
                            &out,
                        )
                    })
                    .collect();
                run_all(seed, out, cfgs).await
            }
            Cmd::Short { common } => {
                let seed = seed_of(&common);
                let out = out_of(&common, seed);
                let cfgs = ALL
                    .iter()
                    .map(|&n| cfg(n, seed, 12, 3, false, false, &common, &out))
                    .collect();
                run_all(seed, out, cfgs).await
            }
            Cmd::Long {
                time_limit,
                nodes,
                common,
            } => {
                if !(3..=5).contains(&nodes) {
                    bail!("--nodes must be 3, 4 or 5");
                }
                if !(1..=MAX_TIME_LIMIT).contains(&time_limit) {
                    bail!("--time-limit must be 1..={MAX_TIME_LIMIT} seconds");
                }
                let seed = seed_of(&common);
                let out = out_of(&common, seed);
                let cfgs = ALL
                    .iter()
                    .map(|&n| cfg(n, seed, time_limit, nodes, true, false, &common, &out))
                    .collect();
                run_all(seed, out, cfgs).await
            }
        }
    });
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("natter-jepsen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
