//! Latency and connection loss between nodes, without tc netem.
//!
//! These machines have no `sch_netem`, so the suite slows and breaks links
//! itself: for the `slow` and `flaky` nemeses every node is started behind a
//! TCP proxy run by the suite. Node `j` listens on its own address but
//! *advertises* the proxy's, so every peer (and every client) reaches it
//! through the proxy, which forwards to the node.
//!
//! A proxy moves bytes in chunks; each chunk can be held back (latency, with
//! the order of the stream kept: a chunk is never delivered before the one
//! read before it) or the whole connection reset (what heavy packet loss
//! looks like to a TCP user: a stalled stream that the kernel or a timeout
//! eventually tears down). Faults are per link: the proxy of node `j` tells
//! connections apart by their source address, which in netns mode names the
//! sending node (`10.213.47.<10+i>`). On loopback every source is
//! `127.0.0.1`, so there a fault applies to every connection *to* a node.
//!
//! Memory is bounded: at most [`QUEUE_CHUNKS`] chunks of [`CHUNK`] bytes are
//! in flight per direction of a connection; a full queue stops reading,
//! which back-pressures the sender through TCP.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes read at once.
pub const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction of one connection.
pub const QUEUE_CHUNKS: usize = 64;

/// What happens to the traffic of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFault {
    /// Each chunk is held back by a delay drawn from `[lo, hi]` ms.
    pub delay_ms: (u64, u64),
    /// Per chunk, the chance in 1/1000 that the connection is reset.
    pub reset_per_mille: u32,
}

impl LinkFault {
    fn is_none(&self) -> bool {
        self.delay_ms == (0, 0) && self.reset_per_mille == 0
    }
}

/// Who sent a connection's bytes, as far as the proxy can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A node, by id (netns mode only).
    Node(u64),
    /// Anything else: the suite's clients, or every source on loopback.
    Other,
}

#[derive(Default)]
struct Rules {
    /// Faults by source; `None` = every source.
    by_source: BTreeMap<Option<Source>, LinkFault>,
}

impl Rules {
    fn get(&self, src: Source) -> LinkFault {
        self.by_source
            .get(&Some(src))
            .or_else(|| self.by_source.get(&None))
            .copied()
            .unwrap_or_default()
    }
}

/// State shared by a proxy's connections.
struct Shared {
    rules: Mutex<Rules>,
    /// Connections reset by a fault, for the run's notes.
    resets: AtomicU64,
    /// Seeds the per-connection random streams.
    seq: AtomicU64,
    seed: u64,
}

impl Shared {
    fn fault(&self, src: Source) -> LinkFault {
        self.rules.lock().map(|r| r.get(src)).unwrap_or_default()
    }
}

struct Proxy {
    advertise: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// One proxy in front of every node.
pub struct Proxies {
    proxies: BTreeMap<u64, Proxy>,
    /// Maps a connection's source IP to the node it belongs to.
    node_ips: BTreeMap<IpAddr, u64>,
}

impl Proxies {
    /// Starts a proxy for every `(node, (listen_on, forward_to))`.
    /// `node_ips` names the nodes by their source addresses (empty on
    /// loopback).
    pub async fn start(
        targets: BTreeMap<u64, (String, String)>,
        node_ips: BTreeMap<IpAddr, u64>,
        seed: u64,
    ) -> Result<Proxies> {
        let mut proxies = BTreeMap::new();
        for (id, (listen, target)) in targets {
            let listener = TcpListener::bind(&listen)
                .await
                .with_context(|| format!("proxy of node {id}: binding {listen}"))?;
            let advertise = listener.local_addr()?.to_string();
            let shared = Arc::new(Shared {
                rules: Mutex::new(Rules::default()),
                resets: AtomicU64::new(0),
                seq: AtomicU64::new(0),
                seed: seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            });
            let task = tokio::spawn(accept_loop(
                listener,
                target,
                shared.clone(),
                node_ips.clone(),
            ));
            proxies.insert(
                id,
                Proxy {
                    advertise,
                    shared,
                    task,
                },
            );
        }
        Ok(Proxies { proxies, node_ips })
    }

    /// The address node `id` must advertise.
    pub fn advertise(&self, id: u64) -> Option<String> {
        self.proxies.get(&id).map(|p| p.advertise.clone())
    }

    /// Whether links can be told apart by their sending node.
    pub fn per_link(&self) -> bool {
        !self.node_ips.is_empty()
    }

    /// Sets the fault of traffic from `from` to node `to` (`from = None`:
    /// from everyone).
    pub fn set(&self, from: Option<Source>, to: u64, fault: LinkFault) {
        if let Some(p) = self.proxies.get(&to) {
            if let Ok(mut r) = p.shared.rules.lock() {
                if fault.is_none() {
                    r.by_source.remove(&from);
                } else {
                    r.by_source.insert(from, fault);
                }
            }
        }
    }

    /// Removes every fault; open connections carry on undisturbed.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            if let Ok(mut r) = p.shared.rules.lock() {
                r.by_source.clear();
            }
        }
    }

    /// Connections reset by faults so far.
    pub fn resets(&self) -> u64 {
        self.proxies
            .values()
            .map(|p| p.shared.resets.load(Ordering::Relaxed))
            .sum()
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for p in self.proxies.values() {
            p.task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    shared: Arc<Shared>,
    node_ips: BTreeMap<IpAddr, u64>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("proxy accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let src = source(&node_ips, peer);
                conns.spawn(serve(client, target.clone(), src, shared.clone()));
            }
            // Reap finished connections so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn source(node_ips: &BTreeMap<IpAddr, u64>, peer: SocketAddr) -> Source {
    node_ips
        .get(&peer.ip())
        .map(|&id| Source::Node(id))
        .unwrap_or(Source::Other)
}

/// Why a pipe stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// EOF or an I/O error: pass the close on.
    Closed,
    /// A fault reset the connection.
    Reset,
}

async fn serve(mut client: TcpStream, target: String, src: Source, shared: Arc<Shared>) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        // The node is down: the client sees its connection closed at once.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let n = shared.seq.fetch_add(1, Ordering::Relaxed);
    let end = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pipe(cr, sw, src, &shared, shared.seed ^ (n << 1));
        let down = pipe(sr, cw, src, &shared, shared.seed ^ (n << 1 | 1));
        // Either direction ending ends the connection (gRPC uses both).
        tokio::select! {
            end = up => end,
            end = down => end,
        }
    };
    if end == End::Reset {
        shared.resets.fetch_add(1, Ordering::Relaxed);
        // Closing with linger 0 sends a RST both ways.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

async fn pipe(
    mut r: ReadHalf<'_>,
    mut w: WriteHalf<'_>,
    src: Source,
    shared: &Shared,
    seed: u64,
) -> End {
    let mut rng = StdRng::seed_from_u64(seed);
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let reader = async move {
        let mut last = Instant::now();
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(n) => n,
            };
            buf.truncate(n);
            let f = shared.fault(src);
            if f.reset_per_mille > 0 && rng.gen_range(0..1000) < f.reset_per_mille {
                return End::Reset;
            }
            let (lo, hi) = f.delay_ms;
            let delay = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
            // Never before the previous chunk: the stream keeps its order.
            let at = (Instant::now() + Duration::from_millis(delay)).max(last);
            last = at;
            if tx.send((at, buf)).await.is_err() {
                return End::Closed;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&chunk).await.is_err() {
                return End::Closed;
            }
        }
        let _ = w.shutdown().await;
        End::Closed
    };
    tokio::pin!(writer);
    tokio::select! {
        end = reader => match end {
            // Deliver what is queued, then pass the close on.
            End::Closed => writer.await,
            End::Reset => End::Reset,
        },
        end = &mut writer => end,
    }
}
