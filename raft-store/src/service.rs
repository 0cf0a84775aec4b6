//! Incoming Raft RPCs: the gRPC service every node runs for all its groups,
//! as unary calls (`Raft`) and as frames on a peer's long-lived stream
//! (`RaftStream`). Every message is handled on its own task, so a slow group
//! never holds up another. Unknown groups and undecodable payloads get
//! errors (a status, or an error reply frame), never panics.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use natter_proto::cluster::raft_transport_server::RaftTransport;
use natter_proto::cluster::{RaftFrame, RaftFrameReply, RaftKind, RaftReply, RaftRequest};
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status, Streaming};

use crate::RaftHost;

/// Reply frames queued for a stream before its handlers wait for room.
const STREAM_REPLY_QUEUE: usize = 1024;

pub struct TransportService {
    pub(crate) host: Arc<RaftHost>,
}

fn decode<T: DeserializeOwned>(kind: &str, payload: &[u8]) -> Result<T, Status> {
    bincode::deserialize(payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable {kind} payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    bincode::serialize(v).map_err(|e| Status::internal(format!("cannot encode reply: {e}")))
}

/// Hands one Raft message to its group; the encoded openraft result.
async fn handle(host: &RaftHost, req: RaftRequest) -> Result<Vec<u8>, Status> {
    let raft = host.raft(req.group).ok_or_else(|| {
        Status::not_found(format!("group {} is not hosted on this node", req.group))
    })?;
    match RaftKind::try_from(req.kind) {
        Ok(RaftKind::AppendEntries) => encode(
            &raft
                .append_entries(decode("append-entries", &req.payload)?)
                .await,
        ),
        Ok(RaftKind::Vote) => encode(&raft.vote(decode("vote", &req.payload)?).await),
        Ok(RaftKind::InstallSnapshot) => encode(
            &raft
                .install_snapshot(decode("install-snapshot", &req.payload)?)
                .await,
        ),
        Ok(RaftKind::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "unknown raft message kind {}",
            req.kind
        ))),
    }
}

/// Answers one frame of a stream.
async fn handle_frame(host: &RaftHost, frame: RaftFrame) -> RaftFrameReply {
    let id = frame.id;
    let outcome = match frame.request {
        Some(req) => handle(host, req).await,
        None => Err(Status::invalid_argument("raft frame without a request")),
    };
    match outcome {
        Ok(payload) => RaftFrameReply {
            id,
            code: tonic::Code::Ok as i32,
            payload,
            message: String::new(),
        },
        Err(s) => RaftFrameReply {
            id,
            code: s.code() as i32,
            payload: Vec::new(),
            message: s.message().to_string(),
        },
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<RaftFrameReply, Status>> + Send>>;

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn raft(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let payload = handle(&self.host, request.into_inner()).await?;
        Ok(Response::new(RaftReply { payload }))
    }

    type RaftStreamStream = ReplyStream;

    async fn raft_stream(
        &self,
        request: Request<Streaming<RaftFrame>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let host = self.host.clone();
        let replies = natter_proto::mux::serve(
            request.into_inner(),
            STREAM_REPLY_QUEUE,
            None,
            move |frame| {
                let host = host.clone();
                async move { handle_frame(&host, frame).await }
            },
        );
        Ok(Response::new(Box::pin(replies)))
    }
}
