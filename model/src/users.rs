//! Users (on the user's shard) and username claims (on the username's
//! shard).
//!
//! Signing up is two commands on two shards: `ClaimUsername` reserves the
//! name for a user id (first come, first served; idempotent for the same id),
//! then `CreateUser` writes the user row. The model can't check one shard
//! from another, so the router does them in that order.

use natter_kv::{KvRead, KvWrite};

use crate::codec::{get, put};
use crate::error::{exists, invalid, limit, not_found, Res};
use crate::ids::Id;
use crate::keys;
use crate::limits::{
    MAX_PASSWORD_HASH_BYTES, MAX_REGION_BYTES, USERNAME_MAX_LEN, USERNAME_MIN_LEN,
};
use crate::pb::{self, response::R, Notifications, Privacy};

/// Usernames are 3–32 characters of `[a-z0-9_.]` (already lowercased by the
/// caller: the model rejects rather than normalises).
pub(crate) fn validate_username(name: &str) -> Res<()> {
    if !(USERNAME_MIN_LEN..=USERNAME_MAX_LEN).contains(&name.len()) {
        return Err(invalid(format!(
            "username must be {USERNAME_MIN_LEN} to {USERNAME_MAX_LEN} characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    {
        return Err(invalid("username may only contain a-z, 0-9, '_' and '.'"));
    }
    Ok(())
}

fn validate_hash(hash: &str) -> Res<()> {
    if hash.is_empty() {
        return Err(invalid("password_hash is required"));
    }
    if hash.len() > MAX_PASSWORD_HASH_BYTES {
        return Err(limit(format!(
            "password_hash longer than {MAX_PASSWORD_HASH_BYTES} bytes"
        )));
    }
    Ok(())
}

fn validate_region(region: &str) -> Res<()> {
    if region.len() > MAX_REGION_BYTES {
        return Err(limit(format!(
            "home_region longer than {MAX_REGION_BYTES} bytes"
        )));
    }
    if !valid_region(region) {
        return Err(invalid(
            "home_region may only contain a-z, 0-9, '-' and '_'",
        ));
    }
    Ok(())
}

/// Whether `region` is a valid home region: empty (served by every
/// router) or up to [`MAX_REGION_BYTES`] of `[a-z0-9_-]`.
pub fn valid_region(region: &str) -> bool {
    region.len() <= MAX_REGION_BYTES
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A known privacy value; UNSPECIFIED becomes the default (EVERYONE).
fn privacy(v: i32) -> Res<i32> {
    match Privacy::try_from(v) {
        Ok(Privacy::Unspecified) => Ok(Privacy::Everyone as i32),
        Ok(p) => Ok(p as i32),
        Err(_) => Err(invalid(format!("unknown privacy {v}"))),
    }
}

/// A known notification value; UNSPECIFIED becomes the default (ALL).
fn notifications(v: i32) -> Res<i32> {
    match Notifications::try_from(v) {
        Ok(Notifications::Unspecified) => Ok(Notifications::All as i32),
        Ok(n) => Ok(n as i32),
        Err(_) => Err(invalid(format!("unknown notifications {v}"))),
    }
}

pub(crate) fn claim_username(kv: &mut dyn KvWrite, now: u64, c: pb::ClaimUsername) -> Res<R> {
    validate_username(&c.username)?;
    Id::parse(&c.user_id, "user_id")?;
    let key = keys::username(&c.username);
    if let Some(claim) = get::<pb::UsernameClaim>(&*kv, &key)? {
        if claim.user_id == c.user_id {
            return Ok(R::Username(claim));
        }
        return Err(exists("username is taken"));
    }
    let claim = pb::UsernameClaim {
        username: c.username,
        user_id: c.user_id,
        claimed_at_ms: now,
    };
    put(kv, &key, &claim);
    Ok(R::Username(claim))
}

pub(crate) fn create_user(kv: &mut dyn KvWrite, now: u64, c: pb::CreateUser) -> Res<R> {
    let id = Id::parse(&c.user_id, "user_id")?;
    validate_username(&c.username)?;
    validate_hash(&c.password_hash)?;
    validate_region(&c.home_region)?;
    let privacy = privacy(c.privacy)?;
    let notifications = notifications(c.notifications)?;
    let key = keys::user(&id);
    if let Some(user) = get::<pb::User>(&*kv, &key)? {
        // A retry of the same sign-up answers with the stored row.
        if user.username == c.username {
            return Ok(R::User(user));
        }
        return Err(exists("user already exists"));
    }
    let user = pb::User {
        id: c.user_id,
        username: c.username,
        password_hash: c.password_hash,
        created_at_ms: now,
        privacy,
        notifications,
        home_region: c.home_region,
        version: 1,
    };
    put(kv, &key, &user);
    Ok(R::User(user))
}

pub(crate) fn update_user_settings(kv: &mut dyn KvWrite, c: pb::UpdateUserSettings) -> Res<R> {
    let id = Id::parse(&c.user_id, "user_id")?;
    let key = keys::user(&id);
    let mut user = get::<pb::User>(&*kv, &key)?.ok_or_else(|| not_found("user not found"))?;
    let before = user.clone();
    if let Some(p) = c.privacy {
        user.privacy = privacy(p)?;
    }
    if let Some(n) = c.notifications {
        user.notifications = notifications(n)?;
    }
    if let Some(r) = c.home_region {
        validate_region(&r)?;
        user.home_region = r;
    }
    if let Some(h) = c.password_hash {
        validate_hash(&h)?;
        user.password_hash = h;
    }
    if user != before {
        user.version += 1;
        put(kv, &key, &user);
    }
    Ok(R::User(user))
}

pub(crate) fn get_user(kv: &dyn KvRead, q: pb::GetUser) -> Res<R> {
    let id = Id::parse(&q.user_id, "user_id")?;
    get::<pb::User>(kv, &keys::user(&id))?
        .map(R::User)
        .ok_or_else(|| not_found("user not found"))
}

pub(crate) fn lookup_username(kv: &dyn KvRead, q: pb::LookupUsername) -> Res<R> {
    validate_username(&q.username)?;
    get::<pb::UsernameClaim>(kv, &keys::username(&q.username))?
        .map(R::Username)
        .ok_or_else(|| not_found("username not found"))
}
