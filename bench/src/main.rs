//! `natter-bench storage`: replicated write throughput and latency of the
//! storage core on a real 3-process loopback cluster, with group commit and
//! with one fsync per append, plus a node's idle CPU and memory.
//!
//! Closed-loop writers: each sends a 200-byte message, waits for the
//! acknowledgement (committed on a majority, fsynced, applied), then sends the
//! next. Writers spread over 64 conversations on every shard and talk to the
//! shard leaders directly through the nodes' data API (the router adds its
//! own hop; it is measured separately once it exists).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use natter_model::pb::response::R;
use natter_tests::natter::{decode, uuid, Natter};
use natter_tests::{Cluster, ClusterOpts, Outcome, ShardClient};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Natter benchmarks")]
struct Args {
    /// Which benchmark: "storage".
    #[arg(default_value = "storage")]
    which: String,
    /// Seconds per row.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Writer counts, comma-separated.
    #[arg(long, default_value = "1,16,256")]
    writers: String,
    /// Seconds to sample idle CPU.
    #[arg(long, default_value_t = 10.0)]
    idle_secs: f64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/storage.json")]
    out: String,
}

#[derive(Serialize, Debug, Clone)]
struct Row {
    mode: String,
    writers: usize,
    ops: u64,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    errors: u64,
    fsyncs_per_write: Option<f64>,
}

#[derive(Serialize, Debug)]
struct Idle {
    shards: u32,
    cpu_percent_per_node: f64,
    rss_mib_per_node: f64,
}

const ALICE: &str = "00000000-0000-4000-8000-00000000a11c";

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after "pid (comm)": state is f[0]; utime is field 14 => f[11].
    Ok(f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            return Ok(v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0));
        }
    }
    bail!("no VmRSS for {pid}")
}

async fn run_row(n: &Natter, convs: &[String], writers: usize, secs: f64) -> Row {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let text = "x".repeat(200);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (n, conv, text) = (n.clone(), convs[w % convs.len()].clone(), text.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let run = uuid();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let op = Natter::send_op(&conv, ALICE, &format!("{}-{i}", &run[..8]), &text);
                    let t = Instant::now();
                    let (_, out) = n.exec_once(op).await;
                    match out {
                        Outcome::Ok(raw) if matches!(decode(&raw), Ok(R::Sent(_))) => {
                            lat.push(t.elapsed().as_micros() as u64)
                        }
                        _ => errors += 1,
                    }
                    i += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    lat.sort_unstable();
    Row {
        mode: String::new(),
        writers,
        ops: lat.len() as u64,
        ops_per_sec: lat.len() as f64 / secs,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        p999_us: percentile(&lat, 0.999),
        errors,
        fsyncs_per_write: None,
    }
}

/// WAL fsyncs done by every node so far.
async fn total_fsyncs(c: &Cluster) -> u64 {
    let mut sum = 0;
    for id in c.ids() {
        if let Ok(st) = c.status(id).await {
            sum += st.wal_fsyncs;
        }
    }
    sum
}

async fn storage(args: &Args) -> Result<()> {
    let writer_counts: Vec<usize> = args
        .writers
        .split(',')
        .map(|w| w.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    let mut idle = None;
    for mode in ["group-commit", "per-write"] {
        let opts = ClusterOpts {
            nodes: 3,
            shards: 8,
            node_args: vec!["--sync-mode".into(), mode.into()],
        };
        let c = Cluster::start(opts).await?;
        if mode == "group-commit" {
            // Idle cost of the default shard count: let elections settle first.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pids: Vec<u32> = c.nodes.values().filter_map(|n| n.pid()).collect();
            let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
            tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
            let after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
            let ticks: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
            let hz = 100.0; // USER_HZ on Linux
            let rss: u64 = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).sum();
            idle = Some(Idle {
                shards: c.shards,
                cpu_percent_per_node: ticks as f64 / hz / args.idle_secs / pids.len() as f64
                    * 100.0,
                rss_mib_per_node: rss as f64 / 1024.0 / pids.len() as f64,
            });
        }
        let n = Natter::new(ShardClient::new(c.addrs()), c.shards);
        let mut convs = Vec::new();
        for i in 0..64u32 {
            convs.push(n.create_group_on(1 + i % c.shards, ALICE, &[]).await?);
        }
        // Warm-up.
        run_row(&n, &convs, 16, 1.0).await;
        for &w in &writer_counts {
            let fsyncs_before = total_fsyncs(&c).await;
            let mut row = run_row(&n, &convs, w, args.secs).await;
            let fsyncs = total_fsyncs(&c).await.saturating_sub(fsyncs_before);
            row.fsyncs_per_write = Some(fsyncs as f64 / row.ops.max(1) as f64);
            row.mode = mode.to_string();
            eprintln!("{row:?}");
            rows.push(row);
        }
    }
    println!("| sync mode | writers | ops/s | p50 µs | p99 µs | p99.9 µs | fsyncs per write (3 nodes) | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} | {} |",
            r.mode,
            r.writers,
            r.ops_per_sec,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.fsyncs_per_write.unwrap_or(0.0),
            r.errors
        );
    }
    for w in &writer_counts {
        let g = rows
            .iter()
            .find(|r| r.mode == "group-commit" && r.writers == *w);
        let p = rows
            .iter()
            .find(|r| r.mode == "per-write" && r.writers == *w);
        if let (Some(g), Some(p)) = (g, p) {
            println!(
                "group commit / per-write at {w} writers: {:.2}x",
                g.ops_per_sec / p.ops_per_sec.max(1e-9)
            );
        }
    }
    if let Some(i) = &idle {
        println!(
            "idle node ({} shards + meta): {:.2}% of one core, {:.1} MiB RSS",
            i.shards, i.cpu_percent_per_node, i.rss_mib_per_node
        );
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&serde_json::json!({ "rows": rows, "idle": idle }))?,
    )?;
    eprintln!("results written to {}", args.out);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.which.as_str() {
        "storage" => storage(&args).await,
        other => bail!("unknown benchmark {other:?}"),
    }
}
