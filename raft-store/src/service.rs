//! Incoming Raft RPCs: the gRPC service every node runs for all its groups.
//! tonic serves each request on its own task, so a slow group never holds up
//! another. Unknown groups and undecodable payloads get errors, never panics.

use std::sync::Arc;

use natter_proto::cluster::raft_transport_server::RaftTransport;
use natter_proto::cluster::{RaftKind, RaftReply, RaftRequest};
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};

use crate::RaftHost;

pub struct TransportService {
    pub(crate) host: Arc<RaftHost>,
}

fn decode<T: DeserializeOwned>(kind: &str, payload: &[u8]) -> Result<T, Status> {
    bincode::deserialize(payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable {kind} payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftReply>, Status> {
    bincode::serialize(v)
        .map(|payload| Response::new(RaftReply { payload }))
        .map_err(|e| Status::internal(format!("cannot encode reply: {e}")))
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn raft(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.host.raft(req.group).ok_or_else(|| {
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
}
