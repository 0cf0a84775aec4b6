//! The background tasks: the push stream (delta sync from the cached
//! tokens, then live changes) and the sender of the outgoing queue. Both
//! move to the next router when theirs fails, with backoff between rounds.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use natter_proto::client as cp;
use natter_proto::client::event::Event as E;
use tokio_util::sync::CancellationToken;

use crate::net::{api_error, authed, transport_failure};
use crate::{Error, Event, Inner, Message};

const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Why a stream ended.
enum End {
    /// Reconnect (to the next router when `failed`).
    Retry {
        reason: String,
        failed: bool,
    },
    /// The session is over: stop.
    Session(String),
    Stopped,
}

/// Keeps a push stream open until `stop`.
pub(crate) async fn run(inner: Arc<Inner>, stop: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let (i, api) = inner.routers.current();
        let router = inner.routers.addr(i);
        let end = match stream(&inner, api, &router, &stop).await {
            Ok(end) => end,
            Err(e) => End::Retry {
                reason: e.to_string(),
                failed: true,
            },
        };
        let was = inner.connected.swap(false, Ordering::AcqRel);
        inner.progress.notify_waiters();
        match end {
            End::Stopped => return,
            End::Session(reason) => {
                tracing::info!("session ended: {reason}");
                inner.emit(Event::SessionEnded { reason });
                return;
            }
            End::Retry { reason, failed } => {
                tracing::debug!(%router, "push stream ended: {reason}");
                if was {
                    inner.emit(Event::Disconnected {
                        router: router.clone(),
                        reason,
                    });
                    backoff = MIN_BACKOFF;
                }
                if failed || was {
                    inner.routers.failed(i);
                }
                if !was {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(inner.cfg.max_backoff);
                }
            }
        }
    }
}

/// One push stream: subscribe with the cached tokens, apply what arrives.
async fn stream(
    inner: &Arc<Inner>,
    mut api: crate::net::Api,
    router: &str,
    stop: &CancellationToken,
) -> Result<End, Error> {
    let token = inner.token()?.ok_or(Error::NotLoggedIn)?;
    let (feed_token, conversations) = {
        let c = inner.cache()?;
        (c.feed_token()?, c.tokens()?)
    };
    let req = cp::SubscribeRequest {
        feed_token,
        conversations: conversations
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .collect::<HashMap<_, _>>(),
    };
    let open = tokio::select! {
        r = tokio::time::timeout(inner.cfg.call_timeout, api.subscribe(authed(&token, req))) => r,
        _ = stop.cancelled() => return Ok(End::Stopped),
    };
    let mut s = match open {
        Err(_) => {
            return Ok(End::Retry {
                reason: "subscribe timed out".into(),
                failed: true,
            })
        }
        Ok(Err(st)) if st.code() == tonic::Code::Unauthenticated => {
            return Ok(End::Session(st.message().to_string()))
        }
        Ok(Err(st)) => {
            return Ok(End::Retry {
                reason: st.to_string(),
                failed: true,
            })
        }
        Ok(Ok(r)) => r.into_inner(),
    };
    loop {
        let m = tokio::select! {
            m = s.message() => m,
            _ = stop.cancelled() => return Ok(End::Stopped),
        };
        let ev = match m {
            Ok(Some(cp::Event { event: Some(e) })) => e,
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Ok(End::Retry {
                    reason: "stream ended".into(),
                    failed: false,
                })
            }
            Err(st) if st.code() == tonic::Code::Unauthenticated => {
                return Ok(End::Session(st.message().to_string()))
            }
            Err(st) => {
                return Ok(End::Retry {
                    reason: st.to_string(),
                    failed: true,
                })
            }
        };
        match ev {
            E::Connected(_) => {
                inner.counters.connects.fetch_add(1, Ordering::Relaxed);
                inner.connected.store(true, Ordering::Release);
                inner.progress.notify_waiters();
                inner.outbox_wake.notify_one();
                inner.emit(Event::Connected {
                    router: router.to_string(),
                });
            }
            E::Feed(f) => {
                let Some(p) = f.page else { continue };
                inner
                    .counters
                    .feed
                    .fetch_add(p.entries.len() as u64, Ordering::Relaxed);
                let gone: Vec<String> = p
                    .entries
                    .iter()
                    .filter_map(|e| e.conversation.as_ref())
                    .filter(|c| c.removed)
                    .map(|c| c.conversation_id.clone())
                    .collect();
                if !inner.cache()?.apply_feed(f.from_token, &p)? {
                    return Ok(End::Retry {
                        reason: "feed page out of step with the cache: resyncing".into(),
                        failed: false,
                    });
                }
                inner.emit(Event::FeedChanged);
                for c in gone {
                    inner.emit(Event::ConversationGone { conversation_id: c });
                }
            }
            E::Conversation(c) => {
                let Some(sync) = c.sync else { continue };
                inner.counters.pages.fetch_add(1, Ordering::Relaxed);
                let applied =
                    inner
                        .cache()?
                        .apply_conversation(&c.conversation_id, c.from_token, &sync)?;
                let Some(a) = applied else {
                    return Ok(End::Retry {
                        reason: "conversation page out of step with the cache: resyncing".into(),
                        failed: false,
                    });
                };
                inner.counters.messages.fetch_add(a.rows, Ordering::Relaxed);
                if a.meta_changed {
                    inner.emit(Event::ConversationChanged {
                        conversation_id: c.conversation_id.clone(),
                    });
                }
                if !a.upserted.is_empty() {
                    inner.emit(Event::Messages {
                        conversation_id: c.conversation_id.clone(),
                        messages: a.upserted.into_iter().map(Message::from).collect(),
                    });
                }
                if !a.removed.is_empty() {
                    inner.emit(Event::MessagesRemoved {
                        conversation_id: c.conversation_id,
                        seqs: a.removed,
                    });
                }
            }
            E::ConversationGone(g) => {
                inner.cache()?.forget_conversation(&g.conversation_id)?;
                inner.emit(Event::ConversationGone {
                    conversation_id: g.conversation_id,
                });
            }
            E::Friends(_) => inner.emit(Event::FriendsChanged),
            E::Typing(t) => inner.emit(Event::Typing {
                conversation_id: t.conversation_id,
                user_id: t.user_id,
            }),
            E::Presence(p) => inner.emit(Event::Presence(p.into())),
            E::SessionEnded(s) => return Ok(End::Session(s.reason)),
            E::Reconnect(r) => {
                return Ok(End::Retry {
                    reason: r.reason,
                    failed: true,
                })
            }
            E::Resync(r) => {
                return Ok(End::Retry {
                    reason: r.reason,
                    failed: false,
                })
            }
        }
    }
}

/// Delivers the outgoing queue in order, until `stop`. Each message is
/// retried with its `client_msg_id` until the cluster answers: an ack (or a
/// duplicate: it went out before) removes it; a refusal removes it with
/// [`Event::SendFailed`]; an unreachable router moves to the next one.
pub(crate) async fn send_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let wake = inner.outbox_wake.notified();
        let next = match inner.cache().and_then(|c| c.next_pending()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("outgoing queue unreadable: {e}");
                None
            }
        };
        let Some(p) = next else {
            tokio::select! {
                _ = wake => continue,
                _ = stop.cancelled() => return,
            }
        };
        let token = match inner.token() {
            Ok(Some(t)) => t,
            _ => return,
        };
        let _ = inner.cache().and_then(|c| c.attempted(p.id));
        let (i, mut api) = inner.routers.current();
        let req = cp::SendRequest {
            conversation_id: p.conversation_id.clone(),
            client_msg_id: p.client_msg_id.clone(),
            text: p.text.clone(),
            media: p.media.clone(),
            ttl_ms: p.ttl_ms,
        };
        let r = tokio::select! {
            r = tokio::time::timeout(inner.cfg.call_timeout, api.send(authed(&token, req))) => r,
            _ = stop.cancelled() => return,
        };
        let retry = match r {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                let done = inner
                    .cache()
                    .and_then(|mut c| c.dequeue(p.id, reply.message.as_ref()));
                if let Err(e) = done {
                    tracing::warn!("outgoing queue: {e}");
                }
                inner.counters.acked.fetch_add(1, Ordering::Relaxed);
                inner.progress.notify_waiters();
                if let Some(m) = reply.message {
                    inner.emit(Event::Sent {
                        client_msg_id: p.client_msg_id,
                        message: Message::from(m),
                    });
                }
                backoff = MIN_BACKOFF;
                false
            }
            Ok(Err(st)) if st.code() == tonic::Code::Unauthenticated => {
                // Kept: sent after the next login.
                tracing::info!("outgoing queue paused: {}", st.message());
                return;
            }
            Ok(Err(st)) if transport_failure(&st) || retryable(&st) => {
                tracing::debug!("send failed, retrying: {st}");
                if transport_failure(&st) {
                    inner.routers.failed(i);
                }
                true
            }
            Ok(Err(st)) => {
                let e = api_error(&st);
                let _ = inner.cache().and_then(|mut c| c.dequeue(p.id, None));
                inner.progress.notify_waiters();
                inner.emit(Event::SendFailed {
                    client_msg_id: p.client_msg_id,
                    code: e.code().to_string(),
                    message: st.message().to_string(),
                });
                false
            }
            Err(_) => {
                inner.routers.failed(i);
                true
            }
        };
        if retry {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(inner.cfg.max_backoff);
        }
    }
}

/// Errors after which the same send may succeed later (the outcome is
/// unknown or the cluster is busy); the idempotency key makes the retry
/// safe.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::DeadlineExceeded
            | tonic::Code::Unavailable
            | tonic::Code::Internal
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Unknown
    )
}
