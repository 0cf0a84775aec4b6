//! Router configuration: command-line flags, each also readable from a
//! `NATTER_ROUTER_*` environment variable, and optionally a TOML file
//! (`--config`). Flags and environment win over the file; the file wins over
//! the defaults.

use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde::Deserialize;

use crate::limits::LimitsConfig;
use crate::region::Regions;

#[derive(Debug, Parser)]
#[command(name = "natter-router", about = "Natter's regional router")]
pub struct Flags {
    /// TOML file with any of the settings below (flags and env override it).
    #[arg(long, env = "NATTER_ROUTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP and WebSocket on, e.g. 0.0.0.0:8080.
    #[arg(long, env = "NATTER_ROUTER_LISTEN")]
    pub listen: Option<String>,
    /// Some cluster nodes' data API addresses, "host:port,host:port"; the
    /// rest is learned from the shard map.
    #[arg(long, env = "NATTER_ROUTER_NODES")]
    pub nodes: Option<String>,
    /// Lifetime of a login session, in seconds (default 30 days).
    #[arg(long, env = "NATTER_ROUTER_SESSION_TTL_SECS")]
    pub session_ttl_secs: Option<u64>,
    /// How often an open WebSocket re-checks its session (revocation made
    /// through another router), in seconds.
    #[arg(long, env = "NATTER_ROUTER_SESSION_RECHECK_SECS")]
    pub session_recheck_secs: Option<u64>,
    /// Deadline of one client request, retries included, in milliseconds.
    #[arg(long, env = "NATTER_ROUTER_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Largest WebSocket request frame answered with an error rather than a
    /// close, in bytes.
    #[arg(long, env = "NATTER_ROUTER_WS_MAX_FRAME_BYTES")]
    pub ws_max_frame_bytes: Option<usize>,
    /// Bytes of unsent frames one connection may have queued before it is
    /// disconnected as too slow.
    #[arg(long, env = "NATTER_ROUTER_WS_QUEUE_BYTES")]
    pub ws_queue_bytes: Option<usize>,
    /// Unsent frames one connection may have queued before it is
    /// disconnected as too slow.
    #[arg(long, env = "NATTER_ROUTER_WS_QUEUE_FRAMES")]
    pub ws_queue_frames: Option<usize>,
    /// Consecutive bad frames after which a connection is closed.
    #[arg(long, env = "NATTER_ROUTER_WS_MAX_ERRORS")]
    pub ws_max_errors: Option<u32>,
    /// Requests one connection may have in flight; further frames wait.
    #[arg(long, env = "NATTER_ROUTER_WS_MAX_IN_FLIGHT")]
    pub ws_max_in_flight: Option<usize>,
    /// A connection that sends nothing (not even a pong) for this long is
    /// closed, in seconds. The router pings at a third of it.
    #[arg(long, env = "NATTER_ROUTER_WS_IDLE_SECS")]
    pub ws_idle_secs: Option<u64>,
    /// Messages per pushed conversation page (1..=100).
    #[arg(long, env = "NATTER_ROUTER_PUSH_PAGE")]
    pub push_page: Option<u32>,
    /// Concurrent password hashes (argon2id is deliberately expensive).
    #[arg(long, env = "NATTER_ROUTER_HASH_CONCURRENCY")]
    pub hash_concurrency: Option<usize>,
    /// Seconds a graceful shutdown waits for connections to close.
    #[arg(long, env = "NATTER_ROUTER_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Log as JSON lines.
    #[arg(long, env = "NATTER_ROUTER_LOG_JSON")]
    pub log_json: bool,
    /// Log format: `text` (default) or `json` (JSON lines, like --log-json).
    #[arg(long, env = "NATTER_ROUTER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// This router's region (default "local"); it serves users homed there.
    #[arg(long, env = "NATTER_ROUTER_REGION")]
    pub region: Option<String>,
    /// A router of another region, `NAME=URL` (repeatable; comma-separated
    /// in the environment): users homed in NAME are sent there.
    #[arg(
        long = "region-router",
        env = "NATTER_ROUTER_REGION_ROUTERS",
        value_delimiter = ','
    )]
    pub region_routers: Vec<String>,
    /// An abuse limit, `NAME=COUNT/s|m|h[:BURST]` or `NAME=off` (repeatable;
    /// comma-separated in the environment). Names: send_device, send_user,
    /// upload_device, upload_user, login_user, login_ip, register_ip,
    /// connect_ip, connect_user.
    #[arg(
        long = "rate-limit",
        env = "NATTER_ROUTER_RATE_LIMITS",
        value_delimiter = ','
    )]
    pub rate_limits: Vec<String>,
    /// Consecutive failed logins of a username before lockouts start.
    #[arg(long, env = "NATTER_ROUTER_LOGIN_LOCKOUT_AFTER")]
    pub login_lockout_after: Option<u32>,
    /// Consecutive failed logins from one client IP before lockouts start.
    #[arg(long, env = "NATTER_ROUTER_LOGIN_LOCKOUT_AFTER_IP")]
    pub login_lockout_after_ip: Option<u32>,
    /// First lockout window, in milliseconds (doubles per further failure).
    #[arg(long, env = "NATTER_ROUTER_LOGIN_LOCKOUT_BASE_MS")]
    pub login_lockout_base_ms: Option<u64>,
    /// Longest lockout window, in seconds.
    #[arg(long, env = "NATTER_ROUTER_LOGIN_LOCKOUT_MAX_SECS")]
    pub login_lockout_max_secs: Option<u64>,
    /// Media: directory of the local object store (default ./natter-media).
    #[arg(long, env = "NATTER_ROUTER_MEDIA_DIR")]
    pub media_dir: Option<PathBuf>,
    /// Media: "file" (default, under --media-dir) or s3://bucket[/prefix]
    /// (S3-compatible; credentials and endpoint from AWS_* env vars).
    #[arg(long, env = "NATTER_ROUTER_MEDIA_STORE")]
    pub media_store: Option<String>,
    /// Media: HMAC key of signed media URLs, the same on every router
    /// (also NATTER_MEDIA_SECRET); unset: a random per-process key.
    #[arg(long, env = "NATTER_ROUTER_MEDIA_SECRET", hide_env_values = true)]
    pub media_secret: Option<String>,
    /// Media: largest upload in bytes (default 25 MiB).
    #[arg(long, env = "NATTER_ROUTER_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<u64>,
    /// Directory of the web client served at `/` (default: the repo's web/
    /// when it exists).
    #[arg(long, env = "NATTER_ROUTER_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
}

/// The TOML file's shape: the same names as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub nodes: Option<Vec<String>>,
    pub session_ttl_secs: Option<u64>,
    pub session_recheck_secs: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub ws_max_frame_bytes: Option<usize>,
    pub ws_queue_bytes: Option<usize>,
    pub ws_queue_frames: Option<usize>,
    pub ws_max_errors: Option<u32>,
    pub ws_max_in_flight: Option<usize>,
    pub ws_idle_secs: Option<u64>,
    pub push_page: Option<u32>,
    pub hash_concurrency: Option<usize>,
    pub shutdown_grace_secs: Option<u64>,
    pub log_json: Option<bool>,
    pub log_format: Option<String>,
    pub region: Option<String>,
    /// Region → router URL.
    pub region_routers: Option<BTreeMap<String, String>>,
    /// Limit name → `COUNT/UNIT[:BURST]` or `off`.
    pub rate_limits: Option<BTreeMap<String, String>>,
    pub login_lockout_after: Option<u32>,
    pub login_lockout_after_ip: Option<u32>,
    pub login_lockout_base_ms: Option<u64>,
    pub login_lockout_max_secs: Option<u64>,
    pub media_dir: Option<PathBuf>,
    pub media_store: Option<String>,
    pub media_secret: Option<String>,
    pub max_upload_bytes: Option<u64>,
    pub web_dir: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub nodes: Vec<String>,
    pub session_ttl: Duration,
    pub session_recheck: Duration,
    pub request_timeout: Duration,
    pub ws: WsLimits,
    pub push_page: u32,
    pub hash_concurrency: usize,
    pub shutdown_grace: Duration,
    pub log_json: bool,
    pub regions: Regions,
    pub limits: LimitsConfig,
    pub media: crate::media::MediaConfig,
    /// The web client's directory, if any.
    pub web_dir: Option<PathBuf>,
}

/// Per-connection limits of the WebSocket API.
#[derive(Debug, Clone)]
pub struct WsLimits {
    /// Frames up to this size are parsed; larger ones (up to
    /// [`WsLimits::hard_max_bytes`]) get a `too_large` error frame.
    pub max_frame_bytes: usize,
    /// Frames above this close the connection (1009) without being read.
    pub hard_max_bytes: usize,
    pub queue_bytes: usize,
    pub queue_frames: usize,
    pub max_errors: u32,
    pub max_in_flight: usize,
    pub idle: Duration,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_SESSION_TTL_SECS: u64 = 30 * 24 * 3600;
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;
/// Durations are clamped to sane ranges (a day at most) so no deadline
/// arithmetic can overflow.
const DAY_SECS: u64 = 24 * 3600;

impl Default for WsLimits {
    fn default() -> Self {
        WsLimits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            hard_max_bytes: 1024 * 1024,
            queue_bytes: 4 * 1024 * 1024,
            queue_frames: 1024,
            max_errors: 100,
            max_in_flight: 16,
            idle: Duration::from_secs(90),
        }
    }
}

fn split_nodes(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

impl Config {
    pub fn load(flags: Flags) -> Result<Config> {
        let file: FileConfig = match &flags.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let d = WsLimits::default();
        let nodes = match flags.nodes {
            Some(n) => split_nodes(&n),
            None => file.nodes.unwrap_or_default(),
        };
        if nodes.is_empty() {
            bail!("--nodes is required: at least one cluster node address");
        }
        let session_ttl_secs = flags
            .session_ttl_secs
            .or(file.session_ttl_secs)
            .unwrap_or(DEFAULT_SESSION_TTL_SECS);
        let max_ttl_secs = natter_model::MAX_SESSION_TTL_MS / 1000;
        if session_ttl_secs == 0 || session_ttl_secs > max_ttl_secs {
            bail!("--session-ttl-secs must be 1 to {max_ttl_secs}");
        }
        let max_frame_bytes = flags
            .ws_max_frame_bytes
            .or(file.ws_max_frame_bytes)
            .unwrap_or(d.max_frame_bytes);
        if !(1024..=d.hard_max_bytes / 2).contains(&max_frame_bytes) {
            bail!(
                "--ws-max-frame-bytes must be 1024 to {}",
                d.hard_max_bytes / 2
            );
        }
        let push_page = flags.push_page.or(file.push_page).unwrap_or(50);
        if !(1..=crate::ops::MAX_MESSAGE_PAGE).contains(&push_page) {
            bail!("--push-page must be 1 to {}", crate::ops::MAX_MESSAGE_PAGE);
        }
        let ws = WsLimits {
            max_frame_bytes,
            hard_max_bytes: d.hard_max_bytes,
            queue_bytes: flags
                .ws_queue_bytes
                .or(file.ws_queue_bytes)
                .unwrap_or(d.queue_bytes)
                .max(1024),
            queue_frames: flags
                .ws_queue_frames
                .or(file.ws_queue_frames)
                .unwrap_or(d.queue_frames)
                .max(8),
            max_errors: flags
                .ws_max_errors
                .or(file.ws_max_errors)
                .unwrap_or(d.max_errors)
                .max(1),
            max_in_flight: flags
                .ws_max_in_flight
                .or(file.ws_max_in_flight)
                .unwrap_or(d.max_in_flight)
                .clamp(1, 4096),
            idle: Duration::from_secs(
                flags
                    .ws_idle_secs
                    .or(file.ws_idle_secs)
                    .unwrap_or(d.idle.as_secs())
                    .clamp(3, DAY_SECS),
            ),
        };
        let log_json = match flags.log_format.as_deref().or(file.log_format.as_deref()) {
            None | Some("text") => flags.log_json || file.log_json.unwrap_or(false),
            Some("json") => true,
            Some(other) => bail!("--log-format must be text or json, not {other:?}"),
        };
        let mut regions = Regions::default();
        if let Some(r) = flags.region.or(file.region) {
            crate::region::check_name(&r).map_err(|e| anyhow!("--region: {e}"))?;
            regions.mine = r;
        }
        for (name, url) in file.region_routers.unwrap_or_default() {
            let (n, u) = crate::region::parse_region_router(&format!("{name}={url}"))
                .map_err(|e| anyhow!("region_routers: {e}"))?;
            regions.routers.insert(n, u);
        }
        for spec in &flags.region_routers {
            let (n, u) = crate::region::parse_region_router(spec)
                .map_err(|e| anyhow!("--region-router: {e}"))?;
            regions.routers.insert(n, u);
        }
        let mut limits = LimitsConfig::default();
        for (name, spec) in file.rate_limits.unwrap_or_default() {
            limits
                .set(&format!("{name}={spec}"))
                .map_err(|e| anyhow!("rate_limits: {e}"))?;
        }
        for spec in &flags.rate_limits {
            limits.set(spec).map_err(|e| anyhow!("--rate-limit: {e}"))?;
        }
        if let Some(n) = flags.login_lockout_after.or(file.login_lockout_after) {
            limits.lockout_after = n.max(1);
        }
        if let Some(n) = flags.login_lockout_after_ip.or(file.login_lockout_after_ip) {
            limits.lockout_after_ip = n.max(1);
        }
        if let Some(ms) = flags.login_lockout_base_ms.or(file.login_lockout_base_ms) {
            limits.lockout_base = Duration::from_millis(ms.clamp(1, DAY_SECS * 1000));
        }
        if let Some(s) = flags.login_lockout_max_secs.or(file.login_lockout_max_secs) {
            limits.lockout_max = Duration::from_secs(s.clamp(1, DAY_SECS));
        }
        Ok(Config {
            listen: flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            nodes,
            session_ttl: Duration::from_secs(session_ttl_secs),
            session_recheck: Duration::from_secs(
                flags
                    .session_recheck_secs
                    .or(file.session_recheck_secs)
                    .unwrap_or(60)
                    .clamp(1, DAY_SECS),
            ),
            request_timeout: Duration::from_millis(
                flags
                    .request_timeout_ms
                    .or(file.request_timeout_ms)
                    .unwrap_or(10_000)
                    .clamp(100, 600_000),
            ),
            ws,
            push_page,
            hash_concurrency: flags
                .hash_concurrency
                .or(file.hash_concurrency)
                .unwrap_or(2)
                .clamp(1, 64),
            shutdown_grace: Duration::from_secs(
                flags
                    .shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(5)
                    .min(600),
            ),
            log_json,
            regions,
            limits,
            media: crate::media::MediaConfig {
                dir: flags
                    .media_dir
                    .or(file.media_dir)
                    .unwrap_or_else(|| PathBuf::from("natter-media")),
                store: flags.media_store.or(file.media_store),
                secret: flags
                    .media_secret
                    .or_else(|| std::env::var("NATTER_MEDIA_SECRET").ok())
                    .or(file.media_secret),
                max_upload_bytes: flags
                    .max_upload_bytes
                    .or(file.max_upload_bytes)
                    .unwrap_or(crate::media::DEFAULT_MAX_UPLOAD_BYTES)
                    .max(1),
            },
            web_dir: crate::web::resolve_dir(flags.web_dir.or(file.web_dir)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_limits_are_checked() {
        let dir = std::env::temp_dir().join(format!("natter-router-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("router.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9\"\nnodes = [\"a:1\", \"b:2\"]\nsession_ttl_secs = 60\n",
        )
        .unwrap();
        let flags = Flags::parse_from([
            "natter-router",
            "--config",
            path.to_str().unwrap(),
            "--session-ttl-secs",
            "5",
        ]);
        let c = Config::load(flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9");
        assert_eq!(c.nodes, vec!["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(c.session_ttl, Duration::from_secs(5));
        let bad = Flags::parse_from(["natter-router", "--nodes", "a:1", "--session-ttl-secs", "0"]);
        assert!(Config::load(bad).is_err());
        let none = Flags::parse_from(["natter-router"]);
        assert!(Config::load(none).is_err());
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let flags = Flags::parse_from(["natter-router", "--config", path.to_str().unwrap()]);
        assert!(Config::load(flags).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
