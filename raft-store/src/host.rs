//! [`RaftHost`]: the groups one node hosts, and the interface the rest of
//! Natter uses to reach them (propose, read, membership, status). Nothing
//! outside this crate names openraft.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use natter_kv::StateMachine;
use natter_proto::cluster::raft_transport_server::RaftTransportServer;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use rocksdb::{IteratorMode, DB};
use serde::{Deserialize, Serialize};

use crate::db::{self, CF_META, TAG_REMOVED, TAG_VOTE};
use crate::eager::Eager;
use crate::group_commit::{SyncMode, Syncer};
use crate::log_store::LogStore;
use crate::network::{NetworkFactory, Peers, MAX_RAFT_MESSAGE};
use crate::service::TransportService;
use crate::sm_store::SmStore;
use crate::types::{NodeId, Raft};
use crate::{Error, Shared, StoreError};

/// Raft timings and log-compaction knobs, the same for every group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftTimings {
    /// Leader heartbeat period. Slow on purpose: dozens of idle groups per
    /// node each send one per follower per period. openraft 0.9 also uses it
    /// as the timeout of every AppendEntries RPC, so too short a value turns
    /// a slow fsync on a busy machine into timeouts and resends.
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log behind it) every this many entries.
    pub snapshot_logs: u64,
    /// Entries kept behind a snapshot, so a briefly lagging follower catches up
    /// from the log instead of a snapshot.
    pub keep_logs: u64,
    /// Per snapshot chunk.
    pub install_snapshot_timeout_ms: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_ms: 500,
            election_min_ms: 1500,
            election_max_ms: 3000,
            snapshot_logs: 20_000,
            keep_logs: 1_000,
            install_snapshot_timeout_ms: 10_000,
        }
    }
}

/// What a node needs to host groups.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub node_id: NodeId,
    /// This node's Raft address ("host:port"), as peers reach it.
    pub addr: String,
    pub data_dir: PathBuf,
    pub timings: RaftTimings,
    pub sync_mode: SyncMode,
    /// A leader sends new entries to its followers during its own fsync
    /// (see `eager.rs`); off, replication starts after it.
    pub eager_replication: bool,
    /// Checksum every stored block at start.
    pub verify_on_open: bool,
}

/// Read consistency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Confirmed leader (read-index), served once applied up to it.
    Linearizable,
    /// This replica's applied state, possibly behind.
    Stale,
}

/// Result of a committed proposal.
#[derive(Debug, Clone)]
pub struct Proposed {
    pub response: Vec<u8>,
    pub index: u64,
}

/// A group as this node sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupStatus {
    pub group: u32,
    pub state: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    /// Highest index known committed: on a leader, the one a majority of
    /// voters hold; elsewhere, the applied index (a lower bound).
    pub committed_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Per follower, the last index it is known to hold (leader only).
    pub matched: BTreeMap<NodeId, u64>,
    /// Append requests this node sent to a follower during its own fsync
    /// (eager replication), since start.
    #[serde(default)]
    pub eager_appends: u64,
    /// openraft append requests an eager request's answer stood in for.
    pub eager_answered: u64,
    /// Empty appends answered by a recent eager answer instead of sent.
    #[serde(default)]
    pub notices_spared: u64,
}

#[derive(Clone)]
struct Group {
    raft: Raft,
    sm: SmStore,
    /// Linearizable reads share leadership confirmations.
    reads: Arc<crate::read_index::ReadIndex>,
    /// Set while leadership is being handed to this (id, address).
    handing_off: Arc<std::sync::Mutex<Option<(NodeId, String)>>>,
    /// Batches concurrent proposals into log entries.
    proposer: crate::batch::Proposer,
    /// Sends new entries to followers during the leader's fsync.
    eager: Option<Arc<Eager>>,
}

/// Every Raft group hosted on this node, over one RocksDB.
pub struct RaftHost {
    cfg: HostConfig,
    shared: Arc<Shared>,
    peers: Arc<Peers>,
    groups: RwLock<HashMap<u32, Group>>,
}

fn not_leader<E>(group: u32, fwd: Option<(NodeId, Option<BasicNode>)>) -> Error {
    let _ = std::marker::PhantomData::<E>;
    Error::NotLeader {
        group,
        leader: fwd.map(|(id, n)| (id, n.map(|n| n.addr).unwrap_or_default())),
    }
}

/// A client write's error as this crate's: NotLeader with the leader's
/// address when openraft forwards, otherwise the error's text.
pub(crate) fn write_error(
    group: u32,
    e: &RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            not_leader::<()>(group, f.leader_id.map(|id| (id, f.leader_node.clone())))
        }
        other => Error::Raft(format!("group {group}: {other}")),
    }
}

impl RaftHost {
    /// Opens the node's database (refusing a damaged or foreign one) and the
    /// shared WAL syncer. Groups are started separately.
    pub fn open(cfg: HostConfig) -> Result<Arc<RaftHost>, Error> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            StoreError::Corrupt(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let db = Arc::new(db::open(&cfg.data_dir, cfg.node_id, cfg.verify_on_open)?);
        let syncer = Syncer::start(db.clone(), &cfg.data_dir);
        let shared = Arc::new(Shared {
            db,
            syncer,
            sync_mode: cfg.sync_mode,
            per_write_lock: Default::default(),
            counters: Default::default(),
        });
        Ok(Arc::new(RaftHost {
            cfg,
            shared,
            peers: Arc::new(Peers::default()),
            groups: RwLock::new(HashMap::new()),
        }))
    }

    pub fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    pub fn addr(&self) -> &str {
        &self.cfg.addr
    }

    /// Groups that have Raft state on disk (a saved vote), i.e. that this node
    /// hosted before it stopped.
    pub fn groups_on_disk(&self) -> Result<BTreeSet<u32>, Error> {
        let db: &DB = &self.shared.db;
        let mut out = BTreeSet::new();
        let mut removed = BTreeSet::new();
        for item in db.iterator_cf(db::cf(db, CF_META)?, IteratorMode::Start) {
            let (k, _) = item.map_err(StoreError::rocks)?;
            if k.len() == 5 && k[4] == TAG_VOTE {
                out.insert(u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
            }
            if k.len() == 5 && k[4] == TAG_REMOVED {
                removed.insert(u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
            }
        }
        Ok(out.difference(&removed).copied().collect())
    }

    /// Whether `group`'s replica on this node was removed (tombstoned).
    pub fn is_removed(&self, group: u32) -> Result<bool, Error> {
        let db: &DB = &self.shared.db;
        Ok(db
            .get_cf(db::cf(db, CF_META)?, db::meta_key(group, TAG_REMOVED))
            .map_err(StoreError::rocks)?
            .is_some())
    }

    /// Deletes every row of `group` in every column family, and writes the
    /// group's tombstone when `tombstone` (one synced batch).
    fn wipe_group(&self, group: u32, tombstone: bool) -> Result<(), Error> {
        let db: &DB = &self.shared.db;
        let mut batch = rocksdb::WriteBatch::default();
        let (from, to) = (db::group_prefix(group), db::group_end(group));
        for name in [db::CF_LOG, db::CF_META, db::CF_SM] {
            batch.delete_range_cf(db::cf(db, name)?, &from[..], &to[..]);
        }
        if tombstone {
            batch.put_cf(db::cf(db, CF_META)?, db::meta_key(group, TAG_REMOVED), b"");
        }
        db.write_opt(batch, &self.shared.write_opts(true))
            .map_err(StoreError::rocks)?;
        Ok(())
    }

    /// Starts an empty replica of `group` on this node, to be added to the
    /// group as a learner by its leader. A replica that runs already, or has
    /// state on disk, is kept as it is; one removed before starts over empty.
    pub async fn host_new_replica(
        &self,
        group: u32,
        machine: Arc<dyn StateMachine>,
    ) -> Result<(), Error> {
        if self.raft(group).is_none() && self.is_removed(group)? {
            self.wipe_group(group, false)?;
        }
        self.start_group(group, machine).await
    }

    /// Stops this node's replica of `group` and deletes its data, leaving a
    /// tombstone so a restart does not bring it back. Only for a replica its
    /// group no longer counts as a member; refused while it leads.
    pub async fn remove_replica(&self, group: u32) -> Result<(), Error> {
        if self.is_leader(group) {
            return Err(Error::Raft(format!(
                "group {group}: this node leads it; it cannot drop its replica"
            )));
        }
        let g = self
            .groups
            .write()
            .map_err(|_| Error::Poisoned)?
            .remove(&group);
        if let Some(g) = g {
            let _ = g.raft.shutdown().await;
        }
        self.wipe_group(group, true)?;
        tracing::info!(group, "replica removed from this node; its data is deleted");
        Ok(())
    }

    /// This node was removed from its cluster: stops and deletes every
    /// group and writes the node tombstone ([`db::RETIRED_KEY`]), so it
    /// refuses to start again.
    pub async fn retire(&self) -> Result<(), Error> {
        let groups: Vec<(u32, Raft)> = match self.groups.write() {
            Ok(mut g) => g.drain().map(|(id, g)| (id, g.raft)).collect(),
            Err(_) => return Err(Error::Poisoned),
        };
        for (_, raft) in &groups {
            let _ = raft.shutdown().await;
        }
        let on_disk = self.groups_on_disk()?;
        for group in groups.iter().map(|(g, _)| *g).chain(on_disk) {
            self.wipe_group(group, true)?;
        }
        let db: &DB = &self.shared.db;
        db.put_cf_opt(
            db::cf(db, CF_META)?,
            db::RETIRED_KEY,
            b"",
            &self.shared.write_opts(true),
        )
        .map_err(StoreError::rocks)?;
        tracing::warn!(
            "this node was removed from the cluster: every group deleted, tombstone written"
        );
        Ok(())
    }

    fn raft_config(&self) -> Result<Arc<Config>, Error> {
        let t = &self.cfg.timings;
        let c = Config {
            cluster_name: "natter".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_min_ms,
            election_timeout_max: t.election_max_ms,
            install_snapshot_timeout: t.install_snapshot_timeout_ms,
            max_payload_entries: 512,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_logs),
            max_in_snapshot_log_to_keep: t.keep_logs,
            // Purge as soon as a snapshot allows, in batches no larger than
            // a snapshot interval.
            purge_batch_size: t.snapshot_logs.clamp(1, 256),
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        };
        Ok(Arc::new(
            c.validate().map_err(|e| Error::Config(e.to_string()))?,
        ))
    }

    /// Starts (or restarts from disk) `group` with `machine` as its state
    /// machine. Starting a running group again does nothing.
    pub async fn start_group(
        &self,
        group: u32,
        machine: Arc<dyn StateMachine>,
    ) -> Result<(), Error> {
        if self
            .groups
            .read()
            .map_err(|_| Error::Poisoned)?
            .contains_key(&group)
        {
            return Ok(());
        }
        let eager = self
            .cfg
            .eager_replication
            .then(|| Arc::new(Eager::new(group, self.cfg.node_id, self.peers.clone())));
        let log = LogStore::new(group, self.shared.clone(), eager.clone());
        log.check()?;
        let sm = SmStore::new(group, self.shared.clone(), machine);
        let net = NetworkFactory {
            group,
            from: self.cfg.node_id,
            peers: self.peers.clone(),
            eager: eager.clone(),
        };
        let raft = Raft::new(self.cfg.node_id, self.raft_config()?, net, log, sm.clone())
            .await
            .map_err(|e| Error::Raft(format!("group {group}: {e}")))?;
        if let Some(eager) = &eager {
            eager.watch(raft.server_metrics());
        }
        let proposer = crate::batch::Proposer::start(group, raft.clone());
        self.groups
            .write()
            .map_err(|_| Error::Poisoned)?
            .entry(group)
            .or_insert(Group {
                raft,
                sm,
                reads: Default::default(),
                handing_off: Default::default(),
                proposer,
                eager,
            });
        Ok(())
    }

    pub(crate) fn raft(&self, group: u32) -> Option<Raft> {
        self.groups.read().ok()?.get(&group).map(|g| g.raft.clone())
    }

    fn group(&self, group: u32) -> Result<Group, Error> {
        self.groups
            .read()
            .map_err(|_| Error::Poisoned)?
            .get(&group)
            .cloned()
            .ok_or(Error::UnknownGroup(group))
    }

    /// Whether `group` runs on this node.
    pub fn hosts(&self, group: u32) -> bool {
        self.groups
            .read()
            .map(|g| g.contains_key(&group))
            .unwrap_or(false)
    }

    /// The groups running on this node.
    pub fn hosted(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .groups
            .read()
            .map(|g| g.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Makes `members` the first voters of a new group. Harmless on a group
    /// that already has state (it is then a no-op).
    pub async fn initialize(
        &self,
        group: u32,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), Error> {
        let g = self.group(group)?;
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        match g.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(Error::Raft(format!("initializing group {group}: {e}"))),
        }
    }

    /// Replicates `command` to a majority (fsynced), applies it, and returns
    /// the state machine's response.
    pub async fn propose(&self, group: u32, command: Vec<u8>) -> Result<Proposed, Error> {
        let g = self.group(group)?;
        if let Some(to) = g.handing_off.lock().map_err(|_| Error::Poisoned)?.clone() {
            return Err(Error::NotLeader {
                group,
                leader: Some(to),
            });
        }
        if command.starts_with(crate::batch::MARK) {
            return Err(Error::Raft(format!(
                "group {group}: a command may not start with the batch mark"
            )));
        }
        let (response, index) = g.proposer.propose(command).await?;
        Ok(Proposed { response, index })
    }

    /// Answers `query` from the group's state machine.
    pub async fn read(
        &self,
        group: u32,
        query: &[u8],
        consistency: Consistency,
    ) -> Result<(Vec<u8>, u64), Error> {
        let g = self.group(group)?;
        if consistency == Consistency::Linearizable {
            let raft = g.raft.clone();
            g.reads
                .confirm(move || {
                    let raft = raft.clone();
                    async move {
                        raft.ensure_linearizable()
                            .await
                            .map(|_| ())
                            .map_err(|e| match e {
                                RaftError::APIError(
                                    openraft::error::CheckIsLeaderError::ForwardToLeader(f),
                                ) => not_leader::<()>(
                                    group,
                                    f.leader_id.map(|id| (id, f.leader_node)),
                                ),
                                other => Error::Raft(format!("group {group}: {other}")),
                            })
                    }
                })
                .await?;
        }
        let applied = g
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        Ok((g.sm.query(query)?, applied))
    }

    /// Adds `node` as a learner and waits until it has caught up.
    pub async fn add_learner(&self, group: u32, node: NodeId, addr: &str) -> Result<(), Error> {
        let g = self.group(group)?;
        g.raft
            .add_learner(
                node,
                BasicNode {
                    addr: addr.to_string(),
                },
                true,
            )
            .await
            .map(|_| ())
            .map_err(|e| write_error(group, &e))
    }

    /// Removes learners from the group's membership.
    pub async fn remove_learners(&self, group: u32, ids: BTreeSet<NodeId>) -> Result<(), Error> {
        let g = self.group(group)?;
        g.raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map(|_| ())
            .map_err(|e| write_error(group, &e))
    }

    /// Snapshots built (log compaction), sent and installed since start.
    pub fn snapshot_counts(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.counters;
        (
            c.snapshots_built.load(Relaxed),
            c.snapshots_sent.load(Relaxed),
            c.snapshots_installed.load(Relaxed),
        )
    }

    /// The WAL syncer's latency histograms (fsync, append wait), to register
    /// in a metrics registry.
    pub fn sync_histograms(&self) -> Vec<prometheus::Histogram> {
        let s = &self.shared.syncer.stats;
        [&s.fsync_seconds, &s.append_wait_seconds]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Makes `voters` the group's voting members (joint consensus).
    pub async fn change_voters(&self, group: u32, voters: BTreeSet<NodeId>) -> Result<(), Error> {
        let g = self.group(group)?;
        g.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map(|_| ())
            .map_err(|e| write_error(group, &e))
    }

    /// Asks the group to build a snapshot now (and purge its log behind it).
    pub async fn trigger_snapshot(&self, group: u32) -> Result<(), Error> {
        self.group(group)?
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Starts an election for `group` on this node now. openraft 0.9 has no
    /// leader transfer; a campaign by the chosen node is the hand-off: it wins
    /// when its log is at least as up to date as the voters'.
    pub async fn campaign(&self, group: u32) -> Result<(), Error> {
        self.group(group)?
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Starts (Some) or ends (None) handing this leader's leadership of
    /// `group` to another node. While it lasts, proposals are refused with
    /// NotLeader naming the target, so the log stops growing.
    pub fn set_handing_off(&self, group: u32, to: Option<(NodeId, String)>) -> Result<(), Error> {
        let g = self.group(group)?;
        let ending = to.is_none();
        *g.handing_off.lock().map_err(|_| Error::Poisoned)? = to;
        if ending {
            self.pause_leadership(group, false)?;
        }
        Ok(())
    }

    /// Stops (or resumes) this node's heartbeats and elections for `group`.
    /// Paused, its leader lease — which makes every peer reject a campaign —
    /// runs out, so another node's campaign can win.
    pub fn pause_leadership(&self, group: u32, pause: bool) -> Result<(), Error> {
        let g = self.group(group)?;
        g.raft.runtime_config().heartbeat(!pause);
        g.raft.runtime_config().elect(!pause);
        Ok(())
    }

    /// Whether `node` holds every entry of this leader's log for `group`.
    pub fn caught_up(&self, group: u32, node: NodeId) -> bool {
        let Some(raft) = self.raft(group) else {
            return false;
        };
        let m = raft.metrics().borrow().clone();
        let last = m.last_log_index;
        m.replication
            .as_ref()
            .and_then(|r| r.get(&node).cloned())
            .is_some_and(|matched| matched.map(|l| l.index) == last)
    }

    /// The address this node knows for `node` in `group`'s membership.
    pub fn member_addr(&self, group: u32, node: NodeId) -> Option<String> {
        let raft = self.raft(group)?;
        let m = raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&node).map(|n| n.addr.clone())
    }

    /// Whether this node currently leads `group`.
    pub fn is_leader(&self, group: u32) -> bool {
        self.raft(group)
            .map(|r| r.metrics().borrow().state == ServerState::Leader)
            .unwrap_or(false)
    }

    /// The leader of `group` as this node knows it: (id, address).
    pub fn leader(&self, group: u32) -> Option<(NodeId, String)> {
        let raft = self.raft(group)?;
        let m = raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((id, addr))
    }

    /// Waits until `group`'s applied index changes (or `timeout` passes);
    /// returns the applied index. For workers that react to new commits.
    pub async fn wait_applied_change(&self, group: u32, timeout: Duration) -> Result<u64, Error> {
        let raft = self.group(group)?.raft;
        let mut rx = raft.metrics();
        let before = rx.borrow().last_applied.map(|l| l.index).unwrap_or(0);
        let _ = tokio::time::timeout(timeout, async {
            while rx.changed().await.is_ok() {
                if rx.borrow().last_applied.map(|l| l.index).unwrap_or(0) != before {
                    break;
                }
            }
        })
        .await;
        let now = rx.borrow().last_applied.map(|l| l.index).unwrap_or(0);
        Ok(now)
    }

    /// This node's view of every group it hosts.
    pub fn status(&self) -> Vec<GroupStatus> {
        let groups: Vec<(u32, Raft, (u64, u64, u64))> = match self.groups.read() {
            Ok(g) => g
                .iter()
                .map(|(id, g)| {
                    let eager = g
                        .eager
                        .as_ref()
                        .map_or((0, 0, 0), |e| (e.sent(), e.answered(), e.spared()));
                    (*id, g.raft.clone(), eager)
                })
                .collect(),
            Err(_) => return Vec::new(),
        };
        let mut out: Vec<GroupStatus> = groups
            .into_iter()
            .map(
                |(group, raft, (eager_appends, eager_answered, notices_spared))| {
                    let m = raft.metrics().borrow().clone();
                    let membership = m.membership_config.membership();
                    let applied_index = m.last_applied.map(|l| l.index).unwrap_or(0);
                    let committed_index = match &m.replication {
                        Some(r) if m.state == ServerState::Leader => {
                            let mut held: Vec<u64> = membership
                                .voter_ids()
                                .map(|v| {
                                    if v == m.id {
                                        m.last_log_index.unwrap_or(0)
                                    } else {
                                        r.get(&v).cloned().flatten().map(|l| l.index).unwrap_or(0)
                                    }
                                })
                                .collect();
                            held.sort_unstable_by(|a, b| b.cmp(a));
                            held.get(held.len() / 2)
                                .copied()
                                .unwrap_or(0)
                                .max(applied_index)
                        }
                        _ => applied_index,
                    };
                    GroupStatus {
                        committed_index,
                        group,
                        state: format!("{:?}", m.state),
                        term: m.current_term,
                        leader: m.current_leader,
                        last_log_index: m.last_log_index.unwrap_or(0),
                        applied_index,
                        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                        purged_index: m.purged.map(|l| l.index).unwrap_or(0),
                        voters: membership.voter_ids().collect(),
                        learners: membership.learner_ids().collect(),
                        matched: m
                            .replication
                            .as_ref()
                            .map(|r| {
                                r.iter()
                                    .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        eager_appends,
                        eager_answered,
                        notices_spared,
                    }
                },
            )
            .collect();
        out.sort_by_key(|g| g.group);
        out
    }

    /// WAL fsyncs and appends so far (group-commit effectiveness).
    pub fn sync_stats(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.shared.syncer.stats;
        (
            s.fsyncs.load(Relaxed),
            s.appends.load(Relaxed),
            s.fsync_micros.load(Relaxed),
        )
    }

    /// The gRPC service carrying every hosted group's Raft traffic.
    pub fn transport_service(self: &Arc<Self>) -> RaftTransportServer<TransportService> {
        RaftTransportServer::new(TransportService { host: self.clone() })
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE)
    }

    /// Stops every group and the WAL syncer. The database closes when the
    /// last handle drops — the host's own or a task's, never the syncer
    /// thread's (see [`Syncer::stop`]).
    pub async fn shutdown(&self) {
        let groups: Vec<Raft> = match self.groups.write() {
            Ok(mut g) => g.drain().map(|(_, g)| g.raft).collect(),
            Err(_) => return,
        };
        for raft in groups {
            let _ = raft.shutdown().await;
        }
        // Memtables to SST files: a clean stop restarts without WAL replay.
        for name in [db::CF_LOG, db::CF_META, db::CF_SM] {
            if let Ok(cf) = db::cf(&self.shared.db, name) {
                if let Err(e) = self.shared.db.flush_cf(cf) {
                    tracing::warn!("flushing {name} at shutdown: {e}");
                }
            }
        }
        let _ = self.shared.db.flush_wal(true);
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.syncer.stop()).await;
    }
}
