//! Messages: send (idempotent), delete (for me / for everyone), mark read,
//! and the tombstoning shared with expiry.
//!
//! * `seq` is assigned here, 1, 2, 3… per conversation: one total order.
//! * A send is keyed by (conversation, sender, client_msg_id): a retry gets
//!   the original message back (`duplicate = true`), even if it was since
//!   deleted; never a second message.
//! * Sending marks everything up to your own message read.
//! * A deleted or expired message becomes a tombstone: text and media are
//!   removed, the row stays (so syncs can report it) at a fresh version.
//! * Unread counts are kept exact per member: live messages from others
//!   after the member's read mark, minus those they deleted for themself.
//!   Expired-but-not-yet-purged messages still count until the purge.
//! * The feed preview is the newest message; when it is deleted, the newest
//!   live message among the previous 32 replaces it (else no preview).

use std::collections::BTreeSet;
use std::ops::Bound;

use natter_kv::{KvError, KvRead, KvResult, KvWrite};

use crate::codec::{decode, get, put};
use crate::conversations::{hidden_for, schedule_retention, view, Conv, Fanout};
use crate::error::{denied, invalid, limit, not_found, Res};
use crate::friends;
use crate::ids::{message_id, Id};
use crate::keys;
use crate::limits::{
    MAX_CLIENT_MSG_ID_BYTES, MAX_MEDIA_FIELD_BYTES, MAX_MEDIA_PER_MESSAGE, MAX_PUSHED_ROW_MEMBERS,
    MAX_TEXT_BYTES, PREVIEW_CHARS, PREVIEW_FALLBACK_SCAN,
};
use crate::pb::{self, response::R};

/// When a message disappears: the earlier of its own expiry and `created +
/// retention` (each 0 = never); 0 = never.
pub(crate) fn effective_expiry(expires_at: u64, created_at: u64, retention_ms: u64) -> u64 {
    let by_retention = if retention_ms > 0 {
        created_at.saturating_add(retention_ms).max(1)
    } else {
        0
    };
    match (expires_at, by_retention) {
        (0, r) => r,
        (e, 0) => e,
        (e, r) => e.min(r),
    }
}

/// Whether the message has expired by `now` under the current retention.
pub(crate) fn expired_by(msg: &pb::Message, retention_ms: u64, now: u64) -> bool {
    let at = effective_expiry(msg.expires_at_ms, msg.created_at_ms, retention_ms);
    at != 0 && at <= now
}

/// The tombstone form of a message: no content.
pub(crate) fn stripped(msg: &pb::Message) -> pb::Message {
    pb::Message {
        text: String::new(),
        media: Vec::new(),
        deleted: true,
        ..msg.clone()
    }
}

pub(crate) fn preview_of(msg: &pb::Message) -> pb::Preview {
    let text = if msg.text.is_empty() {
        "[media]".to_string()
    } else {
        msg.text.chars().take(PREVIEW_CHARS).collect()
    };
    pb::Preview {
        seq: msg.seq,
        sender_id: msg.sender_id.clone(),
        text,
        created_at_ms: msg.created_at_ms,
        expires_at_ms: msg.expires_at_ms,
    }
}

fn check_media(m: &pb::Media) -> Res<()> {
    if m.object_id.is_empty() {
        return Err(invalid("media.object_id is required"));
    }
    for (field, value) in [
        ("object_id", &m.object_id),
        ("content_type", &m.content_type),
        ("name", &m.name),
    ] {
        if value.len() > MAX_MEDIA_FIELD_BYTES {
            return Err(limit(format!(
                "media.{field} longer than {MAX_MEDIA_FIELD_BYTES} bytes"
            )));
        }
    }
    if !m.sha256.is_empty()
        && (m.sha256.len() != 64
            || !m
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return Err(invalid("media.sha256 must be 64 lowercase hex characters"));
    }
    Ok(())
}

pub(crate) fn send(kv: &mut dyn KvWrite, now: u64, c: pb::SendMessage) -> Res<R> {
    let id = Id::parse(&c.conversation_id, "conversation_id")?;
    let sender = Id::parse(&c.sender_id, "sender_id")?;
    if c.client_msg_id.is_empty() {
        return Err(invalid("client_msg_id is required"));
    }
    if c.client_msg_id.len() > MAX_CLIENT_MSG_ID_BYTES {
        return Err(limit(format!(
            "client_msg_id longer than {MAX_CLIENT_MSG_ID_BYTES} bytes"
        )));
    }
    if c.text.len() > MAX_TEXT_BYTES {
        return Err(limit(format!("text longer than {MAX_TEXT_BYTES} bytes")));
    }
    if c.media.len() > MAX_MEDIA_PER_MESSAGE {
        return Err(limit(format!("more than {MAX_MEDIA_PER_MESSAGE} media")));
    }
    c.media.iter().try_for_each(check_media)?;
    if c.text.is_empty() && c.media.is_empty() {
        return Err(invalid("a message needs text or media"));
    }
    let mut conv = Conv::load_for(&*kv, id, &c.sender_id)?;
    conv.remember_members();
    let sent_key = keys::sent(&id, &sender, &c.client_msg_id);
    if let Some(sent) = get::<pb::SentRow>(&*kv, &sent_key)? {
        let msg = get::<pb::Message>(&*kv, &keys::message(&id, sent.seq))?.ok_or_else(|| {
            KvError::Corrupt {
                key: sent_key.clone(),
                reason: format!("sent row points at missing message {}", sent.seq),
            }
        })?;
        return Ok(R::Sent(pb::SendResult {
            message: Some(msg),
            duplicate: true,
            conversation: None,
        }));
    }
    if !conv.is_group() {
        if let Some(peer) = conv.row.members.iter().find(|m| m.user_id != c.sender_id) {
            let peer = Id::stored(&peer.user_id, &keys::conversation(&id))?;
            if friends::is_blocked(&friends::load(&*kv, &sender, &peer)?) {
                return Err(denied("you can't message this user"));
            }
        }
    }
    let seq = conv.row.last_seq + 1;
    let ttl_at = if c.ttl_ms > 0 {
        now.saturating_add(c.ttl_ms)
    } else {
        0
    };
    let expires_at = effective_expiry(ttl_at, now, conv.row.retention_ms);
    let mut msg = pb::Message {
        conversation_id: c.conversation_id,
        seq,
        message_id: message_id(id, seq),
        sender_id: c.sender_id,
        client_msg_id: c.client_msg_id,
        text: c.text,
        media: c.media,
        created_at_ms: now,
        expires_at_ms: expires_at,
        ..Default::default()
    };
    conv.touch_message(kv, &mut msg);
    put(kv, &sent_key, &pb::SentRow { seq });
    if expires_at > 0 {
        put(
            kv,
            &keys::expiry(expires_at, &id, seq),
            &pb::IndexRef {
                conversation_id: id.bytes().to_vec(),
                seq,
                ..Default::default()
            },
        );
        crate::expiry::schedule(kv, expires_at)?;
    }
    conv.row.last_seq = seq;
    conv.row.last_activity_ms = now;
    conv.row.preview = Some(preview_of(&msg));
    for m in conv.row.members.iter_mut() {
        m.feed_hidden = false;
        if m.user_id == msg.sender_id {
            m.last_read_seq = seq;
            m.unread_count = 0;
        } else {
            m.unread_count += 1;
        }
    }
    if conv.row.retention_ms > 0 && conv.row.retention_due_ms == 0 {
        let due = now.saturating_add(conv.row.retention_ms);
        schedule_retention(kv, &mut conv, due)?;
    }
    let row = conv.save(kv, Fanout::Everyone, &[])?;
    Ok(R::Sent(pb::SendResult {
        message: Some(msg),
        duplicate: false,
        conversation: (row.members.len() <= MAX_PUSHED_ROW_MEMBERS).then(|| Box::new(row)),
    }))
}

/// Turns a live message into a tombstone (deleted for everyone, or
/// expired): fixes unread counts, unschedules its expiry, moves it to a
/// fresh version and replaces the preview if it was the preview.
pub(crate) fn tombstone(
    kv: &mut dyn KvWrite,
    conv: &mut Conv,
    msg: &mut pb::Message,
    expired: bool,
) -> KvResult<()> {
    let seq = msg.seq;
    for m in conv.row.members.iter_mut() {
        if m.user_id != msg.sender_id
            && seq > m.last_read_seq
            && m.unread_count > 0
            && !hidden_for(&*kv, &conv.id, m, seq)?
        {
            m.unread_count -= 1;
        }
    }
    if msg.expires_at_ms > 0 {
        kv.delete(&keys::expiry(msg.expires_at_ms, &conv.id, seq));
    }
    msg.text.clear();
    msg.media.clear();
    msg.deleted = true;
    msg.expired = expired;
    conv.touch_message(kv, msg);
    if conv.row.preview.as_ref().is_some_and(|p| p.seq == seq) {
        conv.row.preview = fallback_preview(&*kv, &conv.id, seq)?;
    }
    Ok(())
}

/// The newest live message before `seq`, looking back a bounded distance.
fn fallback_preview(kv: &dyn KvRead, id: &Id, seq: u64) -> KvResult<Option<pb::Preview>> {
    if seq <= 1 {
        return Ok(None);
    }
    let (lo, hi) = (keys::message(id, 1), keys::message(id, seq));
    let rows = kv.scan(
        Bound::Included(&lo),
        Bound::Excluded(&hi),
        true,
        PREVIEW_FALLBACK_SCAN,
    )?;
    for (k, v) in rows {
        let m = decode::<pb::Message>(&k, &v)?;
        if !m.deleted {
            return Ok(Some(preview_of(&m)));
        }
    }
    Ok(None)
}

pub(crate) fn delete(kv: &mut dyn KvWrite, now: u64, c: pb::DeleteMessage) -> Res<R> {
    let id = Id::parse(&c.conversation_id, "conversation_id")?;
    let actor = Id::parse(&c.actor_id, "actor_id")?;
    if c.seq == 0 {
        return Err(invalid("seq is required"));
    }
    let mut conv = Conv::load_for(&*kv, id, &c.actor_id)?;
    let gone = || not_found("message not found");
    let mut msg = get::<pb::Message>(&*kv, &keys::message(&id, c.seq))?.ok_or_else(gone)?;
    let me = conv.member(&c.actor_id).cloned().ok_or_else(gone)?;
    if c.seq <= me.cleared_through_seq
        || msg.expired
        || expired_by(&msg, conv.row.retention_ms, now)
    {
        return Err(gone());
    }
    let hidden = hidden_for(&*kv, &id, &me, c.seq)?;
    if c.for_everyone {
        let may = msg.sender_id == c.actor_id || (conv.is_group() && conv.is_admin(&c.actor_id));
        if !may {
            return Err(denied(
                "only the sender or a group admin can delete a message for everyone",
            ));
        }
        if msg.deleted {
            return Ok(R::Message(msg));
        }
        tombstone(kv, &mut conv, &mut msg, false)?;
        conv.save(kv, Fanout::Everyone, &[])?;
        return Ok(R::Message(msg));
    }
    if msg.deleted || hidden {
        return Ok(R::Message(stripped(&msg)));
    }
    let v = conv.next_version();
    put(
        kv,
        &keys::hidden(&id, &actor, c.seq),
        &pb::HiddenRow { version: v },
    );
    put(
        kv,
        &keys::private_change(&id, &actor, v),
        &pb::IndexRef {
            seq: c.seq,
            ..Default::default()
        },
    );
    if let Some(m) = conv.member_mut(&c.actor_id) {
        m.has_hidden = true;
        if c.seq > m.last_read_seq && msg.sender_id != c.actor_id {
            m.unread_count = m.unread_count.saturating_sub(1);
        }
    }
    conv.save(kv, Fanout::Only(&c.actor_id), &[])?;
    let mut out = stripped(&msg);
    out.version = v;
    Ok(R::Message(out))
}

/// Live messages in `(lo, hi]` that count as unread for `m`.
fn count_unread(kv: &dyn KvRead, id: &Id, m: &pb::Member, lo: u64, hi: u64) -> KvResult<u64> {
    if hi <= lo {
        return Ok(0);
    }
    let mut hidden = BTreeSet::new();
    if m.has_hidden {
        let user = Id::stored(&m.user_id, &keys::conversation(id))?;
        let (a, b) = (keys::hidden(id, &user, lo + 1), keys::hidden(id, &user, hi));
        for (k, _) in kv.scan(Bound::Included(&a), Bound::Included(&b), false, usize::MAX)? {
            hidden.insert(crate::codec::tail_u64(&k)?);
        }
    }
    let (a, b) = (keys::message(id, lo + 1), keys::message(id, hi));
    let mut n = 0;
    for (k, v) in kv.scan(Bound::Included(&a), Bound::Included(&b), false, usize::MAX)? {
        let msg = decode::<pb::Message>(&k, &v)?;
        if !msg.deleted && msg.sender_id != m.user_id && !hidden.contains(&msg.seq) {
            n += 1;
        }
    }
    Ok(n)
}

pub(crate) fn mark_read(kv: &mut dyn KvWrite, c: pb::MarkRead) -> Res<R> {
    let id = Id::parse(&c.conversation_id, "conversation_id")?;
    Id::parse(&c.user_id, "user_id")?;
    let mut conv = Conv::load_for(&*kv, id, &c.user_id)?;
    let last = conv.row.last_seq;
    let target = c.seq.min(last);
    let me = conv
        .member(&c.user_id)
        .cloned()
        .ok_or_else(crate::error::no_conversation)?;
    if target <= me.last_read_seq {
        return Ok(R::Conversation(view(&conv.row, &c.user_id)));
    }
    // Count whichever side of the new mark is shorter.
    let old = me.last_read_seq;
    let unread = if target - old <= last - target {
        me.unread_count
            .saturating_sub(count_unread(&*kv, &id, &me, old, target)?)
    } else {
        count_unread(&*kv, &id, &me, target, last)?
    };
    if let Some(m) = conv.member_mut(&c.user_id) {
        m.last_read_seq = target;
        m.unread_count = unread;
    }
    let row = conv.save(kv, Fanout::Only(&c.user_id), &[])?;
    Ok(R::Conversation(view(&row, &c.user_id)))
}
