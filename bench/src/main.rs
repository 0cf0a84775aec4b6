//! `natter-bench storage`: replicated write throughput and latency of the
//! storage core on a real 3-process loopback cluster, with group commit and
//! with one fsync per append, plus a node's idle CPU and memory.
//!
//! Closed-loop writers: each sends a 200-byte message, waits for the
//! acknowledgement (committed on a majority, fsynced, applied), then sends the
//! next. Writers spread over 64 conversations on every shard and talk to the
//! shard leaders directly through the nodes' data API (the router adds its
//! own hop; it is measured separately once it exists).

mod compare;

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
    /// Which benchmark: "storage", "sync" or "compare" (Natter side by side
    /// with etcd and NATS JetStream, plus the Natter-only figures).
    #[arg(default_value = "storage")]
    which: String,
    /// sync: messages of history in the large conversation (sync: 1,000,000;
    /// compare: 100,000, quick: 1,000).
    #[arg(long)]
    history: Option<u64>,
    /// sync: reads timed per row.
    #[arg(long, default_value_t = 300)]
    reads: usize,
    /// Seconds per row.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Writer counts, comma-separated.
    #[arg(long, default_value = "1,16,256")]
    writers: String,
    /// Seconds to sample idle CPU.
    #[arg(long, default_value_t = 10.0)]
    idle_secs: f64,
    /// "send": real sends (with feed fan-out). "raft": a command that is
    /// replicated, fsynced and applied but changes nothing (a send to a
    /// conversation that does not exist): the bare cost of a Raft round.
    #[arg(long, default_value = "send")]
    op: String,
    /// storage: sync modes to run, comma-separated (`unsafe-no-wal`, the
    /// fault-injection suite's negative control, isolates the fsync's share
    /// of a write's latency).
    #[arg(long, default_value = "group-commit,per-write")]
    modes: String,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/storage.json")]
    out: String,
    /// compare: a couple of seconds per row, small counts, a 2 s sustained
    /// run, a 1,000-message history (the harness's own test).
    #[arg(long)]
    quick: bool,
    /// compare: interleaved passes over the systems per concurrency level.
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// compare: idle WebSocket connections opened on one router.
    #[arg(long)]
    idle_conns: Option<usize>,
    /// compare: group sizes for the delivery-to-every-member figure.
    #[arg(long)]
    groups: Option<String>,
    /// compare: open-loop rate (messages/s) of the sustained run.
    #[arg(long, default_value_t = 11_600.0)]
    sustained_rate: f64,
    /// compare: seconds of the sustained run.
    #[arg(long)]
    sustained_secs: Option<f64>,
    /// compare: data shards (Raft groups) of the Natter cluster (default:
    /// the nodes' default, 3).
    #[arg(long, default_value_t = 3)]
    shards: u32,
    /// compare: run Natter's rows only (no etcd, no NATS).
    #[arg(long)]
    no_peers: bool,
    /// compare: directory for the markdown and JSON results.
    #[arg(long, default_value = "bench/results")]
    out_dir: String,
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

async fn run_row(n: &Natter, convs: &[String], writers: usize, secs: f64, bare: bool) -> Row {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let text = "x".repeat(200);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (n, conv, text) = (n.clone(), convs[w % convs.len()].clone(), text.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let run = uuid();
                let missing = uuid();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let target = if bare { &missing } else { &conv };
                    let op = Natter::send_op(target, ALICE, &format!("{}-{i}", &run[..8]), &text);
                    let t = Instant::now();
                    let (_, out) = n.exec_once(op).await;
                    let expected = |r: &R| {
                        if bare {
                            matches!(r, R::Error(_))
                        } else {
                            matches!(r, R::Sent(_))
                        }
                    };
                    match out {
                        Outcome::Ok(raw) if decode(&raw).is_ok_and(|r| expected(&r)) => {
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
    for mode in args.modes.split(',').map(str::trim) {
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
        run_row(&n, &convs, 16, 1.0, args.op == "raft").await;
        for &w in &writer_counts {
            let fsyncs_before = total_fsyncs(&c).await;
            let mut row = run_row(&n, &convs, w, args.secs, args.op == "raft").await;
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

/// Fills `conv` with `count` messages using many concurrent writers.
async fn fill(n: &Natter, conv: &str, count: u64) -> Result<()> {
    let writers = 256u64.min(count.max(1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (n, conv) = (n.clone(), conv.to_string());
            tokio::spawn(async move {
                let text = "y".repeat(200);
                let mut i = w;
                while i < count {
                    n.send(&conv, ALICE, &format!("fill-{i}"), &text).await?;
                    i += writers;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    eprintln!(
        "filled {conv} with {count} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// p50/p99 of `reads` runs of `query` in µs.
async fn time_query(
    n: &Natter,
    reads: usize,
    q: natter_model::pb::query::Q,
) -> Result<(u64, u64, usize)> {
    let mut lat = Vec::with_capacity(reads);
    let mut returned = 0;
    for _ in 0..reads {
        let t = Instant::now();
        let r = n.query(q.clone()).await?;
        lat.push(t.elapsed().as_micros() as u64);
        returned = match r {
            R::ConversationSync(s) => s
                .changes
                .iter()
                .filter(|c| {
                    matches!(
                        c.change,
                        Some(natter_model::pb::conversation_change::Change::Message(_))
                    )
                })
                .count(),
            other => bail!("unexpected answer {other:?}"),
        };
    }
    lat.sort_unstable();
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), returned))
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Delta-sync and cold-start rows for conversations of the given sizes
/// (each filled first), read `reads` times each through the shard leader.
pub async fn sync_rows(
    n: &Natter,
    shards: u32,
    sizes: &[(&str, u64)],
    reads: usize,
) -> Result<Vec<serde_json::Value>> {
    use natter_model::pb;
    let mut table = Vec::new();
    for (label, size) in sizes {
        let conv = n
            .create_group_on(1 + (table.len() as u32 % shards), ALICE, &[])
            .await?;
        fill(n, &conv, *size).await?;
        let sync_q = |token| {
            pb::query::Q::SyncConversation(pb::SyncConversation {
                viewer_id: ALICE.into(),
                conversation_id: conv.clone(),
                token,
                limit: 50,
            })
        };
        let token = match n.query(sync_q(0)).await? {
            R::ConversationSync(s) => s.token,
            other => bail!("{other:?}"),
        };
        for i in 0..10 {
            n.send(&conv, ALICE, &format!("new-{i}"), "a new message")
                .await?;
        }
        let (d50, d99, dn) = time_query(n, reads, sync_q(token)).await?;
        let (c50, c99, cn) = time_query(n, reads, sync_q(0)).await?;
        if dn != 10 {
            bail!("delta sync returned {dn} messages, expected the 10 new ones");
        }
        table.push(serde_json::json!({
            "conversation": label, "messages": size,
            "delta_10_p50_us": d50, "delta_10_p99_us": d99,
            "cold_start_page_p50_us": c50, "cold_start_page_p99_us": c99, "cold_start_page_changes": cn,
        }));
    }
    Ok(table)
}

async fn sync(args: &Args) -> Result<()> {
    let history = args.history.unwrap_or(1_000_000);
    let c = Cluster::start(ClusterOpts {
        nodes: 3,
        shards: 8,
        node_args: vec![],
    })
    .await?;
    let n = Natter::new(ShardClient::new(c.addrs()), c.shards);
    let table = sync_rows(
        &n,
        c.shards,
        &[("small", 100), ("large", history)],
        args.reads,
    )
    .await?;
    let disk: u64 = c.nodes.values().map(|node| dir_bytes(&node.data_dir)).sum();
    let rss: u64 = c
        .nodes
        .values()
        .filter_map(|node| node.pid())
        .map(|p| rss_kib(p).unwrap_or(0))
        .sum();
    println!("| conversation | messages | delta sync of 10 new: p50 µs | p99 µs | cold-start first page (50): p50 µs | p99 µs |");
    println!("|---|---|---|---|---|---|");
    for r in &table {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r["conversation"].as_str().unwrap_or(""),
            r["messages"],
            r["delta_10_p50_us"],
            r["delta_10_p99_us"],
            r["cold_start_page_p50_us"],
            r["cold_start_page_p99_us"]
        );
    }
    let total_msgs = 100 + history + 20;
    println!(
        "disk (3 nodes, top-level files): {:.1} MiB; per million messages per node: {:.0} MiB; node RSS avg {:.0} MiB",
        disk as f64 / 1048576.0,
        disk as f64 / 3.0 / 1048576.0 / (total_msgs as f64 / 1e6),
        rss as f64 / 3.0 / 1024.0
    );
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = args.out.replace("storage.json", "sync.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::json!({ "rows": table, "disk_bytes": disk }))?,
    )?;
    eprintln!("results written to {out}");
    Ok(())
}

async fn compare(args: &Args) -> Result<()> {
    let q = args.quick;
    let list = |s: &str| -> Result<Vec<usize>> {
        Ok(s.split(',')
            .map(|w| w.trim().parse())
            .collect::<Result<_, _>>()?)
    };
    let command: Vec<String> = std::env::args().collect();
    let o = compare::Opts {
        quick: q,
        secs: if q { 1.0 } else { args.secs },
        passes: if q { 1 } else { args.passes.max(1) },
        concurrency: list(&args.writers)?,
        history: args.history.unwrap_or(if q { 1_000 } else { 100_000 }),
        reads: if q { 20 } else { args.reads },
        idle_conns: args.idle_conns.unwrap_or(if q { 200 } else { 10_000 }),
        groups: list(
            args.groups
                .as_deref()
                .unwrap_or(if q { "10,50" } else { "100,1000" }),
        )?,
        e2e_msgs: if q { 20 } else { 300 },
        sustained_rate: if q { 300.0 } else { args.sustained_rate },
        sustained_secs: args.sustained_secs.unwrap_or(if q { 2.0 } else { 60.0 }),
        catch_up_writes: if q { 300 } else { 20_000 },
        no_peers: args.no_peers,
        shards: args.shards,
        out_dir: args.out_dir.clone(),
        command: format!(
            "natter-bench {}",
            command.get(1..).map(|a| a.join(" ")).unwrap_or_default()
        ),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Dropping the run (on Ctrl-C / SIGTERM) stops every process it started.
    tokio::select! {
        r = compare::run(&o) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted: every process started was stopped"),
        _ = term.recv() => bail!("terminated: every process started was stopped"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.which.as_str() {
        "storage" => storage(&args).await,
        "sync" => sync(&args).await,
        "compare" | "all" => compare(&args).await,
        other => bail!("unknown benchmark {other:?}"),
    }
}
