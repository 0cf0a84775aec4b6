//! Offline notifications and last seen, on the user's shard.
//!
//! * When `ApplyFeedUpdates` writes a user's feed row, [`on_feed_update`]
//!   enqueues a [`Notification`](pb::Notification) if the update brings a
//!   new message (its preview's seq is above the row's previous `last_seq`)
//!   from someone else that is unread for the user, not hidden, removed,
//!   deleted or expired, the conversation isn't muted, and the user's
//!   setting allows it (`ALL`; `DIRECT_ONLY` only for direct
//!   conversations; `NONE` never). A user row that doesn't exist counts as
//!   the default, `ALL`.
//! * Not for a user the command names as online (`online_user_ids`, stamped
//!   by the leader from its presence leases: they get the message live), nor
//!   at all when the leader has no webhook (`notifications_off`). The
//!   notifier drops such rows anyway; not writing them saves a row, its
//!   delete and a share of an `AckNotifications` round per message.
//! * Rows are keyed (user, conversation, seq), so a redelivered feed update
//!   can't enqueue twice; the id is UUID v5 of the same triple. A newer
//!   message of a conversation replaces the user's pending older row of it:
//!   at most one row per (user, conversation), like the feed itself.
//!   The feed row says when none can be pending (`notification_pending`
//!   false), so the next update doesn't look for one.
//! * The node's notifier drains them (`PendingNotifications`, then
//!   `AckNotifications` after a delivery or a drop).
//! * `RecordLastSeen` stores the command's time as the user's last seen
//!   (never backwards); `GetLastSeen` reads it.

use std::ops::Bound;

use natter_kv::{KvRead, KvWrite};

use crate::codec::{get, page_after, put, scan_from};
use crate::error::{limit, Res};
use crate::ids::{notification_id, Id};
use crate::keys;
use crate::limits::{page_limit, MAX_BATCH};
use crate::pb::{self, response::R, ConversationKind, Notifications};

/// Whether the user's setting allows a notification for this kind.
fn allowed(kv: &dyn KvRead, user: &Id, kind: i32) -> Res<bool> {
    let setting = get::<pb::User>(kv, &keys::user(user))?
        .and_then(|u| Notifications::try_from(u.notifications).ok())
        .unwrap_or(Notifications::All);
    Ok(match setting {
        Notifications::None => false,
        Notifications::DirectOnly => kind == ConversationKind::Direct as i32,
        Notifications::All | Notifications::Unspecified => true,
    })
}

/// Whether a notification of this feed row may be pending: unless the row
/// says none is (rows written before the field existed may have one).
fn may_have_pending(e: &pb::FeedEntry) -> bool {
    e.notification_pending != Some(false)
}

/// Called for every feed row `ApplyFeedUpdates` writes, before it is
/// written: enqueues a notification when the update brings a new message
/// the user should hear about (see the module docs), unless `quiet` (the
/// user was online when the leader proposed the update, or it has no
/// webhook). A pending older row is withdrawn either way when the update
/// supersedes it. Returns whether a row of this conversation may now be
/// pending, for the feed row's `notification_pending`.
pub(crate) fn on_feed_update(
    kv: &mut dyn KvWrite,
    now: u64,
    user: &Id,
    conv: &Id,
    old: Option<&pb::FeedEntry>,
    new: &pb::FeedEntry,
    quiet: bool,
) -> Res<bool> {
    let Some(u) = &new.conversation else {
        return Ok(old.is_some_and(may_have_pending));
    };
    let visible = !(u.hidden || u.removed || u.deleted);
    let preview_seq = u.preview.as_ref().map(|p| p.seq);
    // A pending row stays only while its message is still the unread,
    // visible, unmuted last message: read on a connected device, deleted,
    // expired, hidden, muted or superseded withdraws it. This function keeps
    // at most one row per (user, conversation), at the seq of the preview
    // the feed row shows, so the old row's preview names the only candidate:
    // a point lookup, where a scan of the prefix would step over the
    // tombstone of every predecessor (one per message) until compaction.
    // And none at all when the old row says nothing can be pending, the
    // usual case (the user was online, or there is no webhook): the lookup
    // would miss.
    let old_seq = old
        .filter(|o| may_have_pending(o))
        .and_then(|o| o.conversation.as_ref())
        .and_then(|c| c.preview.as_ref())
        .map(|p| p.seq);
    let mut kept = false;
    if let Some(seq) = old_seq {
        let k = keys::notification(user, conv, seq);
        if let Some(n) = get::<pb::Notification>(&*kv, &k)? {
            if !visible || new.muted || n.seq <= u.last_read_seq || preview_seq != Some(n.seq) {
                kv.delete(&k);
            } else {
                kept = true;
            }
        }
    }
    let Some(p) = &u.preview else {
        return Ok(kept);
    };
    if quiet {
        return Ok(kept);
    }
    let old_last = old
        .and_then(|o| o.conversation.as_ref())
        .map_or(0, |c| c.last_seq);
    let fresh = p.seq > old_last && p.seq > u.last_read_seq && u.unread_count > 0;
    let expired = p.expires_at_ms != 0 && p.expires_at_ms <= now;
    if !fresh || !visible || expired || new.muted || p.sender_id == u.user_id {
        return Ok(kept);
    }
    if !allowed(&*kv, user, u.kind)? {
        return Ok(kept);
    }
    let n = pb::Notification {
        id: notification_id(*user, *conv, p.seq),
        user_id: u.user_id.clone(),
        conversation_id: u.conversation_id.clone(),
        seq: p.seq,
        sender_id: p.sender_id.clone(),
        preview: p.text.clone(),
        kind: u.kind,
        title: u.title.clone(),
        created_at_ms: p.created_at_ms,
        enqueued_at_ms: now,
    };
    put(kv, &keys::notification(user, conv, p.seq), &n);
    Ok(true)
}

/// Deletes the user's pending notifications of a conversation (it was
/// muted).
pub(crate) fn withdraw(kv: &mut dyn KvWrite, user: &Id, conv: &Id) -> Res<()> {
    let prefix = keys::notification_prefix(Some(user), Some(conv));
    for (k, _) in scan_from(&*kv, &prefix, Bound::Included(&prefix), MAX_BATCH)? {
        kv.delete(&k);
    }
    Ok(())
}

/// Query `PendingNotifications`.
pub(crate) fn pending(kv: &dyn KvRead, q: pb::PendingNotifications) -> Res<R> {
    let lim = page_limit(q.limit)?;
    let user = if q.user_id.is_empty() {
        None
    } else {
        Some(Id::parse(&q.user_id, "user_id")?)
    };
    let prefix = keys::notification_prefix(user.as_ref(), None);
    let (notifications, next_after, has_more) =
        page_after(kv, &prefix, &q.after, lim, "notification")?;
    Ok(R::Notifications(pb::NotificationBatch {
        notifications,
        next_after,
        has_more,
    }))
}

/// Command `AckNotifications`.
pub(crate) fn ack(kv: &mut dyn KvWrite, c: pb::AckNotifications) -> Res<R> {
    if c.keys.len() > MAX_BATCH {
        return Err(limit(format!("more than {MAX_BATCH} acks")));
    }
    let mut parsed = Vec::with_capacity(c.keys.len());
    for k in &c.keys {
        let user = Id::parse(&k.user_id, "user_id")?;
        let conv = Id::parse(&k.conversation_id, "conversation_id")?;
        parsed.push(keys::notification(&user, &conv, k.seq));
    }
    let (mut deleted, mut missing) = (0, 0);
    for key in parsed {
        if kv.get(&key)?.is_some() {
            kv.delete(&key);
            deleted += 1;
        } else {
            missing += 1;
        }
    }
    Ok(R::NotificationsAcked(pb::NotificationsAcked {
        deleted,
        missing,
    }))
}

/// Command `RecordLastSeen`: last seen = the command's time.
pub(crate) fn record_last_seen(kv: &mut dyn KvWrite, now: u64, c: pb::RecordLastSeen) -> Res<R> {
    let user = Id::parse(&c.user_id, "user_id")?;
    let key = keys::last_seen(&user);
    let old = get::<pb::LastSeen>(&*kv, &key)?.map_or(0, |r| r.last_seen_ms);
    let row = pb::LastSeen {
        user_id: c.user_id,
        last_seen_ms: old.max(now),
    };
    if row.last_seen_ms != old {
        put(kv, &key, &row);
    }
    Ok(R::LastSeen(row))
}

/// Query `GetLastSeen` (0 = never recorded).
pub(crate) fn get_last_seen(kv: &dyn KvRead, q: pb::GetLastSeen) -> Res<R> {
    let user = Id::parse(&q.user_id, "user_id")?;
    let last_seen_ms =
        get::<pb::LastSeen>(kv, &keys::last_seen(&user))?.map_or(0, |r| r.last_seen_ms);
    Ok(R::LastSeen(pb::LastSeen {
        user_id: q.user_id,
        last_seen_ms,
    }))
}

/// The `AckNotifications` that retires exactly these notifications.
pub fn notification_ack(ns: &[pb::Notification]) -> pb::AckNotifications {
    pb::AckNotifications {
        keys: ns.iter().map(notification_key).collect(),
    }
}

/// A notification's key, for acks.
pub fn notification_key(n: &pb::Notification) -> pb::NotificationKey {
    pb::NotificationKey {
        user_id: n.user_id.clone(),
        conversation_id: n.conversation_id.clone(),
        seq: n.seq,
    }
}
