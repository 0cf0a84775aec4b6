//! `natter-demo <router addr>`: fills a fresh local cluster with sample
//! users, friendships, a direct chat and a group with a few messages, and
//! prints their logins (used by `./natter-dev up --demo`). Idempotent: an
//! existing demo user is logged in rather than registered again, and sends
//! carry fixed `client_msg_id`s.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use natter_tests::router::{http, Client};
use serde_json::{json, Value};

const PASSWORD: &str = "natter-demo";
const USERS: &[&str] = &["alice", "bob", "carol"];

/// A JSON POST, asked again while the router answers 429, 503 or 504 (see
/// [`call`]); answers the final status and body.
async fn post(addr: &str, path: &str, body: Value) -> Result<(u16, Value)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (s, v) = http(addr, "POST", path, None, Some(&body)).await?;
        if !matches!(s, 429 | 503 | 504) || Instant::now() > deadline {
            return Ok((s, v));
        }
        eprintln!("natter-demo: {path} answered {s}, asking again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn ensure_user(addr: &str, name: &str) -> Result<String> {
    let (s, v) = post(
        addr,
        "/v1/register",
        json!({"username": name, "password": PASSWORD}),
    )
    .await?;
    if !matches!(s, 201 | 409) {
        bail!("registering {name}: {s} {v}");
    }
    let login = json!({"username": name, "password": PASSWORD, "device": "demo setup"});
    let (s, v) = post(addr, "/v1/login", login).await?;
    if s != 200 {
        bail!("logging in {name}: {s} {v}");
    }
    str_of(&v, &["token"])
}

/// One request, asked again while the cluster answers `timeout` or
/// `unavailable` (a fresh cluster may still be settling its leaders) or
/// `rate_limited`. Every step of the demo is idempotent, so a retry of a
/// request that did go through is harmless.
async fn call(c: &mut Client, op: &str, params: Value) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pause = Duration::from_millis(200);
    loop {
        let r = c.request(op, params.clone()).await?;
        if let Some(ok) = r.get("ok") {
            return Ok(ok.clone());
        }
        let code = r["error"]["code"].as_str().unwrap_or_default();
        let transient = matches!(code, "timeout" | "unavailable" | "rate_limited");
        if !transient || Instant::now() > deadline {
            bail!("{op} failed: {r}");
        }
        eprintln!("natter-demo: {op} answered {code}, asking again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

fn str_of(v: &serde_json::Value, path: &[&str]) -> Result<String> {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_str()
        .map(str::to_string)
        .with_context(|| format!("no {path:?} in {v}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let addr = std::env::args()
        .nth(1)
        .context("usage: natter-demo <router host:port>")?;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for u in USERS {
        let token = ensure_user(&addr, u).await?;
        let mut c = Client::connect(&addr, &token).await?;
        let me = call(&mut c, "me", json!({})).await?;
        ids.push(str_of(&me, &["user", "user_id"])?);
        clients.push(c);
    }
    // alice befriends bob and carol.
    for i in 1..USERS.len() {
        call(
            &mut clients[0],
            "friend_request",
            json!({"user_id": ids[i]}),
        )
        .await?;
        call(&mut clients[i], "friend_accept", json!({"user_id": ids[0]})).await?;
    }
    call(
        &mut clients[1],
        "friend_request",
        json!({"user_id": ids[2]}),
    )
    .await?;
    call(&mut clients[2], "friend_accept", json!({"user_id": ids[1]})).await?;
    let direct = call(&mut clients[0], "create_direct", json!({"user_id": ids[1]})).await?;
    let direct = str_of(&direct, &["conversation", "id"])?;
    // A fixed group id makes a second run reuse the group.
    let group_id = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f";
    let group = call(
        &mut clients[0],
        "create_group",
        json!({"conversation_id": group_id, "name": "Weekend trip",
                   "member_ids": [ids[1], ids[2]]}),
    )
    .await;
    if let Err(e) = &group {
        // Already made by an earlier run.
        if !e.to_string().contains("already_exists") {
            call(
                &mut clients[0],
                "get_conversation",
                json!({"conversation_id": group_id}),
            )
            .await
            .with_context(|| format!("creating the demo group: {e}"))?;
        }
    }
    let script: &[(usize, &str, &str)] = &[
        (0, &direct, "Hi Bob! Welcome to Natter 👋"),
        (1, &direct, "Hey Alice, this looks great."),
        (0, &direct, "Try sending a photo with the 📎 button."),
        (0, group_id, "Who's in for the lake on Saturday?"),
        (2, group_id, "Me! I'll bring snacks."),
        (1, group_id, "Count me in 🚣"),
    ];
    for (n, (who, conv, text)) in script.iter().enumerate() {
        call(
            &mut clients[*who],
            "send",
            json!({"conversation_id": conv, "client_msg_id": format!("demo-{n}"), "text": text}),
        )
        .await?;
    }
    println!("Demo users (password \"{PASSWORD}\"): {}", USERS.join(", "));
    Ok(())
}
