//! All-or-nothing commands: a command runs against an [`Overlay`] that
//! buffers its writes (and lets it read them back); the writes reach the
//! shard only if the command succeeds. A rejected command leaves no trace.

use std::collections::BTreeMap;
use std::ops::Bound;

use natter_kv::{KvRead, KvResult, KvWrite, Pair};

/// Buffered writes over a read-only base.
pub(crate) struct Overlay<'a> {
    base: &'a dyn KvRead,
    /// `None` = deleted.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    pub(crate) fn new(base: &'a dyn KvRead) -> Self {
        Overlay {
            base,
            writes: BTreeMap::new(),
        }
    }

    /// The buffered writes, in key order, to apply to the base.
    pub(crate) fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }
}

/// Applies buffered writes.
pub(crate) fn commit(kv: &mut dyn KvWrite, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
    for (k, v) in writes {
        match v {
            Some(v) => kv.put(&k, &v),
            None => kv.delete(&k),
        }
    }
}

impl KvRead for Overlay<'_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>> {
        if limit == 0 || natter_kv::is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let local: Vec<(&Vec<u8>, &Option<Vec<u8>>)> =
            self.writes.range::<[u8], _>((start, end)).collect();
        // Each buffered delete may hide one base row, so ask the base for
        // that many more.
        let deletes = local.iter().filter(|(_, v)| v.is_none()).count();
        let base = self
            .base
            .scan(start, end, reverse, limit.saturating_add(deletes))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (k, v) in base {
            if !self.writes.contains_key(&k) {
                merged.insert(k, v);
            }
        }
        for (k, v) in local {
            if let Some(v) = v {
                merged.insert(k.clone(), v.clone());
            }
        }
        let out: Vec<Pair> = if reverse {
            merged.into_iter().rev().take(limit).collect()
        } else {
            merged.into_iter().take(limit).collect()
        };
        Ok(out)
    }
}

impl KvWrite for Overlay<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkv::MemKv;
    use proptest::prelude::*;

    fn key(k: u8) -> Vec<u8> {
        vec![k / 16, k % 16]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Reads through an overlay equal reads of the base with the writes
        /// applied.
        #[test]
        fn overlay_reads_equal_committed_reads(
            base in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..40),
            writes in proptest::collection::vec((any::<u8>(), proptest::option::of(any::<u8>())), 0..40),
            scans in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<bool>(), 0usize..12, 0u8..4), 1..20),
        ) {
            let mut kv = MemKv::default();
            for (k, v) in &base {
                kv.put(&key(*k), &[*v]);
            }
            let mut overlay = Overlay::new(&kv);
            for (k, v) in &writes {
                match v {
                    Some(v) => overlay.put(&key(*k), &[*v]),
                    None => overlay.delete(&key(*k)),
                }
            }
            let mut committed = kv.clone();
            for (k, v) in &writes {
                match v {
                    Some(v) => committed.put(&key(*k), &[*v]),
                    None => committed.delete(&key(*k)),
                }
            }
            for (a, b, reverse, limit, bounds) in scans {
                let (a, b) = (key(a), key(b));
                let (start, end) = match bounds {
                    0 => (Bound::Included(a.as_slice()), Bound::Excluded(b.as_slice())),
                    1 => (Bound::Excluded(a.as_slice()), Bound::Included(b.as_slice())),
                    2 => (Bound::Unbounded, Bound::Included(b.as_slice())),
                    _ => (Bound::Included(a.as_slice()), Bound::Unbounded),
                };
                prop_assert_eq!(
                    overlay.scan(start, end, reverse, limit).ok(),
                    committed.scan(start, end, reverse, limit).ok()
                );
                prop_assert_eq!(overlay.get(&a).ok(), committed.get(&a).ok());
            }
            let writes = overlay.into_writes();
            commit(&mut kv, writes);
            prop_assert_eq!(kv, committed);
        }
    }
}
