//! Cluster membership (issue 8): joining, the rebalancer, removed nodes and
//! the leadership hand-off of a graceful shutdown.
//!
//! - A node started with `--join ADDR` and an empty data dir asks the meta
//!   group (through ADDR, following NotLeader) for a fresh id: `Join` assigns
//!   `max_node_id + 1`, so ids are never reused. On restart it reads its id
//!   from its data dir.
//! - The **rebalancer** runs on whichever node leads the meta group, one
//!   round at a time. A round looks at every node's status and the shard map,
//!   then does at most one thing: fix the meta group's membership, clean up a
//!   stray replica, move leaderships off a draining node, move one replica
//!   (learner → caught up → voter, old replica out and deleted, placement
//!   updated), or move one leadership to even them out. Moves are strictly
//!   one at a time in the whole cluster, so a node never takes part in two.
//! - Placement rules: never two replicas of a shard on one node, a shard's
//!   replicas stay in its region, draining nodes end up with none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use natter_model::Model;
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{
    meta_command::Op, propose_reply, ChangeReplicasRequest, Consistency as PbConsistency,
    GroupStatus, HostReplicaRequest, MetaCommand, MetaResponse, NodeInfo, ProposeRequest,
    RetireRequest, ShardMap, ShardMapRequest, ShardPlacement, StatusReply, StatusRequest,
    TransferLeaderRequest,
};
use natter_raft_store::{Consistency, RaftHost};
use prost::Message;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::meta::Meta;
use crate::META_GROUP;

/// Meta voters wanted (fewer when the cluster has fewer nodes).
pub const META_VOTERS: usize = 3;
/// Pause between rebalancer rounds that found nothing to do.
const IDLE: Duration = Duration::from_millis(500);
/// Longest a learner may take to catch up before a move is abandoned.
const CATCH_UP: Duration = Duration::from_secs(120);

pub fn client(addr: &str, timeout: Duration) -> Result<NodeClient<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(NodeClient::new(ch)
        .max_decoding_message_size(crate::api::MAX_REQUEST_BYTES)
        .max_encoding_message_size(crate::api::MAX_REQUEST_BYTES))
}

/// Proposes a meta command through any of `seeds`, following NotLeader
/// answers to the meta leader, retrying for up to `timeout`. Returns the meta
/// group's answer (whose `error` may be set: a refusal, not a failure).
pub async fn propose_meta(seeds: &[String], op: Op, timeout: Duration) -> Result<MetaResponse> {
    let cmd = MetaCommand { op: Some(op) }.encode_to_vec();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut targets: Vec<String> = seeds.to_vec();
    let mut note = String::from("no address to ask");
    loop {
        let mut next = Vec::new();
        for addr in &targets {
            let reply = match client(addr, Duration::from_secs(10))?
                .propose(ProposeRequest {
                    shard: META_GROUP,
                    command: cmd.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    note = format!("{addr}: {}", s.message());
                    continue;
                }
            };
            match reply.result {
                Some(propose_reply::Result::Response(raw)) => {
                    return MetaResponse::decode(raw.as_slice()).context("meta response")
                }
                Some(propose_reply::Result::NotLeader(nl)) => {
                    note = format!("{addr}: not the meta leader (leader {})", nl.leader_id);
                    if !nl.leader_addr.is_empty() && !next.contains(&nl.leader_addr) {
                        next.push(nl.leader_addr);
                    }
                }
                None => note = format!("{addr}: empty reply"),
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the meta group did not take the command: {note}");
        }
        for s in seeds {
            if !next.contains(s) {
                next.push(s.clone());
            }
        }
        targets = next;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The shard map as `addr` knows it.
pub async fn fetch_map(addr: &str) -> Result<ShardMap> {
    Ok(client(addr, Duration::from_secs(3))?
        .shard_map(ShardMapRequest {
            consistency: PbConsistency::Stale as i32,
        })
        .await
        .map_err(|s| anyhow!("{addr}: {}", s.message()))?
        .into_inner())
}

/// The id a node started with `--join` runs under: the one in its data dir,
/// or, for an empty data dir, a fresh one from the cluster.
pub async fn join_id(
    join: &str,
    data_dir: &std::path::Path,
    flag_id: u64,
    advertise: &str,
    region: &str,
) -> Result<u64> {
    if let Some(id) = natter_raft_store::db::stored_node_id(data_dir)? {
        if flag_id != 0 && flag_id != id {
            bail!(
                "{} belongs to node {id}, not node {flag_id}",
                data_dir.display()
            );
        }
        return Ok(id);
    }
    if flag_id != 0 {
        bail!("a joining node gets its id from the cluster: drop --node-id (ids are never reused)");
    }
    let r = propose_meta(
        &[join.to_string()],
        Op::Join(NodeInfo {
            id: 0,
            addr: advertise.to_string(),
            region: region.to_string(),
            draining: false,
        }),
        Duration::from_secs(60),
    )
    .await
    .with_context(|| format!("joining the cluster through {join}"))?;
    if !r.error.is_empty() {
        bail!("the cluster refused the join: {}", r.error);
    }
    if r.node_id == 0 {
        bail!("the cluster answered the join without an id");
    }
    tracing::info!(node = r.node_id, "joined the cluster");
    Ok(r.node_id)
}

/// Start-up check of a node that has data: when a peer answers and the
/// cluster no longer lists this node (its id was assigned, then removed),
/// the node retires (deletes its groups, writes the tombstone) and refuses
/// to start. When no peer answers, it cannot tell, and starts.
pub async fn refuse_if_removed(host: &RaftHost, seeds: &[String]) -> Result<()> {
    let me = host.node_id();
    for addr in seeds {
        let Ok(Ok(map)) = tokio::time::timeout(Duration::from_secs(3), fetch_map(addr)).await
        else {
            continue;
        };
        if map.nodes.iter().any(|n| n.id == me) {
            return Ok(());
        }
        if map.max_node_id >= me {
            host.retire().await?;
            bail!("node {me} was removed from the cluster ({addr} says so); it retired and will not start again");
        }
        return Ok(());
    }
    Ok(())
}

async fn status_of(addr: &str) -> Result<StatusReply> {
    Ok(client(addr, Duration::from_secs(2))?
        .status(StatusRequest {})
        .await
        .map_err(|s| anyhow!("{addr}: {}", s.message()))?
        .into_inner())
}

/// Every node's status, by id; nodes that do not answer are absent.
pub async fn statuses(map: &ShardMap) -> BTreeMap<u64, StatusReply> {
    let asks = map.nodes.iter().map(|n| async move {
        let r = tokio::time::timeout(Duration::from_secs(3), status_of(&n.addr)).await;
        (n.id, r)
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|(id, r)| match r {
            Ok(Ok(s)) => Some((id, s)),
            _ => None,
        })
        .collect()
}

/// A shard as its leader sees it.
#[derive(Debug, Clone)]
pub struct ShardView {
    pub shard: u32,
    pub leader: u64,
    pub term: u64,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
}

/// Each group's leader view (the highest-term node reporting itself leader).
pub fn leader_views(statuses: &BTreeMap<u64, StatusReply>) -> BTreeMap<u32, ShardView> {
    let mut out: BTreeMap<u32, ShardView> = BTreeMap::new();
    for (id, st) in statuses {
        for g in st.groups.iter().filter(|g| g.state == "Leader") {
            if out.get(&g.group).is_some_and(|v| v.term >= g.term) {
                continue;
            }
            out.insert(g.group, view(*id, g));
        }
    }
    out
}

fn view(id: u64, g: &GroupStatus) -> ShardView {
    ShardView {
        shard: g.group,
        leader: id,
        term: g.term,
        voters: g.voters.iter().copied().collect(),
        learners: g.learners.iter().copied().collect(),
    }
}

/// One step the rebalancer takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Record the shard's actual voters as its placement.
    SetPlacement { shard: u32, replicas: Vec<u64> },
    /// Take a learner left by an abandoned move out of the group.
    DropLearner { shard: u32, leader: u64, node: u64 },
    /// Delete a replica a node still hosts though it is no member.
    DropStray { shard: u32, node: u64 },
    /// Hand a shard's leadership to another voter.
    Transfer { shard: u32, from: u64, to: u64 },
    /// Move one replica.
    Move {
        shard: u32,
        leader: u64,
        from: u64,
        to: u64,
    },
}

fn region_of(map: &ShardMap, p: &ShardPlacement) -> String {
    if !p.region.is_empty() {
        return p.region.clone();
    }
    p.replicas
        .iter()
        .find_map(|r| map.nodes.iter().find(|n| n.id == *r))
        .map(|n| n.region.clone())
        .unwrap_or_default()
}

/// Plans the next data-shard step from the shard map, which nodes answer,
/// and each shard's leader view. Pure, so the placement rules are unit
/// tested. Priority: bookkeeping (placement, leftovers), then leaderships
/// off draining nodes, then replica moves, then leader balance.
pub fn plan(
    map: &ShardMap,
    up: &BTreeSet<u64>,
    hosted: &BTreeMap<u64, BTreeSet<u32>>,
    views: &BTreeMap<u32, ShardView>,
) -> Option<Step> {
    let node = |id: u64| map.nodes.iter().find(|n| n.id == id);
    let eligible = |id: u64| up.contains(&id) && node(id).is_some_and(|n| !n.draining);
    // Bookkeeping.
    for p in &map.shards {
        let Some(v) = views.get(&p.shard) else {
            continue;
        };
        if let Some(l) = v.learners.iter().next() {
            return Some(Step::DropLearner {
                shard: p.shard,
                leader: v.leader,
                node: *l,
            });
        }
        let voters: Vec<u64> = v.voters.iter().copied().collect();
        let mut placed = p.replicas.clone();
        placed.sort_unstable();
        if placed != voters && voters.iter().all(|id| node(*id).is_some()) {
            return Some(Step::SetPlacement {
                shard: p.shard,
                replicas: voters,
            });
        }
    }
    for (node_id, groups) in hosted {
        for g in groups.iter().filter(|g| **g != META_GROUP) {
            if let Some(v) = views.get(g) {
                if !v.voters.contains(node_id) && !v.learners.contains(node_id) {
                    return Some(Step::DropStray {
                        shard: *g,
                        node: *node_id,
                    });
                }
            }
        }
    }
    // Every shard needs a known leader before anything moves.
    if map.shards.iter().any(|p| !views.contains_key(&p.shard)) {
        return None;
    }
    let leads = |id: u64| views.values().filter(|v| v.leader == id).count();
    // Leaderships off draining nodes first.
    for v in views.values() {
        if node(v.leader).is_some_and(|n| n.draining) || node(v.leader).is_none() {
            if let Some(to) = v
                .voters
                .iter()
                .copied()
                .filter(|id| *id != v.leader && eligible(*id))
                .min_by_key(|id| (leads(*id), *id))
            {
                return Some(Step::Transfer {
                    shard: v.shard,
                    from: v.leader,
                    to,
                });
            }
        }
    }
    // Replica moves.
    let count = |id: u64| views.values().filter(|v| v.voters.contains(&id)).count();
    let mut best: Option<(usize, Step)> = None;
    for p in &map.shards {
        let v = &views[&p.shard];
        let region = region_of(map, p);
        let targets: Vec<u64> = map
            .nodes
            .iter()
            .filter(|n| {
                (region.is_empty() || n.region == region)
                    && eligible(n.id)
                    && !v.voters.contains(&n.id)
            })
            .map(|n| n.id)
            .collect();
        let Some(to) = targets.iter().copied().min_by_key(|id| (count(*id), *id)) else {
            continue;
        };
        for from in v.voters.iter().copied() {
            let leaving = node(from).is_none_or(|n| n.draining);
            // A draining node's replicas go first (priority 0); otherwise
            // move from the fullest node when it has 2+ more than `to`.
            let priority = if leaving {
                0
            } else if up.contains(&from) && count(from) > count(to) + 1 {
                usize::MAX - (count(from) - count(to))
            } else {
                continue;
            };
            if best.as_ref().is_none_or(|(b, _)| priority < *b) {
                best = Some((
                    priority,
                    Step::Move {
                        shard: p.shard,
                        leader: v.leader,
                        from,
                        to,
                    },
                ));
            }
        }
    }
    if let Some((_, step)) = best {
        return Some(step);
    }
    // Leader balance among eligible nodes.
    let eligible_count = map.nodes.iter().filter(|n| eligible(n.id)).count().max(1);
    let fair = views.len().div_ceil(eligible_count);
    let mut best: Option<(usize, Step)> = None;
    for v in views.values() {
        let from = v.leader;
        for to in v.voters.iter().copied().filter(|id| eligible(*id)) {
            let (lf, lt) = (leads(from), leads(to));
            // Only above the fair share: an operator's transfer that leaves
            // every node at or below it is not undone.
            if lf > lt + 1 && lf > fair && best.as_ref().is_none_or(|(gap, _)| lf - lt > *gap) {
                best = Some((
                    lf - lt,
                    Step::Transfer {
                        shard: v.shard,
                        from,
                        to,
                    },
                ));
            }
        }
    }
    best.map(|(_, s)| s)
}

/// Runs the rebalancer whenever this node leads the meta group.
pub fn spawn_rebalancer(
    host: Arc<RaftHost>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if *stop.borrow() {
                return;
            }
            let mut pause = IDLE;
            if host.is_leader(META_GROUP) {
                match round(&host).await {
                    Ok(true) => pause = Duration::from_millis(50),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("rebalancer: {e:#}"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    })
}

async fn meta_map(host: &RaftHost) -> Result<ShardMap> {
    let (raw, _) = host
        .read(META_GROUP, &[], Consistency::Linearizable)
        .await?;
    MetaResponse::decode(raw.as_slice())?
        .map
        .ok_or_else(|| anyhow!("cluster layout not recorded yet"))
}

async fn propose_local(host: &RaftHost, op: Op) -> Result<ShardMap> {
    let p = host
        .propose(META_GROUP, MetaCommand { op: Some(op) }.encode_to_vec())
        .await?;
    let r = MetaResponse::decode(p.response.as_slice())?;
    if !r.error.is_empty() {
        bail!("meta group refused: {}", r.error);
    }
    r.map.ok_or_else(|| anyhow!("no map in meta answer"))
}

fn addr_of(map: &ShardMap, id: u64) -> Result<String> {
    map.nodes
        .iter()
        .find(|n| n.id == id)
        .map(|n| n.addr.clone())
        .ok_or_else(|| anyhow!("node {id} is not registered"))
}

/// One rebalancer round; true when it changed something.
async fn round(host: &Arc<RaftHost>) -> Result<bool> {
    let map = meta_map(host).await?;
    let st = statuses(&map).await;
    let me = host.node_id();
    // A draining meta leader hands the meta group (and so this job) on.
    if map.nodes.iter().any(|n| n.id == me && n.draining) {
        if let Some(to) = host
            .status()
            .into_iter()
            .find(|g| g.group == META_GROUP)
            .and_then(|g| {
                g.voters.into_iter().find(|v| {
                    *v != me
                        && st.contains_key(v)
                        && map.nodes.iter().any(|n| n.id == *v && !n.draining)
                })
            })
        {
            tracing::info!(to, "draining: handing the meta group's leadership on");
            let addr = addr_of(&map, to)?;
            crate::api::transfer(host, META_GROUP, to, &addr)
                .await
                .map_err(|s| anyhow!("{}", s.message()))?;
            return Ok(true);
        }
    }
    if meta_membership(host, &map, &st).await? {
        return Ok(true);
    }
    let up: BTreeSet<u64> = st.keys().copied().collect();
    let hosted: BTreeMap<u64, BTreeSet<u32>> = st
        .iter()
        .map(|(id, s)| (*id, s.groups.iter().map(|g| g.group).collect()))
        .collect();
    let mut views = leader_views(&st);
    views.remove(&META_GROUP);
    let Some(step) = plan(&map, &up, &hosted, &views) else {
        return Ok(false);
    };
    tracing::info!(?step, "rebalancer step");
    match step {
        Step::SetPlacement { shard, replicas } => {
            let region = map
                .shards
                .iter()
                .find(|p| p.shard == shard)
                .map(|p| p.region.clone())
                .unwrap_or_default();
            propose_local(
                host,
                Op::SetPlacement(ShardPlacement {
                    shard,
                    replicas,
                    region,
                }),
            )
            .await?;
        }
        Step::DropLearner {
            shard,
            leader,
            node,
        } => {
            client(&addr_of(&map, leader)?, Duration::from_secs(30))?
                .change_replicas(ChangeReplicasRequest {
                    shard,
                    remove_learners: vec![node],
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow!("shard {shard}: {}", s.message()))?;
        }
        Step::DropStray { shard, node } => {
            client(&addr_of(&map, node)?, Duration::from_secs(30))?
                .host_replica(HostReplicaRequest { shard, host: false })
                .await
                .map_err(|s| anyhow!("node {node} shard {shard}: {}", s.message()))?;
        }
        Step::Transfer { shard, from, to } => {
            client(&addr_of(&map, from)?, Duration::from_secs(40))?
                .transfer_leader(TransferLeaderRequest { shard, to })
                .await
                .map_err(|s| anyhow!("shard {shard} to node {to}: {}", s.message()))?;
        }
        Step::Move {
            shard,
            leader,
            from,
            to,
        } => {
            if leader == from {
                // The leader does not remove itself: hand the shard on first.
                let views_for = &views[&shard];
                let Some(next) = views_for
                    .voters
                    .iter()
                    .copied()
                    .find(|v| *v != from && up.contains(v))
                else {
                    bail!("shard {shard}: no other live voter to lead it");
                };
                client(&addr_of(&map, from)?, Duration::from_secs(40))?
                    .transfer_leader(TransferLeaderRequest { shard, to: next })
                    .await
                    .map_err(|s| anyhow!("shard {shard} to node {next}: {}", s.message()))?;
                return Ok(true);
            }
            move_replica(&map, &views[&shard], from, to).await?;
        }
    }
    Ok(true)
}

/// Learner on `to`, caught up, promoted in `from`'s place; `from`'s replica
/// deleted; placement recorded.
async fn move_replica(map: &ShardMap, v: &ShardView, from: u64, to: u64) -> Result<()> {
    let shard = v.shard;
    let to_addr = addr_of(map, to)?;
    client(&to_addr, Duration::from_secs(30))?
        .host_replica(HostReplicaRequest { shard, host: true })
        .await
        .map_err(|s| anyhow!("node {to}: starting shard {shard}: {}", s.message()))?;
    let mut voters: BTreeSet<u64> = v.voters.clone();
    voters.remove(&from);
    voters.insert(to);
    let reply = client(&addr_of(map, v.leader)?, CATCH_UP)?
        .change_replicas(ChangeReplicasRequest {
            shard,
            add_learner: to,
            learner_addr: to_addr,
            voters: voters.iter().copied().collect(),
            remove_learners: vec![],
        })
        .await
        .map_err(|s| anyhow!("shard {shard}: moving {from} -> {to}: {}", s.message()))?
        .into_inner();
    tracing::info!(shard, from, to, voters = ?reply.voters, "replica moved");
    // The old replica is no member now: delete it (a failure is retried by
    // a later round's stray clean-up).
    if let Ok(addr) = addr_of(map, from) {
        if let Err(e) = client(&addr, Duration::from_secs(30))?
            .host_replica(HostReplicaRequest { shard, host: false })
            .await
        {
            tracing::warn!(
                shard,
                node = from,
                "deleting the old replica: {}",
                e.message()
            );
        }
    }
    Ok(())
}

/// Keeps the meta group's membership in line with the registry: every
/// registered live node a member (learner), up to [`META_VOTERS`] voters
/// among non-draining nodes, removed nodes out (then told to retire).
/// True when it changed something.
async fn meta_membership(
    host: &Arc<RaftHost>,
    map: &ShardMap,
    st: &BTreeMap<u64, StatusReply>,
) -> Result<bool> {
    let Some(g) = host.status().into_iter().find(|g| g.group == META_GROUP) else {
        return Ok(false);
    };
    let me = host.node_id();
    let members: BTreeSet<u64> = g.voters.iter().chain(g.learners.iter()).copied().collect();
    let registered = |id: u64| map.nodes.iter().any(|n| n.id == id);
    // New nodes in as learners.
    for n in &map.nodes {
        if !members.contains(&n.id) && st.contains_key(&n.id) {
            tracing::info!(node = n.id, "adding the node to the meta group");
            client(&n.addr, Duration::from_secs(10))?
                .host_replica(HostReplicaRequest {
                    shard: META_GROUP,
                    host: true,
                })
                .await
                .map_err(|s| anyhow!("node {}: {}", n.id, s.message()))?;
            tokio::time::timeout(CATCH_UP, host.add_learner(META_GROUP, n.id, &n.addr))
                .await
                .map_err(|_| anyhow!("node {} did not catch up on the meta group", n.id))??;
            return Ok(true);
        }
    }
    // Voters: registered ones, topped up from live non-draining learners.
    let good = |id: &u64| {
        registered(*id)
            && map.nodes.iter().any(|n| n.id == *id && !n.draining)
            && (st.contains_key(id) || *id == me)
    };
    let mut voters: BTreeSet<u64> = g
        .voters
        .iter()
        .copied()
        .filter(|v| registered(*v))
        .collect();
    let want = META_VOTERS
        .min(map.nodes.iter().filter(|n| !n.draining).count())
        .max(1);
    // Draining voters give way when a replacement exists.
    for v in g.voters.iter().copied() {
        if voters.len() >= want && !good(&v) && v != me && voters.contains(&v) {
            let replacement = g
                .learners
                .iter()
                .copied()
                .find(|l| good(l) && !voters.contains(l));
            if let Some(r) = replacement {
                voters.remove(&v);
                voters.insert(r);
            }
        }
    }
    for l in g.learners.iter().copied() {
        if voters.len() >= want {
            break;
        }
        if good(&l) {
            voters.insert(l);
        }
    }
    let current: BTreeSet<u64> = g.voters.iter().copied().collect();
    if voters != current && !voters.is_empty() && voters.contains(&me) {
        tracing::info!(?current, ?voters, "changing the meta group's voters");
        host.change_voters(META_GROUP, voters).await?;
        return Ok(true);
    }
    // Removed nodes out of the meta group, then retired.
    let gone: BTreeSet<u64> = members
        .iter()
        .copied()
        .filter(|m| !registered(*m))
        .collect();
    if !gone.is_empty() && gone.iter().all(|m| !current.contains(m)) {
        tracing::info!(?gone, "removing removed nodes from the meta group");
        host.remove_learners(META_GROUP, gone.clone()).await?;
        for id in gone {
            if let Some(addr) = host.member_addr(META_GROUP, id) {
                let _ = retire(&addr, id).await;
            }
        }
        return Ok(true);
    }
    Ok(false)
}

/// Tells a removed node to retire.
pub async fn retire(addr: &str, id: u64) -> Result<()> {
    client(addr, Duration::from_secs(30))?
        .retire(RetireRequest { node_id: id })
        .await
        .map_err(|s| anyhow!("{addr}: {}", s.message()))?;
    Ok(())
}

/// Graceful shutdown: hands every leadership this node holds to another
/// voter, all groups at once, within `budget`.
pub async fn hand_off_all(host: &Arc<RaftHost>, budget: Duration) {
    let me = host.node_id();
    let led: Vec<(u32, u64, String)> = host
        .status()
        .into_iter()
        .filter(|g| g.leader == Some(me) && g.state == "Leader")
        .filter_map(|g| {
            let to = g.voters.iter().copied().find(|v| *v != me)?;
            let addr = host.member_addr(g.group, to)?;
            Some((g.group, to, addr))
        })
        .collect();
    if led.is_empty() {
        return;
    }
    tracing::info!(
        groups = led.len(),
        "handing leaderships off before stopping"
    );
    let jobs = led.into_iter().map(|(group, to, addr)| {
        let host = host.clone();
        async move {
            if let Err(e) = crate::api::transfer(&host, group, to, &addr).await {
                tracing::warn!(group, to, "hand-off at shutdown: {}", e.message());
            }
        }
    });
    let _ = tokio::time::timeout(budget, futures::future::join_all(jobs)).await;
}

/// Handles `HostReplica` on this node: start an empty replica (the meta
/// group's or a data shard's) or delete one.
pub async fn host_replica(host: &Arc<RaftHost>, shard: u32, on: bool) -> Result<()> {
    if on {
        if shard == META_GROUP {
            host.host_new_replica(shard, Arc::new(Meta)).await?;
        } else {
            host.host_new_replica(shard, Arc::new(Model)).await?;
        }
    } else {
        if shard == META_GROUP {
            bail!("the meta group's replica is removed by retiring the node");
        }
        host.remove_replica(shard).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(nodes: &[(u64, &str, bool)], shards: &[(u32, &[u64])]) -> ShardMap {
        ShardMap {
            shard_count: shards.len() as u32,
            nodes: nodes
                .iter()
                .map(|(id, region, draining)| NodeInfo {
                    id: *id,
                    addr: format!("n{id}"),
                    region: region.to_string(),
                    draining: *draining,
                })
                .collect(),
            shards: shards
                .iter()
                .map(|(s, r)| ShardPlacement {
                    shard: *s,
                    replicas: r.to_vec(),
                    region: "a".into(),
                })
                .collect(),
            max_node_id: nodes.iter().map(|n| n.0).max().unwrap_or(0),
        }
    }

    fn views(shards: &[(u32, u64, &[u64])]) -> BTreeMap<u32, ShardView> {
        shards
            .iter()
            .map(|(s, l, v)| {
                (
                    *s,
                    ShardView {
                        shard: *s,
                        leader: *l,
                        term: 1,
                        voters: v.iter().copied().collect(),
                        learners: BTreeSet::new(),
                    },
                )
            })
            .collect()
    }

    /// Applies moves/transfers to the views until the plan is empty.
    fn settle(m: &mut ShardMap, v: &mut BTreeMap<u32, ShardView>) -> usize {
        let up: BTreeSet<u64> = m.nodes.iter().map(|n| n.id).collect();
        let mut steps = 0;
        while let Some(step) = plan(m, &up, &BTreeMap::new(), v) {
            steps += 1;
            assert!(steps < 200, "does not converge: {step:?}");
            match step {
                Step::Move {
                    shard, from, to, ..
                } => {
                    let s = v.get_mut(&shard).unwrap();
                    assert!(!s.voters.contains(&to), "two replicas on one node");
                    s.voters.remove(&from);
                    s.voters.insert(to);
                }
                Step::Transfer { shard, to, .. } => v.get_mut(&shard).unwrap().leader = to,
                Step::SetPlacement { shard, replicas } => {
                    m.shards
                        .iter_mut()
                        .find(|p| p.shard == shard)
                        .unwrap()
                        .replicas = replicas
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        steps
    }

    #[test]
    fn a_new_node_gets_its_share_and_leaders_spread() {
        let all: &[u64] = &[1, 2, 3];
        let mut m = map(
            &[
                (1, "a", false),
                (2, "a", false),
                (3, "a", false),
                (4, "a", false),
                (5, "a", false),
            ],
            &[(1, all), (2, all), (3, all), (4, all), (5, all), (6, all)],
        );
        let mut v = views(&[
            (1, 1, all),
            (2, 1, all),
            (3, 1, all),
            (4, 2, all),
            (5, 2, all),
            (6, 3, all),
        ]);
        settle(&mut m, &mut v);
        for id in 1..=5u64 {
            let n = v.values().filter(|s| s.voters.contains(&id)).count();
            assert!((3..=4).contains(&n), "node {id} holds {n}");
            let l = v.values().filter(|s| s.leader == id).count();
            assert!(l <= 2, "node {id} leads {l}");
        }
        for p in &m.shards {
            assert_eq!(p.replicas.len(), 3);
        }
    }

    #[test]
    fn draining_empties_a_node_and_regions_are_kept() {
        let s: &[u64] = &[1, 2, 3];
        let t: &[u64] = &[4, 5, 6];
        let mut m = map(
            &[
                (1, "a", true),
                (2, "a", false),
                (3, "a", false),
                (7, "a", false),
                (4, "b", false),
                (5, "b", false),
                (6, "b", false),
                (8, "b", false),
            ],
            &[(1, s), (2, t)],
        );
        m.shards[1].region = "b".into();
        let mut v = views(&[(1, 1, s), (2, 4, t)]);
        settle(&mut m, &mut v);
        assert!(!v[&1].voters.contains(&1) && v[&1].leader != 1);
        assert!(v[&1].voters.contains(&7));
        assert!(v[&2].voters.iter().all(|n| [4, 5, 6, 8].contains(n)));
    }

    #[test]
    fn strays_and_learners_are_cleaned_before_moves() {
        let all: &[u64] = &[1, 2, 3];
        let m = map(
            &[
                (1, "a", false),
                (2, "a", false),
                (3, "a", false),
                (4, "a", false),
            ],
            &[(1, all)],
        );
        let mut v = views(&[(1, 1, all)]);
        let up: BTreeSet<u64> = [1, 2, 3, 4].into();
        let hosted = BTreeMap::from([(4, BTreeSet::from([0, 1]))]);
        assert_eq!(
            plan(&m, &up, &hosted, &v),
            Some(Step::DropStray { shard: 1, node: 4 })
        );
        v.get_mut(&1).unwrap().learners.insert(4);
        assert_eq!(
            plan(&m, &up, &hosted, &v),
            Some(Step::DropLearner {
                shard: 1,
                leader: 1,
                node: 4
            })
        );
    }
}
