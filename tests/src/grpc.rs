//! gRPC client helpers for router tests: a channel to a router's port
//! (HTTP/2 prior knowledge, the same port as HTTP and WebSocket) and
//! authenticated requests.

use std::time::Duration;

use anyhow::{Context, Result};
use natter_proto::client as cp;
use natter_proto::client::natter_client::NatterClient;
use tonic::transport::{Channel, Endpoint};

pub type Api = NatterClient<Channel>;

/// A client of the router at `addr` (`host:port`).
pub async fn api(addr: &str) -> Result<Api> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("gRPC connect to {addr}"))?;
    Ok(NatterClient::new(ch))
}

/// `msg` with `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Registers and logs in over gRPC: (user id, token).
pub async fn account(api: &mut Api, username: &str, password: &str) -> Result<(String, String)> {
    let r = api
        .register(cp::RegisterRequest {
            username: username.into(),
            password: password.into(),
        })
        .await?
        .into_inner();
    let l = api
        .login(cp::LoginRequest {
            username: username.into(),
            password: password.into(),
            device: "test".into(),
        })
        .await?
        .into_inner();
    Ok((r.user_id, l.token))
}

/// The protocol's error code of a status (`natter-error` metadata).
pub fn error_code(s: &tonic::Status) -> String {
    s.metadata()
        .get("natter-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The next event of a Subscribe stream, within `timeout`.
pub async fn next_event(
    s: &mut tonic::Streaming<cp::Event>,
    timeout: Duration,
) -> Result<Option<cp::event::Event>> {
    match tokio::time::timeout(timeout, s.message()).await {
        Err(_) => anyhow::bail!("no event within {timeout:?}"),
        Ok(Err(st)) => Err(anyhow::anyhow!("stream ended: {st}")),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(e))) => Ok(e.event),
    }
}
