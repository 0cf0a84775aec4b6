//! Test harness: starts real `natter-node` processes on ephemeral loopback
//! ports in a temporary directory, waits for readiness by asking them (never
//! by sleeping a fixed time), kills and restarts them, and talks to the
//! cluster through the same gRPC data API routers use.
//!
//! The binaries are found next to the test executable's `deps/` directory
//! (`target/<profile>/`), or in `NATTER_BIN_DIR`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{
    propose_reply, read_reply, Consistency, ProposeRequest, ReadRequest, ShardMap, ShardMapRequest,
    StatusReply, StatusRequest,
};
use tonic::transport::Channel;

pub mod grpc;
pub mod media;
pub mod natter;
pub mod ops;
pub mod router;
pub mod sdk;
pub mod webhook;

/// Directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("NATTER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("executable path");
    // A binary lives in target/<profile>/, a test in target/<profile>/deps/.
    let dir = exe.parent().map(Path::to_path_buf).expect("executable dir");
    if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --bins` first",
        p.display()
    );
    p
}

/// A free loopback port (bound, then released for the child to take).
///
/// Chosen below the kernel's ephemeral range: a port from that range
/// (`bind(0)`) may be taken as the *source* port of any outgoing connection
/// before the child binds it ("address already in use", seen in CI), while
/// ports below it are only ever taken by an explicit bind. Never the same
/// port twice in one process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(1));
    if high > low {
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..2000 {
            let r = uuid::Uuid::new_v4().as_u128();
            let port = low + (r % u128::from(high - low)) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One node process.
pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// Argv run in front of `natter-node` (e.g. `ip netns exec NS`); empty:
    /// the binary is started directly. May be changed between restarts.
    pub prefix: Vec<String>,
    /// Extra environment of the process (e.g. libfaketime's); may be changed
    /// between restarts.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

/// Options for a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub nodes: u64,
    pub shards: u32,
    /// Extra flags for every node.
    pub node_args: Vec<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 3,
            shards: 4,
            node_args: vec![
                "--heartbeat-ms".into(),
                "200".into(),
                "--election-min-ms".into(),
                "800".into(),
                "--election-max-ms".into(),
                "1600".into(),
            ],
        }
    }
}

/// Where and how one node runs, for suites that place nodes themselves
/// (the fault-injection suite: network namespaces, libfaketime).
#[derive(Clone, Debug, Default)]
pub struct NodeHost {
    /// The node's `--listen` address.
    pub listen: String,
    /// What it advertises to peers and clients (default: `listen`), e.g. a
    /// proxy in front of it.
    pub advertise: Option<String>,
    /// Argv run in front of `natter-node`, e.g. `["ip", "netns", "exec", "ns1"]`.
    pub prefix: Vec<String>,
    /// Extra environment variables of the process.
    pub env: Vec<(String, String)>,
}

/// A cluster of real node processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub shards: u32,
}

impl Cluster {
    /// Starts the nodes and waits until every group has a leader and the
    /// layout is recorded.
    pub async fn start(opts: ClusterOpts) -> Result<Cluster> {
        Cluster::start_on(opts, BTreeMap::new()).await
    }

    /// Like [`Cluster::start`], with the nodes placed by `hosts` (by node id;
    /// a node missing there gets an ephemeral loopback port, started directly).
    pub async fn start_on(opts: ClusterOpts, hosts: BTreeMap<u64, NodeHost>) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("natter-test-").tempdir()?;
        let addrs: BTreeMap<u64, String> = (1..=opts.nodes)
            .map(|id| match hosts.get(&id) {
                Some(h) => (id, h.advertise.clone().unwrap_or_else(|| h.listen.clone())),
                None => (id, format!("127.0.0.1:{}", free_port())),
            })
            .collect();
        let initial = addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = BTreeMap::new();
        for (id, addr) in &addrs {
            let data_dir = dir.path().join(format!("node{id}"));
            let listen = hosts
                .get(id)
                .map(|h| h.listen.clone())
                .unwrap_or_else(|| addr.clone());
            let mut args = vec![
                "--node-id".to_string(),
                id.to_string(),
                "--listen".into(),
                listen,
                "--advertise".into(),
                addr.clone(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--initial-cluster".into(),
                initial.clone(),
                "--shards".into(),
                opts.shards.to_string(),
            ];
            args.extend(opts.node_args.iter().cloned());
            let log = dir.path().join(format!("node{id}.log"));
            nodes.insert(
                *id,
                NodeProc {
                    id: *id,
                    addr: addr.clone(),
                    data_dir,
                    log,
                    args,
                    prefix: hosts.get(id).map(|h| h.prefix.clone()).unwrap_or_default(),
                    env: hosts.get(id).map(|h| h.env.clone()).unwrap_or_default(),
                    child: None,
                },
            );
        }
        let mut c = Cluster {
            dir,
            nodes,
            shards: opts.shards,
        };
        for id in c.ids() {
            c.spawn(id)?;
        }
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok(c)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[&id]
    }

    /// Starts node `id`'s process (again), appending to its log.
    pub fn spawn(&mut self, id: u64) -> Result<()> {
        let n = self.nodes.get_mut(&id).context("no such node")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let mut cmd = match n.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("natter-node"));
                c
            }
            None => Command::new(bin("natter-node")),
        };
        let child = cmd
            .args(&n.args)
            .envs(n.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("NATTER_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning natter-node")?;
        n.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no shutdown path runs, unsynced data is whatever the OS has.
    pub fn kill9(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) -> Result<()> {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(mut c) = n.child.take() {
                let pid = c.id().to_string();
                Command::new("kill").args(["-TERM", &pid]).status()?;
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    if c.try_wait()?.is_some() {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        bail!("node {id} did not stop on SIGTERM within 20 s");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }

    /// Starts node `id` again and waits until it serves its groups.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id)?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    pub async fn client(&self, id: u64) -> Result<NodeClient<Channel>> {
        connect(&self.nodes[&id].addr).await
    }

    pub async fn status(&self, id: u64) -> Result<StatusReply> {
        let mut c = self.client(id).await?;
        let r = tokio::time::timeout(Duration::from_secs(2), c.status(StatusRequest {})).await??;
        Ok(r.into_inner())
    }

    /// Waits until every running node answers, every group it hosts knows a
    /// leader, and the layout is recorded.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err = anyhow!("not checked");
        while Instant::now() < deadline {
            match self.check_ready().await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = e,
            }
            for (id, n) in self.nodes.iter_mut() {
                if n.child.is_some() && !n.is_running() {
                    bail!("node {id} exited; log:\n{}", tail(&n.log, 40));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last_err.context("cluster not ready in time"))
    }

    async fn check_ready(&self) -> Result<()> {
        for (id, n) in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            let st = self.status(*id).await?;
            let expect = self.shards as usize + 1;
            if st.groups.len() < expect {
                bail!("node {id} hosts {} of {expect} groups", st.groups.len());
            }
            if let Some(g) = st.groups.iter().find(|g| g.leader_id == 0) {
                bail!("node {id}: group {} has no leader", g.group);
            }
        }
        self.shard_map().await.map(|_| ())
    }

    pub async fn shard_map(&self) -> Result<ShardMap> {
        let mut last = anyhow!("no running node");
        for (id, n) in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            let mut c = self.client(*id).await?;
            match c
                .shard_map(ShardMapRequest {
                    consistency: Consistency::Stale as i32,
                })
                .await
            {
                Ok(m) => return Ok(m.into_inner()),
                Err(e) => last = anyhow!("node {id}: {e}"),
            }
        }
        Err(last)
    }

    /// Makes node `to` the leader of `shard`: asks the current leader to
    /// hand leadership over, until `to` reports itself leader.
    pub async fn transfer_leader(&self, shard: u32, to: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last_err = String::from("none");
        loop {
            let st = self.status(to).await?;
            let g = st
                .groups
                .iter()
                .find(|g| g.group == shard)
                .context("shard not hosted")?;
            if g.leader_id == to && g.state == "Leader" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {to} did not become leader of shard {shard}: it sees {g:?}; \
                     last transfer error: {last_err}"
                );
            }
            if g.leader_id != 0
                && self
                    .nodes
                    .get(&g.leader_id)
                    .is_some_and(|n| n.child.is_some())
            {
                let mut c = self.client(g.leader_id).await?;
                // An error (e.g. leadership moved meanwhile) just means: look again.
                if let Err(e) = c
                    .transfer_leader(natter_proto::cluster::TransferLeaderRequest { shard, to })
                    .await
                {
                    last_err = format!("from node {}: {e}", g.leader_id);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Running nodes' addresses, for a [`ShardClient`].
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.addr.clone())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // NATTER_KEEP_TEST_DIRS=1 keeps data dirs and node logs to debug a failure.
        if std::env::var_os("NATTER_KEEP_TEST_DIRS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.dir.path().display());
        }
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub async fn connect(addr: &str) -> Result<NodeClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(NodeClient::new(ch))
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Sends proposals and reads to a shard's leader, following NotLeader
/// answers and retrying through elections, as a router does.
#[derive(Clone)]
pub struct ShardClient {
    addrs: Vec<String>,
    leaders: std::sync::Arc<std::sync::Mutex<BTreeMap<u32, String>>>,
    /// One HTTP/2 channel per node, shared by every request (as a router does).
    channels: std::sync::Arc<std::sync::Mutex<BTreeMap<String, NodeClient<Channel>>>>,
}

/// What a proposal attempt ended with.
#[derive(Debug)]
pub enum Outcome {
    /// Committed with this response.
    Ok(Vec<u8>),
    /// Definitely not committed (rejected before reaching the log).
    Fail(String),
    /// Unknown: the request may or may not have committed (timeout, crash).
    Info(String),
}

impl ShardClient {
    pub fn new(addrs: Vec<String>) -> Self {
        ShardClient {
            addrs,
            leaders: Default::default(),
            channels: Default::default(),
        }
    }

    async fn conn(&self, addr: &str) -> Result<NodeClient<Channel>> {
        if let Some(c) = self.channels.lock().ok().and_then(|m| m.get(addr).cloned()) {
            return Ok(c);
        }
        let c = connect(addr).await?;
        if let Ok(mut m) = self.channels.lock() {
            m.insert(addr.to_string(), c.clone());
        }
        Ok(c)
    }

    fn candidates(&self, shard: u32) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(l) = self
            .leaders
            .lock()
            .ok()
            .and_then(|m| m.get(&shard).cloned())
        {
            v.push(l);
        }
        for a in &self.addrs {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        v
    }

    fn remember(&self, shard: u32, addr: &str) {
        if let Ok(mut m) = self.leaders.lock() {
            m.insert(shard, addr.to_string());
        }
    }

    /// One attempt round over the known nodes; the outcome is honest about
    /// whether the command may have been committed.
    pub async fn propose_once(&self, shard: u32, command: &[u8]) -> Outcome {
        let mut note = String::new();
        for addr in self.candidates(shard) {
            let mut c = match self.conn(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    note = e.to_string();
                    continue;
                }
            };
            match c
                .propose(ProposeRequest {
                    shard,
                    command: command.to_vec(),
                })
                .await
            {
                Ok(r) => match r.into_inner().result {
                    Some(propose_reply::Result::Response(resp)) => {
                        self.remember(shard, &addr);
                        return Outcome::Ok(resp);
                    }
                    Some(propose_reply::Result::NotLeader(nl)) => {
                        if !nl.leader_addr.is_empty() {
                            self.remember(shard, &nl.leader_addr);
                        }
                        note = format!("not leader (leader {})", nl.leader_id);
                    }
                    None => return Outcome::Info("empty reply".into()),
                },
                // Connection refused: the request never reached the node.
                Err(s)
                    if s.code() == tonic::Code::Unavailable && s.message().contains("connect") =>
                {
                    note = s.to_string();
                }
                // The node hosts no replica of the shard (replicas move,
                // issue 8): nothing was proposed; ask the next one.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    note = s.to_string();
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Outcome::Fail(s.to_string())
                }
                Err(s) => return Outcome::Info(s.to_string()),
            }
        }
        Outcome::Fail(format!("no leader reachable: {note}"))
    }

    /// Proposes until committed, retrying through elections (the command
    /// must be idempotent); fails after `timeout`.
    pub async fn propose(&self, shard: u32, command: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.propose_once(shard, command).await {
                Outcome::Ok(r) => return Ok(r),
                Outcome::Fail(e) | Outcome::Info(e) if Instant::now() > deadline => {
                    bail!("propose to shard {shard}: {e}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A linearizable read, retried through elections.
    pub async fn read(&self, shard: u32, query: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.read_with(shard, query, Consistency::Linearizable, timeout)
            .await
    }

    pub async fn read_with(
        &self,
        shard: u32,
        query: &[u8],
        consistency: Consistency,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut note = String::new();
        while Instant::now() < deadline {
            for addr in self.candidates(shard) {
                let Ok(mut c) = self.conn(&addr).await else {
                    continue;
                };
                match c
                    .read(ReadRequest {
                        shard,
                        query: query.to_vec(),
                        consistency: consistency as i32,
                    })
                    .await
                {
                    Ok(r) => match r.into_inner().result {
                        Some(read_reply::Result::Response(resp)) => {
                            self.remember(shard, &addr);
                            return Ok(resp);
                        }
                        Some(read_reply::Result::NotLeader(nl)) => {
                            if !nl.leader_addr.is_empty() {
                                self.remember(shard, &nl.leader_addr);
                            }
                            note = format!("not leader (leader {})", nl.leader_id);
                        }
                        None => note = "empty reply".into(),
                    },
                    Err(s) => note = s.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("read from shard {shard}: {note}")
    }

    /// Reads from one specific node, without redirects (for comparing replicas).
    pub async fn read_at(
        addr: &str,
        shard: u32,
        query: &[u8],
        consistency: Consistency,
    ) -> Result<Vec<u8>> {
        let mut c = connect(addr).await?;
        match c
            .read(ReadRequest {
                shard,
                query: query.to_vec(),
                consistency: consistency as i32,
            })
            .await?
            .into_inner()
            .result
        {
            Some(read_reply::Result::Response(r)) => Ok(r),
            other => bail!("node {addr} shard {shard}: {other:?}"),
        }
    }
}
