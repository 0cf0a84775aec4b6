//! Observability: Prometheus metrics (`GET /metrics`, text format) and the
//! trace id of each client request, carried to the nodes in gRPC metadata
//! (`x-natter-trace`) so a node's logs of a request can be found from the
//! router's.
//!
//! Metrics live in one process-wide registry; every label has a bounded
//! set of values (op names, error codes, event names, limit names).

use std::sync::LazyLock;
use std::time::Duration;

use crate::now_ms;

use natter_model::pb::{command::Op, query::Q};
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// The gRPC metadata key carrying a request's trace id to the node.
pub const TRACE_HEADER: &str = "x-natter-trace";

pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub frames_in: IntCounterVec,
    pub frames_out: IntCounterVec,
    pub messages_out: IntCounter,
    pub push_events: IntCounterVec,
    pub pushes_from_events: IntCounter,
    pub delivery_latency: HistogramVec,
    pub cluster_latency: HistogramVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub http_requests: IntCounterVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("natter_router".into()), None)?;
    let connections = IntGauge::new("connections", "Open WebSocket connections")?;
    let frames_in = IntCounterVec::new(
        Opts::new(
            "frames_in_total",
            "WebSocket frames received, by op (\"invalid\" when unreadable) and result (ok or the error code)",
        ),
        &["op", "result"],
    )?;
    let frames_out = IntCounterVec::new(
        Opts::new(
            "frames_out_total",
            "WebSocket frames queued to clients, by kind (reply, error, or the event name)",
        ),
        &["kind"],
    )?;
    let messages_out = IntCounter::new(
        "messages_out_total",
        "Messages pushed to devices (live and tombstones, cold starts excluded)",
    )?;
    let pushes_from_events = IntCounter::new(
        "pushes_from_events_total",
        "Conversation pushes built from the sends a change event carried, without reading the conversation back",
    )?;
    let push_events = IntCounterVec::new(
        Opts::new(
            "push_events_total",
            "Push events delivered to devices, by event",
        ),
        &["event"],
    )?;
    let delivery_latency = HistogramVec::new(
        HistogramOpts::new(
            "delivery_latency_seconds",
            "From a message's commit (its created_at_ms) to its push to a device by this router",
        )
        .buckets(exponential_buckets(0.001, 2.0, 16)?),
        &["kind"],
    )?;
    let cluster_latency = HistogramVec::new(
        HistogramOpts::new(
            "cluster_request_seconds",
            "Cluster requests (retries included), by model op and result",
        )
        .buckets(exponential_buckets(0.0005, 2.0, 16)?),
        &["op", "result"],
    )?;
    let rate_limited = IntCounterVec::new(
        Opts::new(
            "rate_limited_total",
            "Requests refused by an abuse limit, by limit",
        ),
        &["limit"],
    )?;
    let auth_failures = IntCounterVec::new(
        Opts::new(
            "auth_failures_total",
            "Failed authentications: login (wrong credentials) or token (missing, forged, expired, revoked)",
        ),
        &["kind"],
    )?;
    let http_requests = IntCounterVec::new(
        Opts::new(
            "http_requests_total",
            "Account endpoint calls, by endpoint and status",
        ),
        &["endpoint", "status"],
    )?;
    registry.register(Box::new(connections.clone()))?;
    registry.register(Box::new(frames_in.clone()))?;
    registry.register(Box::new(frames_out.clone()))?;
    registry.register(Box::new(messages_out.clone()))?;
    registry.register(Box::new(push_events.clone()))?;
    registry.register(Box::new(pushes_from_events.clone()))?;
    registry.register(Box::new(delivery_latency.clone()))?;
    registry.register(Box::new(cluster_latency.clone()))?;
    registry.register(Box::new(rate_limited.clone()))?;
    registry.register(Box::new(auth_failures.clone()))?;
    registry.register(Box::new(http_requests.clone()))?;
    Ok(Metrics {
        registry,
        connections,
        frames_in,
        frames_out,
        messages_out,
        push_events,
        pushes_from_events,
        delivery_latency,
        cluster_latency,
        rate_limited,
        auth_failures,
        http_requests,
    })
}

/// The process's metrics. Building them can only fail on a programming
/// error (a bad name); then a blank registry is used and the router runs
/// on without metrics.
pub static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match build() {
    Ok(m) => Some(m),
    Err(e) => {
        tracing::error!("metrics disabled: {e}");
        None
    }
});

fn with(f: impl FnOnce(&Metrics)) {
    if let Some(m) = METRICS.as_ref() {
        f(m)
    }
}

/// The text exposition of every metric.
pub fn render() -> String {
    let Some(m) = METRICS.as_ref() else {
        return String::new();
    };
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut buf) {
        tracing::warn!("encoding metrics: {e}");
    }
    String::from_utf8(buf).unwrap_or_default()
}

pub fn connection_opened() {
    with(|m| m.connections.inc());
}

pub fn connection_closed() {
    with(|m| m.connections.dec());
}

/// A frame received: its op (or "invalid") and its result.
pub fn frame_in(op: &str, result: &str) {
    with(|m| m.frames_in.with_label_values(&[op, result]).inc());
}

/// A frame queued for a client: "reply", "error", or the event's name.
pub fn frame_out(v: &serde_json::Value) {
    let kind = match v.get("event").and_then(|e| e.as_str()) {
        Some(e) => e,
        None if v.get("error").is_some() => "error",
        None => "reply",
    };
    with(|m| m.frames_out.with_label_values(&[kind]).inc());
}

/// A push event delivered to a device; `messages` of its changes were
/// messages created at `created_at_ms` (their delivery latency is
/// observed unless the page is a cold start).
pub fn pushed(event: &str, cold_start: bool, created_at_ms: impl Iterator<Item = u64>) {
    with(|m| {
        m.push_events.with_label_values(&[event]).inc();
        if cold_start {
            return;
        }
        let now = now_ms();
        let h = m.delivery_latency.with_label_values(&[event]);
        for at in created_at_ms {
            m.messages_out.inc();
            h.observe(now.saturating_sub(at) as f64 / 1000.0);
        }
    });
}

/// A conversation push built from an event's sends, without a read.
pub fn pushed_from_event() {
    with(|m| m.pushes_from_events.inc());
}

pub fn rate_limited(limit: &str) {
    with(|m| m.rate_limited.with_label_values(&[limit]).inc());
}

/// `kind`: "login" (wrong credentials) or "token" (a refused token).
pub fn auth_failure(kind: &str) {
    with(|m| m.auth_failures.with_label_values(&[kind]).inc());
}

pub fn http_request(endpoint: &str, status: u16) {
    with(|m| {
        m.http_requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc()
    });
}

/// A cluster request of model op `op` took `took`.
pub fn cluster_request(op: &str, ok: bool, took: Duration) {
    with(|m| {
        m.cluster_latency
            .with_label_values(&[op, if ok { "ok" } else { "error" }])
            .observe(took.as_secs_f64())
    });
}

/// The metric label of a model command.
pub fn op_name(op: &Op) -> &'static str {
    match op {
        Op::ClaimUsername(_) => "claim_username",
        Op::CreateUser(_) => "create_user",
        Op::UpdateUserSettings(_) => "update_user_settings",
        Op::ApplyFeedUpdates(_) => "apply_feed_updates",
        Op::SetFeedFlags(_) => "set_feed_flags",
        Op::FriendRequest(_) => "friend_request",
        Op::FriendAccept(_) => "friend_accept",
        Op::FriendRemove(_) => "friend_remove",
        Op::FriendBlock(_) => "friend_block",
        Op::FriendUnblock(_) => "friend_unblock",
        Op::CreateDirect(_) => "create_direct",
        Op::CreateGroup(_) => "create_group",
        Op::UpdateConversation(_) => "update_conversation",
        Op::DeleteConversation(_) => "delete_conversation",
        Op::SendMessage(_) => "send_message",
        Op::DeleteMessage(_) => "delete_message",
        Op::MarkRead(_) => "mark_read",
        Op::CreateSession(_) => "create_session",
        Op::RevokeSession(_) => "revoke_session",
        #[allow(unreachable_patterns)]
        _ => "other_command",
    }
}

/// The metric label of a model query.
pub fn query_name(q: &Q) -> &'static str {
    match q {
        Q::GetUser(_) => "get_user",
        Q::LookupUsername(_) => "lookup_username",
        Q::GetFriendship(_) => "get_friendship",
        Q::ListFriends(_) => "list_friends",
        Q::GetConversation(_) => "get_conversation",
        Q::SyncConversation(_) => "sync_conversation",
        Q::History(_) => "history",
        Q::GetFeed(_) => "get_feed",
        Q::SyncFeed(_) => "sync_feed",
        Q::GetSession(_) => "get_session",
        #[allow(unreachable_patterns)]
        _ => "other_query",
    }
}

tokio::task_local! {
    /// The trace id of the client request this task serves.
    pub static TRACE: String;
}

/// A fresh trace id: 16 lowercase hex digits.
pub fn new_trace_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The trace id of the current task's request, if it has one.
pub fn current_trace() -> Option<String> {
    TRACE.try_with(|t| t.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_in_the_text_format() {
        frame_in("ping", "ok");
        frame_out(&serde_json::json!({"v": 1, "event": "feed"}));
        rate_limited("send_device");
        cluster_request("send_message", true, Duration::from_millis(3));
        pushed("conversation", false, [now_ms()].into_iter());
        let text = render();
        for needle in [
            "natter_router_frames_in_total{op=\"ping\",result=\"ok\"}",
            "natter_router_frames_out_total{kind=\"feed\"}",
            "natter_router_rate_limited_total{limit=\"send_device\"}",
            "natter_router_cluster_request_seconds_bucket{op=\"send_message\",result=\"ok\"",
            "natter_router_delivery_latency_seconds_count{kind=\"conversation\"}",
            "natter_router_connections",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[tokio::test]
    async fn the_trace_id_is_scoped_to_its_request() {
        assert_eq!(current_trace(), None);
        let id = new_trace_id();
        assert_eq!(id.len(), 16);
        let seen = TRACE.scope(id.clone(), async { current_trace() }).await;
        assert_eq!(seen, Some(id));
    }
}
