//! The node's data API (`natter.cluster.Node`): propose to a shard, read from
//! a shard, status, shard map. Routers, tools and tests use it.
//!
//! Proposals to data shards are stamped here, on the leader, with the time
//! the state machine will use (apply itself never reads a clock).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use natter_model::pb;
use natter_proto::cluster::node_server::Node;
use natter_proto::cluster::{
    call_frame, call_frame_reply, propose_reply, read_reply, CallFrame, CallFrameReply,
    ChangeEvent, ChangeReplicasReply, ChangeReplicasRequest, Consistency as PbConsistency,
    GroupStatus as PbGroupStatus, HostReplicaReply, HostReplicaRequest, MetaResponse, NotLeader,
    ProposeReply, ProposeRequest, ReadReply, ReadRequest, RetireReply, RetireRequest, ShardMap,
    ShardMapRequest, StatusReply, StatusRequest, TransferLeaderReply, TransferLeaderRequest,
    WatchRequest,
};
use natter_proto::cluster::{
    GetPresenceReply, GetPresenceRequest, ReportPresenceReply, ReportPresenceRequest, TypingReply,
    TypingRequest,
};
use natter_raft_store::{Consistency, Error, RaftHost};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::events::Events;
use crate::META_GROUP;

/// Largest command or query a client may send (the model's own limits are
/// far below this; this bounds what is decoded at all).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct NodeApi {
    pub host: Arc<RaftHost>,
    pub region: String,
    pub events: Events,
    pub presence: Arc<crate::presence::Presence>,
    pub stamper: Stamper,
}

/// What a shard's leader writes into a model command as it proposes it:
/// its clock, and for `ApplyFeedUpdates` which of the users are online (its
/// presence leases) and whether it delivers notifications at all. Facts of
/// the leader's moment, so the state machine reads them from the log and
/// every replica applies the same thing.
#[derive(Clone)]
pub struct Stamper {
    pub presence: Arc<crate::presence::Presence>,
    /// A webhook is configured (`--webhook-url`).
    pub notifications: bool,
}

impl Stamper {
    /// The command stamped for `shard` at `now_ms`.
    pub fn command(&self, shard: u32, command: &[u8], now_ms: u64) -> Result<Vec<u8>, Status> {
        let mut cmd = pb::Command::decode(command)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        cmd.stamp = Some(pb::Stamp { now_ms });
        if let Some(pb::command::Op::ApplyFeedUpdates(a)) = cmd.op.as_mut() {
            a.notifications_off = !self.notifications;
            a.online_user_ids = if self.notifications {
                let users: std::collections::BTreeSet<&str> =
                    a.updates.iter().map(|u| u.user_id.as_str()).collect();
                users
                    .into_iter()
                    .filter(|u| self.presence.is_online(shard, u))
                    .map(str::to_string)
                    .collect()
            } else {
                Vec::new()
            };
        }
        Ok(cmd.encode_to_vec())
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The gRPC metadata key of a client request's trace id, set by routers.
pub const TRACE_HEADER: &str = "x-natter-trace";

/// The tracing span of an incoming RPC: carries the router's trace id
/// (`x-natter-trace`) so this node's logs of a request can be found from the
/// router's; no span for RPCs without one (Raft traffic).
pub fn trace_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    match req
        .headers()
        .get(TRACE_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(t) => rpc_span(t, req.uri().path()),
        None => tracing::Span::none(),
    }
}

/// The span of one request with trace id `trace` (at most 64 characters
/// of it) to `path`.
fn rpc_span(trace: &str, path: &str) -> tracing::Span {
    let t: String = trace.chars().take(64).collect();
    let span = tracing::info_span!("rpc", trace = %t, path = %path);
    tracing::debug!(parent: &span, "request");
    span
}

/// Puts this node's clock into a model query (used only to hide messages
/// that expired but are not yet purged).
pub fn stamp_query(query: &[u8], now_ms: u64) -> Result<Vec<u8>, Status> {
    let mut q = pb::Query::decode(query)
        .map_err(|e| Status::invalid_argument(format!("undecodable query: {e}")))?;
    q.now_ms = now_ms;
    Ok(q.encode_to_vec())
}

/// Maps a storage-layer error to a reply (NotLeader) or a gRPC status.
fn classify(e: Error) -> Result<NotLeader, Status> {
    match e {
        Error::NotLeader { leader, .. } => {
            let (leader_id, leader_addr) = leader.unwrap_or((0, String::new()));
            Ok(NotLeader {
                leader_id,
                leader_addr,
            })
        }
        Error::UnknownGroup(g) => Err(Status::not_found(format!(
            "shard {g} is not hosted on this node"
        ))),
        Error::Raft(m) => Err(Status::unavailable(m)),
        other => Err(Status::internal(other.to_string())),
    }
}

fn consistency(c: i32) -> Result<Consistency, Status> {
    match PbConsistency::try_from(c) {
        Ok(PbConsistency::Linearizable) => Ok(Consistency::Linearizable),
        Ok(PbConsistency::Stale) => Ok(Consistency::Stale),
        Err(_) => Err(Status::invalid_argument(format!("unknown consistency {c}"))),
    }
}

/// Replies of one `Calls` stream queued for the caller.
const CALL_REPLY_QUEUE: usize = 1024;

/// Calls of one `Calls` stream handled at once.
const MAX_CALLS_IN_FLIGHT: usize = 4096;

impl NodeApi {
    /// `Propose`: stamps a data shard's command with this leader's clock,
    /// proposes it and waits until it is applied.
    async fn propose_call(&self, req: ProposeRequest) -> Result<ProposeReply, Status> {
        let command = if req.shard == META_GROUP {
            req.command
        } else {
            self.stamper.command(req.shard, &req.command, now_ms())?
        };
        Ok(match self.host.propose(req.shard, command.clone()).await {
            Ok(p) => {
                if req.shard != META_GROUP {
                    self.events
                        .publish(req.shard, p.index, &command, &p.response);
                }
                ProposeReply {
                    result: Some(propose_reply::Result::Response(p.response)),
                    index: p.index,
                }
            }
            Err(e) => ProposeReply {
                result: Some(propose_reply::Result::NotLeader(classify(e)?)),
                index: 0,
            },
        })
    }

    /// `Read`: a query of a shard at the asked consistency.
    async fn read_call(&self, req: ReadRequest) -> Result<ReadReply, Status> {
        let query = if req.shard == META_GROUP {
            req.query
        } else {
            stamp_query(&req.query, now_ms())?
        };
        Ok(
            match self
                .host
                .read(req.shard, &query, consistency(req.consistency)?)
                .await
            {
                Ok((r, applied)) => ReadReply {
                    result: Some(read_reply::Result::Response(r)),
                    applied_index: applied,
                },
                Err(e) => ReadReply {
                    result: Some(read_reply::Result::NotLeader(classify(e)?)),
                    applied_index: 0,
                },
            },
        )
    }

    /// One call of a `Calls` stream, answered as its unary twin would be.
    async fn call_frame(&self, frame: CallFrame) -> CallFrameReply {
        let span = frame_span(&frame.trace);
        let answer = async {
            match frame.call {
                Some(call_frame::Call::Propose(p)) => self
                    .propose_call(p)
                    .await
                    .map(call_frame_reply::Reply::Propose),
                Some(call_frame::Call::Read(r)) => {
                    self.read_call(r).await.map(call_frame_reply::Reply::Read)
                }
                None => Err(Status::invalid_argument("a call frame without a call")),
            }
        }
        .instrument(span)
        .await;
        match answer {
            Ok(reply) => CallFrameReply {
                id: frame.id,
                code: tonic::Code::Ok as i32,
                message: String::new(),
                reply: Some(reply),
            },
            Err(s) => CallFrameReply {
                id: frame.id,
                code: s.code() as i32,
                message: s.message().to_string(),
                reply: None,
            },
        }
    }
}

/// The tracing span of one call on a `Calls` stream (see [`trace_span`]).
fn frame_span(trace: &str) -> tracing::Span {
    if trace.is_empty() {
        return tracing::Span::none();
    }
    rpc_span(trace, "/natter.cluster.Node/Calls")
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        self.propose_call(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        self.read_call(request.into_inner())
            .await
            .map(Response::new)
    }

    type CallsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<CallFrameReply, Status>> + Send>>;

    async fn calls(
        &self,
        request: Request<Streaming<CallFrame>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        let api = Arc::new(self.clone());
        let replies = natter_proto::mux::serve(
            request.into_inner(),
            CALL_REPLY_QUEUE,
            Some(MAX_CALLS_IN_FLIGHT),
            move |frame| {
                let api = api.clone();
                async move { api.call_frame(frame).await }
            },
        );
        Ok(Response::new(Box::pin(replies)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let groups = self
            .host
            .status()
            .into_iter()
            .map(|g| PbGroupStatus {
                group: g.group,
                state: g.state,
                term: g.term,
                leader_id: g.leader.unwrap_or(0),
                last_log_index: g.last_log_index,
                committed_index: g.committed_index,
                applied_index: g.applied_index,
                snapshot_index: g.snapshot_index,
                purged_index: g.purged_index,
                voters: g.voters,
                learners: g.learners,
                eager_appends: g.eager_appends,
                eager_answered: g.eager_answered,
                notices_spared: g.notices_spared,
            })
            .collect();
        let (wal_fsyncs, wal_appends, _) = self.host.sync_stats();
        Ok(Response::new(StatusReply {
            node_id: self.host.node_id(),
            addr: self.host.addr().to_string(),
            region: self.region.clone(),
            groups,
            wal_fsyncs,
            wal_appends,
        }))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ChangeEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let rx = self.events.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let item = match rx.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => ChangeEvent {
                    lagged: true,
                    ..Default::default()
                },
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(item), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_presence(
        &self,
        request: Request<ReportPresenceRequest>,
    ) -> Result<Response<ReportPresenceReply>, Status> {
        let r = request.into_inner();
        let reply = match self
            .presence
            .report(r.shard, &r.router_id, &r.online, &r.offline)
        {
            Ok(lease) => ReportPresenceReply {
                not_leader: None,
                lease_ms: lease.as_millis() as u64,
            },
            Err(nl) => ReportPresenceReply {
                not_leader: Some(nl),
                lease_ms: 0,
            },
        };
        Ok(Response::new(reply))
    }

    async fn get_presence(
        &self,
        request: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceReply>, Status> {
        let r = request.into_inner();
        let reply = match self.presence.get(r.shard, &r.user_ids).await? {
            Ok(users) => GetPresenceReply {
                not_leader: None,
                users,
            },
            Err(nl) => GetPresenceReply {
                not_leader: Some(nl),
                users: Vec::new(),
            },
        };
        Ok(Response::new(reply))
    }

    async fn typing(
        &self,
        request: Request<TypingRequest>,
    ) -> Result<Response<TypingReply>, Status> {
        let r = request.into_inner();
        let t = r
            .typing
            .ok_or_else(|| Status::invalid_argument("typing is required"))?;
        if !natter_model::is_canonical_uuid(&t.conversation_id)
            || !natter_model::is_canonical_uuid(&t.user_id)
        {
            return Err(Status::invalid_argument("ids must be canonical uuids"));
        }
        let not_leader = self.presence.typing(r.shard, t).err();
        Ok(Response::new(TypingReply { not_leader }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderReply>, Status> {
        let req = request.into_inner();
        let unknown = |e: Error| match e {
            Error::UnknownGroup(g) => {
                Status::not_found(format!("shard {g} is not hosted on this node"))
            }
            other => Status::unavailable(other.to_string()),
        };
        let me = self.host.node_id();
        if req.to == me || req.to == 0 {
            self.host.campaign(req.shard).await.map_err(unknown)?;
            return Ok(Response::new(TransferLeaderReply {}));
        }
        if !self.host.is_leader(req.shard) {
            return Err(Status::failed_precondition(format!(
                "node {me} does not lead shard {}; send the transfer to its leader",
                req.shard
            )));
        }
        let addr = self.host.member_addr(req.shard, req.to).ok_or_else(|| {
            Status::invalid_argument(format!(
                "node {} is not a member of shard {}",
                req.to, req.shard
            ))
        })?;
        transfer(&self.host, req.shard, req.to, &addr)
            .await
            .map(|_| Response::new(TransferLeaderReply {}))
    }

    async fn host_replica(
        &self,
        request: Request<HostReplicaRequest>,
    ) -> Result<Response<HostReplicaReply>, Status> {
        let req = request.into_inner();
        crate::membership::host_replica(&self.host, req.shard, req.host)
            .await
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        Ok(Response::new(HostReplicaReply {}))
    }

    async fn change_replicas(
        &self,
        request: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasReply>, Status> {
        let req = request.into_inner();
        let err = |e: Error| match classify(e) {
            Ok(nl) => Status::failed_precondition(format!(
                "not the leader of shard {}; leader is node {}",
                req.shard, nl.leader_id
            )),
            Err(s) => s,
        };
        if !self.host.is_leader(req.shard) {
            return Err(Status::failed_precondition(format!(
                "node {} does not lead shard {}",
                self.host.node_id(),
                req.shard
            )));
        }
        if req.add_learner != 0 {
            if req.learner_addr.is_empty() || req.learner_addr.len() > crate::meta::MAX_LABEL {
                return Err(Status::invalid_argument("a learner needs an address"));
            }
            self.host
                .add_learner(req.shard, req.add_learner, &req.learner_addr)
                .await
                .map_err(err)?;
        }
        if !req.voters.is_empty() {
            let voters: std::collections::BTreeSet<u64> = req.voters.iter().copied().collect();
            if voters.len() != req.voters.len() || voters.contains(&0) {
                return Err(Status::invalid_argument("voters must be distinct node ids"));
            }
            self.host
                .change_voters(req.shard, voters)
                .await
                .map_err(err)?;
        }
        if !req.remove_learners.is_empty() {
            self.host
                .remove_learners(req.shard, req.remove_learners.iter().copied().collect())
                .await
                .map_err(err)?;
        }
        let g = self
            .host
            .status()
            .into_iter()
            .find(|g| g.group == req.shard)
            .unwrap_or_default();
        Ok(Response::new(ChangeReplicasReply {
            voters: g.voters,
            learners: g.learners,
        }))
    }

    async fn retire(
        &self,
        request: Request<RetireRequest>,
    ) -> Result<Response<RetireReply>, Status> {
        let req = request.into_inner();
        if req.node_id != self.host.node_id() {
            return Err(Status::invalid_argument(format!(
                "this is node {}, not node {}",
                self.host.node_id(),
                req.node_id
            )));
        }
        self.host
            .retire()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RetireReply {}))
    }

    async fn shard_map(
        &self,
        request: Request<ShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        let c = consistency(request.into_inner().consistency)?;
        match self.host.read(META_GROUP, &[], c).await {
            Ok((raw, _)) => {
                let r = MetaResponse::decode(raw.as_slice())
                    .map_err(|e| Status::internal(e.to_string()))?;
                r.map
                    .map(Response::new)
                    .ok_or_else(|| Status::unavailable("the cluster is not initialized yet"))
            }
            Err(e) => {
                let nl = classify(e)?;
                Err(Status::failed_precondition(format!(
                    "not the meta leader; leader is node {} at {}",
                    nl.leader_id, nl.leader_addr
                )))
            }
        }
    }
}

/// Hands this leader's `group` to `to` (a member at `addr`): refuses writes
/// meanwhile, and always resumes taking part in elections afterwards — also
/// when the future is dropped midway (a `TransferLeader` caller whose
/// deadline passed cancels the handler): a node left with its elections
/// paused could never win back a group whose hand-off failed.
pub(crate) async fn transfer(
    host: &RaftHost,
    group: u32,
    to: u64,
    addr: &str,
) -> Result<(), Status> {
    host.set_handing_off(group, Some((to, addr.to_string())))
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let _resume = HandOffGuard { host, group };
    hand_off(host, group, to, addr).await
}

/// Ends a hand-off when dropped, however the hand-off ended.
struct HandOffGuard<'a> {
    host: &'a RaftHost,
    group: u32,
}

impl Drop for HandOffGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.host.set_handing_off(self.group, None) {
            tracing::error!(group = self.group, "ending a leader hand-off: {e}");
        }
    }
}

/// Hands `shard` to `to` (writes are already refused): first waits until
/// `to` holds the whole log — replication must finish while heartbeats still
/// run, since a lost append is only resent by a heartbeat or a new write —
/// then pauses this leader's heartbeats and asks `to` to campaign until it
/// wins (this node's lease must run out first). A few election timeouts at
/// most. A write accepted just before the hand-off began may still be
/// appended after the first check; `to` is only asked to campaign while it
/// holds everything, since a voter with a longer log refuses its vote. If
/// it campaigns anyway (a write raced the check), this node steps down to
/// its higher term and then takes part in elections again at once, winning
/// the group back rather than leaving it leaderless.
async fn hand_off(host: &RaftHost, shard: u32, to: u64, addr: &str) -> Result<(), Status> {
    use std::time::{Duration, Instant};
    let caught_up_by = Instant::now() + Duration::from_secs(10);
    while !host.caught_up(shard, to) {
        if Instant::now() > caught_up_by {
            return Err(Status::deadline_exceeded(format!(
                "node {to} did not catch up on shard {shard}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.pause_leadership(shard, true)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut target = natter_proto::cluster::node_client::NodeClient::new(ch);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut stepped_down = false;
    while Instant::now() < deadline {
        if host.leader(shard).map(|(id, _)| id) == Some(to) {
            return Ok(());
        }
        let leading = host.is_leader(shard);
        if stepped_down && leading {
            // Won it back: `to` could not get the votes.
            break;
        }
        if !leading && !stepped_down {
            // Stepped down for a higher term — `to`'s campaign, which wins
            // unless its log is behind ours (a write appended after the
            // check above). Take part in elections again at once, so that
            // in that case this node wins the group back instead of leaving
            // it leaderless until the deadline.
            stepped_down = true;
            host.pause_leadership(shard, false)
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        let ready = leading && host.caught_up(shard, to);
        if ready {
            let _ = target
                .transfer_leader(TransferLeaderRequest { shard, to })
                .await;
        }
        let pause = if ready { 250 } else { 20 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Err(Status::deadline_exceeded(format!(
        "node {to} did not take over shard {shard}"
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use natter_raft_store::{HostConfig, RaftTimings, SyncMode};

    use super::*;

    /// Whether the host refuses proposals for `group` as one handing off.
    async fn refuses_as_handing_off(host: &RaftHost, group: u32) -> bool {
        matches!(
            host.propose(group, b"probe".to_vec()).await,
            Err(Error::NotLeader { .. })
        )
    }

    /// A `TransferLeader` caller whose deadline passes makes tonic drop the
    /// handler's future midway; the hand-off must still end (writes accepted
    /// again, elections resumed), or the node stays out of elections for
    /// good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_hand_off_still_ends() {
        let dir = tempfile::tempdir().unwrap();
        let host = RaftHost::open(HostConfig {
            node_id: 1,
            addr: "127.0.0.1:1".into(),
            data_dir: dir.path().to_path_buf(),
            timings: RaftTimings::default(),
            sync_mode: SyncMode::GroupCommit,
            eager_replication: true,
            verify_on_open: false,
        })
        .unwrap();
        host.start_group(7, Arc::new(natter_model::Model))
            .await
            .unwrap();
        host.initialize(7, &BTreeMap::from([(1, "127.0.0.1:1".to_string())]))
            .await
            .unwrap();
        while !host.is_leader(7) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!refuses_as_handing_off(&host, 7).await);
        // Node 2 is no member, so the hand-off waits for it to catch up
        // (up to 10 s) while refusing writes.
        let h = host.clone();
        let task = tokio::spawn(async move { transfer(&h, 7, 2, "127.0.0.1:1").await });
        let mut waited = 0;
        while !refuses_as_handing_off(&host, 7).await {
            waited += 1;
            assert!(waited < 500, "the hand-off never began");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(
            !refuses_as_handing_off(&host, 7).await,
            "still handing off after the hand-off was dropped"
        );
        host.shutdown().await;
    }
}
