//! One nemesis run: hosts, cluster, workload, seeded fault schedule, heal,
//! liveness, final drain, checkers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use natter_model::pb;
use natter_proto::cluster::Consistency;
use natter_tests::natter::Natter;
use natter_tests::router::{RouterProc, NO_LIMITS};
use natter_tests::{Cluster, ClusterOpts, ShardClient};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checker::{self, Results};
use crate::history::{Recorder, Seen, Type, F};
use crate::hosts::{Mode, Net};
use crate::nemesis::{self, Faults, Nemesis};
use crate::proxy::Proxies;
use crate::router_client::RouterClient;
use crate::workload::{self, MessagingClient, NodeApiClient, WorkloadCfg};

/// The history's process number of liveness writes after healing.
pub const LIVENESS_PROCESS: u64 = 2_000_000;
/// The history's process number of final reads.
pub const FINAL_PROCESS: u64 = 3_000_000;

/// How one run is shaped.
#[derive(Clone, Debug)]
pub struct RunCfg {
    pub nemesis: Nemesis,
    pub seed: u64,
    pub time_limit: Duration,
    pub nodes: u64,
    pub shards: u32,
    pub negative_control: bool,
    pub force_loopback: bool,
    /// How long a fault is held (uniform in the range).
    pub fault: (Duration, Duration),
    /// How long the cluster runs healed between faults.
    pub quiet: (Duration, Duration),
    /// Healed time under load before the workload stops.
    pub recovery: Duration,
    pub workload: WorkloadCfg,
    pub out_dir: PathBuf,
    /// Drive the workload through the nodes' data API instead of routers.
    pub node_api: bool,
}

/// Routers the workload goes through (processes alternate between them).
pub const ROUTERS: usize = 2;

/// What one run found.
#[derive(Debug)]
pub struct RunResult {
    pub nemesis: Nemesis,
    pub seed: u64,
    pub negative_control: bool,
    pub seconds: f64,
    pub mode: Mode,
    pub fallback_reason: Option<String>,
    pub faults: usize,
    pub results: Results,
    pub corrupt_started: usize,
    pub liveness: bool,
    pub notes: Vec<String>,
    pub history: PathBuf,
    pub logs: PathBuf,
}

impl RunResult {
    pub fn anomalies(&self) -> usize {
        self.results.anomalies() + self.corrupt_started
    }

    /// A normal run passes with no anomaly and a live cluster; a negative
    /// control passes when the checkers do find anomalies.
    pub fn passed(&self) -> bool {
        if self.negative_control {
            self.anomalies() > 0
        } else {
            self.anomalies() == 0 && self.liveness
        }
    }
}

fn dur_in(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    Duration::from_millis(rng.gen_range(lo.as_millis() as u64..=hi.as_millis() as u64))
}

fn node_args(cfg: &RunCfg) -> Vec<String> {
    // The harness's Raft timings (tuned for loaded test machines).
    let mut a = ClusterOpts::default().node_args;
    a.extend(["--replicas".to_string(), cfg.nodes.to_string()]);
    if cfg.negative_control {
        a.extend(["--sync-mode".to_string(), "unsafe-no-wal".to_string()]);
    }
    a
}

/// Runs one nemesis end to end. Everything it creates is removed when it
/// returns, whether it succeeded or not.
pub async fn run(cfg: &RunCfg) -> Result<RunResult> {
    let started = Instant::now();
    let tag = format!(
        "{}{}-seed{}",
        cfg.nemesis.name(),
        if cfg.negative_control {
            "-negative"
        } else {
            ""
        },
        cfg.seed
    );
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    let history = cfg.out_dir.join(format!("{tag}.jsonl"));
    let logs = cfg.out_dir.join(format!("{tag}-logs"));
    let rec = Recorder::new(Some(&history))?;
    // The membership nemesis needs one spare host for the node that joins.
    let hosts_wanted = cfg.nodes + u64::from(cfg.nemesis == Nemesis::Membership);
    let mut net = tokio::task::block_in_place(|| Net::setup(hosts_wanted, cfg.force_loopback))?;
    let mode = net.mode;
    let fallback_reason = net.fallback_reason.clone();
    tracing::info!(nemesis = cfg.nemesis.name(), seed = cfg.seed, %mode, "run starts");

    let skew_dir = cfg.out_dir.join(format!("{tag}-clock"));
    let mut hosts = net.hosts();
    let spare: Vec<natter_tests::NodeHost> =
        hosts.split_off(&(cfg.nodes + 1)).into_values().collect();
    if cfg.nemesis == Nemesis::ClockSkew {
        crate::hosts::ensure_package(
            &["sh", "-c", "ls /usr/lib/*/faketime/libfaketimeMT.so.1"],
            "faketime",
        )?;
        let lib = nemesis::faketime_lib().context("libfaketime not found after installing")?;
        std::fs::create_dir_all(&skew_dir)?;
        for (id, h) in hosts.iter_mut() {
            let f = nemesis::skew_file(&skew_dir, *id);
            std::fs::write(&f, "+0\n")?;
            h.env = nemesis::faketime_env(&lib, &f);
        }
    }

    // `slow` and `flaky` put a TCP proxy in front of every node: peers and
    // clients reach a node through the address its proxy listens on.
    let proxies = if cfg.nemesis.uses_proxy() {
        let (targets, sources) = net.proxy_plan();
        let p = Proxies::start(targets, sources, cfg.seed).await?;
        for (id, h) in hosts.iter_mut() {
            h.advertise = p.advertise(*id);
        }
        Some(p)
    } else {
        None
    };

    let opts = ClusterOpts {
        nodes: cfg.nodes,
        shards: cfg.shards,
        node_args: node_args(cfg),
    };
    let mut cluster = match tokio::time::timeout(
        Duration::from_secs(120),
        Cluster::start_on(opts, hosts),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e.context("starting the cluster")),
        Err(_) => anyhow::bail!("the cluster did not start within 120 s"),
    };
    let outcome = drive(
        cfg,
        &rec,
        &mut cluster,
        &net,
        proxies.as_ref(),
        spare,
        &logs,
    )
    .await;
    // Keep the node logs next to the history.
    let _ = std::fs::create_dir_all(&logs);
    for n in cluster.nodes.values() {
        if let Some(name) = n.log.file_name() {
            let _ = std::fs::copy(&n.log, logs.join(name));
        }
    }
    drop(cluster);
    net.teardown();
    let _ = std::fs::remove_dir_all(&skew_dir);
    rec.flush();
    let (faults, liveness, corrupt_started, notes) = outcome?;
    let results = checker::check(&rec.events());
    Ok(RunResult {
        nemesis: cfg.nemesis,
        seed: cfg.seed,
        negative_control: cfg.negative_control,
        seconds: started.elapsed().as_secs_f64(),
        mode,
        fallback_reason,
        faults,
        results,
        corrupt_started,
        liveness,
        notes,
        history,
        logs,
    })
}

type Drive = (usize, bool, usize, Vec<String>);

/// Runs the workload through routers (or the node API with `node_api`)
/// under the nemesis, then the liveness and final reads.
async fn drive(
    cfg: &RunCfg,
    rec: &Recorder,
    cluster: &mut Cluster,
    net: &Net,
    proxies: Option<&Proxies>,
    spare: Vec<natter_tests::NodeHost>,
    logs: &Path,
) -> Result<Drive> {
    let natter = Natter::new(ShardClient::new(cluster.addrs()), cluster.shards);
    if cfg.node_api {
        let client = NodeApiClient {
            natter: natter.clone(),
        };
        return drive_with(cfg, rec, cluster, net, proxies, spare, natter, client).await;
    }
    // Routers run outside the nodes' namespaces, like routers on machines
    // of their own.
    let nodes: Vec<String> = cluster.nodes.values().map(|n| n.addr.clone()).collect();
    let mut routers = Vec::new();
    for i in 1..=ROUTERS {
        let r = RouterProc::start(cluster.dir.path(), &format!("router{i}"), &nodes, NO_LIMITS)
            .await
            .with_context(|| format!("starting router {i}"))?;
        routers.push(r);
    }
    let addrs: Vec<String> = routers.iter().map(|r| r.addr.clone()).collect();
    let client = tokio::time::timeout(
        Duration::from_secs(60),
        RouterClient::connect(&addrs, cfg.workload.processes),
    )
    .await
    .context("creating accounts timed out")??;
    let out = drive_with(cfg, rec, cluster, net, proxies, spare, natter, client).await;
    let _ = std::fs::create_dir_all(logs);
    for r in &routers {
        if let Some(name) = r.log.file_name() {
            let _ = std::fs::copy(&r.log, logs.join(name));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn drive_with<C: MessagingClient>(
    cfg: &RunCfg,
    rec: &Recorder,
    cluster: &mut Cluster,
    net: &Net,
    proxies: Option<&Proxies>,
    spare: Vec<natter_tests::NodeHost>,
    natter: Natter,
    client: C,
) -> Result<Drive> {
    let convs = tokio::time::timeout(
        Duration::from_secs(120),
        workload::setup(&client, &cfg.workload),
    )
    .await
    .context("creating conversations timed out")??;
    let convs = Arc::new(convs);
    // Spread shard leadership over the nodes, so faults on any node matter.
    for shard in 1..=cluster.shards {
        let to = (u64::from(shard) - 1) % cluster.nodes.len() as u64 + 1;
        let moved =
            tokio::time::timeout(Duration::from_secs(15), cluster.transfer_leader(shard, to)).await;
        if !matches!(moved, Ok(Ok(()))) {
            tracing::warn!(shard, to, "leadership transfer did not finish; going on");
        }
    }

    // The workload.
    let stop = Arc::new(AtomicBool::new(false));
    let hard_deadline = Instant::now() + cfg.time_limit + cfg.recovery + Duration::from_secs(60);
    let tasks: Vec<_> = (0..cfg.workload.processes)
        .map(|p| {
            tokio::spawn(workload::process(
                p,
                client.clone(),
                rec.clone(),
                convs.clone(),
                cfg.workload.clone(),
                cfg.seed,
                stop.clone(),
                hard_deadline,
            ))
        })
        .collect();

    // The fault schedule, seeded by the seed and the nemesis.
    let mut rng = StdRng::seed_from_u64(
        cfg.seed ^ (cfg.nemesis as u64 + 1).wrapping_mul(0x51_7cc1_b727_220a),
    );
    let frng = StdRng::seed_from_u64(rng.gen());
    let mut faults = Faults::new(cluster, net, rec.clone(), frng, skew_dir_of(cfg));
    faults.proxies = proxies;
    faults.spare = spare;
    let end = Instant::now() + cfg.time_limit;
    let mut fault_err = None;
    loop {
        let quiet = dur_in(&mut rng, cfg.quiet);
        let hold = dur_in(&mut rng, cfg.fault);
        if Instant::now() + quiet + hold > end && faults.injected > 0 {
            break;
        }
        tokio::time::sleep(quiet).await;
        if let Err(e) = faults.fault(cfg.nemesis, hold).await {
            fault_err = Some(e);
            break;
        }
        if let Err(e) = faults.heal().await {
            fault_err = Some(e);
            break;
        }
        if Instant::now() >= end {
            break;
        }
    }
    // Whatever happened, heal everything.
    if let Err(e) = faults.heal().await {
        faults.notes.push(format!("heal failed: {e:#}"));
    }
    if let Some(e) = fault_err {
        faults.notes.push(format!("nemesis error: {e:#}"));
    }
    let (injected, corrupt_started, mut notes) = (
        faults.injected,
        faults.corrupt_started,
        std::mem::take(&mut faults.notes),
    );
    drop(faults);

    tokio::time::sleep(cfg.recovery).await;
    stop.store(true, Ordering::Relaxed);
    let join_limit =
        cfg.workload.op_timeout * (cfg.workload.send_attempts + 1) + Duration::from_secs(10);
    let mut states = Vec::new();
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout(join_limit, t).await {
            Ok(Ok(s)) => states.push(s),
            _ => {
                abort.abort();
                notes.push("a workload process did not stop in time".into());
            }
        }
    }

    // Liveness: every node back, and every conversation takes a write.
    let ready = match cluster.wait_ready(Duration::from_secs(90)).await {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("cluster not ready after healing: {e:#}"));
            false
        }
    };
    let mut live = ready;
    let never = AtomicBool::new(false);
    for (i, conv) in convs.ids.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ok = false;
        let mut attempt = 0;
        while !ok && Instant::now() < deadline && attempt < 30 {
            let cmid = format!("live-{i}-{attempt}");
            let sender = client.user_id(0);
            let m = workload::Outgoing {
                process: LIVENESS_PROCESS,
                sender: &sender,
                conv_no: i as u32,
                conv,
                cmid: &cmid,
            };
            let end =
                workload::record_send(&client, rec, &m, 1, Duration::from_secs(5), &never).await;
            ok = end == workload::SendEnd::Acked;
            if end == workload::SendEnd::Rejected {
                notes.push(format!("conversation {i}: liveness write rejected"));
                break;
            }
            attempt += 1;
            if !ok {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if !ok {
            live = false;
            notes.push(format!("conversation {i} takes no writes after healing"));
        }
    }

    // Final catch-up of every delta-synced view.
    for s in &states {
        for (&conv, &token) in &s.tokens {
            for _ in 0..3 {
                if workload::record_sync(
                    &client,
                    rec,
                    s.process,
                    conv,
                    &convs.ids[conv as usize],
                    token,
                    Duration::from_secs(10),
                )
                .await
                .is_some()
                {
                    break;
                }
            }
        }
    }

    // Replicas converge on the applied index, then every replica is read.
    let converged = converge(cluster, Duration::from_secs(60)).await;
    if !converged {
        notes.push("replicas did not converge on one applied index within 60 s".into());
        live = false;
    }
    let viewer = client.user_id(0);
    let mut final_max: Vec<Option<u64>> = vec![None; convs.ids.len()];
    for (i, conv) in convs.ids.iter().enumerate() {
        let mut done = false;
        for _ in 0..3 {
            let op = rec.invoke(FINAL_PROCESS, F::Final, |e| e.conv = Some(i as u32));
            match tokio::time::timeout(Duration::from_secs(30), client.history(&viewer, conv)).await
            {
                Ok(Ok(msgs)) => {
                    final_max[i] = Some(msgs.iter().map(|(s, _)| *s).max().unwrap_or(0));
                    rec.complete(&op, Type::Ok, |e| e.msgs = Some(msgs));
                    done = true;
                    break;
                }
                Ok(Err(e)) => rec.complete(&op, Type::Fail, |ev| ev.value = Some(format!("{e:#}"))),
                Err(_) => rec.complete(&op, Type::Fail, |ev| ev.value = Some("timeout".into())),
            }
        }
        if !done {
            notes.push(format!("conversation {i}: no final linearizable read"));
        }
        if !converged {
            continue;
        }
        let shard = natter.shard_of_query(&history_query(&viewer, conv, 0));
        for id in cluster.ids() {
            let addr = cluster.node(id).addr.clone();
            let op = rec.invoke(FINAL_PROCESS, F::Final, |e| {
                e.conv = Some(i as u32);
                e.node = Some(id);
            });
            match tokio::time::timeout(
                Duration::from_secs(30),
                replica_history(&addr, shard, &viewer, conv),
            )
            .await
            {
                Ok(Ok((msgs, digest))) => rec.complete(&op, Type::Ok, |e| {
                    e.msgs = Some(msgs);
                    e.value = Some(digest);
                }),
                Ok(Err(e)) => rec.complete(&op, Type::Fail, |ev| ev.value = Some(format!("{e:#}"))),
                Err(_) => rec.complete(&op, Type::Fail, |ev| ev.value = Some("timeout".into())),
            }
        }
    }
    // Feeds: the outbox delivers asynchronously, so wait (bounded) until
    // each user's feed shows every conversation at its final last seq, then
    // record that final feed for the checker.
    for p in 0..cfg.workload.processes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let agrees = match tokio::time::timeout(
                Duration::from_secs(10),
                client.feed(&client.user_id(p), 0),
            )
            .await
            {
                Ok(Ok(f)) => {
                    let rows = convs.number(f.rows);
                    final_max.iter().enumerate().all(|(i, m)| match m {
                        Some(0) | None => true,
                        Some(m) => rows.iter().any(|&(c, _, l)| c as usize == i && l == *m),
                    })
                }
                _ => false,
            };
            if agrees || Instant::now() > deadline {
                workload::record_feed(
                    &client,
                    rec,
                    &convs,
                    p,
                    F::FinalFeed,
                    0,
                    Duration::from_secs(10),
                )
                .await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok((injected, live, corrupt_started, notes))
}

fn skew_dir_of(cfg: &RunCfg) -> PathBuf {
    cfg.out_dir.join(format!(
        "{}{}-seed{}-clock",
        cfg.nemesis.name(),
        if cfg.negative_control {
            "-negative"
        } else {
            ""
        },
        cfg.seed
    ))
}

fn history_query(viewer: &str, conv: &str, before: u64) -> pb::Query {
    pb::Query {
        now_ms: 0,
        q: Some(pb::query::Q::History(pb::History {
            viewer_id: viewer.into(),
            conversation_id: conv.into(),
            before_seq: before,
            limit: 500,
        })),
    }
}

/// A conversation as one replica has it (stale read, no redirects), with a
/// digest of the whole messages (not only ids) for comparing replicas.
async fn replica_history(
    addr: &str,
    shard: u32,
    viewer: &str,
    conv: &str,
) -> Result<(Vec<Seen>, String)> {
    use std::hash::{Hash, Hasher};
    let mut all: Vec<pb::Message> = Vec::new();
    let mut before = 0;
    for _ in 0..10_000 {
        let q = history_query(viewer, conv, before);
        let raw = ShardClient::read_at(addr, shard, &q.encode_to_vec(), Consistency::Stale).await?;
        let page = match natter_tests::natter::decode(&raw)? {
            pb::response::R::History(p) => p,
            pb::response::R::Error(e) if e.code == pb::ErrorCode::NotFound as i32 => break,
            other => anyhow::bail!("history at {addr}: {other:?}"),
        };
        let mut msgs = page.messages;
        msgs.extend(all);
        all = msgs;
        if page.before_seq == 0 {
            break;
        }
        before = page.before_seq;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in &all {
        m.encode_to_vec().hash(&mut h);
    }
    let seen = all.into_iter().map(|m| (m.seq, m.client_msg_id)).collect();
    Ok((seen, format!("{:016x}", h.finish())))
}

/// Waits until every node reports one applied index per group.
async fn converge(cluster: &Cluster, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut applied: BTreeMap<u32, std::collections::BTreeSet<u64>> = BTreeMap::new();
        let mut all_answered = true;
        for id in cluster.ids() {
            match tokio::time::timeout(Duration::from_secs(3), cluster.status(id)).await {
                Ok(Ok(st)) => {
                    for g in st.groups {
                        applied.entry(g.group).or_default().insert(g.applied_index);
                    }
                }
                _ => all_answered = false,
            }
        }
        if all_answered && applied.values().all(|s| s.len() == 1) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
