//! The model's protobuf answers as the protocol's JSON objects. Field names
//! here are part of protocol v1 (docs/protocol.md): add, never rename.
//! Enums are lowercase strings; times are milliseconds since the epoch;
//! every integer is a JSON number (all stay below 2^53 in practice).

use base64::Engine as _;
use natter_model::pb::{self, response::R};
use serde_json::{json, Map, Value};

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn kind(k: i32) -> &'static str {
    match pb::ConversationKind::try_from(k) {
        Ok(pb::ConversationKind::Direct) => "direct",
        Ok(pb::ConversationKind::Group) => "group",
        _ => "unspecified",
    }
}

pub fn role(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Member) => "member",
        Ok(pb::Role::Admin) => "admin",
        _ => "none",
    }
}

pub fn relation(r: i32) -> &'static str {
    match pb::FriendRelation::try_from(r) {
        Ok(pb::FriendRelation::Friend) => "friend",
        Ok(pb::FriendRelation::Incoming) => "incoming",
        Ok(pb::FriendRelation::Outgoing) => "outgoing",
        Ok(pb::FriendRelation::Blocked) => "blocked",
        _ => "none",
    }
}

pub fn privacy(p: i32) -> &'static str {
    match pb::Privacy::try_from(p) {
        Ok(pb::Privacy::FriendsOfFriends) => "friends_of_friends",
        Ok(pb::Privacy::Nobody) => "nobody",
        _ => "everyone",
    }
}

pub fn notifications(n: i32) -> &'static str {
    match pb::Notifications::try_from(n) {
        Ok(pb::Notifications::DirectOnly) => "direct_only",
        Ok(pb::Notifications::None) => "none",
        _ => "all",
    }
}

/// A media item of a message in `conversation_id`, with signed `url` and
/// `thumbnail_url` (see `media::urls`).
pub fn media(conversation_id: &str, m: &pb::Media) -> Value {
    let (url, thumbnail_url) = crate::media::urls(conversation_id, m);
    json!({
        "url": url,
        "thumbnail_url": thumbnail_url,
        "object_id": m.object_id,
        "sha256": m.sha256,
        "content_type": m.content_type,
        "size": m.size,
        "name": m.name,
        "width": m.width,
        "height": m.height,
    })
}

pub fn message(m: &pb::Message) -> Value {
    json!({
        "conversation_id": m.conversation_id,
        "seq": m.seq,
        "message_id": m.message_id,
        "sender_id": m.sender_id,
        "client_msg_id": m.client_msg_id,
        "text": m.text,
        "media": m.media.iter().map(|x| media(&m.conversation_id, x)).collect::<Vec<_>>(),
        "created_at_ms": m.created_at_ms,
        "expires_at_ms": m.expires_at_ms,
        "deleted": m.deleted,
        "expired": m.expired,
        "version": m.version,
    })
}

pub fn conversation(c: &pb::Conversation) -> Value {
    json!({
        "id": c.id,
        "kind": kind(c.kind),
        "name": c.name,
        "members": c.members.iter().map(|m| json!({
            "user_id": m.user_id,
            "role": role(m.role),
            "last_read_seq": m.last_read_seq,
            "joined_at_ms": m.joined_at_ms,
        })).collect::<Vec<_>>(),
        "members_complete": c.members_complete,
        "retention_ms": c.retention_ms,
        "created_at_ms": c.created_at_ms,
        "version": c.version,
        "last_seq": c.last_seq,
        "last_activity_ms": c.last_activity_ms,
        "my_role": role(c.my_role),
        "my_last_read_seq": c.my_last_read_seq,
        "my_cleared_through_seq": c.my_cleared_through_seq,
        "my_unread_count": c.my_unread_count,
        "deleted": c.deleted,
    })
}

fn preview(p: &Option<pb::Preview>) -> Value {
    match p {
        Some(p) => json!({
            "seq": p.seq,
            "sender_id": p.sender_id,
            "text": p.text,
            "created_at_ms": p.created_at_ms,
            "expires_at_ms": p.expires_at_ms,
        }),
        None => Value::Null,
    }
}

pub fn feed_entry(e: &pb::FeedEntry) -> Value {
    let u = e.conversation.clone().unwrap_or_default();
    json!({
        "conversation_id": u.conversation_id,
        "version": u.version,
        "kind": kind(u.kind),
        "title": u.title,
        "peer_user_id": u.peer_user_id,
        "last_activity_ms": u.last_activity_ms,
        "preview": preview(&u.preview),
        "last_seq": u.last_seq,
        "last_read_seq": u.last_read_seq,
        "unread_count": u.unread_count,
        "hidden": u.hidden,
        "removed": u.removed,
        "deleted": u.deleted,
        "muted": e.muted,
        "archived": e.archived,
        "feed_version": e.feed_version,
    })
}

pub fn friend_entry(f: &pb::FriendEntry) -> Value {
    json!({
        "user_id": f.other_id,
        "relation": relation(f.relation),
        "version": f.version,
        "updated_at_ms": f.updated_at_ms,
    })
}

/// A friendship row as `me` sees it: the other user and the relation
/// (being blocked looks like no relation). Shared by every front-end.
pub fn friendship_view<'a>(f: &'a pb::Friendship, me: &str) -> (&'a str, pb::FriendRelation) {
    let i_am_a = f.user_a == me;
    let other = if i_am_a { &f.user_b } else { &f.user_a };
    let rel = match pb::FriendState::try_from(f.state) {
        Ok(pb::FriendState::Accepted) => pb::FriendRelation::Friend,
        Ok(pb::FriendState::Requested) if f.requested_by == me => pb::FriendRelation::Outgoing,
        Ok(pb::FriendState::Requested) => pb::FriendRelation::Incoming,
        Ok(pb::FriendState::Blocked)
            if (i_am_a && f.blocked_by_a) || (!i_am_a && f.blocked_by_b) =>
        {
            pb::FriendRelation::Blocked
        }
        _ => pb::FriendRelation::None,
    };
    (other, rel)
}

/// A friendship row as `me` sees it (being blocked looks like no relation).
pub fn friendship(f: &pb::Friendship, me: &str) -> Value {
    let (other, rel) = friendship_view(f, me);
    json!({
        "user_id": other,
        "relation": relation(rel as i32),
        "version": f.version,
        "updated_at_ms": f.updated_at_ms,
    })
}

/// What other users may know of a user.
pub fn public_user(u: &pb::User) -> Value {
    json!({"user_id": u.id, "username": u.username})
}

/// The user's own profile (never the password hash).
pub fn own_user(u: &pb::User) -> Value {
    json!({
        "user_id": u.id,
        "username": u.username,
        "created_at_ms": u.created_at_ms,
        "privacy": privacy(u.privacy),
        "notifications": notifications(u.notifications),
        "home_region": u.home_region,
    })
}

pub fn conversation_sync(s: &pb::ConversationSync) -> Map<String, Value> {
    let changes: Vec<Value> = s
        .changes
        .iter()
        .filter_map(|c| match &c.change {
            Some(pb::conversation_change::Change::Conversation(v)) => {
                Some(json!({"conversation": conversation(v)}))
            }
            Some(pb::conversation_change::Change::Message(m)) => {
                Some(json!({"message": message(m)}))
            }
            None => None,
        })
        .collect();
    let mut m = Map::new();
    m.insert("changes".into(), Value::Array(changes));
    m.insert("token".into(), json!(s.token));
    m.insert("has_more".into(), json!(s.has_more));
    m.insert("before_seq".into(), json!(s.before_seq));
    m.insert("cold_start".into(), json!(s.cold_start));
    m.insert("now_ms".into(), json!(s.now_ms));
    m
}

pub fn feed_page(p: &pb::FeedPage) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "entries".into(),
        Value::Array(p.entries.iter().map(feed_entry).collect()),
    );
    m.insert("token".into(), json!(p.token));
    m.insert("has_more".into(), json!(p.has_more));
    m.insert(
        "cursor".into(),
        if p.cursor.is_empty() {
            Value::Null
        } else {
            json!(b64(&p.cursor))
        },
    );
    m.insert("cold_start".into(), json!(p.cold_start));
    m.insert("now_ms".into(), json!(p.now_ms));
    m
}

/// Any model answer as the `ok` object of a reply; `me` is the caller.
pub fn response(r: &R, me: &str) -> Value {
    match r {
        R::Conversation(c) => json!({"conversation": conversation(c)}),
        R::Sent(s) => json!({
            "message": s.message.as_ref().map(message),
            "duplicate": s.duplicate,
        }),
        R::Message(m) => json!({"message": message(m)}),
        R::ConversationSync(s) => Value::Object(conversation_sync(s)),
        R::History(p) => json!({
            "messages": p.messages.iter().map(message).collect::<Vec<_>>(),
            "before_seq": p.before_seq,
            "now_ms": p.now_ms,
        }),
        R::Feed(p) => Value::Object(feed_page(p)),
        R::FeedEntry(e) => json!({"entry": feed_entry(e)}),
        R::Friendship(f) => json!({"friendship": friendship(f, me)}),
        R::Friends(l) => json!({
            "friends": l.entries.iter().map(friend_entry).collect::<Vec<_>>(),
            "next_after": if l.next_after.is_empty() { Value::Null } else { json!(l.next_after) },
        }),
        R::User(u) if u.id == me => json!({"user": own_user(u)}),
        R::User(u) => json!({"user": public_user(u)}),
        _ => json!({}),
    }
}
