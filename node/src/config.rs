//! Node configuration: command-line flags, each also readable from a
//! `NATTER_*` environment variable, and optionally a TOML file (`--config`).
//! Flags and environment win over the file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use natter_raft_store::{RaftTimings, SyncMode};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(name = "natter-node", about = "A Natter storage node")]
pub struct Flags {
    /// TOML file with any of the settings below (flags and env override it).
    #[arg(long, env = "NATTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id: unique in the cluster, never reused.
    #[arg(long, env = "NATTER_NODE_ID")]
    pub node_id: Option<u64>,
    /// Address to listen on for gRPC (Raft and data API), e.g. 127.0.0.1:7001.
    #[arg(long, env = "NATTER_LISTEN")]
    pub listen: Option<String>,
    /// Address peers and routers use to reach this node (default: --listen).
    #[arg(long, env = "NATTER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Directory of this node's RocksDB.
    #[arg(long, env = "NATTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Region label of this node.
    #[arg(long, env = "NATTER_REGION")]
    pub region: Option<String>,
    /// The cluster's first nodes, "id=host:port,..." (the same on each of them).
    #[arg(long, env = "NATTER_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Number of data shards, fixed when the cluster is created (default 3:
    /// more than the nodes the cluster will ever have).
    #[arg(long, env = "NATTER_SHARDS")]
    pub shards: Option<u32>,
    /// Replicas per shard.
    #[arg(long, env = "NATTER_REPLICAS")]
    pub replicas: Option<usize>,
    /// "group-commit" (default), "per-write" (one fsync per append; benchmarks
    /// only) or "unsafe-no-wal" (loses acknowledged writes on a crash: a
    /// negative control for tests, never for real use).
    #[arg(long, env = "NATTER_SYNC_MODE")]
    pub sync_mode: Option<String>,
    /// Snapshot every this many log entries.
    #[arg(long, env = "NATTER_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long, env = "NATTER_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    #[arg(long, env = "NATTER_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    #[arg(long, env = "NATTER_ELECTION_MIN_MS")]
    pub election_min_ms: Option<u64>,
    #[arg(long, env = "NATTER_ELECTION_MAX_MS")]
    pub election_max_ms: Option<u64>,
    /// Skip the checksum pass over the data dir at start.
    #[arg(long, env = "NATTER_NO_VERIFY")]
    pub no_verify: bool,
    /// Never run the rebalancer here. It runs on whichever node leads the
    /// meta group, so set this on every node to pause replica moves and
    /// leader balancing cluster-wide (e.g. during maintenance).
    #[arg(long, env = "NATTER_NO_REBALANCE")]
    pub no_rebalance: bool,
    /// Start replicating a leader's new entries only after its own fsync
    /// (openraft's order), instead of during it. For benchmarks.
    #[arg(long, env = "NATTER_NO_EAGER_REPLICATION")]
    pub no_eager_replication: bool,
    /// Log as JSON lines.
    #[arg(long, env = "NATTER_LOG_JSON")]
    pub log_json: bool,
    /// Offline notifications are POSTed here (none: they are dropped).
    #[arg(long, env = "NATTER_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key of the webhook signature (required with --webhook-url).
    #[arg(long, env = "NATTER_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Timeout of one webhook attempt, in ms (default 10000).
    #[arg(long, env = "NATTER_WEBHOOK_TIMEOUT_MS")]
    pub webhook_timeout_ms: Option<u64>,
    /// How long a router's presence report lasts, in ms (default 15000).
    #[arg(long, env = "NATTER_PRESENCE_LEASE_MS")]
    pub presence_lease_ms: Option<u64>,
    /// Join a running cluster through this node ("host:port") instead of
    /// creating one: on first start (empty data dir) the cluster assigns this
    /// node a fresh id (never --node-id); on restart the id is read from the
    /// data dir. Replicas then move here automatically (the rebalancer).
    #[arg(long, env = "NATTER_JOIN")]
    pub join: Option<String>,
    /// Address of the HTTP endpoint serving /metrics (Prometheus), /healthz
    /// and /readyz, e.g. 127.0.0.1:9101. Off when not set.
    #[arg(long, env = "NATTER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// The TOML file's shape: the same names as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub region: Option<String>,
    pub initial_cluster: Option<String>,
    pub shards: Option<u32>,
    pub replicas: Option<usize>,
    pub sync_mode: Option<String>,
    pub join: Option<String>,
    pub metrics_listen: Option<String>,
    pub raft: Option<RaftTimings>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub webhook_timeout_ms: Option<u64>,
    pub presence_lease_ms: Option<u64>,
    /// `rebalance = false` is `--no-rebalance`.
    pub rebalance: Option<bool>,
    /// `eager_replication = false` is `--no-eager-replication`.
    pub eager_replication: Option<bool>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// 0 until a joining node learns its id (see [`Config::join`]).
    pub node_id: u64,
    pub listen: String,
    pub advertise: String,
    pub data_dir: PathBuf,
    pub region: String,
    pub initial_cluster: BTreeMap<u64, String>,
    pub shards: u32,
    pub replicas: usize,
    pub sync_mode: SyncMode,
    /// A leader replicates new entries during its own fsync.
    pub eager_replication: bool,
    pub timings: RaftTimings,
    pub verify: bool,
    /// Whether this node runs the rebalancer when it leads the meta group.
    pub rebalance: bool,
    pub log_json: bool,
    pub webhook: Option<crate::notifier::Webhook>,
    pub presence_lease: std::time::Duration,
    /// Joining a running cluster through this address.
    pub join: Option<String>,
    pub metrics_listen: Option<String>,
}

/// Default data shards: one per node of a three-node cluster, which is what
/// the local cluster and the benchmark run on one small machine. Each shard
/// is a Raft group with its own log entries, appends, applies and fan-out
/// rounds, so on two cores fewer, larger batches win: 3 shards against 8
/// gave +16-22 % sends/s at 16 clients, +2-9 % at 256 and a third of the
/// sustained run's p99 (four A/B pairs, README). Leaders spread over shards,
/// so a cluster that will grow needs more shards than nodes it will have,
/// chosen with `--shards` when it is created (docs/operations.md).
pub const DEFAULT_SHARDS: u32 = 3;
pub const MAX_SHARDS: u32 = 1024;

pub fn parse_cluster(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("initial cluster entry {part:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("bad node id in {part:?}"))?;
        if id == 0 {
            bail!("node id 0 is reserved");
        }
        if out.insert(id, addr.trim().to_string()).is_some() {
            bail!("node id {id} appears twice in the initial cluster");
        }
    }
    Ok(out)
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
        let join = flags.join.or(file.join);
        let node_id = match (flags.node_id.or(file.node_id), &join) {
            (Some(0), _) => bail!("node id 0 is reserved"),
            (Some(id), _) => id,
            (None, Some(_)) => 0,
            (None, None) => bail!("--node-id is required (or --join to join a running cluster)"),
        };
        if join.is_some() && (flags.initial_cluster.is_some() || file.initial_cluster.is_some()) {
            bail!("--join and --initial-cluster exclude each other");
        }
        let listen = flags
            .listen
            .or(file.listen)
            .context("--listen is required")?;
        let advertise = flags
            .advertise
            .or(file.advertise)
            .unwrap_or_else(|| listen.clone());
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .context("--data-dir is required")?;
        let initial_cluster = match flags.initial_cluster.or(file.initial_cluster) {
            Some(s) => parse_cluster(&s)?,
            None if join.is_some() => BTreeMap::new(),
            None => BTreeMap::from([(node_id, advertise.clone())]),
        };
        let shards = flags.shards.or(file.shards).unwrap_or(DEFAULT_SHARDS);
        if shards == 0 || shards > MAX_SHARDS {
            bail!("--shards must be 1..={MAX_SHARDS}");
        }
        let replicas = flags.replicas.or(file.replicas).unwrap_or(3);
        if replicas == 0 {
            bail!("--replicas must be at least 1");
        }
        let sync_mode = match flags.sync_mode.or(file.sync_mode).as_deref() {
            None | Some("group-commit") => SyncMode::GroupCommit,
            Some("per-write") => SyncMode::PerWrite,
            // Negative control for the fault-injection suite: acknowledges
            // writes that are not durable. Loudly named on purpose.
            Some("unsafe-no-wal") => SyncMode::UnsafeNoWal,
            Some(other) => bail!("unknown sync mode {other:?} (group-commit or per-write)"),
        };
        let mut timings = file.raft.unwrap_or_default();
        if let Some(v) = flags.snapshot_logs {
            timings.snapshot_logs = v;
        }
        if let Some(v) = flags.keep_logs {
            timings.keep_logs = v;
        }
        if let Some(v) = flags.heartbeat_ms {
            timings.heartbeat_ms = v;
        }
        if let Some(v) = flags.election_min_ms {
            timings.election_min_ms = v;
        }
        if let Some(v) = flags.election_max_ms {
            timings.election_max_ms = v;
        }
        let webhook = match flags.webhook_url.or(file.webhook_url) {
            None => None,
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("--webhook-url must be an http:// or https:// URL");
                }
                let secret = flags
                    .webhook_secret
                    .or(file.webhook_secret)
                    .filter(|s| !s.is_empty())
                    .context("--webhook-secret is required with --webhook-url")?;
                let ms = flags
                    .webhook_timeout_ms
                    .or(file.webhook_timeout_ms)
                    .unwrap_or(10_000);
                if !(100..=300_000).contains(&ms) {
                    bail!("--webhook-timeout-ms must be 100..=300000");
                }
                Some(crate::notifier::Webhook {
                    url,
                    secret,
                    timeout: std::time::Duration::from_millis(ms),
                })
            }
        };
        let lease_ms = flags
            .presence_lease_ms
            .or(file.presence_lease_ms)
            .unwrap_or(15_000);
        if !(1_000..=600_000).contains(&lease_ms) {
            bail!("--presence-lease-ms must be 1000..=600000");
        }
        Ok(Config {
            node_id,
            listen,
            advertise,
            data_dir,
            region: flags
                .region
                .or(file.region)
                .unwrap_or_else(|| "local".into()),
            initial_cluster,
            shards,
            replicas,
            sync_mode,
            eager_replication: !flags.no_eager_replication
                && file.eager_replication.unwrap_or(true),
            timings,
            verify: !flags.no_verify,
            rebalance: !flags.no_rebalance && file.rebalance.unwrap_or(true),
            log_json: flags.log_json,
            webhook,
            presence_lease: std::time::Duration::from_millis(lease_ms),
            join,
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_rejects_duplicates_and_zero() {
        let c = parse_cluster("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(c.get(&2).map(String::as_str), Some("127.0.0.1:7002"));
        assert!(parse_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_cluster("0=a:1").is_err());
        assert!(parse_cluster("x").is_err());
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let dir = std::env::temp_dir().join(format!("natter-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.toml");
        std::fs::write(&path, "node_id = 4\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nshards = 4\n[raft]\nheartbeat_ms = 100\n").unwrap();
        let flags = Flags::parse_from([
            "natter-node",
            "--config",
            path.to_str().unwrap(),
            "--shards",
            "6",
        ]);
        let c = Config::load(flags).unwrap();
        assert_eq!((c.node_id, c.shards, c.timings.heartbeat_ms), (4, 6, 100));
        std::fs::write(&path, "nodeid = 4\n").unwrap();
        let flags = Flags::parse_from(["natter-node", "--config", path.to_str().unwrap()]);
        assert!(Config::load(flags).is_err(), "unknown keys are rejected");
    }

    #[test]
    fn a_webhook_needs_a_secret_and_an_http_url() {
        let base = [
            "natter-node",
            "--node-id",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            "/tmp/x",
        ];
        let with = |extra: &[&str]| {
            Config::load(Flags::parse_from(base.iter().chain(extra.iter()).copied()))
        };
        assert!(with(&["--webhook-url", "http://h/x"]).is_err());
        assert!(with(&["--webhook-url", "ftp://h", "--webhook-secret", "s"]).is_err());
        let c = with(&["--webhook-url", "http://h/x", "--webhook-secret", "s"]).unwrap();
        assert_eq!(c.webhook.map(|w| w.url).as_deref(), Some("http://h/x"));
        assert!(with(&[]).unwrap().webhook.is_none());
        assert!(with(&["--presence-lease-ms", "10"]).is_err());
    }
}
