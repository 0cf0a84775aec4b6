//! Sessions (on the shard of the token's hash): a device's login, stored by
//! the SHA-256 of its token, with an expiry time and a revoked flag.
//!
//! Validity is judged against the shard's time — the stamped time of a
//! command, `max(query.now_ms, clock)` for `GetSession` — never a clock read
//! in apply. Every session has an entry in an expiry index (`0x61`), and
//! housekeeping deletes the row and its entry once it has expired (revoked
//! rows stay until then, so a late retry of `CreateSession` can't revive a
//! logged-out token).

use std::ops::Bound;

use natter_kv::{prefix_end, KvResult, KvWrite};

use crate::codec::{get, put, u64_at};
use crate::error::{exists, invalid, limit, not_found, precondition, Res};
use crate::ids::Id;
use crate::keys;
use crate::limits::{MAX_DEVICE_BYTES, MAX_SESSION_TTL_MS, SESSION_TOKEN_HASH_BYTES};
use crate::pb::{self, response::R};
use natter_kv::KvRead;

fn validate_hash(hash: &[u8]) -> Res<()> {
    if hash.len() != SESSION_TOKEN_HASH_BYTES {
        return Err(invalid(format!(
            "token_hash must be {SESSION_TOKEN_HASH_BYTES} bytes"
        )));
    }
    Ok(())
}

pub(crate) fn create(kv: &mut dyn KvWrite, now: u64, c: pb::CreateSession) -> Res<R> {
    validate_hash(&c.token_hash)?;
    Id::parse(&c.user_id, "user_id")?;
    if c.device.len() > MAX_DEVICE_BYTES {
        return Err(limit(format!(
            "device longer than {MAX_DEVICE_BYTES} bytes"
        )));
    }
    if c.ttl_ms == 0 || c.ttl_ms > MAX_SESSION_TTL_MS {
        return Err(invalid(format!("ttl_ms must be 1 to {MAX_SESSION_TTL_MS}")));
    }
    let key = keys::session(&c.token_hash);
    if let Some(s) = get::<pb::Session>(&*kv, &key)? {
        if s.user_id != c.user_id {
            return Err(exists("session already exists"));
        }
        if s.revoked {
            return Err(precondition("session was revoked"));
        }
        return Ok(R::Session(s));
    }
    let s = pb::Session {
        token_hash: c.token_hash,
        user_id: c.user_id,
        device: c.device,
        created_at_ms: now,
        expires_at_ms: now.saturating_add(c.ttl_ms),
        revoked: false,
    };
    put(kv, &key, &s);
    kv.put(&keys::session_expiry(s.expires_at_ms, &s.token_hash), &[]);
    crate::expiry::schedule(kv, s.expires_at_ms)?;
    Ok(R::Session(s))
}

pub(crate) fn revoke(kv: &mut dyn KvWrite, c: pb::RevokeSession) -> Res<R> {
    validate_hash(&c.token_hash)?;
    let key = keys::session(&c.token_hash);
    let mut s = get::<pb::Session>(&*kv, &key)?.ok_or_else(|| not_found("session not found"))?;
    if !s.revoked {
        s.revoked = true;
        put(kv, &key, &s);
    }
    Ok(R::Session(s))
}

pub(crate) fn get_session(kv: &dyn KvRead, now: u64, q: pb::GetSession) -> Res<R> {
    validate_hash(&q.token_hash)?;
    match get::<pb::Session>(kv, &keys::session(&q.token_hash))? {
        Some(s) if !s.revoked && s.expires_at_ms > now => Ok(R::Session(s)),
        _ => Err(not_found("session not found")),
    }
}

/// Deletes expired sessions (at most `budget` of them); returns how many.
pub(crate) fn purge_expired(kv: &mut dyn KvWrite, now: u64, budget: &mut usize) -> KvResult<u32> {
    if *budget == 0 {
        return Ok(0);
    }
    let prefix = keys::session_expiry_prefix();
    // Entries with expires_at <= now sort before the bound of now + 1.
    let end = now
        .checked_add(1)
        .map(keys::session_expiry_bound)
        .or_else(|| prefix_end(&prefix));
    let rows = match &end {
        Some(e) => kv.scan(Bound::Included(&prefix), Bound::Excluded(e), false, *budget)?,
        None => kv.scan(Bound::Included(&prefix), Bound::Unbounded, false, *budget)?,
    };
    *budget -= rows.len();
    let mut done = 0;
    for (k, _) in rows {
        kv.delete(&k);
        let hash = k.get(9..).unwrap_or_default();
        let key = keys::session(hash);
        if let Some(s) = get::<pb::Session>(&*kv, &key)? {
            if s.expires_at_ms <= now {
                kv.delete(&key);
                done += 1;
            }
        }
    }
    Ok(done)
}

/// The earliest session expiry (0 = none).
pub(crate) fn next_expiry(kv: &dyn KvRead) -> KvResult<u64> {
    match kv
        .scan_prefix(&keys::session_expiry_prefix(), 1)?
        .into_iter()
        .next()
    {
        Some((k, _)) => u64_at(&k, 1),
        None => Ok(0),
    }
}
