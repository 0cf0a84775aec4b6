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
