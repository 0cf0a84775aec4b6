//! HTTP endpoints: accounts (`/v1/register`, `/v1/login`, `/v1/logout`),
//! the WebSocket (`/v1/ws`), and operations (`/healthz`, `/readyz`).
//! Errors are `{"error":{"code","message"}}` with a matching status.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Request};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::json;
use tracing::Instrument;

use crate::auth::Login;
use crate::error::ApiError;
use crate::frame::{bearer_token, parse_credentials};
use crate::metrics;
use crate::AppState;

/// Largest body of an HTTP request.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), Json(json!({"error": self.json()}))).into_response();
        if let ApiError::RateLimited { retry_after_ms, .. } = &self {
            // Whole seconds, rounded up (RFC 9110 Retry-After).
            let secs = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// The body of a request, or `too_large` / `invalid_argument`.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("request body above {MAX_BODY_BYTES} bytes"))
        } else {
            ApiError::invalid(format!("bad request body: {}", e.body_text()))
        }
    })
}

/// Gives every HTTP request a trace id (carried to the nodes), counts the
/// account endpoints' answers.
async fn observe(req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/v1/register" => Some("register"),
        "/v1/login" => Some("login"),
        "/v1/logout" => Some("logout"),
        "/v1/ws" => Some("ws"),
        _ => None,
    };
    let trace = metrics::new_trace_id();
    let span = tracing::debug_span!("http", trace = %trace, path = %req.uri().path());
    let resp = metrics::TRACE
        .scope(trace, next.run(req).instrument(span))
        .await;
    if let Some(e) = endpoint {
        metrics::http_request(e, resp.status().as_u16());
    }
    resp
}

async fn unknown_endpoint() -> ApiError {
    ApiError::not_found("no such endpoint (see docs/protocol.md)")
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
}

pub fn routes(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        // An API path no route takes is a 404 of the API, not a page of the
        // web client (which answers every other path).
        .route("/v1/{*rest}", axum::routing::any(unknown_endpoint))
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .merge(crate::media::routes())
        .fallback(crate::web::service(state.config.web_dir.as_deref()))
        .with_state(state)
}

/// Registers under the sign-up limit (per client IP, when known): the one
/// path of every front-end (HTTP, gRPC).
pub(crate) async fn guarded_register(
    st: &AppState,
    username: &str,
    password: &str,
    ip: Option<IpAddr>,
) -> Result<(String, String), ApiError> {
    if let Some(ip) = ip {
        st.limits.check_register(ip)?;
    }
    let (user_id, username) = st.accounts.register(username, password).await?;
    tracing::info!(user = %user_id, "registered");
    Ok((user_id, username))
}

/// Logs in under the login limits and lockouts (per username, and per
/// client IP when known): the one path of every front-end.
pub(crate) async fn guarded_login(
    st: &AppState,
    username: &str,
    password: &str,
    device: &str,
    ip: Option<IpAddr>,
) -> Result<Login, ApiError> {
    if let Some(ip) = ip {
        st.limits.check_login(username, ip)?;
    }
    match st.accounts.login(username, password, device).await {
        Ok(l) => {
            st.limits.login_succeeded(username);
            Ok(l)
        }
        Err(e @ ApiError::Unauthenticated(_)) => {
            metrics::auth_failure("login");
            if let Some(ip) = ip {
                st.limits.login_failed(username, ip);
            }
            Err(e)
        }
        Err(e @ ApiError::WrongRegion { .. }) => {
            // The password was right.
            st.limits.login_succeeded(username);
            Err(e)
        }
        Err(e) => Err(e),
    }
}

async fn register(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let c = parse_credentials(&body_bytes(body)?)?;
    let (user_id, username) =
        guarded_register(&st, &c.username, &c.password, Some(peer.ip())).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"user_id": user_id, "username": username})),
    ))
}

async fn login(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c = parse_credentials(&body_bytes(body)?)?;
    let l = guarded_login(&st, &c.username, &c.password, &c.device, Some(peer.ip())).await?;
    Ok(Json(json!({
        "token": l.token,
        "user_id": l.user_id,
        "username": l.username,
        "expires_at_ms": l.expires_at_ms,
    })))
}

/// The token of a request: `Authorization: Bearer <token>` or `?token=`.
fn token(
    headers: &HeaderMap,
    query: &Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<String, ApiError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return bearer_token(v.as_bytes());
    }
    if let Ok(Query(q)) = query {
        if let Some(t) = q.get("token") {
            return Ok(t.clone());
        }
    }
    Err(ApiError::Unauthenticated(
        "a session token is required".into(),
    ))
}

/// Checks a request's session; counts refusals.
async fn session_of(
    st: &AppState,
    headers: &HeaderMap,
    query: &Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<crate::auth::SessionInfo, ApiError> {
    let r = match token(headers, query) {
        Ok(t) => st.accounts.authenticate(&t).await,
        Err(e) => Err(e),
    };
    if let Err(ApiError::Unauthenticated(_)) = &r {
        metrics::auth_failure("token");
    }
    r
}

async fn logout(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = token(&headers, &query)?;
    let s = st.accounts.logout(&t).await.inspect_err(|e| {
        if matches!(e, ApiError::Unauthenticated(_)) {
            metrics::auth_failure("token");
        }
    })?;
    st.hub.end_session(&s.token_hash);
    Ok(Json(json!({})))
}

async fn websocket(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if st.draining.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("the router is shutting down".into()));
    }
    st.limits.check_connect_ip(peer.ip())?;
    let session = session_of(&st, &headers, &query).await?;
    st.limits.check_connect_user(&session.user_id)?;
    let upgrade = upgrade
        .map_err(|e| ApiError::invalid(format!("not a WebSocket upgrade: {}", e.body_text())))?;
    let deadline = std::time::Instant::now() + st.config.request_timeout;
    let home = crate::region::home_region(&st.cluster, &session.user_id, deadline).await?;
    if let Err(e) = st.config.regions.check(&home) {
        return Ok(upgrade.on_upgrade(move |socket| crate::region::refuse(socket, e)));
    }
    let hard = st.config.ws.hard_max_bytes;
    let tracker = st.tasks.clone();
    Ok(upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| tracker.track_future(crate::ws::serve(st, socket, session))))
}

/// A connection's read buffer. tungstenite zero-fills the whole buffer
/// before every socket read, and its default is 128 KiB: that memset was
/// 5.5 % of a busy router's CPU, and it made every connection cost 128 KiB
/// of resident memory. Client frames are small; a larger one still arrives
/// whole (the buffer grows to the frame's length, up to the size limit).
const WS_READ_BUFFER: usize = 4096;

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    if st.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        );
    }
    match st.hub.ready() {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "connections": st.hub.connections()})),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        ),
    }
}
