//! Leader-side loops, one per data shard this node hosts. While this node
//! leads the shard, its loop:
//! - drains the shard's durable outbox: pending feed and friend-index updates
//!   are proposed at once to their target users' shards (feeds are what users
//!   see), and acknowledged back (`AckOutbox`) in batches: an ack only
//!   garbage-collects rows, and a redelivery is harmless (updates are
//!   idempotent by version), so acks need not cost a Raft round per message.
//!   A target shard that is down just means its rows stay and are retried;
//! - proposes `Tick` when the model says a message expiry is due, so expiry
//!   happens on every replica from a leader-stamped time.
//!
//! A loop wakes when its shard applies something new, or when acks are
//! due. Woken by a change it waits `FANOUT_GATHER` (5 ms) so the sends of
//! that moment share one `ApplyFeedUpdates` per target shard, and it starts
//! rounds that fan out at most once per `FANOUT_SPACING` (50 ms; a round
//! that only acks or finds nothing doesn't count): a lone send's feeds
//! follow it 5 ms later, a busy stream's up to 50 ms later. Fewer, larger
//! fan-out entries cost less than prompt ones, and leave the CPU to the
//! messages' own pushes:
//! - delivering to targets in parallel instead of one after another made
//!   sends 15–25 % slower in an A/B; the 5 ms gather made them 5–25 %
//!   faster (the conversation push does not wait for feeds);
//! - a fixed 20 ms gather cut the CPU of a send at one client by ~15 % more,
//!   but a client that reads its chat list right after a lone send (the
//!   CLI's `send` then `chats list`) then often missed the new row;
//! - delivering a change after a quiet spell at once (no gather) put the
//!   feed syncs on top of the message's own push: a group of 100 got its
//!   message 20–40 % later in an A/B;
//! - spacing rounds 20 ms apart after the 5 ms gather kept the one-client
//!   gain (CPU per send lower in 6 of 7 A/B pairs) with no change at 16 or
//!   256 clients; 50 ms instead of 20, in three more pairs, lowered the CPU
//!   per send at one client by another 8–20 % and delivery p50 through one
//!   router from 2.2–2.7 to 1.9–2.1 ms, and 16 clients gained in two of
//!   three.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use natter_model::pb;
use natter_raft_store::{Consistency, RaftHost};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{now_ms, stamp_query, Stamper};
use crate::events::Events;
use crate::remote::Remote;

/// Outbox rows read per query (and, past the first row, feed updates).
const OUTBOX_BATCH: u32 = 256;
/// Acks wait at most this long...
const ACK_DELAY: Duration = Duration::from_millis(200);
/// ...or until this many are pending.
const ACK_BATCH: usize = 512;
/// How long a woken loop waits for more changes before delivering.
const FANOUT_GATHER: Duration = Duration::from_millis(5);
/// Shortest time between the starts of two rounds that fan out.
const FANOUT_SPACING: Duration = Duration::from_millis(50);
/// Longest sleep when nothing happens.
const IDLE_WAKE: Duration = Duration::from_secs(1);

pub fn spawn(
    host: Arc<RaftHost>,
    events: Events,
    stamper: Stamper,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let remote = Arc::new(Remote::new(host.clone(), events, stamper));
    let h = host.clone();
    crate::shards::spawn_per_shard(host, stop.clone(), move |shard| {
        let w = ShardWorker {
            host: h.clone(),
            remote: remote.clone(),
            shard,
            delivered: HashMap::new(),
            acks: Vec::new(),
            acks_since: None,
        };
        w.run(stop.clone())
    })
}

/// (kind, source id, user id): an outbox row's identity.
type RowKey = (i32, String, String);

struct ShardWorker {
    host: Arc<RaftHost>,
    remote: Arc<Remote>,
    shard: u32,
    /// Rows delivered and not yet acked, with the version delivered.
    delivered: HashMap<RowKey, u64>,
    acks: Vec<pb::OutboxAck>,
    acks_since: Option<Instant>,
}

fn decode_response(raw: &[u8]) -> Result<pb::response::R> {
    pb::Response::decode(raw)?
        .r
        .ok_or_else(|| anyhow!("empty response"))
}

fn command(op: pb::command::Op) -> Vec<u8> {
    pb::Command {
        stamp: None,
        op: Some(op),
    }
    .encode_to_vec()
}

impl ShardWorker {
    /// The shard's loop, until `stop` or its replica leaves this node.
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut last_round: Option<Instant> = None;
        loop {
            if *stop.borrow() || !self.host.hosts(self.shard) {
                return;
            }
            if self.host.is_leader(self.shard) {
                let started = Instant::now();
                match self.round().await {
                    // Only rounds that fanned something out space the next:
                    // an ack's own apply wakes the loop too, and must not
                    // hold back the next lone send's feeds.
                    Ok(true) => last_round = Some(started),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(shard = self.shard, "leader round: {e:#}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            } else {
                // Whoever leads now redelivers what was not acked.
                self.forget();
            }
            let wake = self
                .acks_since
                .map(|t| ACK_DELAY.saturating_sub(t.elapsed()))
                .unwrap_or(IDLE_WAKE);
            tokio::select! {
                _ = self.host.wait_applied_change(self.shard, wake) => {
                    // Let the sends of the next moment join this round (one
                    // ApplyFeedUpdates per target carries them all); in a
                    // busy stream, rounds start at most once per spacing.
                    let gathered = Instant::now() + FANOUT_GATHER;
                    let due = last_round.map_or(gathered, |t| gathered.max(t + FANOUT_SPACING));
                    tokio::time::sleep_until(due.into()).await;
                }
                r = stop.changed() => if r.is_err() { return },
            }
        }
    }

    fn forget(&mut self) {
        self.delivered.clear();
        self.acks.clear();
        self.acks_since = None;
    }

    async fn query(&self, q: pb::query::Q) -> Result<pb::response::R> {
        let raw = pb::Query {
            now_ms: 0,
            q: Some(q),
        }
        .encode_to_vec();
        let (out, _) = self
            .host
            .read(
                self.shard,
                &stamp_query(&raw, now_ms())?,
                Consistency::Stale,
            )
            .await?;
        decode_response(&out)
    }

    /// One round; true when it proposed fan-out.
    async fn round(&mut self) -> Result<bool> {
        let fanned_out = self.deliver().await?;
        if self.acks.len() >= ACK_BATCH || self.acks_since.is_some_and(|t| t.elapsed() >= ACK_DELAY)
        {
            self.flush_acks().await?;
        }
        if let pb::response::R::NextExpiry(n) = self
            .query(pb::query::Q::NextExpiry(pb::NextExpiry {}))
            .await?
        {
            if n.at_ms != 0 && n.at_ms <= now_ms() {
                self.remote
                    .propose(self.shard, &command(pb::command::Op::Tick(pb::Tick {})))
                    .await?;
            }
        }
        Ok(fanned_out)
    }

    async fn flush_acks(&mut self) -> Result<()> {
        let entries = std::mem::take(&mut self.acks);
        self.acks_since = None;
        if entries.is_empty() {
            return Ok(());
        }
        for a in &entries {
            self.delivered
                .remove(&(a.kind, a.source_id.clone(), a.user_id.clone()));
        }
        self.remote
            .propose(
                self.shard,
                &command(pb::command::Op::AckOutbox(pb::AckOutbox { entries })),
            )
            .await?;
        Ok(())
    }

    /// Proposes every pending update not yet delivered at its version;
    /// true when there was any.
    async fn deliver(&mut self) -> Result<bool> {
        let mut any = false;
        let mut after = Vec::new();
        let mut shard_count = None;
        // Conversation rows delivered and not yet acked: the query need not
        // compute their members' updates again. It answers them without
        // updates, and `fresh` below drops them (entries are only added to
        // `delivered` during this call, so it covers every row named here):
        // a row without updates must never reach `deliver_batch`, which
        // would ack it as having nothing to deliver.
        let delivered: Vec<pb::OutboxAck> = self
            .delivered
            .iter()
            .filter(|((kind, _, _), _)| *kind == pb::OutboxKind::Conversation as i32)
            .take(natter_model::MAX_BATCH)
            .map(|((kind, source_id, user_id), version)| pb::OutboxAck {
                kind: *kind,
                source_id: source_id.clone(),
                user_id: user_id.clone(),
                version: *version,
            })
            .collect();
        loop {
            let q = pb::query::Q::PendingOutbox(pb::PendingOutbox {
                limit: OUTBOX_BATCH,
                after: after.clone(),
                delivered: delivered.clone(),
            });
            let batch = match self.query(q).await? {
                pb::response::R::Outbox(b) => b,
                other => return Err(anyhow!("unexpected outbox answer {other:?}")),
            };
            let pb::OutboxBatch {
                entries,
                next_after,
                has_more,
            } = batch;
            let fresh: Vec<pb::OutboxEntry> = entries
                .into_iter()
                .filter(|e| {
                    self.delivered
                        .get(&(e.kind, e.source_id.clone(), e.user_id.clone()))
                        != Some(&e.version)
                })
                .collect();
            if !fresh.is_empty() {
                let count = match shard_count {
                    Some(c) => c,
                    None => *shard_count.insert(self.remote.shard_map().await?.shard_count),
                };
                self.deliver_batch(&fresh, count).await;
                any = true;
            }
            if !has_more {
                return Ok(any);
            }
            after = next_after;
        }
    }

    async fn deliver_batch(&mut self, entries: &[pb::OutboxEntry], shard_count: u32) {
        // An entry is acked once every delivery carrying its updates was
        // applied (one with nothing to deliver at once).
        let mut failed = vec![false; entries.len()];
        for d in natter_model::outbox_deliveries(entries, shard_count) {
            let target = d.shard;
            let res = self
                .remote
                .propose(
                    target,
                    &command(pb::command::Op::ApplyFeedUpdates(d.updates)),
                )
                .await;
            let ok = match res.and_then(|raw| decode_response(&raw)) {
                Ok(pb::response::R::FeedApplied(_)) => true,
                Ok(other) => {
                    tracing::warn!(
                        shard = self.shard,
                        target,
                        "feed shard refused updates: {other:?}"
                    );
                    false
                }
                // Retried on a later round; the rows stay in the outbox.
                Err(e) => {
                    tracing::debug!(
                        shard = self.shard,
                        target,
                        "fan-out to shard {target} failed: {e:#}"
                    );
                    false
                }
            };
            if !ok {
                for i in d.entries {
                    if let Some(f) = failed.get_mut(i) {
                        *f = true;
                    }
                }
            }
        }
        for (e, failed) in entries.iter().zip(failed) {
            if failed {
                continue;
            }
            self.delivered
                .insert((e.kind, e.source_id.clone(), e.user_id.clone()), e.version);
            self.acks.push(pb::OutboxAck {
                kind: e.kind,
                source_id: e.source_id.clone(),
                user_id: e.user_id.clone(),
                version: e.version,
            });
            self.acks_since.get_or_insert_with(Instant::now);
        }
    }
}
