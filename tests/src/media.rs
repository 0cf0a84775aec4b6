//! Media test helpers: raw HTTP/1.1 with byte bodies and headers (the
//! router's `http` helper speaks JSON only), and test images.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP answer: status, headers (lowercased names), body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `error.code` of a JSON error answer.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// How the request body is sent.
pub enum Body<'a> {
    None,
    /// With `Content-Length`.
    Bytes(&'a [u8]),
    /// Only the `Content-Length` header (the bytes are never sent): for
    /// answers given before the body is read.
    DeclaredOnly(u64),
    /// `Transfer-Encoding: chunked`, in chunks of this many bytes.
    Chunked(&'a [u8], usize),
}

/// One request on a fresh connection (`Connection: close`).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Result<Answer> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        match &body {
            Body::None => head.push_str("Content-Length: 0\r\n"),
            Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
            Body::DeclaredOnly(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
            Body::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        let (mut rd, mut wr) = s.into_split();
        // Write the body while reading, so an early answer (413) is read
        // even if the router stops reading the body.
        let writer = async move {
            let r: std::io::Result<()> = async {
                match body {
                    Body::Bytes(b) => wr.write_all(b).await?,
                    Body::Chunked(b, n) => {
                        for c in b.chunks(n.max(1)) {
                            wr.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                                .await?;
                            wr.write_all(c).await?;
                            wr.write_all(b"\r\n").await?;
                        }
                        wr.write_all(b"0\r\n\r\n").await?;
                    }
                    Body::None | Body::DeclaredOnly(_) => {}
                }
                Ok(())
            }
            .await;
            // The router may answer and close before reading everything.
            let _ = r;
            wr
        };
        let reader = async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if !buf.is_empty() => {
                        let _ = e; // reset after the answer: keep what came
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(buf)
        };
        let (_wr, buf) = tokio::join!(writer, reader);
        anyhow::Ok(buf?)
    };
    let buf = tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .map_err(|_| anyhow!("{method} {path}: no answer in 60 s"))??;
    parse(&buf).with_context(|| format!("{method} {path}"))
}

fn parse(buf: &[u8]) -> Result<Answer> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no header end in {} bytes", buf.len()))?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line in {head:?}"))?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw = &buf[end + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        dechunk(raw)?
    } else {
        raw.to_vec()
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = raw.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunked body");
        };
        let size_line = String::from_utf8_lossy(&raw[..nl]);
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)?;
        raw = &raw[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A `width`×`height` RGB PNG with a gradient (a real, decodable image).
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap_or_default();
    out.into_inner()
}

/// The lowercase hex SHA-256 of `b`.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A download URL signed with `secret` (what a router with the same
/// `--media-secret` hands out), for testing expiry.
pub fn sign_url(secret: &str, conv: &str, object: &str, thumb: bool, exp: u64) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!());
    let variant = if thumb { "t" } else { "o" };
    mac.update(format!("natter-media-v1\n{conv}\n{object}\n{variant}\n{exp}").as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    let t = if thumb { "thumb=1&" } else { "" };
    format!("/v1/media/{conv}/{object}?{t}exp={exp}&sig={sig}")
}
