//! Leader-side loops, one per data shard this node hosts. While this node
//! leads the shard, its loop:
//! - drains the shard's durable outbox: pending feed and friend-index updates
//!   are proposed to their target users' shards, then acknowledged back
//!   (`AckOutbox`; an ack deletes a row only if no newer update replaced it).
//!   A target shard that is down just means the rows stay and are retried;
//! - proposes `Tick` when the model says a message expiry is due, so expiry
//!   happens on every replica from a leader-stamped time.
//!
//! A loop wakes when its shard applies something new, or every second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use natter_model::pb;
use natter_raft_store::{Consistency, RaftHost};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{now_ms, stamp_query};
use crate::events::Events;
use crate::remote::Remote;
use crate::META_GROUP;

/// Outbox rows handled per round.
const OUTBOX_BATCH: u32 = 256;

pub fn spawn(
    host: Arc<RaftHost>,
    events: Events,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let remote = Arc::new(Remote::new(host.clone(), events));
    host.hosted()
        .into_iter()
        .filter(|g| *g != META_GROUP)
        .map(|shard| {
            let (host, remote, mut stop) = (host.clone(), remote.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        return;
                    }
                    if host.is_leader(shard) {
                        if let Err(e) = leader_round(&host, &remote, shard).await {
                            tracing::debug!(shard, "leader round: {e:#}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    tokio::select! {
                        _ = host.wait_applied_change(shard, Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                }
            })
        })
        .collect()
}

fn decode_response(raw: &[u8]) -> Result<pb::response::R> {
    pb::Response::decode(raw)?
        .r
        .ok_or_else(|| anyhow!("empty response"))
}

async fn query(host: &RaftHost, shard: u32, q: pb::query::Q) -> Result<pb::response::R> {
    let raw = pb::Query {
        now_ms: 0,
        q: Some(q),
    }
    .encode_to_vec();
    let (out, _) = host
        .read(shard, &stamp_query(&raw, now_ms())?, Consistency::Stale)
        .await?;
    decode_response(&out)
}

fn command(op: pb::command::Op) -> Vec<u8> {
    pb::Command {
        stamp: None,
        op: Some(op),
    }
    .encode_to_vec()
}

async fn leader_round(host: &RaftHost, remote: &Remote, shard: u32) -> Result<()> {
    drain_outbox(host, remote, shard).await?;
    if let pb::response::R::NextExpiry(n) =
        query(host, shard, pb::query::Q::NextExpiry(pb::NextExpiry {})).await?
    {
        if n.at_ms != 0 && n.at_ms <= now_ms() {
            remote
                .propose(shard, &command(pb::command::Op::Tick(pb::Tick {})))
                .await?;
        }
    }
    Ok(())
}

async fn drain_outbox(host: &RaftHost, remote: &Remote, shard: u32) -> Result<()> {
    let mut after = Vec::new();
    loop {
        let batch = match query(
            host,
            shard,
            pb::query::Q::PendingOutbox(pb::PendingOutbox {
                limit: OUTBOX_BATCH,
                after: after.clone(),
            }),
        )
        .await?
        {
            pb::response::R::Outbox(b) => b,
            other => return Err(anyhow!("unexpected outbox answer {other:?}")),
        };
        if batch.entries.is_empty() {
            return Ok(());
        }
        let shard_count = remote.shard_map().await?.shard_count;
        // Group by target shard: one ApplyFeedUpdates per shard.
        let mut per_target: BTreeMap<u32, (pb::ApplyFeedUpdates, Vec<pb::OutboxAck>)> =
            BTreeMap::new();
        for e in &batch.entries {
            let target =
                natter_model::shard_of(&natter_model::outbox_target_route_key(e), shard_count);
            let slot = per_target.entry(target).or_default();
            match &e.payload {
                Some(pb::outbox_entry::Payload::Feed(f)) => slot.0.updates.push(f.clone()),
                Some(pb::outbox_entry::Payload::Friend(f)) => slot.0.friend_updates.push(f.clone()),
                None => {}
            }
            slot.1.push(pb::OutboxAck {
                kind: e.kind,
                source_id: e.source_id.clone(),
                user_id: e.user_id.clone(),
                version: e.version,
            });
        }
        let mut acks = Vec::new();
        for (target, (updates, these_acks)) in per_target {
            match remote
                .propose(target, &command(pb::command::Op::ApplyFeedUpdates(updates)))
                .await
            {
                Ok(raw) => match decode_response(&raw)? {
                    pb::response::R::FeedApplied(_) => acks.extend(these_acks),
                    other => tracing::warn!(shard, target, "feed shard refused updates: {other:?}"),
                },
                // Retried on a later round; rows stay in the outbox.
                Err(e) => tracing::debug!(shard, target, "fan-out to shard {target} failed: {e:#}"),
            }
        }
        if !acks.is_empty() {
            remote
                .propose(
                    shard,
                    &command(pb::command::Op::AckOutbox(pb::AckOutbox { entries: acks })),
                )
                .await?;
        }
        if !batch.has_more {
            return Ok(());
        }
        after = batch.next_after;
    }
}
