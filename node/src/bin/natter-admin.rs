//! `natter-admin`: operator commands against a running cluster, over the
//! nodes' gRPC API.
//!
//! - `status`: nodes (up/down), every shard's replicas, leader, applied
//!   index and replica lag, and a summary line; `--json` for machines.
//! - `transfer-leader --shard S --to N`: hands a shard's leadership to node N.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{
    Consistency, ShardMap, ShardMapRequest, StatusReply, StatusRequest, TransferLeaderRequest,
};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(name = "natter-admin", about = "Operate a Natter cluster")]
struct Args {
    /// Any node of the cluster ("host:port").
    #[arg(long, env = "NATTER_ADMIN_NODE", default_value = "127.0.0.1:7101")]
    node: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Nodes, shards, leaders and lag.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Hands leadership of a shard to a node.
    TransferLeader {
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        to: u64,
    },
}

#[derive(Serialize)]
struct NodeRow {
    id: u64,
    addr: String,
    region: String,
    up: bool,
}

#[derive(Serialize)]
struct ShardRow {
    shard: u32,
    replicas: Vec<u64>,
    leader: Option<u64>,
    term: u64,
    /// Applied index per replica that answered.
    applied: BTreeMap<u64, u64>,
    /// Leader's applied index minus the slowest answering replica's.
    lag: u64,
}

#[derive(Serialize)]
struct Report {
    nodes: Vec<NodeRow>,
    shards: Vec<ShardRow>,
    summary: String,
    healthy: bool,
}

fn client(addr: &str) -> Result<NodeClient<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    Ok(NodeClient::new(ch))
}

async fn status(node: &str) -> Result<Report> {
    let map: ShardMap = client(node)?
        .shard_map(ShardMapRequest {
            consistency: Consistency::Stale as i32,
        })
        .await
        .with_context(|| format!("asking {node} for the shard map"))?
        .into_inner();
    let mut statuses: BTreeMap<u64, StatusReply> = BTreeMap::new();
    for n in &map.nodes {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), async {
            client(&n.addr)?
                .status(StatusRequest {})
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        {
            statuses.insert(n.id, r.into_inner());
        }
    }
    let nodes: Vec<NodeRow> = map
        .nodes
        .iter()
        .map(|n| NodeRow {
            id: n.id,
            addr: n.addr.clone(),
            region: n.region.clone(),
            up: statuses.contains_key(&n.id),
        })
        .collect();
    let mut shards = Vec::new();
    for p in &map.shards {
        let mut applied = BTreeMap::new();
        let mut leader = None;
        let mut term = 0;
        for r in &p.replicas {
            if let Some(g) = statuses
                .get(r)
                .and_then(|s| s.groups.iter().find(|g| g.group == p.shard))
            {
                applied.insert(*r, g.applied_index);
                if g.term >= term {
                    term = g.term;
                    leader = (g.leader_id != 0).then_some(g.leader_id);
                }
            }
        }
        let top = leader.and_then(|l| applied.get(&l)).copied().unwrap_or(0);
        let lag = applied
            .values()
            .map(|a| top.saturating_sub(*a))
            .max()
            .unwrap_or(0);
        shards.push(ShardRow {
            shard: p.shard,
            replicas: p.replicas.clone(),
            leader,
            term,
            applied,
            lag,
        });
    }
    let up = nodes.iter().filter(|n| n.up).count();
    let led = shards.iter().filter(|s| s.leader.is_some()).count();
    let healthy = up == nodes.len() && led == shards.len();
    let summary = format!(
        "{up}/{} nodes up, {led}/{} shards with a leader, max lag {} entries",
        nodes.len(),
        shards.len(),
        shards.iter().map(|s| s.lag).max().unwrap_or(0)
    );
    Ok(Report {
        nodes,
        shards,
        summary,
        healthy,
    })
}

fn print(r: &Report) {
    println!("NODE  ADDRESS               REGION    STATE");
    for n in &r.nodes {
        println!(
            "{:<5} {:<21} {:<9} {}",
            n.id,
            n.addr,
            n.region,
            if n.up { "up" } else { "DOWN" }
        );
    }
    println!();
    println!("SHARD  REPLICAS      LEADER  TERM  APPLIED (per replica)          LAG");
    for s in &r.shards {
        let replicas = s
            .replicas
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let applied = s
            .applied
            .iter()
            .map(|(n, a)| format!("{n}:{a}"))
            .collect::<Vec<_>>()
            .join(" ");
        let leader = s
            .leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:<13} {:<7} {:<5} {:<30} {}",
            s.shard, replicas, leader, s.term, applied, s.lag
        );
    }
    println!();
    println!("{}", r.summary);
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Status { json } => {
            let r = status(&args.node).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print(&r);
            }
            if !r.healthy {
                std::process::exit(3);
            }
        }
        Cmd::TransferLeader { shard, to } => {
            let r = status(&args.node).await?;
            let Some(s) = r.shards.iter().find(|s| s.shard == shard) else {
                bail!("no shard {shard}")
            };
            let Some(leader) = s.leader else {
                bail!("shard {shard} has no leader right now")
            };
            let addr = r
                .nodes
                .iter()
                .find(|n| n.id == leader)
                .map(|n| n.addr.clone())
                .context("leader address")?;
            client(&addr)?
                .transfer_leader(TransferLeaderRequest { shard, to })
                .await?;
            println!("shard {shard}: leadership handed from node {leader} to node {to}");
        }
    }
    Ok(())
}
