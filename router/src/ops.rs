//! The operations of protocol v1: parsing a request frame's parameters and
//! running it against the cluster as the session's user. The caller's
//! identity (actor, sender, viewer, user) always comes from the session;
//! no parameter can name whose identity a request acts as.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use base64::Engine as _;
use natter_model::pb::{self, command::Op, query::Q, response::R, ErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::error::{check, ApiError};
use crate::json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaIn {
    pub object_id: String,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub content_type: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub width: u32,
    #[serde(default)]
    pub height: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleIn {
    pub user_id: String,
    pub role: String,
}

/// A request frame without `v` and `id`, by its `op`.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping {},
    Resume {
        #[serde(default)]
        feed_token: u64,
        #[serde(default)]
        conversations: BTreeMap<String, u64>,
    },
    Typing {
        conversation_id: String,
    },
    GetPresence {
        user_ids: Vec<String>,
    },
    Send {
        conversation_id: String,
        client_msg_id: String,
        #[serde(default)]
        text: String,
        #[serde(default)]
        media: Vec<MediaIn>,
        #[serde(default)]
        ttl_ms: u64,
    },
    CreateDirect {
        user_id: String,
    },
    CreateGroup {
        #[serde(default)]
        conversation_id: Option<String>,
        #[serde(default)]
        name: String,
        #[serde(default)]
        member_ids: Vec<String>,
        #[serde(default)]
        retention_ms: u64,
    },
    UpdateConversation {
        conversation_id: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        add_member_ids: Vec<String>,
        #[serde(default)]
        remove_member_ids: Vec<String>,
        #[serde(default)]
        set_roles: Vec<RoleIn>,
        #[serde(default)]
        retention_ms: Option<u64>,
    },
    DeleteConversation {
        conversation_id: String,
        #[serde(default)]
        for_everyone: bool,
    },
    DeleteMessage {
        conversation_id: String,
        seq: u64,
        #[serde(default)]
        for_everyone: bool,
    },
    MarkRead {
        conversation_id: String,
        seq: u64,
    },
    GetConversation {
        conversation_id: String,
    },
    SyncConversation {
        conversation_id: String,
        #[serde(default)]
        token: u64,
        #[serde(default)]
        limit: u32,
    },
    History {
        conversation_id: String,
        #[serde(default)]
        before_seq: u64,
        #[serde(default)]
        limit: u32,
    },
    GetFeed {
        #[serde(default)]
        limit: u32,
        #[serde(default)]
        cursor: Option<String>,
    },
    SyncFeed {
        #[serde(default)]
        token: u64,
        #[serde(default)]
        limit: u32,
    },
    SetFeedFlags {
        conversation_id: String,
        #[serde(default)]
        muted: Option<bool>,
        #[serde(default)]
        archived: Option<bool>,
    },
    FriendRequest {
        user_id: String,
    },
    FriendAccept {
        user_id: String,
    },
    FriendRemove {
        user_id: String,
    },
    FriendBlock {
        user_id: String,
    },
    FriendUnblock {
        user_id: String,
    },
    GetFriendship {
        user_id: String,
    },
    ListFriends {
        #[serde(default)]
        after: String,
        #[serde(default)]
        limit: u32,
    },
    GetUser {
        user_id: String,
    },
    LookupUser {
        username: String,
    },
    Me {},
    UpdateSettings {
        #[serde(default)]
        privacy: Option<String>,
        #[serde(default)]
        notifications: Option<String>,
    },
}

/// Every op name, for telling an unknown op from bad parameters.
pub const OPS: &[&str] = &[
    "ping",
    "resume",
    "typing",
    "get_presence",
    "send",
    "create_direct",
    "create_group",
    "update_conversation",
    "delete_conversation",
    "delete_message",
    "mark_read",
    "get_conversation",
    "sync_conversation",
    "history",
    "get_feed",
    "sync_feed",
    "set_feed_flags",
    "friend_request",
    "friend_accept",
    "friend_remove",
    "friend_block",
    "friend_unblock",
    "get_friendship",
    "list_friends",
    "get_user",
    "lookup_user",
    "me",
    "update_settings",
];

pub fn parse_role(r: &str) -> Result<i32, ApiError> {
    match r {
        "member" => Ok(pb::Role::Member as i32),
        "admin" => Ok(pb::Role::Admin as i32),
        _ => Err(ApiError::invalid("role must be \"member\" or \"admin\"")),
    }
}

pub fn parse_privacy(p: &str) -> Result<i32, ApiError> {
    match p {
        "everyone" => Ok(pb::Privacy::Everyone as i32),
        "friends_of_friends" => Ok(pb::Privacy::FriendsOfFriends as i32),
        "nobody" => Ok(pb::Privacy::Nobody as i32),
        _ => Err(ApiError::invalid(
            "privacy must be \"everyone\", \"friends_of_friends\" or \"nobody\"",
        )),
    }
}

pub fn parse_notifications(n: &str) -> Result<i32, ApiError> {
    match n {
        "all" => Ok(pb::Notifications::All as i32),
        "direct_only" => Ok(pb::Notifications::DirectOnly as i32),
        "none" => Ok(pb::Notifications::None as i32),
        _ => Err(ApiError::invalid(
            "notifications must be \"all\", \"direct_only\" or \"none\"",
        )),
    }
}

/// What an operation answers, before a front-end encodes it.
#[derive(Debug)]
pub enum Answer {
    Empty,
    /// The model's answer (never `R::Error`: that is an `Err`).
    Model(R),
    /// A user: `own` = the caller's own profile (settings included);
    /// otherwise only the public fields may be shown.
    User {
        user: pb::User,
        own: bool,
    },
}

/// Runs the cluster operations of protocol v1 for one user.
pub struct Ops<'a> {
    pub cluster: &'a Cluster,
    pub me: &'a str,
    pub deadline: Instant,
}

/// Friends read per side when checking "friends of friends".
const MUTUAL_SCAN: usize = 1000;
/// Largest `limit` of a message page (`history`, `sync_conversation`): a
/// reply stays a few MB at most (0 = the model's default, 50).
pub const MAX_MESSAGE_PAGE: u32 = 100;

pub fn message_page(limit: u32) -> Result<u32, ApiError> {
    if limit > MAX_MESSAGE_PAGE {
        return Err(ApiError::Model {
            code: ErrorCode::LimitExceeded,
            message: format!("limit {limit} is above {MAX_MESSAGE_PAGE}"),
        });
    }
    Ok(limit)
}

impl Ops<'_> {
    async fn exec(&self, op: Op) -> Result<R, ApiError> {
        check(self.cluster.exec(op, self.deadline).await?)
    }

    async fn query(&self, q: Q) -> Result<R, ApiError> {
        check(self.cluster.query(q, self.deadline).await?)
    }

    async fn user(&self, user_id: &str) -> Result<pb::User, ApiError> {
        match self
            .query(Q::GetUser(pb::GetUser {
                user_id: user_id.to_string(),
            }))
            .await?
        {
            R::User(u) => Ok(u),
            other => Err(ApiError::unexpected(&other)),
        }
    }

    async fn friend_ids(&self, user_id: &str) -> Result<HashSet<String>, ApiError> {
        let mut out = HashSet::new();
        let mut after = String::new();
        while out.len() < MUTUAL_SCAN {
            let page = match self
                .query(Q::ListFriends(pb::ListFriends {
                    user_id: user_id.to_string(),
                    after: after.clone(),
                    limit: natter_model::MAX_PAGE_LIMIT,
                }))
                .await?
            {
                R::Friends(f) => f,
                other => return Err(ApiError::unexpected(&other)),
            };
            out.extend(
                page.entries
                    .iter()
                    .filter(|e| e.relation == pb::FriendRelation::Friend as i32)
                    .map(|e| e.other_id.clone()),
            );
            if page.next_after.is_empty() {
                break;
            }
            after = page.next_after;
        }
        Ok(out)
    }

    /// Whether the caller may find `target` and send it friend requests:
    /// its privacy setting, unless the two already have a relation.
    /// "Friends of friends" needs a mutual friend (among the first
    /// [`MUTUAL_SCAN`] friends of each).
    async fn may_reach(&self, target: &pb::User) -> Result<bool, ApiError> {
        if target.id == self.me {
            return Ok(true);
        }
        let privacy = pb::Privacy::try_from(target.privacy).unwrap_or(pb::Privacy::Everyone);
        if matches!(privacy, pb::Privacy::Everyone | pb::Privacy::Unspecified) {
            return Ok(true);
        }
        let f = match self
            .query(Q::GetFriendship(pb::GetFriendship {
                user_a: self.me.to_string(),
                user_b: target.id.clone(),
            }))
            .await?
        {
            R::Friendship(f) => f,
            other => return Err(ApiError::unexpected(&other)),
        };
        if matches!(
            pb::FriendState::try_from(f.state),
            Ok(pb::FriendState::Accepted | pb::FriendState::Requested)
        ) {
            return Ok(true);
        }
        if privacy == pb::Privacy::Nobody {
            return Ok(false);
        }
        let mine = self.friend_ids(self.me).await?;
        let theirs = self.friend_ids(&target.id).await?;
        Ok(mine.intersection(&theirs).next().is_some())
    }

    fn pair(&self, f: fn(String, String) -> Op, other: String) -> Op {
        f(self.me.to_string(), other)
    }

    /// Runs a cluster request (not `ping`, `resume`, `typing` or
    /// `get_presence`, which the connection handles) and returns the reply's `ok` object.
    pub async fn run(&self, req: Request) -> Result<Value, ApiError> {
        Ok(match self.call(req).await? {
            Answer::Empty => json!({}),
            Answer::Model(r) => json::response(&r, self.me),
            Answer::User { user, own: true } => json!({"user": json::own_user(&user)}),
            Answer::User { user, own: false } => json!({"user": json::public_user(&user)}),
        })
    }

    /// Runs a cluster request as the session's user and returns the model's
    /// answer, for any front-end (WebSocket JSON, gRPC) to encode.
    pub async fn call(&self, req: Request) -> Result<Answer, ApiError> {
        let me = self.me.to_string();
        let r = match req {
            Request::Ping {}
            | Request::Resume { .. }
            | Request::Typing { .. }
            | Request::GetPresence { .. } => return Ok(Answer::Empty),
            Request::Send {
                conversation_id,
                client_msg_id,
                text,
                media,
                ttl_ms,
            } => {
                if client_msg_id.is_empty() {
                    return Err(ApiError::invalid(
                        "client_msg_id is required (the idempotency key of a send)",
                    ));
                }
                if !media.is_empty() {
                    // Members only, before saying anything about the media.
                    self.query(Q::GetConversation(pb::GetConversation {
                        viewer_id: me.clone(),
                        conversation_id: conversation_id.clone(),
                    }))
                    .await?;
                }
                let media = crate::media::resolve_items(&conversation_id, media).await?;
                self.exec(Op::SendMessage(pb::SendMessage {
                    conversation_id,
                    sender_id: me.clone(),
                    client_msg_id,
                    text,
                    media,
                    ttl_ms,
                }))
                .await?
            }
            Request::CreateDirect { user_id } => {
                self.exec(Op::CreateDirect(pb::CreateDirect {
                    user_a: me.clone(),
                    user_b: user_id,
                }))
                .await?
            }
            Request::CreateGroup {
                conversation_id,
                name,
                member_ids,
                retention_ms,
            } => {
                let id = conversation_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                self.exec(Op::CreateGroup(pb::CreateGroup {
                    conversation_id: id,
                    creator_id: me.clone(),
                    name,
                    member_ids,
                    retention_ms,
                }))
                .await?
            }
            Request::UpdateConversation {
                conversation_id,
                name,
                add_member_ids,
                remove_member_ids,
                set_roles,
                retention_ms,
            } => {
                let set_roles = set_roles
                    .into_iter()
                    .map(|r| {
                        Ok(pb::RoleChange {
                            user_id: r.user_id,
                            role: parse_role(&r.role)?,
                        })
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?;
                self.exec(Op::UpdateConversation(pb::UpdateConversation {
                    conversation_id,
                    actor_id: me.clone(),
                    name,
                    add_member_ids,
                    remove_member_ids,
                    set_roles,
                    retention_ms,
                }))
                .await?
            }
            Request::DeleteConversation {
                conversation_id,
                for_everyone,
            } => {
                self.exec(Op::DeleteConversation(pb::DeleteConversation {
                    conversation_id,
                    actor_id: me.clone(),
                    for_everyone,
                }))
                .await?
            }
            Request::DeleteMessage {
                conversation_id,
                seq,
                for_everyone,
            } => {
                self.exec(Op::DeleteMessage(pb::DeleteMessage {
                    conversation_id,
                    actor_id: me.clone(),
                    seq,
                    for_everyone,
                }))
                .await?
            }
            Request::MarkRead {
                conversation_id,
                seq,
            } => {
                self.exec(Op::MarkRead(pb::MarkRead {
                    conversation_id,
                    user_id: me.clone(),
                    seq,
                }))
                .await?
            }
            Request::GetConversation { conversation_id } => {
                self.query(Q::GetConversation(pb::GetConversation {
                    viewer_id: me.clone(),
                    conversation_id,
                }))
                .await?
            }
            Request::SyncConversation {
                conversation_id,
                token,
                limit,
            } => {
                self.query(Q::SyncConversation(pb::SyncConversation {
                    viewer_id: me.clone(),
                    conversation_id,
                    token,
                    limit: message_page(limit)?,
                }))
                .await?
            }
            Request::History {
                conversation_id,
                before_seq,
                limit,
            } => {
                self.query(Q::History(pb::History {
                    viewer_id: me.clone(),
                    conversation_id,
                    before_seq,
                    limit: message_page(limit)?,
                }))
                .await?
            }
            Request::GetFeed { limit, cursor } => {
                let cursor = match cursor {
                    Some(c) => base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(c)
                        .map_err(|_| ApiError::invalid("cursor is not one the router gave"))?,
                    None => Vec::new(),
                };
                self.query(Q::GetFeed(pb::GetFeed {
                    user_id: me.clone(),
                    limit,
                    cursor,
                }))
                .await?
            }
            Request::SyncFeed { token, limit } => {
                self.query(Q::SyncFeed(pb::SyncFeed {
                    user_id: me.clone(),
                    token,
                    limit,
                }))
                .await?
            }
            Request::SetFeedFlags {
                conversation_id,
                muted,
                archived,
            } => {
                self.exec(Op::SetFeedFlags(pb::SetFeedFlags {
                    user_id: me.clone(),
                    conversation_id,
                    muted,
                    archived,
                }))
                .await?
            }
            Request::FriendRequest { user_id } => {
                let target = match self.user(&user_id).await {
                    Ok(u) => u,
                    Err(ApiError::Model {
                        code: ErrorCode::NotFound,
                        ..
                    }) => return Err(ApiError::not_found("user not found")),
                    Err(e) => return Err(e),
                };
                if !self.may_reach(&target).await? {
                    return Err(ApiError::not_found("user not found"));
                }
                self.exec(self.pair(
                    |from, to| Op::FriendRequest(pb::FriendRequest { from, to }),
                    user_id,
                ))
                .await?
            }
            Request::FriendAccept { user_id } => {
                self.exec(self.pair(
                    |user_id, requester_id| {
                        Op::FriendAccept(pb::FriendAccept {
                            user_id,
                            requester_id,
                        })
                    },
                    user_id,
                ))
                .await?
            }
            Request::FriendRemove { user_id } => {
                self.exec(self.pair(
                    |user_id, other_id| Op::FriendRemove(pb::FriendRemove { user_id, other_id }),
                    user_id,
                ))
                .await?
            }
            Request::FriendBlock { user_id } => {
                self.exec(self.pair(
                    |user_id, other_id| Op::FriendBlock(pb::FriendBlock { user_id, other_id }),
                    user_id,
                ))
                .await?
            }
            Request::FriendUnblock { user_id } => {
                self.exec(self.pair(
                    |user_id, other_id| Op::FriendUnblock(pb::FriendUnblock { user_id, other_id }),
                    user_id,
                ))
                .await?
            }
            Request::GetFriendship { user_id } => {
                self.query(Q::GetFriendship(pb::GetFriendship {
                    user_a: me.clone(),
                    user_b: user_id,
                }))
                .await?
            }
            Request::ListFriends { after, limit } => {
                self.query(Q::ListFriends(pb::ListFriends {
                    user_id: me.clone(),
                    after,
                    limit,
                }))
                .await?
            }
            Request::GetUser { user_id } => {
                let u = self.user(&user_id).await?;
                let own = u.id == me;
                return Ok(Answer::User { user: u, own });
            }
            Request::LookupUser { username } => {
                let username = crate::auth::normalize_username(&username)?;
                let claim = match self
                    .query(Q::LookupUsername(pb::LookupUsername { username }))
                    .await?
                {
                    R::Username(c) => c,
                    other => return Err(ApiError::unexpected(&other)),
                };
                let hidden = || ApiError::not_found("username not found");
                let u = match self.user(&claim.user_id).await {
                    Ok(u) => u,
                    Err(ApiError::Model {
                        code: ErrorCode::NotFound,
                        ..
                    }) => return Err(hidden()),
                    Err(e) => return Err(e),
                };
                if !self.may_reach(&u).await? {
                    return Err(hidden());
                }
                return Ok(Answer::User {
                    user: u,
                    own: false,
                });
            }
            Request::Me {} => {
                let u = self.user(&me).await?;
                return Ok(Answer::User { user: u, own: true });
            }
            Request::UpdateSettings {
                privacy,
                notifications,
            } => {
                let privacy = privacy.as_deref().map(parse_privacy).transpose()?;
                let notifications = notifications
                    .as_deref()
                    .map(parse_notifications)
                    .transpose()?;
                self.exec(Op::UpdateUserSettings(pb::UpdateUserSettings {
                    user_id: me.clone(),
                    privacy,
                    notifications,
                    home_region: None,
                    password_hash: None,
                }))
                .await?
            }
        };
        Ok(Answer::Model(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Request, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn requests_parse_strictly() {
        let r = parse(json!({"op":"send","conversation_id":"c","client_msg_id":"m","text":"hi"}));
        assert!(matches!(r, Ok(Request::Send { .. })));
        assert!(matches!(parse(json!({"op":"ping"})), Ok(Request::Ping {})));
        // Unknown fields (e.g. trying to choose the sender) are refused.
        assert!(parse(
            json!({"op":"send","conversation_id":"c","client_msg_id":"m","sender_id":"x"})
        )
        .is_err());
        assert!(parse(json!({"op":"mark_read","conversation_id":"c"})).is_err());
        assert!(parse(json!({"op":"mark_read","conversation_id":"c","seq":-1})).is_err());
        let r = parse(json!({"op":"resume","feed_token":3,"conversations":{"a":1,"b":2}}));
        match r {
            Ok(Request::Resume {
                feed_token,
                conversations,
            }) => {
                assert_eq!(feed_token, 3);
                assert_eq!(conversations.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        for op in OPS {
            // Every listed op is a variant (a parse error names a field,
            // not the variant).
            let e = parse(json!({ "op": op })).err().map(|e| e.to_string());
            assert!(
                !e.as_deref().unwrap_or("").contains("unknown variant"),
                "{op}: {e:?}"
            );
        }
    }
}
