//! The one RocksDB a node keeps for every group it hosts.
//!
//! Three column families, every key starting with the 4-byte big-endian group
//! id so a group's rows form one contiguous range:
//!
//! | cf     | key                          | value                               |
//! |--------|------------------------------|-------------------------------------|
//! | `log`  | group ‖ index (u64 BE)       | bincode `Entry`                     |
//! | `meta` | group ‖ tag (1 byte)         | vote, committed, purged, applied, membership |
//! | `sm`   | group ‖ state-machine key    | state-machine value                 |
//!
//! The `meta` cf also holds one node-wide row, [`IDENTITY_KEY`], naming the
//! node id the directory belongs to, so a data dir is never served under
//! another id.

use crate::StoreError;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRecoveryMode, IteratorMode, Options, ReadOptions, DB,
};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

pub const CF_LOG: &str = "log";
pub const CF_META: &str = "meta";
pub const CF_SM: &str = "sm";

/// Meta row tags.
pub const TAG_VOTE: u8 = 1;
pub const TAG_COMMITTED: u8 = 2;
pub const TAG_PURGED: u8 = 3;
pub const TAG_APPLIED: u8 = 4;
pub const TAG_MEMBERSHIP: u8 = 5;
/// Written when a group's replica is removed from this node: the group is
/// not restarted from whatever rows a late write may have left.
pub const TAG_REMOVED: u8 = 6;

/// Node-wide identity row (outside every group's range: groups are < u32::MAX).
pub const IDENTITY_KEY: &[u8] = b"\xff\xff\xff\xffnode-identity";
const FORMAT: u32 = 1;
/// Node-wide tombstone: this node was removed from its cluster and must
/// never serve again.
pub const RETIRED_KEY: &[u8] = b"\xff\xff\xff\xffnode-retired";

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Identity {
    format: u32,
    node_id: u64,
}

pub fn group_prefix(group: u32) -> [u8; 4] {
    group.to_be_bytes()
}

pub fn log_key(group: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes the log index of a `log` cf key of `group`.
pub fn log_index(group: u32, key: &[u8]) -> Result<u64, StoreError> {
    if key.len() != 12 || key[..4] != group.to_be_bytes() {
        return Err(StoreError::Corrupt(format!(
            "log key {key:?} is not a key of group {group}"
        )));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[4..]);
    Ok(u64::from_be_bytes(b))
}

pub fn meta_key(group: u32, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4] = tag;
    k
}

pub fn sm_key(group: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// First key past every key of `group` in any cf.
pub fn group_end(group: u32) -> Vec<u8> {
    match group.checked_add(1) {
        Some(g) => g.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serialize(v).map_err(|e| StoreError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    bincode::deserialize(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError::Corrupt(format!("column family {name} is missing")))
}

/// File in the data dir recording the highest RocksDB sequence number known
/// to be fsynced in the WAL (written by the WAL syncer, at most every
/// [`crate::group_commit::MARK_EVERY`]). RocksDB tolerates a torn WAL tail,
/// which a power cut can leave; a WAL that lost *fsynced* records is damage,
/// and this mark is how it is told apart.
pub const SYNC_MARK_FILE: &str = "NATTER-SYNCED";
const SYNC_MARK_CHECK: u64 = 0x6e61_7474_6572_2121;

/// Reads the sync mark: `None` when there is none yet.
pub fn read_sync_mark(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(SYNC_MARK_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Corrupt(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    if bytes.is_empty() {
        // Created, never written: nothing was fsynced through the syncer yet.
        return Ok(None);
    }
    let word = |i: usize| {
        bytes
            .get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    match (word(0), word(8)) {
        (Some(seq), Some(check)) if bytes.len() == 16 && check == seq ^ SYNC_MARK_CHECK => {
            Ok(Some(seq))
        }
        _ => Err(StoreError::Corrupt(format!(
            "{} is damaged",
            path.display()
        ))),
    }
}

/// Rewrites the sync mark in place and fdatasyncs it.
pub fn write_sync_mark(file: &std::fs::File, seq: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..].copy_from_slice(&(seq ^ SYNC_MARK_CHECK).to_le_bytes());
    file.write_all_at(&b, 0)?;
    file.sync_data()
}

/// Opens (or creates) the node's database and checks that it is whole and
/// belongs to `node_id`. With `verify`, every block of every file is read and
/// checksummed, so a corrupted file stops the start instead of surfacing later
/// as a missing row.
pub fn open(dir: &Path, node_id: u64, verify: bool) -> Result<DB, StoreError> {
    let exists = dir.join("CURRENT").exists();
    if !exists
        && dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        return Err(StoreError::Corrupt(format!(
            "{} is not empty but has no RocksDB CURRENT file: refusing to start on a partial data dir",
            dir.display()
        )));
    }
    let mut opts = Options::default();
    opts.create_if_missing(!exists);
    opts.create_missing_column_families(!exists);
    opts.set_paranoid_checks(true);
    // A torn record at the WAL tail can only belong to a write that was never
    // fsynced (so never acknowledged); anything else is corruption and fails
    // the open.
    opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // Column families get their own options (`DB::open_cf` would give them
    // RocksDB's defaults, whatever `opts` says); all three share one block
    // cache.
    let cf_opts = read_tuning();
    let cfs =
        [CF_LOG, CF_META, CF_SM].map(|name| ColumnFamilyDescriptor::new(name, cf_opts.clone()));

    let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
        StoreError::Corrupt(format!("cannot open RocksDB in {}: {e}", dir.display()))
    })?;

    let meta = cf(&db, CF_META)?;
    let want = Identity {
        format: FORMAT,
        node_id,
    };
    match db.get_cf(meta, IDENTITY_KEY).map_err(StoreError::rocks)? {
        None if !exists => {
            let mut w = rocksdb::WriteOptions::default();
            w.set_sync(true);
            db.put_cf_opt(meta, IDENTITY_KEY, encode(&want)?, &w)
                .map_err(StoreError::rocks)?;
        }
        None => {
            return Err(StoreError::Corrupt(format!(
                "{}: the node identity row is missing",
                dir.display()
            )))
        }
        Some(raw) => {
            let have: Identity = decode("node identity", &raw)?;
            if have != want {
                return Err(StoreError::Corrupt(format!(
                    "{} belongs to node {} (format {}), not node {node_id} (format {FORMAT})",
                    dir.display(),
                    have.node_id,
                    have.format
                )));
            }
        }
    }
    if db
        .get_cf(meta, RETIRED_KEY)
        .map_err(StoreError::rocks)?
        .is_some()
    {
        return Err(StoreError::Retired(node_id));
    }
    if let Some(mark) = read_sync_mark(dir)? {
        let recovered = db.latest_sequence_number();
        if recovered < mark {
            return Err(StoreError::Corrupt(format!(
                "the write-ahead log in {} lost acknowledged writes: it recovers up to sequence {recovered}, \
                 but sequence {mark} had been fsynced (a truncated or damaged WAL file)",
                dir.display()
            )));
        }
    }
    if verify && exists {
        verify_all(&db)?;
    }
    Ok(db)
}

/// Point lookups dominate the apply path (a send reads its conversation,
/// member, dedup and clock rows, most of which are hot or absent), and
/// RocksDB's defaults have no filters: every lookup searched every table
/// file's index. Bloom filters (10 bits a key, ~1 % false positives) let
/// absent keys skip table files, and a block cache keeps the hot blocks.
/// Only affects reads: files written without filters are still read (they
/// just have none), so this needs no migration.
///
/// No memtable bloom: a whole-key bloom over the memtable (ratio 0.05) saved
/// skip-list walks for absent keys but cost more than it saved — a bloom
/// insert per key, and its megabytes of randomly touched bits evicting the
/// skip list from the CPU cache (skip-list inserts twice as costly in a
/// profile at 256 clients); without it, sends +11-19 % in an A/B.
fn read_tuning() -> Options {
    let mut opts = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    opts.set_block_based_table_factory(&table);
    opts
}

/// The block cache's size per node (shared by its column families).
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// The node id a data dir belongs to (`None` for a new, empty dir), read
/// without modifying anything: a node that joined a cluster learns its id
/// from here on restart.
pub fn stored_node_id(dir: &Path) -> Result<Option<u64>, StoreError> {
    if !dir.join("CURRENT").exists() {
        return Ok(None);
    }
    let opts = Options::default();
    let db =
        DB::open_cf_for_read_only(&opts, dir, [CF_LOG, CF_META, CF_SM], false).map_err(|e| {
            StoreError::Corrupt(format!("cannot open RocksDB in {}: {e}", dir.display()))
        })?;
    match db
        .get_cf(cf(&db, CF_META)?, IDENTITY_KEY)
        .map_err(StoreError::rocks)?
    {
        None => Err(StoreError::Corrupt(format!(
            "{}: the node identity row is missing",
            dir.display()
        ))),
        Some(raw) => Ok(Some(decode::<Identity>("node identity", &raw)?.node_id)),
    }
}

/// Reads every row of every column family with checksum verification.
fn verify_all(db: &DB) -> Result<(), StoreError> {
    for name in [CF_LOG, CF_META, CF_SM] {
        let h = cf(db, name)?;
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        for item in db.iterator_cf_opt(h, ro, IteratorMode::Start) {
            item.map_err(|e| StoreError::Corrupt(format!("verifying column family {name}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read tuning reaches the column families the node actually uses
    /// (RocksDB gives a column family opened by name alone its defaults,
    /// whatever the database's options say), and they share one cache.
    #[test]
    fn every_column_family_gets_the_read_tuning() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db");
        for reopen in [false, true] {
            let db = open(&path, 1, reopen).expect("open");
            for name in [CF_LOG, CF_META, CF_SM] {
                let h = cf(&db, name).expect("column family");
                let cap = db
                    .property_int_value_cf(h, "rocksdb.block-cache-capacity")
                    .expect("property");
                assert_eq!(
                    cap,
                    Some(BLOCK_CACHE_BYTES as u64),
                    "{name} (reopen: {reopen})"
                );
            }
        }
    }
}
