//! Reading and writing protobuf rows, and the shard clock.
//!
//! A row that doesn't decode is reported as [`KvError::Corrupt`], never a
//! panic. The shard clock keeps the largest stamped time seen, so the time
//! the model uses never goes backwards even if leaders' clocks disagree.

use std::ops::Bound;

use natter_kv::{prefix_end, KvError, KvRead, KvResult, KvWrite, Pair};
use prost::Message;

use crate::error::{invalid, Res};
use crate::keys;
use crate::limits::MAX_CURSOR_BYTES;
use crate::pb;

/// Decodes a row read from `key`.
pub(crate) fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> KvResult<M> {
    M::decode(bytes).map_err(|e| KvError::Corrupt {
        key: key.to_vec(),
        reason: e.to_string(),
    })
}

/// The row at `key`, if any.
pub(crate) fn get<M: Message + Default>(kv: &dyn KvRead, key: &[u8]) -> KvResult<Option<M>> {
    match kv.get(key)? {
        Some(bytes) => decode(key, &bytes).map(Some),
        None => Ok(None),
    }
}

pub(crate) fn put<M: Message>(kv: &mut dyn KvWrite, key: &[u8], row: &M) {
    kv.put(key, &row.encode_to_vec());
}

/// Keys in `[from, end of prefix)`, ascending, at most `limit`.
pub(crate) fn scan_from(
    kv: &dyn KvRead,
    prefix: &[u8],
    from: Bound<&[u8]>,
    limit: usize,
) -> KvResult<Vec<Pair>> {
    let end = prefix_end(prefix);
    let end = match &end {
        Some(e) => Bound::Excluded(e.as_slice()),
        None => Bound::Unbounded,
    };
    kv.scan(from, end, false, limit)
}

/// One page of the rows under `prefix` after the cursor `after` (a key
/// returned as `next_after` by the previous page; empty = from the start):
/// (rows, next cursor, has more). A cursor outside the prefix, or too long,
/// is refused as a bad `what` cursor.
pub(crate) fn page_after<M: Message + Default>(
    kv: &dyn KvRead,
    prefix: &[u8],
    after: &[u8],
    limit: usize,
    what: &str,
) -> Res<(Vec<M>, Vec<u8>, bool)> {
    page_after_by(kv, prefix, after, limit, what, |m: M| Ok((m, 1)))
}

/// [`page_after`], with each row turned into what the page holds by
/// `expand`, which also says how much of `limit` it uses (at least 1): the
/// page ends once `limit` is used up, and always holds at least one row.
pub(crate) fn page_after_by<M: Message + Default, T>(
    kv: &dyn KvRead,
    prefix: &[u8],
    after: &[u8],
    limit: usize,
    what: &str,
    mut expand: impl FnMut(M) -> Res<(T, usize)>,
) -> Res<(Vec<T>, Vec<u8>, bool)> {
    if after.len() > MAX_CURSOR_BYTES || !(after.is_empty() || after.starts_with(prefix)) {
        return Err(invalid(format!("bad {what} cursor")));
    }
    let from = if after.is_empty() {
        Bound::Included(prefix)
    } else {
        Bound::Excluded(after)
    };
    let rows = scan_from(kv, prefix, from, limit + 1)?;
    let mut out = Vec::with_capacity(rows.len().min(limit));
    let mut next_after = Vec::new();
    let mut used = 0;
    for (k, v) in rows {
        if used >= limit {
            return Ok((out, next_after, true));
        }
        let (item, weight) = expand(decode::<M>(&k, &v)?)?;
        used += weight.max(1);
        out.push(item);
        next_after = k;
    }
    Ok((out, next_after, false))
}

/// The last 8 bytes of a key as a big-endian integer.
pub(crate) fn tail_u64(key: &[u8]) -> KvResult<u64> {
    key.len()
        .checked_sub(8)
        .and_then(|at| key.get(at..))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| KvError::Corrupt {
            key: key.to_vec(),
            reason: "key too short".into(),
        })
}

/// The 8 bytes at `at` of a key as a big-endian integer.
pub(crate) fn u64_at(key: &[u8], at: usize) -> KvResult<u64> {
    key.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| KvError::Corrupt {
            key: key.to_vec(),
            reason: "key too short".into(),
        })
}

/// The shard's current time (0 before the first command).
pub(crate) fn clock(kv: &dyn KvRead) -> KvResult<u64> {
    Ok(clock_row(kv)?.now_ms)
}

/// The shard's clock row (default before the first command).
pub(crate) fn clock_row(kv: &dyn KvRead) -> KvResult<pb::ClockRow> {
    Ok(get::<pb::ClockRow>(kv, &keys::clock())?.unwrap_or_default())
}

/// Moves the shard clock to `max(stamp, clock)` and returns the row.
pub(crate) fn advance_clock(kv: &mut dyn KvWrite, stamp: u64) -> KvResult<pb::ClockRow> {
    let mut row = clock_row(&*kv)?;
    if stamp > row.now_ms {
        row.now_ms = stamp;
        put(kv, &keys::clock(), &row);
    }
    Ok(row)
}
