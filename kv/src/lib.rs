//! The contract between Natter's replication layer (`raft-store`) and the
//! state machines it replicates (the messaging model, the meta group).
//!
//! A state machine sees only the keys of its own group, through [`KvRead`]
//! and [`KvWrite`]. Every command is applied inside one transaction: reads see
//! the command's own earlier writes, and all writes of a batch of commands are
//! committed atomically together with the applied log index. `apply` must be
//! deterministic: the same commands on the same state give the same writes and
//! responses on every replica — no clocks, no randomness, no I/O. Anything
//! that varies (time, fresh ids) is stamped into the command by the proposer.

use std::ops::Bound;

/// Storage failures while a state machine reads or writes its rows.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("corrupt row at key {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
}

pub type KvResult<T> = Result<T, KvError>;

/// One key-value pair.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Read access to a group's keys.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>>;

    /// Up to `limit` pairs with keys in `(start, end)`, in ascending key order,
    /// or descending when `reverse` is set.
    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>>;

    /// Every pair whose key starts with `prefix`, ascending, at most `limit`.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> KvResult<Vec<Pair>> {
        match prefix_end(prefix) {
            Some(end) => self.scan(Bound::Included(prefix), Bound::Excluded(&end), false, limit),
            None => self.scan(Bound::Included(prefix), Bound::Unbounded, false, limit),
        }
    }
}

/// Write access inside the transaction of one applied batch.
pub trait KvWrite: KvRead {
    fn put(&mut self, key: &[u8], value: &[u8]);
    fn delete(&mut self, key: &[u8]);
}

/// A replicated state machine.
pub trait StateMachine: Send + Sync + 'static {
    /// Applies one committed command and returns its encoded response.
    /// A rejected command (bad input, no permission) is a normal response,
    /// not an error: it was committed and must be answered the same way on
    /// every replica. Errors are reserved for storage failures.
    fn apply(&self, kv: &mut dyn KvWrite, command: &[u8]) -> KvResult<Vec<u8>>;

    /// Answers a read-only query from the current state.
    fn query(&self, kv: &dyn KvRead, query: &[u8]) -> KvResult<Vec<u8>>;
}

/// True when no key can lie between the bounds. Scans must check this
/// first: `BTreeMap::range` panics on such bounds, and a storage engine would
/// be handed an inverted range.
pub fn is_empty_range(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e))
        | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        _ => false,
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when no such key exists (the prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{is_empty_range, prefix_end};
    use std::ops::Bound::{Excluded, Included, Unbounded};

    #[test]
    fn empty_ranges_are_recognised() {
        assert!(is_empty_range(Included(b"b"), Included(b"a")));
        assert!(!is_empty_range(Included(b"a"), Included(b"a")));
        assert!(is_empty_range(Excluded(b"a"), Excluded(b"a")));
        assert!(is_empty_range(Included(b"a"), Excluded(b"a")));
        assert!(!is_empty_range(Unbounded, Excluded(b"a")));
    }

    #[test]
    fn prefix_end_increments_last_byte_and_carries() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
