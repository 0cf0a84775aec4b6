//! A Natter node: hosts Raft groups (the meta group and data shards) on one
//! RocksDB through `natter-raft-store`, serves their Raft traffic and the data
//! API on one gRPC port, and runs the leader-side workers of its shards.
//!
//! Modules:
//! - [`config`]: flags, environment and TOML;
//! - [`meta`]: the meta group's state machine (node registry, placement);
//! - [`api`]: the data API (propose, read, status, shard map);
//! - [`bootstrap`]: which groups to start, and creating a new cluster;
//! - [`shards`]: one supervised loop per hosted shard, as replicas come and go;
//! - [`workers`], [`remote`]: leader-side loops (outbox fan-out, expiry ticks);
//! - [`events`]: change events for `Watch` streams (router push);
//! - [`presence`]: presence leases (soft state) and typing relay;
//! - [`notifier`]: offline notifications by signed webhook.
//! - [`membership`]: joining, the rebalancer, drain/remove, shutdown hand-off;
//! - [`metrics`]: Prometheus metrics, health and readiness endpoints.

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod events;
pub mod membership;
pub mod meta;
pub mod metrics;
pub mod notifier;
pub mod presence;
pub mod remote;
pub mod shards;
pub mod workers;

use anyhow::{Context, Result};
use natter_proto::cluster::node_server::NodeServer;
use natter_raft_store::{HostConfig, RaftHost};

/// The meta group's id; data shards are 1..=shard_count.
pub const META_GROUP: u32 = 0;

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Runs the node until SIGINT or SIGTERM.
pub async fn run(mut cfg: config::Config) -> Result<()> {
    if let Some(join) = cfg.join.clone() {
        cfg.node_id = membership::join_id(
            &join,
            &cfg.data_dir,
            cfg.node_id,
            &cfg.advertise,
            &cfg.region,
        )
        .await?;
    }
    let host = RaftHost::open(HostConfig {
        node_id: cfg.node_id,
        addr: cfg.advertise.clone(),
        data_dir: cfg.data_dir.clone(),
        timings: cfg.timings.clone(),
        sync_mode: cfg.sync_mode,
        eager_replication: cfg.eager_replication,
        verify_on_open: cfg.verify,
    })
    .with_context(|| {
        format!(
            "node {} refuses to start on {}",
            cfg.node_id,
            cfg.data_dir.display()
        )
    })?;

    // A node that was removed from the cluster must not come back.
    let seeds: Vec<String> = cfg
        .join
        .iter()
        .cloned()
        .chain(
            cfg.initial_cluster
                .iter()
                .filter(|(id, _)| **id != cfg.node_id)
                .map(|(_, a)| a.clone()),
        )
        .collect();
    if !host.groups_on_disk()?.is_empty() {
        membership::refuse_if_removed(&host, &seeds).await?;
    }

    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let events = events::Events::default();
    let presence = presence::Presence::new(host.clone(), events.clone(), cfg.presence_lease);
    let stamper = api::Stamper {
        presence: presence.clone(),
        notifications: cfg.webhook.is_some(),
    };
    let api = api::NodeApi {
        host: host.clone(),
        region: cfg.region.clone(),
        events: events.clone(),
        presence: presence.clone(),
        stamper: stamper.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let host = host.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .trace_fn(api::trace_span)
                .add_service(host.transport_service())
                .add_service(NodeServer::new(api).max_decoding_message_size(api::MAX_REQUEST_BYTES))
                .serve_with_incoming_shutdown(tokio_stream_wrapper(listener), async move {
                    let _ = stop.changed().await;
                })
                .await
        })
    };

    if cfg.sync_mode == natter_raft_store::SyncMode::UnsafeNoWal {
        tracing::warn!("UNSAFE: --sync-mode unsafe-no-wal acknowledges writes that a crash loses (negative control only)");
    }
    bootstrap::start_groups(&host, &cfg).await?;
    let mut workers = vec![workers::spawn(
        host.clone(),
        events.clone(),
        stamper.clone(),
        stop_rx.clone(),
    )];
    workers.extend(presence.spawn(stamper.clone(), stop_rx.clone()));
    workers.push(notifier::spawn(
        host.clone(),
        events,
        presence,
        stamper,
        cfg.webhook.clone(),
        stop_rx.clone(),
    )?);
    if cfg.rebalance {
        workers.push(membership::spawn_rebalancer(host.clone(), stop_rx.clone()));
    } else {
        tracing::info!("rebalancer off on this node (--no-rebalance)");
    }
    if let Some(listen) = &cfg.metrics_listen {
        let m = std::sync::Arc::new(metrics::Metrics::new(&host)?);
        workers.push(metrics::spawn_sampler(
            host.clone(),
            m.clone(),
            stop_rx.clone(),
        ));
        workers.push(metrics::serve(listen, host.clone(), m, stop_rx.clone()).await?);
    }
    tracing::info!(node = cfg.node_id, listen = %cfg.listen, groups = ?host.hosted(), "node ready");

    shutdown_signal().await;
    tracing::info!("shutting down: handing leaderships off first");
    membership::hand_off_all(&host, std::time::Duration::from_secs(10)).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Workers keep no state that needs a clean exit (the outbox is durable);
    // one may be waiting on a peer that is already gone.
    for w in workers {
        w.abort();
    }
    host.shutdown().await;
    // Open client connections (routers keep theirs) would hold a graceful
    // server stop forever; give them a moment, then drop them.
    if tokio::time::timeout(std::time::Duration::from_secs(2), server)
        .await
        .is_err()
    {
        tracing::info!("closing remaining client connections");
    }
    Ok(())
}

fn tokio_stream_wrapper(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
