//! Prometheus metrics and health endpoints of a node (`--metrics-listen`):
//! `GET /metrics` (text exposition), `GET /healthz` (the process serves),
//! `GET /readyz` (every group this node hosts knows its leader).
//!
//! Per group: term, leader, leader changes, last log / commit / applied
//! index, apply lag, replication lag (on leaders). Node-wide: WAL fsyncs and
//! appends, fsync and append-wait latency histograms (the group-commit
//! syncer), snapshots built / sent / installed. Group values are sampled
//! every [`SAMPLE`]; a leader change shorter than that may go uncounted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use natter_raft_store::RaftHost;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::sync::watch;

use crate::META_GROUP;

/// How often group values are sampled.
pub const SAMPLE: Duration = Duration::from_millis(250);

pub struct Metrics {
    registry: Registry,
    term: IntGaugeVec,
    leader: IntGaugeVec,
    is_leader: IntGaugeVec,
    leader_changes: IntCounterVec,
    last_log: IntGaugeVec,
    commit: IntGaugeVec,
    applied: IntGaugeVec,
    apply_lag: IntGaugeVec,
    replication_lag: IntGaugeVec,
    snapshots: IntCounterVec,
    fsyncs: IntCounter,
    appends: IntCounter,
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), &["group"])?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new(host: &RaftHost) -> Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        for h in host.sync_histograms() {
            r.register(Box::new(h))?;
        }
        let leader_changes = IntCounterVec::new(
            Opts::new(
                "natter_group_leader_changes_total",
                "Leader changes (new leader or new term) this node observed, per group.",
            ),
            &["group"],
        )?;
        r.register(Box::new(leader_changes.clone()))?;
        let snapshots = IntCounterVec::new(
            Opts::new(
                "natter_snapshots_total",
                "Snapshots built (log compaction), sent to a lagging replica, installed from a leader.",
            ),
            &["kind"],
        )?;
        r.register(Box::new(snapshots.clone()))?;
        let fsyncs = IntCounter::new("natter_wal_fsyncs_total", "WAL fsyncs.")?;
        r.register(Box::new(fsyncs.clone()))?;
        let appends = IntCounter::new(
            "natter_wal_appends_total",
            "Raft log appends made durable by the WAL syncer.",
        )?;
        r.register(Box::new(appends.clone()))?;
        Ok(Metrics {
            term: gauge(r, "natter_group_term", "Current Raft term, per group.")?,
            leader: gauge(
                r,
                "natter_group_leader",
                "Leader's node id (0: none known).",
            )?,
            is_leader: gauge(
                r,
                "natter_group_is_leader",
                "1 when this node leads the group.",
            )?,
            last_log: gauge(
                r,
                "natter_group_last_log_index",
                "Last Raft log index held.",
            )?,
            commit: gauge(
                r,
                "natter_group_commit_index",
                "Highest index known committed (on followers: the applied index).",
            )?,
            applied: gauge(r, "natter_group_applied_index", "Last applied index.")?,
            apply_lag: gauge(
                r,
                "natter_group_apply_lag",
                "Entries held in the log but not yet applied (last log index - applied).",
            )?,
            replication_lag: gauge(
                r,
                "natter_group_replication_lag",
                "On leaders: entries the slowest member still misses.",
            )?,
            leader_changes,
            snapshots,
            fsyncs,
            appends,
            registry,
        })
    }

    /// Text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Samples `host` into `m` until `stop`.
pub fn spawn_sampler(
    host: Arc<RaftHost>,
    m: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: BTreeMap<u32, (Option<u64>, u64)> = BTreeMap::new();
        let mut counts = (0u64, 0u64, 0u64, 0u64, 0u64);
        loop {
            let groups = host.status();
            let me = host.node_id();
            for g in &groups {
                let label = g.group.to_string();
                let l = [label.as_str()];
                m.term.with_label_values(&l).set(g.term as i64);
                m.leader
                    .with_label_values(&l)
                    .set(g.leader.unwrap_or(0) as i64);
                let leads = g.leader == Some(me) && g.state == "Leader";
                m.is_leader.with_label_values(&l).set(leads as i64);
                m.last_log
                    .with_label_values(&l)
                    .set(g.last_log_index as i64);
                m.commit.with_label_values(&l).set(g.committed_index as i64);
                m.applied.with_label_values(&l).set(g.applied_index as i64);
                m.apply_lag
                    .with_label_values(&l)
                    .set(g.last_log_index.saturating_sub(g.applied_index) as i64);
                let lag = if leads {
                    g.matched
                        .iter()
                        .filter(|(id, _)| **id != me)
                        .map(|(_, i)| g.last_log_index.saturating_sub(*i))
                        .max()
                        .unwrap_or(0)
                } else {
                    0
                };
                m.replication_lag.with_label_values(&l).set(lag as i64);
                let now = (g.leader, g.term);
                match last.insert(g.group, now) {
                    Some(before) if before != now && now.0.is_some() => {
                        m.leader_changes.with_label_values(&l).inc()
                    }
                    None if now.0.is_some() => m.leader_changes.with_label_values(&l).inc(),
                    _ => {}
                }
            }
            // Groups no longer hosted (replica moved away) leave the output.
            let hosted: Vec<u32> = groups.iter().map(|g| g.group).collect();
            let gone: Vec<u32> = last
                .keys()
                .copied()
                .filter(|g| !hosted.contains(g))
                .collect();
            for g in gone {
                last.remove(&g);
                let label = g.to_string();
                for v in [
                    &m.term,
                    &m.leader,
                    &m.is_leader,
                    &m.last_log,
                    &m.commit,
                    &m.applied,
                    &m.apply_lag,
                    &m.replication_lag,
                ] {
                    let _ = v.remove_label_values(&[label.as_str()]);
                }
            }
            let (fs, ap, _) = host.sync_stats();
            let (built, sent, installed) = host.snapshot_counts();
            m.fsyncs.inc_by(fs.saturating_sub(counts.0));
            m.appends.inc_by(ap.saturating_sub(counts.1));
            m.snapshots
                .with_label_values(&["built"])
                .inc_by(built.saturating_sub(counts.2));
            m.snapshots
                .with_label_values(&["sent"])
                .inc_by(sent.saturating_sub(counts.3));
            m.snapshots
                .with_label_values(&["installed"])
                .inc_by(installed.saturating_sub(counts.4));
            counts = (fs, ap, built, sent, installed);
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    })
}

#[derive(Clone)]
struct Ctx {
    host: Arc<RaftHost>,
    metrics: Arc<Metrics>,
}

/// Why the node is not ready, if it is not: it hosts no meta replica yet,
/// or one of its groups knows no leader.
pub fn not_ready(host: &RaftHost) -> Option<String> {
    let groups = host.status();
    if !groups.iter().any(|g| g.group == META_GROUP) {
        return Some("the meta group is not started".into());
    }
    groups
        .iter()
        .find(|g| g.leader.is_none())
        .map(|g| format!("group {} knows no leader", g.group))
}

/// Serves the endpoints on `listen` until `stop`.
pub async fn serve(
    listen: &str,
    host: Arc<RaftHost>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for metrics"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|State(c): State<Ctx>| async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    c.metrics.render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(c): State<Ctx>| async move {
                match not_ready(&c.host) {
                    None => (StatusCode::OK, "ready\n".to_string()),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .with_state(Ctx { host, metrics });
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!("metrics endpoint: {e}");
        }
    }))
}
