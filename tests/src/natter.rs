//! Messaging operations over a [`ShardClient`], routed the way the model
//! routes them (the router does the same): enough to drive real workloads in
//! multi-process tests.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use natter_model::pb::{self, command::Op, query::Q, response::R};
use prost::Message;

use crate::{Outcome, ShardClient};

pub const T: Duration = Duration::from_secs(30);

pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn command(op: Op) -> pb::Command {
    pb::Command {
        stamp: None,
        op: Some(op),
    }
}

pub fn decode(raw: &[u8]) -> Result<R> {
    pb::Response::decode(raw)?
        .r
        .ok_or_else(|| anyhow!("empty response"))
}

#[derive(Clone)]
pub struct Natter {
    pub client: ShardClient,
    pub shards: u32,
}

impl Natter {
    pub fn new(client: ShardClient, shards: u32) -> Self {
        Natter { client, shards }
    }

    pub fn shard_of_command(&self, cmd: &pb::Command) -> u32 {
        natter_model::shard_of(&natter_model::route_key(cmd), self.shards)
    }

    pub fn shard_of_query(&self, q: &pb::Query) -> u32 {
        natter_model::shard_of(&natter_model::query_route_key(q), self.shards)
    }

    /// Proposes until committed (commands must be idempotent).
    pub async fn exec(&self, op: Op) -> Result<R> {
        let cmd = command(op);
        let raw = self
            .client
            .propose(self.shard_of_command(&cmd), &cmd.encode_to_vec(), T)
            .await?;
        decode(&raw)
    }

    /// One attempt, with an honest outcome.
    pub async fn exec_once(&self, op: Op) -> (u32, Outcome) {
        let cmd = command(op);
        let shard = self.shard_of_command(&cmd);
        (
            shard,
            self.client.propose_once(shard, &cmd.encode_to_vec()).await,
        )
    }

    pub async fn query(&self, q: Q) -> Result<R> {
        let q = pb::Query {
            now_ms: 0,
            q: Some(q),
        };
        let raw = self
            .client
            .read(self.shard_of_query(&q), &q.encode_to_vec(), T)
            .await?;
        decode(&raw)
    }

    /// A group whose conversation id lands on `shard`.
    pub async fn create_group_on(
        &self,
        shard: u32,
        creator: &str,
        members: &[String],
    ) -> Result<String> {
        loop {
            let id = uuid();
            let op = Op::CreateGroup(pb::CreateGroup {
                conversation_id: id.clone(),
                creator_id: creator.to_string(),
                name: format!("group on shard {shard}"),
                member_ids: members.to_vec(),
                retention_ms: 0,
            });
            if self.shard_of_command(&command(op.clone())) != shard {
                continue;
            }
            return match self.exec(op).await? {
                R::Conversation(_) => Ok(id),
                other => bail!("create group: {other:?}"),
            };
        }
    }

    pub fn send_op(conv: &str, sender: &str, client_msg_id: &str, text: &str) -> Op {
        Op::SendMessage(pb::SendMessage {
            conversation_id: conv.to_string(),
            sender_id: sender.to_string(),
            client_msg_id: client_msg_id.to_string(),
            text: text.to_string(),
            media: vec![],
            ttl_ms: 0,
        })
    }

    pub async fn send(
        &self,
        conv: &str,
        sender: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Result<pb::Message> {
        match self
            .exec(Self::send_op(conv, sender, client_msg_id, text))
            .await?
        {
            R::Sent(s) => s
                .message
                .ok_or_else(|| anyhow!("send result without message")),
            other => bail!("send: {other:?}"),
        }
    }

    /// Every live message of `conv`, oldest first, paging History backwards.
    pub async fn history(&self, conv: &str, viewer: &str) -> Result<Vec<pb::Message>> {
        let mut out = Vec::new();
        let mut before = 0;
        loop {
            let page = match self
                .query(Q::History(pb::History {
                    viewer_id: viewer.to_string(),
                    conversation_id: conv.to_string(),
                    before_seq: before,
                    limit: 500,
                }))
                .await?
            {
                R::History(p) => p,
                other => bail!("history: {other:?}"),
            };
            let mut msgs = page.messages;
            msgs.extend(out);
            out = msgs;
            if page.before_seq == 0 {
                return Ok(out);
            }
            before = page.before_seq;
        }
    }
}

use natter_model::client::{ConversationView, FeedView};
use natter_model::pb::query::Q as Query;

impl Natter {
    /// Registers a user with a fresh id (username claim, then the user row).
    pub async fn create_user(&self, username: &str) -> Result<String> {
        let id = uuid();
        match self
            .exec(Op::ClaimUsername(pb::ClaimUsername {
                username: username.into(),
                user_id: id.clone(),
            }))
            .await?
        {
            R::Username(_) => {}
            other => bail!("claim {username}: {other:?}"),
        }
        match self
            .exec(Op::CreateUser(pb::CreateUser {
                user_id: id.clone(),
                username: username.into(),
                password_hash: "$test$not-a-real-hash".into(),
                ..Default::default()
            }))
            .await?
        {
            R::User(_) => Ok(id),
            other => bail!("create user {username}: {other:?}"),
        }
    }

    /// `a` asks, `b` accepts.
    pub async fn befriend(&self, a: &str, b: &str) -> Result<()> {
        let r = self
            .exec(Op::FriendRequest(pb::FriendRequest {
                from: a.into(),
                to: b.into(),
            }))
            .await?;
        if let R::Error(e) = r {
            bail!("friend request: {e:?}");
        }
        match self
            .exec(Op::FriendAccept(pb::FriendAccept {
                user_id: b.into(),
                requester_id: a.into(),
            }))
            .await?
        {
            R::Error(e) => bail!("friend accept: {e:?}"),
            _ => Ok(()),
        }
    }

    /// A full read of a conversation as `viewer`: cold start, then History
    /// back to the first message. Returns the view and its sync token.
    pub async fn full_conversation(
        &self,
        viewer: &str,
        conv: &str,
    ) -> Result<(ConversationView, u64)> {
        let s = match self
            .query(Query::SyncConversation(pb::SyncConversation {
                viewer_id: viewer.into(),
                conversation_id: conv.into(),
                token: 0,
                limit: 100,
            }))
            .await?
        {
            R::ConversationSync(s) => s,
            other => bail!("cold start of {conv}: {other:?}"),
        };
        let mut view = ConversationView::default();
        view.apply(&s.changes)?;
        let mut before = s.before_seq;
        while before != 0 {
            let page = match self
                .query(Query::History(pb::History {
                    viewer_id: viewer.into(),
                    conversation_id: conv.into(),
                    before_seq: before,
                    limit: 100,
                }))
                .await?
            {
                R::History(p) => p,
                other => bail!("history of {conv}: {other:?}"),
            };
            for m in page.messages {
                view.messages.insert(m.seq, m);
            }
            before = page.before_seq;
        }
        view.normalize(s.now_ms);
        Ok((view, s.token))
    }

    /// Applies the deltas since `token` (paging) and returns the new token.
    pub async fn catch_up(
        &self,
        viewer: &str,
        conv: &str,
        view: &mut ConversationView,
        mut token: u64,
    ) -> Result<u64> {
        loop {
            let s = match self
                .query(Query::SyncConversation(pb::SyncConversation {
                    viewer_id: viewer.into(),
                    conversation_id: conv.into(),
                    token,
                    limit: 7, // small pages, so paging is exercised
                }))
                .await?
            {
                R::ConversationSync(s) => s,
                other => bail!("delta sync of {conv}: {other:?}"),
            };
            if s.cold_start {
                bail!("delta sync of {conv} from {token} answered with a cold start");
            }
            view.apply(&s.changes)?;
            token = s.token;
            if !s.has_more {
                view.normalize(s.now_ms);
                return Ok(token);
            }
        }
    }

    /// The whole visible feed of `user` and its token.
    pub async fn full_feed(&self, user: &str) -> Result<(FeedView, u64)> {
        let mut cursor = Vec::new();
        let mut view = FeedView::default();
        let mut token = None;
        loop {
            let p = match self
                .query(Query::GetFeed(pb::GetFeed {
                    user_id: user.into(),
                    limit: 100,
                    cursor: cursor.clone(),
                }))
                .await?
            {
                R::Feed(p) => p,
                other => bail!("feed of {user}: {other:?}"),
            };
            token.get_or_insert(p.token);
            view.apply(&p.entries)?;
            view.normalize(p.now_ms);
            if p.cursor.is_empty() {
                return Ok((view, token.unwrap_or(0)));
            }
            cursor = p.cursor;
        }
    }

    /// Applies feed deltas since `token`; a cold-start answer (token 0)
    /// replaces the view with a full read.
    pub async fn catch_up_feed(
        &self,
        user: &str,
        view: &mut FeedView,
        mut token: u64,
    ) -> Result<u64> {
        loop {
            let p = match self
                .query(Query::SyncFeed(pb::SyncFeed {
                    user_id: user.into(),
                    token,
                    limit: 3,
                }))
                .await?
            {
                R::Feed(p) => p,
                other => bail!("feed sync of {user}: {other:?}"),
            };
            if p.cold_start {
                let (v, t) = self.full_feed(user).await?;
                *view = v;
                return Ok(t);
            }
            view.apply(&p.entries)?;
            token = p.token;
            if !p.has_more {
                view.normalize(p.now_ms);
                return Ok(token);
            }
        }
    }
}
