//! Proposing to any shard of the cluster from inside a node: locally when
//! this node leads it, otherwise through the leader's data API, following
//! NotLeader answers. Used by the outbox worker for cross-shard fan-out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use natter_proto::cluster::node_client::NodeClient;
use natter_proto::cluster::{propose_reply, MetaResponse, ProposeRequest, ShardMap};
use natter_raft_store::{Consistency, Error, RaftHost};
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use crate::api::{now_ms, Stamper};
use crate::events::Events;
use crate::META_GROUP;

pub struct Remote {
    host: Arc<RaftHost>,
    events: Events,
    stamper: Stamper,
    clients: Mutex<HashMap<String, NodeClient<Channel>>>,
    leaders: Mutex<HashMap<u32, String>>,
}

impl Remote {
    pub fn new(host: Arc<RaftHost>, events: Events, stamper: Stamper) -> Self {
        Remote {
            host,
            events,
            stamper,
            clients: Default::default(),
            leaders: Default::default(),
        }
    }

    /// The layout as this node's meta replica has it.
    pub async fn shard_map(&self) -> Result<ShardMap> {
        let (raw, _) = self.host.read(META_GROUP, &[], Consistency::Stale).await?;
        MetaResponse::decode(raw.as_slice())?
            .map
            .ok_or_else(|| anyhow!("cluster layout not recorded yet"))
    }

    fn client(&self, addr: &str) -> Result<NodeClient<Channel>> {
        let mut m = self.clients.lock().map_err(|_| anyhow!("poisoned"))?;
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect_lazy();
        let c = NodeClient::new(ch);
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Proposes a model command to `shard` and returns the response.
    pub async fn propose(&self, shard: u32, command: &[u8]) -> Result<Vec<u8>> {
        if self.host.is_leader(shard) {
            let stamped = self.stamper.command(shard, command, now_ms())?;
            match self.host.propose(shard, stamped.clone()).await {
                Ok(p) => {
                    self.events.publish(shard, p.index, &stamped, &p.response);
                    return Ok(p.response);
                }
                Err(Error::NotLeader { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let map = self.shard_map().await?;
        let replicas = map
            .shards
            .iter()
            .find(|s| s.shard == shard)
            .map(|s| s.replicas.clone())
            .unwrap_or_default();
        let mut addrs: Vec<String> = Vec::new();
        if let Some(a) = self
            .leaders
            .lock()
            .ok()
            .and_then(|l| l.get(&shard).cloned())
        {
            addrs.push(a);
        }
        for id in replicas {
            if let Some(n) = map.nodes.iter().find(|n| n.id == id) {
                if !addrs.contains(&n.addr) {
                    addrs.push(n.addr.clone());
                }
            }
        }
        // Built only on failure: with RUST_BACKTRACE set, every anyhow error
        // captures a backtrace, which cost ~0.5 % of a leader's CPU when
        // this was built up front for every forwarded proposal.
        let mut last = None;
        for addr in addrs {
            let mut c = self.client(&addr)?;
            match c
                .propose(ProposeRequest {
                    shard,
                    command: command.to_vec(),
                })
                .await
            {
                Ok(r) => match r.into_inner().result {
                    Some(propose_reply::Result::Response(resp)) => {
                        if let Ok(mut l) = self.leaders.lock() {
                            l.insert(shard, addr);
                        }
                        return Ok(resp);
                    }
                    Some(propose_reply::Result::NotLeader(nl)) => {
                        last = Some(format!(
                            "node at {addr} is not the leader of shard {shard} (leader {})",
                            nl.leader_id
                        ));
                        if !nl.leader_addr.is_empty() {
                            if let Ok(mut l) = self.leaders.lock() {
                                l.insert(shard, nl.leader_addr);
                            }
                        }
                    }
                    None => bail!("empty propose reply from {addr}"),
                },
                Err(s) => last = Some(format!("{addr}: {s}")),
            }
        }
        Err(anyhow!(
            "{}",
            last.unwrap_or_else(|| format!("shard {shard} has no known replicas"))
        ))
    }
}
