//! Conversations: the metadata row, membership and permissions, and the
//! bookkeeping every conversation change shares ([`Conv`]).
//!
//! Rules (all checked inside apply, atomically with the write):
//! * Non-members — and removed members — get NOT_FOUND for everything, the
//!   same answer as for a conversation that doesn't exist or was deleted.
//! * A direct conversation has the deterministic id
//!   [`crate::direct_conversation_id`], lives on the pair's shard next to the
//!   friendship row, needs an accepted friendship to be opened, and never
//!   changes members. It first shows in the opener's feed only; the peer's
//!   feed gets it with the first message.
//! * Group ids must be random (version 4) UUIDs, so nobody can squat on a
//!   pair's (version 5) direct id.
//! * Group changes need an admin; any member may remove themself (leave).
//!   If the last admin leaves or is removed, the longest-standing remaining
//!   member becomes admin; explicitly demoting the last admin is refused.
//! * New members see messages from the moment they join (their
//!   `cleared_through_seq` starts at the current last seq); a removed and
//!   re-added member starts afresh the same way.
//! * In a direct conversation either member may change the retention.
//!
//! Versions: every change bumps the conversation version. Each changed
//! entity (a message, a member's private deletion, the metadata) moves to a
//! fresh version in the change index (its old entry is deleted), and the
//! metadata is always last, at the conversation's version.

use natter_kv::{KvRead, KvResult, KvWrite};

use crate::codec::{get, put};
use crate::error::{denied, exists, invalid, limit, no_conversation, precondition, Res};
use crate::friends;
use crate::ids::{direct_id, Id};
use crate::keys;
use crate::limits::{MAX_GROUP_MEMBERS, MAX_NAME_BYTES};
use crate::messages::effective_expiry;
use crate::outbox;
use crate::pb::{self, response::R, ConversationKind, Role};

/// Who gets a feed update when a change is saved.
pub(crate) enum Fanout<'a> {
    Everyone,
    Only(&'a str),
}

/// A loaded conversation being changed by one command.
pub(crate) struct Conv {
    pub(crate) id: Id,
    pub(crate) row: pb::ConversationRow,
    /// The members as stored before this command, if remembered at load
    /// ([`Conv::remember_members`]); else [`Conv::save`] reads them back.
    before: Option<Vec<pb::Member>>,
}

impl Conv {
    fn new(id: Id, row: pb::ConversationRow) -> Conv {
        Conv {
            id,
            row,
            before: None,
        }
    }

    /// Keeps the members as loaded, so that [`Conv::save`] can tell whose
    /// public view changed without reading the row again (hot commands).
    pub(crate) fn remember_members(&mut self) {
        self.before = Some(self.row.members.clone());
    }

    /// Records, at version `v`, which members' public views (role, read
    /// mark, join time) changed since `before`, and whether the list itself
    /// did — what lets a delta sync send only the members that changed.
    fn record_member_versions(&mut self, before: &[pb::Member], v: u64) {
        let same_list = before.len() == self.row.members.len()
            && before
                .iter()
                .zip(&self.row.members)
                .all(|(b, m)| b.user_id == m.user_id);
        if self.row.members_version == 0 || !same_list {
            // A join or a leave, or a row from before these versions: every
            // member's view is (re)sent.
            self.row.members_version = v;
            for m in &mut self.row.members {
                m.view_version = v;
            }
            return;
        }
        for (b, m) in before.iter().zip(self.row.members.iter_mut()) {
            if (b.role, b.last_read_seq, b.joined_at_ms)
                != (m.role, m.last_read_seq, m.joined_at_ms)
            {
                m.view_version = v;
            }
        }
    }

    pub(crate) fn load(kv: &dyn KvRead, id: Id) -> KvResult<Option<Conv>> {
        Ok(
            get::<pb::ConversationRow>(kv, &keys::conversation(&id))?.map(|row| Conv {
                id,
                row,
                before: None,
            }),
        )
    }

    /// The conversation if `user` is a current member of it (and it isn't
    /// deleted); NOT_FOUND otherwise, whatever the reason.
    pub(crate) fn load_for(kv: &dyn KvRead, id: Id, user: &str) -> Res<Conv> {
        match Conv::load(kv, id)? {
            Some(c) if !c.row.deleted && c.member(user).is_some() => Ok(c),
            _ => Err(no_conversation()),
        }
    }

    pub(crate) fn member(&self, user: &str) -> Option<&pb::Member> {
        self.row.members.iter().find(|m| m.user_id == user)
    }

    pub(crate) fn member_mut(&mut self, user: &str) -> Option<&mut pb::Member> {
        self.row.members.iter_mut().find(|m| m.user_id == user)
    }

    pub(crate) fn is_group(&self) -> bool {
        self.row.kind == ConversationKind::Group as i32
    }

    pub(crate) fn is_admin(&self, user: &str) -> bool {
        self.member(user)
            .is_some_and(|m| m.role == Role::Admin as i32)
    }

    /// The next version, for one changed entity.
    pub(crate) fn next_version(&mut self) -> u64 {
        self.row.version += 1;
        self.row.version
    }

    /// Writes a changed message at a fresh version (move-to-latest).
    pub(crate) fn touch_message(&mut self, kv: &mut dyn KvWrite, msg: &mut pb::Message) {
        if msg.version > 0 {
            kv.delete(&keys::change(&self.id, msg.version));
        }
        msg.version = self.next_version();
        put(
            kv,
            &keys::change(&self.id, msg.version),
            &pb::IndexRef {
                seq: msg.seq,
                ..Default::default()
            },
        );
        put(kv, &keys::message(&self.id, msg.seq), msg);
    }

    /// Writes the row without a version bump (internal bookkeeping only).
    pub(crate) fn store_quiet(&self, kv: &mut dyn KvWrite) {
        put(kv, &keys::conversation(&self.id), &self.row);
    }

    /// Ends a change: moves the metadata to a fresh version, writes the row
    /// and enqueues feed updates — for `fanout`, plus a "removed" update for
    /// each of `removed`.
    pub(crate) fn save(
        mut self,
        kv: &mut dyn KvWrite,
        fanout: Fanout<'_>,
        removed: &[pb::Member],
    ) -> KvResult<pb::ConversationRow> {
        let before = match self.before.take() {
            Some(b) => b,
            None => get::<pb::ConversationRow>(&*kv, &keys::conversation(&self.id))?
                .map(|r| r.members)
                .unwrap_or_default(),
        };
        // The metadata is the conversation's newest change, always: its
        // place in the change order is the row's version, so it needs no
        // change-index entry (`sync` adds it there).
        let v = self.next_version();
        self.record_member_versions(&before, v);
        put(kv, &keys::conversation(&self.id), &self.row);
        match fanout {
            Fanout::Everyone => outbox::enqueue_conversation(kv, &self.id, self.row.version),
            Fanout::Only(u) => {
                if let Some(m) = self.member(u) {
                    let update = feed_update(&*kv, &self.id, &self.row, m, false)?;
                    let user = Id::stored(&m.user_id, &keys::conversation(&self.id))?;
                    outbox::enqueue_feed(kv, &self.id, &user, update);
                }
            }
        }
        for m in removed {
            let update = feed_update(&*kv, &self.id, &self.row, m, true)?;
            let user = Id::stored(&m.user_id, &keys::conversation(&self.id))?;
            outbox::enqueue_feed(kv, &self.id, &user, update);
        }
        Ok(self.row)
    }
}

/// Whether `user` deleted message `seq` for themself.
pub(crate) fn hidden_for(
    kv: &dyn KvRead,
    conv: &Id,
    member: &pb::Member,
    seq: u64,
) -> KvResult<bool> {
    if !member.has_hidden {
        return Ok(false);
    }
    let user = Id::stored(&member.user_id, &keys::conversation(conv))?;
    Ok(kv.get(&keys::hidden(conv, &user, seq))?.is_some())
}

/// One member's feed row for the conversation as it is now.
pub(crate) fn feed_update(
    kv: &dyn KvRead,
    id: &Id,
    row: &pb::ConversationRow,
    m: &pb::Member,
    removed: bool,
) -> KvResult<pb::FeedUpdate> {
    let preview = match &row.preview {
        Some(p) if p.seq > m.cleared_through_seq && !hidden_for(kv, id, m, p.seq)? => {
            Some(pb::Preview {
                expires_at_ms: effective_expiry(p.expires_at_ms, p.created_at_ms, row.retention_ms),
                ..p.clone()
            })
        }
        _ => None,
    };
    let direct = row.kind == ConversationKind::Direct as i32;
    let peer_user_id = if direct {
        row.members
            .iter()
            .find(|o| o.user_id != m.user_id)
            .map(|o| o.user_id.clone())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(pb::FeedUpdate {
        user_id: m.user_id.clone(),
        conversation_id: row.id.clone(),
        version: row.version,
        kind: row.kind,
        title: if direct {
            String::new()
        } else {
            row.name.clone()
        },
        peer_user_id,
        last_activity_ms: row.last_activity_ms.max(m.joined_at_ms),
        preview,
        last_seq: row.last_seq,
        last_read_seq: m.last_read_seq,
        unread_count: m.unread_count,
        hidden: m.feed_hidden,
        removed: removed || row.deleted,
        deleted: row.deleted,
    })
}

/// The conversation as `viewer` sees it.
pub(crate) fn view(row: &pb::ConversationRow, viewer: &str) -> pb::Conversation {
    view_members(row, viewer, None)
}

/// The conversation as `viewer` sees it, for a delta sync from `token`: the
/// whole member list if it changed after the token (or its version is
/// unknown), else only the members whose view changed after it.
pub(crate) fn delta_view(row: &pb::ConversationRow, viewer: &str, token: u64) -> pb::Conversation {
    let partial = row.members_version != 0 && row.members_version <= token;
    view_members(row, viewer, partial.then_some(token))
}

/// With `changed_after`: only members whose view changed after it.
fn view_members(
    row: &pb::ConversationRow,
    viewer: &str,
    changed_after: Option<u64>,
) -> pb::Conversation {
    let me = row.members.iter().find(|m| m.user_id == viewer);
    pb::Conversation {
        id: row.id.clone(),
        kind: row.kind,
        name: row.name.clone(),
        members_complete: changed_after.is_none(),
        members: row
            .members
            .iter()
            .filter(|m| changed_after.is_none_or(|t| m.view_version == 0 || m.view_version > t))
            .map(|m| pb::MemberView {
                user_id: m.user_id.clone(),
                role: m.role,
                last_read_seq: m.last_read_seq,
                joined_at_ms: m.joined_at_ms,
            })
            .collect(),
        retention_ms: row.retention_ms,
        created_at_ms: row.created_at_ms,
        version: row.version,
        last_seq: row.last_seq,
        last_activity_ms: row.last_activity_ms,
        my_role: me.map_or(0, |m| m.role),
        my_last_read_seq: me.map_or(0, |m| m.last_read_seq),
        my_cleared_through_seq: me.map_or(0, |m| m.cleared_through_seq),
        my_unread_count: me.map_or(0, |m| m.unread_count),
        deleted: row.deleted,
    }
}

/// A member joining now: sees messages after `last_seq` only.
fn new_member(user: String, role: Role, now: u64, last_seq: u64) -> pb::Member {
    pb::Member {
        user_id: user,
        role: role as i32,
        last_read_seq: last_seq,
        joined_at_ms: now,
        cleared_through_seq: last_seq,
        ..Default::default()
    }
}

fn check_name(name: &str) -> Res<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(limit(format!("name longer than {MAX_NAME_BYTES} bytes")));
    }
    Ok(())
}

/// Parses a list of user ids, dropping duplicates (first one wins).
fn user_list(ids: &[String], field: &str) -> Res<Vec<String>> {
    if ids.len() > MAX_GROUP_MEMBERS {
        return Err(limit(format!(
            "{field}: more than {MAX_GROUP_MEMBERS} users"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(ids.len());
    for s in ids {
        Id::parse(s, field)?;
        if seen.insert(s.as_str()) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

pub(crate) fn create_direct(kv: &mut dyn KvWrite, now: u64, c: pb::CreateDirect) -> Res<R> {
    let a = Id::parse(&c.user_a, "user_a")?;
    let b = Id::parse(&c.user_b, "user_b")?;
    if a == b {
        return Err(invalid("a direct conversation needs two different users"));
    }
    let id = direct_id(a, b);
    if let Some(conv) = Conv::load(&*kv, id)? {
        if conv.row.kind == ConversationKind::Direct as i32 && conv.member(&c.user_a).is_some() {
            return Ok(R::Conversation(view(&conv.row, &c.user_a)));
        }
        return Err(exists("conversation id is taken"));
    }
    if !friends::are_friends(&friends::load(&*kv, &a, &b)?) {
        return Err(denied("a direct conversation needs an accepted friendship"));
    }
    let row = pb::ConversationRow {
        id: id.to_string(),
        kind: ConversationKind::Direct as i32,
        members: vec![
            new_member(c.user_a.clone(), Role::Member, now, 0),
            new_member(c.user_b, Role::Member, now, 0),
        ],
        created_at_ms: now,
        last_activity_ms: now,
        creator_id: c.user_a.clone(),
        ..Default::default()
    };
    let row = Conv::new(id, row).save(kv, Fanout::Only(&c.user_a), &[])?;
    Ok(R::Conversation(view(&row, &c.user_a)))
}

pub(crate) fn create_group(kv: &mut dyn KvWrite, now: u64, c: pb::CreateGroup) -> Res<R> {
    let id = Id::parse(&c.conversation_id, "conversation_id")?;
    if id.version() != 4 {
        return Err(invalid("group ids must be random (version 4) uuids"));
    }
    Id::parse(&c.creator_id, "creator_id")?;
    check_name(&c.name)?;
    let others: Vec<String> = user_list(&c.member_ids, "member_ids")?
        .into_iter()
        .filter(|u| *u != c.creator_id)
        .collect();
    if others.len() + 1 > MAX_GROUP_MEMBERS {
        return Err(limit(format!(
            "a group has at most {MAX_GROUP_MEMBERS} members"
        )));
    }
    if let Some(conv) = Conv::load(&*kv, id)? {
        // A retry of the same creation answers with the group.
        if conv.is_group() && !conv.row.deleted && conv.row.creator_id == c.creator_id {
            return Ok(R::Conversation(view(&conv.row, &c.creator_id)));
        }
        return Err(exists("conversation already exists"));
    }
    let mut members = Vec::with_capacity(others.len() + 1);
    members.push(new_member(c.creator_id.clone(), Role::Admin, now, 0));
    members.extend(
        others
            .into_iter()
            .map(|u| new_member(u, Role::Member, now, 0)),
    );
    let row = pb::ConversationRow {
        id: c.conversation_id,
        kind: ConversationKind::Group as i32,
        name: c.name,
        members,
        retention_ms: c.retention_ms,
        created_at_ms: now,
        last_activity_ms: now,
        creator_id: c.creator_id.clone(),
        ..Default::default()
    };
    let row = Conv::new(id, row).save(kv, Fanout::Everyone, &[])?;
    Ok(R::Conversation(view(&row, &c.creator_id)))
}

/// Sets the retention policy and reschedules its purge: the next message
/// due is the oldest one not yet purged by retention, so a new (shorter)
/// policy also applies to messages sent before it.
fn set_retention(
    kv: &mut dyn KvWrite,
    conv: &mut Conv,
    retention_ms: u64,
    now: u64,
) -> KvResult<()> {
    if conv.row.retention_due_ms > 0 {
        kv.delete(&keys::retention_due(conv.row.retention_due_ms, &conv.id));
        conv.row.retention_due_ms = 0;
    }
    conv.row.retention_ms = retention_ms;
    let next = conv.row.purged_through_seq.saturating_add(1);
    if retention_ms > 0 && next <= conv.row.last_seq {
        let oldest = get::<pb::Message>(&*kv, &keys::message(&conv.id, next))?;
        let due = oldest
            .map_or(now, |m| m.created_at_ms.saturating_add(retention_ms))
            .max(1);
        schedule_retention(kv, conv, due)?;
    }
    Ok(())
}

/// Records when the conversation's next retention purge is due.
pub(crate) fn schedule_retention(kv: &mut dyn KvWrite, conv: &mut Conv, due: u64) -> KvResult<()> {
    conv.row.retention_due_ms = due;
    put(
        kv,
        &keys::retention_due(due, &conv.id),
        &pb::IndexRef {
            conversation_id: conv.id.bytes().to_vec(),
            ..Default::default()
        },
    );
    crate::expiry::schedule(kv, due)
}

pub(crate) fn update(kv: &mut dyn KvWrite, now: u64, c: pb::UpdateConversation) -> Res<R> {
    let id = Id::parse(&c.conversation_id, "conversation_id")?;
    Id::parse(&c.actor_id, "actor_id")?;
    if let Some(name) = &c.name {
        check_name(name)?;
    }
    let adds = user_list(&c.add_member_ids, "add_member_ids")?;
    let removes = user_list(&c.remove_member_ids, "remove_member_ids")?;
    if c.set_roles.len() > MAX_GROUP_MEMBERS {
        return Err(limit(format!(
            "set_roles: more than {MAX_GROUP_MEMBERS} entries"
        )));
    }
    let mut roles = Vec::with_capacity(c.set_roles.len());
    for r in &c.set_roles {
        Id::parse(&r.user_id, "set_roles.user_id")?;
        match Role::try_from(r.role) {
            Ok(role @ (Role::Admin | Role::Member)) => roles.push((r.user_id.as_str(), role)),
            _ => return Err(invalid(format!("set_roles: bad role {}", r.role))),
        }
    }
    if adds.iter().any(|a| removes.contains(a)) {
        return Err(invalid("a user can't be both added and removed"));
    }
    let mut conv = Conv::load_for(&*kv, id, &c.actor_id)?;
    if conv.is_group() {
        let leaving = c.name.is_none()
            && adds.is_empty()
            && roles.is_empty()
            && c.retention_ms.is_none()
            && removes.len() == 1
            && removes.first() == Some(&c.actor_id);
        if !leaving && !conv.is_admin(&c.actor_id) {
            return Err(denied("only group admins can change the group"));
        }
    } else if c.name.is_some() || !adds.is_empty() || !removes.is_empty() || !roles.is_empty() {
        return Err(precondition(
            "only the retention of a direct conversation can change",
        ));
    }
    let before = conv.row.clone();
    let mut removed = Vec::new();
    for u in &removes {
        if let Some(pos) = conv.row.members.iter().position(|m| m.user_id == *u) {
            removed.push(conv.row.members.remove(pos));
        }
    }
    let last_seq = conv.row.last_seq;
    for u in adds {
        if conv.member(&u).is_none() {
            conv.row
                .members
                .push(new_member(u, Role::Member, now, last_seq));
        }
    }
    if conv.row.members.len() > MAX_GROUP_MEMBERS {
        return Err(limit(format!(
            "a group has at most {MAX_GROUP_MEMBERS} members"
        )));
    }
    for (user, role) in &roles {
        match conv.member_mut(user) {
            Some(m) => m.role = *role as i32,
            None => return Err(invalid(format!("set_roles: {user} is not a member"))),
        }
    }
    if conv.is_group()
        && !conv
            .row
            .members
            .iter()
            .any(|m| m.role == Role::Admin as i32)
    {
        if !roles.is_empty() {
            return Err(precondition("a group needs at least one admin"));
        }
        if let Some(first) = conv.row.members.first_mut() {
            first.role = Role::Admin as i32;
        }
    }
    if let Some(name) = c.name {
        conv.row.name = name;
    }
    if let Some(r) = c.retention_ms {
        if r != conv.row.retention_ms {
            set_retention(kv, &mut conv, r, now)?;
        }
    }
    if conv.row == before {
        return Ok(R::Conversation(view(&conv.row, &c.actor_id)));
    }
    let row = conv.save(kv, Fanout::Everyone, &removed)?;
    Ok(R::Conversation(view(&row, &c.actor_id)))
}

pub(crate) fn delete(kv: &mut dyn KvWrite, now: u64, c: pb::DeleteConversation) -> Res<R> {
    let id = Id::parse(&c.conversation_id, "conversation_id")?;
    Id::parse(&c.actor_id, "actor_id")?;
    let mut conv = Conv::load_for(&*kv, id, &c.actor_id)?;
    if c.for_everyone {
        if !conv.is_group() {
            return Err(precondition(
                "a direct conversation can only be deleted for yourself",
            ));
        }
        if !conv.is_admin(&c.actor_id) {
            return Err(denied("only group admins can delete a group for everyone"));
        }
        conv.row.deleted = true;
        conv.row.deleted_at_ms = now;
        conv.row.preview = None;
        if conv.row.retention_due_ms > 0 {
            kv.delete(&keys::retention_due(conv.row.retention_due_ms, &id));
            conv.row.retention_due_ms = 0;
        }
        put(kv, &keys::purge(&id), &pb::PurgeRow { deleted_at_ms: now });
        crate::expiry::schedule(kv, now)?;
        let row = conv.save(kv, Fanout::Everyone, &[])?;
        return Ok(R::Conversation(view(&row, &c.actor_id)));
    }
    let last = conv.row.last_seq;
    let Some(m) = conv.member_mut(&c.actor_id) else {
        return Err(no_conversation());
    };
    if m.cleared_through_seq == last && m.feed_hidden {
        let row = conv.row;
        return Ok(R::Conversation(view(&row, &c.actor_id)));
    }
    m.cleared_through_seq = last;
    m.last_read_seq = last;
    m.unread_count = 0;
    m.feed_hidden = true;
    let row = conv.save(kv, Fanout::Only(&c.actor_id), &[])?;
    Ok(R::Conversation(view(&row, &c.actor_id)))
}

pub(crate) fn get_conversation(kv: &dyn KvRead, q: pb::GetConversation) -> Res<R> {
    let id = Id::parse(&q.conversation_id, "conversation_id")?;
    Id::parse(&q.viewer_id, "viewer_id")?;
    let conv = Conv::load_for(kv, id, &q.viewer_id)?;
    Ok(R::Conversation(view(&conv.row, &q.viewer_id)))
}
