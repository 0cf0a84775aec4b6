//! `natter-admin`: operator commands against a running cluster, over the
//! nodes' gRPC API.
//!
//! - `status`: nodes (up/down), every shard's replicas, leader, applied
//!   index and replica lag, and a summary line; `--json` for machines.
//! - `transfer-leader --shard S --to N`: hands a shard's leadership to node N.
//! - `drain N [--wait]`: the rebalancer moves every leadership and replica off
//!   node N; `undrain N` takes it back.
//! - `remove-node N`: removes a drained node (it holds no replica) from the
//!   cluster and tells it to retire; its id is never reused.
//!
//! Adding a node needs no command: start it with `--join ADDR` (see
//! docs/operations.md); the rebalancer moves replicas onto it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use natter_node::membership::fetch_map;
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{
    meta_command::Op, Consistency, DrainNode, ShardMap, ShardMapRequest, StatusReply,
    StatusRequest, TransferLeaderRequest,
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
    /// Moves every leadership and replica off a node (the rebalancer does it).
    Drain {
        id: u64,
        /// Wait until the node holds no replica and leads nothing.
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Takes a node back after `drain` (replicas may move back onto it).
    Undrain { id: u64 },
    /// Removes a drained node from the cluster; it then retires (deletes its
    /// data, never starts again) and its process can be stopped.
    RemoveNode {
        id: u64,
        /// Longest wait for the meta group to let the node go, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Serialize)]
struct NodeRow {
    id: u64,
    addr: String,
    region: String,
    up: bool,
    draining: bool,
    /// Replicas placed on the node, and shards it leads.
    replicas: usize,
    leads: usize,
}

#[derive(Serialize)]
struct ShardRow {
    shard: u32,
    replicas: Vec<u64>,
    leader: Option<u64>,
    term: u64,
    /// The leader's commit index (0 without a leader).
    committed: u64,
    /// Applied index per replica that answered.
    applied: BTreeMap<u64, u64>,
    /// Members not yet voting (a move in progress).
    learners: Vec<u64>,
    /// Leader's applied index minus the slowest answering replica's.
    lag: u64,
    /// Appends the leader sent to followers during its own fsync (eager
    /// replication), since it started.
    eager_appends: u64,
    /// The leader's own appends that an eager request's answer stood in for.
    eager_answered: u64,
    /// Empty appends (commit notices, heartbeats) a recent eager answer
    /// answered instead.
    notices_spared: u64,
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
    let mut nodes: Vec<NodeRow> = map
        .nodes
        .iter()
        .map(|n| NodeRow {
            id: n.id,
            addr: n.addr.clone(),
            region: n.region.clone(),
            up: statuses.contains_key(&n.id),
            draining: n.draining,
            replicas: map
                .shards
                .iter()
                .filter(|s| s.replicas.contains(&n.id))
                .count(),
            leads: 0,
        })
        .collect();
    let mut shards = Vec::new();
    for p in &map.shards {
        let mut applied = BTreeMap::new();
        let mut leader = None;
        let mut term = 0;
        let mut committed = 0;
        let mut learners = Vec::new();
        let (mut eager_appends, mut eager_answered, mut notices_spared) = (0, 0, 0);
        for (id, s) in &statuses {
            let Some(g) = s.groups.iter().find(|g| g.group == p.shard) else {
                continue;
            };
            if p.replicas.contains(id) || g.state == "Learner" {
                applied.insert(*id, g.applied_index);
            }
            if g.term >= term {
                term = g.term;
                leader = (g.leader_id != 0).then_some(g.leader_id);
            }
            if g.state == "Leader" {
                committed = g.committed_index;
                learners = g.learners.clone();
                eager_appends = g.eager_appends;
                eager_answered = g.eager_answered;
                notices_spared = g.notices_spared;
            }
        }
        if let Some(n) = leader.and_then(|l| nodes.iter_mut().find(|n| n.id == l)) {
            n.leads += 1;
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
            committed,
            applied,
            learners,
            lag,
            eager_appends,
            eager_answered,
            notices_spared,
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
    println!("NODE  ADDRESS               REGION    STATE     REPLICAS  LEADS");
    for n in &r.nodes {
        let state = match (n.up, n.draining) {
            (true, false) => "up",
            (true, true) => "draining",
            (false, _) => "DOWN",
        };
        println!(
            "{:<5} {:<21} {:<9} {:<9} {:<9} {}",
            n.id, n.addr, n.region, state, n.replicas, n.leads
        );
    }
    println!();
    println!("SHARD  REPLICAS      LEADER  TERM  COMMIT   APPLIED (per replica)          LAG");
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
        let learners = if s.learners.is_empty() {
            String::new()
        } else {
            format!("  (learners {:?})", s.learners)
        };
        println!(
            "{:<6} {:<13} {:<7} {:<5} {:<8} {:<30} {}{learners}",
            s.shard, replicas, leader, s.term, s.committed, applied, s.lag
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
        Cmd::Drain { id, wait, timeout } => {
            meta(&args.node, Op::Drain(DrainNode { id, draining: true })).await?;
            println!(
                "node {id} is draining: the rebalancer moves its leaderships and replicas off"
            );
            if wait {
                let deadline = Instant::now() + Duration::from_secs(timeout);
                loop {
                    let r = status(&args.node).await?;
                    let n = r.nodes.iter().find(|n| n.id == id).context("node gone")?;
                    let learning = r.shards.iter().any(|s| s.learners.contains(&id));
                    if n.replicas == 0 && n.leads == 0 && !learning {
                        println!("node {id} holds no replica and leads nothing");
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "node {id} still holds {} replicas and leads {} shards",
                            n.replicas,
                            n.leads
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Cmd::Undrain { id } => {
            meta(
                &args.node,
                Op::Drain(DrainNode {
                    id,
                    draining: false,
                }),
            )
            .await?;
            println!("node {id} takes replicas again");
        }
        Cmd::RemoveNode { id, timeout } => {
            let map = fetch_map(&args.node).await?;
            let addr = map
                .nodes
                .iter()
                .find(|n| n.id == id)
                .map(|n| n.addr.clone())
                .with_context(|| format!("no node {id} in the cluster"))?;
            meta(&args.node, Op::RemoveNode(id)).await?;
            println!("node {id} removed from the registry (its id is never reused)");
            // The meta leader's rebalancer takes it out of the meta group and
            // tells it to retire; wait for that, telling it again if needed.
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let gone = natter_node::membership::statuses(&fetch_map(&args.node).await?)
                    .await
                    .values()
                    .find_map(|s| {
                        s.groups
                            .iter()
                            .find(|g| g.group == 0 && g.state == "Leader")
                            .map(|g| !g.voters.contains(&id) && !g.learners.contains(&id))
                    })
                    .unwrap_or_default();
                if gone {
                    match natter_node::membership::retire(&addr, id).await {
                        Ok(()) => println!("node {id} retired: its process can be stopped"),
                        Err(e) => println!("node {id} did not answer ({e:#}); it refuses to start again when it comes back"),
                    }
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {id} is still in the meta group after {timeout} s");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    Ok(())
}

/// Proposes a meta command through `node`; a refusal is an error.
async fn meta(node: &str, op: Op) -> Result<ShardMap> {
    let r = natter_node::membership::propose_meta(&[node.to_string()], op, Duration::from_secs(30))
        .await?;
    if !r.error.is_empty() {
        bail!("refused: {}", r.error);
    }
    r.map.context("no shard map in the answer")
}
