//! The workload: client processes append uniquely identified messages to a
//! few hot group conversations and many cold ones, delta-sync the views they
//! follow, and now and then read a conversation in full. Every operation is
//! recorded (invoke, then ok / fail / info) in the history.
//!
//! The client sits behind [`MessagingClient`], so the node data API used now
//! can be swapped for the router + SDK path without touching the rest.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use natter_model::pb::{self, command::Op, conversation_change::Change, query::Q, response::R};
use natter_tests::natter::Natter;
use natter_tests::Outcome;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{FeedDetail, FeedSeen, Recorder, Seen, Type, F};

/// What a send ended with.
#[derive(Clone, Debug)]
pub enum SendResult {
    /// Committed at this seq.
    Ok(u64),
    /// Definitely not committed.
    Fail(String),
    /// Unknown.
    Info(String),
}

/// What one delta sync returned.
#[derive(Clone, Debug, Default)]
pub struct SyncResult {
    /// The token each page returned, in order.
    pub tokens: Vec<u64>,
    /// The messages the deltas carried.
    pub msgs: Vec<Seen>,
    /// The shard answered a cold start to a non-zero token.
    pub cold: bool,
}

/// A feed row's details as read: (conversation id, preview seq, preview
/// text, unread count, last activity, muted).
pub type RowDetail = (String, u64, String, u64, u64, bool);

fn detail(e: &pb::FeedEntry) -> Option<RowDetail> {
    let c = e.conversation.as_ref()?;
    let (seq, text) = c
        .preview
        .as_ref()
        .map_or((0, String::new()), |p| (p.seq, p.text.clone()));
    Some((
        c.conversation_id.clone(),
        seq,
        text,
        c.unread_count,
        c.last_activity_ms,
        e.muted,
    ))
}

/// What one feed read returned.
#[derive(Clone, Debug, Default)]
pub struct FeedSync {
    /// Full read: the feed version; delta: each page's token.
    pub tokens: Vec<u64>,
    /// (conversation id, version, last seq) of every row returned.
    pub rows: Vec<(String, u64, u64)>,
    /// The shard answered a cold start to a non-zero token.
    pub cold: bool,
    /// Full reads: every row's details, in the order read.
    pub details: Vec<RowDetail>,
}

/// The client path the workload drives.
pub trait MessagingClient: Clone + Send + Sync + 'static {
    /// The user id of workload process `p`.
    fn user_id(&self, p: u64) -> String;
    /// Creates a group conversation; returns its id.
    fn create_group(
        &self,
        creator: &str,
        members: &[String],
    ) -> impl Future<Output = Result<String>> + Send;
    /// One attempt at sending, with an honest outcome.
    fn send(
        &self,
        conv: &str,
        sender: &str,
        cmid: &str,
        text: &str,
    ) -> impl Future<Output = SendResult> + Send;
    /// Every change since `token` (0: cold start), paging to the end.
    fn sync(
        &self,
        viewer: &str,
        conv: &str,
        token: u64,
    ) -> impl Future<Output = Result<SyncResult>> + Send;
    /// The whole conversation, read linearizably.
    fn history(&self, viewer: &str, conv: &str) -> impl Future<Output = Result<Vec<Seen>>> + Send;
    /// The user's feed: in full (every page) for token 0, else the rows
    /// changed since `token`.
    fn feed(&self, user: &str, token: u64) -> impl Future<Output = Result<FeedSync>> + Send;
}

/// The node data API through the test harness (follows NotLeader answers).
#[derive(Clone)]
pub struct NodeApiClient {
    pub natter: Natter,
}

/// Pages per delta sync before giving up (bounds a runaway sync).
pub const MAX_SYNC_PAGES: usize = 1000;

impl FeedSync {
    /// Rows of a full read's page, with their details.
    pub fn add_page(&mut self, entries: &[pb::FeedEntry]) {
        self.add_rows(entries);
        self.details.extend(entries.iter().filter_map(detail));
    }

    /// Rows of a delta page.
    pub fn add_rows(&mut self, entries: &[pb::FeedEntry]) {
        self.rows.extend(entries.iter().filter_map(|e| {
            e.conversation
                .as_ref()
                .map(|c| (c.conversation_id.clone(), c.version, c.last_seq))
        }));
    }
}

impl MessagingClient for NodeApiClient {
    fn user_id(&self, p: u64) -> String {
        user(p)
    }

    async fn create_group(&self, creator: &str, members: &[String]) -> Result<String> {
        let id = natter_tests::natter::uuid();
        match self
            .natter
            .exec(Op::CreateGroup(pb::CreateGroup {
                conversation_id: id.clone(),
                creator_id: creator.to_string(),
                name: "jepsen".into(),
                member_ids: members.to_vec(),
                retention_ms: 0,
            }))
            .await?
        {
            R::Conversation(_) => Ok(id),
            other => bail!("create group: {other:?}"),
        }
    }

    async fn send(&self, conv: &str, sender: &str, cmid: &str, text: &str) -> SendResult {
        let (_, out) = self
            .natter
            .exec_once(Natter::send_op(conv, sender, cmid, text))
            .await;
        match out {
            Outcome::Ok(raw) => match natter_tests::natter::decode(&raw) {
                Ok(R::Sent(s)) => match s.message {
                    Some(m) => SendResult::Ok(m.seq),
                    None => SendResult::Info("sent without a message".into()),
                },
                // A rejected command changes nothing.
                Ok(R::Error(e)) => SendResult::Fail(format!("rejected: {e:?}")),
                Ok(other) => SendResult::Info(format!("unexpected response {other:?}")),
                Err(e) => SendResult::Info(format!("undecodable response: {e}")),
            },
            Outcome::Fail(e) => SendResult::Fail(e),
            Outcome::Info(e) => SendResult::Info(e),
        }
    }

    async fn sync(&self, viewer: &str, conv: &str, token: u64) -> Result<SyncResult> {
        sync_pages(token, |at| {
            let q = Q::SyncConversation(pb::SyncConversation {
                viewer_id: viewer.into(),
                conversation_id: conv.into(),
                token: at,
                limit: 50,
            });
            async move {
                match self.natter.query(q).await? {
                    R::ConversationSync(s) => Ok(s),
                    other => bail!("sync: {other:?}"),
                }
            }
        })
        .await
    }

    async fn history(&self, viewer: &str, conv: &str) -> Result<Vec<Seen>> {
        history_or_empty(&self.natter, viewer, conv).await
    }

    async fn feed(&self, user: &str, token: u64) -> Result<FeedSync> {
        let page = |q| async move {
            match self.natter.query(q).await? {
                R::Feed(p) => Ok(p),
                other => bail!("feed: {other:?}"),
            }
        };
        feed_pages(
            token,
            |cursor| {
                page(Q::GetFeed(pb::GetFeed {
                    user_id: user.into(),
                    limit: 100,
                    cursor,
                }))
            },
            |at| {
                page(Q::SyncFeed(pb::SyncFeed {
                    user_id: user.into(),
                    token: at,
                    limit: 50,
                }))
            },
        )
        .await
    }
}

/// A delta sync of one conversation from `token`, page by page until the
/// end (a cold start is one page): `fetch(at)` reads the page at token `at`.
/// The same rules for every client path.
pub async fn sync_pages<F, Fut>(token: u64, mut fetch: F) -> Result<SyncResult>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<pb::ConversationSync>>,
{
    let mut out = SyncResult::default();
    let mut at = token;
    for _ in 0..MAX_SYNC_PAGES {
        let s = fetch(at).await?;
        for c in &s.changes {
            if let Some(Change::Message(m)) = &c.change {
                out.msgs.push((m.seq, m.client_msg_id.clone()));
            }
        }
        out.tokens.push(s.token);
        if s.cold_start && token != 0 {
            out.cold = true;
            return Ok(out);
        }
        at = s.token;
        // A cold start is one page (plus History for older messages,
        // which the workload does not need: views start before sends).
        if !s.has_more || s.cold_start {
            return Ok(out);
        }
    }
    Err(anyhow!("sync did not end within {MAX_SYNC_PAGES} pages"))
}

/// A feed read: in full for token 0 (`get(cursor)` reads a page of the
/// feed), else every row changed since `token` (`sync(at)` reads the delta
/// page at `at`). The same rules for every client path.
pub async fn feed_pages<G, GF, S, SF>(token: u64, mut get: G, mut sync: S) -> Result<FeedSync>
where
    G: FnMut(Vec<u8>) -> GF,
    GF: Future<Output = Result<pb::FeedPage>>,
    S: FnMut(u64) -> SF,
    SF: Future<Output = Result<pb::FeedPage>>,
{
    let mut out = FeedSync::default();
    if token == 0 {
        let mut cursor = Vec::new();
        for _ in 0..MAX_SYNC_PAGES {
            let p = get(cursor).await?;
            if out.tokens.is_empty() {
                out.tokens.push(p.token);
            }
            out.add_page(&p.entries);
            if p.cursor.is_empty() {
                return Ok(out);
            }
            cursor = p.cursor;
        }
        bail!("feed did not end within {MAX_SYNC_PAGES} pages");
    }
    let mut at = token;
    for _ in 0..MAX_SYNC_PAGES {
        let p = sync(at).await?;
        out.tokens.push(p.token);
        out.add_rows(&p.entries);
        if p.cold_start {
            out.cold = true;
            return Ok(out);
        }
        at = p.token;
        if !p.has_more {
            return Ok(out);
        }
    }
    bail!("feed sync did not end within {MAX_SYNC_PAGES} pages")
}

/// The conversation's messages; a conversation the shard does not know is
/// empty (a node that lost everything answers NOT_FOUND, and the checker
/// must see that as losses, not as an unreadable conversation).
pub async fn history_or_empty(n: &Natter, viewer: &str, conv: &str) -> Result<Vec<Seen>> {
    let probe = n
        .query(Q::History(pb::History {
            viewer_id: viewer.into(),
            conversation_id: conv.into(),
            before_seq: 0,
            limit: 1,
        }))
        .await?;
    if let R::Error(e) = &probe {
        if e.code == pb::ErrorCode::NotFound as i32 {
            return Ok(Vec::new());
        }
        bail!("history of {conv}: {e:?}");
    }
    Ok(n.history(conv, viewer)
        .await?
        .into_iter()
        .map(|m| (m.seq, m.client_msg_id))
        .collect())
}

/// Shape and pace of the workload.
#[derive(Clone, Debug)]
pub struct WorkloadCfg {
    pub processes: u64,
    pub hot: usize,
    pub cold: usize,
    /// Share of sends that go to hot conversations.
    pub hot_share: f64,
    /// Share of operations that are delta syncs / full reads.
    pub sync_share: f64,
    pub read_share: f64,
    /// Share of operations that are feed reads.
    pub feed_share: f64,
    pub op_timeout: Duration,
    /// Pause between a process's operations.
    pub think: Duration,
    /// Attempts per message (retries of an indeterminate send reuse its id).
    pub send_attempts: u32,
}

/// The user id of process `p`'s sender.
pub fn user(p: u64) -> String {
    format!("00000000-0000-4000-8000-{:012x}", 0xa000 + p)
}

/// Conversations, hot ones first.
pub struct Conversations {
    pub ids: Vec<String>,
    pub hot: usize,
}

impl Conversations {
    /// Feed rows with conversation numbers (rows of other conversations
    /// are dropped).
    pub fn number(&self, rows: Vec<(String, u64, u64)>) -> Vec<FeedSeen> {
        rows.into_iter()
            .filter_map(|(id, v, s)| {
                self.ids
                    .iter()
                    .position(|x| *x == id)
                    .map(|i| (i as u32, v, s))
            })
            .collect()
    }

    /// Row details with conversation numbers (others are dropped).
    pub fn number_details(&self, rows: Vec<RowDetail>) -> Vec<FeedDetail> {
        rows.into_iter()
            .filter_map(|(id, preview_seq, preview, unread, activity_ms, muted)| {
                let conv = self.ids.iter().position(|x| *x == id)? as u32;
                Some(FeedDetail {
                    conv,
                    id,
                    preview_seq,
                    preview,
                    unread,
                    activity_ms,
                    muted,
                })
            })
            .collect()
    }
}

pub async fn setup<C: MessagingClient>(c: &C, cfg: &WorkloadCfg) -> Result<Conversations> {
    let members: Vec<String> = (1..cfg.processes).map(|p| c.user_id(p)).collect();
    let mut ids = Vec::new();
    for _ in 0..cfg.hot + cfg.cold {
        ids.push(c.create_group(&c.user_id(0), &members).await?);
    }
    Ok(Conversations { ids, hot: cfg.hot })
}

/// What a process leaves behind: its sync tokens, for the final catch-up.
#[derive(Debug, Default)]
pub struct ProcState {
    pub process: u64,
    pub tokens: BTreeMap<u32, u64>,
    pub feed_token: u64,
}

/// The conversations process `p` follows with delta syncs: every hot one
/// and one cold one.
pub fn follows(p: u64, convs: &Conversations) -> Vec<u32> {
    let mut v: Vec<u32> = (0..convs.hot as u32).collect();
    let cold = convs.ids.len() - convs.hot;
    if cold > 0 {
        v.push((convs.hot + (p as usize % cold)) as u32);
    }
    v
}

/// One delta sync, recorded. Returns the new token when it succeeded.
pub async fn record_sync<C: MessagingClient>(
    c: &C,
    rec: &Recorder,
    p: u64,
    conv_no: u32,
    conv: &str,
    token: u64,
    timeout: Duration,
) -> Option<u64> {
    let op = rec.invoke(p, F::Sync, |e| {
        e.conv = Some(conv_no);
        e.tokens = Some(vec![token]);
    });
    match tokio::time::timeout(timeout, c.sync(&c.user_id(p), conv, token)).await {
        Ok(Ok(s)) => {
            let next = s.tokens.last().copied().unwrap_or(token);
            rec.complete(&op, Type::Ok, |e| {
                e.tokens = Some(s.tokens);
                e.msgs = Some(s.msgs);
                e.cold = s.cold.then_some(true);
            });
            Some(next)
        }
        // Reads change nothing: a failed read is a fail, whatever the cause.
        Ok(Err(e)) => {
            rec.complete(&op, Type::Fail, |ev| ev.value = Some(format!("{e:#}")));
            None
        }
        Err(_) => {
            rec.complete(&op, Type::Fail, |ev| ev.value = Some("timeout".into()));
            None
        }
    }
}

/// One message to send: who (history process and sender), where, which id.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    pub process: u64,
    pub sender: &'a str,
    pub conv_no: u32,
    pub conv: &'a str,
    pub cmid: &'a str,
}

/// How a recorded send ended (after its retries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendEnd {
    Acked,
    /// The state machine rejected it (retrying cannot help).
    Rejected,
    /// Not committed (no leader reachable, ...).
    Failed,
    /// Still unknown after every attempt.
    Unknown,
}

/// One feed read of process `p`'s user, recorded (`f` = Feed or
/// FinalFeed). Returns the new token when it succeeded.
pub async fn record_feed<C: MessagingClient>(
    c: &C,
    rec: &Recorder,
    convs: &Conversations,
    p: u64,
    f: F,
    token: u64,
    timeout: Duration,
) -> Option<(u64, Vec<FeedSeen>)> {
    let op = rec.invoke(p, f, |e| e.tokens = Some(vec![token]));
    match tokio::time::timeout(timeout, c.feed(&c.user_id(p), token)).await {
        Ok(Ok(s)) => {
            let next = s.tokens.last().copied().unwrap_or(token);
            let rows = convs.number(s.rows);
            let kept = rows.clone();
            let details = (token == 0).then(|| convs.number_details(s.details));
            rec.complete(&op, Type::Ok, |e| {
                e.tokens = Some(s.tokens);
                e.feed = Some(rows);
                e.feed_detail = details;
                e.cold = s.cold.then_some(true);
            });
            Some((next, kept))
        }
        Ok(Err(e)) => {
            rec.complete(&op, Type::Fail, |ev| ev.value = Some(format!("{e:#}")));
            None
        }
        Err(_) => {
            rec.complete(&op, Type::Fail, |ev| ev.value = Some("timeout".into()));
            None
        }
    }
}

/// One send (as `sender`) with retries of the same client_msg_id while the
/// outcome is unknown; every attempt is recorded.
pub async fn record_send<C: MessagingClient>(
    c: &C,
    rec: &Recorder,
    m: &Outgoing<'_>,
    attempts: u32,
    timeout: Duration,
    stop: &AtomicBool,
) -> SendEnd {
    let Outgoing {
        process: p,
        sender,
        conv_no,
        conv,
        cmid,
    } = *m;
    for attempt in 0..attempts.max(1) {
        let op = rec.invoke(p, F::Send, |e| {
            e.conv = Some(conv_no);
            e.cmid = Some(cmid.to_string());
        });
        let res = match tokio::time::timeout(timeout, c.send(conv, sender, cmid, cmid)).await {
            Ok(r) => r,
            Err(_) => SendResult::Info("timeout".into()),
        };
        match res {
            SendResult::Ok(seq) => {
                rec.complete(&op, Type::Ok, |e| e.seq = Some(seq));
                return SendEnd::Acked;
            }
            SendResult::Fail(m) => {
                let end = if m.starts_with("rejected") {
                    SendEnd::Rejected
                } else {
                    SendEnd::Failed
                };
                rec.complete(&op, Type::Fail, |e| e.value = Some(m));
                return end;
            }
            SendResult::Info(m) => {
                rec.complete(&op, Type::Info, |e| e.value = Some(m));
            }
        }
        if stop.load(Ordering::Relaxed) || attempt + 1 == attempts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    SendEnd::Unknown
}

/// One process: runs until `stop` or `deadline`.
#[allow(clippy::too_many_arguments)]
pub async fn process<C: MessagingClient>(
    p: u64,
    c: C,
    rec: Recorder,
    convs: Arc<Conversations>,
    cfg: WorkloadCfg,
    seed: u64,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> ProcState {
    let mut rng = StdRng::seed_from_u64(seed ^ (p.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut state = ProcState {
        process: p,
        tokens: BTreeMap::new(),
        feed_token: 0,
    };
    let follow = follows(p, &convs);
    for &conv in &follow {
        if let Some(t) = record_sync(
            &c,
            &rec,
            p,
            conv,
            &convs.ids[conv as usize],
            0,
            cfg.op_timeout,
        )
        .await
        {
            state.tokens.insert(conv, t);
        }
    }
    let cold = convs.ids.len() - convs.hot;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let r: f64 = rng.gen();
        if r < cfg.sync_share && !follow.is_empty() {
            let conv = follow[rng.gen_range(0..follow.len())];
            let token = state.tokens.get(&conv).copied().unwrap_or(0);
            if let Some(t) = record_sync(
                &c,
                &rec,
                p,
                conv,
                &convs.ids[conv as usize],
                token,
                cfg.op_timeout,
            )
            .await
            {
                state.tokens.insert(conv, t);
            }
        } else if r < cfg.sync_share + cfg.read_share {
            let conv = rng.gen_range(0..convs.ids.len()) as u32;
            let op = rec.invoke(p, F::Read, |e| e.conv = Some(conv));
            match tokio::time::timeout(
                cfg.op_timeout,
                c.history(&c.user_id(p), &convs.ids[conv as usize]),
            )
            .await
            {
                Ok(Ok(msgs)) => rec.complete(&op, Type::Ok, |e| e.msgs = Some(msgs)),
                Ok(Err(e)) => rec.complete(&op, Type::Fail, |ev| ev.value = Some(format!("{e:#}"))),
                Err(_) => rec.complete(&op, Type::Fail, |ev| ev.value = Some("timeout".into())),
            }
        } else if r < cfg.sync_share + cfg.read_share + cfg.feed_share {
            if let Some((t, _)) = record_feed(
                &c,
                &rec,
                &convs,
                p,
                F::Feed,
                state.feed_token,
                cfg.op_timeout,
            )
            .await
            {
                state.feed_token = t;
            }
        } else {
            let conv = if cold == 0 || rng.gen_bool(cfg.hot_share.clamp(0.0, 1.0)) {
                rng.gen_range(0..convs.hot.max(1)) as u32
            } else {
                (convs.hot + rng.gen_range(0..cold)) as u32
            };
            let cmid = format!("p{p}-{n}");
            n += 1;
            let sender = c.user_id(p);
            let m = Outgoing {
                process: p,
                sender: &sender,
                conv_no: conv,
                conv: &convs.ids[conv as usize],
                cmid: &cmid,
            };
            record_send(&c, &rec, &m, cfg.send_attempts, cfg.op_timeout, &stop).await;
        }
        let think = cfg.think.as_millis() as u64;
        if think > 0 {
            tokio::time::sleep(Duration::from_millis(
                rng.gen_range(think / 2..=think * 3 / 2),
            ))
            .await;
        }
    }
    state
}
