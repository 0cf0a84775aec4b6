//! Natter's messaging rules as a pure, deterministic replicated state
//! machine.
//!
//! [`Model`] implements [`natter_kv::StateMachine`]: the replication layer
//! hands it committed, encoded [`pb::Command`]s to apply and [`pb::Query`]s
//! to answer, each against the key space of one shard. It has no clock, no
//! randomness, no I/O and no hash-map iteration: the same commands on the
//! same state give the same writes and answers on every replica. Time comes
//! from the [`pb::Stamp`] the Raft leader puts into each command.
//!
//! Everything on the wire and on disk is protobuf (`proto/natter/model.proto`,
//! re-exported as [`pb`]); keys are binary and ordered (module `keys`).
//!
//! # Modules, one job each
//! * [`route`](route_key) — which shard a command or query belongs to.
//! * `keys` — the key layout; `codec` — rows and the shard clock.
//! * `tx` — commands are all-or-nothing: writes are buffered and committed
//!   only if the command succeeds.
//! * `users` — users and username claims.
//! * `friends` — friendships (pair shard) and the friend index (user shard).
//! * `conversations` — metadata, membership, permissions, versions.
//! * `messages` — send, delete, mark read, tombstones, unread counts.
//! * `sync` — cold start, delta sync and history of a conversation.
//! * `feed` — the per-user feed: updates, order, delta sync.
//! * `outbox` — cross-shard fan-out, and the helpers the outbox worker uses.
//! * `expiry` — TTL, retention and purging of deleted conversations.
//! * `sessions` — login sessions by token hash: create, revoke, check.
//! * `notify` — the offline-notification queue and last seen (user shard).
//! * [`limits`] — every size and count limit.
//!
//! # Operations
//! Commands ([`pb::command::Op`]), by the shard they are routed to
//! ([`route_key`] → [`shard_of`]):
//! * username shard: `ClaimUsername`;
//! * user shard: `CreateUser`, `UpdateUserSettings`, `ApplyFeedUpdates`
//!   (outbox deliveries; also enqueues notifications), `SetFeedFlags`,
//!   `RecordLastSeen`;
//! * pair shard (= the pair's direct conversation): `FriendRequest`,
//!   `FriendAccept`, `FriendRemove`, `FriendBlock`, `FriendUnblock`,
//!   `CreateDirect`;
//! * conversation shard: `CreateGroup`, `UpdateConversation`,
//!   `DeleteConversation`, `SendMessage`, `DeleteMessage`, `MarkRead`;
//! * session shard (by the token's SHA-256): `CreateSession`,
//!   `RevokeSession`;
//! * any shard, sent to a specific one: `AckOutbox`, `Tick`,
//!   `AckNotifications`.
//!
//! Queries ([`pb::query::Q`], [`query_route_key`]): `GetUser`,
//! `LookupUsername`, `GetFriendship`, `ListFriends`, `GetConversation`,
//! `SyncConversation`, `History`, `GetFeed`, `SyncFeed`, `GetSession`, and
//! the shard-local
//! `PendingOutbox` and `NextExpiry`; `GetLastSeen` (user shard),
//! `PendingNotifications` (shard-local, or the user's shard with a user id).
//!
//! # What the node runs on every data shard it leads
//! * **Outbox worker**: query `PendingOutbox{limit, after}`; propose each
//!   `ApplyFeedUpdates` of [`outbox_deliveries`]`(entries, shard_count)` to
//!   its shard; then propose `AckOutbox` ([`outbox_ack`]) of the entries
//!   whose deliveries were all applied back to the source shard. Any
//!   failure: don't ack, retry later — delivery is idempotent.
//! * **Expiry**: query `NextExpiry`; when its `at_ms` is non-zero and not in
//!   the future, propose `Tick{}`. Each command also does a bounded amount
//!   of expiry work first, so a busy shard needs few ticks.
//!
//! # Answers
//! Every command and query is answered with an encoded [`pb::Response`]. A
//! rejected one (bad input, no permission, not found) gets
//! `Response{error}` and changes nothing; undecodable bytes are rejected
//! the same way (INVALID_ARGUMENT), never a panic. Only storage failures
//! and corrupt rows are `Err`; then the caller must discard the batch's
//! writes (the command's housekeeping may have written some).

pub mod client;
mod codec;
mod conversations;
mod error;
mod expiry;
mod feed;
mod friends;
mod ids;
mod keys;
pub mod limits;
mod messages;
mod notify;
mod outbox;
mod route;
mod sessions;
mod sync;
mod tx;
mod users;

#[cfg(test)]
mod testkv;
#[cfg(test)]
mod tests;

use natter_kv::{KvRead, KvResult, KvWrite, StateMachine};
use prost::Message as _;

pub use natter_proto::model as pb;

pub use ids::{direct_conversation_id, is_canonical_uuid};
pub use limits::*;
pub use notify::{notification_ack, notification_key};
pub use outbox::{outbox_ack, outbox_deliveries, Delivery};
pub use route::{
    conversation_route_key, fnv1a64, pair_route_key, query_route_key, route_key, session_route_key,
    shard_of, user_route_key, username_route_key,
};
pub use sync::sends_delta;
pub use users::valid_region;

use error::{invalid, Fail, Res};
use pb::{command::Op, query::Q, response::R};

/// The messaging state machine. Stateless itself: all state is in the
/// shard's keys.
#[derive(Debug, Default, Clone, Copy)]
pub struct Model;

/// A command with the given stamp (for proposers and tests).
pub fn command(now_ms: u64, op: Op) -> pb::Command {
    pb::Command {
        stamp: Some(pb::Stamp { now_ms }),
        op: Some(op),
    }
}

/// A query with the given time.
pub fn query(now_ms: u64, q: Q) -> pb::Query {
    pb::Query { now_ms, q: Some(q) }
}

/// Decodes a response's content (`None` for an empty response).
pub fn decode_response(bytes: &[u8]) -> Result<Option<R>, prost::DecodeError> {
    pb::Response::decode(bytes).map(|r| r.r)
}

fn encode(r: R) -> Vec<u8> {
    pb::Response { r: Some(r) }.encode_to_vec()
}

fn answer(result: Res<R>) -> KvResult<Vec<u8>> {
    match result {
        Ok(r) => Ok(encode(r)),
        Err(Fail::Reject(e)) => Ok(encode(R::Error(e))),
        Err(Fail::Kv(e)) => Err(e),
    }
}

fn run(kv: &mut dyn KvWrite, now: u64, purged: u32, op: Op) -> Res<R> {
    match op {
        Op::ClaimUsername(c) => users::claim_username(kv, now, c),
        Op::CreateUser(c) => users::create_user(kv, now, c),
        Op::UpdateUserSettings(c) => users::update_user_settings(kv, c),
        Op::ApplyFeedUpdates(c) => feed::apply_updates(kv, now, c),
        Op::SetFeedFlags(c) => feed::set_flags(kv, c),
        Op::FriendRequest(c) => friends::request(kv, now, c),
        Op::FriendAccept(c) => friends::accept(kv, now, c),
        Op::FriendRemove(c) => friends::remove(kv, now, c),
        Op::FriendBlock(c) => friends::block(kv, now, c),
        Op::FriendUnblock(c) => friends::unblock(kv, now, c),
        Op::CreateDirect(c) => conversations::create_direct(kv, now, c),
        Op::CreateGroup(c) => conversations::create_group(kv, now, c),
        Op::UpdateConversation(c) => conversations::update(kv, now, c),
        Op::DeleteConversation(c) => conversations::delete(kv, now, c),
        Op::SendMessage(c) => messages::send(kv, now, c),
        Op::DeleteMessage(c) => messages::delete(kv, now, c),
        Op::MarkRead(c) => messages::mark_read(kv, c),
        Op::AckOutbox(c) => outbox::ack(kv, c),
        Op::CreateSession(c) => sessions::create(kv, now, c),
        Op::RevokeSession(c) => sessions::revoke(kv, c),
        Op::AckNotifications(c) => notify::ack(kv, c),
        Op::RecordLastSeen(c) => notify::record_last_seen(kv, now, c),
        Op::Tick(_) => Ok(R::Ticked(pb::Ticked {
            now_ms: now,
            purged,
        })),
    }
}

fn ask(kv: &dyn KvRead, now: u64, q: Q) -> Res<R> {
    match q {
        Q::GetUser(q) => users::get_user(kv, q),
        Q::LookupUsername(q) => users::lookup_username(kv, q),
        Q::GetFriendship(q) => friends::get_friendship(kv, q),
        Q::ListFriends(q) => friends::list(kv, q),
        Q::GetConversation(q) => conversations::get_conversation(kv, q),
        Q::SyncConversation(q) => sync::sync(kv, now, q),
        Q::History(q) => sync::history(kv, now, q),
        Q::GetFeed(q) => feed::get_feed(kv, now, q),
        Q::SyncFeed(q) => feed::sync_feed(kv, now, q),
        Q::PendingOutbox(q) => outbox::pending(kv, q),
        Q::GetSession(q) => sessions::get_session(kv, now, q),
        Q::PendingNotifications(q) => notify::pending(kv, q),
        Q::GetLastSeen(q) => notify::get_last_seen(kv, q),
        Q::NextExpiry(_) => Ok(R::NextExpiry(pb::NextExpiryResult {
            at_ms: expiry::next_expiry(kv)?,
        })),
    }
}

impl StateMachine for Model {
    /// Decodes the command, advances the shard clock to its stamp, runs one
    /// budget of housekeeping (expiry, purges), then applies the operation
    /// all-or-nothing.
    fn apply(&self, kv: &mut dyn KvWrite, command: &[u8]) -> KvResult<Vec<u8>> {
        let cmd = match pb::Command::decode(command) {
            Ok(c) => c,
            Err(e) => return answer(Err(invalid(format!("undecodable command: {e}")))),
        };
        let clock = codec::advance_clock(kv, cmd.stamp.map_or(0, |s| s.now_ms))?;
        let now = clock.now_ms;
        let purged = expiry::housekeeping(kv, clock)?;
        let Some(op) = cmd.op else {
            return answer(Err(invalid("command has no operation")));
        };
        let mut overlay = tx::Overlay::new(&*kv);
        let result = run(&mut overlay, now, purged, op);
        let writes = overlay.into_writes();
        if result.is_ok() {
            tx::commit(kv, writes);
        }
        answer(result)
    }

    /// Answers a query at `max(query.now_ms, shard clock)`.
    fn query(&self, kv: &dyn KvRead, query: &[u8]) -> KvResult<Vec<u8>> {
        let q = match pb::Query::decode(query) {
            Ok(q) => q,
            Err(e) => return answer(Err(invalid(format!("undecodable query: {e}")))),
        };
        let now = q.now_ms.max(codec::clock(kv)?);
        let Some(inner) = q.q else {
            return answer(Err(invalid("query has no question")));
        };
        answer(ask(kv, now, inner))
    }
}
