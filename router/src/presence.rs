//! Presence and cross-router typing.
//!
//! * **Reporting**: the router tells each user shard's leader which users
//!   have devices connected here (`ReportPresence`): at once when a user's
//!   first device connects or last one leaves, and every third of the lease
//!   for all of them (a renewal, which also teaches a new leader). The
//!   leader keeps the leases in memory (soft state) and publishes online /
//!   offline changes on its Watch stream, which every router reads.
//! * **Reading**: `get_presence {user_ids}` answers online and last seen of
//!   the users the caller may see — themself and their friends — and
//!   subscribes the connection to live `presence` events of those users.
//! * **Typing**: the `typing` op is sent to the conversation shard's leader
//!   (`Typing`), which publishes it on its Watch stream; every router
//!   delivers it to its devices tracking that conversation, except the
//!   typist's own. At most one per device per [`TYPING_INTERVAL`] is
//!   relayed; more are acknowledged and dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natter_model::pb::{self, query::Q, response::R};
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{
    ChangeEvent, GetPresenceRequest, NotLeader, ReportPresenceRequest, TypingEvent, TypingRequest,
    UserPresence,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cluster::{Cluster, ClusterError};
use crate::conn::Outbound;
use crate::error::{check, ApiError};

/// Users one `get_presence` may name.
pub const MAX_PRESENCE_IDS: usize = 100;
/// Users one connection may follow (`presence` events).
pub const MAX_PRESENCE_SUBS: usize = 1000;
/// Typing indicators relayed per device, at most one per this interval.
pub const TYPING_INTERVAL: Duration = Duration::from_secs(1);
/// Until a node tells the lease, renew this often.
const DEFAULT_RENEW: Duration = Duration::from_secs(5);
/// Users per `ReportPresence`.
const REPORT_BATCH: usize = 5000;
/// Deadline of one report or typing relay.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Subs {
    by_user: HashMap<String, HashSet<u64>>,
    by_dev: HashMap<u64, (Arc<Outbound>, HashSet<String>)>,
}

pub struct Presence {
    router_id: String,
    subs: Mutex<Subs>,
    typing_last: Mutex<HashMap<u64, Instant>>,
    /// (user, online) to report at once.
    changes: mpsc::UnboundedSender<(String, bool)>,
    changes_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, bool)>>>,
    /// The lease the nodes last granted, in ms (0 = not known yet).
    lease_ms: AtomicU64,
}

/// A presence's fields as the WebSocket protocol writes them.
pub fn presence_fields(p: &UserPresence) -> serde_json::Map<String, Value> {
    serde_json::Map::from_iter([
        ("user_id".to_string(), json!(p.user_id)),
        ("online".to_string(), json!(p.online)),
        ("last_seen_ms".to_string(), json!(p.last_seen_ms)),
    ])
}

/// A presence as the WebSocket protocol writes it.
pub fn presence_json(p: &UserPresence) -> Value {
    Value::Object(presence_fields(p))
}

/// Calls a shard's leader: the cached leader, then its replicas, following
/// NotLeader hints, until `deadline`.
async fn leader_call<T, F, Fut>(
    cluster: &Cluster,
    shard: u32,
    deadline: Instant,
    f: F,
) -> Result<T, ApiError>
where
    F: Fn(NodeClient<Channel>) -> Fut,
    Fut: Future<Output = Result<(Option<NotLeader>, T), tonic::Status>>,
{
    let mut backoff = Duration::from_millis(20);
    let mut last = String::from("not tried");
    loop {
        let mut queue: std::collections::VecDeque<String> =
            cluster.shard_candidates(shard).await.into();
        let mut tried = HashSet::new();
        while let Some(addr) = queue.pop_front() {
            if !tried.insert(addr.clone()) {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::Cluster(ClusterError::Timeout { shard, last }));
            }
            let client = cluster.client(&addr)?;
            match tokio::time::timeout(left.min(Duration::from_secs(3)), f(client)).await {
                Ok(Ok((None, v))) => {
                    cluster.note_leader(shard, &addr);
                    return Ok(v);
                }
                Ok(Ok((Some(nl), _))) => {
                    last = format!("{addr}: not the leader of shard {shard}");
                    if !nl.leader_addr.is_empty() {
                        cluster.note_leader(shard, &nl.leader_addr);
                        queue.push_front(nl.leader_addr);
                    }
                }
                Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(ApiError::invalid(s.message().to_string()))
                }
                Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ApiError::Cluster(ClusterError::Timeout { shard, last }));
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

async fn user_shard(cluster: &Cluster, user: &str, deadline: Instant) -> Result<u32, ApiError> {
    let n = cluster.shard_count(deadline).await?;
    Ok(natter_model::shard_of(
        &natter_model::user_route_key(user),
        n,
    ))
}

impl Presence {
    pub fn new() -> Arc<Presence> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Presence {
            router_id: uuid::Uuid::new_v4().to_string(),
            subs: Mutex::new(Subs::default()),
            typing_last: Mutex::new(HashMap::new()),
            changes: tx,
            changes_rx: Mutex::new(Some(rx)),
            lease_ms: AtomicU64::new(0),
        })
    }

    /// A user's first device connected to this router.
    pub fn user_connected(&self, user: &str) {
        let _ = self.changes.send((user.to_string(), true));
    }

    /// A user's last device on this router went away.
    pub fn user_disconnected(&self, user: &str) {
        let _ = self.changes.send((user.to_string(), false));
    }

    /// A connection ended: drop its subscriptions and typing state.
    pub fn device_gone(&self, dev: u64) {
        if let Ok(mut s) = self.subs.lock() {
            if let Some((_, users)) = s.by_dev.remove(&dev) {
                for u in users {
                    if let Some(set) = s.by_user.get_mut(&u) {
                        set.remove(&dev);
                        if set.is_empty() {
                            s.by_user.remove(&u);
                        }
                    }
                }
            }
        }
        if let Ok(mut t) = self.typing_last.lock() {
            t.remove(&dev);
        }
    }

    /// Whether this device may relay a typing indicator now (rate limit).
    pub fn typing_allowed(&self, dev: u64) -> bool {
        let Ok(mut t) = self.typing_last.lock() else {
            return false;
        };
        let now = Instant::now();
        match t.get(&dev) {
            Some(last) if now.duration_since(*last) < TYPING_INTERVAL => false,
            _ => {
                t.insert(dev, now);
                true
            }
        }
    }

    /// Sends a typing indicator to the conversation shard's leader.
    pub async fn relay_typing(
        &self,
        cluster: &Cluster,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<(), ApiError> {
        let deadline = Instant::now() + CALL_DEADLINE;
        let shard = natter_model::shard_of(
            &natter_model::conversation_route_key(conversation_id),
            cluster.shard_count(deadline).await?,
        );
        let t = TypingEvent {
            conversation_id: conversation_id.to_string(),
            user_id: user_id.to_string(),
        };
        leader_call(cluster, shard, deadline, |mut c| {
            let t = t.clone();
            async move {
                let r = c
                    .typing(TypingRequest {
                        shard,
                        typing: Some(t),
                    })
                    .await?
                    .into_inner();
                Ok((r.not_leader, ()))
            }
        })
        .await
    }

    /// `get_presence`: the caller and their friends among `user_ids`
    /// (others are left out, like unknown users), and, given a connection
    /// (`follower`: device id, its outbound queue), a subscription of it to
    /// their changes.
    pub async fn get(
        &self,
        cluster: &Cluster,
        me: &str,
        follower: Option<(u64, &Arc<Outbound>)>,
        user_ids: Vec<String>,
        deadline: Instant,
    ) -> Result<Vec<UserPresence>, ApiError> {
        if user_ids.len() > MAX_PRESENCE_IDS {
            return Err(ApiError::Model {
                code: pb::ErrorCode::LimitExceeded,
                message: format!("at most {MAX_PRESENCE_IDS} user_ids"),
            });
        }
        let mut ids: Vec<String> = Vec::new();
        for u in user_ids {
            if !natter_model::is_canonical_uuid(&u) {
                return Err(ApiError::invalid(format!(
                    "user_ids: {:?} is not a canonical lowercase uuid",
                    u.chars().take(64).collect::<String>()
                )));
            }
            if !ids.contains(&u) {
                ids.push(u);
            }
        }
        let checks = ids.iter().map(|u| async move {
            if u == me {
                return Ok::<_, ApiError>(Some(u.clone()));
            }
            let r = cluster
                .query(
                    Q::GetFriendship(pb::GetFriendship {
                        user_a: me.to_string(),
                        user_b: u.clone(),
                    }),
                    deadline,
                )
                .await?;
            match check(r)? {
                R::Friendship(f) if f.state == pb::FriendState::Accepted as i32 => {
                    Ok(Some(u.clone()))
                }
                _ => Ok(None),
            }
        });
        let visible: Vec<String> = futures::future::try_join_all(checks)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for u in &visible {
            by_shard
                .entry(user_shard(cluster, u, deadline).await?)
                .or_default()
                .push(u.clone());
        }
        if let Some((dev, out)) = follower {
            self.subscribe(dev, out, &visible)?;
        }
        let mut users = Vec::new();
        for (shard, ids) in by_shard {
            let got = leader_call(cluster, shard, deadline, |mut c| {
                let ids = ids.clone();
                async move {
                    let r = c
                        .get_presence(GetPresenceRequest {
                            shard,
                            user_ids: ids,
                        })
                        .await?
                        .into_inner();
                    Ok((r.not_leader, r.users))
                }
            })
            .await?;
            users.extend(got);
        }
        Ok(users)
    }

    fn subscribe(&self, dev: u64, out: &Arc<Outbound>, users: &[String]) -> Result<(), ApiError> {
        let mut s = self
            .subs
            .lock()
            .map_err(|_| ApiError::Unavailable("presence poisoned".into()))?;
        let entry = s
            .by_dev
            .entry(dev)
            .or_insert_with(|| (out.clone(), HashSet::new()));
        let new: Vec<&String> = users.iter().filter(|u| !entry.1.contains(*u)).collect();
        if entry.1.len() + new.len() > MAX_PRESENCE_SUBS {
            return Err(ApiError::Model {
                code: pb::ErrorCode::LimitExceeded,
                message: format!("a connection follows at most {MAX_PRESENCE_SUBS} users"),
            });
        }
        for u in &new {
            entry.1.insert((*u).clone());
        }
        for u in new {
            s.by_user.entry(u.clone()).or_default().insert(dev);
        }
        Ok(())
    }

    /// Delivers the presence changes of a Watch event to subscribers.
    pub fn on_event(&self, ev: &ChangeEvent) {
        if ev.presence.is_empty() {
            return;
        }
        let Ok(s) = self.subs.lock() else { return };
        for p in &ev.presence {
            let Some(devs) = s.by_user.get(&p.user_id) else {
                continue;
            };
            for d in devs {
                if let Some((out, _)) = s.by_dev.get(d) {
                    out.push(crate::push::Push::Presence(p.clone()));
                }
            }
        }
    }

    async fn report(
        &self,
        cluster: &Cluster,
        online: Vec<String>,
        offline: Vec<String>,
    ) -> Result<(), ApiError> {
        let deadline = Instant::now() + CALL_DEADLINE;
        let mut by_shard: BTreeMap<u32, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for u in online {
            by_shard
                .entry(user_shard(cluster, &u, deadline).await?)
                .or_default()
                .0
                .push(u);
        }
        for u in offline {
            by_shard
                .entry(user_shard(cluster, &u, deadline).await?)
                .or_default()
                .1
                .push(u);
        }
        let mut first_err = None;
        for (shard, (on, off)) in by_shard {
            for (i, chunk) in on.chunks(REPORT_BATCH).enumerate() {
                let off = if i == 0 { off.clone() } else { Vec::new() };
                let r = leader_call(cluster, shard, deadline, |mut c| {
                    let req = ReportPresenceRequest {
                        shard,
                        router_id: self.router_id.clone(),
                        online: chunk.to_vec(),
                        offline: off.clone(),
                    };
                    async move {
                        let r = c.report_presence(req).await?.into_inner();
                        Ok((r.not_leader, r.lease_ms))
                    }
                })
                .await;
                match r {
                    Ok(lease) if lease > 0 => self.lease_ms.store(lease, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if on.is_empty() && !off.is_empty() {
                let r = leader_call(cluster, shard, deadline, |mut c| {
                    let req = ReportPresenceRequest {
                        shard,
                        router_id: self.router_id.clone(),
                        online: Vec::new(),
                        offline: off.clone(),
                    };
                    async move {
                        let r = c.report_presence(req).await?.into_inner();
                        Ok((r.not_leader, ()))
                    }
                })
                .await;
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn renew_every(&self) -> Duration {
        match self.lease_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_RENEW,
            ms => Duration::from_millis(ms / 3).max(Duration::from_millis(100)),
        }
    }

    /// Reports connects and disconnects at once, and renews every
    /// connected user's lease, until `stop`. `connected` lists the users
    /// with a device here now.
    pub async fn announce(
        self: Arc<Presence>,
        cluster: Cluster,
        connected: impl Fn() -> Vec<String>,
        stop: CancellationToken,
    ) {
        let Some(mut rx) = self.changes_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut next_renew = Instant::now();
        loop {
            let wait = next_renew.saturating_duration_since(Instant::now());
            tokio::select! {
                m = rx.recv() => {
                    let Some(first) = m else { return };
                    // Coalesce what is queued: the last word per user wins.
                    let mut latest: BTreeMap<String, bool> = BTreeMap::from([first]);
                    while let Ok((u, on)) = rx.try_recv() {
                        latest.insert(u, on);
                    }
                    let (on, off): (Vec<_>, Vec<_>) = latest.into_iter().partition(|(_, on)| *on);
                    let on = on.into_iter().map(|(u, _)| u).collect();
                    let off = off.into_iter().map(|(u, _)| u).collect();
                    if let Err(e) = self.report(&cluster, on, off).await {
                        tracing::debug!("presence report failed (the next renewal repairs it): {e}");
                    }
                    // The reply may have taught a shorter lease.
                    next_renew = next_renew.min(Instant::now() + self.renew_every());
                }
                _ = tokio::time::sleep(wait) => {
                    if let Err(e) = self.report(&cluster, connected(), Vec::new()).await {
                        tracing::debug!("presence renewal failed: {e}");
                    }
                    next_renew = Instant::now() + self.renew_every();
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_is_relayed_at_most_once_a_second_per_device() {
        let p = Presence::new();
        assert!(p.typing_allowed(1));
        assert!(!p.typing_allowed(1), "a second one right away is dropped");
        assert!(p.typing_allowed(2), "the limit is per device");
        p.device_gone(1);
        assert!(p.typing_allowed(1), "a new connection starts afresh");
    }

    #[test]
    fn presence_json_has_every_field() {
        let v = presence_json(&UserPresence {
            user_id: "u".into(),
            online: false,
            last_seen_ms: 7,
        });
        assert_eq!(
            v,
            json!({"user_id": "u", "online": false, "last_seen_ms": 7})
        );
    }
}
