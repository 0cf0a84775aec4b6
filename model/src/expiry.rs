//! Housekeeping: expiring messages and purging deleted conversations.
//!
//! Runs at the start of every applied command with the shard's stamped
//! time when its agenda (in the clock row) says something may be due, and
//! does at most [`EXPIRY_BUDGET`] rows of work, so a command's cost stays
//! bounded; what is left waits for the next command. The leader
//! proposes `Tick` (a command with only a stamp) when `NextExpiry` says
//! something is due, so expiry happens even on an idle shard.
//!
//! * **TTL**: an index ordered by expiry time (`0x40`) holds every live
//!   message with an `expires_at_ms`; due entries become tombstones.
//! * **Retention**: messages are in seq order, which is time order, so
//!   retention deletes from the oldest end: each conversation with retention
//!   and messages has one "next due" entry (`0x41`) — the oldest unpurged
//!   message's `created + retention`. A changed policy reschedules it, so a
//!   new policy also applies to old messages.
//! * **Deleted conversations** (`0x42`): their rows are deleted in budgeted
//!   batches.
//!
//! * **Sessions** (`0x61`): expired session rows are deleted
//!   (`sessions::purge_expired`).
//!
//! Expiring a message bumps the conversation version (so synced clients
//! learn it's gone) and refreshes the members' feeds.

use std::collections::BTreeMap;
use std::ops::Bound;

use natter_kv::{prefix_end, KvRead, KvResult, KvWrite};

use crate::codec::{decode, get, put, u64_at};
use crate::conversations::{schedule_retention, Conv, Fanout};
use crate::ids::Id;
use crate::keys;
use crate::limits::EXPIRY_BUDGET;
use crate::messages::tombstone;
use crate::pb;

/// Keys of `table` whose 8-byte time (right after the tag) is `<= now`.
fn due(
    kv: &dyn KvRead,
    prefix: &[u8],
    bound: Option<Vec<u8>>,
    limit: usize,
) -> KvResult<Vec<natter_kv::Pair>> {
    let end = bound.or_else(|| prefix_end(prefix));
    match &end {
        Some(e) => kv.scan(Bound::Included(prefix), Bound::Excluded(e), false, limit),
        None => kv.scan(Bound::Included(prefix), Bound::Unbounded, false, limit),
    }
}

/// Runs one budget of housekeeping at the shard time of `clock` (the clock
/// row as this command left it); returns the number of messages expired or
/// purged.
///
/// The clock row carries the agenda (`housekeeping_at_ms`): a lower bound
/// on the earliest entry of every expiry table. Before it, nothing can be
/// due and the scans are skipped — most commands. After a run the agenda is
/// recomputed from the tables; in between, every new entry lowers it
/// ([`schedule`]). Because it is only ever a lower bound, skipping changes
/// no outcome: a command runs housekeeping exactly when it would find work.
pub(crate) fn housekeeping(kv: &mut dyn KvWrite, mut clock: pb::ClockRow) -> KvResult<u32> {
    let now = clock.now_ms;
    match clock.housekeeping_at_ms {
        Some(0) => return Ok(0),
        Some(at) if at > now => return Ok(0),
        _ => {}
    }
    let mut budget = EXPIRY_BUDGET;
    let mut done = 0;
    done += purge_deleted(kv, &mut budget)?;
    done += expire_ttl(kv, now, &mut budget)?;
    done += expire_retention(kv, now, &mut budget)?;
    // Not counted: `Ticked.purged` counts messages.
    crate::sessions::purge_expired(kv, now, &mut budget)?;
    // Work left over (budget spent) is due now, so the next command resumes.
    clock.housekeeping_at_ms = Some(next_expiry(&*kv)?);
    put(kv, &keys::clock(), &clock);
    Ok(done)
}

/// An entry due at `at` was just added to an expiry table: lowers the
/// agenda to it so housekeeping looks then.
pub(crate) fn schedule(kv: &mut dyn KvWrite, at: u64) -> KvResult<()> {
    let at = at.max(1);
    let mut clock = crate::codec::clock_row(&*kv)?;
    match clock.housekeeping_at_ms {
        // Unknown: the next command recomputes it anyway.
        None => return Ok(()),
        Some(t) if t != 0 && t <= at => return Ok(()),
        Some(_) => {}
    }
    clock.housekeeping_at_ms = Some(at);
    put(kv, &keys::clock(), &clock);
    Ok(())
}

fn purge_deleted(kv: &mut dyn KvWrite, budget: &mut usize) -> KvResult<u32> {
    let mut done = 0;
    while *budget > 0 {
        let Some((pkey, _)) = kv.scan_prefix(&keys::purge_prefix(), 1)?.into_iter().next() else {
            break;
        };
        let id = Id::from_slice(pkey.get(1..).unwrap_or_default(), &pkey)?;
        let tables = [
            keys::message_prefix(&id),
            keys::hidden_conversation_prefix(&id),
            keys::private_change_conversation_prefix(&id),
            keys::sent_conversation_prefix(&id),
            keys::change_prefix(&id),
        ];
        for (i, prefix) in tables.iter().enumerate() {
            let rows = kv.scan_prefix(prefix, *budget)?;
            for (k, v) in rows {
                if i == 0 {
                    let msg = decode::<pb::Message>(&k, &v)?;
                    if !msg.deleted && msg.expires_at_ms > 0 {
                        kv.delete(&keys::expiry(msg.expires_at_ms, &id, msg.seq));
                    }
                    done += 1;
                }
                kv.delete(&k);
                *budget -= 1;
            }
            if *budget == 0 {
                return Ok(done);
            }
        }
        kv.delete(&pkey);
    }
    Ok(done)
}

fn expire_ttl(kv: &mut dyn KvWrite, now: u64, budget: &mut usize) -> KvResult<u32> {
    if *budget == 0 {
        return Ok(0);
    }
    let bound = now.checked_add(1).map(keys::expiry_bound);
    let rows = due(&*kv, &keys::expiry_prefix(), bound, *budget)?;
    *budget -= rows.len();
    let mut by_conv: BTreeMap<Id, Vec<(Vec<u8>, u64)>> = BTreeMap::new();
    for (k, v) in rows {
        let r = decode::<pb::IndexRef>(&k, &v)?;
        let id = Id::from_slice(&r.conversation_id, &k)?;
        by_conv.entry(id).or_default().push((k, r.seq));
    }
    let mut done = 0;
    for (id, items) in by_conv {
        let conv = Conv::load(&*kv, id)?;
        let Some(mut conv) = conv.filter(|c| !c.row.deleted) else {
            for (k, _) in items {
                kv.delete(&k);
            }
            continue;
        };
        let mut changed = false;
        for (k, seq) in items {
            kv.delete(&k);
            if let Some(mut msg) = get::<pb::Message>(&*kv, &keys::message(&id, seq))? {
                if !msg.deleted {
                    tombstone(kv, &mut conv, &mut msg, true)?;
                    changed = true;
                    done += 1;
                }
            }
        }
        if changed {
            conv.save(kv, Fanout::Everyone, &[])?;
        }
    }
    Ok(done)
}

fn expire_retention(kv: &mut dyn KvWrite, now: u64, budget: &mut usize) -> KvResult<u32> {
    if *budget == 0 {
        return Ok(0);
    }
    let bound = now.checked_add(1).map(keys::retention_due_bound);
    let rows = due(&*kv, &keys::retention_due_prefix(), bound, *budget)?;
    let mut done = 0;
    for (key, v) in rows {
        if *budget == 0 {
            break;
        }
        let r = decode::<pb::IndexRef>(&key, &v)?;
        let id = Id::from_slice(&r.conversation_id, &key)?;
        let due_at = u64_at(&key, 1)?;
        kv.delete(&key);
        let Some(mut conv) = Conv::load(&*kv, id)? else {
            continue;
        };
        if conv.row.deleted || conv.row.retention_due_ms != due_at || conv.row.retention_ms == 0 {
            // A stale entry: the row no longer points at it.
            if conv.row.retention_due_ms == due_at {
                conv.row.retention_due_ms = 0;
                conv.store_quiet(kv);
            }
            continue;
        }
        conv.row.retention_due_ms = 0;
        let retention = conv.row.retention_ms;
        let last = conv.row.last_seq;
        let mut next_due = 0;
        let mut seq = conv.row.purged_through_seq.saturating_add(1);
        let mut changed = false;
        'scan: while *budget > 0 && seq <= last {
            let (lo, hi) = (keys::message(&id, seq), keys::message(&id, last));
            let msgs = kv.scan(Bound::Included(&lo), Bound::Included(&hi), false, *budget)?;
            if msgs.is_empty() {
                seq = last.saturating_add(1);
                break;
            }
            for (k, val) in msgs {
                let mut msg = decode::<pb::Message>(&k, &val)?;
                let at = msg.created_at_ms.saturating_add(retention);
                if at > now {
                    next_due = at;
                    break 'scan;
                }
                *budget -= 1;
                if !msg.deleted {
                    tombstone(kv, &mut conv, &mut msg, true)?;
                    changed = true;
                    done += 1;
                }
                conv.row.purged_through_seq = msg.seq;
                seq = msg.seq.saturating_add(1);
                if *budget == 0 {
                    break 'scan;
                }
            }
        }
        // Not yet due: at the next message's time. Out of budget: still due.
        let next = if next_due > 0 {
            next_due
        } else if seq <= last {
            now.max(1)
        } else {
            0
        };
        if next > 0 {
            schedule_retention(kv, &mut conv, next)?;
        }
        if changed {
            conv.save(kv, Fanout::Everyone, &[])?;
        } else {
            conv.store_quiet(kv);
        }
    }
    Ok(done)
}

/// Query `NextExpiry`: the earliest time housekeeping has work (0 = none).
pub(crate) fn next_expiry(kv: &dyn KvRead) -> KvResult<u64> {
    let mut at = 0u64;
    let mut consider = |t: u64| {
        if t > 0 && (at == 0 || t < at) {
            at = t;
        }
    };
    if let Some((k, _)) = kv
        .scan_prefix(&keys::expiry_prefix(), 1)?
        .into_iter()
        .next()
    {
        consider(u64_at(&k, 1)?);
    }
    if let Some((k, _)) = kv
        .scan_prefix(&keys::retention_due_prefix(), 1)?
        .into_iter()
        .next()
    {
        consider(u64_at(&k, 1)?);
    }
    if let Some((k, v)) = kv.scan_prefix(&keys::purge_prefix(), 1)?.into_iter().next() {
        consider(decode::<pb::PurgeRow>(&k, &v)?.deleted_at_ms.max(1));
    }
    consider(crate::sessions::next_expiry(kv)?);
    Ok(at)
}
