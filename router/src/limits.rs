//! Abuse limits: per-device, per-user and per-IP rate limits on sends,
//! uploads, logins, sign-ups and connection attempts, and a lockout that
//! throttles password guessing.
//!
//! * Rates are GCRA token buckets (the `governor` crate), one keyed bucket
//!   set per limit: `burst` requests at once, refilled at `count/period`.
//! * Login failures: after `lockout_after` consecutive failures for a
//!   username (or `lockout_after_ip` for a client IP), every further attempt
//!   is refused for a window that doubles with each failure (`lockout_base`
//!   × 2^(failures − threshold), at most `lockout_max`) **without checking
//!   the password**, so a locked account can't be guessed at all. A success
//!   clears the username's count (not the IP's: one attacker account must
//!   not reset an IP's count).
//! * Refusals are `ApiError::RateLimited` with the time to wait.
//! * Memory is bounded: idle buckets (indistinguishable from fresh ones)
//!   are dropped by [`Limits::sweep`] (every minute), and a bucket set or
//!   lockout table that still holds more than `max_keys` keys is reset
//!   (failing open rather than growing).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::ApiError;

/// One rate: `burst` at once, refilled at `count` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Rate {
    pub const fn new(count: u32, period_secs: u64, burst: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(period_secs),
            burst,
        }
    }

    fn quota(&self) -> Option<Quota> {
        let per_cell = self.period / self.count.max(1);
        Some(Quota::with_period(per_cell)?.allow_burst(NonZeroU32::new(self.burst)?))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            3600 => "h",
            60 => "m",
            _ => "s",
        };
        write!(f, "{}/{unit}:{}", self.count, self.burst)
    }
}

/// Parses a rate spec: `COUNT/UNIT[:BURST]` (UNIT `s`, `m` or `h`; BURST
/// defaults to COUNT), or `off`. Answers None for `off`.
pub fn parse_rate(spec: &str) -> Result<Option<Rate>, String> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || format!("bad rate {spec:?}: expected COUNT/s|m|h[:BURST] or off");
    let (rate, burst) = match spec.split_once(':') {
        Some((r, b)) => (r, Some(b)),
        None => (spec, None),
    };
    let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let period = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    let burst: u32 = match burst {
        Some(b) => b.trim().parse().map_err(|_| bad())?,
        None => count,
    };
    if count == 0 || burst == 0 || count > 1_000_000 || burst > 1_000_000 {
        return Err(format!("{}: COUNT and BURST must be 1 to 1000000", bad()));
    }
    Ok(Some(Rate::new(count, period, burst)))
}

/// Every limit, by the name used in configuration and metrics, with its
/// default: generous enough that a person (or a chatty client) never meets
/// them, tight enough to stop floods and guessing.
pub const DEFAULTS: &[(&str, Rate)] = &[
    // Message sends per device (session) and per user (all devices).
    ("send_device", Rate::new(20, 1, 1000)),
    ("send_user", Rate::new(50, 1, 2000)),
    // Media uploads (called by the media module: `check_upload`).
    ("upload_device", Rate::new(2, 1, 60)),
    ("upload_user", Rate::new(5, 1, 120)),
    // Login attempts per username and per client IP (NAT: many users).
    ("login_user", Rate::new(10, 60, 20)),
    ("login_ip", Rate::new(120, 60, 300)),
    // Sign-ups per client IP (each costs an argon2id hash).
    ("register_ip", Rate::new(60, 60, 300)),
    // WebSocket connection attempts per client IP and per user.
    ("connect_ip", Rate::new(20, 1, 500)),
    ("connect_user", Rate::new(2, 1, 60)),
];

/// Limits as configured.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Limit name → rate (None = off).
    pub rates: BTreeMap<String, Option<Rate>>,
    /// Consecutive login failures of a username before lockouts start.
    pub lockout_after: u32,
    /// Consecutive login failures from one IP before lockouts start.
    pub lockout_after_ip: u32,
    pub lockout_base: Duration,
    pub lockout_max: Duration,
    /// Most keys one bucket set or lockout table holds.
    pub max_keys: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            rates: DEFAULTS
                .iter()
                .map(|(n, r)| (n.to_string(), Some(*r)))
                .collect(),
            lockout_after: 5,
            lockout_after_ip: 50,
            lockout_base: Duration::from_secs(1),
            lockout_max: Duration::from_secs(15 * 60),
            max_keys: 200_000,
        }
    }
}

impl LimitsConfig {
    /// Applies `name=SPEC` overrides (see [`parse_rate`]).
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (name, spec) = assignment
            .split_once('=')
            .ok_or_else(|| format!("bad limit {assignment:?}: expected NAME=COUNT/UNIT[:BURST]"))?;
        let name = name.trim();
        if !DEFAULTS.iter().any(|(n, _)| *n == name) {
            let known: Vec<&str> = DEFAULTS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown limit {name:?} (known: {})",
                known.join(", ")
            ));
        }
        self.rates.insert(name.to_string(), parse_rate(spec)?);
        Ok(())
    }

    fn rate(&self, name: &str) -> Option<Rate> {
        self.rates.get(name).copied().flatten()
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// One limit's buckets, by key.
struct Buckets<K: Hash + Eq + Clone> {
    name: &'static str,
    quota: Option<Quota>,
    set: RwLock<Keyed<K>>,
    max_keys: usize,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(name: &'static str, cfg: &LimitsConfig) -> Self {
        let quota = cfg.rate(name).and_then(|r| r.quota());
        let q = quota.unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        Buckets {
            name,
            quota,
            set: RwLock::new(RateLimiter::keyed(q)),
            max_keys: cfg.max_keys,
        }
    }

    /// Takes one cell for `key`; Err(wait) when the bucket is empty.
    fn check(&self, key: &K) -> Result<(), Duration> {
        let Some(q) = self.quota else { return Ok(()) };
        let Ok(set) = self.set.read() else {
            return Ok(());
        };
        match set.check_key(key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let _ = q;
                Err(not_until.wait_time_from(set.clock().now()))
            }
        }
    }

    fn sweep(&self) {
        let Some(q) = self.quota else { return };
        let over = match self.set.read() {
            Ok(set) => {
                set.retain_recent();
                set.shrink_to_fit();
                set.len() > self.max_keys
            }
            Err(_) => false,
        };
        if over {
            tracing::warn!(
                limit = self.name,
                "more than {} keys: resetting this limit's buckets",
                self.max_keys
            );
            if let Ok(mut set) = self.set.write() {
                *set = RateLimiter::keyed(q);
            }
        }
    }

    fn len(&self) -> usize {
        self.set.read().map(|s| s.len()).unwrap_or(0)
    }
}

/// Consecutive failures of one key.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Login failure counts and lockout windows, by key.
struct Lockouts {
    after: u32,
    base: Duration,
    max: Duration,
    max_keys: usize,
    table: Mutex<HashMap<String, Failures>>,
}

impl Lockouts {
    fn new(after: u32, cfg: &LimitsConfig) -> Lockouts {
        Lockouts {
            after: after.max(1),
            base: cfg.lockout_base,
            max: cfg.lockout_max.max(cfg.lockout_base),
            max_keys: cfg.max_keys,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// How long `key` is still locked out.
    fn locked(&self, key: &str, now: Instant) -> Option<Duration> {
        let t = self.table.lock().ok()?;
        let until = t.get(key)?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// The window after `count` consecutive failures (None below the
    /// threshold).
    fn window(&self, count: u32) -> Option<Duration> {
        let over = count.checked_sub(self.after)?;
        let factor = 1u32.checked_shl(over.min(31)).unwrap_or(u32::MAX);
        Some(self.base.saturating_mul(factor).min(self.max))
    }

    fn fail(&self, key: &str, now: Instant) {
        let Ok(mut t) = self.table.lock() else { return };
        if t.len() >= self.max_keys && !t.contains_key(key) {
            Self::sweep_table(&mut t, now, self.forget());
            if t.len() >= self.max_keys {
                tracing::warn!("login lockout table full: resetting it");
                t.clear();
            }
        }
        let f = t.entry(key.to_string()).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: None,
        });
        f.count = f.count.saturating_add(1);
        f.last = now;
        f.locked_until = self.window(f.count).map(|w| now + w);
    }

    fn clear(&self, key: &str) {
        if let Ok(mut t) = self.table.lock() {
            t.remove(key);
        }
    }

    /// Failures are forgotten after this long without another.
    fn forget(&self) -> Duration {
        (self.max * 2).max(Duration::from_secs(3600))
    }

    fn sweep_table(t: &mut HashMap<String, Failures>, now: Instant, forget: Duration) {
        t.retain(|_, f| {
            now.duration_since(f.last) < forget || f.locked_until.is_some_and(|u| u > now)
        });
    }

    fn sweep(&self, now: Instant) {
        let forget = self.forget();
        if let Ok(mut t) = self.table.lock() {
            Self::sweep_table(&mut t, now, forget);
            t.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }
}

/// Every abuse limit of one router.
pub struct Limits {
    send_device: Buckets<[u8; 32]>,
    send_user: Buckets<String>,
    upload_device: Buckets<[u8; 32]>,
    upload_user: Buckets<String>,
    login_user: Buckets<String>,
    login_ip: Buckets<IpAddr>,
    register_ip: Buckets<IpAddr>,
    connect_ip: Buckets<IpAddr>,
    connect_user: Buckets<String>,
    user_failures: Lockouts,
    ip_failures: Lockouts,
    checks: AtomicU64,
}

fn refuse(what: &str, limit: &'static str, wait: Duration) -> ApiError {
    crate::metrics::rate_limited(limit);
    let retry_after_ms = ms(wait);
    ApiError::RateLimited {
        message: format!("too many {what}: retry in {retry_after_ms} ms"),
        retry_after_ms,
    }
}

/// The key of a username for the login limits: normalized like a
/// username, bounded in size (invalid names are keyed too, so probing them
/// is limited the same way).
fn user_key(username: &str) -> String {
    crate::error::clip(&username.trim().to_ascii_lowercase(), 64).to_string()
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Limits {
        Limits {
            send_device: Buckets::new("send_device", cfg),
            send_user: Buckets::new("send_user", cfg),
            upload_device: Buckets::new("upload_device", cfg),
            upload_user: Buckets::new("upload_user", cfg),
            login_user: Buckets::new("login_user", cfg),
            login_ip: Buckets::new("login_ip", cfg),
            register_ip: Buckets::new("register_ip", cfg),
            connect_ip: Buckets::new("connect_ip", cfg),
            connect_user: Buckets::new("connect_user", cfg),
            user_failures: Lockouts::new(cfg.lockout_after, cfg),
            ip_failures: Lockouts::new(cfg.lockout_after_ip, cfg),
            checks: AtomicU64::new(0),
        }
    }

    fn tick(&self) {
        // A sweep every 64k checks as well as every minute, so a flood of
        // fresh keys can't outrun the timer.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 65_536 == 65_535 {
            self.sweep();
        }
    }

    fn both<A: Hash + Eq + Clone, B: Hash + Eq + Clone>(
        what: &str,
        a: (&Buckets<A>, &A),
        b: (&Buckets<B>, &B),
    ) -> Result<(), ApiError> {
        a.0.check(a.1).map_err(|w| refuse(what, a.0.name, w))?;
        b.0.check(b.1).map_err(|w| refuse(what, b.0.name, w))
    }

    /// A message send by `user` from the device of session `device`.
    pub fn check_send(&self, user: &str, device: &[u8; 32]) -> Result<(), ApiError> {
        self.tick();
        Self::both(
            "messages",
            (&self.send_device, device),
            (&self.send_user, &user.to_string()),
        )
    }

    /// A media upload by `user` from the device of session `device`.
    pub fn check_upload(&self, user: &str, device: &[u8; 32]) -> Result<(), ApiError> {
        self.tick();
        Self::both(
            "uploads",
            (&self.upload_device, device),
            (&self.upload_user, &user.to_string()),
        )
    }

    /// A WebSocket connection attempt from `ip` (before authentication).
    pub fn check_connect_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.tick();
        self.connect_ip
            .check(&ip)
            .map_err(|w| refuse("connection attempts", self.connect_ip.name, w))
    }

    /// A WebSocket connection of `user` (after authentication).
    pub fn check_connect_user(&self, user: &str) -> Result<(), ApiError> {
        self.tick();
        self.connect_user
            .check(&user.to_string())
            .map_err(|w| refuse("connection attempts", self.connect_user.name, w))
    }

    /// A sign-up from `ip`.
    pub fn check_register(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.tick();
        self.register_ip
            .check(&ip)
            .map_err(|w| refuse("sign-ups", self.register_ip.name, w))
    }

    /// A login attempt for `username` from `ip`: lockouts first (no
    /// password is checked while locked), then the attempt rates.
    pub fn check_login(&self, username: &str, ip: IpAddr) -> Result<(), ApiError> {
        self.tick();
        let now = Instant::now();
        let key = user_key(username);
        let locked = [
            self.user_failures.locked(&key, now),
            self.ip_failures.locked(&ip.to_string(), now),
        ];
        if let Some(wait) = locked.into_iter().flatten().max() {
            return Err(refuse("failed logins", "login_lockout", wait));
        }
        Self::both(
            "login attempts",
            (&self.login_user, &key),
            (&self.login_ip, &ip),
        )
    }

    /// Records a failed login (wrong password or unknown username).
    pub fn login_failed(&self, username: &str, ip: IpAddr) {
        let now = Instant::now();
        self.user_failures.fail(&user_key(username), now);
        self.ip_failures.fail(&ip.to_string(), now);
    }

    /// Records a successful login: the username's failures are forgotten.
    pub fn login_succeeded(&self, username: &str) {
        self.user_failures.clear(&user_key(username));
    }

    /// Drops idle buckets and forgotten failures; resets any set above
    /// `max_keys`.
    pub fn sweep(&self) {
        self.send_device.sweep();
        self.send_user.sweep();
        self.upload_device.sweep();
        self.upload_user.sweep();
        self.login_user.sweep();
        self.login_ip.sweep();
        self.register_ip.sweep();
        self.connect_ip.sweep();
        self.connect_user.sweep();
        let now = Instant::now();
        self.user_failures.sweep(now);
        self.ip_failures.sweep(now);
    }

    /// Keys held (buckets and failure rows), for tests and metrics.
    pub fn keys(&self) -> usize {
        self.send_device.len()
            + self.send_user.len()
            + self.upload_device.len()
            + self.upload_user.len()
            + self.login_user.len()
            + self.login_ip.len()
            + self.register_ip.len()
            + self.connect_ip.len()
            + self.connect_user.len()
            + self.user_failures.len()
            + self.ip_failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[&str]) -> LimitsConfig {
        let mut c = LimitsConfig::default();
        for p in pairs {
            c.set(p).unwrap();
        }
        c
    }

    fn wait_of(e: ApiError) -> u64 {
        match e {
            ApiError::RateLimited { retry_after_ms, .. } => retry_after_ms,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rate_specs_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_rate("5/s").unwrap(), Some(Rate::new(5, 1, 5)));
        assert_eq!(parse_rate("10/m:20").unwrap(), Some(Rate::new(10, 60, 20)));
        assert_eq!(
            parse_rate(" 1/h : 3 ").unwrap(),
            Some(Rate::new(1, 3600, 3))
        );
        assert_eq!(parse_rate("off").unwrap(), None);
        for bad in ["", "5", "5/d", "0/s", "5/s:0", "x/s", "5/s:y", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let mut c = LimitsConfig::default();
        assert!(c.set("nope=1/s").is_err());
        assert!(c.set("send_user").is_err());
        c.set("send_user=off").unwrap();
        assert_eq!(c.rate("send_user"), None);
        for (n, r) in DEFAULTS {
            assert_eq!(parse_rate(&r.to_string()).unwrap(), Some(*r), "{n}");
        }
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_the_wait_and_other_keys_are_independent() {
        let l = Limits::new(&cfg(&["send_device=1/h:3", "send_user=1000/s"]));
        let (d1, d2) = ([1u8; 32], [2u8; 32]);
        for _ in 0..3 {
            l.check_send("u", &d1).unwrap();
        }
        let wait = wait_of(l.check_send("u", &d1).unwrap_err());
        // One cell per hour: the next one is most of an hour away.
        assert!(wait > 3_000_000 && wait <= 3_600_000, "{wait}");
        // Another device of the same user has its own bucket.
        l.check_send("u", &d2).unwrap();
        // Per-user: three devices, one user bucket of 2.
        let l = Limits::new(&cfg(&["send_device=1000/s", "send_user=1/h:2"]));
        l.check_send("u", &[1; 32]).unwrap();
        l.check_send("u", &[2; 32]).unwrap();
        assert!(l.check_send("u", &[3; 32]).is_err());
        l.check_send("v", &[3; 32]).unwrap();
        // Uploads and connections have their own limits.
        let l = Limits::new(&cfg(&[
            "upload_device=1/h:1",
            "connect_ip=1/h:1",
            "connect_user=1/h:1",
        ]));
        l.check_upload("u", &d1).unwrap();
        assert!(l.check_upload("u", &d1).is_err());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        l.check_connect_ip(ip).unwrap();
        assert!(l.check_connect_ip(ip).is_err());
        l.check_connect_ip("10.0.0.2".parse().unwrap()).unwrap();
        l.check_connect_user("u").unwrap();
        assert!(l.check_connect_user("u").is_err());
        // Off means off.
        let l = Limits::new(&cfg(&["send_device=off", "send_user=off"]));
        for _ in 0..10_000 {
            l.check_send("u", &d1).unwrap();
        }
    }

    #[test]
    fn the_defaults_let_a_busy_person_through() {
        // A person typing fast: 5 messages a second for a minute, from two
        // devices, plus reconnects and a few logins — never limited.
        let l = Limits::new(&LimitsConfig::default());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for i in 0..300 {
            l.check_send("alice", &[(i % 2) as u8; 32]).unwrap();
        }
        for _ in 0..20 {
            l.check_connect_ip(ip).unwrap();
            l.check_connect_user("alice").unwrap();
            l.check_login("alice", ip).unwrap();
            l.login_failed("alice", ip);
            l.login_succeeded("alice");
        }
        for _ in 0..30 {
            l.check_upload("alice", &[0; 32]).unwrap();
        }
    }

    #[test]
    fn login_failures_lock_out_with_growing_windows_and_success_resets() {
        let mut c = cfg(&["login_user=off", "login_ip=off"]);
        c.lockout_after = 3;
        c.lockout_after_ip = 1000;
        c.lockout_base = Duration::from_secs(10);
        c.lockout_max = Duration::from_secs(60);
        let l = Limits::new(&c);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..2 {
            l.check_login("Bob", ip).unwrap();
            l.login_failed("Bob", ip);
        }
        l.check_login("bob", ip).unwrap();
        l.login_failed("bob", ip);
        // Third failure: locked ~10 s, also for the name's other spellings.
        let w1 = wait_of(l.check_login(" BOB ", ip).unwrap_err());
        assert!(w1 > 9_000 && w1 <= 10_000, "{w1}");
        // Another user from the same IP is not locked.
        l.check_login("carol", ip).unwrap();
        // Each further failure doubles the window, up to the maximum.
        let lo = &l.user_failures;
        let now = Instant::now();
        assert_eq!(lo.window(2), None);
        assert_eq!(lo.window(3), Some(Duration::from_secs(10)));
        assert_eq!(lo.window(4), Some(Duration::from_secs(20)));
        assert_eq!(lo.window(5), Some(Duration::from_secs(40)));
        assert_eq!(lo.window(6), Some(Duration::from_secs(60)));
        assert_eq!(lo.window(u32::MAX), Some(Duration::from_secs(60)));
        l.login_failed("bob", ip);
        let w2 = lo.locked("bob", now).unwrap();
        assert!(w2 > Duration::from_secs(19), "{w2:?}");
        // Success clears the username's failures.
        l.login_succeeded("bob");
        l.check_login("bob", ip).unwrap();
        // Per IP: many usernames from one address.
        let mut c = cfg(&["login_user=off", "login_ip=off"]);
        c.lockout_after_ip = 5;
        let l = Limits::new(&c);
        for i in 0..5 {
            l.check_login(&format!("u{i}"), ip).unwrap();
            l.login_failed(&format!("u{i}"), ip);
        }
        assert!(l.check_login("fresh", ip).is_err());
        l.check_login("fresh", "192.0.2.2".parse().unwrap())
            .unwrap();
    }

    #[test]
    fn login_attempt_rates_apply_per_username_and_per_ip() {
        let l = Limits::new(&cfg(&["login_user=1/h:2", "login_ip=1/h:3"]));
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        l.check_login("dave", a).unwrap();
        l.check_login("dave", b).unwrap();
        assert!(l.check_login("dave", b).is_err());
        l.check_login("erin", a).unwrap();
        l.check_login("frank", a).unwrap();
        assert!(l.check_login("grace", a).is_err());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_fresh_keys() {
        let mut c = cfg(&["connect_user=1/h:5", "login_user=off", "login_ip=off"]);
        c.max_keys = 1000;
        let l = Limits::new(&c);
        for i in 0..5000 {
            l.check_connect_user(&format!("user{i}")).unwrap();
            l.login_failed(&format!("user{i}"), "192.0.2.9".parse().unwrap());
            if i % 500 == 499 {
                l.sweep();
            }
        }
        l.sweep();
        // Each table is capped (a reset happens above max_keys).
        assert!(l.keys() <= 3 * 1000, "{} keys", l.keys());
        // Idle buckets go: a bucket refilled to full is dropped by a sweep.
        let l = Limits::new(&cfg(&["connect_user=1000/s:1"]));
        for i in 0..100 {
            l.check_connect_user(&format!("user{i}")).unwrap();
        }
        assert_eq!(l.connect_user.len(), 100);
        std::thread::sleep(Duration::from_millis(20));
        l.sweep();
        assert_eq!(l.connect_user.len(), 0);
    }
}
