//! Outgoing Raft RPCs. One gRPC channel per peer node, shared by every group
//! and created lazily. Appends and votes travel as frames on one long-lived
//! `RaftStream` per peer (a unary call per message cost an HTTP/2 stream,
//! headers and trailers each time: the largest item in a node's profile);
//! snapshot chunks, and every message to a peer that does not serve the
//! stream, go as unary `Raft` calls.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natter_proto::cluster::raft_transport_client::RaftTransportClient;
use natter_proto::cluster::{RaftFrame, RaftFrameReply, RaftKind, RaftRequest};
use natter_proto::mux::Mux;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::eager::Follower;
use crate::types::{NodeId, TypeConfig};

/// Largest Raft message accepted or sent (an append batch or snapshot chunk).
pub const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;

/// Frames queued for a peer's stream before senders wait for room.
const STREAM_QUEUE: usize = 1024;

/// How long a peer that does not serve `RaftStream` (an older version) is
/// sent unary calls before the stream is tried again.
const UNARY_FALLBACK: Duration = Duration::from_secs(30);

/// The node's connections to its peers.
#[derive(Default)]
pub struct Peers {
    links: Mutex<HashMap<String, Arc<Link>>>,
}

impl Peers {
    /// The link to `addr` ("host:port"), created on first use.
    fn link(&self, addr: &str) -> Result<Arc<Link>, String> {
        let mut map = self
            .links
            .lock()
            .map_err(|_| "peer map poisoned".to_string())?;
        if let Some(l) = map.get(addr) {
            return Ok(l.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let link = Arc::new(Link {
            channel,
            stream: Mutex::new(None),
            unary_until: Mutex::new(None),
        });
        map.insert(addr.to_string(), link.clone());
        Ok(link)
    }

    /// Sends `req` to `addr` on the peer's raft stream (never as a unary
    /// call: a peer without the stream is skipped) and waits for the reply
    /// until `ttl` passes; the encoded reply.
    pub(crate) async fn call_streamed(
        &self,
        addr: &str,
        req: RaftRequest,
        ttl: Duration,
    ) -> Result<Vec<u8>, Status> {
        let link = self.link(addr).map_err(Status::unavailable)?;
        if !link.streaming() {
            return Err(Status::unimplemented(
                "the peer does not serve raft streams",
            ));
        }
        let deadline = tokio::time::Instant::now() + ttl;
        call_on(&*link.stream()?, req, deadline).await
    }
}

/// Everything this node sends to one peer.
struct Link {
    channel: Channel,
    /// The open stream, if any; replaced when it ends.
    stream: Mutex<Option<Arc<FrameStream>>>,
    /// Until then, messages go as unary calls (the peer lacks the stream).
    unary_until: Mutex<Option<Instant>>,
}

impl Link {
    fn client(&self) -> RaftTransportClient<Channel> {
        RaftTransportClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE)
    }

    fn streaming(&self) -> bool {
        self.unary_until
            .lock()
            .is_ok_and(|u| u.is_none_or(|t| Instant::now() >= t))
    }

    fn fall_back_to_unary(&self) {
        if let Ok(mut u) = self.unary_until.lock() {
            *u = Some(Instant::now() + UNARY_FALLBACK);
        }
    }

    /// The open stream to the peer, opening one if there is none.
    fn stream(&self) -> Result<Arc<FrameStream>, Status> {
        let mut cur = self
            .stream
            .lock()
            .map_err(|_| Status::internal("raft stream slot poisoned"))?;
        if let Some(s) = cur.as_ref().filter(|s| s.is_open()) {
            return Ok(s.clone());
        }
        let mut client = self.client();
        let s = Mux::open("raft stream", STREAM_QUEUE, move |frames| {
            Box::new(async move { client.raft_stream(frames).await })
        });
        *cur = Some(s.clone());
        Ok(s)
    }

    /// Sends one message as a unary call; the encoded reply.
    async fn unary(&self, req: RaftRequest, ttl: Duration) -> Result<Vec<u8>, Status> {
        let mut request = tonic::Request::new(req);
        request.set_timeout(ttl);
        Ok(self.client().raft(request).await?.into_inner().payload)
    }

    /// Sends one message, on the stream unless `kind` is a snapshot chunk
    /// or the peer does not serve streams; the encoded reply.
    async fn send(&self, req: RaftRequest, ttl: Duration) -> Result<Vec<u8>, Status> {
        if req.kind == RaftKind::InstallSnapshot as i32 || !self.streaming() {
            return self.unary(req, ttl).await;
        }
        let deadline = tokio::time::Instant::now() + ttl;
        let res = call_on(&*self.stream()?, req, deadline).await;
        if matches!(&res, Err(s) if s.code() == Code::Unimplemented) {
            // openraft resends a failed message (a vote at the next
            // election), and the resend goes unary.
            tracing::info!("peer does not serve raft streams; sending unary calls");
            self.fall_back_to_unary();
        }
        res
    }
}

/// The raft stream to a peer.
type FrameStream = Mux<RaftFrame, RaftFrameReply>;

/// Sends `req` on `stream` and waits for its reply until `deadline`; the
/// encoded openraft result.
async fn call_on(
    stream: &FrameStream,
    req: RaftRequest,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, Status> {
    let frame = RaftFrame {
        id: 0,
        request: Some(req),
    };
    let reply = stream.call(frame, deadline).await?;
    if reply.code == Code::Ok as i32 {
        Ok(reply.payload)
    } else {
        Err(Status::new(Code::from(reply.code), reply.message))
    }
}

/// Creates a group's connections to its peers.
pub struct NetworkFactory {
    pub(crate) group: u32,
    pub(crate) from: NodeId,
    pub(crate) peers: Arc<Peers>,
    /// The group's eager sender, told when openraft's appends are pending.
    pub(crate) eager: Option<Arc<crate::eager::Eager>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Conn {
        Conn {
            group: self.group,
            from: self.from,
            target,
            link: self.peers.link(&node.addr),
            eager: self.eager.as_ref().map(|e| (e.clone(), e.follower(target))),
            replicates: false,
        }
    }
}

/// One group's link to one peer.
pub struct Conn {
    group: u32,
    from: NodeId,
    target: NodeId,
    link: Result<Arc<Link>, String>,
    /// The group's eager sender and the peer's pipeline state, where this
    /// connection counts its unanswered appends (for eager replication).
    eager: Option<(Arc<crate::eager::Eager>, Arc<Follower>)>,
    /// Whether this connection has carried entries: it is a replication
    /// stream's, not one openraft 0.9 opens for a single leadership check
    /// (whose empty appends must always reach the peer).
    replicates: bool,
}

/// Counts an append as unanswered for as long as it lives.
struct Pending(Option<Arc<Follower>>);

impl Pending {
    fn new(follower: Option<&Arc<Follower>>) -> Pending {
        if let Some(f) = follower {
            f.appending.fetch_add(1, Ordering::AcqRel);
        }
        Pending(follower.cloned())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            f.appending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl Conn {
    /// Answers an empty append on a replication connection here when the
    /// follower's last eager answer already says what its answer would
    /// (`Follower::spares`), and sees that its commit index reaches the
    /// follower within [`crate::eager::NOTICE_DELAY`]: with the next eager
    /// request, or sent by itself then.
    fn spare(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        let (Some((sender, follower)), true, Ok(link)) = (&self.eager, self.replicates, &self.link)
        else {
            return false;
        };
        if !follower.spares(rpc, Instant::now()) {
            return false;
        }
        sender.count_spared();
        if follower.defer(rpc.clone()) {
            let (follower, link, group, from) =
                (follower.clone(), link.clone(), self.group, self.from);
            tokio::spawn(async move {
                tokio::time::sleep(crate::eager::NOTICE_DELAY).await;
                let Some(notice) = follower.due() else {
                    return;
                };
                let Ok(payload) = bincode::serialize(&notice) else {
                    follower.doubt();
                    return;
                };
                let request = RaftRequest {
                    group,
                    kind: RaftKind::AppendEntries as i32,
                    payload,
                    from,
                };
                let answered = link.send(request, crate::eager::NOTICE_RECENT).await;
                if !crate::eager::is_success(&answered) {
                    follower.doubt();
                }
            });
        }
        true
    }

    async fn call<Req, Resp, E>(
        &mut self,
        kind: RaftKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let link = match &self.link {
            Ok(l) => l,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let payload =
            bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            group: self.group,
            kind: kind as i32,
            payload,
            from: self.from,
        };
        let reply = link
            .send(request, option.hard_ttl())
            .await
            .map_err(|s| match s.code() {
                Code::Unavailable | Code::NotFound => RPCError::Unreachable(Unreachable::new(&s)),
                _ => RPCError::Network(NetworkError::new(&s)),
            })?;
        let res: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        if rpc.entries.is_empty() {
            if self.spare(&rpc) {
                return Ok(AppendEntriesResponse::Success);
            }
        } else {
            self.replicates = true;
        }
        // Heartbeats and commit updates (no entries) cost a follower no
        // fsync: only appends with entries make its pipeline busy.
        let eager = self.eager.as_ref().filter(|_| !rpc.entries.is_empty());
        let _pending = Pending::new(eager.map(|(_, f)| f));
        // These entries may have gone to the peer already, eagerly: its
        // answer to that request answers this one (`Follower::covering`).
        // Anything but `Success` in half the time, and the request goes.
        if let Some((sender, follower)) = eager {
            if let Some(answer) = follower.covering(&rpc) {
                if crate::eager::succeeded(answer, option.hard_ttl() / 2).await {
                    sender.count_answered();
                    return Ok(AppendEntriesResponse::Success);
                }
            }
        }
        self.call(RaftKind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RaftKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RaftKind::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    //! The link against a stand-in peer (a gRPC server on loopback that
    //! echoes payloads), to check the stream's plumbing without Raft.
    use std::pin::Pin;
    use std::sync::atomic::AtomicU64;

    use futures::Stream;
    use natter_proto::cluster::raft_transport_server::{RaftTransport, RaftTransportServer};
    use natter_proto::cluster::RaftReply;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tonic::{Request, Response, Streaming};

    use super::*;

    /// Echoes each payload (unary and streamed); `streams: false` plays a
    /// peer of a version without `RaftStream`. Counts unary calls.
    struct Echo {
        streams: bool,
        unary_calls: Arc<AtomicU64>,
    }

    type Replies = Pin<Box<dyn Stream<Item = Result<RaftFrameReply, Status>> + Send>>;

    #[tonic::async_trait]
    impl RaftTransport for Echo {
        async fn raft(
            &self,
            r: Request<RaftRequest>,
        ) -> Result<tonic::Response<RaftReply>, Status> {
            self.unary_calls.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(RaftReply {
                payload: r.into_inner().payload,
            }))
        }

        type RaftStreamStream = Replies;

        async fn raft_stream(
            &self,
            r: Request<Streaming<RaftFrame>>,
        ) -> Result<Response<Replies>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("no streams here"));
            }
            let mut inbound = r.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(f)) = inbound.message().await {
                    let payload = f.request.map(|r| r.payload).unwrap_or_default();
                    // Payload "bye" ends the stream without a reply.
                    if payload == b"bye" {
                        return;
                    }
                    let reply = RaftFrameReply {
                        id: f.id,
                        code: 0,
                        payload,
                        message: String::new(),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    async fn peer(streams: bool) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let unary_calls = Arc::new(AtomicU64::new(0));
        let echo = Echo {
            streams,
            unary_calls: unary_calls.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(echo))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (addr, unary_calls)
    }

    fn msg(kind: RaftKind, payload: &[u8]) -> RaftRequest {
        RaftRequest {
            group: 1,
            kind: kind as i32,
            payload: payload.to_vec(),
            from: 1,
        }
    }

    const TTL: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn appends_and_votes_share_one_stream_and_snapshots_go_unary() {
        let (addr, unary_calls) = peer(true).await;
        let link = Peers::default().link(&addr).unwrap();
        // Concurrent calls on one stream each get their own reply.
        let calls = (0..50u8).map(|i| {
            let link = link.clone();
            async move {
                let kind = if i % 2 == 0 {
                    RaftKind::AppendEntries
                } else {
                    RaftKind::Vote
                };
                (i, link.send(msg(kind, &[i; 3]), TTL).await.unwrap())
            }
        });
        for (i, reply) in futures::future::join_all(calls).await {
            assert_eq!(reply, vec![i; 3]);
        }
        assert_eq!(unary_calls.load(Ordering::SeqCst), 0);
        let first = link.stream().unwrap();
        let reply = link
            .send(msg(RaftKind::InstallSnapshot, b"chunk"), TTL)
            .await
            .unwrap();
        assert_eq!(reply, b"chunk");
        assert_eq!(unary_calls.load(Ordering::SeqCst), 1);
        assert!(Arc::ptr_eq(&first, &link.stream().unwrap()));
    }

    #[tokio::test]
    async fn a_stream_that_ends_fails_its_waiters_and_the_next_call_opens_another() {
        let (addr, _) = peer(true).await;
        let link = Peers::default().link(&addr).unwrap();
        assert_eq!(
            link.send(msg(RaftKind::Vote, b"hi"), TTL).await.unwrap(),
            b"hi"
        );
        let first = link.stream().unwrap();
        let e = link
            .send(msg(RaftKind::Vote, b"bye"), TTL)
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::DeadlineExceeded, "{e}");
        assert!(!first.is_open());
        assert_eq!(first.waiting(), 0);
        assert_eq!(
            link.send(msg(RaftKind::Vote, b"again"), TTL).await.unwrap(),
            b"again"
        );
        assert!(!Arc::ptr_eq(&first, &link.stream().unwrap()));
    }

    #[tokio::test]
    async fn a_peer_without_streams_gets_unary_calls_after_the_first_failure() {
        let (addr, unary_calls) = peer(false).await;
        let link = Peers::default().link(&addr).unwrap();
        let e = link
            .send(msg(RaftKind::AppendEntries, b"a"), TTL)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e}");
        for p in [b"b", b"c"] {
            let reply = link
                .send(msg(RaftKind::AppendEntries, p), TTL)
                .await
                .unwrap();
            assert_eq!(reply, p);
        }
        assert_eq!(unary_calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_call_without_a_reply_times_out_and_forgets_its_waiter() {
        let (addr, _) = peer(true).await;
        let link = Peers::default().link(&addr).unwrap();
        let s = link.stream().unwrap();
        // A deadline already past: the frame goes out, but its reply is
        // not waited for.
        let e = call_on(&s, msg(RaftKind::Vote, b"x"), tokio::time::Instant::now())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
        assert_eq!(s.waiting(), 0);
    }
}
