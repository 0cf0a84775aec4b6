//! Natter's regional router: the clients' front door.
//!
//! It authenticates clients (accounts, hashed session tokens stored in the
//! cluster), serves the WebSocket JSON protocol v1 (`docs/protocol.md`),
//! sends each request to its shard's leader, and pushes every change of a
//! connected device's conversations and feed by delta sync on its behalf.
//!
//! # Modules, one job each
//! * [`config`] — flags, `NATTER_ROUTER_*` env vars, TOML file.
//! * [`cluster`] — shard map, leader cache, redirects, retries, deadlines.
//! * [`auth`] — register, login, logout, session checks (argon2id, SHA-256).
//! * [`ops`] — the protocol's operations, run as the session's user.
//! * [`json`] — model answers as the protocol's JSON.
//! * [`push`] — Watch streams and per-device delta-sync push.
//! * [`presence`] — presence reports, `get_presence`, cross-router typing.
//! * [`conn`] — bounded outgoing queue and close signal of a connection.
//! * [`ws`] — one WebSocket connection: frames, errors, limits.
//! * [`http`] — the HTTP endpoints.
//! * [`grpc`] — the client API over gRPC (same port, HTTP/2).
//! * [`frame`] — pure parsers of client input (frames, bodies, tokens).
//! * [`limits`] — abuse limits (rates per device/user/IP, login lockouts).
//! * [`metrics`] — Prometheus metrics and per-request trace ids.
//! * [`region`] — home regions: serve ours, send the others elsewhere.
//! * [`media`] — media upload/download, thumbnails, signed URLs.
//! * [`web`] — the web client's static files at `/`.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod error;
pub mod frame;
pub mod grpc;
pub mod http;
pub mod json;
pub mod limits;
pub mod media;
pub mod metrics;
pub mod ops;
pub mod presence;
pub mod push;
pub mod region;
pub mod web;
pub mod ws;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Accounts;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::limits::Limits;
use crate::push::Hub;

/// What every handler shares.
pub struct AppState {
    pub config: Config,
    pub cluster: Cluster,
    pub accounts: Accounts,
    pub hub: Arc<Hub>,
    /// Cancelled at shutdown, after the `reconnect` event is queued: closes
    /// every connection.
    pub conns: CancellationToken,
    /// Set when shutdown starts: no new connections, not ready.
    pub draining: AtomicBool,
    /// The open WebSocket connections.
    pub tasks: TaskTracker,
    /// Abuse limits.
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("setting up accounts: {0}")]
    Accounts(#[from] error::ApiError),
    #[error("setting up media: {0}")]
    Media(#[from] media::MediaError),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves on `listener` until `stop` is cancelled, then shuts down
/// gracefully: every connection gets `{"event":"reconnect"}` and a close
/// (1012), and is given `shutdown_grace` to finish.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    media::install(&config.media)?;
    let cluster = Cluster::new(config.nodes.clone());
    let accounts = Accounts::new(
        cluster.clone(),
        config.session_ttl,
        config.request_timeout,
        config.hash_concurrency,
    )
    .await?
    .with_regions(config.regions.clone())
    .with_session_cache(config.session_recheck);
    let hub = Hub::new(cluster.clone(), config.push_page, config.request_timeout);
    let watchers_stop = CancellationToken::new();
    let watchers = tokio::spawn(hub.clone().watch_cluster(watchers_stop.clone()));
    let config_limits = config.limits.clone();
    let state = Arc::new(AppState {
        config,
        cluster,
        accounts,
        hub: hub.clone(),
        conns: CancellationToken::new(),
        draining: AtomicBool::new(false),
        tasks: TaskTracker::new(),
        limits: Limits::new(&config_limits),
    });
    let sweeper = {
        let state = state.clone();
        let stop = watchers_stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => state.limits.sweep(),
                    _ = stop.cancelled() => return,
                }
            }
        })
    };
    let app = http::routes(state.clone()).merge(grpc::routes(state.clone()));
    let http_stop = CancellationToken::new();
    let server = {
        let http_stop = http_stop.clone();
        // Small frames (a gRPC reply, a pushed event) must not wait for
        // Nagle's algorithm: without TCP_NODELAY a reply can sit ~40 ms
        // behind the peer's delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
        });
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
        })
    };
    stop.cancelled().await;
    tracing::info!(
        connections = hub.connections(),
        "shutting down: asking clients to reconnect"
    );
    state.draining.store(true, Ordering::Release);
    hub.broadcast_reconnect();
    state.conns.cancel();
    http_stop.cancel();
    state.tasks.close();
    let grace = state.config.shutdown_grace;
    if tokio::time::timeout(grace, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {grace:?}; exiting anyway");
    }
    watchers_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), watchers).await;
    let _ = sweeper.await;
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => tracing::warn!("HTTP server task failed: {e}"),
        Err(_) => tracing::warn!("HTTP server did not stop within {grace:?}"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
