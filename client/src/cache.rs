//! The local cache: one SQLite file holding the session, the sync tokens,
//! conversations, messages, the feed and the outgoing queue. Rows are the
//! protobuf encodings of the model's types (forward compatible: a newer
//! router's extra fields survive a round trip), with the columns queries
//! need beside them.
//!
//! Deltas are applied with the model's client rules (`proto/natter/model.proto`,
//! docs/protocol.md "Client rules"), each event in one transaction together
//! with its token, so a crash never leaves rows and tokens out of step.

use std::path::Path;

use natter_model::pb;
use prost::Message as _;
use rusqlite::{params, Connection, OptionalExtension};

use crate::Error;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
  id TEXT PRIMARY KEY,
  token INTEGER NOT NULL DEFAULT 0,
  meta BLOB
);
CREATE TABLE IF NOT EXISTS messages (
  conversation_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  created_at_ms INTEGER NOT NULL,
  expires_at_ms INTEGER NOT NULL,
  body BLOB NOT NULL,
  PRIMARY KEY (conversation_id, seq)
);
CREATE TABLE IF NOT EXISTS feed (
  conversation_id TEXT PRIMARY KEY,
  entry BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  conversation_id TEXT NOT NULL,
  client_msg_id TEXT NOT NULL UNIQUE,
  text TEXT NOT NULL,
  media BLOB NOT NULL,
  ttl_ms INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0
);
";

/// A message waiting in the outgoing queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub id: i64,
    pub conversation_id: String,
    pub client_msg_id: String,
    pub text: String,
    pub media: Vec<pb::Media>,
    pub ttl_ms: u64,
    pub attempts: u32,
}

/// What applying one event changed (for the SDK's events and counters).
#[derive(Debug, Default)]
pub struct Applied {
    pub upserted: Vec<pb::Message>,
    pub removed: Vec<u64>,
    pub meta_changed: bool,
    /// Message rows the event carried.
    pub rows: u64,
}

pub struct Cache {
    db: Connection,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Cache {
    pub fn open(path: &Path) -> Result<Cache, Error> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA)?;
        Ok(Cache { db })
    }

    pub fn get(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self
            .db
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set(&self, key: &str, value: &str) -> Result<(), Error> {
        self.db.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<(), Error> {
        self.db.execute("DELETE FROM kv WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Forgets everything synced and queued (another user logged in).
    pub fn wipe(&mut self) -> Result<(), Error> {
        self.db.execute_batch(
            "DELETE FROM kv; DELETE FROM conversations; DELETE FROM messages;
             DELETE FROM feed; DELETE FROM outbox;",
        )?;
        Ok(())
    }

    pub fn feed_token(&self) -> Result<u64, Error> {
        Ok(self
            .get("feed_token")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Every conversation's token (0 = known but never synced).
    pub fn tokens(&self) -> Result<Vec<(String, u64)>, Error> {
        let mut st = self.db.prepare("SELECT id, token FROM conversations")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, u(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn token(&self, conv: &str) -> Result<u64, Error> {
        Ok(self
            .db
            .query_row(
                "SELECT token FROM conversations WHERE id = ?1",
                [conv],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(u)
            .unwrap_or(0))
    }

    /// Applies a pushed feed page; false when it doesn't continue from the
    /// token held (the caller resyncs).
    pub fn apply_feed(&mut self, from_token: u64, p: &pb::FeedPage) -> Result<bool, Error> {
        let tx = self.db.transaction()?;
        let held: u64 = tx
            .query_row("SELECT value FROM kv WHERE key = 'feed_token'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if p.cold_start {
            tx.execute("DELETE FROM feed", [])?;
        } else if from_token != held {
            return Ok(false);
        }
        for e in &p.entries {
            let Some(c) = &e.conversation else { continue };
            if c.hidden || c.removed {
                tx.execute(
                    "DELETE FROM feed WHERE conversation_id = ?1",
                    [&c.conversation_id],
                )?;
            } else {
                let mut e = e.clone();
                if let Some(conv) = e.conversation.as_mut() {
                    if conv
                        .preview
                        .as_ref()
                        .is_some_and(|pv| pv.expires_at_ms > 0 && pv.expires_at_ms <= p.now_ms)
                    {
                        conv.preview = None;
                    }
                }
                tx.execute(
                    "INSERT INTO feed (conversation_id, entry) VALUES (?1, ?2)
                     ON CONFLICT(conversation_id) DO UPDATE SET entry = excluded.entry",
                    params![c.conversation_id, e.encode_to_vec()],
                )?;
            }
            if c.removed {
                forget(&tx, &c.conversation_id)?;
            } else {
                tx.execute(
                    "INSERT OR IGNORE INTO conversations (id, token) VALUES (?1, 0)",
                    [&c.conversation_id],
                )?;
            }
        }
        tx.execute(
            "INSERT INTO kv (key, value) VALUES ('feed_token', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [p.token.to_string()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Applies a conversation page (pushed or fetched); `None` when it
    /// doesn't continue from the token held.
    pub fn apply_conversation(
        &mut self,
        conv: &str,
        from_token: u64,
        s: &pb::ConversationSync,
    ) -> Result<Option<Applied>, Error> {
        use pb::conversation_change::Change;
        let tx = self.db.transaction()?;
        let held: u64 = tx
            .query_row(
                "SELECT token FROM conversations WHERE id = ?1",
                [conv],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(u)
            .unwrap_or(0);
        if s.cold_start {
            tx.execute("DELETE FROM messages WHERE conversation_id = ?1", [conv])?;
        } else if from_token != held {
            return Ok(None);
        }
        tx.execute(
            "INSERT OR IGNORE INTO conversations (id, token) VALUES (?1, 0)",
            [conv],
        )?;
        let mut out = Applied::default();
        for ch in &s.changes {
            match &ch.change {
                Some(Change::Conversation(m)) => {
                    // A delta may name only the members that changed: merged
                    // into the list held (the model's client rule).
                    let held = if m.members_complete {
                        None
                    } else {
                        stored_meta(&tx, conv)?
                    };
                    let merged = natter_model::client::merge_conversation(held.as_ref(), m);
                    tx.execute(
                        "UPDATE conversations SET meta = ?2 WHERE id = ?1",
                        params![conv, merged.encode_to_vec()],
                    )?;
                    out.meta_changed = true;
                }
                Some(Change::Message(m)) => {
                    out.rows += 1;
                    if m.deleted {
                        tx.execute(
                            "DELETE FROM messages WHERE conversation_id = ?1 AND seq = ?2",
                            params![conv, i(m.seq)],
                        )?;
                        out.removed.push(m.seq);
                    } else {
                        upsert_message(&tx, m)?;
                        out.upserted.push(m.clone());
                    }
                }
                None => {}
            }
        }
        normalize(&tx, conv, s.now_ms)?;
        tx.execute(
            "UPDATE conversations SET token = ?2 WHERE id = ?1",
            params![conv, i(s.token)],
        )?;
        tx.commit()?;
        Ok(Some(out))
    }

    /// Stores older messages read with `History` (no token change).
    pub fn store_messages(&mut self, msgs: &[pb::Message]) -> Result<(), Error> {
        let tx = self.db.transaction()?;
        for m in msgs.iter().filter(|m| !m.deleted) {
            upsert_message(&tx, m)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn forget_conversation(&mut self, conv: &str) -> Result<(), Error> {
        let tx = self.db.transaction()?;
        forget(&tx, conv)?;
        tx.execute("DELETE FROM feed WHERE conversation_id = ?1", [conv])?;
        tx.commit()?;
        Ok(())
    }

    pub fn conversation(&self, conv: &str) -> Result<Option<pb::Conversation>, Error> {
        stored_meta(&self.db, conv)
    }

    /// The newest `limit` messages of a conversation, ascending.
    pub fn messages(&self, conv: &str, limit: usize) -> Result<Vec<pb::Message>, Error> {
        let mut st = self.db.prepare(
            "SELECT body FROM (SELECT seq, body FROM messages WHERE conversation_id = ?1
               ORDER BY seq DESC LIMIT ?2) ORDER BY seq ASC",
        )?;
        let rows = st.query_map(params![conv, i(limit as u64)], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for b in rows {
            out.push(pb::Message::decode(&b?[..])?);
        }
        Ok(out)
    }

    pub fn message_count(&self, conv: &str) -> Result<u64, Error> {
        Ok(u(self.db.query_row(
            "SELECT COUNT(*) FROM messages WHERE conversation_id = ?1",
            [conv],
            |r| r.get(0),
        )?))
    }

    /// The feed in the router's order: unread and unmuted first, then last
    /// activity descending, ties by conversation id.
    pub fn feed(&self) -> Result<Vec<pb::FeedEntry>, Error> {
        let mut st = self.db.prepare("SELECT entry FROM feed")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for b in rows {
            out.push(pb::FeedEntry::decode(&b?[..])?);
        }
        out.sort_by(|a, b| {
            let key = |e: &pb::FeedEntry| {
                let c = e.conversation.clone().unwrap_or_default();
                (
                    c.unread_count == 0 || e.muted,
                    std::cmp::Reverse(c.last_activity_ms),
                    c.conversation_id,
                )
            };
            key(a).cmp(&key(b))
        });
        Ok(out)
    }

    // -- outgoing queue ----------------------------------------------------

    pub fn enqueue(
        &self,
        conv: &str,
        client_msg_id: &str,
        text: &str,
        media: &[pb::Media],
        ttl_ms: u64,
    ) -> Result<(), Error> {
        let media = pb::MessagePage {
            messages: vec![pb::Message {
                media: media.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        self.db.execute(
            "INSERT INTO outbox (conversation_id, client_msg_id, text, media, ttl_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![conv, client_msg_id, text, media, i(ttl_ms)],
        )?;
        Ok(())
    }

    /// The oldest queued message.
    pub fn next_pending(&self) -> Result<Option<Pending>, Error> {
        Ok(self.pending(1)?.into_iter().next())
    }

    pub fn pending(&self, limit: usize) -> Result<Vec<Pending>, Error> {
        let mut st = self.db.prepare(
            "SELECT id, conversation_id, client_msg_id, text, media, ttl_ms, attempts
             FROM outbox ORDER BY id LIMIT ?1",
        )?;
        let rows = st.query_map([i(limit as u64)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, conversation_id, client_msg_id, text, media, ttl, attempts) = row?;
            let media = pb::MessagePage::decode(&media[..])?
                .messages
                .into_iter()
                .next()
                .map(|m| m.media)
                .unwrap_or_default();
            out.push(Pending {
                id,
                conversation_id,
                client_msg_id,
                text,
                media,
                ttl_ms: u(ttl),
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            });
        }
        Ok(out)
    }

    pub fn pending_count(&self) -> Result<u64, Error> {
        Ok(u(self.db.query_row(
            "SELECT COUNT(*) FROM outbox",
            [],
            |r| r.get(0),
        )?))
    }

    pub fn attempted(&self, id: i64) -> Result<(), Error> {
        self.db.execute(
            "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1",
            [id],
        )?;
        Ok(())
    }

    /// The router acknowledged (or refused for good) a queued message.
    pub fn dequeue(&mut self, id: i64, sent: Option<&pb::Message>) -> Result<(), Error> {
        let tx = self.db.transaction()?;
        tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
        if let Some(m) = sent {
            // Shown at once; the conversation's next delta carries it too.
            let known: bool = tx
                .query_row(
                    "SELECT COUNT(*) FROM conversations WHERE id = ?1 AND token > 0",
                    [&m.conversation_id],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)?;
            if known {
                upsert_message(&tx, m)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn upsert_message(tx: &rusqlite::Transaction<'_>, m: &pb::Message) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO messages (conversation_id, seq, created_at_ms, expires_at_ms, body)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(conversation_id, seq) DO UPDATE SET
           created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms,
           body = excluded.body",
        params![
            m.conversation_id,
            i(m.seq),
            i(m.created_at_ms),
            i(m.expires_at_ms),
            m.encode_to_vec()
        ],
    )?;
    Ok(())
}

fn forget(tx: &rusqlite::Transaction<'_>, conv: &str) -> Result<(), Error> {
    tx.execute("DELETE FROM messages WHERE conversation_id = ?1", [conv])?;
    tx.execute("DELETE FROM conversations WHERE id = ?1", [conv])?;
    Ok(())
}

/// The conversation's metadata as stored, if any.
fn stored_meta(db: &rusqlite::Connection, conv: &str) -> Result<Option<pb::Conversation>, Error> {
    let blob: Option<Vec<u8>> = db
        .query_row(
            "SELECT meta FROM conversations WHERE id = ?1",
            [conv],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(blob.map(|b| pb::Conversation::decode(&b[..])).transpose()?)
}

/// Drops what the client must no longer show (the model's client rules):
/// messages at or before my cleared mark, expired ones, and those past the
/// conversation's retention.
fn normalize(tx: &rusqlite::Transaction<'_>, conv: &str, now_ms: u64) -> Result<(), Error> {
    if let Some(m) = stored_meta(tx, conv)? {
        tx.execute(
            "DELETE FROM messages WHERE conversation_id = ?1 AND seq <= ?2",
            params![conv, i(m.my_cleared_through_seq)],
        )?;
        if m.retention_ms > 0 {
            tx.execute(
                "DELETE FROM messages WHERE conversation_id = ?1 AND created_at_ms + ?2 <= ?3",
                params![conv, i(m.retention_ms), i(now_ms)],
            )?;
        }
    }
    tx.execute(
        "DELETE FROM messages WHERE conversation_id = ?1 AND expires_at_ms > 0 AND expires_at_ms <= ?2",
        params![conv, i(now_ms)],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::conversation_change::Change;

    fn msg(conv: &str, seq: u64, text: &str) -> pb::ConversationChange {
        pb::ConversationChange {
            change: Some(Change::Message(pb::Message {
                conversation_id: conv.into(),
                seq,
                text: text.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn deltas_apply_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        {
            let mut c = Cache::open(&path).unwrap();
            let cold = pb::ConversationSync {
                changes: vec![msg("c", 1, "a"), msg("c", 2, "b")],
                token: 5,
                cold_start: true,
                ..Default::default()
            };
            assert!(c.apply_conversation("c", 0, &cold).unwrap().is_some());
            // A page that doesn't continue from token 5 is refused.
            let skip = pb::ConversationSync {
                changes: vec![msg("c", 4, "d")],
                token: 9,
                ..Default::default()
            };
            assert!(c.apply_conversation("c", 7, &skip).unwrap().is_none());
            let mut tomb = msg("c", 1, "");
            if let Some(Change::Message(m)) = tomb.change.as_mut() {
                m.deleted = true;
            }
            let next = pb::ConversationSync {
                changes: vec![msg("c", 3, "c"), tomb],
                token: 8,
                ..Default::default()
            };
            let a = c.apply_conversation("c", 5, &next).unwrap().unwrap();
            assert_eq!((a.rows, a.removed.clone()), (2, vec![1]));
            c.enqueue("c", "k1", "queued", &[], 0).unwrap();
        }
        let c = Cache::open(&path).unwrap();
        let texts: Vec<String> = c
            .messages("c", 10)
            .unwrap()
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(texts, ["b", "c"]);
        assert_eq!(c.token("c").unwrap(), 8);
        let p = c.next_pending().unwrap().unwrap();
        assert_eq!(
            (p.client_msg_id.as_str(), p.text.as_str()),
            ("k1", "queued")
        );
    }
}
