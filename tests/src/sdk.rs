//! Helpers for tests of the Rust SDK (`natter-client`) and the `natter` CLI
//! against real routers.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use natter_client::{Client, Config, Message};

pub const PW: &str = "correct horse battery";

/// A client whose cache is `dir/<name>.sqlite`, for these routers.
pub fn open(dir: &Path, name: &str, routers: &[&str]) -> Result<Client> {
    let mut cfg = Config::new(
        routers.iter().map(|r| r.to_string()).collect(),
        dir.join(format!("{name}.sqlite")),
    );
    cfg.device = format!("test {name}");
    cfg.max_backoff = Duration::from_millis(500);
    Ok(Client::open(cfg)?)
}

/// Registers and logs in: the user id.
pub async fn account(c: &Client, name: &str) -> Result<String> {
    let id = c.register(name, PW).await?;
    c.login(name, PW).await?;
    Ok(id)
}

/// Makes two SDK users friends.
pub async fn befriend(a: &Client, b: &Client, b_id: &str, a_id: &str) -> Result<()> {
    a.friend_request(b_id).await?;
    let f = b.friend_accept(a_id).await?;
    if f.relation != "friend" {
        bail!("not friends: {}", f.relation);
    }
    Ok(())
}

/// Polls the client's cache until `done` holds on the conversation's
/// cached messages (the SDK applies pushes in the background).
pub async fn until_cached(
    c: &Client,
    conv: &str,
    timeout: Duration,
    done: impl Fn(&[Message]) -> bool,
) -> Result<Vec<Message>> {
    let deadline = Instant::now() + timeout;
    loop {
        let msgs = c.messages(conv, 100_000)?;
        if done(&msgs) {
            return Ok(msgs);
        }
        if Instant::now() > deadline {
            bail!(
                "cache of {conv} not there in {timeout:?}: {} messages, last seq {:?}",
                msgs.len(),
                msgs.last().map(|m| m.seq)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks one member's view: every expected (sender, client_msg_id) once,
/// each sender's messages in the order sent, seqs strictly ascending.
pub fn check_view(msgs: &[Message], sent: &HashMap<String, Vec<String>>) -> Result<()> {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for w in msgs.windows(2) {
        if w[0].seq >= w[1].seq {
            bail!("seqs not ascending: {} then {}", w[0].seq, w[1].seq);
        }
    }
    for m in msgs {
        *seen
            .entry((m.sender_id.clone(), m.client_msg_id.clone()))
            .or_default() += 1;
    }
    for (sender, ids) in sent {
        let order: Vec<&str> = msgs
            .iter()
            .filter(|m| &m.sender_id == sender)
            .map(|m| m.client_msg_id.as_str())
            .collect();
        let want: Vec<&str> = ids.iter().map(String::as_str).collect();
        if order != want {
            bail!(
                "sender {sender}: {} messages in the view, {} sent, or out of order",
                order.len(),
                want.len()
            );
        }
    }
    if let Some(((s, id), n)) = seen.iter().find(|(_, n)| **n > 1) {
        bail!("{s}/{id} present {n} times");
    }
    Ok(())
}
