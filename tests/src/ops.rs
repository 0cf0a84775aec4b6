//! Harness for membership and operations tests (issue 8): nodes that join a
//! running cluster (`--join`), readiness and balance conditions that hold
//! whatever shards a node hosts, `natter-admin`, metrics scrapes, and a
//! continuous write load whose acknowledged writes are checked afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use natter_model::pb::response::R;

use crate::natter::{decode, uuid, Natter};
use crate::{bin, free_port, tail, Cluster, ClusterOpts, NodeHost, NodeProc, Outcome, ShardClient};

pub const ALICE: &str = "00000000-0000-4000-8000-00000000a11c";

impl Cluster {
    /// Starts a new node with `--join` (through node `via`) and an empty data
    /// dir, and waits until the cluster registered it; returns its id (the
    /// cluster's choice). `args`: extra flags (timings, metrics).
    pub async fn join_node(&mut self, via: u64, args: &[String]) -> Result<u64> {
        let host = NodeHost {
            listen: format!("127.0.0.1:{}", free_port()),
            ..Default::default()
        };
        self.join_node_on(via, host, args).await
    }

    /// Like [`Cluster::join_node`], on a given host (address, argv prefix,
    /// environment), e.g. a network namespace of the fault-injection suite.
    pub async fn join_node_on(&mut self, via: u64, host: NodeHost, args: &[String]) -> Result<u64> {
        let addr = host.listen.clone();
        // Unique per join, whatever the host.
        let tag = format!("{}-{}", addr.replace([':', '.'], "_"), uuid());
        let data_dir = self.dir.path().join(format!("joined-{tag}"));
        let log = self.dir.path().join(format!("joined-{tag}.log"));
        let mut argv = vec![
            "--join".to_string(),
            self.nodes[&via].addr.clone(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        argv.extend(args.iter().cloned());
        // Spawned under a placeholder id until the cluster names it.
        let placeholder = u64::MAX - self.nodes.len() as u64;
        self.nodes.insert(
            placeholder,
            NodeProc {
                id: placeholder,
                addr: addr.clone(),
                data_dir,
                log,
                args: argv,
                prefix: host.prefix,
                env: host.env,
                child: None,
            },
        );
        self.spawn(placeholder)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(map) = self.shard_map().await {
                if let Some(n) = map.nodes.iter().find(|n| n.addr == addr) {
                    let mut p = self.nodes.remove(&placeholder).context("placeholder")?;
                    p.id = n.id;
                    self.nodes.insert(n.id, p);
                    return Ok(n.id);
                }
            }
            let p = self.nodes.get_mut(&placeholder).context("placeholder")?;
            if !p.is_running() {
                bail!("joining node exited; log:\n{}", tail(&p.log, 40));
            }
            if Instant::now() > deadline {
                bail!("node at {addr} was not registered in time");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Forgets a node (after its process was stopped and it left the
    /// cluster); returns where it ran, for reuse.
    pub fn forget(&mut self, id: u64) -> Option<NodeProc> {
        self.nodes.remove(&id)
    }

    /// Where node `id` runs, to start another node there later.
    pub fn host_of(&self, id: u64) -> Option<NodeHost> {
        self.nodes.get(&id).map(|n| NodeHost {
            listen: n.addr.clone(),
            advertise: None,
            prefix: n.prefix.clone(),
            env: n.env.clone(),
        })
    }

    /// Waits until every running node answers, every group it hosts knows
    /// a leader, and every shard has a leader. Unlike [`Cluster::wait_ready`]
    /// it does not expect every node to host every shard.
    pub async fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = anyhow!("not checked");
        while Instant::now() < deadline {
            match self.check_serving().await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            for (id, n) in self.nodes.iter_mut() {
                if n.child.is_some() && !n.is_running() {
                    bail!("node {id} exited; log:\n{}", tail(&n.log, 40));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.context("cluster not serving in time"))
    }

    async fn check_serving(&self) -> Result<()> {
        let map = self.shard_map().await?;
        let mut led = BTreeSet::new();
        for (id, n) in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            let st = self.status(*id).await?;
            if let Some(g) = st.groups.iter().find(|g| g.leader_id == 0) {
                bail!("node {id}: group {} has no leader", g.group);
            }
            for g in st.groups.iter().filter(|g| g.state == "Leader") {
                led.insert(g.group);
            }
        }
        for p in &map.shards {
            if !led.contains(&p.shard) {
                bail!("shard {} has no running leader", p.shard);
            }
        }
        Ok(())
    }

    /// The balance as the running nodes report it.
    pub async fn balance(&self) -> Result<Balance> {
        let map = self.shard_map().await?;
        let mut b = Balance::default();
        for n in &map.nodes {
            b.replicas.insert(n.id, 0);
            b.leads.insert(n.id, 0);
        }
        let mut terms: BTreeMap<u32, u64> = BTreeMap::new();
        for (id, n) in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            let Ok(st) = self.status(*id).await else {
                continue;
            };
            for g in st.groups.iter().filter(|g| g.group != 0) {
                if g.state == "Leader" && terms.get(&g.group).is_none_or(|t| *t < g.term) {
                    terms.insert(g.group, g.term);
                    b.leader.insert(g.group, *id);
                    b.voters.insert(g.group, g.voters.clone());
                    b.learners += g.learners.len();
                }
            }
        }
        for (shard, voters) in &b.voters {
            for v in voters {
                *b.replicas.entry(*v).or_default() += 1;
            }
            let placed = map
                .shards
                .iter()
                .find(|p| p.shard == *shard)
                .map(|p| p.replicas.clone())
                .unwrap_or_default();
            if placed != *voters {
                b.placement_behind = true;
            }
        }
        for l in b.leader.values() {
            *b.leads.entry(*l).or_default() += 1;
        }
        b.shards = map.shards.len();
        b.draining = map
            .nodes
            .iter()
            .filter(|n| n.draining)
            .map(|n| n.id)
            .collect();
        Ok(b)
    }

    /// Waits until replicas are even (within one) over the non-draining
    /// nodes, placement matches, no move is in flight, and no node leads
    /// more than ceil(shards / nodes) + 1 shards.
    pub async fn wait_balanced(&self, timeout: Duration) -> Result<Balance> {
        let deadline = Instant::now() + timeout;
        loop {
            let b = self.balance().await;
            if let Ok(b) = &b {
                if b.is_balanced() {
                    return Ok(b.clone());
                }
            }
            if Instant::now() > deadline {
                bail!("not balanced in time: {b:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Replicas and leaderships per node.
#[derive(Debug, Default, Clone)]
pub struct Balance {
    pub shards: usize,
    /// Voters per node (from the shards' leaders).
    pub replicas: BTreeMap<u64, usize>,
    pub leads: BTreeMap<u64, usize>,
    pub leader: BTreeMap<u32, u64>,
    pub voters: BTreeMap<u32, Vec<u64>>,
    pub learners: usize,
    pub placement_behind: bool,
    pub draining: BTreeSet<u64>,
}

impl Balance {
    pub fn is_balanced(&self) -> bool {
        let active: Vec<u64> = self
            .replicas
            .keys()
            .copied()
            .filter(|id| !self.draining.contains(id))
            .collect();
        if active.is_empty() || self.leader.len() != self.shards {
            return false;
        }
        let counts: Vec<usize> = active.iter().map(|id| self.replicas[id]).collect();
        let (min, max) = (
            counts.iter().min().copied().unwrap_or(0),
            counts.iter().max().copied().unwrap_or(0),
        );
        let lead_cap = self.shards.div_ceil(active.len()) + 1;
        let drained = self
            .draining
            .iter()
            .all(|d| self.replicas.get(d).copied().unwrap_or(0) == 0);
        max - min <= 1
            && self.leads.values().all(|l| *l <= lead_cap)
            && self.learners == 0
            && !self.placement_behind
            && drained
            && self.voters.values().all(|v| {
                let mut u = v.clone();
                u.dedup();
                u.len() == v.len()
            })
    }
}

/// `natter-admin --node NODE status ARGS` once it exits 0: it exits 3 while
/// a shard has no leader, as it does for a moment during an election or a
/// leadership hand-off (the rebalancer may still be evening out leaders).
/// Gives up after 30 s and answers the last run.
pub fn admin_status_healthy(node: &str, args: &[&str]) -> (i32, String, String) {
    let args: Vec<&str> = std::iter::once("status")
        .chain(args.iter().copied())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = admin(node, &args);
        if out.0 != 3 || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `natter-admin --node NODE ARGS`: (exit code, stdout, stderr).
pub fn admin(node: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin("natter-admin"))
        .arg("--node")
        .arg(node)
        .args(args)
        .output()
        .expect("run natter-admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Cluster options with a metrics endpoint per node is per node (ports):
/// use [`metrics_args`] in `node_args` of each joined node instead.
pub fn opts(shards: u32) -> ClusterOpts {
    ClusterOpts {
        shards,
        ..ClusterOpts::default()
    }
}

/// `--metrics-listen` on a fresh port; returns (flags, address).
pub fn metrics_args() -> (Vec<String>, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    (vec!["--metrics-listen".into(), addr.clone()], addr)
}

/// GET `path` from `addr` (plain HTTP/1.1): (status, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of a sample (`name{labels} value`) in a text exposition.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

/// Writers append uniquely numbered messages to one conversation per shard
/// and record what was acknowledged (with the time of each ack).
/// Acknowledged texts per conversation, with the time of each ack.
pub type Acked = Arc<Mutex<BTreeMap<String, Vec<(String, Instant)>>>>;

pub struct Load {
    pub acked: Acked,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One group conversation per shard, created by [`ALICE`].
pub async fn conversation_per_shard(n: &Natter) -> Result<Vec<String>> {
    let mut convs = Vec::new();
    for shard in 1..=n.shards {
        convs.push(n.create_group_on(shard, ALICE, &[]).await?);
    }
    Ok(convs)
}

pub fn natter(c: &Cluster) -> Natter {
    Natter::new(ShardClient::new(c.addrs()), c.shards)
}

impl Load {
    pub fn start(n: &Natter, convs: &[String]) -> Load {
        let acked: Acked = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = convs
            .iter()
            .map(|conv| {
                let (n, conv, acked, stop) = (n.clone(), conv.clone(), acked.clone(), stop.clone());
                let run = uuid();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let text = format!("{conv}#{run}#{i}");
                        let cmid = format!("{}-{i}", &run[..8]);
                        // The same client_msg_id until the outcome is known
                        // (idempotent: a retried success is no duplicate).
                        let deadline = Instant::now() + Duration::from_secs(60);
                        loop {
                            let (_, out) = n
                                .exec_once(Natter::send_op(&conv, ALICE, &cmid, &text))
                                .await;
                            if let Outcome::Ok(raw) = out {
                                if let Ok(R::Sent(_)) = decode(&raw) {
                                    if let Ok(mut a) = acked.lock() {
                                        a.entry(conv.clone())
                                            .or_default()
                                            .push((text.clone(), Instant::now()));
                                    }
                                }
                                break;
                            }
                            if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Load { acked, stop, tasks }
    }

    pub fn count(&self) -> usize {
        self.acked
            .lock()
            .map(|a| a.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    /// Acks in every conversation (per shard) after `since`.
    pub fn acked_since(&self, since: Instant) -> BTreeMap<String, usize> {
        self.acked
            .lock()
            .map(|a| {
                a.iter()
                    .map(|(c, v)| (c.clone(), v.iter().filter(|(_, t)| *t > since).count()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `more` writes were acknowledged.
    pub async fn wait_for_more(&self, more: usize, timeout: Duration) -> Result<()> {
        let target = self.count() + more;
        let deadline = Instant::now() + timeout;
        while self.count() < target {
            if Instant::now() > deadline {
                bail!("writes did not flow: stuck at {} acks", self.count());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until every conversation got a write acknowledged after `since`.
    pub async fn wait_each_since(&self, since: Instant, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.acked_since(since);
            if !m.is_empty() && m.values().all(|n| *n > 0) && m.len() == self.tasks.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("some conversations took no write: {m:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn finish(self) -> BTreeMap<String, Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let a = self.acked.lock().map(|a| a.clone()).unwrap_or_default();
        a.into_iter()
            .map(|(c, v)| (c, v.into_iter().map(|(t, _)| t).collect()))
            .collect()
    }
}

/// Every acknowledged message is present exactly once, in acknowledgement
/// order, read linearizably.
pub async fn check_acked(n: &Natter, acked: &BTreeMap<String, Vec<String>>) -> Result<usize> {
    let mut total = 0;
    for (conv, sent) in acked {
        let msgs = n.history(conv, ALICE).await?;
        let got: Vec<String> = msgs.into_iter().map(|m| m.text).collect();
        let unique: BTreeSet<&String> = got.iter().collect();
        if unique.len() != got.len() {
            bail!("duplicate messages in {conv}");
        }
        let got_acked: Vec<&String> = got.iter().filter(|t| sent.contains(t)).collect();
        if got_acked != sent.iter().collect::<Vec<_>>() {
            bail!(
                "acknowledged messages of {conv} lost or reordered: {} acked, {} found",
                sent.len(),
                got_acked.len()
            );
        }
        total += sent.len();
    }
    Ok(total)
}
