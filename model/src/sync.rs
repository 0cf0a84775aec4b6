//! Reading a conversation: cold start, delta sync and history.
//!
//! **Cold start** (`token = 0`): the metadata, the newest page of live
//! messages, `token` = the conversation version, and `before_seq` for
//! `History`, which pages older live messages backwards.
//!
//! **Delta** (`token > 0`): the change index holds every message once, at
//! the version of its latest change, so "everything after the token" is a
//! range scan of the global index merged with the viewer's private one
//! (their "delete for me" changes). The metadata changes with every change
//! (it is saved last, at the next version), so its place in that order is
//! always the row's version and it has no entry of its own. Each entity is
//! returned at its current state: live messages in full, deleted, expired
//! or hidden ones as tombstones.
//! Cost is proportional to the changes returned, not to the conversation.
//!
//! The metadata's member list is sent whole only when it changed (a join or
//! a leave) after the token; otherwise just the members whose view (role,
//! read mark) changed after it (`members_complete = false`), which the
//! client merges into the list it holds — else a message in a group of N
//! would send N members to each of N devices. The metadata's place is the
//! newest (the row's version), so it comes in the last page; a page whose
//! range would hold a member change ends just before it and carries the
//! metadata too.
//!
//! **From a send's result** ([`sends_delta`]): a send answers with the
//! conversation row after it (up to `MAX_PUSHED_ROW_MEMBERS` members, i.e.
//! any group today), which tells each member the delta from the version
//! just before it without reading anything back — what routers push when
//! that version is a device's token.
//!
//! A message is live for a viewer when it isn't a tombstone, its seq is
//! above the viewer's `cleared_through_seq`, they didn't delete it for
//! themself, and it hasn't expired by the query time — expired-but-not-yet-
//! purged messages are hidden too.

use std::ops::Bound;

use natter_kv::{KvRead, KvResult};

use crate::codec::{decode, get, scan_from, tail_u64};
use crate::conversations::{delta_view, hidden_for, view, Conv};
use crate::error::Res;
use crate::ids::Id;
use crate::keys;
use crate::limits::{page_limit, SCAN_BUDGET};
use crate::messages::{expired_by, stripped};
use crate::pb::{self, conversation_change::Change, response::R};

/// Who is reading, and when.
struct Viewer<'a> {
    conv: &'a Conv,
    me: &'a pb::Member,
    now: u64,
}

/// Whether `me` may see `msg` by what the message and the member row say:
/// not a tombstone, after their cleared history, not expired by `now`
/// (whether they deleted it for themself is a row of its own).
fn visible(msg: &pb::Message, me: &pb::Member, retention_ms: u64, now: u64) -> bool {
    !msg.deleted && msg.seq > me.cleared_through_seq && !expired_by(msg, retention_ms, now)
}

/// The message as shown: itself when `live`, else its tombstone.
fn shown_as(msg: pb::Message, live: bool, retention_ms: u64, now: u64) -> pb::Message {
    if live {
        return msg;
    }
    pb::Message {
        expired: msg.expired || expired_by(&msg, retention_ms, now),
        ..stripped(&msg)
    }
}

impl Viewer<'_> {
    fn live(&self, kv: &dyn KvRead, msg: &pb::Message) -> KvResult<bool> {
        Ok(visible(msg, self.me, self.conv.row.retention_ms, self.now)
            && !hidden_for(kv, &self.conv.id, self.me, msg.seq)?)
    }

    /// The message as this viewer may see it.
    fn shown(&self, kv: &dyn KvRead, msg: pb::Message) -> KvResult<pb::Message> {
        let live = self.live(kv, &msg)?;
        Ok(shown_as(msg, live, self.conv.row.retention_ms, self.now))
    }
}

fn open(kv: &dyn KvRead, conversation_id: &str, viewer_id: &str) -> Res<Conv> {
    let id = Id::parse(conversation_id, "conversation_id")?;
    Id::parse(viewer_id, "viewer_id")?;
    Conv::load_for(kv, id, viewer_id)
}

/// Live messages below `before` (exclusive), newest first, at most `lim`,
/// returned oldest first, with the cursor for the next older page (0 = no
/// older live message).
fn page_back(
    kv: &dyn KvRead,
    v: &Viewer<'_>,
    before: u64,
    lim: usize,
) -> KvResult<(Vec<pb::Message>, u64)> {
    let id = &v.conv.id;
    let floor = v.me.cleared_through_seq.max(v.conv.row.purged_through_seq);
    let retention = v.conv.row.retention_ms;
    let lo = keys::message(id, floor.saturating_add(1));
    let mut hi = before;
    let mut out: Vec<pb::Message> = Vec::new();
    let mut scanned = 0;
    loop {
        if hi <= floor.saturating_add(1) {
            break;
        }
        let chunk = SCAN_BUDGET.saturating_sub(scanned).min(lim + 1).max(1);
        let hi_key = keys::message(id, hi);
        let rows = kv.scan(Bound::Included(&lo), Bound::Excluded(&hi_key), true, chunk)?;
        let n = rows.len();
        for (k, val) in rows {
            let msg = decode::<pb::Message>(&k, &val)?;
            scanned += 1;
            hi = msg.seq;
            if retention > 0 && msg.created_at_ms.saturating_add(retention) <= v.now {
                // Seq order is time order: everything older is gone too.
                out.reverse();
                return Ok((out, 0));
            }
            if v.live(kv, &msg)? {
                if out.len() == lim {
                    let cursor = out.last().map_or(0, |m| m.seq);
                    out.reverse();
                    return Ok((out, cursor));
                }
                out.push(msg);
            }
        }
        if n < chunk {
            break;
        }
        if scanned >= SCAN_BUDGET {
            // Out of budget: the client continues below the last row seen.
            out.reverse();
            return Ok((out, hi));
        }
    }
    out.reverse();
    Ok((out, 0))
}

/// Query `SyncConversation`.
pub(crate) fn sync(kv: &dyn KvRead, now: u64, q: pb::SyncConversation) -> Res<R> {
    let conv = open(kv, &q.conversation_id, &q.viewer_id)?;
    let lim = page_limit(q.limit)?;
    let Some(me) = conv.member(&q.viewer_id) else {
        return Err(crate::error::no_conversation());
    };
    let v = Viewer {
        conv: &conv,
        me,
        now,
    };
    let row = &conv.row;
    let mut changes = vec![pb::ConversationChange {
        change: Some(Change::Conversation(view(row, &q.viewer_id))),
    }];
    if q.token == 0 || q.token > row.version {
        let (messages, before_seq) = page_back(kv, &v, row.last_seq.saturating_add(1), lim)?;
        changes.extend(messages.into_iter().map(|m| pb::ConversationChange {
            change: Some(Change::Message(m)),
        }));
        return Ok(R::ConversationSync(pb::ConversationSync {
            changes,
            token: row.version,
            has_more: false,
            before_seq,
            cold_start: true,
            now_ms: now,
        }));
    }
    changes.clear();
    let id = &conv.id;
    let user = Id::parse(&q.viewer_id, "viewer_id")?;
    // (version, seq or None for the metadata, private?)
    let mut entries: Vec<(u64, Option<u64>, bool)> = Vec::new();
    let global_from = keys::change(id, q.token);
    for (k, val) in scan_from(
        kv,
        &keys::change_prefix(id),
        Bound::Excluded(&global_from),
        lim + 1,
    )? {
        let r = decode::<pb::IndexRef>(&k, &val)?;
        // A metadata entry is from a store written before the metadata
        // left the index: its place is the row's version (below).
        if !r.meta {
            entries.push((tail_u64(&k)?, Some(r.seq), false));
        }
    }
    // The metadata: the newest change, at the row's version.
    if row.version > q.token {
        entries.push((row.version, None, false));
    }
    let private_from = keys::private_change(id, &user, q.token);
    let private_prefix = keys::private_change_prefix(id, &user);
    for (k, val) in scan_from(kv, &private_prefix, Bound::Excluded(&private_from), lim + 1)? {
        let r = decode::<pb::IndexRef>(&k, &val)?;
        entries.push((tail_u64(&k)?, Some(r.seq), true));
    }
    entries.sort_unstable();
    let has_more = entries.len() > lim;
    entries.truncate(lim);
    let mut token = row.version;
    let mut members_now = false;
    if has_more {
        token = entries.last().map_or(q.token, |e| e.0);
        // The metadata's place is the newest, so only the last page
        // carries it, with the members changed after *that* page's token. A
        // member change within this page's range must come now: the page
        // ends just before it, and carries the metadata. (A member change's
        // version is never an entry's: the metadata has moved on since.)
        if let Some(at) = first_member_change_within(row, q.token, token) {
            entries.retain(|e| e.0 < at);
            token = at;
            members_now = true;
        }
    }
    let meta_change = || pb::ConversationChange {
        change: Some(Change::Conversation(delta_view(row, &q.viewer_id, q.token))),
    };
    for (version, seq, private) in entries {
        let Some(seq) = seq else {
            changes.push(meta_change());
            continue;
        };
        if seq <= me.cleared_through_seq {
            continue;
        }
        let Some(msg) = get::<pb::Message>(kv, &keys::message(id, seq))? else {
            continue;
        };
        let msg = if private {
            pb::Message {
                version,
                ..stripped(&msg)
            }
        } else {
            v.shown(kv, msg)?
        };
        changes.push(pb::ConversationChange {
            change: Some(Change::Message(msg)),
        });
    }
    if members_now {
        changes.push(meta_change());
    }
    Ok(R::ConversationSync(pb::ConversationSync {
        changes,
        token,
        has_more,
        before_seq: 0,
        cold_start: false,
        now_ms: now,
    }))
}

/// What [`sync`] answered `viewer` from `token` right after the last of
/// the sends `sent` (results in any order, each carrying the conversation
/// row after it) when they were the only changes after `token` — `None`
/// when `sent` can't tell: no send continues `token` (another change came
/// between, or a result without a row), a token of 0, the viewer not a
/// member, a deleted conversation. Sends past a gap, or past what one page
/// of `limit` holds, are left out (the caller syncs for them). This is what
/// lets a router push a send without reading it back; the property test
/// holds it equal to `sync`.
///
/// A send writes its message at the version after the conversation's and
/// the metadata at the one after that (`Conv::touch_message`, `Conv::save`), so
/// a run of sends continues `token` exactly while each message's version is
/// one above the previous row's. A new message can't be hidden for anyone
/// yet ("delete for me" is a later change of its own), so only the viewer's
/// cleared history and expiry decide how it shows.
pub fn sends_delta(
    sent: &[&pb::SendResult],
    viewer: &str,
    token: u64,
    now: u64,
    limit: u32,
) -> Option<pb::ConversationSync> {
    let lim = page_limit(limit).ok()?;
    if token == 0 {
        return None;
    }
    let mut chain: Vec<(&pb::Message, &pb::ConversationRow)> = sent
        .iter()
        .filter(|s| !s.duplicate)
        .filter_map(|s| Some((s.message.as_ref()?, s.conversation.as_deref()?)))
        .collect();
    chain.sort_by_key(|(m, _)| m.version);
    let (mut at, mut msgs, mut last) = (token, Vec::new(), None);
    for (m, row) in chain {
        if row.version <= at {
            continue; // the viewer has it already
        }
        // A page holds the messages and the metadata (`sync`'s `has_more`).
        if m.version != at + 1 || row.version != m.version + 1 || msgs.len() + 2 > lim {
            break;
        }
        msgs.push(m);
        at = row.version;
        last = Some(row);
    }
    let row = last?;
    let me = row.members.iter().find(|m| m.user_id == viewer)?;
    if row.deleted {
        return None;
    }
    let mut changes: Vec<pb::ConversationChange> = msgs
        .into_iter()
        .filter(|m| m.seq > me.cleared_through_seq)
        .map(|m| {
            let live = visible(m, me, row.retention_ms, now);
            pb::ConversationChange {
                change: Some(Change::Message(shown_as(
                    m.clone(),
                    live,
                    row.retention_ms,
                    now,
                ))),
            }
        })
        .collect();
    changes.push(pb::ConversationChange {
        change: Some(Change::Conversation(delta_view(row, viewer, token))),
    });
    Some(pb::ConversationSync {
        changes,
        token: row.version,
        has_more: false,
        before_seq: 0,
        cold_start: false,
        now_ms: now,
    })
}

/// The first version in `(from, to]` at which the member list, or a
/// member's view, last changed.
fn first_member_change_within(row: &pb::ConversationRow, from: u64, to: u64) -> Option<u64> {
    std::iter::once(row.members_version)
        .chain(row.members.iter().map(|m| m.view_version))
        .filter(|&v| v > from && v <= to)
        .min()
}

/// Query `History`.
pub(crate) fn history(kv: &dyn KvRead, now: u64, q: pb::History) -> Res<R> {
    let conv = open(kv, &q.conversation_id, &q.viewer_id)?;
    let lim = page_limit(q.limit)?;
    let Some(me) = conv.member(&q.viewer_id) else {
        return Err(crate::error::no_conversation());
    };
    let v = Viewer {
        conv: &conv,
        me,
        now,
    };
    let top = conv.row.last_seq.saturating_add(1);
    let before = if q.before_seq == 0 {
        top
    } else {
        q.before_seq.min(top)
    };
    let (messages, before_seq) = page_back(kv, &v, before, lim)?;
    Ok(R::History(pb::MessagePage {
        messages,
        before_seq,
        now_ms: now,
    }))
}
