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
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code(), "message": self.to_string()})
    }
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
