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
//! raft stream, and does not wait for the reply. A follower handles it like
//! any append: Raft's append is idempotent (entries it already has are
//! skipped; a conflicting suffix is replaced by the leader's, which is what
//! openraft's own request would do too), so its fsync now overlaps the
//! leader's, and when openraft's request arrives the entries are already
//! there and durable and it is answered at once. The reply to the eager
//! request is dropped: only openraft's own replication moves the leader's
//! view of a follower, so nothing about when an entry commits changes.
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
//! with this gate: one client +9-13 % sends/s and p50 -10 %; 16 clients
//! -5-7 % (the nodes are CPU-bound there, yet pipelines are idle often
//! enough for the second copy to go); 256 clients unchanged within noise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use natter_proto::cluster::{RaftKind, RaftRequest};
use openraft::metrics::RaftServerMetrics;
use openraft::raft::AppendEntriesRequest;
use openraft::ServerState;
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
}

/// One follower's pipeline, as seen from the leader.
#[derive(Default)]
pub(crate) struct Follower {
    /// openraft's append requests with entries to it awaiting an answer
    /// (counted by the group's network connection).
    pub(crate) appending: AtomicUsize,
    /// Whether an eager request to it awaits its answer.
    eager: AtomicBool,
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
        }
    }

    /// Eager requests sent since start (one per follower and batch).
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
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
            && first.log_id.leader_id.voted_for() == Some(self.me);
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
        let vote = openraft::Vote::new_committed(first.log_id.leader_id.term, self.me);
        let req: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
            vote,
            prev_log_id: Some(prev_log_id),
            entries,
            leader_commit: None,
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
            self.sent.fetch_add(1, Ordering::Relaxed);
            // The answer only frees the follower for the next eager request:
            // openraft learns the follower's state from its own requests.
            tokio::spawn(async move {
                if peers
                    .call_streamed(&claim.addr, request, EAGER_TTL)
                    .await
                    .is_err()
                {
                    tokio::time::sleep(EAGER_BACKOFF).await;
                }
                drop(claim);
            });
        }
        req.entries
    }
}

/// An entry's encoded size, roughly (for the size limit).
fn approx_size(e: &Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(c) => c.0.len() + 48,
        openraft::EntryPayload::Blank => 48,
        openraft::EntryPayload::Membership(_) => 512,
    }
}
