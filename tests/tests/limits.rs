//! Abuse limits and metrics on real processes (3 nodes, routers).
//!
//! * Limits: with a test configuration that lowers them, a flood of sends
//!   answers `rate_limited` with a retry-after and the connection keeps
//!   working; password guessing locks the username out (HTTP 429,
//!   `Retry-After`), even for the right password, while other users log
//!   in; connection attempts are limited per user. With the defaults, a
//!   busy but normal session never meets a limit.
//! * Metrics: `/metrics` is Prometheus text whose counters move with real
//!   traffic (frames in by op and result, pushes and delivery latency,
//!   cluster requests, auth failures, rate-limited requests, connections).
//! * Bad HTTP bodies: malformed JSON, unknown fields and oversized bodies
//!   get clear errors.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use natter_tests::router::{
    direct_with, friends, http, login, sync_until, ws_connect, Auth, Client, RouterProc, Synced, T,
};
use natter_tests::{Cluster, ClusterOpts};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PW: &str = "correct horse battery";

async fn router(c: &Cluster, name: &str, extra: &[&str]) -> RouterProc {
    RouterProc::start(c.dir.path(), name, &c.addrs(), extra)
        .await
        .expect("router starts")
}

/// One raw HTTP/1.1 request; answers (status, lowercased headers, body).
async fn raw_http(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, BTreeMap<String, String>, String)> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        // A server refusing an oversized body may answer and close before
        // reading all of it: keep what was answered even if the rest of
        // the write or the read then fails (connection reset).
        let _ = s.write_all(body).await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(T, io)
        .await
        .map_err(|_| anyhow!("no answer"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

fn send(conv: &str, cmid: &str, text: &str) -> Value {
    json!({"conversation_id": conv, "client_msg_id": cmid, "text": text})
}

/// Two friends on `r` with a direct conversation, both resumed.
async fn pair(r: &RouterProc, a: &str, b: &str) -> (Client, Client, String, String, String) {
    let (mut ca, cb, _, idb, ta, tb) = friends(&r.addr, &r.addr, a, b, PW).await.unwrap();
    let conv = direct_with(&mut ca, &idb).await.unwrap();
    (ca, cb, conv, ta, tb)
}

#[tokio::test]
async fn limits_answer_rate_limited_with_a_retry_after_and_normal_use_never_meets_them() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let tight = router(
        &c,
        "router-tight",
        &[
            "--rate-limit",
            "send_device=1/h:5",
            "--rate-limit",
            "send_user=1/h:8",
            "--rate-limit",
            "connect_user=1/h:6",
            "--login-lockout-after",
            "3",
            "--login-lockout-base-ms",
            "60000",
        ],
    )
    .await;
    let (mut a, mut b, conv, ta, _tb) = pair(&tight, "alice", "bob").await;

    // Sends: five from this device, then rate_limited with the wait; the
    // connection stays usable and nothing was sent twice or lost.
    for i in 0..5 {
        a.call("send", send(&conv, &format!("m{i}"), &format!("hi {i}")))
            .await
            .unwrap();
    }
    let r = a
        .request("send", send(&conv, "m5", "one too many"))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    let wait = r["error"]["retry_after_ms"].as_u64().unwrap_or(0);
    assert!(
        wait > 60_000,
        "retry_after_ms {wait}: one send per hour refills"
    );
    a.call("ping", json!({})).await.unwrap();
    a.call("get_conversation", json!({"conversation_id": conv}))
        .await
        .unwrap();
    // Another device of Alice has its own device bucket, but shares the
    // user's (8): three more, then limited.
    let ta2 = login(&tight.addr, "alice", PW, "phone").await.unwrap();
    let mut a2 = Client::connect(&tight.addr, &ta2).await.unwrap();
    for i in 0..3 {
        a2.call("send", send(&conv, &format!("p{i}"), &format!("phone {i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        a2.call_err("send", send(&conv, "p3", "no")).await.unwrap(),
        "rate_limited"
    );
    // Bob, another user, is not affected.
    b.call("send", send(&conv, "b0", "bob here")).await.unwrap();
    let mut sb = Synced::default();
    sync_until(&mut b, &mut sb, T, |s| s.texts(&conv).len() == 9)
        .await
        .unwrap();

    // Password guessing: three wrong passwords, then 429 with Retry-After
    // and retry_after_ms — even the right password is refused now.
    let guess = |pw: &str| json!({"username": "bob", "password": pw}).to_string();
    for i in 0..3 {
        let (s, _, body) = raw_http(
            &tight.addr,
            "POST",
            "/v1/login",
            guess(&format!("guess {i}!")).as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(s, 401, "{body}");
    }
    let (s, headers, body) = raw_http(&tight.addr, "POST", "/v1/login", guess(PW).as_bytes())
        .await
        .unwrap();
    assert_eq!(s, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    let ms = v["error"]["retry_after_ms"].as_u64().unwrap_or(0);
    assert!((1..=60_000).contains(&ms), "{v}");
    let secs: u64 = headers
        .get("retry-after")
        .and_then(|s| s.parse().ok())
        .expect("Retry-After header");
    assert_eq!(secs, ms.div_ceil(1000));
    // The lockout is per username: Alice still logs in.
    login(&tight.addr, "alice", PW, "tablet").await.unwrap();

    // Connection attempts per user: Alice used 2 of 6; 4 more, then 429.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            ws_connect(&tight.addr, Auth::Header(&ta), None)
                .await
                .unwrap()
                .expect("upgraded"),
        );
    }
    let refused = ws_connect(&tight.addr, Auth::Header(&ta), None)
        .await
        .unwrap();
    assert_eq!(refused.err(), Some(429));

    // Defaults: a busy, normal session — sign-ups, logins with a typo,
    // reconnects, 200 messages as fast as the client can send — never
    // meets a limit.
    let relaxed = router(&c, "router-default", &[]).await;
    let (mut a, mut b, conv, ta, _) = pair(&relaxed, "carol", "dave").await;
    let (s, _) = http(
        &relaxed.addr,
        "POST",
        "/v1/login",
        None,
        Some(&json!({"username": "carol", "password": "typo typo typo"})),
    )
    .await
    .unwrap();
    assert_eq!(s, 401);
    login(&relaxed.addr, "carol", PW, "second").await.unwrap();
    for i in 0..10 {
        let mut again = Client::connect(&relaxed.addr, &ta).await.unwrap();
        again.call("ping", json!({})).await.unwrap();
        if i % 3 == 0 {
            again.call("resume", json!({})).await.unwrap();
        }
    }
    let frames: Vec<Value> = (0..200)
        .map(|i| send(&conv, &format!("c{i}"), &format!("msg {i}")))
        .collect();
    // Dave's device learns this new direct conversation from the feed row
    // its first message brings (5 to 50 ms later: the fan-out's gather and
    // spacing); a device that learns a conversation late gets its newest
    // page pushed and pages older history itself. Counting every message by
    // push needs the device to hold the conversation before the burst.
    let (first, rest) = frames.split_at(1);
    for r in a.burst("send", first.to_vec()).await.unwrap() {
        assert!(r.get("ok").is_some(), "{r}");
    }
    let mut sb = Synced::default();
    sync_until(&mut b, &mut sb, T, |s| s.texts(&conv).len() == 1)
        .await
        .unwrap();
    for chunk in rest.chunks(50) {
        for r in a.burst("send", chunk.to_vec()).await.unwrap() {
            assert!(r.get("ok").is_some(), "{r}");
        }
    }
    sync_until(&mut b, &mut sb, T, |s| s.texts(&conv).len() == 200)
        .await
        .unwrap();
    let m = relaxed_metrics(&relaxed.addr).await;
    assert_eq!(sum(&m, "natter_router_rate_limited_total", &[]), 0.0);
}

async fn relaxed_metrics(addr: &str) -> Vec<(String, f64)> {
    let (s, headers, body) = raw_http(addr, "GET", "/metrics", b"").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{headers:?}"
    );
    parse_metrics(&body)
}

/// Prometheus text format: (series with labels, value), comments skipped.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of a metric's series whose labels include every `labels` pair.
fn sum(m: &[(String, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn metrics_move_with_real_traffic_and_bad_http_bodies_get_clear_errors() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r = router(&c, "router1", &["--rate-limit", "send_device=1/h:20"]).await;
    let before = relaxed_metrics(&r.addr).await;
    let (mut a, mut b, conv, _ta, _tb) = pair(&r, "erin", "frank").await;
    let mut sb = Synced::default();
    for i in 0..10 {
        let text = format!("live {i}");
        a.call("send", send(&conv, &format!("e{i}"), &text))
            .await
            .unwrap();
        // Each one is pushed live to Frank before the next is sent.
        sync_until(&mut b, &mut sb, T, |s| s.texts(&conv).contains(&text))
            .await
            .unwrap();
    }
    a.send_raw(tokio_tungstenite::tungstenite::Message::Text(
        "{nope".into(),
    ))
    .await
    .unwrap();
    let (s, _) = http(
        &r.addr,
        "POST",
        "/v1/login",
        None,
        Some(&json!({"username": "erin", "password": "wrong password"})),
    )
    .await
    .unwrap();
    assert_eq!(s, 401);
    assert_eq!(
        ws_connect(&r.addr, Auth::Header("forged"), None)
            .await
            .unwrap()
            .err(),
        Some(401)
    );
    let mut limited = 0;
    for i in 0..20 {
        let r = a
            .request("send", send(&conv, &format!("x{i}"), "flood"))
            .await
            .unwrap();
        if r["error"]["code"] == "rate_limited" {
            limited += 1;
        }
    }
    // 10 live sends + 10 of the flood fill the device's 20.
    assert_eq!(limited, 10);
    let after = relaxed_metrics(&r.addr).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };

    assert_eq!(
        delta(
            "natter_router_frames_in_total",
            &[("op", "send"), ("result", "ok")]
        ),
        20.0
    );
    assert_eq!(
        delta(
            "natter_router_frames_in_total",
            &[("op", "send"), ("result", "rate_limited")]
        ),
        limited as f64
    );
    assert_eq!(
        delta(
            "natter_router_frames_in_total",
            &[("op", "invalid"), ("result", "bad_frame")]
        ),
        1.0
    );
    assert!(
        delta(
            "natter_router_frames_in_total",
            &[("op", "resume"), ("result", "ok")]
        ) >= 2.0
    );
    assert_eq!(
        delta(
            "natter_router_rate_limited_total",
            &[("limit", "send_device")]
        ),
        limited as f64
    );
    assert_eq!(
        delta("natter_router_auth_failures_total", &[("kind", "login")]),
        1.0
    );
    assert_eq!(
        delta("natter_router_auth_failures_total", &[("kind", "token")]),
        1.0
    );
    assert_eq!(sum(&after, "natter_router_connections", &[]), 2.0);
    // Frank's device got each of the ten live, with a latency observed.
    assert!(delta("natter_router_messages_out_total", &[]) >= 10.0);
    assert!(
        delta(
            "natter_router_delivery_latency_seconds_count",
            &[("kind", "conversation")]
        ) >= 10.0
    );
    assert!(
        delta(
            "natter_router_push_events_total",
            &[("event", "conversation")]
        ) >= 10.0
    );
    assert!(
        delta(
            "natter_router_frames_out_total",
            &[("kind", "conversation")]
        ) >= 10.0
    );
    assert!(delta("natter_router_frames_out_total", &[("kind", "reply")]) >= 20.0);
    assert!(
        delta(
            "natter_router_cluster_request_seconds_count",
            &[("op", "send_message"), ("result", "ok")]
        ) >= 20.0
    );
    // Each push was either read back from the cluster or built from the
    // send its change event carried.
    assert!(
        delta(
            "natter_router_cluster_request_seconds_count",
            &[("op", "sync_conversation")]
        ) + delta("natter_router_pushes_from_events_total", &[])
            >= 10.0
    );
    assert!(
        delta(
            "natter_router_http_requests_total",
            &[("endpoint", "login"), ("status", "401")]
        ) >= 1.0
    );

    // Bad HTTP bodies on the account endpoints: clear errors, nothing made.
    for (body, status, code) in [
        (b"{not json".to_vec(), 400, "invalid_argument"),
        (br#"{"username":"x"}"#.to_vec(), 400, "invalid_argument"),
        (
            br#"{"username":"zed","password":"long enough","admin":true}"#.to_vec(),
            400,
            "invalid_argument",
        ),
        (b"\xff\xfe".to_vec(), 400, "invalid_argument"),
        (
            format!(
                r#"{{"username":"zed","password":"{}"}}"#,
                "x".repeat(20_000)
            )
            .into_bytes(),
            413,
            "too_large",
        ),
    ] {
        for path in ["/v1/register", "/v1/login"] {
            let (s, _, text) = raw_http(&r.addr, "POST", path, &body).await.unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (status, Some(code)),
                "{path}: {text}"
            );
        }
    }
    let (s, _) = http(
        &r.addr,
        "POST",
        "/v1/login",
        None,
        Some(&json!({"username": "zed", "password": "long enough"})),
    )
    .await
    .unwrap();
    assert_eq!(s, 401, "no account was created by a bad body");
}
