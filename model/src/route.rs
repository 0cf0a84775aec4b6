//! Routing: which shard a command or query belongs to.
//!
//! The model doesn't know shard numbers; it names a *route key* for each
//! command and query, and [`shard_of`] maps a key to a data shard
//! `1..=shard_count` (group 0 is the cluster's meta group).
//!
//! * user rows, feeds and the friend index: by user id (`'U'` + 16 bytes);
//! * conversation metadata, messages and their outbox: by conversation id
//!   (`'C'` + 16 bytes);
//! * a friendship: by the pair's direct conversation id, so it lives with
//!   that conversation and "direct chats need a friendship / blocked users
//!   can't message" is checked atomically on one shard;
//! * username claims: by the username (`'N'` + bytes);
//! * sessions: by the SHA-256 of the token (`'S'` + 32 bytes).
//!
//! Shard-local commands and queries (`Tick`, `AckOutbox`, `PendingOutbox`,
//! `NextExpiry`) have an empty route key: the node sends them to a specific
//! shard. An id that doesn't parse still routes (`'X'` + its bytes) so the
//! shard can answer INVALID_ARGUMENT.
//!
//! **On-disk contract:** [`shard_of`] is FNV-1a 64 of the route key modulo
//! the shard count, plus one. Changing it (or the key layouts) moves data
//! to shards that don't hold it.

use crate::ids::{direct_id, Id};
use crate::pb::{command::Op, query::Q, Command, Query};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The data shard (`1..=shard_count`) of a route key. A `shard_count` of 0
/// is treated as 1.
pub fn shard_of(route_key: &[u8], shard_count: u32) -> u32 {
    let n = u64::from(shard_count.max(1));
    // The remainder is < n <= u32::MAX, so the cast is lossless.
    (fnv1a64(route_key) % n) as u32 + 1
}

fn id_key(tag: u8, id: &str) -> Vec<u8> {
    match Id::parse(id, "") {
        Ok(id) => {
            let mut k = vec![tag];
            k.extend_from_slice(id.bytes());
            k
        }
        Err(_) => {
            let mut k = vec![b'X'];
            k.extend_from_slice(id.as_bytes());
            k
        }
    }
}

/// Route key of everything stored by user id.
pub fn user_route_key(user_id: &str) -> Vec<u8> {
    id_key(b'U', user_id)
}

/// Route key of a conversation (direct or group).
pub fn conversation_route_key(conversation_id: &str) -> Vec<u8> {
    id_key(b'C', conversation_id)
}

/// Route key of a username claim.
pub fn username_route_key(username: &str) -> Vec<u8> {
    let mut k = vec![b'N'];
    k.extend_from_slice(username.as_bytes());
    k
}

/// Route key of a session: its token hash's.
pub fn session_route_key(token_hash: &[u8]) -> Vec<u8> {
    let mut k = vec![b'S'];
    k.extend_from_slice(token_hash);
    k
}

/// Route key of a pair's friendship: its direct conversation's.
pub fn pair_route_key(a: &str, b: &str) -> Vec<u8> {
    match (Id::parse(a, ""), Id::parse(b, "")) {
        (Ok(a), Ok(b)) => {
            let mut k = vec![b'C'];
            k.extend_from_slice(direct_id(a, b).bytes());
            k
        }
        _ => {
            let mut k = vec![b'X'];
            k.extend_from_slice(a.as_bytes());
            k.extend_from_slice(b.as_bytes());
            k
        }
    }
}

/// The route key of a command (empty for shard-local ones). For
/// `ApplyFeedUpdates` it is the first target user's: the outbox worker
/// builds one per shard with [`crate::outbox_deliveries`].
pub fn route_key(cmd: &Command) -> Vec<u8> {
    let Some(op) = &cmd.op else {
        return Vec::new();
    };
    match op {
        Op::ClaimUsername(c) => username_route_key(&c.username),
        Op::CreateUser(c) => user_route_key(&c.user_id),
        Op::UpdateUserSettings(c) => user_route_key(&c.user_id),
        Op::ApplyFeedUpdates(c) => match (c.updates.first(), c.friend_updates.first()) {
            (Some(u), _) => user_route_key(&u.user_id),
            (None, Some(f)) => user_route_key(&f.user_id),
            (None, None) => Vec::new(),
        },
        Op::SetFeedFlags(c) => user_route_key(&c.user_id),
        Op::FriendRequest(c) => pair_route_key(&c.from, &c.to),
        Op::FriendAccept(c) => pair_route_key(&c.user_id, &c.requester_id),
        Op::FriendRemove(c) => pair_route_key(&c.user_id, &c.other_id),
        Op::FriendBlock(c) => pair_route_key(&c.user_id, &c.other_id),
        Op::FriendUnblock(c) => pair_route_key(&c.user_id, &c.other_id),
        Op::CreateDirect(c) => pair_route_key(&c.user_a, &c.user_b),
        Op::CreateGroup(c) => conversation_route_key(&c.conversation_id),
        Op::UpdateConversation(c) => conversation_route_key(&c.conversation_id),
        Op::DeleteConversation(c) => conversation_route_key(&c.conversation_id),
        Op::SendMessage(c) => conversation_route_key(&c.conversation_id),
        Op::DeleteMessage(c) => conversation_route_key(&c.conversation_id),
        Op::MarkRead(c) => conversation_route_key(&c.conversation_id),
        Op::CreateSession(c) => session_route_key(&c.token_hash),
        Op::RevokeSession(c) => session_route_key(&c.token_hash),
        Op::RecordLastSeen(c) => user_route_key(&c.user_id),
        Op::AckOutbox(_) | Op::Tick(_) | Op::AckNotifications(_) => Vec::new(),
    }
}

/// The route key of a query (empty for shard-local ones).
pub fn query_route_key(q: &Query) -> Vec<u8> {
    let Some(q) = &q.q else {
        return Vec::new();
    };
    match q {
        Q::GetUser(q) => user_route_key(&q.user_id),
        Q::LookupUsername(q) => username_route_key(&q.username),
        Q::GetFriendship(q) => pair_route_key(&q.user_a, &q.user_b),
        Q::ListFriends(q) => user_route_key(&q.user_id),
        Q::GetConversation(q) => conversation_route_key(&q.conversation_id),
        Q::SyncConversation(q) => conversation_route_key(&q.conversation_id),
        Q::History(q) => conversation_route_key(&q.conversation_id),
        Q::GetFeed(q) => user_route_key(&q.user_id),
        Q::SyncFeed(q) => user_route_key(&q.user_id),
        Q::GetSession(q) => session_route_key(&q.token_hash),
        Q::GetLastSeen(q) => user_route_key(&q.user_id),
        Q::PendingNotifications(q) if !q.user_id.is_empty() => user_route_key(&q.user_id),
        Q::PendingOutbox(_) | Q::NextExpiry(_) | Q::PendingNotifications(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shards_are_one_based_and_in_range() {
        for i in 0..1000u32 {
            let s = shard_of(&i.to_be_bytes(), 7);
            assert!((1..=7).contains(&s));
        }
        assert_eq!(shard_of(b"anything", 0), 1);
        assert_eq!(shard_of(b"anything", 1), 1);
    }

    #[test]
    fn friendship_routes_with_direct_conversation() {
        let a = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let b = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        let direct = crate::direct_conversation_id(a, b).unwrap_or_default();
        assert_eq!(pair_route_key(a, b), conversation_route_key(&direct));
        assert_eq!(pair_route_key(b, a), conversation_route_key(&direct));
    }
}
