//! Presence: soft state, never replicated.
//!
//! Routers report which users have devices connected to them
//! (`ReportPresence`), to the leader of each user's shard. The leader keeps
//! a lease per (user, router) in memory; a user is online while any lease
//! runs. Routers renew every lease well before it ends (a third of it) and
//! report a connect or the last disconnect at once. When a user's first
//! lease starts or last one ends (reported, or expired because a router
//! died), the leader publishes an ephemeral `presence` event on its Watch
//! streams and, going offline, proposes `RecordLastSeen` so last seen is
//! durable. A node that stops leading a shard forgets that shard's leases;
//! the new leader learns them again from the routers' renewals (so for up
//! to one lease after a leader change a user may look offline: the
//! notifier waits that long before sending anything).
//!
//! Typing indicators are published here too: an ephemeral event on this
//! node's Watch streams, sent by the conversation shard's leader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natter_model::pb;
use natter_proto::cluster::{ChangeEvent, NotLeader, TypingEvent, UserPresence};
use natter_raft_store::{Consistency, RaftHost};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{now_ms, stamp_query, Stamper};
use crate::events::Events;
use crate::remote::Remote;

/// Users named in one report or query, at most.
pub const MAX_USERS_PER_CALL: usize = 10_000;
/// Users with a lease on one node, at most (memory bound); reports beyond
/// it are ignored (those users look offline).
pub const MAX_USERS: usize = 1_000_000;
/// Routers holding a lease for one user, at most.
const MAX_ROUTERS_PER_USER: usize = 64;
/// How often expired leases are swept.
const SWEEP: Duration = Duration::from_millis(500);
/// Last-seen writes waiting to be proposed, at most (beyond: dropped; last
/// seen is then a little older).
const LAST_SEEN_QUEUE: usize = 4096;
/// Tries of one last-seen write (backing off 0.2 s, 0.4 s, ...: ~6 s in all,
/// a few elections).
const LAST_SEEN_ATTEMPTS: u32 = 5;

/// user → router → lease end.
type Leases = HashMap<String, HashMap<String, Instant>>;

pub struct Presence {
    host: Arc<RaftHost>,
    events: Events,
    lease: Duration,
    /// shard → leases of its users.
    table: Mutex<HashMap<u32, Leases>>,
    users: std::sync::atomic::AtomicUsize,
    last_seen: tokio::sync::mpsc::Sender<(u32, String)>,
    /// Users gone offline whose last seen is not recorded yet → when.
    recent: Mutex<HashMap<String, u64>>,
    last_seen_rx: Mutex<Option<tokio::sync::mpsc::Receiver<(u32, String)>>>,
}

fn not_leader(host: &RaftHost, shard: u32) -> NotLeader {
    let (leader_id, leader_addr) = host.leader(shard).unwrap_or((0, String::new()));
    NotLeader {
        leader_id,
        leader_addr,
    }
}

impl Presence {
    pub fn new(host: Arc<RaftHost>, events: Events, lease: Duration) -> Arc<Presence> {
        let (tx, rx) = tokio::sync::mpsc::channel(LAST_SEEN_QUEUE);
        Arc::new(Presence {
            host,
            events,
            lease,
            table: Mutex::new(HashMap::new()),
            users: Default::default(),
            last_seen: tx,
            recent: Mutex::new(HashMap::new()),
            last_seen_rx: Mutex::new(Some(rx)),
        })
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn publish(&self, shard: u32, presence: Vec<UserPresence>) {
        if presence.is_empty() {
            return;
        }
        self.events.publish_ephemeral(ChangeEvent {
            shard,
            presence,
            ..Default::default()
        });
    }

    fn went_offline(&self, shard: u32, user: String, out: &mut Vec<UserPresence>) {
        let now = now_ms();
        out.push(UserPresence {
            user_id: user.clone(),
            online: false,
            last_seen_ms: now,
        });
        if let Ok(mut r) = self.recent.lock() {
            if r.len() < 2 * LAST_SEEN_QUEUE {
                r.insert(user.clone(), now);
            }
        }
        if let Err(e) = self.last_seen.try_send((shard, user)) {
            tracing::debug!(shard, "last-seen queue full: dropping one update");
            if let (Ok(mut r), tokio::sync::mpsc::error::TrySendError::Full((_, u))) =
                (self.recent.lock(), e)
            {
                r.remove(&u);
            }
        }
    }

    /// When a user went offline, if not yet recorded durably.
    fn recent_offline(&self, user: &str) -> u64 {
        self.recent
            .lock()
            .ok()
            .and_then(|r| r.get(user).copied())
            .unwrap_or(0)
    }

    /// `ReportPresence`: Err when this node doesn't lead the shard.
    pub fn report(
        &self,
        shard: u32,
        router: &str,
        online: &[String],
        offline: &[String],
    ) -> Result<Duration, NotLeader> {
        if !self.host.is_leader(shard) {
            return Err(not_leader(&self.host, shard));
        }
        let until = Instant::now() + self.lease;
        let mut changes = Vec::new();
        {
            let Ok(mut t) = self.table.lock() else {
                return Ok(self.lease);
            };
            let leases = t.entry(shard).or_default();
            for u in online.iter().take(MAX_USERS_PER_CALL) {
                if !natter_model::is_canonical_uuid(u) {
                    continue;
                }
                match leases.get_mut(u) {
                    Some(routers) => {
                        if routers.len() < MAX_ROUTERS_PER_USER || routers.contains_key(router) {
                            routers.insert(router.to_string(), until);
                        }
                    }
                    None => {
                        if self.users.load(std::sync::atomic::Ordering::Relaxed) >= MAX_USERS {
                            continue;
                        }
                        self.users
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        leases.insert(u.clone(), HashMap::from([(router.to_string(), until)]));
                        changes.push(UserPresence {
                            user_id: u.clone(),
                            online: true,
                            last_seen_ms: 0,
                        });
                    }
                }
            }
            let mut gone = Vec::new();
            for u in offline.iter().take(MAX_USERS_PER_CALL) {
                match leases.get_mut(u) {
                    Some(routers) => {
                        routers.remove(router);
                        if routers.is_empty() {
                            leases.remove(u);
                            self.users
                                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                            gone.push(u.clone());
                        }
                    }
                    // No lease here: this node became the leader after the
                    // user came online (leases are not replicated). The
                    // router saw the last device go: still record it.
                    None if natter_model::is_canonical_uuid(u) => gone.push(u.clone()),
                    None => {}
                }
            }
            for u in gone {
                self.went_offline(shard, u, &mut changes);
            }
        }
        self.publish(shard, changes);
        Ok(self.lease)
    }

    /// Whether the user has a device connected to some router (as this
    /// node, the shard's leader, knows).
    pub fn is_online(&self, shard: u32, user: &str) -> bool {
        let now = Instant::now();
        self.table
            .lock()
            .ok()
            .and_then(|t| {
                t.get(&shard)
                    .and_then(|l| l.get(user))
                    .map(|r| r.values().any(|end| *end > now))
            })
            .unwrap_or(false)
    }

    /// `GetPresence`: online from the leases, last seen from the shard.
    pub async fn get(
        &self,
        shard: u32,
        users: &[String],
    ) -> Result<Result<Vec<UserPresence>, NotLeader>, tonic::Status> {
        if !self.host.is_leader(shard) {
            return Ok(Err(not_leader(&self.host, shard)));
        }
        if users.len() > MAX_USERS_PER_CALL {
            return Err(tonic::Status::invalid_argument(format!(
                "at most {MAX_USERS_PER_CALL} users"
            )));
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            if self.is_online(shard, u) {
                out.push(UserPresence {
                    user_id: u.clone(),
                    online: true,
                    last_seen_ms: now,
                });
                continue;
            }
            let q = pb::Query {
                now_ms: 0,
                q: Some(pb::query::Q::GetLastSeen(pb::GetLastSeen {
                    user_id: u.clone(),
                })),
            }
            .encode_to_vec();
            let (raw, _) = self
                .host
                .read(shard, &stamp_query(&q, now)?, Consistency::Stale)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let last_seen_ms = match pb::Response::decode(raw.as_slice()).map(|r| r.r) {
                Ok(Some(pb::response::R::LastSeen(l))) => l.last_seen_ms,
                _ => 0,
            };
            out.push(UserPresence {
                user_id: u.clone(),
                online: false,
                last_seen_ms: last_seen_ms.max(self.recent_offline(u)),
            });
        }
        Ok(Ok(out))
    }

    /// `Typing`: publishes the indicator (Err when not the leader).
    pub fn typing(&self, shard: u32, t: TypingEvent) -> Result<(), NotLeader> {
        if !self.host.is_leader(shard) {
            return Err(not_leader(&self.host, shard));
        }
        self.events.publish_ephemeral(ChangeEvent {
            shard,
            typing: vec![t],
            ..Default::default()
        });
        Ok(())
    }

    /// Drops leases of shards this node no longer leads; ends expired ones.
    fn sweep(&self) {
        let now = Instant::now();
        let mut changes: Vec<(u32, Vec<UserPresence>)> = Vec::new();
        if let Ok(mut t) = self.table.lock() {
            let mut dropped = 0;
            t.retain(|shard, leases| {
                let keep = self.host.is_leader(*shard);
                if !keep {
                    dropped += leases.len();
                }
                keep
            });
            self.users
                .fetch_sub(dropped, std::sync::atomic::Ordering::Relaxed);
            for (shard, leases) in t.iter_mut() {
                let mut gone = Vec::new();
                leases.retain(|user, routers| {
                    routers.retain(|_, end| *end > now);
                    if routers.is_empty() {
                        gone.push(user.clone());
                        false
                    } else {
                        true
                    }
                });
                if !gone.is_empty() {
                    self.users
                        .fetch_sub(gone.len(), std::sync::atomic::Ordering::Relaxed);
                    let mut out = Vec::new();
                    for u in gone {
                        self.went_offline(*shard, u, &mut out);
                    }
                    changes.push((*shard, out));
                }
            }
        }
        for (shard, c) in changes {
            self.publish(shard, c);
        }
    }

    /// The sweeper and the last-seen writer, until `stop`.
    pub fn spawn(
        self: &Arc<Presence>,
        stamper: Stamper,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let sweeper = {
            let p = self.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(SWEEP) => p.sweep(),
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        let rx = self.last_seen_rx.lock().ok().and_then(|mut r| r.take());
        let writer = {
            let remote = Remote::new(self.host.clone(), self.events.clone(), stamper);
            let p = self.clone();
            let mut stop = stop;
            tokio::spawn(async move {
                let Some(mut rx) = rx else { return };
                loop {
                    let (shard, user) = tokio::select! {
                        m = rx.recv() => match m { Some(m) => m, None => return },
                        _ = stop.changed() => return,
                    };
                    let cmd = pb::Command {
                        stamp: None,
                        op: Some(pb::command::Op::RecordLastSeen(pb::RecordLastSeen {
                            user_id: user.clone(),
                        })),
                    }
                    .encode_to_vec();
                    // A leader change loses a proposal in flight: ask again
                    // a few times (the leader stamps the time, so a retry
                    // records a moment later, never a wrong user).
                    let mut pause = Duration::from_millis(200);
                    for attempt in 1..=LAST_SEEN_ATTEMPTS {
                        match remote.propose(shard, &cmd).await {
                            Ok(_) => break,
                            Err(e) if attempt == LAST_SEEN_ATTEMPTS => {
                                tracing::warn!(shard, "recording last seen failed: {e:#}")
                            }
                            Err(e) => {
                                tracing::debug!(shard, attempt, "recording last seen: {e:#}");
                                tokio::select! {
                                    _ = tokio::time::sleep(pause) => {}
                                    _ = stop.changed() => return,
                                }
                                pause *= 2;
                            }
                        }
                    }
                    if let Ok(mut r) = p.recent.lock() {
                        r.remove(&user);
                    }
                }
            })
        };
        vec![sweeper, writer]
    }
}
