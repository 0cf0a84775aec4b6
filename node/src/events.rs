//! Change events: after a command commits through this node, what it changed
//! (conversations, feeds, friend lists) is published to every `Watch`
//! stream. Events are hints for routers to push quickly; correctness comes
//! from delta sync, so a lagging watcher is told to resync instead of being
//! buffered without bound.

use natter_model::pb::{self, command::Op, response::R};
use natter_proto::cluster::{Change, ChangeEvent, ChangeKind};
use prost::Message;
use tokio::sync::broadcast;

/// Events buffered per watcher before it is told it lagged.
pub const WATCH_BUFFER: usize = 4096;

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<ChangeEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(WATCH_BUFFER).0,
        }
    }
}

fn change(kind: ChangeKind, id: &str, version: u64) -> Change {
    Change {
        kind: kind as i32,
        id: id.to_string(),
        version,
        sent: Vec::new(),
    }
}

/// What a committed model command changed, judged from the command and its
/// response (a rejected command changed nothing).
pub fn changes(command: &[u8], response: &[u8]) -> Vec<Change> {
    let (Ok(cmd), Ok(resp)) = (pb::Command::decode(command), pb::Response::decode(response)) else {
        return Vec::new();
    };
    let (Some(op), Some(r)) = (cmd.op, resp.r) else {
        return Vec::new();
    };
    if matches!(r, R::Error(_)) {
        return Vec::new();
    }
    let version = match &r {
        R::Sent(s) => s.message.as_ref().map(|m| m.version).unwrap_or(0),
        R::Message(m) => m.version,
        R::Conversation(c) => c.version,
        _ => 0,
    };
    use ChangeKind::*;
    match op {
        Op::SendMessage(c) => {
            let mut ch = change(Conversation, &c.conversation_id, version);
            // The message and the row after it: routers push it to devices
            // at the version before without reading it back.
            if let R::Sent(s) = &r {
                if s.conversation.is_some() && !s.duplicate {
                    ch.sent = s.encode_to_vec();
                }
            }
            vec![ch]
        }
        Op::CreateGroup(c) => vec![change(Conversation, &c.conversation_id, version)],
        Op::UpdateConversation(c) => vec![change(Conversation, &c.conversation_id, version)],
        Op::DeleteConversation(c) => vec![change(Conversation, &c.conversation_id, version)],
        Op::DeleteMessage(c) => vec![change(Conversation, &c.conversation_id, version)],
        Op::MarkRead(c) => vec![change(Conversation, &c.conversation_id, version)],
        Op::CreateDirect(c) => natter_model::direct_conversation_id(&c.user_a, &c.user_b)
            .map(|id| vec![change(Conversation, &id, version)])
            .unwrap_or_default(),
        Op::ApplyFeedUpdates(a) => {
            // The feeds that changed, at their new versions (an update
            // ignored as stale changed nothing and is not named).
            let mut v: Vec<Change> = match &r {
                R::FeedApplied(f) => f
                    .feeds
                    .iter()
                    .map(|f| change(Feed, &f.user_id, f.version))
                    .collect(),
                _ => Vec::new(),
            };
            v.extend(
                a.friend_updates
                    .iter()
                    .map(|f| change(Friends, &f.user_id, 0)),
            );
            v.sort_by(|x, y| (x.kind, &x.id).cmp(&(y.kind, &y.id)));
            v.dedup_by(|x, y| x.kind == y.kind && x.id == y.id);
            v
        }
        Op::SetFeedFlags(f) => {
            let version = match &r {
                R::FeedEntry(e) => e.feed_version,
                _ => 0,
            };
            vec![change(Feed, &f.user_id, version)]
        }
        _ => Vec::new(),
    }
}

impl Events {
    pub fn publish(&self, shard: u32, index: u64, command: &[u8], response: &[u8]) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let changes = changes(command, response);
        if !changes.is_empty() {
            let _ = self.tx.send(ChangeEvent {
                shard,
                index,
                changes,
                lagged: false,
                ..Default::default()
            });
        }
    }

    /// Publishes an event that no command produced (presence, typing).
    pub fn publish_ephemeral(&self, ev: ChangeEvent) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(ev);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.tx.subscribe()
    }
}
