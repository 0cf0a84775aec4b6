//! openraft's log storage for one group, on the node's shared RocksDB.
//!
//! Durability rules (see ARCHITECTURE.md, "Invariants"):
//! - `save_vote` writes with `sync = true` before it returns;
//! - `append` writes the entries at once (readable immediately) and completes
//!   openraft's callback only after the WAL holding them is fsynced, through
//!   the shared [`Syncer`](crate::group_commit::Syncer);
//! - `purge` records `last_purged` in the same batch that deletes the entries,
//!   and `truncate` deletes a suffix, so the log never has a hole.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::db::{self, CF_LOG, CF_META, TAG_COMMITTED, TAG_PURGED, TAG_VOTE};
use crate::eager::Eager;
use crate::group_commit::SyncMode;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::{Shared, StoreError};

/// The log of one group. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    group: u32,
    shared: Arc<Shared>,
    /// Sends a leader's new entries to its followers during its fsync.
    eager: Option<Arc<Eager>>,
}

impl LogStore {
    pub(crate) fn new(group: u32, shared: Arc<Shared>, eager: Option<Arc<Eager>>) -> Self {
        LogStore {
            group,
            shared,
            eager,
        }
    }

    /// The id of the entry before `index`, for an eager append: remembered
    /// from the previous append, else read back.
    fn id_before(&self, eager: &Eager, index: u64) -> Option<LogId> {
        let prev = index.checked_sub(1)?;
        if let Some(last) = eager.last().filter(|l| l.index == prev) {
            return Some(last);
        }
        if let Ok(Some(e)) = self.read_range(prev, index).map(|v| v.into_iter().next()) {
            return Some(e.log_id);
        }
        self.get_meta::<LogId>(TAG_PURGED, "last purged log id")
            .ok()
            .flatten()
            .filter(|p| p.index == prev)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        tag: u8,
        what: &str,
    ) -> Result<Option<T>, StoreError> {
        let db = &self.shared.db;
        match db
            .get_cf(db::cf(db, CF_META)?, db::meta_key(self.group, tag))
            .map_err(StoreError::rocks)?
        {
            None => Ok(None),
            Some(raw) => Ok(Some(db::decode(what, &raw)?)),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, tag: u8, v: &T, sync: bool) -> Result<(), StoreError> {
        let db = &self.shared.db;
        let w = self.shared.write_opts(sync);
        db.put_cf_opt(
            db::cf(db, CF_META)?,
            db::meta_key(self.group, tag),
            db::encode(v)?,
            &w,
        )
        .map_err(StoreError::rocks)
    }

    fn last_entry(&self) -> Result<Option<Entry>, StoreError> {
        let db = &self.shared.db;
        let end = db::group_end(self.group);
        let mut it = db.iterator_cf(
            db::cf(db, CF_LOG)?,
            IteratorMode::From(&end, Direction::Reverse),
        );
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(StoreError::rocks)?;
                if !k.starts_with(&db::group_prefix(self.group)) {
                    return Ok(None);
                }
                Ok(Some(db::decode("log entry", &v)?))
            }
        }
    }

    /// Entries with index in `[start, end)`.
    pub(crate) fn read_range(&self, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
        let db = &self.shared.db;
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let from = db::log_key(self.group, start);
        let it = db.iterator_cf(
            db::cf(db, CF_LOG)?,
            IteratorMode::From(&from, Direction::Forward),
        );
        for (expect, item) in (start..).zip(it) {
            let (k, v) = item.map_err(StoreError::rocks)?;
            if !k.starts_with(&db::group_prefix(self.group)) {
                break;
            }
            let index = db::log_index(self.group, &k)?;
            if index >= end {
                break;
            }
            if index != expect {
                return Err(StoreError::Corrupt(format!(
                    "group {}: log has a hole: expected index {expect}, found {index}",
                    self.group
                )));
            }
            let entry: Entry = db::decode("log entry", &v)?;
            if entry.log_id.index != index {
                return Err(StoreError::Corrupt(format!(
                    "group {}: entry stored at index {index} claims index {}",
                    self.group, entry.log_id.index
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Checks the group's log on start: entries contiguous after the purge
    /// point. Returns a description of the problem, if any.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        let purged: Option<LogId> = self.get_meta(TAG_PURGED, "last purged log id")?;
        let first = purged.map(|l| l.index + 1).unwrap_or(0);
        if let Some(last) = self.last_entry()? {
            let entries = self.read_range(first, last.log_id.index + 1)?;
            let expected = last.log_id.index + 1 - first;
            if entries.len() as u64 != expected {
                return Err(StoreError::Corrupt(format!(
                    "group {}: log should hold indexes {first}..={} but holds {} entries",
                    self.group,
                    last.log_id.index,
                    entries.len()
                )));
            }
        }
        Ok(())
    }
}

fn bound_start(b: Bound<&u64>) -> u64 {
    match b {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    }
}

fn bound_end(b: Bound<&u64>) -> u64 {
    match b {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_range(
            bound_start(range.start_bound()),
            bound_end(range.end_bound()),
        )
        .map_err(|e| e.into_raft_read())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self
            .get_meta(TAG_PURGED, "last purged log id")
            .map_err(|e| e.into_raft_read())?;
        let last = self.last_entry().map_err(|e| e.into_raft_read())?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.map(|e| e.log_id).or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(TAG_VOTE, vote, true)
            .map_err(|e| e.into_raft_write())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(TAG_VOTE, "vote")
            .map_err(|e| e.into_raft_read())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced by itself: it rides the next append's or vote's fsync.
        // Losing it only makes a restarted node re-learn it from the leader
        // (Raft's commit index is volatile state; etcd's raft does not sync
        // for it either). Awaiting the shared fsync here stalls this group's
        // core before every apply: -24 % sends/s at one client, measured.
        // ARCHITECTURE.md, invariant 1.
        if let Some(eager) = &self.eager {
            // A leader's eager requests carry it to the followers.
            eager.set_committed(committed);
        }
        self.put_meta(TAG_COMMITTED, &committed, false)
            .map_err(|e| e.into_raft_write())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId>>(TAG_COMMITTED, "committed log id")
            .map_err(|e| e.into_raft_read())?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = &self.shared.db;
        let cf = db::cf(db, CF_LOG).map_err(|e| e.into_raft_write())?;
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        for entry in &entries {
            let raw = db::encode(entry).map_err(|e| e.into_raft_write())?;
            batch.put_cf(cf, db::log_key(self.group, entry.log_id.index), raw);
        }
        match self.shared.sync_mode {
            SyncMode::GroupCommit => {
                db.write_opt(batch, &self.shared.write_opts(false))
                    .map_err(|e| StoreError::rocks(e).into_raft_write())?;
                // A follower's append is on the path of the leader's
                // commit: when no fsync is running or queued, it fsyncs
                // here, without the hand-off to the syncer's thread and
                // back. A leader's own entries share the syncer's fsync.
                let own = (self.eager.as_ref())
                    .zip(entries.first())
                    .is_some_and(|(eager, first)| eager.is_own(first));
                let inline = (!own).then(|| self.shared.syncer.sync_now()).flatten();
                match inline {
                    Some(res) => callback.log_io_completed(res),
                    None => self
                        .shared
                        .syncer
                        .after_sync(Box::new(move |res| callback.log_io_completed(res))),
                }
                // While the leader's fsync runs, the followers get the entries.
                if let Some(eager) = &self.eager {
                    let last = entries.last().map(|e| e.log_id);
                    eager.post(entries, |index| self.id_before(eager, index));
                    eager.set_last(last);
                }
            }
            SyncMode::UnsafeNoWal => {
                db.write_opt(batch, &self.shared.write_opts(false))
                    .map_err(|e| StoreError::rocks(e).into_raft_write())?;
                callback.log_io_completed(Ok(()));
            }
            SyncMode::PerWrite => {
                let shared = self.shared.clone();
                let res = tokio::task::spawn_blocking(move || {
                    use std::sync::atomic::Ordering::Relaxed;
                    let _one_at_a_time = shared.per_write_lock.lock();
                    let w = shared.write_opts(true);
                    let r = shared.db.write_opt(batch, &w);
                    shared.syncer.stats.fsyncs.fetch_add(1, Relaxed);
                    shared.syncer.stats.appends.fetch_add(1, Relaxed);
                    r
                })
                .await;
                let res = match res {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                callback.log_io_completed(res);
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if let Some(eager) = &self.eager {
            eager.set_last(None);
        }
        let db = &self.shared.db;
        let cf = db::cf(db, CF_LOG).map_err(|e| e.into_raft_write())?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf,
            &db::log_key(self.group, log_id.index)[..],
            &db::group_end(self.group)[..],
        );
        db.write_opt(batch, &self.shared.write_opts(false))
            .map_err(|e| StoreError::rocks(e).into_raft_write())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if let Some(eager) = &self.eager {
            // A purge after a snapshot install can move the log's end.
            eager.set_last(None);
        }
        let db = &self.shared.db;
        let run = || -> Result<(), StoreError> {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                db::cf(db, CF_META)?,
                db::meta_key(self.group, TAG_PURGED),
                db::encode(&log_id)?,
            );
            batch.delete_range_cf(
                db::cf(db, CF_LOG)?,
                db::log_key(self.group, 0),
                db::log_key(self.group, log_id.index.saturating_add(1)),
            );
            db.write_opt(batch, &self.shared.write_opts(false))
                .map_err(StoreError::rocks)
        };
        run().map_err(|e| e.into_raft_write())
    }
}
