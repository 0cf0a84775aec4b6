//! `natter-demo <router addr>`: fills a fresh local cluster with sample
//! users, friendships, a direct chat and a group with a few messages, and
//! prints their logins (used by `./natter-dev up --demo`). Idempotent: an
//! existing demo user is logged in rather than registered again, and sends
//! carry fixed `client_msg_id`s.

use anyhow::{bail, Context, Result};
use natter_tests::router::{http, login, Client};
use serde_json::json;

const PASSWORD: &str = "natter-demo";
const USERS: &[&str] = &["alice", "bob", "carol"];

async fn ensure_user(addr: &str, name: &str) -> Result<()> {
    let (s, v) = http(
        addr,
        "POST",
        "/v1/register",
        None,
        Some(&json!({"username": name, "password": PASSWORD})),
    )
    .await?;
    match s {
        201 | 409 => Ok(()),
        _ => bail!("registering {name}: {s} {v}"),
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
        ensure_user(&addr, u).await?;
        let token = login(&addr, u, PASSWORD, "demo setup").await?;
        let mut c = Client::connect(&addr, &token).await?;
        let me = c.call("me", json!({})).await?;
        ids.push(str_of(&me, &["user", "user_id"])?);
        clients.push(c);
    }
    // alice befriends bob and carol.
    for i in 1..USERS.len() {
        clients[0]
            .call("friend_request", json!({"user_id": ids[i]}))
            .await?;
        clients[i]
            .call("friend_accept", json!({"user_id": ids[0]}))
            .await?;
    }
    clients[1]
        .call("friend_request", json!({"user_id": ids[2]}))
        .await?;
    clients[2]
        .call("friend_accept", json!({"user_id": ids[1]}))
        .await?;
    let direct = clients[0]
        .call("create_direct", json!({"user_id": ids[1]}))
        .await?;
    let direct = str_of(&direct, &["conversation", "id"])?;
    // A fixed group id makes a second run reuse the group.
    let group_id = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f";
    let group = clients[0]
        .call(
            "create_group",
            json!({"conversation_id": group_id, "name": "Weekend trip",
                   "member_ids": [ids[1], ids[2]]}),
        )
        .await;
    if let Err(e) = &group {
        // Already made by an earlier run.
        if !e.to_string().contains("already_exists") {
            clients[0]
                .call("get_conversation", json!({"conversation_id": group_id}))
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
        clients[*who]
            .call(
                "send",
                json!({"conversation_id": conv, "client_msg_id": format!("demo-{n}"), "text": text}),
            )
            .await?;
    }
    println!("Demo users (password \"{PASSWORD}\"): {}", USERS.join(", "));
    Ok(())
}
