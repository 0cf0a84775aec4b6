//! The key layout of a shard. Every key starts with a one-byte table tag;
//! ids are their 16 raw bytes and integers are big-endian, so a scan walks a
//! table in (id, number) order. Values are protobuf rows (see `model.proto`).
//!
//! | tag  | key                                   | value            | shard        |
//! |------|---------------------------------------|------------------|--------------|
//! | 0x01 | clock                                 | ClockRow         | any          |
//! | 0x10 | user id                               | User             | user         |
//! | 0x11 | username bytes                        | UsernameClaim    | username     |
//! | 0x12 | user, other                           | FriendEntry      | user         |
//! | 0x13 | user, conversation                    | FeedEntry        | user         |
//! | 0x14 | user, rank(9), conversation           | IndexRef         | user         |
//! | 0x15 | user, feed version                    | IndexRef         | user         |
//! | 0x16 | user                                  | CounterRow       | user         |
//! | 0x20 | user lo, user hi                      | Friendship       | pair         |
//! | 0x30 | conversation                          | ConversationRow  | conversation |
//! | 0x31 | conversation, seq                     | Message          | conversation |
//! | 0x32 | conversation, version                 | IndexRef         | conversation |
//! | 0x33 | conversation, user, version           | IndexRef         | conversation |
//! | 0x34 | conversation, user, seq               | HiddenRow        | conversation |
//! | 0x35 | conversation, sender, client_msg_id   | SentRow          | conversation |
//! | 0x40 | expires at, conversation, seq         | IndexRef         | conversation |
//! | 0x41 | due at, conversation                  | IndexRef         | conversation |
//! | 0x42 | conversation                          | PurgeRow         | conversation |
//! | 0x50 | kind(1), source, user (none: kind 3)  | OutboxEntry      | source       |
//! | 0x60 | token hash(32)                        | Session          | session      |
//! | 0x61 | expires at, token hash(32)            | (empty)          | session      |
//! | 0x70 | user, conversation, seq               | Notification     | user         |
//! | 0x71 | user                                  | LastSeen         | user         |
//!
//! 0x14 is the sorted feed, 0x15 the feed's change index, 0x32 a
//! conversation's change index and 0x33 its per-member (private) one. Both
//! change indexes hold each entity once, at its latest version
//! (move-to-latest), so a delta sync reads only what changed.

use crate::ids::Id;

pub(crate) const CLOCK: u8 = 0x01;
pub(crate) const USER: u8 = 0x10;
pub(crate) const USERNAME: u8 = 0x11;
pub(crate) const FRIEND_INDEX: u8 = 0x12;
pub(crate) const FEED: u8 = 0x13;
pub(crate) const FEED_ORDER: u8 = 0x14;
pub(crate) const FEED_CHANGE: u8 = 0x15;
pub(crate) const FEED_VERSION: u8 = 0x16;
pub(crate) const FRIENDSHIP: u8 = 0x20;
pub(crate) const CONVERSATION: u8 = 0x30;
pub(crate) const MESSAGE: u8 = 0x31;
pub(crate) const CHANGE: u8 = 0x32;
pub(crate) const PRIVATE_CHANGE: u8 = 0x33;
pub(crate) const HIDDEN: u8 = 0x34;
pub(crate) const SENT: u8 = 0x35;
pub(crate) const EXPIRY: u8 = 0x40;
pub(crate) const RETENTION_DUE: u8 = 0x41;
pub(crate) const PURGE: u8 = 0x42;
pub(crate) const OUTBOX: u8 = 0x50;
pub(crate) const SESSION: u8 = 0x60;
pub(crate) const SESSION_EXPIRY: u8 = 0x61;
pub(crate) const NOTIFICATION: u8 = 0x70;
pub(crate) const LAST_SEEN: u8 = 0x71;

/// Length of a feed rank: unread flag (1) + inverted activity time (8).
pub(crate) const RANK_LEN: usize = 9;

struct K(Vec<u8>);

impl K {
    fn new(tag: u8) -> K {
        let mut v = Vec::with_capacity(48);
        v.push(tag);
        K(v)
    }
    fn id(mut self, id: &Id) -> K {
        self.0.extend_from_slice(id.bytes());
        self
    }
    fn u64(mut self, n: u64) -> K {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> K {
        self.0.extend_from_slice(b);
        self
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

pub(crate) fn clock() -> Vec<u8> {
    K::new(CLOCK).done()
}

pub(crate) fn user(user: &Id) -> Vec<u8> {
    K::new(USER).id(user).done()
}

pub(crate) fn username(name: &str) -> Vec<u8> {
    K::new(USERNAME).raw(name.as_bytes()).done()
}

pub(crate) fn friend_index(user: &Id, other: &Id) -> Vec<u8> {
    K::new(FRIEND_INDEX).id(user).id(other).done()
}

pub(crate) fn friend_index_prefix(user: &Id) -> Vec<u8> {
    K::new(FRIEND_INDEX).id(user).done()
}

pub(crate) fn feed(user: &Id, conversation: &Id) -> Vec<u8> {
    K::new(FEED).id(user).id(conversation).done()
}

/// `rank` is [`RANK_LEN`] bytes; the conversation id follows it.
pub(crate) fn feed_order(user: &Id, rank: &[u8], conversation: &Id) -> Vec<u8> {
    K::new(FEED_ORDER)
        .id(user)
        .raw(rank)
        .id(conversation)
        .done()
}

pub(crate) fn feed_order_prefix(user: &Id) -> Vec<u8> {
    K::new(FEED_ORDER).id(user).done()
}

pub(crate) fn feed_change(user: &Id, version: u64) -> Vec<u8> {
    K::new(FEED_CHANGE).id(user).u64(version).done()
}

pub(crate) fn feed_change_prefix(user: &Id) -> Vec<u8> {
    K::new(FEED_CHANGE).id(user).done()
}

pub(crate) fn feed_version(user: &Id) -> Vec<u8> {
    K::new(FEED_VERSION).id(user).done()
}

/// The pair's row; `a` and `b` in either order.
pub(crate) fn friendship(a: &Id, b: &Id) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    K::new(FRIENDSHIP).id(lo).id(hi).done()
}

pub(crate) fn conversation(c: &Id) -> Vec<u8> {
    K::new(CONVERSATION).id(c).done()
}

pub(crate) fn message(c: &Id, seq: u64) -> Vec<u8> {
    K::new(MESSAGE).id(c).u64(seq).done()
}

pub(crate) fn message_prefix(c: &Id) -> Vec<u8> {
    K::new(MESSAGE).id(c).done()
}

pub(crate) fn change(c: &Id, version: u64) -> Vec<u8> {
    K::new(CHANGE).id(c).u64(version).done()
}

pub(crate) fn change_prefix(c: &Id) -> Vec<u8> {
    K::new(CHANGE).id(c).done()
}

pub(crate) fn private_change(c: &Id, user: &Id, version: u64) -> Vec<u8> {
    K::new(PRIVATE_CHANGE).id(c).id(user).u64(version).done()
}

pub(crate) fn private_change_prefix(c: &Id, user: &Id) -> Vec<u8> {
    K::new(PRIVATE_CHANGE).id(c).id(user).done()
}

pub(crate) fn private_change_conversation_prefix(c: &Id) -> Vec<u8> {
    K::new(PRIVATE_CHANGE).id(c).done()
}

pub(crate) fn hidden(c: &Id, user: &Id, seq: u64) -> Vec<u8> {
    K::new(HIDDEN).id(c).id(user).u64(seq).done()
}

pub(crate) fn hidden_conversation_prefix(c: &Id) -> Vec<u8> {
    K::new(HIDDEN).id(c).done()
}

pub(crate) fn sent(c: &Id, sender: &Id, client_msg_id: &str) -> Vec<u8> {
    K::new(SENT)
        .id(c)
        .id(sender)
        .raw(client_msg_id.as_bytes())
        .done()
}

pub(crate) fn sent_conversation_prefix(c: &Id) -> Vec<u8> {
    K::new(SENT).id(c).done()
}

pub(crate) fn expiry(at: u64, c: &Id, seq: u64) -> Vec<u8> {
    K::new(EXPIRY).u64(at).id(c).u64(seq).done()
}

pub(crate) fn expiry_prefix() -> Vec<u8> {
    K::new(EXPIRY).done()
}

/// Every expiry key with time `< at` sorts before this one.
pub(crate) fn expiry_bound(at: u64) -> Vec<u8> {
    K::new(EXPIRY).u64(at).done()
}

pub(crate) fn retention_due(at: u64, c: &Id) -> Vec<u8> {
    K::new(RETENTION_DUE).u64(at).id(c).done()
}

pub(crate) fn retention_due_prefix() -> Vec<u8> {
    K::new(RETENTION_DUE).done()
}

pub(crate) fn retention_due_bound(at: u64) -> Vec<u8> {
    K::new(RETENTION_DUE).u64(at).done()
}

pub(crate) fn purge(c: &Id) -> Vec<u8> {
    K::new(PURGE).id(c).done()
}

pub(crate) fn purge_prefix() -> Vec<u8> {
    K::new(PURGE).done()
}

pub(crate) fn outbox(kind: u8, source: &Id, user: &Id) -> Vec<u8> {
    K::new(OUTBOX).raw(&[kind]).id(source).id(user).done()
}

/// The one outbox row of a conversation's members' feeds (kind
/// `Conversation`): no user part.
pub(crate) fn outbox_conversation(source: &Id) -> Vec<u8> {
    K::new(OUTBOX)
        .raw(&[crate::pb::OutboxKind::Conversation as u8])
        .id(source)
        .done()
}

pub(crate) fn outbox_prefix() -> Vec<u8> {
    K::new(OUTBOX).done()
}

pub(crate) fn session(token_hash: &[u8]) -> Vec<u8> {
    K::new(SESSION).raw(token_hash).done()
}

pub(crate) fn session_expiry(at: u64, token_hash: &[u8]) -> Vec<u8> {
    K::new(SESSION_EXPIRY).u64(at).raw(token_hash).done()
}

pub(crate) fn session_expiry_prefix() -> Vec<u8> {
    K::new(SESSION_EXPIRY).done()
}

/// Every session expiry key with time `< at` sorts before this one.
pub(crate) fn session_expiry_bound(at: u64) -> Vec<u8> {
    K::new(SESSION_EXPIRY).u64(at).done()
}

pub(crate) fn notification(user: &Id, c: &Id, seq: u64) -> Vec<u8> {
    K::new(NOTIFICATION).id(user).id(c).u64(seq).done()
}

/// Every notification, or one user's, or one (user, conversation)'s.
pub(crate) fn notification_prefix(user: Option<&Id>, c: Option<&Id>) -> Vec<u8> {
    let mut k = K::new(NOTIFICATION);
    if let Some(u) = user {
        k = k.id(u);
        if let Some(c) = c {
            k = k.id(c);
        }
    }
    k.done()
}

pub(crate) fn last_seen(user: &Id) -> Vec<u8> {
    K::new(LAST_SEEN).id(user).done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_sort_numerically() {
        let c = Id([7; 16]);
        assert!(message(&c, 255) < message(&c, 256));
        assert!(change(&c, 1) < change(&c, u64::MAX));
        assert!(expiry(10, &Id([9; 16]), 1) < expiry(11, &Id([0; 16]), 0));
        assert!(expiry(10, &c, 5) < expiry_bound(11));
        assert!(message(&c, u64::MAX) < message_prefix(&Id([8; 16])));
    }

    #[test]
    fn friendship_key_is_symmetric() {
        let (a, b) = (Id([1; 16]), Id([2; 16]));
        assert_eq!(friendship(&a, &b), friendship(&b, &a));
    }
}
