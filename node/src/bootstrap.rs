//! Which groups a node starts, and the creation of a new cluster.
//!
//! Every node of the initial cluster computes the same initial placement from
//! its configuration, starts the meta group and the shards placed on it, plus
//! any group it has Raft state for on disk (a restart). The meta group is
//! initialized by the smallest node id, each shard by its first choice
//! (`meta::first_choice`, spread evenly, so leaderships start balanced);
//! initializing a group that already has state is a no-op, so a restart
//! during bootstrap is safe.
//! Finally the meta group's leader records the layout (`Init`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use natter_model::Model;
use natter_proto::cluster::{
    meta_command::Op, MetaCommand, MetaResponse, NodeInfo, ShardMap, ShardPlacement,
};
use natter_raft_store::{Consistency, RaftHost};
use prost::Message;

use crate::config::Config;
use crate::meta::{first_choice, initial_placement, Meta};
use crate::META_GROUP;

pub async fn start_groups(host: &Arc<RaftHost>, cfg: &Config) -> Result<()> {
    let me = cfg.node_id;
    let on_disk = host.groups_on_disk()?;
    if !cfg.initial_cluster.contains_key(&me) && on_disk.is_empty() && cfg.join.is_none() {
        bail!("node {me} is not in the initial cluster and has no data: start it with --join <any node's address> to join a running cluster");
    }
    let nodes: Vec<u64> = cfg.initial_cluster.keys().copied().collect();
    let placement = initial_placement(&nodes, cfg.shards, cfg.replicas);

    let mut mine: BTreeSet<u32> = on_disk
        .iter()
        .copied()
        .filter(|g| *g != META_GROUP)
        .collect();
    // Replicas moved away from this node (tombstoned) stay away, and are
    // never initialized again.
    let mut moved_away = BTreeSet::new();
    for p in &placement {
        if host.is_removed(p.shard)? {
            moved_away.insert(p.shard);
        } else if p.replicas.contains(&me) {
            mine.insert(p.shard);
        }
    }
    host.start_group(META_GROUP, Arc::new(Meta)).await?;
    for g in &mine {
        host.start_group(*g, Arc::new(Model)).await?;
    }

    let addr_of = |ids: &[u64]| -> BTreeMap<u64, String> {
        ids.iter()
            .filter_map(|id| cfg.initial_cluster.get(id).map(|a| (*id, a.clone())))
            .collect()
    };
    // Only groups without state are initialized (a no-op otherwise, but a
    // noisy one).
    if nodes.first() == Some(&me) && !on_disk.contains(&META_GROUP) {
        host.initialize(META_GROUP, &cfg.initial_cluster).await?;
    }
    for p in &placement {
        if first_choice(&nodes, p.shard) == Some(me)
            && !on_disk.contains(&p.shard)
            && !moved_away.contains(&p.shard)
        {
            host.initialize(p.shard, &addr_of(&p.replicas)).await?;
        }
    }
    if cfg.initial_cluster.contains_key(&me) {
        // Every initial node computes the same layout; whichever leads the
        // meta group records it (Init is idempotent).
        let map = ShardMap {
            shard_count: cfg.shards,
            nodes: cfg
                .initial_cluster
                .iter()
                .map(|(id, addr)| NodeInfo {
                    id: *id,
                    addr: addr.clone(),
                    region: cfg.region.clone(),
                    draining: false,
                })
                .collect(),
            shards: placement
                .into_iter()
                .map(|p| ShardPlacement {
                    region: cfg.region.clone(),
                    ..p
                })
                .collect(),
            max_node_id: nodes.last().copied().unwrap_or(0),
        };
        let host = host.clone();
        tokio::spawn(async move {
            if let Err(e) = record_layout(&host, map).await {
                tracing::error!("recording the cluster layout failed: {e:#}");
            }
        });
    }
    Ok(())
}

/// Waits until the meta group holds the layout, proposing it whenever this
/// node is the meta leader.
async fn record_layout(host: &RaftHost, map: ShardMap) -> Result<()> {
    let cmd = MetaCommand {
        op: Some(Op::Init(map)),
    }
    .encode_to_vec();
    for _ in 0..1200 {
        let (raw, _) = host.read(META_GROUP, &[], Consistency::Stale).await?;
        if MetaResponse::decode(raw.as_slice())
            .context("meta response")?
            .map
            .is_some()
        {
            return Ok(());
        }
        if host.is_leader(META_GROUP) {
            match host.propose(META_GROUP, cmd.clone()).await {
                Ok(p) => {
                    let r = MetaResponse::decode(p.response.as_slice()).context("meta response")?;
                    if !r.error.is_empty() {
                        bail!("meta group refused the layout: {}", r.error);
                    }
                    return Ok(());
                }
                Err(e) => tracing::debug!("meta group not ready: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the cluster layout was not recorded within 120 s")
}
