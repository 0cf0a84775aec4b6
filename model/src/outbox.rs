//! The durable outbox: how a change on one shard reaches other shards.
//!
//! A conversation (or friendship) change writes, in the same command, what
//! its users' feeds (or friend lists) must learn:
//! * a change every current member sees writes one row for the whole
//!   conversation, keyed (kind `Conversation`, source), holding only the
//!   conversation's version: however many members, one row. The members'
//!   [`FeedUpdate`](pb::FeedUpdate)s are computed from the conversation row
//!   when the outbox is read, so they carry its latest state;
//! * a change for one member only (their read mark, "deleted for me"), or a
//!   member's removal, writes that user's [`FeedUpdate`](pb::FeedUpdate)
//!   keyed (kind `Feed`, source, user); a friendship change, its
//!   [`FriendEntry`](pb::FriendEntry) keyed (kind `Friend`, source, user).
//!
//! A newer row for the same key overwrites a pending older one (coalescing).
//!
//! The node's outbox worker drains it:
//! 1. query `PendingOutbox{limit, after}` on the source shard;
//! 2. [`outbox_deliveries`] groups the rows' updates by target shard into
//!    `ApplyFeedUpdates` commands; propose each to its shard (they are
//!    idempotent: an update not newer than what the target holds is ignored);
//! 3. propose [`outbox_ack`] of the rows whose deliveries were all applied to
//!    the source shard. An ack deletes a row only if its version still
//!    matches, so a row rewritten meanwhile survives and is delivered next
//!    round.
//!
//! On failure the worker simply doesn't ack; redelivery is harmless.

use std::collections::{BTreeMap, HashSet};

use natter_kv::{KvRead, KvWrite};

use crate::codec::{get, page_after_by, put};
use crate::conversations::feed_update;
use crate::error::{invalid, limit, Res};
use crate::ids::Id;
use crate::keys;
use crate::limits::{page_limit, MAX_BATCH};
use crate::pb::{self, outbox_entry::Payload, response::R, OutboxKind};
use crate::route::{shard_of, user_route_key};

/// Queues (coalescing) a feed update for every current member of
/// conversation `source`, now at `version`.
pub(crate) fn enqueue_conversation(kv: &mut dyn KvWrite, source: &Id, version: u64) {
    let entry = pb::OutboxEntry {
        kind: OutboxKind::Conversation as i32,
        source_id: source.to_string(),
        version,
        ..Default::default()
    };
    put(kv, &keys::outbox_conversation(source), &entry);
}

/// Queues (coalescing) a feed update for `update.user_id`.
pub(crate) fn enqueue_feed(kv: &mut dyn KvWrite, source: &Id, user: &Id, update: pb::FeedUpdate) {
    let entry = pb::OutboxEntry {
        kind: OutboxKind::Feed as i32,
        source_id: source.to_string(),
        user_id: user.to_string(),
        version: update.version,
        payload: Some(Payload::Feed(update)),
        updates: Vec::new(),
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
        updates: Vec::new(),
    };
    put(
        kv,
        &keys::outbox(OutboxKind::Friend as u8, source, user),
        &entry,
    );
}

/// The stored key an ack names.
fn ack_key(a: &pb::OutboxAck) -> Res<Vec<u8>> {
    let source = Id::parse(&a.source_id, "source_id")?;
    let kind = OutboxKind::try_from(a.kind)
        .map_err(|_| invalid(format!("unknown outbox kind {}", a.kind)))?;
    match kind {
        OutboxKind::Conversation if a.user_id.is_empty() => Ok(keys::outbox_conversation(&source)),
        OutboxKind::Conversation => Err(invalid("a conversation outbox row names no user")),
        OutboxKind::Feed | OutboxKind::Friend => {
            let user = Id::parse(&a.user_id, "user_id")?;
            Ok(keys::outbox(kind as u8, &source, &user))
        }
        OutboxKind::Unspecified => Err(invalid(format!("unknown outbox kind {}", a.kind))),
    }
}

/// Every current member's feed update for a `Conversation` row, from the
/// conversation as it is now (none if the row is gone: nothing to tell).
fn expand(kv: &dyn KvRead, entry: &pb::OutboxEntry) -> Res<Vec<pb::FeedUpdate>> {
    let id = Id::stored(&entry.source_id, &keys::outbox_prefix())?;
    let Some(row) = get::<pb::ConversationRow>(kv, &keys::conversation(&id))? else {
        return Ok(Vec::new());
    };
    let mut updates = Vec::with_capacity(row.members.len());
    for m in &row.members {
        updates.push(feed_update(kv, &id, &row, m, false)?);
    }
    Ok(updates)
}

/// Query `PendingOutbox`: the rows after the cursor, in key order, up to
/// `limit` rows and (past the first row) `limit` feed updates; a
/// conversation row the caller already delivered at its version is not
/// expanded.
pub(crate) fn pending(kv: &dyn KvRead, q: pb::PendingOutbox) -> Res<R> {
    let lim = page_limit(q.limit)?;
    if q.delivered.len() > MAX_BATCH {
        return Err(limit(format!("more than {MAX_BATCH} delivered rows")));
    }
    let delivered: HashSet<(&str, u64)> = q
        .delivered
        .iter()
        .filter(|a| a.kind == OutboxKind::Conversation as i32)
        .map(|a| (a.source_id.as_str(), a.version))
        .collect();
    let (entries, next_after, has_more) = page_after_by(
        kv,
        &keys::outbox_prefix(),
        &q.after,
        lim,
        "outbox",
        |mut e: pb::OutboxEntry| {
            if e.kind == OutboxKind::Conversation as i32
                && !delivered.contains(&(e.source_id.as_str(), e.version))
            {
                e.updates = expand(kv, &e)?;
            }
            let weight = e.updates.len();
            Ok((e, weight))
        },
    )?;
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
        parsed.push((ack_key(a)?, a.version));
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

/// One `ApplyFeedUpdates` for one target shard, and the pending entries
/// (indexes into what was grouped) with an update in it.
#[derive(Debug, Default)]
pub struct Delivery {
    pub shard: u32,
    pub updates: pb::ApplyFeedUpdates,
    pub entries: Vec<usize>,
}

/// Groups the updates of pending entries by target shard (`1..=shard_count`,
/// the target user's), in shard order, at most [`MAX_BATCH`] updates per
/// delivery; updates keep their order within a shard. An entry is done when
/// every delivery naming it was applied; one with no update at all (a
/// conversation row that is gone) is in none, and is done at once.
pub fn outbox_deliveries(entries: &[pb::OutboxEntry], shard_count: u32) -> Vec<Delivery> {
    let mut by_shard: BTreeMap<u32, Vec<Delivery>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let feeds = match &e.payload {
            Some(Payload::Feed(u)) => std::slice::from_ref(u),
            _ => e.updates.as_slice(),
        };
        for u in feeds {
            let d = delivery_for(&mut by_shard, &u.user_id, shard_count, i);
            d.updates.updates.push(u.clone());
        }
        if let Some(Payload::Friend(f)) = &e.payload {
            let d = delivery_for(&mut by_shard, &f.user_id, shard_count, i);
            d.updates.friend_updates.push(f.clone());
        }
    }
    by_shard.into_values().flatten().collect()
}

/// The delivery to `user`'s shard that the next update of entry `i` goes
/// into: the shard's last one, or a new one when that is full.
fn delivery_for<'a>(
    by_shard: &'a mut BTreeMap<u32, Vec<Delivery>>,
    user: &str,
    shard_count: u32,
    i: usize,
) -> &'a mut Delivery {
    let shard = shard_of(&user_route_key(user), shard_count);
    let list = by_shard.entry(shard).or_default();
    let full = |d: &Delivery| d.updates.updates.len() + d.updates.friend_updates.len() >= MAX_BATCH;
    if list.last().is_none_or(full) {
        list.push(Delivery {
            shard,
            ..Default::default()
        });
    }
    let n = list.len() - 1;
    let d = &mut list[n];
    if d.entries.last() != Some(&i) {
        d.entries.push(i);
    }
    d
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
