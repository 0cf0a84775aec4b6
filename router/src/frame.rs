//! Pure parsers of everything a client sends, with no I/O, so the fuzz
//! targets (`fuzz/`) reach exactly the code the router runs:
//!
//! * [`parse_frame`] — one WebSocket text frame: size, JSON, `id`, `v`,
//!   `op`, the op's parameters ([`crate::ops::Request`]) and the router-side
//!   parameter rules ([`validate`]);
//! * [`parse_credentials`] — the JSON body of `/v1/register` and `/v1/login`;
//! * [`bearer_token`], [`query_token`] — the session token of a request
//!   (`Authorization: Bearer …` or `?token=…`); [`crate::auth::token_hash`]
//!   then checks its shape.

use std::collections::HashMap;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::ops::{self, Request, OPS};
use crate::push::MAX_TRACKED;

/// Longest request id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// A frame answered with an error (counted against the connection).
#[derive(Debug)]
pub struct BadFrame {
    /// The request id when it was readable, else `null`.
    pub id: Value,
    /// The op when it was known (for metrics).
    pub op: Option<&'static str>,
    pub code: &'static str,
    pub message: String,
}

pub fn bad(id: &Value, code: &'static str, message: impl Into<String>) -> BadFrame {
    BadFrame {
        id: id.clone(),
        op: None,
        code,
        message: message.into(),
    }
}

/// A well-formed request frame.
#[derive(Debug)]
pub struct Parsed {
    pub id: Value,
    pub op: &'static str,
    pub req: Request,
}

/// Parses and validates one text frame of protocol v1 (docs/protocol.md,
/// "Bad frames"): frames above `max_frame_bytes` are `too_large`.
pub fn parse_frame(text: &str, max_frame_bytes: usize) -> Result<Parsed, BadFrame> {
    let null = Value::Null;
    if text.len() > max_frame_bytes {
        return Err(bad(
            &null,
            "too_large",
            format!(
                "frame of {} bytes is above the {max_frame_bytes}-byte limit",
                text.len()
            ),
        ));
    }
    let mut map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad(&null, "bad_frame", "a frame must be a JSON object")),
        Err(e) => return Err(bad(&null, "bad_frame", format!("malformed JSON: {e}"))),
    };
    let id = match map.remove("id") {
        Some(Value::String(s)) if s.len() <= MAX_ID_BYTES => Value::String(s),
        Some(Value::Number(n)) => Value::Number(n),
        _ => {
            return Err(bad(
                &null,
                "bad_frame",
                format!("\"id\" must be a number or a string of at most {MAX_ID_BYTES} bytes"),
            ))
        }
    };
    match map.remove("v") {
        Some(v) if v == json!(1) => {}
        Some(_) => {
            return Err(bad(
                &id,
                "unsupported_version",
                "this router speaks protocol version 1",
            ))
        }
        None => return Err(bad(&id, "bad_frame", "\"v\" is required")),
    }
    let op_name = match map.get("op") {
        Some(Value::String(op)) => op.as_str(),
        _ => return Err(bad(&id, "bad_frame", "\"op\" must be a string")),
    };
    let Some(op) = OPS.iter().copied().find(|o| *o == op_name) else {
        return Err(bad(
            &id,
            "unknown_op",
            format!(
                "unknown op {:?}",
                op_name.chars().take(64).collect::<String>()
            ),
        ));
    };
    let with_op = |mut b: BadFrame| {
        b.op = Some(op);
        b
    };
    let req: Request = serde_json::from_value(Value::Object(map))
        .map_err(|e| with_op(bad(&id, "invalid_argument", format!("{op}: {e}"))))?;
    validate(&req).map_err(|e| with_op(bad(&id, e.code(), format!("{op}: {e}"))))?;
    Ok(Parsed { id, op, req })
}

/// The parameter rules the router itself enforces before a request reaches
/// the cluster (the model checks the rest: ids, sizes, membership).
pub fn validate(req: &Request) -> Result<(), ApiError> {
    match req {
        Request::Resume { conversations, .. } if conversations.len() > MAX_TRACKED => Err(
            ApiError::invalid(format!("at most {MAX_TRACKED} conversations")),
        ),
        Request::Send { client_msg_id, .. } if client_msg_id.is_empty() => Err(ApiError::invalid(
            "client_msg_id is required (the idempotency key of a send)",
        )),
        Request::UpdateConversation { set_roles, .. } => {
            for r in set_roles {
                ops::parse_role(&r.role)?;
            }
            Ok(())
        }
        Request::SyncConversation { limit, .. } | Request::History { limit, .. } => {
            ops::message_page(*limit).map(|_| ())
        }
        Request::GetFeed {
            cursor: Some(c), ..
        } => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(c)
            .map(|_| ())
            .map_err(|_| ApiError::invalid("cursor is not one the router gave")),
        Request::UpdateSettings {
            privacy,
            notifications,
        } => {
            if let Some(p) = privacy {
                ops::parse_privacy(p)?;
            }
            if let Some(n) = notifications {
                ops::parse_notifications(n)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Bytes of a parser's message quoted in an error.
const MAX_ERROR_DETAIL: usize = 200;

/// The body of `/v1/register` and `/v1/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    #[serde(default)]
    pub device: String,
}

/// Parses a register/login body (strict JSON, no unknown fields).
pub fn parse_credentials(body: &[u8]) -> Result<Credentials, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        // The message may quote the client's text: cut it at a character.
        let m = e.to_string();
        ApiError::invalid(format!(
            "bad request body: {}",
            crate::error::clip(&m, MAX_ERROR_DETAIL)
        ))
    })
}

/// The token of an `Authorization` header value: `Bearer <token>` (scheme
/// case-insensitive).
pub fn bearer_token(header: &[u8]) -> Result<String, ApiError> {
    let v = std::str::from_utf8(header)
        .ok()
        .filter(|v| v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
        .ok_or_else(|| ApiError::Unauthenticated("malformed Authorization header".into()))?;
    match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Ok(t.trim().to_string()),
        _ => Err(ApiError::Unauthenticated(
            "Authorization must be \"Bearer <token>\"".into(),
        )),
    }
}

/// The `token` parameter of a URL query string, decoded as axum's `Query`
/// does (`application/x-www-form-urlencoded`); None when absent or the
/// query is malformed.
pub fn query_token(query: &str) -> Option<String> {
    serde_urlencoded::from_str::<HashMap<String, String>>(query)
        .ok()?
        .remove("token")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `http_body` fuzz target: a parser message quoting
    /// multi-byte text was cut inside a character (a panic).
    #[test]
    fn a_bad_body_quoting_multibyte_text_is_refused_not_a_panic() {
        for pad in 0..4 {
            let body = format!(r#"{{"{}{}": 1}}"#, "x".repeat(pad), "é".repeat(150));
            let e = parse_credentials(body.as_bytes()).unwrap_err();
            assert_eq!(e.code(), "invalid_argument");
            assert!(e.to_string().len() < 300, "{e}");
        }
        let crash = include_bytes!("../../fuzz/regressions/http_body-7e77f5bd.bin");
        assert!(parse_credentials(crash).is_err());
    }

    fn code(text: &str) -> &'static str {
        match parse_frame(text, 1024) {
            Ok(_) => "ok",
            Err(b) => b.code,
        }
    }

    #[test]
    fn frames_parse_or_get_the_documented_error() {
        let ok = parse_frame(r#"{"v":1,"id":"a","op":"ping"}"#, 1024).unwrap();
        assert_eq!((ok.op, ok.id), ("ping", json!("a")));
        assert_eq!(
            code(r#"{"v":1,"id":1,"op":"ping","x":1}"#),
            "invalid_argument"
        );
        assert_eq!(code("{not json"), "bad_frame");
        assert_eq!(code("[1]"), "bad_frame");
        assert_eq!(code(r#"{"v":1,"op":"ping"}"#), "bad_frame");
        assert_eq!(code(r#"{"v":2,"id":1,"op":"ping"}"#), "unsupported_version");
        assert_eq!(code(r#"{"v":1,"id":1,"op":"nope"}"#), "unknown_op");
        assert_eq!(code(r#"{"v":1,"id":1,"op":7}"#), "bad_frame");
        assert_eq!(
            code(&format!(
                r#"{{"v":1,"id":"{}","op":"ping"}}"#,
                "x".repeat(65)
            )),
            "bad_frame"
        );
        assert_eq!(code(&" ".repeat(1025)), "too_large");
        // Router-side parameter rules.
        assert_eq!(
            code(r#"{"v":1,"id":1,"op":"send","conversation_id":"c","client_msg_id":""}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"v":1,"id":1,"op":"history","conversation_id":"c","limit":101}"#),
            "limit_exceeded"
        );
        assert_eq!(
            code(r#"{"v":1,"id":1,"op":"get_feed","cursor":"!!"}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"v":1,"id":1,"op":"update_settings","privacy":"all"}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(
                r#"{"v":1,"id":1,"op":"update_conversation","conversation_id":"c","set_roles":[{"user_id":"u","role":"king"}]}"#
            ),
            "invalid_argument"
        );
        let b = parse_frame(r#"{"v":1,"id":3,"op":"mark_read"}"#, 1024).unwrap_err();
        assert_eq!(
            (b.op, b.id, b.code),
            (Some("mark_read"), json!(3), "invalid_argument")
        );
    }

    #[test]
    fn credentials_and_tokens_parse_strictly() {
        let c = parse_credentials(br#"{"username":"a","password":"b"}"#).unwrap();
        assert_eq!((c.username.as_str(), c.device.as_str()), ("a", ""));
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"username":"a"}"#,
            br#"{"username":"a","password":"b","x":1}"#,
            b"\xff",
        ] {
            assert!(parse_credentials(bad).is_err());
        }
        assert_eq!(bearer_token(b"Bearer abc").unwrap(), "abc");
        assert_eq!(bearer_token(b"bearer  abc ").unwrap(), "abc");
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer \xff",
            b"Bearer a\x01",
        ] {
            assert!(bearer_token(bad).is_err());
        }
        assert_eq!(query_token("a=1&token=x%2By").as_deref(), Some("x+y"));
        assert_eq!(query_token("token"), Some(String::new()));
        assert_eq!(query_token("a=1"), None);
    }
}
