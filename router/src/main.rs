//! The `natter-router` binary: configuration, logging, signals.

use anyhow::{Context, Result};
use clap::Parser;
use natter_router::config::{Config, Flags};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

// glibc's allocator, not mimalloc: with mimalloc a flood of 12 KB pushes to
// slow readers grew the router's RSS by 31-53 MiB instead of ~8 (the
// router test of a client that never reads), though it saved a third of
// the router's CPU per send (README, table of 64ce8cd).
#[tokio::main]
async fn main() -> Result<()> {
    let config = Config::load(Flags::parse())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if config.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        nodes = ?config.nodes,
        "natter-router started"
    );
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            stop.cancel();
        });
    }
    natter_router::serve(config, listener, stop).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
