//! Key-value views of one group's state-machine rows.
//!
//! - [`Txn`]: what `apply` writes through. Writes collect in an ordered
//!   overlay that reads consult first (read-your-writes); the overlay becomes
//!   one `WriteBatch` committed together with the applied log id.
//! - [`View`]: what queries read, pinned to one RocksDB snapshot so a query
//!   never sees half of a concurrently applied batch.
//!
//! Both strip and add the 4-byte group prefix, so a state machine only ever
//! sees its own keys.

use std::collections::BTreeMap;
use std::ops::Bound;

use natter_kv::{is_empty_range, KvError, KvRead, KvResult, KvWrite, Pair};
use rocksdb::{
    ColumnFamily, Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode, WriteBatch, DB,
};

use crate::db;

/// Translates a state machine's key bounds into absolute RocksDB bounds:
/// (lower, inclusive) and (upper, exclusive).
fn abs_bounds(group: u32, start: Bound<&[u8]>, end: Bound<&[u8]>) -> (Vec<u8>, Vec<u8>) {
    let lower = match start {
        Bound::Included(k) => db::sm_key(group, k),
        Bound::Excluded(k) => {
            let mut k = db::sm_key(group, k);
            k.push(0);
            k
        }
        Bound::Unbounded => db::group_prefix(group).to_vec(),
    };
    let upper = match end {
        Bound::Included(k) => {
            let mut k = db::sm_key(group, k);
            k.push(0);
            k
        }
        Bound::Excluded(k) => db::sm_key(group, k),
        Bound::Unbounded => db::group_end(group),
    };
    (lower, upper)
}

fn storage(e: rocksdb::Error) -> KvError {
    KvError::Storage(e.to_string())
}

/// Rows from RocksDB in `[lower, upper)`, group prefix stripped, lazily.
fn base_iter<'a>(
    db: &'a DB,
    cf: &'a ColumnFamily,
    snapshot: Option<&'a SnapshotWithThreadMode<'a, DB>>,
    lower: &[u8],
    upper: &[u8],
    reverse: bool,
) -> impl Iterator<Item = KvResult<Pair>> + 'a {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(lower.to_vec());
    ro.set_iterate_upper_bound(upper.to_vec());
    if let Some(s) = snapshot {
        ro.set_snapshot(s);
    }
    let mode = if reverse {
        IteratorMode::End
    } else {
        IteratorMode::From(lower, Direction::Forward)
    };
    db.iterator_cf_opt(cf, ro, mode).map(|item| {
        let (k, v) = item.map_err(storage)?;
        Ok((k.get(4..).unwrap_or_default().to_vec(), v.to_vec()))
    })
}

/// The group's write transaction for one applied batch.
pub struct Txn<'a> {
    db: &'a DB,
    cf: &'a ColumnFamily,
    group: u32,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a DB, cf: &'a ColumnFamily, group: u32) -> Self {
        Txn {
            db,
            cf,
            group,
            writes: BTreeMap::new(),
        }
    }

    /// Moves the collected writes into `batch`.
    pub fn write_into(self, batch: &mut WriteBatch) {
        for (k, v) in self.writes {
            let key = db::sm_key(self.group, &k);
            match v {
                Some(v) => batch.put_cf(self.cf, key, v),
                None => batch.delete_cf(self.cf, key),
            }
        }
    }
}

impl KvRead for Txn<'_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        self.db
            .get_cf(self.cf, db::sm_key(self.group, key))
            .map_err(storage)
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>> {
        if is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let (lower, upper) = abs_bounds(self.group, start, end);
        let base = base_iter(self.db, self.cf, None, &lower, &upper, reverse);
        let range = self.writes.range::<[u8], _>((start, end));
        if reverse {
            merge(base, range.rev(), true, limit)
        } else {
            merge(base, range, false, limit)
        }
    }
}

impl KvWrite for Txn<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), None);
    }
}

/// Merges the stored rows with the overlay (which wins on equal keys and may
/// delete), in scan order, up to `limit` live rows.
fn merge<'o>(
    base: impl Iterator<Item = KvResult<Pair>>,
    overlay: impl Iterator<Item = (&'o Vec<u8>, &'o Option<Vec<u8>>)>,
    reverse: bool,
    limit: usize,
) -> KvResult<Vec<Pair>> {
    let mut base = base.peekable();
    let mut over = overlay.peekable();
    let mut out = Vec::new();
    while out.len() < limit {
        let take_over = match (base.peek(), over.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => {
                if let Some(Err(e)) = base.next() {
                    return Err(e);
                }
                continue;
            }
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (Some(Ok((bk, _))), Some((ok, _))) => {
                if bk == *ok {
                    base.next(); // shadowed by the overlay
                    true
                } else {
                    (ok.as_slice() < bk.as_slice()) != reverse
                }
            }
        };
        if take_over {
            if let Some((k, Some(v))) = over.next() {
                out.push((k.clone(), v.clone()));
            }
        } else if let Some(item) = base.next() {
            out.push(item?);
        }
    }
    Ok(out)
}

/// A read-only view pinned to one RocksDB snapshot.
pub struct View<'a> {
    pub(crate) db: &'a DB,
    pub(crate) cf: &'a ColumnFamily,
    pub(crate) snapshot: SnapshotWithThreadMode<'a, DB>,
    pub(crate) group: u32,
}

impl KvRead for View<'_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.snapshot
            .get_cf(self.cf, db::sm_key(self.group, key))
            .map_err(storage)
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>> {
        if is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let (lower, upper) = abs_bounds(self.group, start, end);
        base_iter(
            self.db,
            self.cf,
            Some(&self.snapshot),
            &lower,
            &upper,
            reverse,
        )
        .take(limit)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, DB) {
        let dir = tempfile::tempdir().unwrap();
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        let db = DB::open_cf(&o, dir.path(), ["sm"]).unwrap();
        (dir, db)
    }

    #[test]
    fn txn_reads_its_own_writes_and_merges_scans_in_both_directions() {
        let (_d, db) = open();
        let cf = db.cf_handle("sm").unwrap();
        // Rows of group 7 and of neighbouring groups, which must stay invisible.
        for (g, k) in [(7u32, "a"), (7, "c"), (7, "e"), (6, "z"), (8, "a")] {
            db.put_cf(cf, db::sm_key(g, k.as_bytes()), k.to_uppercase())
                .unwrap();
        }
        let mut txn = Txn::new(&db, cf, 7);
        txn.put(b"b", b"B2");
        txn.delete(b"c");
        txn.put(b"e", b"E2");
        assert_eq!(txn.get(b"c").unwrap(), None);
        assert_eq!(txn.get(b"a").unwrap(), Some(b"A".to_vec()));
        let keys = |v: Vec<Pair>| {
            v.into_iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        String::from_utf8_lossy(&k),
                        String::from_utf8_lossy(&v)
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(
                txn.scan(Bound::Unbounded, Bound::Unbounded, false, 10)
                    .unwrap()
            ),
            ["a=A", "b=B2", "e=E2"]
        );
        assert_eq!(
            keys(
                txn.scan(Bound::Unbounded, Bound::Unbounded, true, 10)
                    .unwrap()
            ),
            ["e=E2", "b=B2", "a=A"]
        );
        assert_eq!(
            keys(
                txn.scan(Bound::Excluded(b"a"), Bound::Included(b"e"), false, 10)
                    .unwrap()
            ),
            ["b=B2", "e=E2"]
        );
        assert_eq!(
            keys(
                txn.scan(Bound::Unbounded, Bound::Unbounded, true, 2)
                    .unwrap()
            ),
            ["e=E2", "b=B2"]
        );
        // Inverted or empty bounds are an empty scan, not a panic.
        assert!(txn
            .scan(Bound::Included(b"e"), Bound::Excluded(b"a"), false, 10)
            .unwrap()
            .is_empty());
        assert!(txn
            .scan(Bound::Excluded(b"b"), Bound::Excluded(b"b"), true, 10)
            .unwrap()
            .is_empty());

        let mut batch = WriteBatch::default();
        txn.write_into(&mut batch);
        db.write(batch).unwrap();
        let view = View {
            db: &db,
            cf,
            snapshot: db.snapshot(),
            group: 7,
        };
        assert_eq!(
            keys(
                view.scan(Bound::Unbounded, Bound::Unbounded, false, 10)
                    .unwrap()
            ),
            ["a=A", "b=B2", "e=E2"]
        );
        assert_eq!(keys(view.scan_prefix(b"b", 10).unwrap()), ["b=B2"]);
    }
}
