//! The history: every operation's invocation and completion, with times,
//! kept in memory for the checkers and written as JSON lines as it happens
//! (so a crashed run still leaves its history behind).
//!
//! Each operation has an `index`; its invocation and its completion are two
//! events with that index. Completion types follow Jepsen: `ok` (happened),
//! `fail` (definitely did not happen), `info` (unknown: may have happened).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    /// Append one message (SendMessage) with a unique client_msg_id.
    Send,
    /// Delta sync of a conversation view from a token (SyncConversation).
    Sync,
    /// A full linearizable read of a conversation (History).
    Read,
    /// The final read after healing: linearizable (`node` absent) or a
    /// stale read of one replica (`node` = its id).
    Final,
    /// A feed read: full (GetFeed pages) from token 0, else a delta sync
    /// (SyncFeed) from a token.
    Feed,
    /// The final full feed of a process's user, once feeds converged.
    FinalFeed,
    /// A fault injected or healed.
    Nemesis,
}

/// A message as a read saw it: (seq, client_msg_id).
pub type Seen = (u64, String);

/// A feed row as a read saw it: (conversation number, conversation
/// version it reflects, last seq).
pub type FeedSeen = (u32, u64, u64);

/// What a full feed read (token 0) showed of one row, in the order read:
/// enough to check its preview, its unread count and the feed order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedDetail {
    pub conv: u32,
    /// The conversation id (ties in the feed order break by it).
    pub id: String,
    pub preview_seq: u64,
    pub preview: String,
    pub unread: u64,
    pub activity_ms: u64,
    pub muted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    /// Nanoseconds since the run started (monotonic clock).
    pub time_ns: u64,
    pub process: u64,
    #[serde(rename = "type")]
    pub ty: Type,
    pub f: F,
    /// Conversation number (index into the run's conversation list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmid: Option<String>,
    /// Send ok: the seq the acknowledgement carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Sync: the token synced from (invoke); every token returned, page by
    /// page (completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<u64>>,
    /// Sync: the messages the deltas carried; read/final: the messages read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgs: Option<Vec<Seen>>,
    /// Feed reads: the rows returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<Vec<FeedSeen>>,
    /// Full feed reads: the rows' details, in the order returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_detail: Option<Vec<FeedDetail>>,
    /// Final: the replica read (absent: linearizable read via the leader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Sync: the shard answered with a cold start (it did not know the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold: Option<bool>,
    /// Free text: the error, or what the nemesis did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl Event {
    pub fn new(index: u64, time_ns: u64, process: u64, ty: Type, f: F) -> Event {
        Event {
            index,
            time_ns,
            process,
            ty,
            f,
            conv: None,
            cmid: None,
            seq: None,
            tokens: None,
            msgs: None,
            feed: None,
            feed_detail: None,
            node: None,
            cold: None,
            value: None,
        }
    }
}

struct Inner {
    events: Vec<Event>,
    out: Option<BufWriter<File>>,
    next: u64,
}

/// Records events; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    path: Option<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

/// An invoked operation, to complete.
#[derive(Clone, Debug)]
pub struct Pending {
    pub index: u64,
    pub process: u64,
    pub f: F,
}

impl Recorder {
    /// Records to `path` (JSON lines) and memory; `None`: memory only.
    pub fn new(path: Option<&Path>) -> std::io::Result<Recorder> {
        let out = match path {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        Ok(Recorder {
            start: Instant::now(),
            path: path.map(Path::to_path_buf),
            inner: Arc::new(Mutex::new(Inner {
                events: Vec::new(),
                out,
                next: 0,
            })),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn push(&self, mut e: Event, assign: bool) -> u64 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        if assign {
            e.index = g.next;
            g.next += 1;
        }
        // The time is taken under the lock, so file order is time order.
        e.time_ns = self.now_ns();
        let index = e.index;
        if let Some(out) = g.out.as_mut() {
            if let Ok(line) = serde_json::to_string(&e) {
                let _ = writeln!(out, "{line}");
            }
        }
        g.events.push(e);
        index
    }

    /// Records an invocation; `fill` sets its fields.
    pub fn invoke(&self, process: u64, f: F, fill: impl FnOnce(&mut Event)) -> Pending {
        let mut e = Event::new(0, 0, process, Type::Invoke, f);
        fill(&mut e);
        let index = self.push(e, true);
        Pending { index, process, f }
    }

    /// Records the completion of `p`.
    pub fn complete(&self, p: &Pending, ty: Type, fill: impl FnOnce(&mut Event)) {
        let mut e = Event::new(p.index, 0, p.process, ty, p.f);
        fill(&mut e);
        self.push(e, false);
    }

    pub fn flush(&self) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(out) = g.out.as_mut() {
                let _ = out.flush();
            }
        }
    }

    /// Every event so far, in time order.
    pub fn events(&self) -> Vec<Event> {
        self.inner
            .lock()
            .map(|g| g.events.clone())
            .unwrap_or_default()
    }
}

/// Reads a history file back (for replays and offline checking).
pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    use std::io::BufRead;
    let f = std::io::BufReader::new(File::open(path)?);
    let mut out = Vec::new();
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}
