//! Load drivers: closed-loop clients (each waits for its acknowledgement
//! before the next write) and an open-loop fixed-rate sender, plus the
//! percentile arithmetic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::{SinkExt, StreamExt};
use natter_tests::router::Client;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::peers::{EtcdKv, NatsPub};

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The 200-byte payload every system writes.
pub fn payload() -> String {
    "x".repeat(200)
}

/// One closed-loop client of one system.
pub enum Worker {
    /// Natter through the router: protocol-v1 `send` on a WebSocket. A
    /// resumed (live) client is pushed every change of its conversations;
    /// `pushed` counts the conversation pushes it has read.
    NatterWs {
        client: Client,
        conversation: String,
        prefix: String,
        pushed: u64,
    },
    /// Natter through the router: `natter.client.Natter/Send` over gRPC
    /// (the generated tonic client, its own HTTP/2 connection).
    NatterGrpc {
        api: natter_tests::grpc::Api,
        token: String,
        conversation: String,
        prefix: String,
    },
    Etcd(EtcdKv),
    Nats(NatsPub),
}

impl Worker {
    /// Conversation pushes this client has read so far (0 unless it is a
    /// live WebSocket client).
    pub fn pushed(&self) -> u64 {
        match self {
            Worker::NatterWs { pushed, .. } => *pushed,
            _ => 0,
        }
    }

    /// One durable, replicated append; Ok once acknowledged.
    async fn op(&mut self, i: u64, text: &str) -> Result<()> {
        match self {
            Worker::NatterWs {
                client,
                conversation,
                prefix,
                pushed,
            } => {
                let r = client
                    .request(
                        "send",
                        json!({"conversation_id": conversation,
                               "client_msg_id": format!("{prefix}-{i}"), "text": text}),
                    )
                    .await?;
                // Pushes read while waiting for the answer: counted, dropped.
                *pushed += client
                    .events
                    .drain(..)
                    .filter(|e| e["event"] == "conversation")
                    .count() as u64;
                if r.get("ok").is_none() {
                    bail!("send failed: {r}");
                }
                Ok(())
            }
            Worker::NatterGrpc {
                api,
                token,
                conversation,
                prefix,
            } => {
                api.send(natter_tests::grpc::authed(
                    token,
                    natter_proto::client::SendRequest {
                        conversation_id: conversation.clone(),
                        client_msg_id: format!("{prefix}-{i}"),
                        text: text.to_string(),
                        ..Default::default()
                    },
                ))
                .await?;
                Ok(())
            }
            Worker::Etcd(kv) => kv.put(text.as_bytes()).await,
            Worker::Nats(p) => p.publish(text.as_bytes()).await,
        }
    }
}

/// Latencies (µs, sorted) and errors of one run.
#[derive(Default, Debug)]
pub struct Samples {
    pub lat: Vec<u64>,
    pub errors: u64,
}

impl Samples {
    pub fn merge(&mut self, other: Samples) {
        self.lat.extend(other.lat);
        self.errors += other.errors;
        self.lat.sort_unstable();
    }
}

/// Runs every worker in a closed loop for `secs`; answers the workers back
/// (to reuse their connections) and the samples.
pub async fn closed_loop(workers: Vec<Worker>, secs: f64, seq: u64) -> (Vec<Worker>, Samples) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let text = payload();
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut i = seq;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match w.op(i, &text).await {
                        Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                    i += 1;
                }
                (w, lat, errors)
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut s = Samples::default();
    for t in tasks {
        if let Ok((w, l, e)) = t.await {
            out.push(w);
            s.lat.extend(l);
            s.errors += e;
        } else {
            s.errors += 1;
        }
    }
    s.lat.sort_unstable();
    (out, s)
}

/// Result of an open-loop run.
#[derive(Debug)]
pub struct OpenLoop {
    pub target_rate: f64,
    pub secs: f64,
    pub scheduled: u64,
    pub skipped: u64,
    pub ok: u64,
    pub errors: u64,
    /// Latency from the *scheduled* send time (no coordinated omission).
    pub lat: Vec<u64>,
}

/// Sends `rate` messages a second for `secs` over `clients` WebSockets
/// (sender connections, not resumed), whatever the answers do: a message is
/// due at `start + k / rate`; a connection with `max_outstanding` unanswered
/// sends skips it (counted). Latency is measured from the due time.
pub async fn open_loop(
    clients: Vec<Client>,
    conversations: &[String],
    rate: f64,
    secs: f64,
    max_outstanding: usize,
) -> Result<OpenLoop> {
    struct Conn {
        tx: tokio::sync::mpsc::Sender<(u64, Instant)>,
        outstanding: Arc<AtomicUsize>,
    }
    let lat: Arc<Mutex<Vec<u64>>> = Arc::default();
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    let mut tasks = Vec::new();
    let text = payload();
    for (ci, c) in clients.into_iter().enumerate() {
        let (mut sink, mut stream) = c.ws.split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Instant)>(max_outstanding + 1);
        let outstanding = Arc::new(AtomicUsize::new(0));
        let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let conv = conversations[ci % conversations.len()].clone();
        let (sent_w, text) = (sent.clone(), text.clone());
        tasks.push(tokio::spawn(async move {
            while let Some((k, due)) = rx.recv().await {
                if let Ok(mut m) = sent_w.lock() {
                    m.insert(k, due);
                }
                let frame = json!({"v": 1, "id": k, "op": "send", "conversation_id": conv,
                                   "client_msg_id": format!("ol-{k}"), "text": text});
                if sink
                    .send(Message::Text(frame.to_string().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
        let (out_r, lat_r, ok_r, err_r) =
            (outstanding.clone(), lat.clone(), ok.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    continue;
                };
                let Some(id) = v["id"].as_u64() else { continue };
                let due = sent.lock().ok().and_then(|mut m| m.remove(&id));
                out_r.fetch_sub(1, Ordering::Relaxed);
                if v.get("ok").is_some() {
                    if let (Some(due), Ok(mut l)) = (due, lat_r.lock()) {
                        l.push(due.elapsed().as_micros() as u64);
                    }
                    ok_r.fetch_add(1, Ordering::Relaxed);
                } else {
                    err_r.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        conns.push(Conn { tx, outstanding });
    }
    if conns.is_empty() {
        bail!("no connections");
    }
    let start = Instant::now();
    let total = (rate * secs) as u64;
    let (mut k, mut skipped) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while k < total {
        tick.tick().await;
        let due_now = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while k < due_now {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            let c = &conns[(k as usize) % conns.len()];
            if c.outstanding.load(Ordering::Relaxed) >= max_outstanding {
                skipped += 1;
            } else {
                c.outstanding.fetch_add(1, Ordering::Relaxed);
                if c.tx.try_send((k, due)).is_err() {
                    c.outstanding.fetch_sub(1, Ordering::Relaxed);
                    skipped += 1;
                }
            }
            k += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let what is in flight finish (bounded).
    let drain = Instant::now() + Duration::from_secs(15);
    while Instant::now() < drain
        && conns
            .iter()
            .any(|c| c.outstanding.load(Ordering::Relaxed) > 0)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conns);
    for t in tasks {
        t.abort();
    }
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    Ok(OpenLoop {
        target_rate: rate,
        secs: elapsed,
        scheduled: total,
        skipped,
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        lat: l,
    })
}
