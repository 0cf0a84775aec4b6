//! The web client (`web/`): static files served at `/` (plain ES modules,
//! no build step).

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

/// The directory to serve: the configured one, else `./web` when it holds
/// an `index.html`, else the repository's `web/` (next to this crate at
/// build time) when it exists.
pub fn resolve_dir(configured: Option<PathBuf>) -> Option<PathBuf> {
    if configured.is_some() {
        return configured;
    }
    let candidates = [
        PathBuf::from("web"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("web"),
    ];
    candidates
        .into_iter()
        .find(|d| d.join("index.html").is_file())
}

/// The service answering every path no other route takes.
pub fn service(
    dir: Option<&Path>,
) -> axum::routing::MethodRouter<std::sync::Arc<crate::AppState>, Infallible> {
    match dir {
        Some(d) => {
            tracing::info!(dir = %d.display(), "serving the web client at /");
            let files = tower::ServiceBuilder::new()
                // Revalidate on each load, so a new version shows at once.
                .layer(SetResponseHeaderLayer::overriding(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache"),
                ))
                .layer(SetResponseHeaderLayer::overriding(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ))
                .service(ServeDir::new(d).append_index_html_on_directories(true));
            axum::routing::get_service(files)
        }
        None => axum::routing::get(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"error": {"code": "not_found",
                    "message": "no web client here (start the router with --web-dir)"}})),
            )
                .into_response()
        }),
    }
}
