//! Eager replication: a leader sends new entries to its followers while its
//! own WAL fsync is still running.
//!
//! openraft 0.9 runs a leader's log append inside the group's core task and
//! waits there for the append's fsync before it runs the next command, which
//! is the replication of those very entries. A round therefore paid the
//! leader's fsync *and then* the follower's (measured on this machine: the
//! request reached the followers 0.3-0.5 ms after the leader wrote it). Raft
//! does not need that order: the leader may write its log in parallel with
//! replicating it (Ongaro's thesis, §10.2.1), as long as it counts itself
//! toward a commit quorum only once its own copy is durable, which openraft
//! still does (it records the leader's progress after the fsync).
//!
//! So `append` on a leader also posts the AppendEntries request openraft is
//! about to send (the leader's committed vote, the previous entry's id, the
//! entries, no commit index) to every other voter, on the peer's ordered
//! raft stream. A follower handles it like any append: Raft's append is
//! idempotent (entries it already has are skipped; a conflicting suffix is
//! replaced by the leader's, which is what openraft's own request would do
//! too), so its fsync now overlaps the leader's.
//!
//! When openraft then sends its own request for those entries (after the
//! leader's fsync), the network connection does not send it again if the
//! eager request covers it: it waits for the eager request's answer and, if
//! that is `Success`, gives openraft that answer (`Follower::covering` says
//! why that is the same fact). The round then costs one message each way per
//! follower instead of two, and commits as soon as the leader's own fsync
//! and a follower's answer are in. Anything other than `Success` (a
//! conflict, a higher vote, no answer) and openraft's request goes as usual.
//! openraft still counts the leader toward a commit only after its own fsync.
//! Two things differ from a sent request: the commit index it would have
//! carried reaches the follower later (below), and the follower's
//! acknowledgement is dated when openraft built its request rather than a
//! little earlier (openraft 0.9 uses that time only for its
//! `millis_since_quorum_ack` metric).
//!
//! Commit notices. After every commit, openraft 0.9 sends each caught-up
//! follower an empty append carrying nothing but the new commit index (and
//! the same empty append as its periodic heartbeat): at low load that was a
//! second round trip per entry and follower, and a follower core wake-up and
//! RocksDB write (its `save_committed`) each. Eager requests now carry the
//! leader's commit index, and an empty append on a replication connection is
//! answered `Success` here, without sending it, when the follower's last
//! eager request covers its previous entry, was answered `Success` and went
//! less than [`NOTICE_RECENT`] ago (`Follower::spares`): that answer already
//! says the follower holds and matches the leader's log up to that entry,
//! which is all a `Success` to an empty append says. Its commit index then
//! reaches the follower with the next eager request, or, if none carried it
//! within [`NOTICE_DELAY`], by itself (the same empty append, sent then).
//! Raft lets a follower learn the commit index late; it only applies later.
//! openraft's leadership check for linearizable reads also sends empty
//! appends, but each on a connection of its own that never carries entries
//! (openraft 0.9 creates one per round): those always go, so a read is never
//! confirmed by an old answer.
//!
//! It is a low-load optimisation. Under load a round is bound by CPU, not
//! by fsync latency, and a second copy of a batch only costs: sending every
//! batch eagerly cost 9 % at 256 clients, and it splits a follower's batches
//! into more fsyncs. So a follower gets an eager
//! request only while its pipeline is idle: no openraft append carrying
//! entries to it and no earlier eager request unanswered. Nothing is
//! sent either when this node does not lead the entries' term, when the
//! previous entry's id is unknown, when the peer does not serve the raft
//! stream, or when a batch is larger than [`MAX_EAGER_BYTES`]. Measured
//! with this gate, before eager answers stood in for openraft's requests:
//! one client +9-13 % sends/s and p50 -10 %; 16 clients -5-7 % (the nodes
//! are CPU-bound there, yet pipelines are idle often enough for the second
//! copy to go); 256 clients unchanged within noise. With the answers
//! standing in (no second copy when covered), against the version before:
//! one client +17-25 % sends/s, 16 clients +9-10 %, 256 within noise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use natter_proto::cluster::{RaftKind, RaftRequest};
use openraft::error::RaftError;
use openraft::metrics::RaftServerMetrics;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{CommittedLeaderId, ServerState, Vote};
use tokio::sync::watch;

use crate::network::Peers;
use crate::types::{Entry, LogId, NodeId, TypeConfig};

/// Largest encoded batch sent eagerly.
pub const MAX_EAGER_BYTES: usize = 64 * 1024;

/// How long an unanswered eager request blocks the next one to that peer.
const EAGER_TTL: Duration = Duration::from_secs(1);

/// After a request that did not reach the peer (down, unreachable), how
/// long before the next one: not one connection attempt per append.
const EAGER_BACKOFF: Duration = Duration::from_secs(1);

/// How long after an eager request an empty append to that follower may be
/// answered by the request's answer (well under the heartbeat period and the
/// election timeout: past it, openraft's heartbeats go as sent).
pub const NOTICE_RECENT: Duration = Duration::from_millis(100);

/// How long a commit notice answered here waits for an eager request to
/// carry its commit index before it is sent by itself.
pub const NOTICE_DELAY: Duration = Duration::from_millis(5);

type ServerMetrics = RaftServerMetrics<NodeId, openraft::BasicNode>;

/// One group's eager sender, owned by its log store.
pub(crate) struct Eager {
    group: u32,
    me: NodeId,
    peers: Arc<Peers>,
    /// The group's role, term and membership, once the group runs.
    server: OnceLock<watch::Receiver<ServerMetrics>>,
    /// The id of the last entry this log appended, if known (reset by a
    /// truncation or purge): the `prev_log_id` of the next append.
    last: Mutex<Option<LogId>>,
    /// What this group's leader knows of each follower's pipeline.
    followers: Mutex<HashMap<NodeId, Arc<Follower>>>,
    /// Eager requests sent since start.
    sent: AtomicU64,
    /// openraft requests answered by an eager request's answer, since start.
    answered: AtomicU64,
    /// The commit index this node last saved (as leader: the group's).
    committed: Mutex<Option<LogId>>,
    /// Empty appends (commit notices, heartbeats) answered here, since start.
    spared: AtomicU64,
}

/// One follower's pipeline, as seen from the leader.
#[derive(Default)]
pub(crate) struct Follower {
    /// openraft's append requests with entries to it awaiting an answer
    /// (counted by the group's network connection).
    pub(crate) appending: AtomicUsize,
    /// Whether an eager request to it awaits its answer.
    eager: AtomicBool,
    /// The last eager request sent to it, whose answer may stand in for
    /// openraft's own request for the same entries.
    sent: Mutex<Option<Sent>>,
    /// Commit notices answered here and not yet delivered.
    notices: Mutex<Notices>,
}

/// A follower's commit notices (see the module's doc).
#[derive(Default)]
struct Notices {
    /// The newest one answered here, to send if nothing carries its commit.
    pending: Option<AppendEntriesRequest<TypeConfig>>,
    /// A task will send `pending` (or find its commit carried).
    scheduled: bool,
    /// The highest commit index sent to the follower, by an eager request
    /// or a notice.
    carried: Option<LogId>,
}

/// An eager request: what it asked the follower to hold, and its answer.
struct Sent {
    vote: Vote<NodeId>,
    prev: LogId,
    /// The entries' leader (all of one append are of one term) and indexes.
    leader: CommittedLeaderId<NodeId>,
    first: u64,
    last: u64,
    /// When it was sent.
    at: Instant,
    /// `Some(true)` once the follower answered `Success`, `Some(false)` on
    /// any other answer or none.
    answer: watch::Receiver<Option<bool>>,
}

impl Sent {
    /// Whether `id` is among the ids this request checked or wrote.
    fn holds(&self, id: LogId) -> bool {
        id == self.prev
            || (id.leader_id == self.leader && (self.first..=self.last).contains(&id.index))
    }
}

impl Follower {
    /// The answer of an eager request that covers `rpc` (same vote; `rpc`'s
    /// previous and last entries both among the ids that request checked or
    /// wrote), if there is one.
    ///
    /// A `Success` to that request is a `Success` to `rpc`: the follower
    /// answers an append only after its log holds the entries durably and
    /// matches the leader's up to the last one, and `rpc` asks exactly that
    /// of a part of the same range (entries of one leader and term are the
    /// same entries wherever they are sent). It is the same fact a delayed
    /// reply would bring, and in Raft a leader may act on a delayed reply of
    /// its own term. Only `rpc`'s commit index is not delivered, which
    /// openraft sends again with the next commit's heartbeat.
    pub(crate) fn covering(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
    ) -> Option<watch::Receiver<Option<bool>>> {
        let (Some(prev), Some(last)) = (rpc.prev_log_id, rpc.entries.last().map(|e| e.log_id))
        else {
            return None;
        };
        let sent = self.sent.lock().ok()?;
        let s = sent.as_ref()?;
        let inside = |id: LogId| id.leader_id == s.leader && (s.first..=s.last).contains(&id.index);
        let covered =
            rpc.vote == s.vote && s.holds(prev) && inside(last) && last.index > prev.index;
        covered.then(|| s.answer.clone())
    }

    /// Whether the empty append `rpc` may be answered `Success` without
    /// sending it: the last eager request to this follower, sent less than
    /// [`NOTICE_RECENT`] before `now` in the same vote, checked or wrote
    /// `rpc`'s previous entry and was answered `Success`. That answer says
    /// the follower durably holds and matches the leader's log up to that
    /// entry, which is what a `Success` to `rpc` would say.
    pub(crate) fn spares(&self, rpc: &AppendEntriesRequest<TypeConfig>, now: Instant) -> bool {
        let Some(prev) = rpc.prev_log_id.filter(|_| rpc.entries.is_empty()) else {
            return false;
        };
        let Ok(sent) = self.sent.lock() else {
            return false;
        };
        sent.as_ref().is_some_and(|s| {
            rpc.vote == s.vote
                && s.holds(prev)
                && now.saturating_duration_since(s.at) < NOTICE_RECENT
                && *s.answer.borrow() == Some(true)
        })
    }

    /// Keeps `rpc` (answered here) to deliver its commit index later; true
    /// if the caller is to schedule the delivery ([`Follower::due`] after
    /// [`NOTICE_DELAY`]), false if one is already scheduled.
    pub(crate) fn defer(&self, rpc: AppendEntriesRequest<TypeConfig>) -> bool {
        let Ok(mut n) = self.notices.lock() else {
            return false;
        };
        if n.pending
            .as_ref()
            .is_none_or(|p| p.leader_commit <= rpc.leader_commit)
        {
            n.pending = Some(rpc);
        }
        !std::mem::replace(&mut n.scheduled, true)
    }

    /// The deferred notice to send now, unless what it carries reached the
    /// follower meanwhile (counted as carried from here on).
    pub(crate) fn due(&self) -> Option<AppendEntriesRequest<TypeConfig>> {
        let mut n = self.notices.lock().ok()?;
        n.scheduled = false;
        let rpc = n.pending.take()?;
        if rpc.leader_commit <= n.carried {
            return None;
        }
        n.carried = rpc.leader_commit;
        Some(rpc)
    }

    /// Records that `commit` went to the follower (in an eager request).
    fn carry(&self, commit: Option<LogId>) {
        if let Ok(mut n) = self.notices.lock() {
            n.carried = n.carried.max(commit);
        }
    }

    /// A notice sent by itself was not answered `Success`: no empty append
    /// is answered here until the next eager request is.
    pub(crate) fn doubt(&self) {
        if let Ok(mut sent) = self.sent.lock() {
            *sent = None;
        }
    }
}

/// Waits up to `wait` for an eager request's answer: whether it was
/// `Success`.
pub(crate) async fn succeeded(mut answer: watch::Receiver<Option<bool>>, wait: Duration) -> bool {
    matches!(
        tokio::time::timeout(wait, answer.wait_for(|a| a.is_some())).await,
        Ok(Ok(a)) if *a == Some(true)
    )
}

/// A follower claimed for one eager request, at `addr`; released (free for
/// the next one) when dropped.
struct Claim {
    follower: Arc<Follower>,
    addr: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.follower.eager.store(false, Ordering::Release);
    }
}

impl Eager {
    pub(crate) fn new(group: u32, me: NodeId, peers: Arc<Peers>) -> Eager {
        Eager {
            group,
            me,
            peers,
            server: OnceLock::new(),
            last: Mutex::new(None),
            followers: Mutex::new(HashMap::new()),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            committed: Mutex::new(None),
            spared: AtomicU64::new(0),
        }
    }

    /// Records the commit index this node saved.
    pub(crate) fn set_committed(&self, committed: Option<LogId>) {
        if let Ok(mut c) = self.committed.lock() {
            *c = committed;
        }
    }

    fn committed(&self) -> Option<LogId> {
        self.committed.lock().ok().and_then(|c| *c)
    }

    /// Empty appends answered here instead of sent, since start.
    pub(crate) fn spared(&self) -> u64 {
        self.spared.load(Ordering::Relaxed)
    }

    /// Counts one empty append answered here.
    pub(crate) fn count_spared(&self) {
        self.spared.fetch_add(1, Ordering::Relaxed);
    }

    /// Eager requests sent since start (one per follower and batch).
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// openraft append requests that an eager request's answer stood in
    /// for, since start.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Counts one openraft request answered by an eager request's answer.
    pub(crate) fn count_answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// The pipeline state of follower `target`.
    pub(crate) fn follower(&self, target: NodeId) -> Arc<Follower> {
        match self.followers.lock() {
            Ok(mut m) => m.entry(target).or_default().clone(),
            // Poisoned: `claims` sends nothing any more; this state is kept
            // but never read.
            Err(_) => Arc::default(),
        }
    }

    /// Connects the group's metrics (the group's Raft exists only after its
    /// log store).
    pub(crate) fn watch(&self, server: watch::Receiver<ServerMetrics>) {
        let _ = self.server.set(server);
    }

    /// The last appended entry's id, if this log knows it.
    pub(crate) fn last(&self) -> Option<LogId> {
        self.last.lock().ok().and_then(|l| *l)
    }

    /// Records the id of the entry now last in the log (`None`: unknown).
    pub(crate) fn set_last(&self, id: Option<LogId>) {
        if let Ok(mut l) = self.last.lock() {
            *l = id;
        }
    }

    /// The voters to send `entries` to, each claimed, if this node leads the
    /// term the entries were written in and the voter's pipeline is idle.
    fn claims(&self, entries: &[Entry]) -> Vec<Claim> {
        let (Some(server), Some(first)) = (self.server.get(), entries.first()) else {
            return Vec::new();
        };
        let m = server.borrow();
        let leads = m.state == ServerState::Leader
            && m.vote.is_committed()
            && m.vote.leader_id() == &first.log_id.leader_id
            && self.is_own(first);
        if !leads {
            return Vec::new();
        }
        let Ok(mut followers) = self.followers.lock() else {
            return Vec::new();
        };
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter(|id| *id != self.me)
            .filter_map(|id| {
                let f = followers.entry(id).or_default();
                let idle = f.appending.load(Ordering::Acquire) == 0
                    && !f.eager.swap(true, Ordering::AcqRel);
                // From here the claim releases the follower when dropped.
                let mut claim = idle.then(|| Claim {
                    follower: f.clone(),
                    addr: String::new(),
                })?;
                claim.addr = membership.get_node(&id)?.addr.clone();
                Some(claim)
            })
            .collect()
    }

    /// Whether `entry` is this node's own (it proposed it as leader).
    pub(crate) fn is_own(&self, entry: &Entry) -> bool {
        entry.log_id.leader_id.voted_for() == Some(self.me)
    }

    /// Posts `entries` (just written to this node's log) to the followers,
    /// if this node leads their term; `prev` gives the id of the entry before
    /// an index (`None`: unknown, nothing is sent). Gives the entries back.
    pub(crate) fn post(
        &self,
        entries: Vec<Entry>,
        prev: impl FnOnce(u64) -> Option<LogId>,
    ) -> Vec<Entry> {
        let Some(first) = entries.first() else {
            return entries;
        };
        if entries.iter().map(approx_size).sum::<usize>() > MAX_EAGER_BYTES {
            return entries;
        }
        let claims = self.claims(&entries);
        if claims.is_empty() {
            return entries;
        }
        let Some(prev_log_id) = prev(first.log_id.index) else {
            return entries;
        };
        let vote = Vote::new_committed(first.log_id.leader_id.term, self.me);
        let (leader, first_index) = (first.log_id.leader_id, first.log_id.index);
        let last_index = entries.last().map_or(first_index, |e| e.log_id.index);
        // The commit index rides along (a follower takes at most the last
        // entry it accepted from this leader): see "Commit notices" above.
        let leader_commit = self.committed();
        let req: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
            vote,
            prev_log_id: Some(prev_log_id),
            entries,
            leader_commit,
        };
        let payload = match bincode::serialize(&req) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("group {}: eager append not encoded: {e}", self.group);
                return req.entries;
            }
        };
        for claim in claims {
            let request = RaftRequest {
                group: self.group,
                kind: RaftKind::AppendEntries as i32,
                payload: payload.clone(),
                from: self.me,
            };
            let peers = self.peers.clone();
            let (answer, answered) = watch::channel(None);
            if let Ok(mut sent) = claim.follower.sent.lock() {
                *sent = Some(Sent {
                    vote,
                    prev: prev_log_id,
                    leader,
                    first: first_index,
                    last: last_index,
                    at: Instant::now(),
                    answer: answered,
                });
            }
            claim.follower.carry(leader_commit);
            self.sent.fetch_add(1, Ordering::Relaxed);
            // The answer frees the follower for the next eager request, and
            // answers openraft's own request for these entries if that
            // comes (see `Follower::covering`).
            tokio::spawn(async move {
                let reply = peers.call_streamed(&claim.addr, request, EAGER_TTL).await;
                let _ = answer.send(Some(is_success(&reply)));
                if reply.is_err() {
                    tokio::time::sleep(EAGER_BACKOFF).await;
                }
                drop(claim);
            });
        }
        req.entries
    }
}

/// Whether a peer's reply to an append request is `Success`.
pub(crate) fn is_success<E>(reply: &Result<Vec<u8>, E>) -> bool {
    reply.as_ref().is_ok_and(|raw| {
        matches!(
            bincode::deserialize::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(raw),
            Ok(Ok(AppendEntriesResponse::Success))
        )
    })
}

/// An entry's encoded size, roughly (for the size limit).
fn approx_size(e: &Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(c) => c.0.len() + 48,
        openraft::EntryPayload::Blank => 48,
        openraft::EntryPayload::Membership(_) => 512,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(term: u64, leader: NodeId, index: u64) -> LogId {
        openraft::LogId::new(CommittedLeaderId::new(term, leader), index)
    }

    /// A follower that was sent entries 11..=14 of term 3 (leader 1), after
    /// entry 10 of term 2.
    fn follower() -> (Follower, watch::Sender<Option<bool>>) {
        let (tx, rx) = watch::channel(None);
        let f = Follower::default();
        *f.sent.lock().unwrap() = Some(Sent {
            vote: Vote::new_committed(3, 1),
            prev: id(2, 2, 10),
            leader: CommittedLeaderId::new(3, 1),
            first: 11,
            last: 14,
            at: Instant::now(),
            answer: rx,
        });
        (f, tx)
    }

    fn rpc(vote: Vote<NodeId>, prev: LogId, entries: &[LogId]) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote,
            prev_log_id: Some(prev),
            entries: entries
                .iter()
                .map(|l| Entry {
                    log_id: *l,
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(id(2, 2, 10)),
        }
    }

    #[test]
    fn an_eager_answer_covers_only_requests_inside_what_it_checked_and_wrote() {
        let (f, _tx) = follower();
        let v = Vote::new_committed(3, 1);
        let covers = |r: &AppendEntriesRequest<TypeConfig>| f.covering(r).is_some();
        // The same range, a prefix of it, a later part of it.
        assert!(covers(&rpc(
            v,
            id(2, 2, 10),
            &[id(3, 1, 11), id(3, 1, 12), id(3, 1, 13), id(3, 1, 14)]
        )));
        assert!(covers(&rpc(v, id(2, 2, 10), &[id(3, 1, 11)])));
        assert!(covers(&rpc(v, id(3, 1, 12), &[id(3, 1, 13), id(3, 1, 14)])));
        // Beyond the last entry sent, before the checked previous entry,
        // a previous entry of another term, another vote, no entries.
        assert!(!covers(&rpc(
            v,
            id(2, 2, 10),
            &[id(3, 1, 11), id(3, 1, 15)]
        )));
        assert!(!covers(&rpc(v, id(2, 2, 9), &[id(2, 2, 10), id(3, 1, 11)])));
        assert!(!covers(&rpc(v, id(1, 2, 10), &[id(3, 1, 11)])));
        assert!(!covers(&rpc(
            Vote::new_committed(4, 1),
            id(2, 2, 10),
            &[id(3, 1, 11)]
        )));
        assert!(!covers(&rpc(v, id(2, 2, 10), &[])));
        // Entries of the same indexes written by another leader.
        assert!(!covers(&rpc(v, id(2, 2, 10), &[id(3, 2, 11)])));
    }

    fn empty(vote: Vote<NodeId>, prev: LogId, commit: LogId) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote,
            prev_log_id: Some(prev),
            entries: Vec::new(),
            leader_commit: Some(commit),
        }
    }

    #[test]
    fn only_a_recent_eager_success_spares_an_empty_append() {
        let (f, tx) = follower();
        let v = Vote::new_committed(3, 1);
        let now = Instant::now();
        let notice = empty(v, id(3, 1, 14), id(3, 1, 14));
        // No answer yet, then a failure: sent.
        assert!(!f.spares(&notice, now));
        tx.send(Some(false)).unwrap();
        assert!(!f.spares(&notice, now));
        tx.send(Some(true)).unwrap();
        // Its previous entry checked or written by the answered request.
        assert!(f.spares(&notice, now));
        assert!(f.spares(&empty(v, id(2, 2, 10), id(2, 2, 10)), now));
        assert!(f.spares(&empty(v, id(3, 1, 12), id(3, 1, 12)), now));
        // Beyond what the follower confirmed, another term's entry,
        // another vote, too long after the request, or carrying entries.
        assert!(!f.spares(&empty(v, id(3, 1, 15), id(3, 1, 14)), now));
        assert!(!f.spares(&empty(v, id(2, 2, 11), id(2, 2, 10)), now));
        assert!(!f.spares(
            &empty(Vote::new_committed(4, 1), id(3, 1, 14), id(3, 1, 14)),
            now
        ));
        assert!(!f.spares(&notice, now + NOTICE_RECENT));
        assert!(!f.spares(&rpc(v, id(3, 1, 12), &[id(3, 1, 13)]), now));
        // Once a notice sent by itself failed, nothing is spared.
        f.doubt();
        assert!(!f.spares(&notice, now));
    }

    #[test]
    fn a_deferred_notice_goes_unless_its_commit_was_carried() {
        let (f, _tx) = follower();
        let v = Vote::new_committed(3, 1);
        // The first deferral schedules a delivery, the next ones join it;
        // the newest commit index is the one delivered.
        assert!(f.defer(empty(v, id(3, 1, 14), id(3, 1, 12))));
        assert!(!f.defer(empty(v, id(3, 1, 14), id(3, 1, 13))));
        assert_eq!(f.due().map(|r| r.leader_commit), Some(Some(id(3, 1, 13))));
        // Delivered: not again; a later one schedules a new delivery.
        assert!(f.due().is_none());
        assert!(f.defer(empty(v, id(3, 1, 14), id(3, 1, 13))));
        assert!(f.due().is_none(), "its commit index was delivered already");
        // An eager request carried a newer commit index meanwhile.
        assert!(f.defer(empty(v, id(3, 1, 14), id(3, 1, 14))));
        f.carry(Some(id(3, 1, 14)));
        assert!(f.due().is_none());
        // One newer than the carried one still goes.
        assert!(f.defer(empty(v, id(3, 1, 14), id(4, 1, 15))));
        assert!(f.due().is_some());
    }

    #[tokio::test]
    async fn only_a_success_answers_for_the_request() {
        let (f, tx) = follower();
        let r = rpc(Vote::new_committed(3, 1), id(2, 2, 10), &[id(3, 1, 11)]);
        let wait = Duration::from_millis(50);
        // No answer yet: gives up after the wait.
        assert!(!succeeded(f.covering(&r).unwrap(), wait).await);
        tx.send(Some(false)).unwrap();
        assert!(!succeeded(f.covering(&r).unwrap(), wait).await);
        tx.send(Some(true)).unwrap();
        assert!(succeeded(f.covering(&r).unwrap(), wait).await);
        // The sender gone without an answer: not a success.
        let (f, tx) = follower();
        drop(tx);
        assert!(!succeeded(f.covering(&r).unwrap(), wait).await);
    }
}
