//! `natter-client`: Natter's Rust SDK.
//!
//! * **One handle** ([`Client`], cheap to clone) over a list of router
//!   addresses: unary calls and the push stream go to the current router;
//!   when it fails, the client moves to the next one (backoff between whole
//!   rounds), so a dead router costs a reconnect, not data.
//! * **A local cache** (SQLite, [`cache`]): session, sync tokens,
//!   conversations, messages, the feed and the outgoing queue. Readable
//!   offline; it survives restarts.
//! * **Delta sync**: the push stream (`Subscribe`) resumes from the cached
//!   tokens, so after a reconnect or a restart only what changed since is
//!   fetched ([`Stats`] counts the rows received).
//! * **Outgoing queue**: [`Client::send_text`] stores the message in the
//!   cache first, then a sender task delivers the queue in order, retrying
//!   with the same `client_msg_id` (the router's idempotency key), so a
//!   message goes out exactly once even across crashes and failovers.
//! * **Events**: a bounded tokio channel of typed [`Event`]s
//!   ([`Client::events`]); the cache is the truth, events say what changed
//!   (a consumer that falls behind gets [`Event::Lagged`] and re-reads).
//!
//! # Embedding through FFI
//!
//! Everything at the boundary is a plain owned type (`String`, `u64`,
//! `Vec`, the structs and enums below); [`Client`] is a handle (an `Arc`
//! inside, `Send + Sync`, no lifetimes), so a binding layer (UniFFI,
//! `cxx`, a C ABI) can hold it as an opaque pointer, run the async methods
//! on one tokio runtime it owns, and pump [`Client::events`] into the
//! platform's event loop. Errors are one enum with a stable [`Error::code`]
//! (the protocol's error codes). The cache path is chosen by the app (its
//! private data directory).

pub mod cache;
mod net;
mod sync;
pub mod types;
pub mod upload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_model::pb;
use natter_proto::client as cp;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

pub use types::*;

use crate::cache::Cache;
use crate::net::Routers;

/// Events queued for the app before new ones are dropped (then
/// [`Event::Lagged`] is delivered).
pub const EVENT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The router answered an error (`code`: the protocol's error code,
    /// e.g. `not_found`, `unauthenticated`; see docs/protocol.md).
    #[error("{code}: {message}")]
    Api { code: String, message: String },
    /// No router could be reached.
    #[error("no router reachable: {0}")]
    Unreachable(String),
    #[error("not logged in")]
    NotLoggedIn,
    #[error("cache: {0}")]
    Cache(#[from] rusqlite::Error),
    #[error("cache holds a row that doesn't decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Invalid(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A stable code: the protocol's error code, or `unreachable`,
    /// `not_logged_in`, `cache`, `invalid_argument`, `timeout`, `io`.
    pub fn code(&self) -> &str {
        match self {
            Error::Api { code, .. } => code,
            Error::Unreachable(_) => "unreachable",
            Error::NotLoggedIn => "not_logged_in",
            Error::Cache(_) | Error::Decode(_) => "cache",
            Error::Invalid(_) => "invalid_argument",
            Error::Timeout(_) => "timeout",
            Error::Io(_) => "io",
        }
    }
}

/// How to open a client.
#[derive(Debug, Clone)]
pub struct Config {
    /// Router addresses (`host:port`), tried in order.
    pub routers: Vec<String>,
    /// The SQLite cache file (created if missing).
    pub cache_path: PathBuf,
    /// Device label sent at login.
    pub device: String,
    /// Per-call deadline.
    pub call_timeout: Duration,
    /// Longest wait between reconnect rounds.
    pub max_backoff: Duration,
}

impl Config {
    pub fn new(routers: Vec<String>, cache_path: impl Into<PathBuf>) -> Config {
        Config {
            routers,
            cache_path: cache_path.into(),
            device: "natter-client".into(),
            call_timeout: Duration::from_secs(15),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Rows received from routers since this client was opened: what delta
/// sync cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Message rows received (push pages and history pages).
    pub messages_fetched: u64,
    /// Feed rows received.
    pub feed_entries_fetched: u64,
    /// Conversation pages received.
    pub conversation_pages: u64,
    /// Push streams opened.
    pub connects: u64,
    /// Queued messages the router acknowledged.
    pub sends_acked: u64,
}

#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    feed: AtomicU64,
    pages: AtomicU64,
    connects: AtomicU64,
    acked: AtomicU64,
}

pub(crate) struct Inner {
    cfg: Config,
    cache: Mutex<Cache>,
    routers: Routers,
    token: Mutex<Option<String>>,
    events: mpsc::Sender<Event>,
    events_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    lagged: AtomicBool,
    stop: Mutex<CancellationToken>,
    outbox_wake: Notify,
    /// Notified whenever the outbox shrinks or the connection changes.
    progress: Notify,
    connected: AtomicBool,
    counters: Counters,
}

/// The SDK handle. Clone it freely; [`Client::stop`] ends the background
/// tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Opens (or creates) the cache and prepares channels to the routers.
    /// Nothing is contacted until a call or [`Client::start`].
    pub fn open(cfg: Config) -> Result<Client, Error> {
        if cfg.routers.is_empty() {
            return Err(Error::Invalid(
                "at least one router address is needed".into(),
            ));
        }
        let cache = Cache::open(&cfg.cache_path)?;
        let token = cache.get("token")?;
        let routers = Routers::new(&cfg.routers, cfg.call_timeout)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        Ok(Client {
            inner: Arc::new(Inner {
                cfg,
                cache: Mutex::new(cache),
                routers,
                token: Mutex::new(token),
                events: tx,
                events_rx: Mutex::new(Some(rx)),
                lagged: AtomicBool::new(false),
                stop: Mutex::new(CancellationToken::new()),
                outbox_wake: Notify::new(),
                progress: Notify::new(),
                connected: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }

    /// The event stream (once; later calls answer `None`).
    pub fn events(&self) -> Option<mpsc::Receiver<Event>> {
        self.inner.events_rx.lock().ok().and_then(|mut r| r.take())
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            messages_fetched: c.messages.load(Ordering::Relaxed),
            feed_entries_fetched: c.feed.load(Ordering::Relaxed),
            conversation_pages: c.pages.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            sends_acked: c.acked.load(Ordering::Relaxed),
        }
    }

    /// Whether the push stream is open now.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }

    /// The router currently used.
    pub fn current_router(&self) -> String {
        self.inner.routers.current_addr()
    }

    // -- accounts ----------------------------------------------------------

    pub async fn register(&self, username: &str, password: &str) -> Result<String, Error> {
        let req = cp::RegisterRequest {
            username: username.into(),
            password: password.into(),
        };
        let r = self
            .inner
            .call(None, move |mut api, _| {
                let req = req.clone();
                async move { api.register(req).await }
            })
            .await?;
        Ok(r.user_id)
    }

    /// Logs in and keeps the session in the cache. Logging in as another
    /// user than the cache holds empties the cache first.
    pub async fn login(&self, username: &str, password: &str) -> Result<Session, Error> {
        let req = cp::LoginRequest {
            username: username.into(),
            password: password.into(),
            device: self.inner.cfg.device.clone(),
        };
        let r = self
            .inner
            .call(None, move |mut api, _| {
                let req = req.clone();
                async move { api.login(req).await }
            })
            .await?;
        {
            let mut c = self.inner.cache()?;
            if c.get("user_id")?.is_some_and(|u| u != r.user_id) {
                c.wipe()?;
            }
            c.set("token", &r.token)?;
            c.set("user_id", &r.user_id)?;
            c.set("username", &r.username)?;
            c.set("expires_at_ms", &r.expires_at_ms.to_string())?;
        }
        if let Ok(mut t) = self.inner.token.lock() {
            *t = Some(r.token.clone());
        }
        Ok(Session {
            user_id: r.user_id,
            username: r.username,
            expires_at_ms: r.expires_at_ms,
        })
    }

    /// The cached session, if logged in.
    pub fn session(&self) -> Result<Option<Session>, Error> {
        let c = self.inner.cache()?;
        if c.get("token")?.is_none() {
            return Ok(None);
        }
        Ok(Some(Session {
            user_id: c.get("user_id")?.unwrap_or_default(),
            username: c.get("username")?.unwrap_or_default(),
            expires_at_ms: c
                .get("expires_at_ms")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }))
    }

    /// Revokes the session on the cluster and forgets it (and the cache).
    pub async fn logout(&self) -> Result<(), Error> {
        let r = self
            .inner
            .authed(|mut api, t| async move { api.logout(net::authed(&t, cp::Empty {})).await })
            .await;
        self.stop();
        self.inner.cache()?.wipe()?;
        if let Ok(mut t) = self.inner.token.lock() {
            *t = None;
        }
        match r {
            Ok(_) | Err(Error::Api { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    // -- background tasks -------------------------------------------------

    /// Starts the push stream (delta sync, then live changes) and the
    /// sender of the outgoing queue, reconnecting across routers until
    /// [`Client::stop`].
    pub fn start(&self) -> Result<(), Error> {
        if self.inner.token()?.is_none() {
            return Err(Error::NotLoggedIn);
        }
        let stop = CancellationToken::new();
        if let Ok(mut s) = self.inner.stop.lock() {
            s.cancel();
            *s = stop.clone();
        }
        tokio::spawn(sync::run(self.inner.clone(), stop.clone()));
        tokio::spawn(sync::send_loop(self.inner.clone(), stop));
        Ok(())
    }

    pub fn stop(&self) {
        if let Ok(s) = self.inner.stop.lock() {
            s.cancel();
        }
        self.inner.connected.store(false, Ordering::Release);
    }

    // -- messages ----------------------------------------------------------

    /// Queues a text message (stored in the cache at once; delivered in
    /// order when a router is reachable). Answers its `client_msg_id`.
    pub fn send_text(&self, conversation_id: &str, text: &str) -> Result<String, Error> {
        self.send(conversation_id, text, Vec::new())
    }

    /// Queues a message with media metadata (see [`upload`]).
    pub fn send(
        &self,
        conversation_id: &str,
        text: &str,
        media: Vec<Media>,
    ) -> Result<String, Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let media: Vec<pb::Media> = media.into_iter().map(Into::into).collect();
        self.inner
            .cache()?
            .enqueue(conversation_id, &id, text, &media, 0)?;
        self.inner.outbox_wake.notify_one();
        Ok(id)
    }

    /// Messages still waiting to be acknowledged, oldest first.
    pub fn pending(&self) -> Result<Vec<PendingMessage>, Error> {
        Ok(self
            .inner
            .cache()?
            .pending(10_000)?
            .into_iter()
            .map(|p| PendingMessage {
                conversation_id: p.conversation_id,
                client_msg_id: p.client_msg_id,
                text: p.text,
                attempts: p.attempts,
            })
            .collect())
    }

    /// Waits until the outgoing queue is empty (the sender must run: see
    /// [`Client::start`]).
    pub async fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progressed = self.inner.progress.notified();
            if self.inner.cache()?.pending_count()? == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return Err(Error::Timeout("messages still queued".into()));
            }
        }
    }

    /// Waits until the push stream is open.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progressed = self.inner.progress.notified();
            if self.is_connected() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return Err(Error::Timeout("not connected".into()));
            }
        }
    }

    /// The newest `limit` cached messages of a conversation, ascending.
    pub fn messages(&self, conversation_id: &str, limit: usize) -> Result<Vec<Message>, Error> {
        Ok(self
            .inner
            .cache()?
            .messages(conversation_id, limit)?
            .into_iter()
            .map(Message::from)
            .collect())
    }

    /// The cached conversation metadata.
    pub fn conversation(&self, conversation_id: &str) -> Result<Option<Conversation>, Error> {
        Ok(self
            .inner
            .cache()?
            .conversation(conversation_id)?
            .map(Conversation::from))
    }

    /// The cached feed, in display order.
    pub fn feed(&self) -> Result<Vec<FeedItem>, Error> {
        Ok(self
            .inner
            .cache()?
            .feed()?
            .into_iter()
            .map(FeedItem::from)
            .collect())
    }

    /// The cached sync tokens: (feed token, conversation → token).
    pub fn sync_tokens(&self) -> Result<(u64, Vec<(String, u64)>), Error> {
        let c = self.inner.cache()?;
        Ok((c.feed_token()?, c.tokens()?))
    }

    /// Older messages from the router (before `before_seq`, 0 = newest),
    /// stored in the cache too.
    pub async fn history(
        &self,
        conversation_id: &str,
        before_seq: u64,
        limit: u32,
    ) -> Result<(Vec<Message>, u64), Error> {
        let req = cp::HistoryRequest {
            conversation_id: conversation_id.into(),
            before_seq,
            limit,
        };
        let p = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.history(net::authed(&t, req)).await }
            })
            .await?;
        self.inner
            .counters
            .messages
            .fetch_add(p.messages.len() as u64, Ordering::Relaxed);
        self.inner.cache()?.store_messages(&p.messages)?;
        Ok((
            p.messages.into_iter().map(Message::from).collect(),
            p.before_seq,
        ))
    }

    /// Moves the read mark.
    pub async fn mark_read(&self, conversation_id: &str, seq: u64) -> Result<Conversation, Error> {
        let req = cp::MarkReadRequest {
            conversation_id: conversation_id.into(),
            seq,
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.mark_read(net::authed(&t, req)).await }
            })
            .await?;
        conv_reply(r)
    }

    // -- conversations, users, friends ------------------------------------

    /// The direct conversation with a friend (created on first use).
    pub async fn create_direct(&self, user_id: &str) -> Result<Conversation, Error> {
        let req = cp::UserRef {
            user_id: user_id.into(),
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.create_direct(net::authed(&t, req)).await }
            })
            .await?;
        conv_reply(r)
    }

    /// A new group (the id is chosen here, so a retry after a failover
    /// can't create two).
    pub async fn create_group(
        &self,
        name: &str,
        member_ids: Vec<String>,
    ) -> Result<Conversation, Error> {
        let req = cp::CreateGroupRequest {
            conversation_id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            member_ids,
            retention_ms: 0,
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.create_group(net::authed(&t, req)).await }
            })
            .await?;
        conv_reply(r)
    }

    pub async fn lookup_user(&self, username: &str) -> Result<User, Error> {
        let req = cp::LookupUserRequest {
            username: username.into(),
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.lookup_user(net::authed(&t, req)).await }
            })
            .await?;
        user_reply(r)
    }

    pub async fn get_user(&self, user_id: &str) -> Result<User, Error> {
        let req = cp::UserRef {
            user_id: user_id.into(),
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.get_user(net::authed(&t, req)).await }
            })
            .await?;
        user_reply(r)
    }

    /// Sends a friend request (or accepts theirs).
    pub async fn friend_request(&self, user_id: &str) -> Result<Friend, Error> {
        let req = cp::UserRef {
            user_id: user_id.into(),
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.friend_request(net::authed(&t, req)).await }
            })
            .await?;
        friend_reply(r)
    }

    pub async fn friend_accept(&self, user_id: &str) -> Result<Friend, Error> {
        let req = cp::UserRef {
            user_id: user_id.into(),
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.friend_accept(net::authed(&t, req)).await }
            })
            .await?;
        friend_reply(r)
    }

    /// Friends, requests and blocks (every page).
    /// Online and last seen of yourself and your friends among `user_ids`
    /// (1-100; others are left out). While connected, the push stream then
    /// delivers [`Event::Presence`] when they come online or go offline
    /// (until it reconnects: call again after [`Event::Connected`]).
    pub async fn presence(&self, user_ids: &[String]) -> Result<Vec<Presence>, Error> {
        let req = cp::GetPresenceRequest {
            user_ids: user_ids.to_vec(),
        };
        let r = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.get_presence(net::authed(&t, req)).await }
            })
            .await?;
        Ok(r.users.into_iter().map(Presence::from).collect())
    }

    pub async fn friends(&self) -> Result<Vec<Friend>, Error> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let req = cp::ListFriendsRequest {
                after: after.clone(),
                limit: 500,
            };
            let r = self
                .inner
                .authed(move |mut api, t| {
                    let req = req.clone();
                    async move { api.list_friends(net::authed(&t, req)).await }
                })
                .await?;
            out.extend(r.friends.into_iter().map(Friend::from));
            if r.next_after.is_empty() {
                return Ok(out);
            }
            after = r.next_after;
        }
    }

    /// The feed read from the router (first `limit` rows), not the cache.
    pub async fn fetch_feed(&self, limit: u32) -> Result<Vec<FeedItem>, Error> {
        let req = cp::GetFeedRequest {
            limit,
            cursor: Vec::new(),
        };
        let p = self
            .inner
            .authed(move |mut api, t| {
                let req = req.clone();
                async move { api.get_feed(net::authed(&t, req)).await }
            })
            .await?;
        Ok(p.entries.into_iter().map(FeedItem::from).collect())
    }

    /// The session token (for the HTTP media endpoint).
    pub fn token(&self) -> Result<String, Error> {
        self.inner.token()?.ok_or(Error::NotLoggedIn)
    }
}

fn conv_reply(r: cp::ConversationReply) -> Result<Conversation, Error> {
    r.conversation
        .map(Conversation::from)
        .ok_or_else(|| Error::Invalid("empty reply".into()))
}

fn user_reply(r: cp::UserReply) -> Result<User, Error> {
    r.user
        .map(User::from)
        .ok_or_else(|| Error::Invalid("empty reply".into()))
}

fn friend_reply(r: cp::FriendshipReply) -> Result<Friend, Error> {
    r.friendship
        .map(Friend::from)
        .ok_or_else(|| Error::Invalid("empty reply".into()))
}

impl Inner {
    pub(crate) fn cache(&self) -> Result<std::sync::MutexGuard<'_, Cache>, Error> {
        self.cache
            .lock()
            .map_err(|_| Error::Invalid("cache lock poisoned".into()))
    }

    pub(crate) fn token(&self) -> Result<Option<String>, Error> {
        self.token
            .lock()
            .map(|t| t.clone())
            .map_err(|_| Error::Invalid("token lock poisoned".into()))
    }

    /// Delivers an event to the app, or notes that one was dropped.
    pub(crate) fn emit(&self, e: Event) {
        if self.lagged.load(Ordering::Acquire) && self.events.try_send(Event::Lagged).is_ok() {
            self.lagged.store(false, Ordering::Release);
        }
        if self.events.try_send(e).is_err() {
            self.lagged.store(true, Ordering::Release);
        }
    }
}
