//! HTTP endpoints: accounts (`/v1/register`, `/v1/login`, `/v1/logout`),
//! the WebSocket (`/v1/ws`), and operations (`/healthz`, `/readyz`).
//! Errors are `{"error":{"code","message"}}` with a matching status.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// Largest body of an HTTP request.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({"error": self.json()}))).into_response()
    }
}

fn bad_body(e: JsonRejection) -> ApiError {
    ApiError::invalid(format!("bad request body: {}", e.body_text()))
}

pub fn routes(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .merge(crate::media::routes())
        .fallback(crate::web::service(state.config.web_dir.as_deref()))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    username: String,
    password: String,
    #[serde(default)]
    device: String,
}

async fn register(
    State(st): State<Arc<AppState>>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(c) = body.map_err(bad_body)?;
    let (user_id, username) = st.accounts.register(&c.username, &c.password).await?;
    tracing::info!(user = %user_id, "registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({"user_id": user_id, "username": username})),
    ))
}

async fn login(
    State(st): State<Arc<AppState>>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(c) = body.map_err(bad_body)?;
    let l = st
        .accounts
        .login(&c.username, &c.password, &c.device)
        .await?;
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
        let v = v
            .to_str()
            .map_err(|_| ApiError::Unauthenticated("malformed Authorization header".into()))?;
        return match v.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Ok(t.trim().to_string()),
            _ => Err(ApiError::Unauthenticated(
                "Authorization must be \"Bearer <token>\"".into(),
            )),
        };
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

async fn logout(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = token(&headers, &query)?;
    let s = st.accounts.logout(&t).await?;
    st.hub.end_session(&s.token_hash);
    Ok(Json(json!({})))
}

async fn websocket(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if st.draining.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("the router is shutting down".into()));
    }
    let t = token(&headers, &query)?;
    let session = st.accounts.authenticate(&t).await?;
    let upgrade = upgrade
        .map_err(|e| ApiError::invalid(format!("not a WebSocket upgrade: {}", e.body_text())))?;
    let hard = st.config.ws.hard_max_bytes;
    let tracker = st.tasks.clone();
    Ok(upgrade
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| tracker.track_future(crate::ws::serve(st, socket, session))))
}

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
