//! One WebSocket connection of protocol v1 (docs/protocol.md).
//!
//! Three tasks per connection: the reader (parses frames, answers bad ones
//! with error frames, runs requests with a bounded number in flight), the
//! writer (drains the bounded outgoing queue, pings, closes), and the
//! session watchdog (closes the connection when the session expires or is
//! revoked). The push hub feeds the same outgoing queue.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::auth::SessionInfo;
use crate::conn::{close, Closer, Frame, Outbound};
use crate::error::ApiError;
use crate::ops::{Ops, Request, OPS};
use crate::push::{Device, Resume, MAX_TRACKED};
use crate::AppState;

/// Longest a single frame write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest request id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Time to flush queued frames (an error, `reconnect`) before closing.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);
/// Time a closing connection waits for the client's close frame.
const DRAIN_ON_CLOSE: Duration = Duration::from_secs(2);

/// A frame answered with an error, counted against the connection.
struct BadFrame {
    id: Value,
    code: &'static str,
    message: String,
}

fn bad(id: &Value, code: &'static str, message: impl Into<String>) -> BadFrame {
    BadFrame {
        id: id.clone(),
        code,
        message: message.into(),
    }
}

pub fn reply_ok(id: &Value, ok: Value) -> Value {
    json!({"v": 1, "id": id, "ok": ok})
}

pub fn reply_err(id: &Value, code: &str, message: &str) -> Value {
    json!({"v": 1, "id": id, "error": {"code": code, "message": message}})
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Serves one upgraded connection until it closes.
pub async fn serve(state: Arc<AppState>, socket: WebSocket, session: SessionInfo) {
    let limits = &state.config.ws;
    let closer = Arc::new(Closer::new(&state.conns));
    let (out, rx) = Outbound::new(limits.queue_frames, limits.queue_bytes, closer.clone());
    let out = Arc::new(out);
    let dev = state
        .hub
        .register(&session.user_id, session.token_hash, out.clone());
    tracing::debug!(device = dev.id, user = %session.user_id, "connected");
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        out.clone(),
        closer.clone(),
        limits.idle / 3,
    ));
    let watchdog = tokio::spawn(watchdog(state.clone(), session, out.clone()));
    let mut stream = stream;
    let client_left = read_loop(&state, &mut stream, &dev, &out).await;
    closer.close(close::NORMAL, "");
    if !client_left {
        // We are closing: read (and drop) what the client still sends until
        // its close frame, so the socket isn't reset under unread data and
        // the client gets our last frames and the close.
        let drain = async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_ON_CLOSE, drain).await;
    }
    let _ = writer.await;
    watchdog.abort();
    tracing::debug!(device = dev.id, reason = ?closer.reason(), "disconnected");
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    out: Arc<Outbound>,
    closer: Arc<Closer>,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = closer.closed() => break,
            f = rx.recv() => {
                let Some(mut frame) = f else { break };
                let text = frame.take_text();
                let sent = tokio::select! {
                    r = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text.into()))) => r,
                    _ = closer.closed() => {
                        out.done(frame);
                        break;
                    }
                };
                out.done(frame);
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        closer.close(close::NORMAL, "connection lost");
                        break;
                    }
                    Err(_) => {
                        closer.close(close::TOO_SLOW, "too slow: a write timed out");
                        break;
                    }
                }
            }
            _ = ping.tick() => {
                let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    closer.close(close::NORMAL, "connection lost");
                    break;
                }
            }
        }
    }
    let (code, reason) = closer.reason();
    let until = tokio::time::Instant::now() + FLUSH_ON_CLOSE;
    if code != close::TOO_SLOW {
        // Deliver what was queued before the close (error frames, the
        // `reconnect` event), briefly.
        while let Ok(mut frame) = rx.try_recv() {
            let text = frame.take_text();
            let r = tokio::time::timeout_at(until, sink.send(Message::Text(text.into()))).await;
            out.done(frame);
            if !matches!(r, Ok(Ok(()))) {
                break;
            }
        }
    }
    let frame = CloseFrame {
        code,
        reason: reason.chars().take(100).collect::<String>().into(),
    };
    let until = tokio::time::Instant::now() + FLUSH_ON_CLOSE;
    let _ = tokio::time::timeout_at(until, sink.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout_at(until, sink.close()).await;
    while let Ok(frame) = rx.try_recv() {
        out.done(frame);
    }
}

/// Closes the connection when its session expires, or when a periodic
/// check finds it revoked (a logout through another router).
pub(crate) async fn watchdog(state: Arc<AppState>, session: SessionInfo, out: Arc<Outbound>) {
    let end = |why: &str| {
        out.push(crate::push::Push::SessionEnded {
            reason: Some(why.to_string()),
        });
        out.closer().close(close::SESSION_ENDED, why);
    };
    loop {
        let left = Duration::from_millis(session.expires_at_ms.saturating_sub(now_ms()));
        tokio::select! {
            _ = tokio::time::sleep(left.min(state.config.session_recheck)) => {}
            _ = out.closer().closed() => return,
        }
        if now_ms() >= session.expires_at_ms {
            return end("session expired");
        }
        if let Err(ApiError::Unauthenticated(_)) = state.accounts.session(session.token_hash).await
        {
            return end("session expired or revoked");
        }
    }
}

/// Reads and answers frames until the connection closes; true when the
/// client ended it (close frame, end of stream, read error).
async fn read_loop(
    state: &Arc<AppState>,
    stream: &mut SplitStream<WebSocket>,
    dev: &Arc<Device>,
    out: &Arc<Outbound>,
) -> bool {
    let limits = &state.config.ws;
    let closer = out.closer();
    let permits = Arc::new(Semaphore::new(limits.max_in_flight));
    let mut errors = 0u32;
    loop {
        let idle = tokio::time::sleep(limits.idle);
        let msg = tokio::select! {
            _ = closer.closed() => return false,
            _ = idle => {
                closer.close(close::IDLE, "idle: nothing received, not even a pong");
                return false;
            }
            m = stream.next() => m,
        };
        let result = match msg {
            None => return true,
            Some(Err(e)) => {
                // tungstenite refuses frames above the hard limit and text
                // that isn't UTF-8; the stream is unusable after that.
                tracing::debug!(device = dev.id, "read error: {e}");
                let text = e.to_string();
                if text.contains("Space limit exceeded") {
                    closer.close(close::TOO_BIG, "frame above the hard size limit");
                } else if text.contains("UTF-8") {
                    closer.close(close::BAD_DATA, "text frame is not UTF-8");
                } else {
                    closer.close(close::POLICY, "unreadable frame");
                }
                return true;
            }
            Some(Ok(Message::Text(t))) => handle_text(state, dev, out, &permits, t.as_str()).await,
            Some(Ok(Message::Binary(_))) => Err(bad(
                &Value::Null,
                "binary_not_supported",
                "protocol v1 uses text frames of JSON",
            )),
            Some(Ok(Message::Close(_))) => return true,
            Some(Ok(_)) => Ok(()),
        };
        match result {
            Ok(()) => errors = 0,
            Err(b) => {
                errors += 1;
                out.send_json(&reply_err(&b.id, b.code, &b.message));
                if errors >= limits.max_errors {
                    closer.close(close::POLICY, "too many bad frames in a row");
                    return false;
                }
            }
        }
    }
}

/// Parses one text frame and starts its request. Err = a bad frame.
async fn handle_text(
    state: &Arc<AppState>,
    dev: &Arc<Device>,
    out: &Arc<Outbound>,
    permits: &Arc<Semaphore>,
    text: &str,
) -> Result<(), BadFrame> {
    let null = Value::Null;
    let max = state.config.ws.max_frame_bytes;
    if text.len() > max {
        return Err(bad(
            &null,
            "too_large",
            format!(
                "frame of {} bytes is above the {max}-byte limit",
                text.len()
            ),
        ));
    }
    let mut map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad(&null, "bad_frame", "a frame must be a JSON object")),
        Err(e) => return Err(bad(&null, "bad_frame", format!("malformed JSON: {e}"))),
    };
    let id = match map.remove("id") {
        Some(Value::String(s)) if s.len() <= MAX_ID_BYTES => Value::String(s),
        Some(Value::Number(n)) => Value::Number(n),
        _ => {
            return Err(bad(
                &null,
                "bad_frame",
                format!("\"id\" must be a number or a string of at most {MAX_ID_BYTES} bytes"),
            ))
        }
    };
    match map.remove("v") {
        Some(v) if v == json!(1) => {}
        Some(_) => {
            return Err(bad(
                &id,
                "unsupported_version",
                "this router speaks protocol version 1",
            ))
        }
        None => return Err(bad(&id, "bad_frame", "\"v\" is required")),
    }
    let op = match map.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => return Err(bad(&id, "bad_frame", "\"op\" must be a string")),
    };
    if !OPS.contains(&op.as_str()) {
        return Err(bad(
            &id,
            "unknown_op",
            format!("unknown op {:?}", op.chars().take(64).collect::<String>()),
        ));
    }
    let req: Request = serde_json::from_value(Value::Object(map))
        .map_err(|e| bad(&id, "invalid_argument", format!("{op}: {e}")))?;
    match req {
        Request::Ping {} => {
            out.send_json(&reply_ok(&id, json!({})));
        }
        Request::Resume {
            feed_token,
            conversations,
        } => {
            if conversations.len() > MAX_TRACKED {
                return Err(bad(
                    &id,
                    "invalid_argument",
                    format!("resume: at most {MAX_TRACKED} conversations"),
                ));
            }
            out.send_json(&reply_ok(&id, json!({})));
            dev.resume(Resume {
                feed_token,
                conversations,
            });
        }
        Request::Typing { conversation_id } => {
            let reply = match state.hub.typing(dev, &conversation_id) {
                Ok(()) => reply_ok(&id, json!({})),
                Err(e) => reply_err(&id, e.code(), &e.to_string()),
            };
            out.send_json(&reply);
        }
        req => {
            // Backpressure: at most max_in_flight requests run at once; the
            // reader waits (and so stops reading) until one finishes.
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
                _ = out.closer().closed() => return Ok(()),
            };
            let (state, out, me) = (state.clone(), out.clone(), dev.user_id.clone());
            tokio::spawn(async move {
                let ops = Ops {
                    cluster: &state.cluster,
                    me: &me,
                    deadline: Instant::now() + state.config.request_timeout,
                };
                let reply = match ops.run(req).await {
                    Ok(ok) => reply_ok(&id, ok),
                    Err(e) => {
                        if e.code() == "internal" {
                            tracing::warn!("request failed: {e}");
                        }
                        reply_err(&id, e.code(), &e.to_string())
                    }
                };
                out.reply(&reply, permit);
            });
        }
    }
    Ok(())
}
