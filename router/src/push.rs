//! Real-time push.
//!
//! The router keeps a `Watch` stream open to every node. Events are only
//! hints ("conversation X changed", "user Y's feed changed"); what a device
//! receives always comes from delta sync on its behalf, from the device's own
//! last token, so it gets every change exactly once and in order:
//!
//! * each connected device has an actor task owning its tokens (feed token,
//!   one token per tracked conversation, 0 = "not synced yet") and a set of
//!   dirty marks the hub sets from events;
//! * the actor syncs what is dirty (paging `has_more`), pushes each non-empty
//!   page as an event carrying `from_token` and `token`, and advances the
//!   token; a conversation without a token gets a cold start first;
//! * the set of conversations a device tracks is its user's feed (read at
//!   resume), kept current by feed deltas (new rows are tracked, removed ones
//!   dropped) plus the conversations the client resumed with;
//! * a lagged or reconnected Watch stream makes every device resync
//!   (feed delta and every conversation it holds a token for).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natter_model::pb::{self, query::Q, response::R, ErrorCode};
use natter_proto::cluster::{ChangeEvent, ChangeKind, Consistency, WatchRequest};
use prost::Message as _;
use serde_json::{json, Map, Value};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::conn::Outbound;
use crate::error::{check, ApiError};
use crate::json;

/// Most conversations one device tracks for push.
pub const MAX_TRACKED: usize = 10_000;
/// Feed rows per page the router reads on a device's behalf.
const FEED_PAGE: u32 = 500;
/// Cluster reads the hub runs at once for all devices together.
const SYNC_CONCURRENCY: usize = 32;
/// Sends held per conversation and device between two rounds of its
/// actor; past that the device syncs (reads) instead.
const MAX_SENT_HELD: usize = 64;

/// A `resume` request: the client's tokens.
#[derive(Debug, Default, Clone)]
pub struct Resume {
    pub feed_token: u64,
    pub conversations: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Dirty {
    resumes: Vec<Resume>,
    feed: bool,
    /// The highest feed version an event named, when every feed mark named
    /// one (0: some reason to sync the feed came without a version).
    feed_at: u64,
    all: bool,
    /// Conversation → highest version an event named (0 = unknown).
    convs: BTreeMap<String, u64>,
    /// Conversation → the sends events carried since the last round (at
    /// most [`MAX_SENT_HELD`]), to push without a read when they continue
    /// the device's token.
    sent: HashMap<String, Vec<Arc<pb::SendResult>>>,
}

impl Dirty {
    /// The feed changed, at `version` (0 = unknown).
    fn mark_feed(&mut self, version: u64) {
        self.feed_at = if !self.feed {
            version
        } else if self.feed_at == 0 || version == 0 {
            0
        } else {
            self.feed_at.max(version)
        };
        self.feed = true;
    }

    fn is_empty(&self) -> bool {
        self.resumes.is_empty() && !self.feed && !self.all && self.convs.is_empty()
    }
}

/// One connected device (one WebSocket).
pub struct Device {
    pub id: u64,
    pub user_id: String,
    pub token_hash: [u8; 32],
    pub out: Arc<Outbound>,
    dirty: Mutex<Dirty>,
    wake: Notify,
}

impl Device {
    fn mark(&self, f: impl FnOnce(&mut Dirty)) {
        if let Ok(mut d) = self.dirty.lock() {
            f(&mut d);
        }
        self.wake.notify_one();
    }

    fn take(&self) -> Dirty {
        self.dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    /// Asks the actor to (re)start push from these tokens.
    pub fn resume(&self, r: Resume) {
        self.mark(|d| d.resumes.push(r));
    }
}

#[derive(Default)]
struct Index {
    devices: HashMap<u64, Arc<Device>>,
    by_user: HashMap<String, HashSet<u64>>,
    by_conv: HashMap<String, HashSet<u64>>,
    by_token: HashMap<[u8; 32], HashSet<u64>>,
}

fn remove_from(map: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// When the live messages of a pushed page were created (for the delivery
/// latency metric).
fn created_at(s: &pb::ConversationSync) -> impl Iterator<Item = u64> + '_ {
    s.changes.iter().filter_map(|c| match &c.change {
        Some(pb::conversation_change::Change::Message(m)) if !m.deleted => Some(m.created_at_ms),
        _ => None,
    })
}

/// What the actor of one device knows.
#[derive(Default)]
struct DeviceState {
    live: bool,
    /// Whether the full feed was read to learn the tracked conversations.
    scanned: bool,
    feed_token: u64,
    /// Tracked conversation → token (0 = not synced for this device yet).
    convs: HashMap<String, u64>,
    /// This round of syncs follows a `resume` (a catch-up, not a live
    /// push: its delivery latency is not observed).
    catching_up: bool,
}

pub struct Hub {
    cluster: Cluster,
    page: u32,
    timeout: Duration,
    index: Mutex<Index>,
    next_id: AtomicU64,
    reads: Semaphore,
    /// Node address → whether its Watch stream is connected.
    watching: Mutex<HashMap<String, bool>>,
    /// Presence reports and subscriptions, typing relay.
    pub presence: Arc<crate::presence::Presence>,
}

fn event(name: &str, mut fields: Map<String, Value>) -> Value {
    let mut m = Map::new();
    m.insert("v".into(), json!(1));
    m.insert("event".into(), json!(name));
    m.append(&mut fields);
    Value::Object(m)
}

/// One pushed event, before a front-end encodes it (JSON for the
/// WebSocket, protobuf for gRPC).
#[derive(Debug, Clone)]
pub enum Push {
    Feed {
        from_token: u64,
        page: pb::FeedPage,
    },
    Conversation {
        conversation_id: String,
        from_token: u64,
        sync: pb::ConversationSync,
    },
    ConversationGone {
        conversation_id: String,
        message: Option<String>,
    },
    Friends,
    Typing {
        conversation_id: String,
        user_id: String,
    },
    SessionEnded {
        reason: Option<String>,
    },
    Reconnect {
        reason: String,
    },
    /// A followed user came online or went offline.
    Presence(natter_proto::cluster::UserPresence),
}

impl Push {
    /// The WebSocket event (docs/protocol.md, "Events").
    pub fn to_json(&self) -> Value {
        match self {
            Push::Feed { from_token, page } => {
                let mut m = json::feed_page(page);
                m.insert("from_token".into(), json!(from_token));
                event("feed", m)
            }
            Push::Conversation {
                conversation_id,
                from_token,
                sync,
            } => {
                let mut m = Map::new();
                m.insert("conversation_id".into(), json!(conversation_id));
                m.insert("from_token".into(), json!(from_token));
                m.append(&mut json::conversation_sync(sync));
                event("conversation", m)
            }
            Push::ConversationGone {
                conversation_id,
                message,
            } => {
                let mut m = Map::new();
                m.insert("conversation_id".into(), json!(conversation_id));
                if let Some(message) = message {
                    m.insert("message".into(), json!(message));
                }
                event("conversation_gone", m)
            }
            Push::Friends => event("friends", Map::new()),
            Push::Typing {
                conversation_id,
                user_id,
            } => event(
                "typing",
                Map::from_iter([
                    ("conversation_id".to_string(), json!(conversation_id)),
                    ("user_id".to_string(), json!(user_id)),
                ]),
            ),
            Push::SessionEnded { reason } => {
                let mut m = Map::new();
                if let Some(reason) = reason {
                    m.insert("reason".into(), json!(reason));
                }
                event("session_ended", m)
            }
            Push::Reconnect { reason } => event(
                "reconnect",
                Map::from_iter([("reason".to_string(), json!(reason))]),
            ),
            Push::Presence(p) => event("presence", crate::presence::presence_fields(p)),
        }
    }
}

impl Hub {
    pub fn new(cluster: Cluster, page: u32, timeout: Duration) -> Arc<Hub> {
        Arc::new(Hub {
            cluster,
            page,
            timeout,
            index: Mutex::new(Index::default()),
            next_id: AtomicU64::new(1),
            reads: Semaphore::new(SYNC_CONCURRENCY),
            watching: Mutex::new(HashMap::new()),
            presence: crate::presence::Presence::new(),
        })
    }

    /// Registers a connection's device and starts its actor, which ends
    /// (and unregisters) when the connection closes.
    pub fn register(
        self: &Arc<Hub>,
        user_id: &str,
        token_hash: [u8; 32],
        out: Arc<Outbound>,
    ) -> Arc<Device> {
        let dev = Arc::new(Device {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user_id: user_id.to_string(),
            token_hash,
            out,
            dirty: Mutex::new(Dirty::default()),
            wake: Notify::new(),
        });
        if let Ok(mut ix) = self.index.lock() {
            ix.devices.insert(dev.id, dev.clone());
            let devs = ix.by_user.entry(dev.user_id.clone()).or_default();
            devs.insert(dev.id);
            if devs.len() == 1 {
                self.presence.user_connected(&dev.user_id);
            }
            ix.by_token.entry(token_hash).or_default().insert(dev.id);
        }
        let (hub, d) = (self.clone(), dev.clone());
        tokio::spawn(async move {
            let st = hub.run_device(&d).await;
            hub.unregister(&d, st.convs.keys());
        });
        dev
    }

    fn unregister<'a>(&self, dev: &Device, convs: impl Iterator<Item = &'a String>) {
        if let Ok(mut ix) = self.index.lock() {
            ix.devices.remove(&dev.id);
            remove_from(&mut ix.by_user, &dev.user_id, dev.id);
            if !ix.by_user.contains_key(&dev.user_id) {
                self.presence.user_disconnected(&dev.user_id);
            }
            if let Some(set) = ix.by_token.get_mut(&dev.token_hash) {
                set.remove(&dev.id);
                if set.is_empty() {
                    ix.by_token.remove(&dev.token_hash);
                }
            }
            for c in convs {
                remove_from(&mut ix.by_conv, c, dev.id);
            }
        }
        self.presence.device_gone(dev.id);
    }

    /// Users with a device connected here.
    pub fn connected_users(&self) -> Vec<String> {
        self.index
            .lock()
            .map(|ix| ix.by_user.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn connections(&self) -> usize {
        self.index.lock().map(|ix| ix.devices.len()).unwrap_or(0)
    }

    /// Closes every local connection of a session (after a logout here).
    pub fn end_session(&self, token_hash: &[u8; 32]) {
        let devs: Vec<Arc<Device>> = self
            .index
            .lock()
            .map(|ix| {
                ix.by_token
                    .get(token_hash)
                    .map(|s| {
                        s.iter()
                            .filter_map(|id| ix.devices.get(id).cloned())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        for d in devs {
            d.out.push(Push::SessionEnded { reason: None });
            d.out
                .closer()
                .close(crate::conn::close::SESSION_ENDED, "session ended");
        }
    }

    fn track(&self, dev: &Device, conv: &str) {
        if let Ok(mut ix) = self.index.lock() {
            ix.by_conv
                .entry(conv.to_string())
                .or_default()
                .insert(dev.id);
        }
    }

    fn untrack(&self, dev: &Device, conv: &str) {
        if let Ok(mut ix) = self.index.lock() {
            remove_from(&mut ix.by_conv, conv, dev.id);
        }
    }

    /// Relays a typing indicator to the conversation's members on every
    /// router (through the conversation shard's leader and the Watch
    /// streams). The sender must track the conversation; at most one per
    /// device per second is relayed, more are dropped.
    pub fn typing(self: &Arc<Self>, dev: &Device, conv: &str) -> Result<(), ApiError> {
        {
            let ix = self
                .index
                .lock()
                .map_err(|_| ApiError::Unavailable("hub poisoned".into()))?;
            if !ix.by_conv.get(conv).is_some_and(|s| s.contains(&dev.id)) {
                return Err(ApiError::not_found(
                    "conversation not found (resume first to track your conversations)",
                ));
            }
        }
        if !self.presence.typing_allowed(dev.id) {
            return Ok(());
        }
        let (hub, conv, user) = (self.clone(), conv.to_string(), dev.user_id.clone());
        tokio::spawn(async move {
            if let Err(e) = hub.presence.relay_typing(&hub.cluster, &conv, &user).await {
                // The leader is unreachable: at least this router's devices.
                tracing::debug!("typing relay failed: {e}");
                hub.deliver_typing(&conv, &user);
            }
        });
        Ok(())
    }

    /// Delivers a typing indicator to local devices tracking the
    /// conversation, except the typist's own.
    fn deliver_typing(&self, conv: &str, user: &str) {
        let targets: Vec<Arc<Device>> = match self.index.lock() {
            Ok(ix) => ix
                .by_conv
                .get(conv)
                .into_iter()
                .flatten()
                .filter_map(|id| ix.devices.get(id))
                .filter(|d| d.user_id != user)
                .cloned()
                .collect(),
            Err(_) => return,
        };
        for d in targets {
            d.out.push(Push::Typing {
                conversation_id: conv.to_string(),
                user_id: user.to_string(),
            });
        }
    }

    /// [`Hub::typing`] from whichever local device of this session tracks
    /// the conversation (gRPC: typing is a call beside the Subscribe stream).
    pub fn typing_for_session(
        self: &Arc<Self>,
        token_hash: &[u8; 32],
        conv: &str,
    ) -> Result<(), ApiError> {
        let dev = self.index.lock().ok().and_then(|ix| {
            let ids = ix.by_token.get(token_hash)?;
            let tracking = ix.by_conv.get(conv);
            ids.iter()
                .find(|id| tracking.is_some_and(|t| t.contains(id)))
                .or_else(|| ids.iter().next())
                .and_then(|id| ix.devices.get(id).cloned())
        });
        match dev {
            Some(d) => self.typing(&d, conv),
            None => Err(ApiError::not_found(
                "conversation not found (open a Subscribe stream first to track your conversations)",
            )),
        }
    }

    /// A device of this session connected here (any, for calls made beside
    /// a gRPC Subscribe stream).
    pub fn session_device(&self, token_hash: &[u8; 32]) -> Option<Arc<Device>> {
        let ix = self.index.lock().ok()?;
        let id = ix.by_token.get(token_hash)?.iter().next()?;
        ix.devices.get(id).cloned()
    }

    /// Applies one Watch event: marks what changed dirty on the devices
    /// that care.
    pub fn on_event(&self, ev: &ChangeEvent) {
        if ev.lagged {
            tracing::info!("a watch stream lagged: resyncing every device");
            self.resync_all();
            return;
        }
        let mut friends = Vec::new();
        if let Ok(ix) = self.index.lock() {
            for ch in &ev.changes {
                match ChangeKind::try_from(ch.kind) {
                    Ok(ChangeKind::Conversation) => {
                        let Some(devs) = ix.by_conv.get(&ch.id) else {
                            continue;
                        };
                        // Decoded once for every device; an undecodable one
                        // is only a missed shortcut (the device reads).
                        let sent = (!ch.sent.is_empty())
                            .then(|| pb::SendResult::decode(ch.sent.as_slice()).ok())
                            .flatten()
                            .map(Arc::new);
                        for d in devs {
                            if let Some(d) = ix.devices.get(d) {
                                d.mark(|x| {
                                    let v = x.convs.entry(ch.id.clone()).or_insert(0);
                                    *v = (*v).max(ch.version);
                                    if let Some(s) = &sent {
                                        let held = x.sent.entry(ch.id.clone()).or_default();
                                        if held.len() < MAX_SENT_HELD {
                                            held.push(s.clone());
                                        }
                                    }
                                });
                            }
                        }
                    }
                    Ok(ChangeKind::Feed) => {
                        for d in ix.by_user.get(&ch.id).into_iter().flatten() {
                            if let Some(d) = ix.devices.get(d) {
                                d.mark(|x| x.mark_feed(ch.version));
                            }
                        }
                    }
                    Ok(ChangeKind::Friends) => {
                        for d in ix.by_user.get(&ch.id).into_iter().flatten() {
                            if let Some(d) = ix.devices.get(d) {
                                friends.push(d.clone());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        for d in friends {
            d.out.push(Push::Friends);
        }
        self.presence.on_event(ev);
        for t in &ev.typing {
            self.deliver_typing(&t.conversation_id, &t.user_id);
        }
    }

    /// Every device re-syncs its feed and conversations.
    pub fn resync_all(&self) {
        if let Ok(ix) = self.index.lock() {
            for d in ix.devices.values() {
                d.mark(|x| x.all = true);
            }
        }
    }

    /// Sends `{"event":"reconnect"}` to every connection (shutdown).
    pub fn broadcast_reconnect(&self) {
        let devs: Vec<Arc<Device>> = self
            .index
            .lock()
            .map(|ix| ix.devices.values().cloned().collect())
            .unwrap_or_default();
        for d in devs {
            d.out.push(Push::Reconnect {
                reason: "the router is shutting down; reconnect and resume".into(),
            });
        }
    }

    async fn run_device(&self, dev: &Device) -> DeviceState {
        let mut st = DeviceState::default();
        let closer = dev.out.closer();
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = dev.wake.notified() => {}
                _ = closer.closed() => return st,
            }
            loop {
                let work = dev.take();
                if work.is_empty() || closer.is_closed() {
                    break;
                }
                match self.process(dev, &mut st, work).await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::debug!(device = dev.id, "push sync failed, retrying: {e}");
                        dev.mark(|x| x.all = true);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = closer.closed() => return st,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    async fn query(&self, q: Q) -> Result<R, ApiError> {
        self.query_at(q, Consistency::Linearizable).await
    }

    /// One read of the push path, within the router's read permits.
    async fn query_at(&self, q: Q, consistency: Consistency) -> Result<R, ApiError> {
        let _permit = self
            .reads
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
        let r = self
            .cluster
            .query_at(q, consistency, Instant::now() + self.timeout)
            .await?;
        check(r)
    }

    /// A conversation or feed delta sync from the device's token `from`
    /// after a change event named version `at_least` (0 = none). It first
    /// reads without the read-index round of a linearizable read: any
    /// replica's applied state is committed, so an answer that already
    /// reaches the event's version is as good as a linearizable one for this
    /// push. Anything else (older, a cold start, an error, a refusal a
    /// lagging replica might give), and every sync without an event version
    /// or from no token, is asked linearizably.
    async fn query_delta(&self, q: Q, from: u64, at_least: u64) -> Result<R, ApiError> {
        if at_least > from && from > 0 {
            match self.query_at(q.clone(), Consistency::Stale).await {
                Ok(R::ConversationSync(s)) if s.token >= at_least => {
                    return Ok(R::ConversationSync(s))
                }
                Ok(R::Feed(p)) if !p.cold_start && p.token >= at_least => return Ok(R::Feed(p)),
                _ => {}
            }
        }
        self.query(q).await
    }

    async fn process(
        &self,
        dev: &Device,
        st: &mut DeviceState,
        mut work: Dirty,
    ) -> Result<(), ApiError> {
        st.catching_up = !work.resumes.is_empty() || work.all;
        for r in std::mem::take(&mut work.resumes) {
            st.live = true;
            for (c, t) in r.conversations {
                if st.convs.len() >= MAX_TRACKED && !st.convs.contains_key(&c) {
                    continue;
                }
                self.track(dev, &c);
                st.convs.insert(c.clone(), t);
                work.convs.insert(c, 0);
            }
            if r.feed_token > 0 {
                st.feed_token = r.feed_token;
            }
            work.mark_feed(0);
        }
        if !st.live {
            return Ok(());
        }
        if !st.scanned && st.feed_token > 0 {
            self.scan_feed(dev, st).await?;
        }
        if work.all {
            work.mark_feed(0);
            for (c, t) in &st.convs {
                if *t > 0 {
                    work.convs.entry(c.clone()).or_insert(0);
                }
            }
        }
        // Conversations the device already holds first: the message a push
        // carries matters more than the feed row that follows it.
        let held: Vec<(String, u64)> = work
            .convs
            .iter()
            .filter(|(c, _)| st.convs.get(*c).is_some_and(|t| *t > 0))
            .map(|(c, h)| (c.clone(), *h))
            .collect();
        for (c, hint) in held {
            work.convs.remove(&c);
            if let Some(sent) = work.sent.remove(&c) {
                self.push_sent(dev, st, &c, &sent);
            }
            self.sync_if_behind(dev, st, &c, hint).await?;
        }
        // A feed event naming a version the device already has is done.
        if work.feed && !(work.feed_at > 0 && work.feed_at <= st.feed_token) {
            self.sync_feed(dev, st, &mut work.convs, work.feed_at)
                .await?;
        }
        for (c, hint) in work.convs {
            self.sync_if_behind(dev, st, &c, hint).await?;
        }
        Ok(())
    }

    /// Pushes the sends events carried for a held conversation when they
    /// continue the device's token — exactly what a delta sync from that
    /// token answered right after them (`natter_model::sends_delta`), with
    /// no read. Whatever they don't cover (a change between, a send past a
    /// page) is left to [`Hub::sync_if_behind`], which reads.
    fn push_sent(&self, dev: &Device, st: &mut DeviceState, c: &str, sent: &[Arc<pb::SendResult>]) {
        let Some(&from) = st.convs.get(c) else {
            return;
        };
        let sends: Vec<&pb::SendResult> = sent.iter().map(|s| s.as_ref()).collect();
        let now = crate::now_ms();
        let Some(s) = natter_model::sends_delta(&sends, &dev.user_id, from, now, self.page) else {
            return;
        };
        crate::metrics::pushed("conversation", st.catching_up, created_at(&s));
        crate::metrics::pushed_from_event();
        let token = s.token;
        dev.out.push(Push::Conversation {
            conversation_id: c.to_string(),
            from_token: from,
            sync: s,
        });
        st.convs.insert(c.to_string(), token);
    }

    /// Syncs a tracked conversation unless its token already reaches the
    /// version an event named (`hint`, 0 = unknown).
    async fn sync_if_behind(
        &self,
        dev: &Device,
        st: &mut DeviceState,
        c: &str,
        hint: u64,
    ) -> Result<(), ApiError> {
        match st.convs.get(c) {
            Some(t) if hint == 0 || *t == 0 || hint > *t => {
                self.sync_conversation(dev, st, c, hint).await
            }
            _ => Ok(()),
        }
    }

    /// Learns a feed row: tracks or drops its conversation and marks it for
    /// sync when the row is newer than the device's token.
    fn learn(
        &self,
        dev: &Device,
        st: &mut DeviceState,
        e: &pb::FeedEntry,
        dirty: Option<&mut BTreeMap<String, u64>>,
    ) {
        let Some(u) = &e.conversation else { return };
        let c = &u.conversation_id;
        if u.removed {
            if st.convs.remove(c).is_some() {
                self.untrack(dev, c);
            }
            return;
        }
        if !st.convs.contains_key(c) {
            if st.convs.len() >= MAX_TRACKED {
                return;
            }
            st.convs.insert(c.clone(), 0);
            self.track(dev, c);
        }
        if let (Some(dirty), Some(t)) = (dirty, st.convs.get(c)) {
            if u.version > *t {
                let v = dirty.entry(c.clone()).or_insert(0);
                *v = (*v).max(u.version);
            }
        }
    }

    /// Reads the whole visible feed to learn the tracked conversations
    /// (pushes nothing: the client has the feed up to its token).
    async fn scan_feed(&self, dev: &Device, st: &mut DeviceState) -> Result<(), ApiError> {
        let mut cursor = Vec::new();
        loop {
            let page = match self
                .query(Q::GetFeed(pb::GetFeed {
                    user_id: dev.user_id.clone(),
                    limit: FEED_PAGE,
                    cursor: cursor.clone(),
                }))
                .await?
            {
                R::Feed(p) => p,
                other => return Err(ApiError::unexpected(&other)),
            };
            for e in &page.entries {
                self.learn(dev, st, e, None);
            }
            if !page.has_more || page.cursor.is_empty() || st.convs.len() >= MAX_TRACKED {
                break;
            }
            cursor = page.cursor;
        }
        st.scanned = true;
        Ok(())
    }

    fn push_feed(&self, dev: &Device, from: u64, p: &pb::FeedPage) {
        dev.out.push(Push::Feed {
            from_token: from,
            page: p.clone(),
        });
        crate::metrics::pushed("feed", p.cold_start, std::iter::empty());
    }

    /// Pushes the feed's changes since the device's token (a cold start of
    /// every page when it has none) and marks changed conversations.
    /// `at_least`: the feed version an event named (0 = unknown).
    async fn sync_feed(
        &self,
        dev: &Device,
        st: &mut DeviceState,
        dirty: &mut BTreeMap<String, u64>,
        mut at_least: u64,
    ) -> Result<(), ApiError> {
        loop {
            let q = Q::SyncFeed(pb::SyncFeed {
                user_id: dev.user_id.clone(),
                token: st.feed_token,
                limit: FEED_PAGE,
            });
            let r = self.query_delta(q, st.feed_token, at_least).await?;
            at_least = 0;
            let p = match r {
                R::Feed(p) => p,
                other => return Err(ApiError::unexpected(&other)),
            };
            let from = st.feed_token;
            if p.cold_start {
                // Token 0 (or one the shard doesn't know): every page, then
                // the changes made while paging.
                self.push_feed(dev, from, &p);
                for e in &p.entries {
                    self.learn(dev, st, e, Some(dirty));
                }
                let token = p.token;
                let mut cursor = p.cursor;
                let mut more = p.has_more;
                while more && !cursor.is_empty() {
                    let page = match self
                        .query(Q::GetFeed(pb::GetFeed {
                            user_id: dev.user_id.clone(),
                            limit: FEED_PAGE,
                            cursor: cursor.clone(),
                        }))
                        .await?
                    {
                        R::Feed(p) => p,
                        other => return Err(ApiError::unexpected(&other)),
                    };
                    let shown = pb::FeedPage {
                        token,
                        ..page.clone()
                    };
                    self.push_feed(dev, token, &shown);
                    for e in &page.entries {
                        self.learn(dev, st, e, Some(dirty));
                    }
                    more = page.has_more;
                    cursor = page.cursor;
                }
                st.feed_token = token;
                st.scanned = true;
                if token == 0 {
                    return Ok(());
                }
                continue;
            }
            if !p.entries.is_empty() || p.token != from {
                self.push_feed(dev, from, &p);
            }
            for e in &p.entries {
                self.learn(dev, st, e, Some(dirty));
            }
            st.feed_token = p.token;
            if !p.has_more || p.token == from {
                return Ok(());
            }
        }
    }

    /// Pushes a conversation's changes since the device's token (a cold
    /// start when it has none). `hint` is the version a change event named
    /// (0: unknown).
    async fn sync_conversation(
        &self,
        dev: &Device,
        st: &mut DeviceState,
        conv: &str,
        mut hint: u64,
    ) -> Result<(), ApiError> {
        loop {
            let Some(&from) = st.convs.get(conv) else {
                return Ok(());
            };
            let q = Q::SyncConversation(pb::SyncConversation {
                viewer_id: dev.user_id.clone(),
                conversation_id: conv.to_string(),
                token: from,
                limit: self.page,
            });
            let r = self.query_delta(q, from, hint).await;
            hint = 0;
            let s = match r {
                Ok(R::ConversationSync(s)) => s,
                Ok(other) => return Err(ApiError::unexpected(&other)),
                Err(ApiError::Model { code, message }) => {
                    // Not (or no longer) visible to this user, or a bad id
                    // from `resume`: stop tracking it.
                    st.convs.remove(conv);
                    self.untrack(dev, conv);
                    dev.out.push(Push::ConversationGone {
                        conversation_id: conv.to_string(),
                        message: (code != ErrorCode::NotFound).then_some(message),
                    });
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if s.cold_start || !s.changes.is_empty() || s.token != from {
                dev.out.push(Push::Conversation {
                    conversation_id: conv.to_string(),
                    from_token: from,
                    sync: s.clone(),
                });
                crate::metrics::pushed(
                    "conversation",
                    s.cold_start || st.catching_up,
                    created_at(&s),
                );
            }
            st.convs.insert(conv.to_string(), s.token);
            if !s.has_more || s.token == from {
                return Ok(());
            }
        }
    }

    // -----------------------------------------------------------------
    // Watch streams
    // -----------------------------------------------------------------

    /// Keeps one Watch stream per node of the shard map, adding nodes as
    /// the map grows, until `stop`.
    pub async fn watch_cluster(self: Arc<Hub>, stop: CancellationToken) {
        let hub = self.clone();
        tokio::spawn(self.presence.clone().announce(
            self.cluster.clone(),
            move || hub.connected_users(),
            stop.clone(),
        ));
        let mut started: HashSet<String> = HashSet::new();
        loop {
            let layout = match self.cluster.layout() {
                Some(l) => Some(l),
                None => self.cluster.refresh_layout(Duration::ZERO).await.ok(),
            };
            if let Some(l) = layout {
                for addr in l.addrs() {
                    if started.insert(addr.clone()) {
                        tokio::spawn(self.clone().watch_node(addr, stop.clone()));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(if started.is_empty() { 1 } else { 10 })) => {}
                _ = stop.cancelled() => return,
            }
            let _ = self.cluster.refresh_layout(Duration::from_secs(5)).await;
        }
    }

    fn set_watching(&self, addr: &str, up: bool) {
        if let Ok(mut w) = self.watching.lock() {
            w.insert(addr.to_string(), up);
        }
    }

    /// Whether every shard has a majority of replicas whose Watch stream is
    /// connected (the router can route and push).
    pub fn ready(&self) -> Result<(), String> {
        let Some(l) = self.cluster.layout() else {
            return Err("shard map not known yet".into());
        };
        let up: HashSet<String> = self
            .watching
            .lock()
            .map(|w| {
                w.iter()
                    .filter(|(_, u)| **u)
                    .map(|(a, _)| a.clone())
                    .collect()
            })
            .unwrap_or_default();
        for shard in 1..=l.shard_count {
            let replicas = l.replica_addrs(shard);
            let n = replicas.iter().filter(|a| up.contains(*a)).count();
            if replicas.is_empty() || n * 2 <= replicas.len() {
                return Err(format!(
                    "shard {shard}: {n} of {} replicas reachable",
                    replicas.len()
                ));
            }
        }
        Ok(())
    }

    async fn watch_node(self: Arc<Hub>, addr: String, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let stream = match self.cluster.client(&addr) {
                Ok(mut c) => tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(3), c.watch(WatchRequest {})) => r.ok().and_then(|r| r.ok()),
                    _ = stop.cancelled() => return,
                },
                Err(_) => None,
            };
            if let Some(stream) = stream {
                let mut stream = stream.into_inner();
                tracing::info!(node = %addr, "watch stream open");
                self.set_watching(&addr, true);
                // Whatever committed while we weren't watching.
                self.resync_all();
                loop {
                    tokio::select! {
                        m = stream.message() => match m {
                            Ok(Some(ev)) => self.on_event(&ev),
                            Ok(None) => break,
                            Err(e) => {
                                tracing::info!(node = %addr, "watch stream ended: {}", e.message());
                                break;
                            }
                        },
                        _ = stop.cancelled() => return,
                    }
                }
                self.set_watching(&addr, false);
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Dirty;

    #[test]
    fn feed_marks_keep_the_highest_version_unless_one_is_unknown() {
        let mut d = Dirty::default();
        assert!(!d.feed && d.is_empty());
        d.mark_feed(7);
        assert_eq!((d.feed, d.feed_at), (true, 7));
        d.mark_feed(5);
        assert_eq!(d.feed_at, 7, "an older event never lowers it");
        d.mark_feed(9);
        assert_eq!(d.feed_at, 9);
        // A reason without a version (resume, resync): a full
        // linearizable sync, whatever versions come after.
        d.mark_feed(0);
        assert_eq!(d.feed_at, 0);
        d.mark_feed(12);
        assert_eq!((d.feed, d.feed_at), (true, 0));
    }
}
