//! A tiny webhook receiver for notification tests: an HTTP server on an
//! ephemeral loopback port that checks each POST's HMAC-SHA256 signature
//! the way docs/protocol.md tells receivers to, records it, and answers
//! 200 — or 500 for the next `fail_next` requests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::mpsc;

/// One POST as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Post {
    /// `X-Natter-Delivery`.
    pub delivery: String,
    /// `X-Natter-Timestamp` (seconds).
    pub timestamp: String,
    /// Whether `X-Natter-Signature` is `sha256=` HMAC(secret, ts "." body).
    pub signature_ok: bool,
    pub body: Value,
    /// What the receiver answered.
    pub status: u16,
}

struct Inner {
    secret: Vec<u8>,
    fail_next: AtomicU32,
    tx: mpsc::UnboundedSender<Post>,
}

pub struct Receiver {
    pub url: String,
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Post>,
    server: tokio::task::JoinHandle<()>,
}

/// Verifies a signature header as a receiver should (constant time).
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    if hex.len() != 64 {
        return false;
    }
    let mut tag = Vec::with_capacity(32);
    for i in (0..64).step_by(2) {
        match u8::from_str_radix(&hex[i..i + 2], 16) {
            Ok(b) => tag.push(b),
            Err(_) => return false,
        }
    }
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let timestamp = h("x-natter-timestamp");
    let signature_ok = verify(&inner.secret, &timestamp, &body, &h("x-natter-signature"));
    let fail = inner
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let _ = inner.tx.send(Post {
        delivery: h("x-natter-delivery"),
        timestamp,
        signature_ok,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status: status.as_u16(),
    });
    status
}

impl Receiver {
    pub async fn start(secret: &str) -> Result<Receiver> {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            secret: secret.as_bytes().to_vec(),
            fail_next: AtomicU32::new(0),
            tx,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let app = Router::new()
            .route("/hook", post(handle))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver {
            url,
            inner,
            rx,
            server,
        })
    }

    /// Answer 500 to the next `n` POSTs.
    pub fn fail_next(&self, n: u32) {
        self.inner.fail_next.store(n, Ordering::SeqCst);
    }

    /// The next POST, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Post> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .map_err(|_| anyhow!("no webhook POST within {timeout:?}"))?
            .ok_or_else(|| anyhow!("receiver stopped"))
    }

    /// POSTs received and not yet taken (without waiting).
    pub fn drain(&mut self) -> Vec<Post> {
        let mut v = Vec::new();
        while let Ok(p) = self.rx.try_recv() {
            v.push(p);
        }
        v
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
