//! Friendships (on the pair's shard) and the friend index (on each user's
//! shard).
//!
//! One row per pair holds the state (none / requested by whom / accepted)
//! and each side's block flag; any block makes the state BLOCKED, ends the
//! friendship and cancels requests. Unblocking returns the pair to NONE
//! (strangers), not to friends. Every change enqueues, through the outbox,
//! each user's view of the pair ([`pb::FriendEntry`]) for their shard, where
//! `ListFriends` reads it. A user blocked by the other sees NONE: being
//! blocked is not revealed.
//!
//! Users' existence is not checked here (users live on other shards); the
//! API layer authenticates the actor and resolves the other user first.

use std::ops::Bound;

use natter_kv::{KvRead, KvResult, KvWrite};

use crate::codec::{decode, get, put, scan_from};
use crate::error::{denied, invalid, limit, not_found, Res};
use crate::ids::{direct_id, Id};
use crate::keys;
use crate::limits::{page_limit, MAX_BATCH};
use crate::outbox;
use crate::pb::{self, response::R, FriendRelation, FriendState};

/// The pair's row, or a fresh NONE row (version 0).
pub(crate) fn load(kv: &dyn KvRead, a: &Id, b: &Id) -> KvResult<pb::Friendship> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    Ok(
        get::<pb::Friendship>(kv, &keys::friendship(lo, hi))?.unwrap_or_else(|| pb::Friendship {
            user_a: lo.to_string(),
            user_b: hi.to_string(),
            ..Default::default()
        }),
    )
}

pub(crate) fn is_blocked(f: &pb::Friendship) -> bool {
    f.blocked_by_a || f.blocked_by_b
}

pub(crate) fn are_friends(f: &pb::Friendship) -> bool {
    !is_blocked(f) && f.state == FriendState::Accepted as i32
}

/// How `me` sees the pair.
fn relation(f: &pb::Friendship, me: &str) -> FriendRelation {
    let (i_blocked, they_blocked) = if f.user_a == me {
        (f.blocked_by_a, f.blocked_by_b)
    } else {
        (f.blocked_by_b, f.blocked_by_a)
    };
    if i_blocked {
        FriendRelation::Blocked
    } else if they_blocked {
        FriendRelation::None
    } else if f.state == FriendState::Accepted as i32 {
        FriendRelation::Friend
    } else if f.state == FriendState::Requested as i32 {
        if f.requested_by == me {
            FriendRelation::Outgoing
        } else {
            FriendRelation::Incoming
        }
    } else {
        FriendRelation::None
    }
}

fn pair(me: &str, other: &str) -> Res<(Id, Id)> {
    let me = Id::parse(me, "user_id")?;
    let other = Id::parse(other, "other user id")?;
    if me == other {
        return Err(invalid("a user can't befriend or block themself"));
    }
    Ok((me, other))
}

fn my_block_flag<'f>(f: &'f mut pb::Friendship, me: &str) -> &'f mut bool {
    if f.user_a == me {
        &mut f.blocked_by_a
    } else {
        &mut f.blocked_by_b
    }
}

/// Writes a changed friendship and enqueues both users' views.
fn save(kv: &mut dyn KvWrite, now: u64, a: &Id, b: &Id, mut f: pb::Friendship) -> Res<R> {
    if is_blocked(&f) {
        f.state = FriendState::Blocked as i32;
        f.requested_by.clear();
    } else if f.state == FriendState::Blocked as i32 {
        f.state = FriendState::None as i32;
    }
    f.version += 1;
    f.updated_at_ms = now;
    put(kv, &keys::friendship(a, b), &f);
    let source = direct_id(*a, *b);
    for (user, other) in [(a, b), (b, a)] {
        let entry = pb::FriendEntry {
            user_id: user.to_string(),
            other_id: other.to_string(),
            relation: relation(&f, &user.to_string()) as i32,
            version: f.version,
            updated_at_ms: now,
        };
        outbox::enqueue_friend(kv, &source, user, entry);
    }
    Ok(R::Friendship(f))
}

pub(crate) fn request(kv: &mut dyn KvWrite, now: u64, c: pb::FriendRequest) -> Res<R> {
    let (me, other) = pair(&c.from, &c.to)?;
    let mut f = load(&*kv, &me, &other)?;
    if is_blocked(&f) {
        return Err(denied("can't send a friend request to this user"));
    }
    let requested = FriendState::Requested as i32;
    if f.state == FriendState::Accepted as i32 || (f.state == requested && f.requested_by == c.from)
    {
        return Ok(R::Friendship(f));
    }
    if f.state == requested {
        // They asked first: asking back accepts.
        f.state = FriendState::Accepted as i32;
        f.requested_by.clear();
    } else {
        f.state = requested;
        f.requested_by = c.from;
    }
    save(kv, now, &me, &other, f)
}

pub(crate) fn accept(kv: &mut dyn KvWrite, now: u64, c: pb::FriendAccept) -> Res<R> {
    let (me, other) = pair(&c.user_id, &c.requester_id)?;
    let mut f = load(&*kv, &me, &other)?;
    if are_friends(&f) {
        return Ok(R::Friendship(f));
    }
    if is_blocked(&f)
        || f.state != FriendState::Requested as i32
        || f.requested_by != c.requester_id
    {
        return Err(not_found("no pending friend request from this user"));
    }
    f.state = FriendState::Accepted as i32;
    f.requested_by.clear();
    save(kv, now, &me, &other, f)
}

pub(crate) fn remove(kv: &mut dyn KvWrite, now: u64, c: pb::FriendRemove) -> Res<R> {
    let (me, other) = pair(&c.user_id, &c.other_id)?;
    let mut f = load(&*kv, &me, &other)?;
    if is_blocked(&f) || f.state == FriendState::None as i32 {
        return Ok(R::Friendship(f));
    }
    f.state = FriendState::None as i32;
    f.requested_by.clear();
    save(kv, now, &me, &other, f)
}

pub(crate) fn block(kv: &mut dyn KvWrite, now: u64, c: pb::FriendBlock) -> Res<R> {
    let (me, other) = pair(&c.user_id, &c.other_id)?;
    let mut f = load(&*kv, &me, &other)?;
    if *my_block_flag(&mut f, &c.user_id) {
        return Ok(R::Friendship(f));
    }
    *my_block_flag(&mut f, &c.user_id) = true;
    save(kv, now, &me, &other, f)
}

pub(crate) fn unblock(kv: &mut dyn KvWrite, now: u64, c: pb::FriendUnblock) -> Res<R> {
    let (me, other) = pair(&c.user_id, &c.other_id)?;
    let mut f = load(&*kv, &me, &other)?;
    if !*my_block_flag(&mut f, &c.user_id) {
        return Ok(R::Friendship(f));
    }
    *my_block_flag(&mut f, &c.user_id) = false;
    save(kv, now, &me, &other, f)
}

pub(crate) fn get_friendship(kv: &dyn KvRead, q: pb::GetFriendship) -> Res<R> {
    let (a, b) = pair(&q.user_a, &q.user_b)?;
    Ok(R::Friendship(load(kv, &a, &b)?))
}

/// Validated friend index updates, ready for [`apply_index`].
pub(crate) fn parse_index_updates(
    updates: Vec<pb::FriendEntry>,
) -> Res<Vec<(Id, Id, pb::FriendEntry)>> {
    if updates.len() > MAX_BATCH {
        return Err(limit(format!("more than {MAX_BATCH} updates")));
    }
    updates
        .into_iter()
        .map(|u| {
            let (user, other) = pair(&u.user_id, &u.other_id)?;
            if FriendRelation::try_from(u.relation).is_err() {
                return Err(invalid(format!("unknown relation {}", u.relation)));
            }
            Ok((user, other, u))
        })
        .collect()
}

/// Stores a friend index update unless the stored one is as new. Returns
/// whether it was applied.
pub(crate) fn apply_index(
    kv: &mut dyn KvWrite,
    user: &Id,
    other: &Id,
    u: pb::FriendEntry,
) -> KvResult<bool> {
    let key = keys::friend_index(user, other);
    if let Some(old) = get::<pb::FriendEntry>(&*kv, &key)? {
        if u.version <= old.version {
            return Ok(false);
        }
    }
    // NONE rows are kept (not deleted) so a late, older update can't
    // resurrect a relation.
    put(kv, &key, &u);
    Ok(true)
}

/// Query `ListFriends`: relations other than NONE, by other id.
pub(crate) fn list(kv: &dyn KvRead, q: pb::ListFriends) -> Res<R> {
    let user = Id::parse(&q.user_id, "user_id")?;
    let lim = page_limit(q.limit)?;
    let prefix = keys::friend_index_prefix(&user);
    let mut from_key = if q.after.is_empty() {
        None
    } else {
        Some(keys::friend_index(&user, &Id::parse(&q.after, "after")?))
    };
    let mut entries: Vec<pb::FriendEntry> = Vec::new();
    loop {
        let from = match &from_key {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Included(prefix.as_slice()),
        };
        let rows = scan_from(kv, &prefix, from, lim + 1)?;
        let exhausted = rows.len() <= lim;
        let mut last = None;
        for (k, v) in rows {
            let e = decode::<pb::FriendEntry>(&k, &v)?;
            if e.relation != FriendRelation::None as i32 {
                if entries.len() == lim {
                    // A full page and at least one more: continue after it.
                    let next_after = entries
                        .last()
                        .map(|e| e.other_id.clone())
                        .unwrap_or_default();
                    return Ok(R::Friends(pb::FriendList {
                        entries,
                        next_after,
                    }));
                }
                entries.push(e);
            }
            last = Some(k);
        }
        if exhausted {
            return Ok(R::Friends(pb::FriendList {
                entries,
                next_after: String::new(),
            }));
        }
        from_key = last;
    }
}
