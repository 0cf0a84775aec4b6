//! The errors clients see: one stable code per failure, the same on the
//! WebSocket (`{"error":{"code","message"}}`) and over HTTP.

use axum::http::StatusCode;
use natter_model::pb::{self, response::R, ErrorCode};

use crate::cluster::ClusterError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The model rejected the command or query; nothing changed.
    #[error("{message}")]
    Model { code: ErrorCode, message: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The request itself is malformed (before reaching the cluster).
    #[error("{0}")]
    Invalid(String),
    /// Missing, forged, expired or revoked credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The router is shutting down or not ready.
    #[error("{0}")]
    Unavailable(String),
    /// A reply the router did not expect (a bug or a version mismatch).
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// An abuse limit (`limits`): try again after `retry_after_ms`.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_ms: u64,
    },
    /// The user is homed in another region (`region`): use a router there.
    #[error("user is homed in region {home_region:?}: use a router of that region")]
    WrongRegion {
        home_region: String,
        /// A router of that region, when this router knows one.
        router_url: Option<String>,
    },
    /// A request body above the size limit.
    #[error("{0}")]
    TooLarge(String),
}

impl ApiError {
    pub fn invalid(m: impl Into<String>) -> ApiError {
        ApiError::Invalid(m.into())
    }

    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::Model {
            code: ErrorCode::NotFound,
            message: m.into(),
        }
    }

    pub fn unexpected(r: &R) -> ApiError {
        ApiError::Unexpected(format!("{r:?}").chars().take(200).collect())
    }

    /// The stable code of the protocol (see docs/protocol.md).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Model { code, .. } => match code {
                ErrorCode::InvalidArgument => "invalid_argument",
                ErrorCode::NotFound => "not_found",
                ErrorCode::PermissionDenied => "permission_denied",
                ErrorCode::AlreadyExists => "already_exists",
                ErrorCode::LimitExceeded => "limit_exceeded",
                ErrorCode::FailedPrecondition => "failed_precondition",
                ErrorCode::Unspecified => "internal",
            },
            ApiError::Cluster(ClusterError::Timeout { .. }) => "timeout",
            ApiError::Cluster(ClusterError::Refused(_)) => "unavailable",
            ApiError::Cluster(ClusterError::BadReply(_)) => "internal",
            ApiError::Invalid(_) => "invalid_argument",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Unexpected(_) => "internal",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::WrongRegion { .. } => "wrong_region",
            ApiError::TooLarge(_) => "too_large",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.code() {
            "invalid_argument" | "limit_exceeded" => StatusCode::BAD_REQUEST,
            "not_found" => StatusCode::NOT_FOUND,
            "permission_denied" => StatusCode::FORBIDDEN,
            "already_exists" | "failed_precondition" => StatusCode::CONFLICT,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "timeout" => StatusCode::GATEWAY_TIMEOUT,
            "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
            "wrong_region" => StatusCode::MISDIRECTED_REQUEST,
            "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` object: code, message, and the fields some codes add
    /// (`retry_after_ms`; `home_region`, `router_url`).
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"code": self.code(), "message": self.to_string()});
        match self {
            ApiError::RateLimited { retry_after_ms, .. } => {
                v["retry_after_ms"] = serde_json::json!(retry_after_ms);
            }
            ApiError::WrongRegion {
                home_region,
                router_url,
            } => {
                v["home_region"] = serde_json::json!(home_region);
                v["router_url"] = serde_json::json!(router_url);
            }
            _ => {}
        }
        v
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (client text
/// echoed in error messages and keys may be any UTF-8).
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Turns a model `Error` response into an [`ApiError`].
pub fn check(r: R) -> Result<R, ApiError> {
    match r {
        R::Error(pb::Error { code, message }) => Err(ApiError::Model {
            code: ErrorCode::try_from(code).unwrap_or(ErrorCode::Unspecified),
            message,
        }),
        other => Ok(other),
    }
}
