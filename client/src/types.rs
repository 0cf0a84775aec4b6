//! The SDK's plain owned types (what crosses an FFI boundary).

use natter_model::pb;
use natter_proto::client as cp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub username: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Media {
    pub object_id: String,
    pub sha256: String,
    pub content_type: String,
    pub size: u64,
    pub name: String,
    pub width: u32,
    pub height: u32,
}

impl From<Media> for pb::Media {
    fn from(m: Media) -> pb::Media {
        pb::Media {
            object_id: m.object_id,
            sha256: m.sha256,
            content_type: m.content_type,
            size: m.size,
            name: m.name,
            width: m.width,
            height: m.height,
        }
    }
}

impl From<pb::Media> for Media {
    fn from(m: pb::Media) -> Media {
        Media {
            object_id: m.object_id,
            sha256: m.sha256,
            content_type: m.content_type,
            size: m.size,
            name: m.name,
            width: m.width,
            height: m.height,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub conversation_id: String,
    pub seq: u64,
    pub message_id: String,
    pub sender_id: String,
    pub client_msg_id: String,
    pub text: String,
    pub media: Vec<Media>,
    pub created_at_ms: u64,
    /// 0 = never.
    pub expires_at_ms: u64,
}

impl From<pb::Message> for Message {
    fn from(m: pb::Message) -> Message {
        Message {
            conversation_id: m.conversation_id,
            seq: m.seq,
            message_id: m.message_id,
            sender_id: m.sender_id,
            client_msg_id: m.client_msg_id,
            text: m.text,
            media: m.media.into_iter().map(Media::from).collect(),
            created_at_ms: m.created_at_ms,
            expires_at_ms: m.expires_at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    /// `member` or `admin`.
    pub role: String,
    pub last_read_seq: u64,
}

fn role(r: i32) -> String {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Admin) => "admin",
        Ok(pb::Role::Member) => "member",
        _ => "none",
    }
    .into()
}

fn kind(k: i32) -> String {
    match pb::ConversationKind::try_from(k) {
        Ok(pb::ConversationKind::Direct) => "direct",
        Ok(pb::ConversationKind::Group) => "group",
        _ => "unspecified",
    }
    .into()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    /// `direct` or `group`.
    pub kind: String,
    pub name: String,
    pub members: Vec<Member>,
    pub last_seq: u64,
    pub last_activity_ms: u64,
    pub my_last_read_seq: u64,
    pub my_unread_count: u64,
    pub deleted: bool,
}

impl From<pb::Conversation> for Conversation {
    fn from(c: pb::Conversation) -> Conversation {
        Conversation {
            id: c.id,
            kind: kind(c.kind),
            name: c.name,
            members: c
                .members
                .into_iter()
                .map(|m| Member {
                    user_id: m.user_id,
                    role: role(m.role),
                    last_read_seq: m.last_read_seq,
                })
                .collect(),
            last_seq: c.last_seq,
            last_activity_ms: c.last_activity_ms,
            my_last_read_seq: c.my_last_read_seq,
            my_unread_count: c.my_unread_count,
            deleted: c.deleted,
        }
    }
}

/// One row of the feed (the conversation list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedItem {
    pub conversation_id: String,
    pub kind: String,
    /// Group name (empty for direct conversations).
    pub title: String,
    /// The other user of a direct conversation.
    pub peer_user_id: String,
    pub last_activity_ms: u64,
    pub last_seq: u64,
    pub unread_count: u64,
    /// The last message's first characters (empty when none or expired).
    pub preview: String,
    pub preview_sender_id: String,
    pub muted: bool,
    pub archived: bool,
}

impl From<pb::FeedEntry> for FeedItem {
    fn from(e: pb::FeedEntry) -> FeedItem {
        let c = e.conversation.unwrap_or_default();
        let p = c.preview.unwrap_or_default();
        FeedItem {
            conversation_id: c.conversation_id,
            kind: kind(c.kind),
            title: c.title,
            peer_user_id: c.peer_user_id,
            last_activity_ms: c.last_activity_ms,
            last_seq: c.last_seq,
            unread_count: c.unread_count,
            preview: p.text,
            preview_sender_id: p.sender_id,
            muted: e.muted,
            archived: e.archived,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user_id: String,
    pub username: String,
}

impl From<cp::User> for User {
    fn from(u: cp::User) -> User {
        User {
            user_id: u.user_id,
            username: u.username,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Friend {
    pub user_id: String,
    /// `friend`, `incoming`, `outgoing`, `blocked` or `none`.
    pub relation: String,
}

impl From<cp::Friend> for Friend {
    fn from(f: cp::Friend) -> Friend {
        let relation = match pb::FriendRelation::try_from(f.relation) {
            Ok(pb::FriendRelation::Friend) => "friend",
            Ok(pb::FriendRelation::Incoming) => "incoming",
            Ok(pb::FriendRelation::Outgoing) => "outgoing",
            Ok(pb::FriendRelation::Blocked) => "blocked",
            _ => "none",
        };
        Friend {
            user_id: f.user_id,
            relation: relation.into(),
        }
    }
}

/// Online and last seen of a user (yourself or a friend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user_id: String,
    pub online: bool,
    /// When the user was last online (ms since the epoch; 0 = unknown).
    pub last_seen_ms: u64,
}

impl From<cp::Presence> for Presence {
    fn from(p: cp::Presence) -> Presence {
        Presence {
            user_id: p.user_id,
            online: p.online,
            last_seen_ms: p.last_seen_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMessage {
    pub conversation_id: String,
    pub client_msg_id: String,
    pub text: String,
    pub attempts: u32,
}

/// What the SDK tells the app. The cache already holds the change when the
/// event arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The push stream is open on this router (delta sync follows).
    Connected { router: String },
    /// The push stream ended; the SDK reconnects by itself.
    Disconnected { router: String, reason: String },
    /// New or changed messages of a conversation.
    Messages {
        conversation_id: String,
        messages: Vec<Message>,
    },
    /// Messages deleted (for you or for everyone).
    MessagesRemoved {
        conversation_id: String,
        seqs: Vec<u64>,
    },
    /// The conversation's metadata changed (members, name, read marks).
    ConversationChanged { conversation_id: String },
    /// No longer visible to you: dropped from the cache.
    ConversationGone { conversation_id: String },
    /// The feed changed: re-read [`crate::Client::feed`].
    FeedChanged,
    /// Friends or requests changed: call [`crate::Client::friends`].
    FriendsChanged,
    Typing {
        conversation_id: String,
        user_id: String,
    },
    /// A user followed with [`crate::Client::presence`] came online or
    /// went offline.
    Presence(Presence),
    /// A queued message was acknowledged by the cluster.
    Sent {
        client_msg_id: String,
        message: Message,
    },
    /// A queued message was refused for good (e.g. not a member); it left
    /// the queue.
    SendFailed {
        client_msg_id: String,
        code: String,
        message: String,
    },
    /// The session expired or was revoked: log in again.
    SessionEnded { reason: String },
    /// Events were dropped because the app didn't read them: re-read what
    /// it shows from the cache.
    Lagged,
}
