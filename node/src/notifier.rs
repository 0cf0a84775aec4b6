//! The notifier: one loop per data shard, active while this node leads it
//! (next to the outbox worker), draining the shard's durable notification
//! queue (`PendingNotifications`, model module `notify`).
//!
//! For each pending notification:
//! * the user has a device online (this node, the user shard's leader,
//!   holds the presence leases): dropped — they got the message live;
//! * otherwise: an HMAC-SHA256-signed webhook POST (`--webhook-url`,
//!   `--webhook-secret`), retried with exponential backoff and jitter on a
//!   non-2xx answer, an error or a timeout, and given up only if the user
//!   comes online meanwhile or this node stops leading the shard;
//! * then `AckNotifications` (a Raft command) deletes the row.
//!
//! So delivery is at least once, with a stable delivery id (the
//! notification's deterministic id, header `X-Natter-Delivery`) for the
//! receiver to drop duplicates, and exactly once when no leader crashes or
//! changes between a 2xx and its ack.
//!
//! After gaining leadership the loop waits one presence lease before
//! sending: the routers' renewals rebuild the leases meanwhile, so online
//! users are not notified. Without `--webhook-url` every notification is
//! dropped (acked) as it comes.
//!
//! Most rows this loop would drop are never written: the leader proposing
//! an `ApplyFeedUpdates` stamps into it the users it sees online and whether
//! it has a webhook (`api::Stamper`), and the state machine enqueues nothing
//! for those. What still reaches the queue for an online user (a leader new
//! to its leases, a user who came online since) is dropped here.
//!
//! Rounds are at least [`ROUND_GAP`] apart: a webhook hears of a
//! notification up to that much later, and the queue is scanned a few times
//! a second instead of once per applied command.
//!
//! Bounded: at most [`MAX_IN_FLIGHT`] notifications per shard in memory and
//! [`MAX_CONCURRENT_POSTS`] POSTs at once per node.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use hmac::{Hmac, Mac};
use natter_model::pb;
use natter_raft_store::{Consistency, RaftHost};
use prost::Message;
use rand::Rng;
use sha2::Sha256;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::{now_ms, stamp_query, Stamper};
use crate::events::Events;
use crate::presence::Presence;
use crate::remote::Remote;

/// Notifications of one shard being delivered at once, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// Webhook POSTs in progress at once per node, at most.
pub const MAX_CONCURRENT_POSTS: usize = 16;
/// Rows read per query.
const PAGE: u32 = 256;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Longest sleep when nothing happens.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// Shortest time between two rounds. A round scans the queue from its
/// start, stepping over the tombstone of every row acked since the last
/// compaction, and acks with a Raft command: one round per applied change
/// (hundreds a second under load) made this loop a third of a leader's CPU.
/// Waiting gathers the changes of that moment into one round, and adds at
/// most this much to a webhook's delay.
const ROUND_GAP: Duration = Duration::from_millis(100);

/// Where and how notifications are POSTed.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
    /// Per attempt.
    pub timeout: Duration,
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + tag.len() * 2);
    hex.push_str("sha256=");
    for b in tag {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The webhook's JSON body.
pub fn body(n: &pb::Notification) -> Vec<u8> {
    let kind = match pb::ConversationKind::try_from(n.kind) {
        Ok(pb::ConversationKind::Direct) => "direct",
        Ok(pb::ConversationKind::Group) => "group",
        _ => "unknown",
    };
    serde_json::json!({
        "id": n.id,
        "user_id": n.user_id,
        "conversation_id": n.conversation_id,
        "conversation_kind": kind,
        "title": n.title,
        "seq": n.seq,
        "sender_id": n.sender_id,
        "preview": n.preview,
        "created_at_ms": n.created_at_ms,
    })
    .to_string()
    .into_bytes()
}

struct Shared {
    host: Arc<RaftHost>,
    remote: Remote,
    presence: Arc<Presence>,
    webhook: Option<Webhook>,
    http: reqwest::Client,
    posts: Semaphore,
}

pub fn spawn(
    host: Arc<RaftHost>,
    events: Events,
    presence: Arc<Presence>,
    stamper: Stamper,
    webhook: Option<Webhook>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let http = reqwest::Client::builder()
        .timeout(
            webhook
                .as_ref()
                .map_or(Duration::from_secs(10), |w| w.timeout),
        )
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("natter-notifier/1")
        .build()?;
    if webhook.is_none() {
        tracing::info!("no --webhook-url: offline notifications are dropped");
    }
    let shared = Arc::new(Shared {
        remote: Remote::new(host.clone(), events, stamper),
        host: host.clone(),
        presence,
        webhook,
        http,
        posts: Semaphore::new(MAX_CONCURRENT_POSTS),
    });
    Ok(crate::shards::spawn_per_shard(
        host,
        stop.clone(),
        move |shard| ShardNotifier::new(shared.clone(), shard).run(stop.clone()),
    ))
}

/// (user, conversation, seq).
type Key = (String, String, u64);

fn key_of(n: &pb::Notification) -> Key {
    (n.user_id.clone(), n.conversation_id.clone(), n.seq)
}

struct ShardNotifier {
    shared: Arc<Shared>,
    shard: u32,
    leader_since: Option<Instant>,
    last_round: Option<Instant>,
    in_flight: HashMap<Key, JoinHandle<()>>,
    /// Delivered or dropped, not acked yet: not sent again.
    to_ack: HashSet<Key>,
    done_tx: mpsc::UnboundedSender<Key>,
    done_rx: mpsc::UnboundedReceiver<Key>,
}

impl ShardNotifier {
    /// The shard's loop, until `stop` or its replica leaves this node.
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let shard = self.shard;
        loop {
            if *stop.borrow() || !self.shared.host.hosts(shard) {
                self.forget();
                return;
            }
            let mut wake = IDLE_WAKE;
            if self.shared.host.is_leader(shard) {
                let since = *self.leader_since.get_or_insert_with(Instant::now);
                let lease = self.shared.presence.lease();
                if since.elapsed() >= lease {
                    self.last_round = Some(Instant::now());
                    if let Err(e) = self.round().await {
                        tracing::debug!(shard, "notifier round: {e:#}");
                        wake = Duration::from_millis(200);
                    }
                } else {
                    wake = lease.saturating_sub(since.elapsed()).min(IDLE_WAKE);
                }
            } else {
                self.forget();
            }
            tokio::select! {
                _ = self.shared.host.wait_applied_change(shard, wake) => {}
                Some(d) = self.done_rx.recv() => self.finished(d),
                r = stop.changed() => if r.is_err() { self.forget(); return },
            }
            // Woken: let what happens in the rest of the gap join the round.
            let left = self
                .last_round
                .map_or(Duration::ZERO, |t| ROUND_GAP.saturating_sub(t.elapsed()));
            if !left.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(left) => {}
                    r = stop.changed() => if r.is_err() { self.forget(); return },
                }
            }
        }
    }

    fn new(shared: Arc<Shared>, shard: u32) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        ShardNotifier {
            shared,
            shard,
            leader_since: None,
            last_round: None,
            in_flight: HashMap::new(),
            to_ack: HashSet::new(),
            done_tx,
            done_rx,
        }
    }

    /// Not the leader (any more): stop sending; whoever leads redelivers
    /// what is not acked.
    fn forget(&mut self) {
        self.leader_since = None;
        for (_, t) in self.in_flight.drain() {
            t.abort();
        }
        self.to_ack.clear();
        while self.done_rx.try_recv().is_ok() {}
    }

    fn finished(&mut self, k: Key) {
        if self.in_flight.remove(&k).is_some() {
            self.to_ack.insert(k);
        }
    }

    async fn pending(&self, after: Vec<u8>) -> Result<pb::NotificationBatch> {
        let q = pb::Query {
            now_ms: 0,
            q: Some(pb::query::Q::PendingNotifications(
                pb::PendingNotifications {
                    limit: PAGE,
                    after,
                    user_id: String::new(),
                },
            )),
        }
        .encode_to_vec();
        let (raw, _) = self
            .shared
            .host
            .read(self.shard, &stamp_query(&q, now_ms())?, Consistency::Stale)
            .await?;
        match pb::Response::decode(raw.as_slice())?.r {
            Some(pb::response::R::Notifications(b)) => Ok(b),
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }

    async fn round(&mut self) -> Result<()> {
        while let Ok(k) = self.done_rx.try_recv() {
            self.finished(k);
        }
        let mut after = Vec::new();
        loop {
            let batch = self.pending(after).await?;
            for n in batch.notifications {
                let k = key_of(&n);
                if self.in_flight.contains_key(&k) || self.to_ack.contains(&k) {
                    continue;
                }
                if self.shared.webhook.is_none()
                    || self.shared.presence.is_online(self.shard, &n.user_id)
                {
                    tracing::debug!(id = %n.id, "user online (or no webhook): notification dropped");
                    self.to_ack.insert(k);
                    continue;
                }
                if self.in_flight.len() >= MAX_IN_FLIGHT {
                    break;
                }
                let task = tokio::spawn(deliver(
                    self.shared.clone(),
                    self.shard,
                    n,
                    self.done_tx.clone(),
                ));
                self.in_flight.insert(k, task);
            }
            if !batch.has_more || self.in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            after = batch.next_after;
        }
        self.flush_acks().await
    }

    async fn flush_acks(&mut self) -> Result<()> {
        if self.to_ack.is_empty() {
            return Ok(());
        }
        let keys: Vec<Key> = self
            .to_ack
            .iter()
            .take(natter_model::MAX_BATCH)
            .cloned()
            .collect();
        let cmd = pb::Command {
            stamp: None,
            op: Some(pb::command::Op::AckNotifications(pb::AckNotifications {
                keys: keys
                    .iter()
                    .map(|(u, c, s)| pb::NotificationKey {
                        user_id: u.clone(),
                        conversation_id: c.clone(),
                        seq: *s,
                    })
                    .collect(),
            })),
        }
        .encode_to_vec();
        let raw = self.shared.remote.propose(self.shard, &cmd).await?;
        match pb::Response::decode(raw.as_slice())?.r {
            Some(pb::response::R::NotificationsAcked(_)) => {
                for k in keys {
                    self.to_ack.remove(&k);
                }
                Ok(())
            }
            other => Err(anyhow!("ack refused: {other:?}")),
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// POSTs one notification until a 2xx (then reports it done), or until the
/// user is online (reported done too: dropped). Aborted when this node
/// stops leading the shard.
async fn deliver(
    shared: Arc<Shared>,
    shard: u32,
    n: pb::Notification,
    done: mpsc::UnboundedSender<Key>,
) {
    let Some(hook) = shared.webhook.clone() else {
        let _ = done.send(key_of(&n));
        return;
    };
    let body = body(&n);
    let mut backoff = BACKOFF_START;
    let mut attempt: u32 = 0;
    loop {
        if shared.presence.is_online(shard, &n.user_id) {
            tracing::debug!(id = %n.id, "user came online: notification dropped");
            break;
        }
        attempt += 1;
        let outcome = {
            let _permit = shared.posts.acquire().await;
            let ts = unix_secs().to_string();
            let sig = signature(hook.secret.as_bytes(), &ts, &body);
            shared
                .http
                .post(&hook.url)
                .header("content-type", "application/json")
                .header("x-natter-signature", sig)
                .header("x-natter-delivery", &n.id)
                .header("x-natter-timestamp", ts)
                .header("x-natter-attempt", attempt.to_string())
                .body(body.clone())
                .send()
                .await
        };
        match outcome {
            Ok(r) if r.status().is_success() => {
                tracing::debug!(id = %n.id, attempt, "notification delivered");
                break;
            }
            Ok(r) => {
                tracing::info!(id = %n.id, attempt, status = %r.status(), "webhook refused; retrying")
            }
            Err(e) => tracing::info!(id = %n.id, attempt, "webhook failed: {e}; retrying"),
        }
        // Full jitter in [backoff/2, backoff].
        let half = backoff.as_millis() as u64 / 2;
        let wait = Duration::from_millis(half + rand::thread_rng().gen_range(0..=half));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    let _ = done.send(key_of(&n));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // The hmac crate against the well-known vector.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"key").unwrap();
        mac.update(b"The quick brown fox jumps over the lazy dog");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            want,
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        // Our framing: "<ts>.<body>".
        let s = signature(b"key", "The quick brown fox", b"jumps over the lazy dog");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"key").unwrap();
        mac.update(b"The quick brown fox.jumps over the lazy dog");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("sha256={hex}"));
    }

    #[test]
    fn body_names_every_field() {
        let n = pb::Notification {
            id: "i".into(),
            user_id: "u".into(),
            conversation_id: "c".into(),
            seq: 7,
            sender_id: "s".into(),
            preview: "hi \"you\"".into(),
            kind: pb::ConversationKind::Direct as i32,
            title: String::new(),
            created_at_ms: 5,
            enqueued_at_ms: 6,
        };
        let v: serde_json::Value = serde_json::from_slice(&body(&n)).unwrap();
        assert_eq!(v["id"], "i");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["preview"], "hi \"you\"");
        assert_eq!(v["conversation_kind"], "direct");
    }
}
