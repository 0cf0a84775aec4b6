//! Natter's storage core: many Raft groups (openraft) per node, all stored
//! in one RocksDB, talking gRPC to their peers.
//!
//! This is the only crate that names openraft. The rest of Natter sees
//! [`RaftHost`] — start a group with a [`natter_kv::StateMachine`], propose to
//! it, read from it, change its membership, ask its status — and the
//! [`TransportService`](service::TransportService) to mount on the node's
//! gRPC server.
//!
//! Modules, one job each:
//! - [`db`]: the shared RocksDB (column families, key layout, open + verify);
//! - [`group_commit`]: one WAL fsync shared by concurrent appends;
//! - `batch`: concurrent proposals to a group become one log entry;
//! - [`log_store`]: openraft's log storage for one group;
//! - [`sm_store`]: openraft's state machine for one group, and snapshots;
//! - [`kv_view`]: the transactional and snapshot views a state machine sees;
//! - [`network`] / [`service`]: outgoing and incoming Raft RPCs;
//! - [`host`]: the public interface.

mod batch;
pub mod db;
mod eager;
pub mod group_commit;
pub mod host;
pub mod kv_view;
pub mod log_store;
pub mod network;
pub mod read_index;
pub mod service;
pub mod sm_store;
mod types;

pub use group_commit::SyncMode;
pub use host::{Consistency, GroupStatus, HostConfig, Proposed, RaftHost, RaftTimings};
pub use types::NodeId;

use openraft::{AnyError, StorageIOError};

/// State shared by every group of a node.
pub(crate) struct Shared {
    pub(crate) db: std::sync::Arc<rocksdb::DB>,
    pub(crate) syncer: group_commit::Syncer,
    pub(crate) sync_mode: SyncMode,
    pub(crate) per_write_lock: std::sync::Mutex<()>,
    pub(crate) counters: Counters,
}

/// Node-wide event counters, for metrics.
#[derive(Default)]
pub(crate) struct Counters {
    /// Snapshots built to compact the log.
    pub(crate) snapshots_built: std::sync::atomic::AtomicU64,
    /// Snapshots serialized to be sent to a lagging replica.
    pub(crate) snapshots_sent: std::sync::atomic::AtomicU64,
    /// Snapshots received and installed.
    pub(crate) snapshots_installed: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Write options for every write of this node: `sync` asks for an fsync
    /// before returning (ignored, like the WAL itself, in the unsafe
    /// negative-control mode).
    pub(crate) fn write_opts(&self, sync: bool) -> rocksdb::WriteOptions {
        let mut w = rocksdb::WriteOptions::default();
        if self.sync_mode == SyncMode::UnsafeNoWal {
            w.disable_wal(true);
        } else {
            w.set_sync(sync);
        }
        w
    }
}

/// Failures of the storage layer itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(String),
    #[error("data is corrupt or incomplete: {0}")]
    Corrupt(String),
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("node {0} was removed from its cluster (tombstone in its data dir); it never starts again: start a new node with an empty data dir and --join instead")]
    Retired(u64),
}

impl StoreError {
    pub(crate) fn rocks(e: rocksdb::Error) -> Self {
        StoreError::Rocks(e.to_string())
    }

    pub(crate) fn into_raft_read(self) -> types::StorageError {
        StorageIOError::read(AnyError::new(&self)).into()
    }

    pub(crate) fn into_raft_write(self) -> types::StorageError {
        StorageIOError::write(AnyError::new(&self)).into()
    }
}

/// Errors of the [`RaftHost`] interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This node does not lead the group; `leader` is (id, address) when known.
    #[error("not the leader of group {group}")]
    NotLeader {
        group: u32,
        leader: Option<(NodeId, String)>,
    },
    #[error("group {0} is not hosted on this node")]
    UnknownGroup(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error("internal lock poisoned")]
    Poisoned,
}
