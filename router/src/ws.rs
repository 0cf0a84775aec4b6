//! One WebSocket connection of protocol v1 (docs/protocol.md).
//!
//! Three tasks per connection: the reader (parses frames, answers bad ones
//! with error frames, runs requests with a bounded number in flight), the
//! writer (drains the bounded outgoing queue, pings, closes), and the
//! session watchdog (closes the connection when the session expires or is
//! revoked). The push hub feeds the same outgoing queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::auth::SessionInfo;
use crate::conn::{close, Closer, Frame, Outbound};
use crate::error::ApiError;
use crate::frame::{bad, parse_frame, BadFrame, Parsed};
use crate::now_ms;
use crate::ops::{Ops, Request};
use crate::presence::presence_json;
use crate::push::{Device, Resume};
use crate::AppState;

/// Longest a single frame write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
pub use crate::frame::MAX_ID_BYTES;
/// Time to flush queued frames (an error, `reconnect`) before closing.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);
/// Time a closing connection waits for the client's close frame.
const DRAIN_ON_CLOSE: Duration = Duration::from_secs(2);

pub fn reply_ok(id: &Value, ok: Value) -> Value {
    json!({"v": 1, "id": id, "ok": ok})
}

pub fn reply_err(id: &Value, code: &str, message: &str) -> Value {
    json!({"v": 1, "id": id, "error": {"code": code, "message": message}})
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
    crate::metrics::connection_opened();
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
    crate::metrics::connection_closed();
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
                crate::metrics::frame_in(b.op.unwrap_or("invalid"), b.code);
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
    let Parsed { id, op, req } = parse_frame(text, state.config.ws.max_frame_bytes)?;
    if let Request::Send { .. } = &req {
        // Abuse limits: not a bad frame; the connection stays usable.
        if let Err(e) = state.limits.check_send(&dev.user_id, &dev.token_hash) {
            crate::metrics::frame_in(op, e.code());
            out.send_json(&json!({"v": 1, "id": id, "error": e.json()}));
            return Ok(());
        }
    }
    let local = matches!(
        req,
        Request::Ping {} | Request::Resume { .. } | Request::Typing { .. }
    );
    if local {
        crate::metrics::frame_in(op, "ok");
    }
    match req {
        Request::Ping {} => {
            out.send_json(&reply_ok(&id, json!({})));
        }
        Request::Resume {
            feed_token,
            conversations,
        } => {
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
        Request::GetPresence { user_ids } => {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
                _ = out.closer().closed() => return Ok(()),
            };
            let (state, out, dev) = (state.clone(), out.clone(), dev.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + state.config.request_timeout;
                let r = state
                    .hub
                    .presence
                    .get(
                        &state.cluster,
                        &dev.user_id,
                        Some((dev.id, &out)),
                        user_ids,
                        deadline,
                    )
                    .await;
                let reply = match r {
                    Ok(users) => {
                        let users: Vec<_> = users.iter().map(presence_json).collect();
                        reply_ok(&id, json!({ "users": users }))
                    }
                    Err(e) => reply_err(&id, e.code(), &e.to_string()),
                };
                out.reply(&reply, permit);
            });
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
            let trace = crate::metrics::new_trace_id();
            let span = tracing::debug_span!("request", trace = %trace, op, device = dev.id);
            let run = async move {
                let ops = Ops {
                    cluster: &state.cluster,
                    me: &me,
                    deadline: Instant::now() + state.config.request_timeout,
                };
                let reply = match ops.run(req).await {
                    Ok(ok) => {
                        crate::metrics::frame_in(op, "ok");
                        reply_ok(&id, ok)
                    }
                    Err(e) => {
                        if e.code() == "internal" {
                            tracing::warn!("request failed: {e}");
                        }
                        crate::metrics::frame_in(op, e.code());
                        reply_err(&id, e.code(), &e.to_string())
                    }
                };
                out.reply(&reply, permit);
            };
            tokio::spawn(crate::metrics::TRACE.scope(trace, run.instrument(span)));
        }
    }
    Ok(())
}
