//! Tests: a multi-shard in-memory world, unit tests of every rule, and a
//! property test of delta sync against full reads.

mod notify;
mod prop;
mod unit;

use natter_kv::StateMachine;
use prost::Message as _;

pub(crate) use crate::client::{ConversationView as ConvState, FeedView as FeedState};
use crate::pb::{self, command::Op, query::Q, response::R, ErrorCode};
use crate::query_route_key;
use crate::testkv::MemKv;
use crate::{
    command, decode_response, outbox_ack, outbox_deliveries, query, route_key, shard_of, Model,
};

/// A deterministic version-4 user id.
pub(crate) fn uid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{:012x}", i + 1)
}

/// A deterministic version-4 group id.
pub(crate) fn gid(i: u32) -> String {
    format!("20000000-0000-4000-8000-{:012x}", i + 1)
}

/// Unwraps a response variant or panics with what came instead.
macro_rules! want {
    ($r:expr, $variant:ident) => {
        match $r {
            crate::pb::response::R::$variant(x) => x,
            other => panic!("expected {}, got {:?}", stringify!($variant), other),
        }
    };
}
pub(crate) use want;

/// The error code of a response (panics if it isn't an error).
pub(crate) fn code(r: &R) -> ErrorCode {
    match r {
        R::Error(e) => ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Several shards, each its own key space, and a clock.
pub(crate) struct World {
    pub(crate) shards: Vec<MemKv>,
    pub(crate) now: u64,
    /// What the leader stamps into the `ApplyFeedUpdates` that
    /// [`World::deliver_from`] proposes: users it sees online, and whether
    /// it has no webhook.
    pub(crate) online: Vec<String>,
    pub(crate) notifications_off: bool,
}

impl World {
    pub(crate) fn new(shards: usize) -> World {
        World {
            shards: vec![MemKv::default(); shards],
            now: 1_000_000,
            online: Vec::new(),
            notifications_off: false,
        }
    }

    fn count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub(crate) fn shard_for(&self, key: &[u8]) -> usize {
        (shard_of(key, self.count()) - 1) as usize
    }

    pub(crate) fn apply_on(&mut self, shard: usize, bytes: &[u8]) -> R {
        let out = Model
            .apply(&mut self.shards[shard], bytes)
            .expect("storage error");
        // Housekeeping's agenda never passes a due entry (else a command
        // would skip work it must do): checked after every command of
        // every model test.
        let kv = &self.shards[shard];
        let clock = crate::codec::clock_row(kv).expect("clock row");
        if let Some(at) = clock.housekeeping_at_ms {
            let next = crate::expiry::next_expiry(kv).expect("next expiry");
            assert!(
                next == 0 || (at != 0 && at <= next),
                "housekeeping agenda {at} is after the first due entry {next}"
            );
        }
        // A pending notification is always the one of the preview its feed
        // row shows (what lets `on_feed_update` find it by a point lookup).
        let prefix = crate::keys::notification_prefix(None, None);
        for (k, v) in
            crate::codec::scan_from(kv, &prefix, std::ops::Bound::Included(&prefix), 100_000)
                .expect("scan")
        {
            let n = crate::codec::decode::<pb::Notification>(&k, &v).expect("notification");
            let user = crate::ids::Id::parse(&n.user_id, "user").expect("user id");
            let conv =
                crate::ids::Id::parse(&n.conversation_id, "conversation").expect("conversation id");
            let row = crate::codec::get::<pb::FeedEntry>(kv, &crate::keys::feed(&user, &conv))
                .expect("feed row");
            // ...and its row doesn't say none is (the next update would
            // not look for it).
            assert_ne!(
                row.as_ref().and_then(|e| e.notification_pending),
                Some(false),
                "pending notification behind a row that says none is pending"
            );
            let shown = row
                .and_then(|e| e.conversation)
                .and_then(|c| c.preview)
                .map(|p| p.seq);
            assert_eq!(
                shown,
                Some(n.seq),
                "pending notification not at its feed row's preview"
            );
        }
        decode_response(&out)
            .expect("undecodable response")
            .expect("empty response")
    }

    /// Applies an op on the shard its route key names.
    pub(crate) fn exec(&mut self, op: Op) -> R {
        let cmd = command(self.now, op);
        let key = route_key(&cmd);
        assert!(!key.is_empty(), "op has no route key");
        let shard = self.shard_for(&key);
        self.apply_on(shard, &cmd.encode_to_vec())
    }

    pub(crate) fn exec_on(&mut self, shard: usize, op: Op) -> R {
        let bytes = command(self.now, op).encode_to_vec();
        self.apply_on(shard, &bytes)
    }

    pub(crate) fn ask_on(&self, shard: usize, q: Q) -> R {
        let bytes = query(self.now, q).encode_to_vec();
        let out = Model
            .query(&self.shards[shard], &bytes)
            .expect("storage error");
        decode_response(&out)
            .expect("undecodable response")
            .expect("empty response")
    }

    pub(crate) fn ask(&self, q: Q) -> R {
        let qq = query(self.now, q);
        let key = query_route_key(&qq);
        assert!(!key.is_empty(), "query has no route key");
        let out = Model
            .query(&self.shards[self.shard_for(&key)], &qq.encode_to_vec())
            .expect("storage error");
        decode_response(&out)
            .expect("undecodable response")
            .expect("empty response")
    }

    pub(crate) fn tick(&mut self) {
        for s in 0..self.shards.len() {
            want!(self.exec_on(s, Op::Tick(pb::Tick {})), Ticked);
        }
    }

    /// Runs the outbox worker's protocol on every shard until all are empty.
    pub(crate) fn deliver(&mut self) {
        loop {
            let mut any = false;
            for s in 0..self.shards.len() {
                any |= self.deliver_from(s, 500);
            }
            if !any {
                break;
            }
        }
    }

    /// One round of the worker on one shard; whether anything was pending.
    pub(crate) fn deliver_from(&mut self, shard: usize, limit: u32) -> bool {
        let batch = want!(
            self.ask_on(
                shard,
                Q::PendingOutbox(pb::PendingOutbox {
                    limit,
                    ..Default::default()
                })
            ),
            Outbox
        );
        if batch.entries.is_empty() {
            return false;
        }
        for d in outbox_deliveries(&batch.entries, self.count()) {
            let mut updates = d.updates;
            updates.online_user_ids = self.online.clone();
            updates.notifications_off = self.notifications_off;
            want!(
                self.exec_on(d.shard as usize - 1, Op::ApplyFeedUpdates(updates)),
                FeedApplied
            );
        }
        want!(
            self.exec_on(shard, Op::AckOutbox(outbox_ack(&batch.entries))),
            OutboxAcked
        );
        true
    }

    pub(crate) fn befriend(&mut self, a: &str, b: &str) {
        want!(
            self.exec(Op::FriendRequest(pb::FriendRequest {
                from: a.into(),
                to: b.into()
            })),
            Friendship
        );
        let f = want!(
            self.exec(Op::FriendAccept(pb::FriendAccept {
                user_id: b.into(),
                requester_id: a.into()
            })),
            Friendship
        );
        assert_eq!(f.state, pb::FriendState::Accepted as i32);
    }

    pub(crate) fn direct(&mut self, a: &str, b: &str) -> String {
        want!(
            self.exec(Op::CreateDirect(pb::CreateDirect {
                user_a: a.into(),
                user_b: b.into()
            })),
            Conversation
        )
        .id
    }

    pub(crate) fn group(
        &mut self,
        i: u32,
        creator: &str,
        members: &[&str],
        retention_ms: u64,
    ) -> String {
        want!(
            self.exec(Op::CreateGroup(pb::CreateGroup {
                conversation_id: gid(i),
                creator_id: creator.into(),
                name: format!("group {i}"),
                member_ids: members.iter().map(|m| m.to_string()).collect(),
                retention_ms
            })),
            Conversation
        )
        .id
    }

    pub(crate) fn send_full(
        &mut self,
        conv: &str,
        sender: &str,
        cmid: &str,
        text: &str,
        ttl_ms: u64,
    ) -> R {
        self.exec(Op::SendMessage(pb::SendMessage {
            conversation_id: conv.into(),
            sender_id: sender.into(),
            client_msg_id: cmid.into(),
            text: text.into(),
            media: Vec::new(),
            ttl_ms,
        }))
    }

    /// Sends and returns the seq.
    pub(crate) fn send(&mut self, conv: &str, sender: &str, text: &str) -> u64 {
        let cmid = format!("c{}-{}", self.now, text);
        let r = self.send_full(conv, sender, &cmid, text, 0);
        want!(r, Sent).message.expect("message").seq
    }

    pub(crate) fn sync(&self, viewer: &str, conv: &str, token: u64, limit: u32) -> R {
        self.ask(Q::SyncConversation(pb::SyncConversation {
            viewer_id: viewer.into(),
            conversation_id: conv.into(),
            token,
            limit,
        }))
    }

    /// A full read: cold start, then History back to the beginning.
    pub(crate) fn full_conversation(
        &self,
        viewer: &str,
        conv: &str,
        limit: u32,
    ) -> Result<(ConvState, u64), ErrorCode> {
        let r = self.sync(viewer, conv, 0, limit);
        let s = match r {
            R::ConversationSync(s) => s,
            other => return Err(code(&other)),
        };
        assert!(s.cold_start);
        let mut state = ConvState::default();
        state.apply(&s.changes).expect("apply conversation changes");
        let mut before = s.before_seq;
        while before != 0 {
            let page = want!(
                self.ask(Q::History(pb::History {
                    viewer_id: viewer.into(),
                    conversation_id: conv.into(),
                    before_seq: before,
                    limit
                })),
                History
            );
            for m in page.messages {
                assert!(m.seq < before, "history went forward");
                state.messages.insert(m.seq, m);
            }
            assert!(page.before_seq == 0 || page.before_seq < before);
            before = page.before_seq;
        }
        state.normalize(self.now);
        Ok((state, s.token))
    }

    /// Applies delta syncs from `token` until has_more is false.
    pub(crate) fn catch_up(
        &self,
        viewer: &str,
        conv: &str,
        state: &mut ConvState,
        mut token: u64,
        limit: u32,
    ) -> Result<u64, ErrorCode> {
        loop {
            let s = match self.sync(viewer, conv, token, limit) {
                R::ConversationSync(s) => s,
                other => return Err(code(&other)),
            };
            assert!(!s.cold_start, "unexpected cold start from token {token}");
            assert!(s.changes.len() <= limit.max(1) as usize || limit == 0);
            state.apply(&s.changes).expect("apply conversation changes");
            assert!(s.token >= token);
            token = s.token;
            if !s.has_more {
                break;
            }
        }
        state.normalize(self.now);
        Ok(token)
    }

    /// The whole visible feed in order, and its token.
    pub(crate) fn full_feed(&self, user: &str, limit: u32) -> (Vec<pb::FeedEntry>, u64) {
        let first = want!(
            self.ask(Q::GetFeed(pb::GetFeed {
                user_id: user.into(),
                limit,
                cursor: Vec::new()
            })),
            Feed
        );
        let token = first.token;
        let mut entries = first.entries;
        let mut cursor = first.cursor;
        while !cursor.is_empty() {
            let p = want!(
                self.ask(Q::GetFeed(pb::GetFeed {
                    user_id: user.into(),
                    limit,
                    cursor: cursor.clone()
                })),
                Feed
            );
            entries.extend(p.entries);
            cursor = p.cursor;
        }
        (entries, token)
    }

    pub(crate) fn catch_up_feed(
        &self,
        user: &str,
        feed: &mut FeedState,
        mut token: u64,
        limit: u32,
    ) -> u64 {
        loop {
            let p = want!(
                self.ask(Q::SyncFeed(pb::SyncFeed {
                    user_id: user.into(),
                    token,
                    limit
                })),
                Feed
            );
            if p.cold_start {
                // Token 0 (an empty feed when read): start over from a full read.
                assert_eq!(token, 0, "unexpected cold start");
                let (entries, t) = self.full_feed(user, limit);
                *feed = FeedState::from_entries(&entries, self.now).expect("feed entries");
                return t;
            }
            feed.apply(&p.entries).expect("feed entries");
            token = p.token;
            if !p.has_more {
                break;
            }
        }
        feed.normalize(self.now);
        token
    }
}

/// Whether a feed is in feed order: unread-and-unmuted first, then newest
/// activity, then conversation id.
pub(crate) fn assert_feed_order(entries: &[pb::FeedEntry]) {
    let key = |e: &pb::FeedEntry| {
        let c = e.conversation.as_ref().expect("conversation");
        (
            c.unread_count == 0 || e.muted,
            std::cmp::Reverse(c.last_activity_ms),
            c.conversation_id.clone(),
        )
    };
    for w in entries.windows(2) {
        assert!(key(&w[0]) < key(&w[1]), "feed out of order: {:?}", entries);
    }
}
