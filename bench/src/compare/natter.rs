//! Natter in the comparison: a 3-node cluster (production defaults: fsync
//! on, group commit, default Raft timings) and two routers, users and
//! sessions, and the Natter-only figures.
//!
//! Set-up shortcut (not measured): users and sessions are created through
//! the nodes' data API (`ClaimUsername`, `CreateUser`, `CreateSession` with
//! the SHA-256 of a random token, exactly what the router stores at login),
//! so that a thousand members don't cost a thousand argon2id hashes. Every
//! measured operation goes through a router as a client's would.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use natter_model::pb::{self, command::Op, response::R};
use natter_tests::natter::Natter;
use natter_tests::router::{Client, RouterProc};
use natter_tests::{Cluster, ClusterOpts, ShardClient};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::load::percentile;
use super::sys::{dir_bytes, rss_kib};

pub struct NatterSys {
    pub cluster: Cluster,
    pub routers: Vec<RouterProc>,
    pub n: Natter,
    next_user: std::sync::atomic::AtomicU64,
}

/// A user with a session token.
#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub token: String,
}

impl NatterSys {
    pub async fn start(shards: u32) -> Result<NatterSys> {
        let cluster = Cluster::start(ClusterOpts {
            nodes: 3,
            shards,
            // Production defaults: group commit, heartbeat 500 ms,
            // elections 1.5-3 s.
            node_args: vec![],
        })
        .await?;
        let mut routers = Vec::new();
        for i in 1..=2 {
            routers.push(
                RouterProc::start(
                    cluster.dir.path(),
                    &format!("router{i}"),
                    &cluster.addrs(),
                    natter_tests::router::NO_LIMITS,
                )
                .await?,
            );
        }
        let n = Natter::new(ShardClient::new(cluster.addrs()), cluster.shards);
        Ok(NatterSys {
            cluster,
            routers,
            n,
            next_user: Default::default(),
        })
    }

    pub fn router(&self, i: usize) -> &str {
        &self.routers[i].addr
    }

    /// Nodes and routers.
    pub fn pids(&self) -> Vec<u32> {
        self.cluster
            .nodes
            .values()
            .filter_map(|n| n.pid())
            .chain(self.routers.iter().filter_map(|r| r.pid()))
            .collect()
    }

    pub fn node_pids(&self) -> Vec<u32> {
        self.cluster
            .nodes
            .values()
            .filter_map(|n| n.pid())
            .collect()
    }

    /// A new user and a session for it (see the module note).
    pub async fn user(&self) -> Result<User> {
        let k = self
            .next_user
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = self.n.create_user(&format!("bench_{k}")).await?;
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let hash: [u8; 32] = Sha256::digest(raw).into();
        match self
            .n
            .exec(Op::CreateSession(pb::CreateSession {
                token_hash: hash.to_vec(),
                user_id: id.clone(),
                device: "bench".into(),
                ttl_ms: 24 * 3600 * 1000,
            }))
            .await?
        {
            R::Session(_) => Ok(User { id, token }),
            other => bail!("create session: {other:?}"),
        }
    }

    /// `count` users, created `par` at a time.
    pub async fn users(&self, count: usize) -> Result<Vec<User>> {
        let mut out = Vec::with_capacity(count);
        let par = 32;
        let mut i = 0;
        while i < count {
            let batch = (count - i).min(par);
            let fs: Vec<_> = (0..batch).map(|_| self.user()).collect();
            for u in futures::future::join_all(fs).await {
                out.push(u?);
            }
            i += batch;
        }
        Ok(out)
    }

    /// One two-member conversation per pair of `users` (2p, 2p+1), spread
    /// evenly over the data shards.
    pub async fn pairs(&self, users: &[User]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (p, pair) in users.chunks(2).enumerate() {
            let shard = 1 + p as u32 % self.cluster.shards;
            out.push(self.group_on(shard, &pair[0], &pair[1..]).await?);
        }
        Ok(out)
    }

    /// A group of `creator` and `members` on `shard`.
    pub async fn group_on(&self, shard: u32, creator: &User, members: &[User]) -> Result<String> {
        let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        self.n.create_group_on(shard, &creator.id, &ids).await
    }
}

/// Connects `users` (round-robin over `routers`), `par` at a time.
pub async fn connect_all(routers: &[&str], users: &[User], par: usize) -> Result<Vec<Client>> {
    let mut out = Vec::with_capacity(users.len());
    for (ci, chunk) in users.chunks(par.max(1)).enumerate() {
        let fs: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let r = routers[(ci * par + i) % routers.len()].to_string();
                let t = u.token.clone();
                async move { Client::connect(&r, &t).await }
            })
            .collect();
        for c in futures::future::join_all(fs).await {
            out.push(c?);
        }
    }
    Ok(out)
}

/// Texts of the live messages in a pushed `conversation` event.
fn texts(ev: &Value) -> Vec<String> {
    ev["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["message"]["text"].as_str().map(str::to_string))
        .collect()
}

/// A receiver: resumes (so the router pushes to it), waits for the
/// conversation's first push, then reports (member, text, arrival time) of
/// every message pushed for `conv`.
fn spawn_receiver(
    mut c: Client,
    member: usize,
    conv: String,
    ready: mpsc::Sender<usize>,
    out: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if c.call("resume", json!({})).await.is_err() {
            return;
        }
        let mut said_ready = false;
        loop {
            let Ok(ev) = c.next_event(Duration::from_secs(600)).await else {
                return;
            };
            let at = Instant::now();
            if ev["event"] != "conversation" || ev["conversation_id"] != conv.as_str() {
                continue;
            }
            if !said_ready {
                said_ready = true;
                let _ = ready.send(member).await;
            }
            for t in texts(&ev) {
                if t.starts_with("probe-") && out.send((member, t, at)).is_err() {
                    return;
                }
            }
        }
    })
}

/// Delivery of `msgs` messages from `sender` (its own connection on
/// `sender_router`) to `receivers` (already connected): per message, the
/// time from the send frame to each receiver's push. Answers per-message
/// (time to the median receiver, time to the last) in µs, and all arrivals.
async fn deliver(
    sender: &mut Client,
    receivers: Vec<Client>,
    conv: &str,
    msgs: usize,
) -> Result<(Vec<u64>, Vec<u64>, Vec<Vec<u64>>)> {
    let count = receivers.len();
    let (rtx, mut rrx) = mpsc::channel(count.max(1));
    let (otx, mut orx) = mpsc::unbounded_channel();
    let tasks: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(i, c)| spawn_receiver(c, i, conv.to_string(), rtx.clone(), otx.clone()))
        .collect();
    drop(rtx);
    let mut ready = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rrx.recv()).await {
            Ok(Some(_)) => ready += 1,
            _ => bail!("only {ready} of {count} receivers got the conversation's first push"),
        }
    }
    let (mut median, mut last, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let tag = natter_tests::natter::uuid();
    let tag = &tag[..8];
    for m in 0..msgs {
        let text = format!("probe-{tag}-{m}-{}", "z".repeat(170));
        let t0 = Instant::now();
        sender
            .call(
                "send",
                json!({"conversation_id": conv, "client_msg_id": format!("probe-{tag}-{m}"), "text": text}),
            )
            .await?;
        let mut got: HashMap<usize, u64> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, orx.recv()).await {
                Ok(Some((member, t, at))) if t == text => {
                    got.entry(member)
                        .or_insert(at.saturating_duration_since(t0).as_micros() as u64);
                }
                Ok(Some(_)) => {}
                _ => bail!("message {m}: {} of {count} receivers got it", got.len()),
            }
        }
        let mut v: Vec<u64> = got.into_values().collect();
        v.sort_unstable();
        median.push(percentile(&v, 0.5));
        last.push(*v.last().unwrap_or(&0));
        all.push(v);
    }
    for t in tasks {
        t.abort();
    }
    Ok((median, last, all))
}

fn stats(mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    json!({"n": v.len(), "p50_us": percentile(&v, 0.5), "p99_us": percentile(&v, 0.99),
           "max_us": v.last().copied().unwrap_or(0)})
}

/// End-to-end delivery: send on router 1 → a recipient's live stream on
/// router 1 and on router 2.
pub async fn e2e(s: &NatterSys, msgs: usize) -> Result<Value> {
    let us = s.users(3).await?;
    let conv = s.group_on(1, &us[0], &us[1..]).await?;
    let mut sender = Client::connect(s.router(0), &us[0].token).await?;
    let mut out = serde_json::Map::new();
    for (label, router) in [("same_router", 0usize), ("across_routers", 1)] {
        let rx = Client::connect(s.router(router), &us[1 + router].token).await?;
        let (_, last, _) = deliver(&mut sender, vec![rx], &conv, msgs).await?;
        out.insert(label.into(), stats(last));
    }
    Ok(Value::Object(out))
}

/// A group of `size` members, all connected (alternately to the two
/// routers): time from the send until the last member has the push.
pub async fn group(s: &NatterSys, size: usize, msgs: usize) -> Result<Value> {
    let t = Instant::now();
    let us = s.users(size).await?;
    let conv = s.group_on(2, &us[0], &us[1..]).await?;
    let setup_users = t.elapsed().as_secs_f64();
    let mut sender = Client::connect(s.router(0), &us[0].token).await?;
    let receivers = connect_all(&[s.router(0), s.router(1)], &us[1..], 64).await?;
    let (median, last, _) = deliver(&mut sender, receivers, &conv, msgs).await?;
    Ok(
        json!({"members": size, "messages": msgs, "setup_secs": setup_users,
              "to_median_member": stats(median), "to_last_member": stats(last)}),
    )
}

/// Idle WebSocket connections on router 2 (each authenticated and resumed,
/// one session shared by all): router RSS per connection.
pub async fn idle_connections(s: &NatterSys, count: usize) -> Result<Value> {
    let u = s.user().await?;
    let pid = s.routers[1].pid().context("router 2 not running")?;
    let before = rss_kib(pid);
    let t = Instant::now();
    let mut conns = Vec::with_capacity(count);
    let par = 128;
    while conns.len() < count {
        let batch = (count - conns.len()).min(par);
        let fs: Vec<_> = (0..batch)
            .map(|_| {
                let (r, tok) = (s.router(1).to_string(), u.token.clone());
                async move {
                    let mut c = Client::connect(&r, &tok).await?;
                    c.call("resume", json!({})).await?;
                    anyhow::Ok(c)
                }
            })
            .collect();
        for c in futures::future::join_all(fs).await {
            conns.push(c.with_context(|| format!("connection {}", conns.len() + 1))?);
        }
    }
    let connect_secs = t.elapsed().as_secs_f64();
    // Let the router settle (its pushes to them are done), then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    // Every connection still answers.
    let mut alive = 0;
    for c in conns.iter_mut().step_by((count / 100).max(1)) {
        if c.call("ping", json!({})).await.is_ok() {
            alive += 1;
        }
    }
    drop(conns);
    Ok(json!({"connections": count, "connect_secs": connect_secs,
              "router_rss_before_mib": before as f64 / 1024.0,
              "router_rss_after_mib": after as f64 / 1024.0,
              "rss_per_connection_kib": (after.saturating_sub(before)) as f64 / count as f64,
              "sampled_alive": alive}))
}

/// Delta-sync and cold-start cost with `small` vs `history` messages
/// (the `natter-bench sync` measurement, through the data API), and node
/// memory and disk per million messages, extrapolated from the fill.
pub async fn sync_and_storage(s: &NatterSys, history: u64, reads: usize) -> Result<Value> {
    let disk_before: u64 = s
        .cluster
        .nodes
        .values()
        .map(|n| dir_bytes(&n.data_dir))
        .sum();
    let rss_before: u64 = s.node_pids().iter().map(|p| rss_kib(*p)).sum();
    let t = Instant::now();
    let rows = crate::sync_rows(
        &s.n,
        s.cluster.shards,
        &[("small", 100), ("large", history)],
        reads,
    )
    .await?;
    let fill_secs = t.elapsed().as_secs_f64();
    // Let memtables and compactions settle a little.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let disk_after: u64 = s
        .cluster
        .nodes
        .values()
        .map(|n| dir_bytes(&n.data_dir))
        .sum();
    let rss_after: u64 = s.node_pids().iter().map(|p| rss_kib(*p)).sum();
    let msgs = (history + 100) as f64;
    Ok(json!({
        "rows": rows,
        "filled_messages": history + 100,
        "fill_secs": fill_secs,
        "disk_per_million_per_node_mib":
            disk_after.saturating_sub(disk_before) as f64 / 3.0 / 1048576.0 / msgs * 1e6,
        "rss_growth_per_million_per_node_mib":
            rss_after.saturating_sub(rss_before) as f64 / 3.0 / 1024.0 / msgs * 1e6,
        "node_rss_after_mib": rss_after as f64 / 3.0 / 1024.0,
        "extrapolated_from_messages": history + 100,
    }))
}

fn group_status(
    st: &natter_proto::cluster::StatusReply,
    g: u32,
) -> Option<&natter_proto::cluster::GroupStatus> {
    st.groups.iter().find(|x| x.group == g)
}

/// Leader failover after kill -9 (time from the kill to the first write
/// acknowledged through the router on that shard), then the catch-up rate
/// of the killed node after `writes` entries were committed without it.
pub async fn failover_and_catch_up(s: &mut NatterSys, writes: u64) -> Result<Value> {
    let shard = 3u32;
    let u = s.user().await?;
    let conv = s.group_on(shard, &u, &[]).await?;
    let mut c = Client::connect(s.router(0), &u.token).await?;
    for i in 0..5 {
        c.call(
            "send",
            json!({"conversation_id": conv, "client_msg_id": format!("w{i}"), "text": "warm"}),
        )
        .await?;
    }
    let first = s.cluster.ids()[0];
    let leader = s
        .cluster
        .status(first)
        .await
        .ok()
        .and_then(|st| group_status(&st, shard).map(|g| g.leader_id))
        .filter(|l| *l != 0)
        .context("no leader for the shard")?;
    let applied_at_kill = s
        .cluster
        .status(leader)
        .await
        .ok()
        .and_then(|st| group_status(&st, shard).map(|g| g.applied_index))
        .unwrap_or(0);
    s.cluster.kill9(leader);
    let t_kill = Instant::now();
    let mut i = 0u64;
    let failover = loop {
        let r = c
            .request("send", json!({"conversation_id": conv, "client_msg_id": format!("f{i}"), "text": "after kill"}))
            .await;
        if matches!(&r, Ok(v) if v.get("ok").is_some()) {
            break t_kill.elapsed();
        }
        if t_kill.elapsed() > Duration::from_secs(60) {
            bail!("no write on shard {shard} within 60 s of killing its leader");
        }
        i += 1;
    };
    // Entries committed while the node is down.
    let n = s.n.clone();
    let par = 64u64;
    let fs: Vec<_> = (0..par)
        .map(|w| {
            let (n, conv, uid) = (n.clone(), conv.clone(), u.id.clone());
            async move {
                let mut k = w;
                while k < writes {
                    n.send(&conv, &uid, &format!("down-{k}"), &"y".repeat(200))
                        .await?;
                    k += par;
                }
                anyhow::Ok(())
            }
        })
        .collect();
    for r in futures::future::join_all(fs).await {
        r?;
    }
    let others: Vec<u64> = s
        .cluster
        .ids()
        .into_iter()
        .filter(|x| *x != leader)
        .collect();
    let mut target = 0;
    for o in &others {
        if let Ok(st) = s.cluster.status(*o).await {
            if let Some(g) = group_status(&st, shard) {
                target = target.max(g.committed_index);
            }
        }
    }
    let t_spawn = Instant::now();
    s.cluster.spawn(leader)?;
    let mut first_seen: Option<(Instant, u64)> = None;
    let done = loop {
        if let Ok(st) = s.cluster.status(leader).await {
            if let Some(g) = group_status(&st, shard) {
                if first_seen.is_none() {
                    first_seen = Some((Instant::now(), g.applied_index));
                }
                if g.applied_index >= target {
                    break Instant::now();
                }
            }
        }
        if t_spawn.elapsed() > Duration::from_secs(120) {
            bail!("restarted node did not catch up within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    s.cluster.wait_ready(Duration::from_secs(60)).await?;
    let entries = target.saturating_sub(applied_at_kill);
    let (seen_at, seen_applied) = first_seen.unwrap_or((t_spawn, applied_at_kill));
    let span = done.saturating_duration_since(seen_at).as_secs_f64();
    Ok(json!({
        "shard": shard,
        "killed_node": leader,
        "failover_ms": failover.as_secs_f64() * 1000.0,
        "failed_attempts_before_success": i,
        "entries_to_catch_up": entries,
        "catch_up_secs_from_spawn": done.saturating_duration_since(t_spawn).as_secs_f64(),
        "entries_behind_when_first_seen": target.saturating_sub(seen_applied),
        "catch_up_entries_per_sec": if span > 0.0 {
            target.saturating_sub(seen_applied) as f64 / span
        } else { 0.0 },
        "catch_up_entries_per_sec_incl_start":
            entries as f64 / done.saturating_duration_since(t_spawn).as_secs_f64().max(1e-9),
    }))
}
