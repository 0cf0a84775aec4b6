//! Talking to the cluster: the shard map (from any node, refreshed in the
//! background and on errors), one gRPC channel per node, a leader cache per
//! shard, NotLeader redirects, and retries with backoff until a deadline.
//!
//! Every command the router proposes is idempotent or converges when
//! retried (sends by `client_msg_id`, groups by their id, the rest by
//! state), so a proposal whose outcome is unknown (timeout, lost
//! connection) is retried like one that certainly failed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use natter_model::pb::{self, command::Op, query::Q, response::R};
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{
    call_frame, call_frame_reply, propose_reply, read_reply, CallFrame, CallFrameReply,
    Consistency, NotLeader, ProposeReply, ProposeRequest, ReadReply, ReadRequest, ShardMap,
    ShardMapRequest,
};
use natter_proto::mux::Mux;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

/// Largest reply accepted from a node (the model's pages are far smaller).
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;
/// Longest one attempt (one RPC to one node) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Redirects followed in a row before backing off.
const MAX_REDIRECTS: usize = 3;
/// Calls queued on a node's `Calls` stream before callers wait for room.
const CALL_QUEUE: usize = 1024;
/// How long a node that does not serve `Calls` (an older version) gets
/// unary calls before the stream is tried again.
const UNARY_FALLBACK: Duration = Duration::from_secs(60);

/// A node's `Calls` stream: proposals and reads as frames on one stream.
type CallStream = Mux<CallFrame, CallFrameReply>;

/// Why a request to the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No answer within the request's deadline; for a command the outcome
    /// is unknown (retrying an idempotent command is safe).
    #[error("no answer from shard {shard} within the deadline (last: {last})")]
    Timeout { shard: u32, last: String },
    /// The cluster refused the request itself (not a model rejection).
    #[error("the cluster refused the request: {0}")]
    Refused(String),
    /// A node answered something undecodable.
    #[error("bad reply from the cluster: {0}")]
    BadReply(String),
}

/// The shard map as the router uses it.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub shard_count: u32,
    /// Node id → data API address.
    pub nodes: HashMap<u64, String>,
    /// Shard → replica node ids.
    pub replicas: HashMap<u32, Vec<u64>>,
}

impl Layout {
    fn from_map(m: ShardMap) -> Layout {
        Layout {
            shard_count: m.shard_count,
            nodes: m.nodes.into_iter().map(|n| (n.id, n.addr)).collect(),
            replicas: m
                .shards
                .into_iter()
                .map(|s| (s.shard, s.replicas))
                .collect(),
        }
    }

    /// Addresses of a shard's replicas, in node-id order.
    pub fn replica_addrs(&self, shard: u32) -> Vec<String> {
        let mut ids = self.replicas.get(&shard).cloned().unwrap_or_default();
        ids.sort_unstable();
        ids.iter()
            .filter_map(|id| self.nodes.get(id).cloned())
            .collect()
    }

    /// Every node's address, in node-id order.
    pub fn addrs(&self) -> Vec<String> {
        let mut v: Vec<(&u64, &String)> = self.nodes.iter().collect();
        v.sort();
        v.into_iter().map(|(_, a)| a.clone()).collect()
    }
}

enum Attempt {
    Done(Vec<u8>),
    /// The node named another as the leader.
    Redirect(String),
    /// No leader known (an election is running).
    NoLeader,
    /// This node failed (with this gRPC code, if it answered); try another.
    Failed(Option<tonic::Code>, String),
}

/// The router's view of and access to the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    seeds: Vec<String>,
    layout: RwLock<Option<Arc<Layout>>>,
    leaders: Mutex<HashMap<u32, String>>,
    clients: Mutex<HashMap<String, NodeClient<Channel>>>,
    /// Each node's `Calls` stream (proposals and reads), once opened.
    streams: Mutex<HashMap<String, Arc<CallStream>>>,
    /// Nodes that do not serve `Calls` (an older version), until when they
    /// get unary calls.
    unary_until: Mutex<HashMap<String, Instant>>,
    /// Serialises map refreshes so an outage doesn't multiply them.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
}

impl Cluster {
    pub fn new(seeds: Vec<String>) -> Cluster {
        Cluster {
            inner: Arc::new(Inner {
                seeds,
                layout: RwLock::new(None),
                leaders: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
                streams: Mutex::new(HashMap::new()),
                unary_until: Mutex::new(HashMap::new()),
                refreshing: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The data API client of a node (one lazily connected channel each).
    pub fn client(&self, addr: &str) -> Result<NodeClient<Channel>, ClusterError> {
        let mut m = self
            .inner
            .clients
            .lock()
            .map_err(|_| ClusterError::Refused("client cache poisoned".into()))?;
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClusterError::Refused(format!("bad node address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = NodeClient::new(ch)
            .max_decoding_message_size(MAX_REPLY_BYTES)
            .max_encoding_message_size(MAX_REPLY_BYTES);
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// The open `Calls` stream to the node at `addr` (opened on `client`'s
    /// channel if there is none), or `None` while the node gets unary calls.
    fn call_stream(&self, addr: &str, client: &NodeClient<Channel>) -> Option<Arc<CallStream>> {
        let unary = self
            .inner
            .unary_until
            .lock()
            .ok()?
            .get(addr)
            .is_some_and(|t| Instant::now() < *t);
        if unary {
            return None;
        }
        let mut streams = self.inner.streams.lock().ok()?;
        if let Some(s) = streams.get(addr).filter(|s| s.is_open()) {
            return Some(s.clone());
        }
        let mut client = client.clone();
        let s = Mux::open("call stream", CALL_QUEUE, move |frames| {
            Box::new(async move { client.calls(frames).await })
        });
        streams.insert(addr.to_string(), s.clone());
        Some(s)
    }

    fn fall_back_to_unary(&self, addr: &str) {
        if let Ok(mut u) = self.inner.unary_until.lock() {
            u.insert(addr.to_string(), Instant::now() + UNARY_FALLBACK);
        }
    }

    /// The last shard map fetched, if any.
    pub fn layout(&self) -> Option<Arc<Layout>> {
        self.inner.layout.read().ok().and_then(|l| l.clone())
    }

    /// Fetches the shard map from the first node that answers (seeds and
    /// known nodes). Concurrent callers share one refresh; a refresh done in
    /// the last `min_age` is reused.
    pub async fn refresh_layout(&self, min_age: Duration) -> Result<Arc<Layout>, ClusterError> {
        let mut last = self.inner.refreshing.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_age) {
            if let Some(l) = self.layout() {
                return Ok(l);
            }
        }
        let mut addrs = self.inner.seeds.clone();
        if let Some(l) = self.layout() {
            for a in l.addrs() {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        let mut note = String::from("no node address configured");
        for addr in addrs {
            let mut c = self.client(&addr)?;
            let req = ShardMapRequest {
                consistency: Consistency::Stale as i32,
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, c.shard_map(req)).await {
                Ok(Ok(m)) => {
                    let layout = Arc::new(Layout::from_map(m.into_inner()));
                    if layout.shard_count == 0 {
                        note = format!("{addr}: empty shard map");
                        continue;
                    }
                    if let Ok(mut l) = self.inner.layout.write() {
                        *l = Some(layout.clone());
                    }
                    *last = Some(Instant::now());
                    return Ok(layout);
                }
                Ok(Err(s)) => note = format!("{addr}: {}", s.message()),
                Err(_) => note = format!("{addr}: timed out"),
            }
        }
        *last = Some(Instant::now());
        Err(ClusterError::Refused(format!(
            "no node gave a shard map ({note})"
        )))
    }

    async fn layout_or_fetch(&self) -> Option<Arc<Layout>> {
        match self.layout() {
            Some(l) => Some(l),
            None => self.refresh_layout(Duration::ZERO).await.ok(),
        }
    }

    fn leader(&self, shard: u32) -> Option<String> {
        self.inner
            .leaders
            .lock()
            .ok()
            .and_then(|m| m.get(&shard).cloned())
    }

    fn set_leader(&self, shard: u32, addr: &str) {
        if let Ok(mut m) = self.inner.leaders.lock() {
            if m.get(&shard).map(String::as_str) != Some(addr) {
                m.insert(shard, addr.to_string());
            }
        }
    }

    fn forget_leader(&self, shard: u32, addr: &str) {
        if let Ok(mut m) = self.inner.leaders.lock() {
            if m.get(&shard).map(String::as_str) == Some(addr) {
                m.remove(&shard);
            }
        }
    }

    /// Where to try a shard: the cached leader, its replicas, then the seeds.
    fn candidates(&self, shard: u32, layout: Option<&Layout>) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(l) = self.leader(shard) {
            v.push(l);
        }
        let rest = match layout {
            Some(l) if !l.replica_addrs(shard).is_empty() => l.replica_addrs(shard),
            _ => self.inner.seeds.clone(),
        };
        for a in rest {
            if !v.contains(&a) {
                v.push(a);
            }
        }
        v
    }

    /// Where to reach a shard's leader: the cached leader first, then its
    /// replicas (for calls outside `exec`/`query`, e.g. presence).
    pub async fn shard_candidates(&self, shard: u32) -> Vec<String> {
        let layout = self.layout_or_fetch().await;
        self.candidates(shard, layout.as_deref())
    }

    /// Remembers `addr` as the shard's leader.
    pub fn note_leader(&self, shard: u32, addr: &str) {
        self.set_leader(shard, addr);
    }

    /// The number of data shards (fetching the map if needed).
    pub async fn shard_count(&self, deadline: Instant) -> Result<u32, ClusterError> {
        loop {
            if let Some(l) = self.layout_or_fetch().await {
                return Ok(l.shard_count);
            }
            if Instant::now() + BACKOFF_MAX >= deadline {
                return Err(ClusterError::Timeout {
                    shard: 0,
                    last: "the shard map is unknown: no node reachable".into(),
                });
            }
            tokio::time::sleep(BACKOFF_MAX).await;
        }
    }

    async fn attempt(
        &self,
        addr: &str,
        shard: u32,
        read: Option<Consistency>,
        payload: &[u8],
        deadline: Instant,
    ) -> Attempt {
        let mut c = match self.client(addr) {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(None, e.to_string()),
        };
        let trace = crate::metrics::current_trace();
        let limit = ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let call = async {
            if let Some(stream) = self.call_stream(addr, &c) {
                let call = match read {
                    Some(consistency) => call_frame::Call::Read(ReadRequest {
                        shard,
                        query: payload.to_vec(),
                        consistency: consistency as i32,
                    }),
                    None => call_frame::Call::Propose(ProposeRequest {
                        shard,
                        command: payload.to_vec(),
                    }),
                };
                let frame = CallFrame {
                    id: 0,
                    trace: trace.clone().unwrap_or_default(),
                    call: Some(call),
                };
                let until = tokio::time::Instant::now() + limit;
                match stream.call(frame, until).await {
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        // The node predates `Calls`: unary calls, below.
                        tracing::info!("{addr} does not serve call streams; sending unary calls");
                        self.fall_back_to_unary(addr);
                    }
                    Err(s) => return Err(s),
                    Ok(r) if r.code != tonic::Code::Ok as i32 => {
                        return Err(tonic::Status::new(r.code.into(), r.message))
                    }
                    Ok(r) => {
                        return match r.reply {
                            Some(call_frame_reply::Reply::Propose(p)) => Ok(proposed(p)),
                            Some(call_frame_reply::Reply::Read(r)) => Ok(read_result(r)),
                            None => Err(tonic::Status::internal("a call reply without a reply")),
                        }
                    }
                }
            }
            if let Some(consistency) = read {
                c.read(traced(
                    ReadRequest {
                        shard,
                        query: payload.to_vec(),
                        consistency: consistency as i32,
                    },
                    &trace,
                ))
                .await
                .map(|r| read_result(r.into_inner()))
            } else {
                c.propose(traced(
                    ProposeRequest {
                        shard,
                        command: payload.to_vec(),
                    },
                    &trace,
                ))
                .await
                .map(|r| proposed(r.into_inner()))
            }
        };
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(Ok(bytes))) => Attempt::Done(bytes),
            Ok(Ok(Err(nl))) if !nl.leader_addr.is_empty() && nl.leader_addr != addr => {
                Attempt::Redirect(nl.leader_addr)
            }
            Ok(Ok(Err(_))) => Attempt::NoLeader,
            Ok(Err(s)) => Attempt::Failed(
                Some(s.code()),
                format!("{addr}: {:?}: {}", s.code(), s.message()),
            ),
            Err(_) => Attempt::Failed(None, format!("{addr}: attempt timed out")),
        }
    }

    /// Sends an encoded command (`read` None) or query (at `read`
    /// consistency) to a shard's leader, following redirects and retrying
    /// until `deadline`.
    async fn call(
        &self,
        shard: u32,
        read: Option<Consistency>,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, ClusterError> {
        let mut backoff = BACKOFF_START;
        let mut last = String::from("not tried");
        loop {
            let layout = self.layout_or_fetch().await;
            let mut queue: std::collections::VecDeque<String> =
                self.candidates(shard, layout.as_deref()).into();
            let mut tried = HashSet::new();
            let mut redirects = 0;
            let mut stale_map = false;
            while let Some(addr) = queue.pop_front() {
                if Instant::now() >= deadline {
                    return Err(ClusterError::Timeout { shard, last });
                }
                if !tried.insert(addr.clone()) && redirects == 0 {
                    continue;
                }
                match self.attempt(&addr, shard, read, payload, deadline).await {
                    Attempt::Done(bytes) => {
                        self.set_leader(shard, &addr);
                        return Ok(bytes);
                    }
                    Attempt::Redirect(leader) => {
                        last = format!("{addr}: not the leader (leader at {leader})");
                        self.set_leader(shard, &leader);
                        redirects += 1;
                        if redirects > MAX_REDIRECTS {
                            break;
                        }
                        queue.push_front(leader);
                    }
                    Attempt::NoLeader => {
                        last = format!("{addr}: shard {shard} has no leader yet");
                        self.forget_leader(shard, &addr);
                        break;
                    }
                    Attempt::Failed(code, note) => {
                        match code {
                            // The node doesn't host the shard: the map moved.
                            Some(tonic::Code::NotFound) => stale_map = true,
                            Some(tonic::Code::InvalidArgument) => {
                                return Err(ClusterError::Refused(note))
                            }
                            _ => {}
                        }
                        last = note;
                        self.forget_leader(shard, &addr);
                        redirects = 0;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClusterError::Timeout { shard, last });
            }
            if stale_map || layout.is_none() {
                let _ = self.refresh_layout(Duration::from_secs(1)).await;
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 10);
            tokio::time::sleep((backoff + jitter).min(deadline - now)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Proposes a model operation to the shard its route key names.
    pub async fn exec(&self, op: Op, deadline: Instant) -> Result<R, ClusterError> {
        let name = crate::metrics::op_name(&op);
        let started = Instant::now();
        let r = self.exec_inner(op, deadline).await;
        crate::metrics::cluster_request(name, r.is_ok(), started.elapsed());
        r
    }

    async fn exec_inner(&self, op: Op, deadline: Instant) -> Result<R, ClusterError> {
        let cmd = pb::Command {
            stamp: None,
            op: Some(op),
        };
        let shard = natter_model::shard_of(
            &natter_model::route_key(&cmd),
            self.shard_count(deadline).await?,
        );
        let raw = self
            .call(shard, None, &cmd.encode_to_vec(), deadline)
            .await?;
        decode(&raw)
    }

    /// Asks a model query (linearizable) of the shard its route key names.
    pub async fn query(&self, q: Q, deadline: Instant) -> Result<R, ClusterError> {
        self.query_at(q, Consistency::Linearizable, deadline).await
    }

    /// [`Cluster::query`] at a chosen consistency. A `Stale` read is served
    /// by the shard's leader (or whichever replica answers) from what it has
    /// applied, without a read-index round: committed data, maybe not the
    /// newest.
    pub async fn query_at(
        &self,
        q: Q,
        consistency: Consistency,
        deadline: Instant,
    ) -> Result<R, ClusterError> {
        let name = crate::metrics::query_name(&q);
        let started = Instant::now();
        let r = self.query_inner(q, consistency, deadline).await;
        crate::metrics::cluster_request(name, r.is_ok(), started.elapsed());
        r
    }

    async fn query_inner(
        &self,
        q: Q,
        consistency: Consistency,
        deadline: Instant,
    ) -> Result<R, ClusterError> {
        let q = pb::Query {
            now_ms: 0,
            q: Some(q),
        };
        let shard = natter_model::shard_of(
            &natter_model::query_route_key(&q),
            self.shard_count(deadline).await?,
        );
        let raw = self
            .call(shard, Some(consistency), &q.encode_to_vec(), deadline)
            .await?;
        decode(&raw)
    }
}

/// A propose reply as the answer or the leader to ask.
fn proposed(r: ProposeReply) -> Result<Vec<u8>, NotLeader> {
    match r.result {
        Some(propose_reply::Result::Response(b)) => Ok(b),
        Some(propose_reply::Result::NotLeader(nl)) => Err(nl),
        None => Err(Default::default()),
    }
}

/// A read reply as the answer or the leader to ask.
fn read_result(r: ReadReply) -> Result<Vec<u8>, NotLeader> {
    match r.result {
        Some(read_reply::Result::Response(b)) => Ok(b),
        Some(read_reply::Result::NotLeader(nl)) => Err(nl),
        None => Err(Default::default()),
    }
}

/// A gRPC request carrying the client request's trace id, if any.
fn traced<T>(msg: T, trace: &Option<String>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = trace {
        if let Ok(v) = t.parse() {
            req.metadata_mut().insert(crate::metrics::TRACE_HEADER, v);
        }
    }
    req
}

fn decode(raw: &[u8]) -> Result<R, ClusterError> {
    pb::Response::decode(raw)
        .map_err(|e| ClusterError::BadReply(e.to_string()))?
        .r
        .ok_or_else(|| ClusterError::BadReply("empty response".into()))
}

#[cfg(test)]
mod tests {
    //! The router's calls against a stand-in node (a gRPC server on
    //! loopback that answers each command with its own bytes), to check the
    //! `Calls` stream and the fallback to unary calls without a cluster.
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};

    use futures::Stream;
    use natter_proto::cluster::node_server::{Node, NodeServer};
    use natter_proto::cluster::*;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// Echoes proposals (unary and on the stream); `streams: false` plays a
    /// node of a version without `Calls`. Counts unary proposals.
    struct Echo {
        streams: bool,
        unary: Arc<AtomicU64>,
    }

    fn echo(p: ProposeRequest) -> ProposeReply {
        ProposeReply {
            result: Some(propose_reply::Result::Response(p.command)),
            index: 1,
        }
    }

    type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    fn no<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    #[tonic::async_trait]
    impl Node for Echo {
        async fn propose(
            &self,
            r: Request<ProposeRequest>,
        ) -> Result<Response<ProposeReply>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(echo(r.into_inner())))
        }
        async fn read(&self, _: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
            no()
        }
        type CallsStream = Boxed<CallFrameReply>;
        async fn calls(
            &self,
            r: Request<Streaming<CallFrame>>,
        ) -> Result<Response<Self::CallsStream>, Status> {
            if !self.streams {
                return no();
            }
            let mut inbound = r.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(f)) = inbound.message().await {
                    let reply = match f.call {
                        Some(call_frame::Call::Propose(p)) => {
                            Some(call_frame_reply::Reply::Propose(echo(p)))
                        }
                        _ => None,
                    };
                    let r = CallFrameReply {
                        id: f.id,
                        code: 0,
                        message: String::new(),
                        reply,
                    };
                    let _ = tx.send(Ok(r)).await;
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
        async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
            no()
        }
        async fn shard_map(
            &self,
            _: Request<ShardMapRequest>,
        ) -> Result<Response<ShardMap>, Status> {
            no()
        }
        async fn transfer_leader(
            &self,
            _: Request<TransferLeaderRequest>,
        ) -> Result<Response<TransferLeaderReply>, Status> {
            no()
        }
        type WatchStream = Boxed<ChangeEvent>;
        async fn watch(
            &self,
            _: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            no()
        }
        async fn report_presence(
            &self,
            _: Request<ReportPresenceRequest>,
        ) -> Result<Response<ReportPresenceReply>, Status> {
            no()
        }
        async fn get_presence(
            &self,
            _: Request<GetPresenceRequest>,
        ) -> Result<Response<GetPresenceReply>, Status> {
            no()
        }
        async fn typing(&self, _: Request<TypingRequest>) -> Result<Response<TypingReply>, Status> {
            no()
        }
        async fn host_replica(
            &self,
            _: Request<HostReplicaRequest>,
        ) -> Result<Response<HostReplicaReply>, Status> {
            no()
        }
        async fn change_replicas(
            &self,
            _: Request<ChangeReplicasRequest>,
        ) -> Result<Response<ChangeReplicasReply>, Status> {
            no()
        }
        async fn retire(&self, _: Request<RetireRequest>) -> Result<Response<RetireReply>, Status> {
            no()
        }
    }

    async fn node(streams: bool) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let unary = Arc::new(AtomicU64::new(0));
        let svc = NodeServer::new(Echo {
            streams,
            unary: unary.clone(),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (addr, unary)
    }

    async fn propose(c: &Cluster, addr: &str, body: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        match c.attempt(addr, 1, None, body, deadline).await {
            Attempt::Done(b) => b,
            _ => panic!("the proposal to {addr} failed"),
        }
    }

    #[tokio::test]
    async fn proposals_share_one_call_stream() {
        let (addr, unary) = node(true).await;
        let c = Cluster::new(vec![addr.clone()]);
        for body in [&b"one"[..], b"two", b"three"] {
            assert_eq!(propose(&c, &addr, body).await, body);
        }
        assert_eq!(unary.load(Ordering::SeqCst), 0);
        let stream = c.inner.streams.lock().unwrap().get(&addr).cloned().unwrap();
        assert!(stream.is_open());
        assert_eq!(stream.waiting(), 0);
    }

    #[tokio::test]
    async fn a_node_without_call_streams_gets_unary_calls() {
        let (addr, unary) = node(false).await;
        let c = Cluster::new(vec![addr.clone()]);
        // The first proposal finds out (and still succeeds, unary); the
        // next go unary without trying the stream again.
        for (i, body) in [&b"one"[..], b"two", b"three"].into_iter().enumerate() {
            assert_eq!(propose(&c, &addr, body).await, body);
            assert_eq!(unary.load(Ordering::SeqCst), i as u64 + 1);
        }
        let stream = c.inner.streams.lock().unwrap().get(&addr).cloned().unwrap();
        assert!(!stream.is_open(), "no second stream was opened");
    }
}
