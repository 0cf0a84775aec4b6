//! The durable outbox: how a change on one shard reaches other shards.
//!
//! A conversation (or friendship) change writes, in the same command, the
//! latest [`FeedUpdate`](pb::FeedUpdate) (or [`FriendEntry`](pb::FriendEntry))
//! for each affected user into an outbox row keyed (kind, source, user). A
//! newer update overwrites a pending older one (coalescing), so the outbox
//! holds at most one row per (source, user).
//!
//! The node's outbox worker drains it:
//! 1. query `PendingOutbox{limit, after}` on the source shard;
//! 2. [`outbox_deliveries`] groups the entries by target shard into
//!    `ApplyFeedUpdates` commands; propose each to its shard (they are
//!    idempotent: an update not newer than what the target holds is ignored);
//! 3. once all are applied, propose [`outbox_ack`]`(entries)` to the source
//!    shard. An ack deletes a row only if its version still matches, so an
//!    update enqueued meanwhile survives and is delivered next round.
//!
//! On failure the worker simply doesn't ack; redelivery is harmless.

use std::collections::BTreeMap;

use natter_kv::{KvRead, KvWrite};

use crate::codec::{get, page_after, put};
use crate::error::{invalid, limit, Res};
use crate::ids::Id;
use crate::keys;
use crate::limits::{page_limit, MAX_BATCH};
use crate::pb::{self, outbox_entry::Payload, response::R, OutboxKind};
use crate::route::{shard_of, user_route_key};

/// Queues (coalescing) a feed update for `update.user_id`.
pub(crate) fn enqueue_feed(kv: &mut dyn KvWrite, source: &Id, user: &Id, update: pb::FeedUpdate) {
    let entry = pb::OutboxEntry {
        kind: OutboxKind::Feed as i32,
        source_id: source.to_string(),
        user_id: user.to_string(),
        version: update.version,
        payload: Some(Payload::Feed(update)),
    };
    put(
        kv,
        &keys::outbox(OutboxKind::Feed as u8, source, user),
        &entry,
    );
}

/// Queues (coalescing) a friend index update for `entry.user_id`.
pub(crate) fn enqueue_friend(
    kv: &mut dyn KvWrite,
    source: &Id,
    user: &Id,
    friend: pb::FriendEntry,
) {
    let entry = pb::OutboxEntry {
        kind: OutboxKind::Friend as i32,
        source_id: source.to_string(),
        user_id: user.to_string(),
        version: friend.version,
        payload: Some(Payload::Friend(friend)),
    };
    put(
        kv,
        &keys::outbox(OutboxKind::Friend as u8, source, user),
        &entry,
    );
}

fn kind_byte(kind: i32) -> Res<u8> {
    match OutboxKind::try_from(kind) {
        Ok(OutboxKind::Feed) => Ok(OutboxKind::Feed as u8),
        Ok(OutboxKind::Friend) => Ok(OutboxKind::Friend as u8),
        _ => Err(invalid(format!("unknown outbox kind {kind}"))),
    }
}

/// Query `PendingOutbox`: up to `limit` rows after the cursor, in key order.
pub(crate) fn pending(kv: &dyn KvRead, q: pb::PendingOutbox) -> Res<R> {
    let lim = page_limit(q.limit)?;
    let (entries, next_after, has_more) =
        page_after(kv, &keys::outbox_prefix(), &q.after, lim, "outbox")?;
    Ok(R::Outbox(pb::OutboxBatch {
        entries,
        next_after,
        has_more,
    }))
}

/// Command `AckOutbox`.
pub(crate) fn ack(kv: &mut dyn KvWrite, c: pb::AckOutbox) -> Res<R> {
    if c.entries.len() > MAX_BATCH {
        return Err(limit(format!("more than {MAX_BATCH} acks")));
    }
    let mut parsed = Vec::with_capacity(c.entries.len());
    for a in &c.entries {
        let kind = kind_byte(a.kind)?;
        let source = Id::parse(&a.source_id, "source_id")?;
        let user = Id::parse(&a.user_id, "user_id")?;
        parsed.push((keys::outbox(kind, &source, &user), a.version));
    }
    let (mut deleted, mut stale) = (0, 0);
    for (key, version) in parsed {
        match get::<pb::OutboxEntry>(&*kv, &key)? {
            Some(row) if row.version == version => {
                kv.delete(&key);
                deleted += 1;
            }
            _ => stale += 1,
        }
    }
    Ok(R::OutboxAcked(pb::OutboxAcked { deleted, stale }))
}

/// Groups pending entries into one `ApplyFeedUpdates` per target shard
/// (`1..=shard_count`), in shard order; entries keep their order within a
/// shard. Entries without a payload are skipped (nothing to deliver; ack them
/// anyway).
pub fn outbox_deliveries(
    entries: &[pb::OutboxEntry],
    shard_count: u32,
) -> Vec<(u32, pb::ApplyFeedUpdates)> {
    let mut by_shard: BTreeMap<u32, pb::ApplyFeedUpdates> = BTreeMap::new();
    for e in entries {
        let shard = shard_of(&outbox_target_route_key(e), shard_count);
        let batch = by_shard.entry(shard).or_default();
        match &e.payload {
            Some(Payload::Feed(u)) => batch.updates.push(u.clone()),
            Some(Payload::Friend(f)) => batch.friend_updates.push(f.clone()),
            None => {}
        }
    }
    by_shard
        .into_iter()
        .filter(|(_, b)| !(b.updates.is_empty() && b.friend_updates.is_empty()))
        .collect()
}

/// The route key of the shard an entry must be delivered to (its target
/// user's shard).
pub fn outbox_target_route_key(entry: &pb::OutboxEntry) -> Vec<u8> {
    user_route_key(&entry.user_id)
}

/// The `AckOutbox` that retires exactly these entries (each at the version
/// that was read).
pub fn outbox_ack(entries: &[pb::OutboxEntry]) -> pb::AckOutbox {
    pb::AckOutbox {
        entries: entries
            .iter()
            .map(|e| pb::OutboxAck {
                kind: e.kind,
                source_id: e.source_id.clone(),
                user_id: e.user_id.clone(),
                version: e.version,
            })
            .collect(),
    }
}
