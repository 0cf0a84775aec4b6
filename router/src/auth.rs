//! Accounts and sessions.
//!
//! * Register: claim the username on its shard, then create the user (fresh
//!   v4 id, argon2id PHC hash of the password) on the user's shard.
//! * Login: look the username up, load the user, verify the password, then
//!   create a session: the client gets 32 random bytes (base64url) once; the
//!   cluster stores only their SHA-256 with the user id, device and expiry.
//! * Every WebSocket and authenticated call checks the token's session
//!   (`GetSession`, linearizable) — or this router's own answer to that
//!   question from at most [`SESSION_CACHE_TTL`] ago (and never past the
//!   session's expiry), so a gRPC client's every call doesn't cost a
//!   read-index round. Logout through this router takes effect here at
//!   once; through another router, within that window (open WebSockets
//!   learn it within `--session-recheck-secs`).
//!
//! Password hashing is deliberately slow and memory-hard (argon2id, 19 MiB
//! per hash), so it runs on a small pool of dedicated threads
//! (`hash_concurrency`): never on the async workers, and always on the same
//! few threads, so the allocator's per-thread arenas don't multiply that
//! memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine as _;
use natter_model::pb::{self, command::Op, query::Q, response::R, ErrorCode};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::Cluster;
use crate::error::{check, ApiError};

/// Bytes of entropy in a session token.
pub const TOKEN_BYTES: usize = 32;
/// Password length limits, in bytes (the upper one bounds hashing cost).
pub const MIN_PASSWORD_BYTES: usize = 8;
pub const MAX_PASSWORD_BYTES: usize = 256;

/// A valid session, as the router uses it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub user_id: String,
    pub token_hash: [u8; 32],
    pub device: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Login {
    pub token: String,
    pub user_id: String,
    pub username: String,
    pub expires_at_ms: u64,
}

/// How long a verified session is trusted without asking the cluster again
/// (at most `--session-recheck-secs`).
pub const SESSION_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most sessions remembered at once.
const SESSION_CACHE_MAX: usize = 100_000;

/// Sessions this router verified recently: token hash → (session, when).
#[derive(Default)]
struct SessionCache {
    ttl: Duration,
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], (SessionInfo, Instant)>>,
}

impl SessionCache {
    fn get(&self, hash: &[u8; 32]) -> Option<SessionInfo> {
        let mut map = self.map.lock().ok()?;
        let (s, at) = map.get(hash)?;
        if at.elapsed() < self.ttl && crate::now_ms() < s.expires_at_ms {
            return Some(s.clone());
        }
        map.remove(hash);
        None
    }

    fn put(&self, s: &SessionInfo) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= SESSION_CACHE_MAX {
                let ttl = self.ttl;
                map.retain(|_, (_, at)| at.elapsed() < ttl);
                if map.len() >= SESSION_CACHE_MAX {
                    map.clear();
                }
            }
            map.insert(s.token_hash, (s.clone(), Instant::now()));
        }
    }

    fn forget(&self, hash: &[u8; 32]) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(hash);
        }
    }
}

pub struct Accounts {
    cluster: Cluster,
    sessions: SessionCache,
    session_ttl: Duration,
    timeout: Duration,
    hashing: mpsc::Sender<Job>,
    /// Verified against when the username is unknown, so a miss costs as
    /// much time as a wrong password.
    dummy_hash: String,
    /// This router's region: new users are homed here; users homed
    /// elsewhere are sent there at login.
    regions: crate::region::Regions,
}

/// Lowercases a username and checks the model's rules (3–32 of
/// `[a-z0-9_.]`).
pub fn normalize_username(name: &str) -> Result<String, ApiError> {
    let name = name.trim().to_ascii_lowercase();
    let ok_len =
        (natter_model::USERNAME_MIN_LEN..=natter_model::USERNAME_MAX_LEN).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !ok_len || !ok_chars {
        return Err(ApiError::invalid(format!(
            "username must be {} to {} characters of a-z, 0-9, '_' and '.'",
            natter_model::USERNAME_MIN_LEN,
            natter_model::USERNAME_MAX_LEN
        )));
    }
    Ok(name)
}

/// The password rule of registration (8–256 bytes).
pub fn check_password(password: &str) -> Result<(), ApiError> {
    if !(MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&password.len()) {
        return Err(ApiError::invalid(format!(
            "password must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The SHA-256 of a token, or an error for anything that isn't one of ours.
pub fn token_hash(token: &str) -> Result<[u8; 32], ApiError> {
    let bad = || ApiError::Unauthenticated("invalid session token".into());
    if token.len() != 43 {
        return Err(bad());
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    if raw.len() != TOKEN_BYTES {
        return Err(bad());
    }
    Ok(Sha256::digest(&raw).into())
}

fn new_token() -> (String, [u8; 32]) {
    let mut raw = [0u8; TOKEN_BYTES];
    OsRng.fill_bytes(&mut raw);
    (
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
        Sha256::digest(raw).into(),
    )
}

/// Most argon2 memory a stored hash may ask for (KiB): a row with absurd
/// parameters is refused instead of allocated.
const MAX_M_COST_KIB: u32 = 256 * 1024;

thread_local! {
    /// The argon2 work area of this hashing thread, reused by every hash so
    /// the thread's memory stays one block of `m_cost` KiB.
    static MEMORY: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// argon2id with `params` into `out`, in this thread's reused memory.
fn argon2_into(
    params: &Params,
    version: Version,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    let argon = Argon2::new(Algorithm::Argon2id, version, params.clone());
    MEMORY.with(|m| {
        let mut m = m.borrow_mut();
        let blocks = params.block_count();
        if m.len() != blocks {
            m.clear();
            m.resize(blocks, Block::default());
        }
        argon.hash_password_into_with_memory(password, salt, out, &mut m[..])
    })
}

/// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) of `password`
/// with a fresh random salt.
fn hash_password(password: &str) -> Result<String, ApiError> {
    let fail =
        |e: &dyn std::fmt::Display| ApiError::Unexpected(format!("password hashing failed: {e}"));
    let params = Params::default();
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf).map_err(|e| fail(&e))?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon2_into(
        &params,
        Version::V0x13,
        password.as_bytes(),
        salt_bytes,
        &mut out,
    )
    .map_err(|e| fail(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| fail(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| fail(&e))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches a stored argon2id PHC string (compared in
/// constant time).
fn verify_password(password: &str, phc: &str) -> bool {
    let check = || -> Option<bool> {
        let h = PasswordHash::new(phc).ok()?;
        if Algorithm::try_from(h.algorithm).ok()? != Algorithm::Argon2id {
            return None;
        }
        let params = Params::try_from(&h).ok()?;
        if params.m_cost() > MAX_M_COST_KIB {
            return None;
        }
        let version = match h.version {
            Some(v) => Version::try_from(v).ok()?,
            None => Version::V0x13,
        };
        let expected = h.hash?;
        let mut salt_buf = [0u8; 64];
        let salt = h.salt?.decode_b64(&mut salt_buf).ok()?;
        let mut out = vec![0u8; expected.len()];
        argon2_into(&params, version, password.as_bytes(), salt, &mut out).ok()?;
        Some(Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

type Job = Box<dyn FnOnce() + Send>;

/// Starts `n` hashing threads; jobs wait in a short queue.
fn hash_pool(n: usize) -> Result<mpsc::Sender<Job>, ApiError> {
    let (tx, rx) = mpsc::channel::<Job>(64);
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for i in 0..n {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("natter-hash-{i}"))
            .spawn(move || loop {
                let job = match rx.lock() {
                    Ok(mut r) => r.blocking_recv(),
                    Err(_) => None,
                };
                match job {
                    Some(job) => job(),
                    None => return,
                }
            })
            .map_err(|e| ApiError::Unexpected(format!("starting a hashing thread: {e}")))?;
    }
    Ok(tx)
}

fn bad_credentials() -> ApiError {
    ApiError::Unauthenticated("invalid username or password".into())
}

impl Accounts {
    pub async fn new(
        cluster: Cluster,
        session_ttl: Duration,
        timeout: Duration,
        hash_concurrency: usize,
    ) -> Result<Accounts, ApiError> {
        let hashing = hash_pool(hash_concurrency.max(1))?;
        let mut a = Accounts {
            cluster,
            sessions: SessionCache::default(),
            session_ttl,
            timeout,
            hashing,
            dummy_hash: String::new(),
            regions: crate::region::Regions::default(),
        };
        a.dummy_hash = a
            .blocking(|| hash_password("not the password of anyone"))
            .await??;
        Ok(a)
    }

    /// Sets this router's region (and the routers of the others).
    pub fn with_regions(mut self, regions: crate::region::Regions) -> Accounts {
        self.regions = regions;
        self
    }

    /// Trusts a verified session for `min(SESSION_CACHE_TTL, recheck)`.
    pub fn with_session_cache(mut self, recheck: Duration) -> Accounts {
        self.sessions.ttl = SESSION_CACHE_TTL.min(recheck);
        self
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Runs `f` on the hashing pool (waiting for a free thread).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.hashing
            .send(job)
            .await
            .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
        rx.await
            .map_err(|_| ApiError::Unexpected("a hashing job was lost".into()))
    }

    /// Creates an account; answers (user id, normalized username).
    pub async fn register(
        &self,
        username: &str,
        password: &str,
    ) -> Result<(String, String), ApiError> {
        let username = normalize_username(username)?;
        check_password(password)?;
        let pw = password.to_string();
        let hash = self.blocking(move || hash_password(&pw)).await??;
        let user_id = uuid::Uuid::new_v4().to_string();
        let deadline = self.deadline();
        let claim = self
            .cluster
            .exec(
                Op::ClaimUsername(pb::ClaimUsername {
                    username: username.clone(),
                    user_id: user_id.clone(),
                }),
                deadline,
            )
            .await?;
        match check(claim) {
            Ok(R::Username(_)) => {}
            Ok(other) => return Err(ApiError::unexpected(&other)),
            Err(ApiError::Model {
                code: ErrorCode::AlreadyExists,
                ..
            }) => {
                return Err(ApiError::Model {
                    code: ErrorCode::AlreadyExists,
                    message: "username is taken".into(),
                })
            }
            Err(e) => return Err(e),
        }
        let created = self
            .cluster
            .exec(
                Op::CreateUser(pb::CreateUser {
                    user_id: user_id.clone(),
                    username: username.clone(),
                    password_hash: hash,
                    home_region: self.regions.mine.clone(),
                    ..Default::default()
                }),
                deadline,
            )
            .await?;
        match check(created)? {
            R::User(u) => Ok((u.id, u.username)),
            other => Err(ApiError::unexpected(&other)),
        }
    }

    /// Verifies the password and opens a session for `device`.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device: &str,
    ) -> Result<Login, ApiError> {
        if device.len() > natter_model::MAX_DEVICE_BYTES {
            return Err(ApiError::invalid(format!(
                "device must be at most {} bytes",
                natter_model::MAX_DEVICE_BYTES
            )));
        }
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(bad_credentials());
        }
        let deadline = self.deadline();
        let user = match normalize_username(username) {
            Ok(name) => self.find_user(&name, deadline).await?,
            Err(_) => None,
        };
        let (pw, phc) = match &user {
            Some(u) => (password.to_string(), u.password_hash.clone()),
            None => (password.to_string(), self.dummy_hash.clone()),
        };
        let ok = self.blocking(move || verify_password(&pw, &phc)).await?;
        let user = match user {
            Some(u) if ok => u,
            _ => return Err(bad_credentials()),
        };
        // Only with the right password does a client learn where the user
        // is homed; no session is created here for a user of another region.
        self.regions.check(&user.home_region)?;
        let (token, hash) = new_token();
        let created = self
            .cluster
            .exec(
                Op::CreateSession(pb::CreateSession {
                    token_hash: hash.to_vec(),
                    user_id: user.id.clone(),
                    device: device.to_string(),
                    ttl_ms: u64::try_from(self.session_ttl.as_millis()).unwrap_or(u64::MAX),
                }),
                self.deadline(),
            )
            .await?;
        match check(created)? {
            R::Session(s) => Ok(Login {
                token,
                user_id: user.id,
                username: user.username,
                expires_at_ms: s.expires_at_ms,
            }),
            other => Err(ApiError::unexpected(&other)),
        }
    }

    async fn find_user(&self, name: &str, deadline: Instant) -> Result<Option<pb::User>, ApiError> {
        let claim = self
            .cluster
            .query(
                Q::LookupUsername(pb::LookupUsername {
                    username: name.to_string(),
                }),
                deadline,
            )
            .await?;
        let user_id = match check(claim) {
            Ok(R::Username(c)) => c.user_id,
            Ok(other) => return Err(ApiError::unexpected(&other)),
            Err(ApiError::Model {
                code: ErrorCode::NotFound,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let user = self
            .cluster
            .query(Q::GetUser(pb::GetUser { user_id }), deadline)
            .await?;
        match check(user) {
            Ok(R::User(u)) => Ok(Some(u)),
            Ok(other) => Err(ApiError::unexpected(&other)),
            // A claim whose sign-up never finished.
            Err(ApiError::Model {
                code: ErrorCode::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The session of a token hash, if it is valid now.
    pub async fn session(&self, hash: [u8; 32]) -> Result<SessionInfo, ApiError> {
        let r = self
            .cluster
            .query(
                Q::GetSession(pb::GetSession {
                    token_hash: hash.to_vec(),
                }),
                self.deadline(),
            )
            .await?;
        match check(r) {
            Ok(R::Session(s)) => Ok(SessionInfo {
                user_id: s.user_id,
                token_hash: hash,
                device: s.device,
                expires_at_ms: s.expires_at_ms,
            }),
            Ok(other) => Err(ApiError::unexpected(&other)),
            Err(ApiError::Model {
                code: ErrorCode::NotFound,
                ..
            }) => Err(ApiError::Unauthenticated(
                "session expired, revoked or unknown".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// Checks a client's token.
    pub async fn authenticate(&self, token: &str) -> Result<SessionInfo, ApiError> {
        let hash = token_hash(token)?;
        if let Some(s) = self.sessions.get(&hash) {
            return Ok(s);
        }
        let s = self.session(hash).await?;
        self.sessions.put(&s);
        Ok(s)
    }

    /// Revokes the token's session (it must be valid).
    pub async fn logout(&self, token: &str) -> Result<SessionInfo, ApiError> {
        let s = self.authenticate(token).await?;
        self.sessions.forget(&s.token_hash);
        let r = self
            .cluster
            .exec(
                Op::RevokeSession(pb::RevokeSession {
                    token_hash: s.token_hash.to_vec(),
                }),
                self.deadline(),
            )
            .await?;
        match check(r)? {
            R::Session(_) => Ok(s),
            other => Err(ApiError::unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_sessions_end_at_ttl_expiry_or_logout() {
        let session = |hash: u8, expires_at_ms: u64| SessionInfo {
            user_id: "u".into(),
            token_hash: [hash; 32],
            device: "d".into(),
            expires_at_ms,
        };
        let later = crate::now_ms() + 60_000;
        let c = SessionCache {
            ttl: Duration::from_secs(60),
            ..Default::default()
        };
        c.put(&session(1, later));
        assert_eq!(c.get(&[1; 32]).map(|s| s.token_hash), Some([1; 32]));
        assert!(c.get(&[2; 32]).is_none(), "never verified");
        // Past the session's own expiry: asked again, whatever the TTL.
        c.put(&session(3, crate::now_ms().saturating_sub(1)));
        assert!(c.get(&[3; 32]).is_none());
        // Logout through this router forgets it at once.
        c.forget(&[1; 32]);
        assert!(c.get(&[1; 32]).is_none());
        // Past the TTL: asked again.
        let short = SessionCache {
            ttl: Duration::from_millis(1),
            ..Default::default()
        };
        short.put(&session(4, later));
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get(&[4; 32]).is_none());
        // A zero TTL (recheck of 0) caches nothing.
        let off = SessionCache::default();
        off.put(&session(5, later));
        assert!(off.get(&[5; 32]).is_none());
    }

    #[test]
    fn tokens_round_trip_and_forgeries_are_refused() {
        let (token, hash) = new_token();
        assert_eq!(token.len(), 43);
        assert_eq!(token_hash(&token).unwrap(), hash);
        for bad in [
            "",
            "abc",
            &"A".repeat(44),
            &"!".repeat(43),
            &format!("{token}="),
        ] {
            assert!(token_hash(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("correct horse", "not a phc string"));
        // Interoperable with the standard argon2 hasher and verifier.
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        let salt = SaltString::generate(&mut OsRng);
        let std_hash = Argon2::default()
            .hash_password(b"battery staple", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("battery staple", &std_hash));
        assert!(!verify_password("battery stapler", &std_hash));
    }

    #[test]
    fn usernames_are_lowercased_and_checked() {
        assert_eq!(normalize_username(" Alice.B ").unwrap(), "alice.b");
        for bad in ["ab", "al ice", "a-b", "élan", &"x".repeat(33)] {
            assert!(normalize_username(bad).is_err(), "{bad}");
        }
    }
}
