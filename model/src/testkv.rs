//! An in-memory [`KvWrite`] for tests: a `BTreeMap`, read-your-writes.

use std::collections::BTreeMap;
use std::ops::Bound;

use natter_kv::{KvRead, KvResult, KvWrite, Pair};

#[derive(Default, Clone, Debug, PartialEq)]
pub(crate) struct MemKv(pub(crate) BTreeMap<Vec<u8>, Vec<u8>>);

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        Ok(self.0.get(key).cloned())
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>> {
        if natter_kv::is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let it = self.0.range::<[u8], _>((start, end));
        let clone = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        Ok(if reverse {
            it.rev().take(limit).map(clone).collect()
        } else {
            it.take(limit).map(clone).collect()
        })
    }
}

impl KvWrite for MemKv {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.insert(key.to_vec(), value.to_vec());
    }

    fn delete(&mut self, key: &[u8]) {
        self.0.remove(key);
    }
}
