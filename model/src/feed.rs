//! Feeds, on the user's shard: one row per (user, conversation), kept
//! current by the outbox's `ApplyFeedUpdates`.
//!
//! * An update is applied only if its conversation version is newer than
//!   the row's, so delivery may repeat or arrive out of order.
//! * `muted` / `archived` belong to the user's shard (`SetFeedFlags`) and
//!   survive updates.
//! * Every row change bumps the user's feed version and moves the row to it
//!   in the feed change index (move-to-latest): `SyncFeed` returns exactly
//!   the rows changed after a token.
//! * A sorted index keeps the visible rows (not hidden, not removed) in feed
//!   order: unread first — a muted conversation doesn't float up for being
//!   unread — then last activity descending, ties by conversation id.
//!   `GetFeed` pages through it.
//! * A preview whose expiry has passed by the query time is blanked.

use std::ops::Bound;

use natter_kv::{KvError, KvRead, KvResult, KvWrite};

use crate::codec::{decode, get, put, scan_from};
use crate::error::{invalid, limit, not_found, Res};
use crate::friends;
use crate::ids::Id;
use crate::keys;
use crate::limits::{page_limit, MAX_BATCH, MAX_CURSOR_BYTES};
use crate::pb::{self, response::R};

fn visible(e: &pb::FeedEntry) -> bool {
    e.conversation
        .as_ref()
        .is_some_and(|c| !c.hidden && !c.removed)
}

/// The feed order of a row: unread-and-unmuted first, then newest activity.
fn rank(e: &pb::FeedEntry) -> [u8; keys::RANK_LEN] {
    let (unread, activity) = e.conversation.as_ref().map_or((false, 0), |c| {
        (c.unread_count > 0 && !e.muted, c.last_activity_ms)
    });
    let mut r = [0u8; keys::RANK_LEN];
    r[0] = if unread { 0 } else { 1 };
    r[1..].copy_from_slice(&(u64::MAX - activity).to_be_bytes());
    r
}

fn conversation_of(e: &pb::FeedEntry) -> u64 {
    e.conversation.as_ref().map_or(0, |c| c.version)
}

/// Writes a changed row at the next feed version, keeping both indexes.
fn write_entry(
    kv: &mut dyn KvWrite,
    user: &Id,
    conv: &Id,
    mut e: pb::FeedEntry,
    old: Option<&pb::FeedEntry>,
) -> KvResult<pb::FeedEntry> {
    if let Some(old) = old {
        if visible(old) {
            kv.delete(&keys::feed_order(user, &rank(old), conv));
        }
        if old.feed_version > 0 {
            kv.delete(&keys::feed_change(user, old.feed_version));
        }
    }
    let counter = keys::feed_version(user);
    let version = get::<pb::CounterRow>(&*kv, &counter)?.map_or(0, |c| c.value) + 1;
    put(kv, &counter, &pb::CounterRow { value: version });
    e.feed_version = version;
    let pointer = pb::IndexRef {
        conversation_id: conv.bytes().to_vec(),
        ..Default::default()
    };
    put(kv, &keys::feed_change(user, version), &pointer);
    put(kv, &keys::feed(user, conv), &e);
    if visible(&e) {
        put(kv, &keys::feed_order(user, &rank(&e), conv), &pointer);
    }
    Ok(e)
}

/// Command `ApplyFeedUpdates` (from the outbox worker).
pub(crate) fn apply_updates(kv: &mut dyn KvWrite, now: u64, c: pb::ApplyFeedUpdates) -> Res<R> {
    if c.updates.len() > MAX_BATCH {
        return Err(limit(format!("more than {MAX_BATCH} updates")));
    }
    let mut feed = Vec::with_capacity(c.updates.len());
    for u in c.updates {
        let user = Id::parse(&u.user_id, "user_id")?;
        let conv = Id::parse(&u.conversation_id, "conversation_id")?;
        feed.push((user, conv, u));
    }
    if c.online_user_ids.len() > MAX_BATCH {
        return Err(limit(format!("more than {MAX_BATCH} online users")));
    }
    let online: std::collections::HashSet<&str> =
        c.online_user_ids.iter().map(String::as_str).collect();
    let friend_updates = friends::parse_index_updates(c.friend_updates)?;
    let (mut applied, mut ignored) = (0, 0);
    let mut versions = std::collections::BTreeMap::new();
    for (user, conv, u) in feed {
        // No offline notification for a user who is online (or when the
        // leader has nowhere to deliver one).
        let quiet = c.notifications_off || online.contains(u.user_id.as_str());
        let old = get::<pb::FeedEntry>(&*kv, &keys::feed(&user, &conv))?;
        if old
            .as_ref()
            .is_some_and(|o| u.version <= conversation_of(o))
        {
            ignored += 1;
            continue;
        }
        let mut e = pb::FeedEntry {
            conversation: Some(u),
            muted: old.as_ref().is_some_and(|o| o.muted),
            archived: old.as_ref().is_some_and(|o| o.archived),
            feed_version: 0,
            notification_pending: None,
        };
        let pending =
            crate::notify::on_feed_update(kv, now, &user, &conv, old.as_ref(), &e, quiet)?;
        e.notification_pending = Some(pending);
        let e = write_entry(kv, &user, &conv, e, old.as_ref())?;
        versions.insert(user.to_string(), e.feed_version);
        applied += 1;
    }
    for (user, other, u) in friend_updates {
        if friends::apply_index(kv, &user, &other, u)? {
            applied += 1;
        } else {
            ignored += 1;
        }
    }
    let feeds = versions
        .into_iter()
        .map(|(user_id, version)| pb::FeedVersion { user_id, version })
        .collect();
    Ok(R::FeedApplied(pb::FeedApplied {
        applied,
        ignored,
        feeds,
    }))
}

/// Command `SetFeedFlags`.
pub(crate) fn set_flags(kv: &mut dyn KvWrite, c: pb::SetFeedFlags) -> Res<R> {
    let user = Id::parse(&c.user_id, "user_id")?;
    let conv = Id::parse(&c.conversation_id, "conversation_id")?;
    let old = get::<pb::FeedEntry>(&*kv, &keys::feed(&user, &conv))?
        .ok_or_else(|| not_found("conversation not in feed"))?;
    let mut e = old.clone();
    if let Some(m) = c.muted {
        e.muted = m;
    }
    if let Some(a) = c.archived {
        e.archived = a;
    }
    if e == old {
        return Ok(R::FeedEntry(internal_cleared(old)));
    }
    if e.muted {
        crate::notify::withdraw(kv, &user, &conv)?;
        e.notification_pending = Some(false);
    }
    let e = write_entry(kv, &user, &conv, e, Some(&old))?;
    Ok(R::FeedEntry(internal_cleared(e)))
}

/// The row without what only its shard uses.
fn internal_cleared(mut e: pb::FeedEntry) -> pb::FeedEntry {
    e.notification_pending = None;
    e
}

/// The row as served at `now`.
fn served(e: pb::FeedEntry, now: u64) -> pb::FeedEntry {
    let mut e = internal_cleared(e);
    if let Some(c) = e.conversation.as_mut() {
        if c.preview
            .as_ref()
            .is_some_and(|p| p.expires_at_ms != 0 && p.expires_at_ms <= now)
        {
            c.preview = None;
        }
    }
    e
}

fn load_row(
    kv: &dyn KvRead,
    user: &Id,
    pointer_key: &[u8],
    pointer: &[u8],
) -> KvResult<pb::FeedEntry> {
    let r = decode::<pb::IndexRef>(pointer_key, pointer)?;
    let conv = Id::from_slice(&r.conversation_id, pointer_key)?;
    get::<pb::FeedEntry>(kv, &keys::feed(user, &conv))?.ok_or_else(|| KvError::Corrupt {
        key: pointer_key.to_vec(),
        reason: "feed index points at a missing row".into(),
    })
}

fn feed_version(kv: &dyn KvRead, user: &Id) -> KvResult<u64> {
    Ok(get::<pb::CounterRow>(kv, &keys::feed_version(user))?.map_or(0, |c| c.value))
}

fn page(
    kv: &dyn KvRead,
    now: u64,
    user: &Id,
    lim: usize,
    cursor: &[u8],
    cold_start: bool,
) -> Res<R> {
    if cursor.len() > MAX_CURSOR_BYTES {
        return Err(invalid("bad feed cursor"));
    }
    let prefix = keys::feed_order_prefix(user);
    let mut from_key = prefix.clone();
    from_key.extend_from_slice(cursor);
    let from = if cursor.is_empty() {
        Bound::Included(from_key.as_slice())
    } else {
        Bound::Excluded(from_key.as_slice())
    };
    let token = feed_version(kv, user)?;
    let rows = scan_from(kv, &prefix, from, lim + 1)?;
    let has_more = rows.len() > lim;
    let mut entries = Vec::with_capacity(rows.len().min(lim));
    let mut next = Vec::new();
    for (k, v) in rows.into_iter().take(lim) {
        entries.push(served(load_row(kv, user, &k, &v)?, now));
        next = k.get(prefix.len()..).unwrap_or_default().to_vec();
    }
    Ok(R::Feed(pb::FeedPage {
        entries,
        token,
        has_more,
        cursor: if has_more { next } else { Vec::new() },
        cold_start,
        now_ms: now,
    }))
}

/// Query `GetFeed`.
pub(crate) fn get_feed(kv: &dyn KvRead, now: u64, q: pb::GetFeed) -> Res<R> {
    let user = Id::parse(&q.user_id, "user_id")?;
    page(kv, now, &user, page_limit(q.limit)?, &q.cursor, false)
}

/// Query `SyncFeed`.
pub(crate) fn sync_feed(kv: &dyn KvRead, now: u64, q: pb::SyncFeed) -> Res<R> {
    let user = Id::parse(&q.user_id, "user_id")?;
    let lim = page_limit(q.limit)?;
    let current = feed_version(kv, &user)?;
    if q.token == 0 || q.token > current {
        return page(kv, now, &user, lim, &[], true);
    }
    let from = keys::feed_change(&user, q.token);
    let rows = scan_from(
        kv,
        &keys::feed_change_prefix(&user),
        Bound::Excluded(&from),
        lim + 1,
    )?;
    let has_more = rows.len() > lim;
    let mut entries = Vec::with_capacity(rows.len().min(lim));
    for (k, v) in rows.into_iter().take(lim) {
        entries.push(served(load_row(kv, &user, &k, &v)?, now));
    }
    let token = match entries.last() {
        Some(e) if has_more => e.feed_version,
        _ => current,
    };
    Ok(R::Feed(pb::FeedPage {
        entries,
        token,
        has_more,
        cursor: Vec::new(),
        cold_start: false,
        now_ms: now,
    }))
}
