//! The client side of delta sync: what a device holds for a conversation and
//! for its feed, and the rules that keep it equal to a full read when it
//! applies the deltas a shard returns (`ConversationSync`, `FeedPage`).
//!
//! Pure and I/O-free like the rest of the model, so the state machine's own
//! property tests, the multi-process tests and the client SDK all apply
//! deltas the same way.

use std::collections::BTreeMap;

use crate::messages::effective_expiry;
use crate::pb;

/// A delta the client cannot apply (a malformed or inconsistent answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("a conversation change with nothing in it")]
    EmptyChange,
    #[error("tombstone for message {0} still carries content")]
    TombstoneWithContent(u64),
    #[error("a feed entry without its conversation")]
    EmptyFeedEntry,
}

/// What a client holds of one conversation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConversationView {
    pub meta: Option<pb::Conversation>,
    pub messages: BTreeMap<u64, pb::Message>,
}

/// The metadata a client holds after a metadata change `new` arrives over
/// what it held: `new` replaces it, member list included when
/// `members_complete`; otherwise `new` names only the members whose view
/// changed, which replace theirs (by user id) in the held list. The result
/// always holds the whole list (`members_complete`).
pub fn merge_conversation(
    held: Option<&pb::Conversation>,
    new: &pb::Conversation,
) -> pb::Conversation {
    let mut out = new.clone();
    if !new.members_complete {
        let mut members = held.map(|h| h.members.clone()).unwrap_or_default();
        for m in &new.members {
            match members.iter_mut().find(|x| x.user_id == m.user_id) {
                Some(x) => *x = m.clone(),
                None => members.push(m.clone()),
            }
        }
        out.members = members;
        out.members_complete = true;
    }
    out
}

impl ConversationView {
    /// Applies changes in order: metadata replaces (merging a partial member
    /// list, [`merge_conversation`]), live messages upsert, tombstones remove.
    pub fn apply(&mut self, changes: &[pb::ConversationChange]) -> Result<(), ViewError> {
        use pb::conversation_change::Change;
        for c in changes {
            match &c.change {
                Some(Change::Conversation(m)) => {
                    self.meta = Some(merge_conversation(self.meta.as_ref(), m))
                }
                Some(Change::Message(m)) if m.deleted => {
                    if !m.text.is_empty() || !m.media.is_empty() {
                        return Err(ViewError::TombstoneWithContent(m.seq));
                    }
                    self.messages.remove(&m.seq);
                }
                Some(Change::Message(m)) => {
                    self.messages.insert(m.seq, m.clone());
                }
                None => return Err(ViewError::EmptyChange),
            }
        }
        Ok(())
    }

    /// Drops what the client must no longer show at `now_ms` (the answer's
    /// `now_ms`): messages at or before my cleared mark, and expired ones.
    pub fn normalize(&mut self, now_ms: u64) {
        let (cleared, retention) = self
            .meta
            .as_ref()
            .map_or((0, 0), |m| (m.my_cleared_through_seq, m.retention_ms));
        self.messages.retain(|&seq, m| {
            let at = effective_expiry(m.expires_at_ms, m.created_at_ms, retention);
            seq > cleared && (at == 0 || at > now_ms)
        });
    }
}

/// What a client holds of its feed, by conversation id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeedView(pub BTreeMap<String, pb::FeedEntry>);

impl FeedView {
    pub fn from_entries(entries: &[pb::FeedEntry], now_ms: u64) -> Result<FeedView, ViewError> {
        let mut f = FeedView::default();
        f.apply(entries)?;
        f.normalize(now_ms);
        Ok(f)
    }

    /// Upserts rows; hidden and removed rows leave the view.
    pub fn apply(&mut self, entries: &[pb::FeedEntry]) -> Result<(), ViewError> {
        for e in entries {
            let c = e.conversation.as_ref().ok_or(ViewError::EmptyFeedEntry)?;
            if c.hidden || c.removed {
                self.0.remove(&c.conversation_id);
            } else {
                self.0.insert(c.conversation_id.clone(), e.clone());
            }
        }
        Ok(())
    }

    /// Blanks previews of messages that expired by `now_ms`.
    pub fn normalize(&mut self, now_ms: u64) {
        for e in self.0.values_mut() {
            if let Some(c) = e.conversation.as_mut() {
                if c.preview
                    .as_ref()
                    .is_some_and(|p| p.expires_at_ms != 0 && p.expires_at_ms <= now_ms)
                {
                    c.preview = None;
                }
            }
        }
    }

    /// The rows in feed order: unread (and not muted) first, then most
    /// recent activity, then conversation id.
    pub fn ordered(&self) -> Vec<&pb::FeedEntry> {
        let mut v: Vec<&pb::FeedEntry> = self.0.values().collect();
        v.sort_by_key(|e| feed_order_key(e));
        v
    }
}

/// The feed's sort key (smaller first).
pub fn feed_order_key(e: &pb::FeedEntry) -> (bool, std::cmp::Reverse<u64>, String) {
    match e.conversation.as_ref() {
        Some(c) => (
            c.unread_count == 0 || e.muted,
            std::cmp::Reverse(c.last_activity_ms),
            c.conversation_id.clone(),
        ),
        None => (true, std::cmp::Reverse(0), String::new()),
    }
}
