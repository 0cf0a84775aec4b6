//! The peers: a 3-member etcd cluster (Debian's etcd-server) and 3-node
//! NATS JetStream clusters with an R3 file-backed stream, on loopback,
//! ephemeral ports, temp dirs; and their clients.
//!
//! etcd is spoken to over its own gRPC API (`etcdserverpb.KV/Put`,
//! `Maintenance/Status`) with the handful of message fields used here
//! declared below (field numbers from etcd's `rpc.proto`), on the
//! workspace's tonic: the `etcd-client` crate would need a system `protoc`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use natter_tests::free_port;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::sys::{retry, Proc};

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(int64, tag = "3")]
    pub db_size: i64,
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

async fn unary<Req, Resp>(ch: Channel, path: &'static str, req: Req) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut g = tonic::client::Grpc::new(ch);
    g.ready()
        .await
        .map_err(|e| anyhow!("etcd not ready: {e}"))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let r = g
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(r.into_inner())
}

async fn channel(addr: &str) -> Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?,
    )
}

/// One etcd client: its own connection, its own key.
pub struct EtcdKv {
    ch: Channel,
    key: Vec<u8>,
}

impl EtcdKv {
    pub async fn connect(addr: &str, key: String) -> Result<EtcdKv> {
        Ok(EtcdKv {
            ch: channel(addr).await?,
            key: key.into_bytes(),
        })
    }

    pub async fn put(&self, value: &[u8]) -> Result<()> {
        let _: PutResponse = unary(
            self.ch.clone(),
            "/etcdserverpb.KV/Put",
            PutRequest {
                key: self.key.clone(),
                value: value.to_vec(),
            },
        )
        .await?;
        Ok(())
    }
}

pub struct Etcd {
    pub procs: Vec<Proc>,
    /// Client addresses, the leader's first.
    pub clients: Vec<String>,
    pub version: String,
}

impl Etcd {
    pub async fn start(bin: &Path, dir: &Path) -> Result<Etcd> {
        let clients: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let peers: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let initial = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{i}=http://{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        for i in 0..3 {
            let data = dir.join(format!("etcd{i}"));
            let mut cmd = Command::new(bin);
            cmd.arg(format!("--name=e{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls=http://{}", clients[i]))
                .arg(format!("--advertise-client-urls=http://{}", clients[i]))
                .arg(format!("--listen-peer-urls=http://{}", peers[i]))
                .arg(format!("--initial-advertise-peer-urls=http://{}", peers[i]))
                .arg(format!("--initial-cluster={initial}"))
                .args([
                    "--initial-cluster-state=new",
                    "--initial-cluster-token=natter-bench",
                    "--quota-backend-bytes=8589934592",
                    "--logger=zap",
                    "--log-level=warn",
                ]);
            procs.push(Proc::spawn(
                &format!("etcd{i}"),
                &mut cmd,
                &dir.join(format!("etcd{i}.log")),
            )?);
        }
        let mut e = Etcd {
            procs,
            clients,
            version: String::new(),
        };
        // Ready: every member answers Status and knows the leader.
        let mut leader_addr = None;
        for addr in e.clients.clone() {
            let st: StatusResponse = retry(Duration::from_secs(60), "etcd", || {
                let addr = addr.clone();
                async move {
                    let st: StatusResponse = unary(
                        channel(&addr).await?,
                        "/etcdserverpb.Maintenance/Status",
                        StatusRequest {},
                    )
                    .await?;
                    if st.leader == 0 {
                        bail!("no leader yet");
                    }
                    Ok(st)
                }
            })
            .await
            .with_context(|| {
                for p in e.procs.iter_mut() {
                    if let Err(err) = p.check_running() {
                        return err.to_string();
                    }
                }
                "etcd".into()
            })?;
            e.version = st.version.clone();
            if st.header.as_ref().map(|h| h.member_id) == Some(st.leader) {
                leader_addr = Some(addr.clone());
            }
        }
        if let Some(l) = leader_addr {
            e.clients.retain(|a| *a != l);
            e.clients.insert(0, l);
        }
        // And a write goes through.
        let kv = EtcdKv::connect(&e.clients[0], "ready".into()).await?;
        let kv = &kv;
        retry(Duration::from_secs(30), "etcd put", || kv.put(b"1")).await?;
        Ok(e)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|p| p.pid()).collect()
    }
}

/// One NATS client: its own connection, publishing with JetStream acks.
pub struct NatsPub {
    js: async_nats::jetstream::Context,
    subject: String,
}

impl NatsPub {
    pub async fn connect(addr: &str, subject: String) -> Result<NatsPub> {
        let c = async_nats::connect(addr).await?;
        Ok(NatsPub {
            js: async_nats::jetstream::new(c),
            subject,
        })
    }

    pub async fn publish(&mut self, value: &[u8]) -> Result<()> {
        let ack = self
            .js
            .publish(self.subject.clone(), bytes::Bytes::copy_from_slice(value))
            .await?;
        ack.await?;
        Ok(())
    }
}

pub struct Nats {
    pub procs: Vec<Proc>,
    /// Client addresses, the stream leader's first.
    pub clients: Vec<String>,
}

pub const STREAM: &str = "BENCH";

impl Nats {
    /// Three servers in one cluster and an R3 file stream `BENCH` on
    /// `bench.>`; `sync_always`: `sync_interval: always` (fsync before each
    /// ack), else the server's default (acks before fsync).
    pub async fn start(bin: &Path, dir: &Path, name: &str, sync_always: bool) -> Result<Nats> {
        let clients: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let routes: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut procs = Vec::new();
        for i in 0..3 {
            let store = dir.join(format!("{name}-n{i}"));
            let sync = if sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            };
            let conf = format!(
                "server_name: {name}-n{i}\nlisten: {client}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n\
                 cluster {{\n  name: {name}\n  listen: {route}\n  routes: [{routes}]\n}}\n",
                client = clients[i],
                store = store.display(),
                route = routes[i],
                routes = routes
                    .iter()
                    .map(|r| format!("nats-route://{r}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            let conf_path = dir.join(format!("{name}-n{i}.conf"));
            std::fs::write(&conf_path, conf)?;
            let mut cmd = Command::new(bin);
            cmd.arg("-c").arg(&conf_path);
            procs.push(Proc::spawn(
                &format!("{name}-n{i}"),
                &mut cmd,
                &dir.join(format!("{name}-n{i}.log")),
            )?);
        }
        let mut n = Nats { procs, clients };
        let addr = n.clients[0].clone();
        let leader = retry(Duration::from_secs(60), "nats jetstream", || {
            let addr = addr.clone();
            async move {
                let c = async_nats::connect(&addr).await?;
                let js = async_nats::jetstream::new(c);
                let mut s = js
                    .get_or_create_stream(async_nats::jetstream::stream::Config {
                        name: STREAM.into(),
                        subjects: vec!["bench.>".into()],
                        storage: async_nats::jetstream::stream::StorageType::File,
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await?;
                let info = s.info().await?;
                let leader = info
                    .cluster
                    .as_ref()
                    .and_then(|c| c.leader.clone())
                    .context("stream has no leader yet")?;
                let current = info
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.replicas.len() == 2 && c.replicas.iter().all(|r| r.current));
                if !current {
                    bail!("stream replicas not current yet");
                }
                // A publish is acknowledged.
                js.publish("bench.ready", "1".into()).await?.await?;
                Ok(leader)
            }
        })
        .await;
        let leader = match leader {
            Ok(l) => l,
            Err(e) => {
                for p in n.procs.iter_mut() {
                    p.check_running()?;
                }
                return Err(e);
            }
        };
        if let Some(i) = (0..3).find(|i| leader == format!("{name}-n{i}")) {
            let l = n.clients.remove(i);
            n.clients.insert(0, l);
        }
        Ok(n)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|p| p.pid()).collect()
    }
}
