//! Media: streaming upload into an object store, content sniffing, sha256
//! content addressing, thumbnails, and downloads a CDN can sit in front of
//! (ETag, `Cache-Control: immutable`, Range), authorized by signed expiring
//! URLs or a session token plus a live membership check.
//!
//! Keys in the store (one namespace per conversation, so "members of the
//! conversation holding the media" is the whole access rule):
//! * `media/<conversation_id>/<sha256>` — the bytes as uploaded;
//! * `thumbs/<conversation_id>/<sha256>` — a thumbnail (images only);
//! * `meta/<conversation_id>/<sha256>` — JSON [`ObjectInfo`]: the sniffed
//!   type, size, dimensions, written last, so its presence means "complete".
//!
//! The signing secret and store are process-wide ([`install`]), so message
//! JSON (`json::media`) and the `send` op can use them without plumbing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::now_ms;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use natter_model::pb::{self, ErrorCode};
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::ApiError;
use crate::ops::{MediaIn, Ops, Request};
use crate::AppState;

type HmacSha256 = Hmac<Sha256>;

/// Default largest upload (`--max-upload-bytes`).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 25 * 1024 * 1024;
/// Longest side of a thumbnail, in pixels.
pub const THUMB_MAX_PX: u32 = 320;
/// Largest file name kept with an upload, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Images larger than this in either dimension are not decoded.
const MAX_IMAGE_SIDE: u32 = 16_384;
/// Memory the image decoder may allocate (decompression bombs).
const MAX_DECODE_ALLOC: u64 = 256 * 1024 * 1024;
/// Bytes read to sniff the content type.
const SNIFF_BYTES: usize = 8192;
/// Chunk of a multipart upload to the store.
const PART_BYTES: usize = 8 * 1024 * 1024;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// Media settings (see `config.rs` for the flags).
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Directory of the local store (and of upload spool files).
    pub dir: PathBuf,
    /// `s3://bucket[/prefix]` for an S3-compatible store; `None`: local.
    pub store: Option<String>,
    /// HMAC key of signed URLs, shared by every router; `None`: random.
    pub secret: Option<String>,
    pub max_upload_bytes: u64,
}

/// What is known of one stored object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectInfo {
    pub sha256: String,
    pub content_type: String,
    pub size: u64,
    #[serde(default)]
    pub width: u32,
    #[serde(default)]
    pub height: u32,
    /// Content type of the thumbnail; empty: no thumbnail.
    #[serde(default)]
    pub thumb_content_type: String,
    #[serde(default)]
    pub thumb_size: u64,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the upload is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the requested range is not satisfiable")]
    Range(u64),
    #[error("media not found")]
    NotFound,
    #[error("storage error: {0}")]
    Store(String),
}

impl From<object_store::Error> for MediaError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => MediaError::NotFound,
            e => MediaError::Store(e.to_string()),
        }
    }
}

impl From<std::io::Error> for MediaError {
    fn from(e: std::io::Error) -> Self {
        MediaError::Store(e.to_string())
    }
}

impl IntoResponse for MediaError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            MediaError::Api(e) => return e.to_string_response(),
            MediaError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            MediaError::Range(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "invalid_argument"),
            MediaError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            MediaError::Store(m) => {
                tracing::warn!("media store: {m}");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        };
        let body = Json(json!({"error": {"code": code, "message": self.to_string()}}));
        let mut r = (status, body).into_response();
        if let MediaError::Range(size) = self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        r
    }
}

trait ToResponse {
    fn to_string_response(&self) -> Response;
}

impl ToResponse for ApiError {
    fn to_string_response(&self) -> Response {
        (self.status(), Json(json!({"error": self.json()}))).into_response()
    }
}

/// The media service of this process.
pub struct Media {
    store: Arc<dyn ObjectStore>,
    secret: Vec<u8>,
    spool: PathBuf,
    pub max_upload_bytes: u64,
}

static MEDIA: OnceLock<Arc<Media>> = OnceLock::new();

/// The process's media service, once [`install`]ed.
pub fn installed() -> Option<&'static Arc<Media>> {
    MEDIA.get()
}

/// Opens the store and makes it the process's media service (the first
/// call wins; later calls return the installed one).
pub fn install(c: &MediaConfig) -> Result<Arc<Media>, MediaError> {
    if let Some(m) = MEDIA.get() {
        return Ok(m.clone());
    }
    let m = Arc::new(Media::open(c)?);
    Ok(MEDIA.get_or_init(|| m).clone())
}

impl Media {
    pub fn open(c: &MediaConfig) -> Result<Media, MediaError> {
        let (store, spool): (Arc<dyn ObjectStore>, PathBuf) = match &c.store {
            Some(url) if url.starts_with("s3://") => {
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.clone())
                    .build()?;
                (
                    Arc::new(s3),
                    std::env::temp_dir().join("natter-media-spool"),
                )
            }
            Some(other) if other != "file" && !other.is_empty() => {
                return Err(MediaError::Store(format!(
                    "--media-store must be \"file\" or s3://bucket, not {other:?}"
                )))
            }
            _ => {
                std::fs::create_dir_all(&c.dir)?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&c.dir)?;
                (Arc::new(local), c.dir.join(".spool"))
            }
        };
        std::fs::create_dir_all(&spool)?;
        let secret = match &c.secret {
            Some(s) if !s.is_empty() => s.as_bytes().to_vec(),
            _ => {
                tracing::warn!(
                    "no --media-secret / NATTER_MEDIA_SECRET: signed media URLs use a random \
                     per-process key (they won't work on other routers or after a restart)"
                );
                let mut k = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
                k
            }
        };
        Ok(Media {
            store,
            secret,
            spool,
            max_upload_bytes: c.max_upload_bytes,
        })
    }

    fn mac(&self, conv: &str, object: &str, thumb: bool, exp: u64) -> HmacSha256 {
        // HMAC takes keys of any length (the fallback never runs).
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()));
        let variant = if thumb { "t" } else { "o" };
        mac.update(format!("natter-media-v1\n{conv}\n{object}\n{variant}\n{exp}").as_bytes());
        mac
    }

    /// The signature of a download URL.
    pub fn sign(&self, conv: &str, object: &str, thumb: bool, exp: u64) -> String {
        hex::encode(self.mac(conv, object, thumb, exp).finalize().into_bytes())
    }

    /// Whether `sig` is this router family's signature (constant time).
    pub fn verify(&self, conv: &str, object: &str, thumb: bool, exp: u64, sig: &str) -> bool {
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        self.mac(conv, object, thumb, exp)
            .verify_slice(&sig)
            .is_ok()
    }

    /// A signed download URL (relative to the router), valid until `exp`.
    pub fn url(&self, conv: &str, object: &str, thumb: bool, exp: u64) -> String {
        let sig = self.sign(conv, object, thumb, exp);
        let t = if thumb { "thumb=1&" } else { "" };
        format!("/v1/media/{conv}/{object}?{t}exp={exp}&sig={sig}")
    }

    async fn info(&self, conv: &str, sha: &str) -> Result<ObjectInfo, MediaError> {
        let bytes = self
            .store
            .get(&key("meta", conv, sha))
            .await?
            .bytes()
            .await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| MediaError::Store(format!("bad metadata of {conv}/{sha}: {e}")))
    }
}

fn key(kind: &str, conv: &str, sha: &str) -> StorePath {
    StorePath::from(format!("{kind}/{conv}/{sha}"))
}

/// Expiry of URLs handed out now: the end of tomorrow (UTC), so a URL is
/// valid for 1–2 days and stays the same all day (cacheable).
pub fn url_expiry(now_ms: u64) -> u64 {
    (now_ms / DAY_MS + 2) * DAY_MS / 1000
}

fn is_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.hyphenated().to_string() == s)
}

/// The `url` and `thumbnail_url` of a media item in a message (`null`
/// when the item doesn't name an uploaded object).
pub fn urls(conv: &str, m: &pb::Media) -> (Value, Value) {
    let Some(media) = installed() else {
        return (Value::Null, Value::Null);
    };
    if !is_uuid(conv) || !is_sha(&m.object_id) {
        return (Value::Null, Value::Null);
    }
    let exp = url_expiry(now_ms());
    let url = json!(media.url(conv, &m.object_id, false, exp));
    let thumb = if m.width > 0 && is_thumbnailable(&m.content_type) {
        json!(media.url(conv, &m.object_id, true, exp))
    } else {
        Value::Null
    };
    (url, thumb)
}

fn is_thumbnailable(ct: &str) -> bool {
    matches!(ct, "image/png" | "image/jpeg" | "image/gif" | "image/webp")
}

/// The media items of a `send`, checked against the store: each must name
/// an object uploaded to this conversation; type, size, hash and
/// dimensions come from the store, not from the client (the client's
/// `name` is kept).
pub async fn resolve_items(conv: &str, items: Vec<MediaIn>) -> Result<Vec<pb::Media>, ApiError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let media =
        installed().ok_or_else(|| ApiError::Unavailable("media is not configured".into()))?;
    let mut out = Vec::with_capacity(items.len());
    for m in items {
        let missing = || ApiError::Model {
            code: ErrorCode::InvalidArgument,
            message: format!(
                "media object {:?} was not uploaded to this conversation (POST /v1/media first)",
                m.object_id.chars().take(80).collect::<String>()
            ),
        };
        if !is_uuid(conv) || !is_sha(&m.object_id) {
            return Err(missing());
        }
        let info = match media.info(conv, &m.object_id).await {
            Ok(i) => i,
            Err(MediaError::NotFound) => return Err(missing()),
            Err(e) => return Err(ApiError::Unavailable(e.to_string())),
        };
        let name = if m.name.is_empty() { info.name } else { m.name };
        out.push(pb::Media {
            object_id: m.object_id,
            sha256: info.sha256,
            content_type: info.content_type,
            size: info.size,
            name,
            width: info.width,
            height: info.height,
        });
    }
    Ok(out)
}

/// The media endpoints (merged into `http::routes`).
pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/v1/media", post(upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/media/{conversation_id}/{object_id}", get(download))
}

fn bearer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("malformed Authorization header".into()))?;
    match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(t.trim().into())),
        _ => Err(ApiError::Unauthenticated(
            "Authorization must be \"Bearer <token>\"".into(),
        )),
    }
}

/// The session's user, who must be a member of `conv` (checked in the
/// cluster now).
async fn member(st: &AppState, headers: &HeaderMap, conv: &str) -> Result<String, ApiError> {
    let token = bearer(headers)?
        .ok_or_else(|| ApiError::Unauthenticated("a session token is required".into()))?;
    let session = st.accounts.authenticate(&token).await?;
    let ops = Ops {
        cluster: &st.cluster,
        me: &session.user_id,
        deadline: Instant::now() + st.config.request_timeout,
    };
    ops.run(Request::GetConversation {
        conversation_id: conv.to_string(),
    })
    .await?;
    Ok(session.user_id)
}

fn conversation_not_found() -> ApiError {
    ApiError::not_found("conversation not found")
}

fn query_map(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(format!("bad query string: {}", e.body_text())))
}

/// A client file name made safe to keep: no path, no control characters,
/// at most [`MAX_NAME_BYTES`].
pub fn clean_name(n: &str) -> String {
    let base = n.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out = String::new();
    for c in base.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The content type of a file from its first bytes (never the client's).
pub fn sniff(head: &[u8]) -> String {
    match infer::get(head) {
        Some(t) => t.mime_type().to_string(),
        // Valid UTF-8 (the sniffed prefix may end inside a character).
        None if !head.is_empty()
            && std::str::from_utf8(head).map_or_else(|e| e.error_len().is_none(), |_| true) =>
        {
            "text/plain; charset=utf-8".into()
        }
        None => "application/octet-stream".into(),
    }
}

struct Spool {
    path: PathBuf,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What an upload's query and headers say, checked before authenticating
/// or reading the body.
#[derive(Debug)]
pub struct UploadParams {
    pub conv: String,
    /// The client's file name, made safe ([`MAX_NAME_BYTES`], no path).
    pub name: String,
}

/// Checks an upload's query (`conversation_id`, `name?`, nothing else) and
/// declared `Content-Length` against `limit`.
pub fn upload_params(
    q: &HashMap<String, String>,
    content_length: Option<&str>,
    limit: u64,
) -> Result<UploadParams, MediaError> {
    let conv = q
        .get("conversation_id")
        .ok_or_else(|| ApiError::invalid("conversation_id is required"))?
        .clone();
    let name = clean_name(q.get("name").map(String::as_str).unwrap_or(""));
    if let Some(k) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "conversation_id" | "name"))
    {
        return Err(ApiError::invalid(format!("unknown parameter {k:?}")).into());
    }
    if let Some(len) = content_length.and_then(|v| v.trim().parse::<u64>().ok()) {
        if len > limit {
            return Err(MediaError::TooLarge(limit));
        }
    }
    Ok(UploadParams { conv, name })
}

/// How a download asks for its object: the thumbnail or the file, and a
/// signed URL's `exp` and `sig` (else a bearer token is needed).
#[derive(Debug, PartialEq)]
pub struct DownloadQuery {
    pub thumb: bool,
    pub signed: Option<(u64, String)>,
}

/// Checks a download's query: `thumb?` (1 or 0), `exp` and `sig` together.
pub fn download_query(q: &HashMap<String, String>) -> Result<DownloadQuery, ApiError> {
    let thumb = match q.get("thumb").map(String::as_str) {
        None | Some("0") | Some("") => false,
        Some("1") => true,
        Some(_) => return Err(ApiError::invalid("thumb must be 1 or 0")),
    };
    let signed = match (q.get("sig"), q.get("exp")) {
        (Some(sig), Some(exp)) => {
            let exp: u64 = exp
                .parse()
                .map_err(|_| ApiError::Unauthenticated("bad exp".into()))?;
            Some((exp, sig.clone()))
        }
        (None, None) => None,
        _ => {
            return Err(ApiError::Unauthenticated(
                "a signed URL needs exp and sig".into(),
            ))
        }
    };
    Ok(DownloadQuery { thumb, signed })
}

/// `POST /v1/media?conversation_id=&name=` with the raw bytes as the body.
async fn upload(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Body,
) -> Result<Response, MediaError> {
    let media =
        installed().ok_or_else(|| ApiError::Unavailable("media is not configured".into()))?;
    let q = query_map(query)?;
    let limit = media.max_upload_bytes;
    let UploadParams { conv, name } = upload_params(
        &q,
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        limit,
    )?;
    let user = member(&st, &headers, &conv).await?;
    if !is_uuid(&conv) {
        return Err(conversation_not_found().into());
    }

    // Spool to disk while hashing: memory stays one chunk per upload.
    let spool = Spool {
        path: media.spool.join(format!("up-{}", uuid::Uuid::new_v4())),
    };
    let mut file = tokio::fs::File::create(&spool.path).await?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(MediaError::TooLarge(limit));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    drop(file);
    if size == 0 {
        return Err(ApiError::invalid("the upload is empty").into());
    }
    let sha = hex::encode(hasher.finalize());

    let info = match media.info(&conv, &sha).await {
        Ok(info) => info, // Already stored: content addressing dedupes.
        Err(MediaError::NotFound) => store_new(media, &conv, &sha, size, &name, &spool).await?,
        Err(e) => return Err(e),
    };
    tracing::info!(user = %user, conversation = %conv, sha256 = %sha, size, content_type = %info.content_type, "media uploaded");
    let exp = url_expiry(now_ms());
    let thumb = if info.thumb_content_type.is_empty() {
        Value::Null
    } else {
        json!(media.url(&conv, &sha, true, exp))
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "object_id": sha,
            "sha256": sha,
            "content_type": info.content_type,
            "size": info.size,
            "width": info.width,
            "height": info.height,
            "name": name,
            "url": media.url(&conv, &sha, false, exp),
            "thumbnail_url": thumb,
        })),
    )
        .into_response())
}

async fn store_new(
    media: &Media,
    conv: &str,
    sha: &str,
    size: u64,
    name: &str,
    spool: &Spool,
) -> Result<ObjectInfo, MediaError> {
    let mut file = tokio::fs::File::open(&spool.path).await?;
    let mut head = vec![0u8; SNIFF_BYTES.min(size as usize)];
    file.read_exact(&mut head).await?;
    let content_type = sniff(&head);

    // The bytes, streamed from the spool file in parts.
    let upload = media.store.put_multipart(&key("media", conv, sha)).await?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut file = tokio::fs::File::open(&spool.path).await?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = w.abort().await;
                return Err(e.into());
            }
        };
        if n == 0 {
            break;
        }
        w.wait_for_capacity(4).await?;
        w.write(&buf[..n]);
    }
    w.finish().await?;

    let mut info = ObjectInfo {
        sha256: sha.to_string(),
        content_type,
        size,
        width: 0,
        height: 0,
        thumb_content_type: String::new(),
        thumb_size: 0,
        name: name.to_string(),
    };
    if is_thumbnailable(&info.content_type) {
        let path = spool.path.clone();
        match tokio::task::spawn_blocking(move || thumbnail(&path)).await {
            Ok(Ok(t)) => {
                info.width = t.width;
                info.height = t.height;
                info.thumb_content_type = t.content_type.into();
                info.thumb_size = t.bytes.len() as u64;
                media
                    .store
                    .put(&key("thumbs", conv, sha), PutPayload::from(t.bytes))
                    .await?;
            }
            Ok(Err(e)) => tracing::info!(sha256 = %sha, "no thumbnail: {e}"),
            Err(e) => tracing::warn!(sha256 = %sha, "thumbnail task failed: {e}"),
        }
    }
    let meta = serde_json::to_vec(&info).map_err(|e| MediaError::Store(e.to_string()))?;
    media
        .store
        .put(&key("meta", conv, sha), PutPayload::from(meta))
        .await?;
    Ok(info)
}

pub struct Thumb {
    pub width: u32,
    pub height: u32,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// Decodes an image (with limits against decompression bombs) and renders
/// a thumbnail of at most [`THUMB_MAX_PX`] a side: JPEG, or PNG when the
/// image has transparency.
pub fn thumbnail(path: &std::path::Path) -> Result<Thumb, image::ImageError> {
    let mut reader = image::ImageReader::open(path)?.with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader.decode()?;
    let (width, height) = (img.width(), img.height());
    let t = img.thumbnail(THUMB_MAX_PX, THUMB_MAX_PX);
    let mut out = std::io::Cursor::new(Vec::new());
    let content_type = if t.color().has_alpha() {
        t.write_to(&mut out, image::ImageFormat::Png)?;
        "image/png"
    } else {
        image::DynamicImage::ImageRgb8(t.to_rgb8()).write_with_encoder(
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80),
        )?;
        "image/jpeg"
    };
    Ok(Thumb {
        width,
        height,
        content_type,
        bytes: out.into_inner(),
    })
}

/// A parsed `Range` header against an object of `size` bytes.
#[derive(Debug, PartialEq)]
pub enum RangeReq {
    /// No range, an unsupported unit or several ranges: the whole object.
    Full,
    /// One satisfiable range, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

pub fn parse_range(h: Option<&str>, size: u64) -> RangeReq {
    let Some(h) = h else {
        return RangeReq::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        return RangeReq::Full; // multi-range: refused, the whole object instead
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last n bytes.
        return match b.parse::<u64>() {
            Ok(0) | Err(_) => RangeReq::Unsatisfiable,
            Ok(_) if size == 0 => RangeReq::Unsatisfiable,
            Ok(n) => RangeReq::Part(size.saturating_sub(n), size - 1),
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeReq::Full;
    };
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(size.saturating_sub(1)),
            _ => return RangeReq::Full, // invalid syntax is ignored (RFC 9110)
        }
    };
    if start >= size {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Part(start, end)
}

/// Whether an `If-None-Match` header names `etag` (or `*`).
pub fn etag_matches(h: Option<&str>, etag: &str) -> bool {
    let Some(h) = h else {
        return false;
    };
    h.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag
    })
}

/// `GET /v1/media/<conversation_id>/<object_id>[?thumb=1]`, authorized by
/// `exp` + `sig` or a bearer token of a member.
async fn download(
    State(st): State<Arc<AppState>>,
    UrlPath((conv, object)): UrlPath<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, MediaError> {
    let media =
        installed().ok_or_else(|| ApiError::Unavailable("media is not configured".into()))?;
    let q = query_map(query)?;
    let DownloadQuery { thumb, signed } = download_query(&q)?;
    let signed = match signed {
        Some((exp, sig)) => {
            if exp.saturating_mul(1000) <= now_ms() {
                return Err(ApiError::Unauthenticated("this media URL has expired".into()).into());
            }
            if !media.verify(&conv, &object, thumb, exp, &sig) {
                return Err(ApiError::Unauthenticated("bad media URL signature".into()).into());
            }
            true
        }
        None => {
            if !is_uuid(&conv) {
                // Say the same as for a conversation one can't see.
                bearer(&headers)?.ok_or_else(|| {
                    ApiError::Unauthenticated("a session token or a signed URL is required".into())
                })?;
                return Err(MediaError::NotFound);
            }
            if bearer(&headers)?.is_none() {
                return Err(ApiError::Unauthenticated(
                    "a session token or a signed URL is required".into(),
                )
                .into());
            }
            member(&st, &headers, &conv).await?;
            false
        }
    };
    if !is_uuid(&conv) || !is_sha(&object) {
        return Err(MediaError::NotFound);
    }
    let info = media.info(&conv, &object).await?;
    let (store_key, content_type, size, etag) = if thumb {
        if info.thumb_content_type.is_empty() {
            return Err(MediaError::NotFound);
        }
        (
            key("thumbs", &conv, &object),
            info.thumb_content_type.clone(),
            info.thumb_size,
            format!("\"{object}-thumb\""),
        )
    } else {
        (
            key("media", &conv, &object),
            info.content_type.clone(),
            info.size,
            format!("\"{object}\""),
        )
    };
    let cache = if signed {
        "public, max-age=31536000, immutable"
    } else {
        "private, max-age=31536000, immutable"
    };
    let mut h = HeaderMap::new();
    let hv = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
    h.insert(header::ETAG, hv(&etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    if etag_matches(
        headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok()),
        &etag,
    ) {
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    h.insert(header::CONTENT_TYPE, hv(&content_type));
    if !content_type.starts_with("image/") {
        let name = if info.name.is_empty() {
            object.clone()
        } else {
            info.name.clone()
        };
        let ascii: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._- ".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let encoded: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        h.insert(
            header::CONTENT_DISPOSITION,
            hv(&format!(
                "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
            )),
        );
    }
    // If-Range with another validator: send the whole object.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = if if_range_ok {
        parse_range(
            headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
            size,
        )
    } else {
        RangeReq::Full
    };
    let (status, opts) = match range {
        RangeReq::Unsatisfiable => return Err(MediaError::Range(size)),
        RangeReq::Full => {
            h.insert(header::CONTENT_LENGTH, hv(&size.to_string()));
            (StatusCode::OK, GetOptions::default())
        }
        RangeReq::Part(a, b) => {
            h.insert(header::CONTENT_LENGTH, hv(&(b - a + 1).to_string()));
            h.insert(header::CONTENT_RANGE, hv(&format!("bytes {a}-{b}/{size}")));
            (
                StatusCode::PARTIAL_CONTENT,
                GetOptions {
                    range: Some(GetRange::Bounded(a..b + 1)),
                    ..Default::default()
                },
            )
        }
    };
    let got = media.store.get_opts(&store_key, opts).await?;
    let stream = got
        .into_stream()
        .map(|r: object_store::Result<Bytes>| r.map_err(std::io::Error::other));
    Ok((status, h, Body::from_stream(stream)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeReq::Full);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), RangeReq::Part(0, 3));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeReq::Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-4"), 10), RangeReq::Part(6, 9));
        assert_eq!(parse_range(Some("bytes=-40"), 10), RangeReq::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), RangeReq::Part(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeReq::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeReq::Full);
        assert_eq!(parse_range(Some("bytes=4-2"), 10), RangeReq::Full);
        assert_eq!(parse_range(Some("bytes=x-2"), 10), RangeReq::Full);
    }

    #[test]
    fn signatures_bind_every_part() {
        let dir = std::env::temp_dir().join(format!("natter-media-unit-{}", std::process::id()));
        let m = Media::open(&MediaConfig {
            dir: dir.clone(),
            store: None,
            secret: Some("s3cret".into()),
            max_upload_bytes: 10,
        })
        .unwrap();
        let sig = m.sign("c", "o", false, 100);
        assert!(m.verify("c", "o", false, 100, &sig));
        assert!(!m.verify("c", "o", true, 100, &sig));
        assert!(!m.verify("c", "o", false, 101, &sig));
        assert!(!m.verify("d", "o", false, 100, &sig));
        assert!(!m.verify("c", "p", false, 100, &sig));
        assert!(!m.verify("c", "o", false, 100, "zz"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn names_types_and_expiry() {
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(clean_name(&"x".repeat(400)).len(), MAX_NAME_BYTES);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
        assert_eq!(sniff(b"hello"), "text/plain; charset=utf-8");
        assert_eq!(sniff(&[0xff, 0xfe, 0x00, 0x01]), "application/octet-stream");
        let day = DAY_MS;
        assert_eq!(url_expiry(day * 10 + 5), url_expiry(day * 10 + day - 1));
        assert!(url_expiry(day * 10) * 1000 >= day * 11);
        assert!(etag_matches(Some("W/\"a\", \"b\""), "\"b\""));
        assert!(!etag_matches(Some("\"c\""), "\"b\""));
    }
}
