//! openraft's state machine for one group: applies committed entries through
//! the plugged-in [`StateMachine`], builds and installs snapshots.
//!
//! Every applied batch is one RocksDB `WriteBatch`: the rows the commands
//! wrote, the applied log id and the membership, so a crash never leaves rows
//! without the index that covers them (or the reverse). These writes are not
//! fsynced by themselves: the log entries they come from are, and a restart
//! re-applies from the last applied id that reached the disk.
//!
//! Snapshots are the group's rows read from one RocksDB snapshot, together
//! with the applied id and membership read from the same snapshot, so a
//! snapshot built while apply runs is still a state that existed.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use natter_kv::StateMachine;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::db::{self, CF_META, CF_SM, TAG_APPLIED, TAG_MEMBERSHIP};
use crate::kv_view::{Txn, View};
use crate::types::{Entry, LogId, Reply, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::{Shared, StoreError};

/// Serialized form of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    applied: Option<LogId>,
    membership: StoredMembership,
    /// Byte strings: the layout of `(Vec<u8>, Vec<u8>)` pairs, copied at once.
    rows: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
}

/// The state machine of one group.
#[derive(Clone)]
pub struct SmStore {
    group: u32,
    shared: Arc<Shared>,
    machine: Arc<dyn StateMachine>,
    snapshots_built: Arc<AtomicU64>,
}

impl SmStore {
    pub(crate) fn new(group: u32, shared: Arc<Shared>, machine: Arc<dyn StateMachine>) -> Self {
        SmStore {
            group,
            shared,
            machine,
            snapshots_built: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn applied(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let db = &self.shared.db;
        let meta = db::cf(db, CF_META)?;
        let applied = match db
            .get_cf(meta, db::meta_key(self.group, TAG_APPLIED))
            .map_err(StoreError::rocks)?
        {
            Some(raw) => db::decode("applied log id", &raw)?,
            None => None,
        };
        let membership = match db
            .get_cf(meta, db::meta_key(self.group, TAG_MEMBERSHIP))
            .map_err(StoreError::rocks)?
        {
            Some(raw) => db::decode("membership", &raw)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    /// Answers a query from a consistent view of the group's rows.
    pub(crate) fn query(&self, query: &[u8]) -> Result<Vec<u8>, StoreError> {
        let db = &self.shared.db;
        let view = View {
            db,
            cf: db::cf(db, CF_SM)?,
            snapshot: db.snapshot(),
            group: self.group,
        };
        self.machine
            .query(&view, query)
            .map_err(|e| StoreError::Corrupt(format!("group {} query: {e}", self.group)))
    }

    fn apply_batch(&self, entries: Vec<Entry>) -> Result<Vec<Reply>, StoreError> {
        let db = &self.shared.db;
        let mut txn = Txn::new(db, db::cf(db, CF_SM)?, self.group);
        let mut replies = Vec::with_capacity(entries.len());
        let mut last = None;
        let mut membership = None;
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Reply::default()),
                EntryPayload::Normal(cmd) => {
                    let mut apply = |c: &[u8]| {
                        self.machine.apply(&mut txn, c).map_err(|e| {
                            StoreError::Corrupt(format!(
                                "group {} applying {}: {e}",
                                self.group, entry.log_id
                            ))
                        })
                    };
                    match crate::batch::decode(&cmd.0) {
                        // Several proposals in one entry: applied in order,
                        // answered together.
                        Some(commands) => {
                            let outs = commands?
                                .iter()
                                .map(|c| apply(c))
                                .collect::<Result<Vec<_>, _>>()?;
                            replies.push(Reply(crate::batch::encode_list(&outs)?));
                        }
                        None => replies.push(Reply(apply(&cmd.0)?)),
                    }
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    replies.push(Reply::default());
                }
            }
        }
        let Some(last) = last else { return Ok(replies) };
        let meta = db::cf(db, CF_META)?;
        let mut batch = WriteBatch::default();
        txn.write_into(&mut batch);
        batch.put_cf(
            meta,
            db::meta_key(self.group, TAG_APPLIED),
            db::encode(&Some(last))?,
        );
        if let Some(m) = membership {
            batch.put_cf(
                meta,
                db::meta_key(self.group, TAG_MEMBERSHIP),
                db::encode(&m)?,
            );
        }
        db.write_opt(batch, &self.shared.write_opts(false))
            .map_err(StoreError::rocks)?;
        Ok(replies)
    }

    /// A snapshot of the current state: applied id, membership and (with
    /// `with_rows`) every row, all read from one RocksDB snapshot.
    fn build(&self, with_rows: bool) -> Result<Snapshot<TypeConfig>, StoreError> {
        let db = &self.shared.db;
        let snap = db.snapshot();
        let meta = db::cf(db, CF_META)?;
        let applied: Option<LogId> = match snap
            .get_cf(meta, db::meta_key(self.group, TAG_APPLIED))
            .map_err(StoreError::rocks)?
        {
            Some(raw) => db::decode("applied log id", &raw)?,
            None => None,
        };
        let membership: StoredMembership = match snap
            .get_cf(meta, db::meta_key(self.group, TAG_MEMBERSHIP))
            .map_err(StoreError::rocks)?
        {
            Some(raw) => db::decode("membership", &raw)?,
            None => StoredMembership::default(),
        };
        let mut rows = Vec::new();
        if with_rows {
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(db::group_prefix(self.group).to_vec());
            ro.set_iterate_upper_bound(db::group_end(self.group));
            ro.fill_cache(false);
            for item in snap.iterator_cf_opt(db::cf(db, CF_SM)?, ro, IteratorMode::Start) {
                let (k, v) = item.map_err(StoreError::rocks)?;
                rows.push((
                    serde_bytes::ByteBuf::from(k.get(4..).unwrap_or_default()),
                    serde_bytes::ByteBuf::from(v.to_vec()),
                ));
            }
        }
        let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match &applied {
            Some(l) => format!("g{}-t{}-i{}-n{n}", self.group, l.leader_id.term, l.index),
            None => format!("g{}-empty-n{n}", self.group),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership.clone(),
            snapshot_id,
        };
        let body = SnapshotBody {
            applied,
            membership,
            rows,
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(db::encode(&body)?)),
        })
    }

    fn install(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
        let body: SnapshotBody = db::decode("received snapshot", data)?;
        if body.applied != meta.last_log_id {
            return Err(StoreError::Corrupt(format!(
                "snapshot {} says it covers {:?} but its body covers {:?}",
                meta.snapshot_id, meta.last_log_id, body.applied
            )));
        }
        let db = &self.shared.db;
        let sm = db::cf(db, CF_SM)?;
        let meta_cf = db::cf(db, CF_META)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            sm,
            &db::group_prefix(self.group)[..],
            &db::group_end(self.group)[..],
        );
        for (k, v) in &body.rows {
            batch.put_cf(sm, db::sm_key(self.group, k), &v[..]);
        }
        batch.put_cf(
            meta_cf,
            db::meta_key(self.group, TAG_APPLIED),
            db::encode(&body.applied)?,
        );
        batch.put_cf(
            meta_cf,
            db::meta_key(self.group, TAG_MEMBERSHIP),
            db::encode(&body.membership)?,
        );
        let w = self.shared.write_opts(true);
        db.write_opt(batch, &w).map_err(StoreError::rocks)
    }
}

impl SmStore {
    fn count(&self, which: impl Fn(&crate::Counters) -> &std::sync::atomic::AtomicU64) {
        which(&self.shared.counters).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    /// openraft builds snapshots to compact the log and keeps only their
    /// meta (openraft 0.9, `core/sm/worker.rs`). The state machine is
    /// persistent, so the rows themselves are serialized only when a
    /// snapshot is actually sent ([`RaftStateMachine::get_current_snapshot`]);
    /// building one for compaction costs two point reads, not a copy of the
    /// shard.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.count(|c| &c.snapshots_built);
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build(false))
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()).into_raft_read())?
            .map_err(|e| e.into_raft_read())
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.applied().map_err(|e| e.into_raft_read())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_batch(entries.into_iter().collect())
            .map_err(|e| e.into_raft_write())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.count(|c| &c.snapshots_installed);
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install(&meta, snapshot.get_ref()))
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()).into_raft_write())?
            .map_err(|e| e.into_raft_write())
    }

    /// The current state is always a valid snapshot (the state machine is
    /// persistent), so it is built on demand instead of kept as a second copy.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let (applied, _) = self.applied().map_err(|e| e.into_raft_read())?;
        if applied.is_none() {
            return Ok(None);
        }
        self.count(|c| &c.snapshots_sent);
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build(true))
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()).into_raft_read())?
            .map(Some)
            .map_err(|e| e.into_raft_read())
    }
}
