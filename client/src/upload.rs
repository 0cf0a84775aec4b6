//! Media upload over the router's HTTP endpoint
//! (`POST /v1/media?conversation_id=<id>&name=<file>`, raw bytes, bearer
//! token), streamed from the file with a progress callback. The answer's
//! metadata goes into a message with [`crate::Client::send`].

use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt;

use crate::{Error, Media};

/// Chunk read from the file per body frame.
const CHUNK: usize = 64 * 1024;
/// Largest answer read from the endpoint.
const MAX_ANSWER: usize = 64 * 1024;

fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Uploads `path` for `conversation_id` to the router at `router`
/// (`host:port`), calling `progress(sent, total)` as bytes go out.
/// `Error::Api { code: "not_available" }` when the router has no media
/// endpoint (404).
pub async fn upload_file(
    router: &str,
    token: &str,
    conversation_id: &str,
    path: &Path,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<Media, Error> {
    let file = tokio::fs::File::open(path).await?;
    let total = file.metadata().await?.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "file".into());
    let chunks = Box::pin(futures::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(f)))
            }
            // The error ends the body (and so the request).
            Err(e) => Some((Err(e), None)),
        }
    }));
    let progress = std::sync::Arc::new(progress);
    let mut sent = 0u64;
    let body = StreamBody::new(chunks.map(move |c: std::io::Result<Vec<u8>>| {
        c.map(|b| {
            sent += b.len() as u64;
            progress(sent, total);
            Frame::data(Bytes::from(b))
        })
    }));
    let uri = format!(
        "http://{router}/v1/media?conversation_id={}&name={}",
        query_escape(conversation_id),
        query_escape(&name)
    );
    let req = hyper::Request::post(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/octet-stream")
        .header("content-length", total)
        .body(body)
        .map_err(|e| Error::Invalid(format!("bad upload request: {e}")))?;
    let client = HttpClient::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(req)
        .await
        .map_err(|e| Error::Unreachable(format!("{router}: {e}")))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| Error::Unreachable(format!("{router}: reading the answer: {e}")))?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if status.as_u16() == 404 && v["error"]["code"].as_str() != Some("not_found") {
        return Err(Error::Api {
            code: "not_available".into(),
            message: "media upload is not available on this router".into(),
        });
    }
    if !status.is_success() {
        return Err(Error::Api {
            code: v["error"]["code"].as_str().unwrap_or("internal").into(),
            message: v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}")),
        });
    }
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or_default();
    let object_id = s("object_id");
    if object_id.is_empty() {
        return Err(Error::Invalid(
            "the media endpoint answered no object_id".into(),
        ));
    }
    Ok(Media {
        object_id,
        sha256: s("sha256"),
        content_type: s("content_type"),
        size: n("size"),
        name,
        width: u32::try_from(n("width")).unwrap_or(0),
        height: u32::try_from(n("height")).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_escaped() {
        assert_eq!(super::query_escape("a b&c/ü.png"), "a%20b%26c%2F%C3%BC.png");
    }
}
