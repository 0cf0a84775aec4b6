//! Nemeses: faults injected into a running cluster on a seeded schedule, and
//! healed. Every injection and heal is recorded in the history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use natter_tests::Cluster;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::history::{Recorder, Type, F};
use crate::hosts::Net;
use crate::proxy::{LinkFault, Proxies, Source};

/// The history's process number for the nemesis.
pub const NEMESIS_PROCESS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Nemesis {
    /// Random minority vs majority network partition.
    Partition,
    /// The leader of a random data shard cut off from every other node.
    PartitionLeader,
    /// Two sides that can't talk, both talking to one bridge node.
    PartitionBridge,
    /// kill -9 of a random minority, restarted at heal.
    Kill,
    /// kill -9 of data shard leaders (at most a minority), restarted at heal.
    KillLeaders,
    /// SIGSTOP of a random minority, SIGCONT at heal.
    Pause,
    /// SIGSTOP of a minority, then SIGKILL while paused; restarted at heal.
    PauseKill,
    /// A minority's (always including a leader's) wall clock jumps by
    /// ±30..300 s (libfaketime), reset at heal.
    ClockSkew,
    /// With a node stopped, truncate or bit-flip one of its RocksDB files:
    /// it must refuse to start; restored from a copy at heal.
    Corrupt,
    /// kill -9 of every node at once, restarted at heal.
    KillAll,
    /// Membership change under load: a fresh node joins (on a spare host)
    /// and takes its share of replicas, then a random old node is drained,
    /// removed and stopped; its host becomes the next spare.
    Membership,
    /// Every node behind a TCP proxy (no netem here); random links get
    /// 5..200 ms of latency with jitter, order kept.
    Slow,
    /// Every node behind a TCP proxy; the links between a random minority
    /// and the rest drop connections (a reset per ~50 chunks) and lag.
    Flaky,
    /// With a node killed, cut the tail off its newest RocksDB WAL file; it
    /// must refuse to start, or at least not forget log entries it
    /// acknowledged.
    CorruptWal,
    /// Not in `all` (the damaged node must be replaced by an operator before
    /// the cluster is whole again, see README): a scripted
    /// scenario on 3 nodes. Isolate follower C; writes commit on leader A
    /// and follower B alone; kill B, cut the tail off its WAL; kill A;
    /// restart B with C. B and C elect a leader without A's tail.
    WalLoss,
}

pub const ALL: [Nemesis; 14] = [
    Nemesis::Partition,
    Nemesis::PartitionLeader,
    Nemesis::PartitionBridge,
    Nemesis::Kill,
    Nemesis::KillLeaders,
    Nemesis::Pause,
    Nemesis::PauseKill,
    Nemesis::ClockSkew,
    Nemesis::Corrupt,
    Nemesis::KillAll,
    Nemesis::Slow,
    Nemesis::Flaky,
    Nemesis::CorruptWal,
    Nemesis::Membership,
];

/// Nemeses that exist but are not part of `all` / `short` / `long`.
pub const EXTRA: [Nemesis; 1] = [Nemesis::WalLoss];

impl Nemesis {
    pub fn name(self) -> &'static str {
        match self {
            Nemesis::Partition => "partition",
            Nemesis::PartitionLeader => "partition-leader",
            Nemesis::PartitionBridge => "partition-bridge",
            Nemesis::Kill => "kill",
            Nemesis::KillLeaders => "kill-leaders",
            Nemesis::Pause => "pause",
            Nemesis::PauseKill => "pause-kill",
            Nemesis::ClockSkew => "clock-skew",
            Nemesis::Corrupt => "corrupt",
            Nemesis::KillAll => "kill-all",
            Nemesis::Slow => "slow",
            Nemesis::Flaky => "flaky",
            Nemesis::Membership => "membership",
            Nemesis::CorruptWal => "corrupt-wal",
            Nemesis::WalLoss => "wal-loss",
        }
    }

    /// Whether the nodes run behind the suite's TCP proxies.
    pub fn uses_proxy(self) -> bool {
        matches!(self, Nemesis::Slow | Nemesis::Flaky)
    }

    pub fn parse(s: &str) -> Option<Nemesis> {
        ALL.iter()
            .chain(EXTRA.iter())
            .copied()
            .find(|n| n.name() == s)
    }
}

/// libfaketime's multithreaded preload library, if installed.
pub fn faketime_lib() -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    let mut candidates: Vec<PathBuf> = dirs
        .filter_map(|d| d.ok())
        .map(|d| d.path().join("faketime").join("libfaketimeMT.so.1"))
        .collect();
    candidates.push(PathBuf::from("/usr/lib/faketime/libfaketimeMT.so.1"));
    candidates.into_iter().find(|p| p.exists())
}

/// The environment that lets the suite move a node's wall clock: the offset
/// is read from `file` (re-read every second); the monotonic clock is left
/// alone, so timers and timeouts behave.
pub fn faketime_env(lib: &Path, file: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// The file holding node `id`'s clock offset.
pub fn skew_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("skew-{id}"))
}

/// What is currently broken, to heal.
#[derive(Default)]
struct Active {
    cut: bool,
    paused: Vec<u64>,
    killed: Vec<u64>,
    skewed: Vec<u64>,
    /// (node, backup of its data dir)
    corrupted: Option<(u64, PathBuf)>,
    /// Proxy faults are set.
    proxied: bool,
}

/// Injects and heals faults in one cluster.
pub struct Faults<'a> {
    pub cluster: &'a mut Cluster,
    pub net: &'a Net,
    pub rec: Recorder,
    pub rng: StdRng,
    pub skew_dir: PathBuf,
    /// Faults injected so far.
    pub injected: usize,
    /// A node started on a corrupted data dir instead of refusing (an anomaly).
    pub corrupt_started: usize,
    pub notes: Vec<String>,
    /// The proxies in front of the nodes, for `slow` and `flaky`.
    pub proxies: Option<&'a Proxies>,
    /// Hosts with no node on them, for nodes that join ([`Nemesis::Membership`]).
    pub spare: Vec<natter_tests::NodeHost>,
    /// Logs of nodes removed from the cluster (kept with the run's logs).
    pub removed_logs: Vec<PathBuf>,
    active: Active,
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    crate::hosts::run(&["kill", sig, &pid.to_string()]).map(|_| ())
}

impl<'a> Faults<'a> {
    pub fn new(
        cluster: &'a mut Cluster,
        net: &'a Net,
        rec: Recorder,
        rng: StdRng,
        skew_dir: PathBuf,
    ) -> Self {
        Faults {
            cluster,
            net,
            rec,
            rng,
            skew_dir,
            injected: 0,
            corrupt_started: 0,
            notes: Vec::new(),
            proxies: None,
            spare: Vec::new(),
            removed_logs: Vec::new(),
            active: Active::default(),
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.cluster.ids()
    }

    /// A random minority (1..=(n-1)/2 nodes).
    fn minority(&mut self) -> Vec<u64> {
        let mut ids = self.ids();
        ids.shuffle(&mut self.rng);
        let max = ((ids.len() - 1) / 2).max(1);
        let k = self.rng.gen_range(1..=max);
        ids.truncate(k);
        ids.sort_unstable();
        ids
    }

    /// Data shard leaders as the running, unpaused nodes report them.
    async fn leaders(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for id in self.ids() {
            if self.active.paused.contains(&id) || self.active.killed.contains(&id) {
                continue;
            }
            let Ok(Ok(st)) =
                tokio::time::timeout(Duration::from_secs(3), self.cluster.status(id)).await
            else {
                continue;
            };
            for g in st.groups {
                if g.group != 0 && g.state == "Leader" {
                    out.insert(g.group, id);
                }
            }
        }
        out
    }

    /// One leader of a random data shard, or a random node if none is known.
    async fn some_leader(&mut self) -> u64 {
        let leaders: Vec<u64> = self.leaders().await.into_values().collect();
        match leaders.choose(&mut self.rng) {
            Some(&l) => l,
            None => {
                let ids = self.ids();
                ids[self.rng.gen_range(0..ids.len())]
            }
        }
    }

    fn record(&mut self, what: String) {
        tracing::info!(nemesis = %what);
        let op = self.rec.invoke(NEMESIS_PROCESS, F::Nemesis, |e| {
            e.value = Some(what.clone());
        });
        self.rec.complete(&op, Type::Info, |e| e.value = Some(what));
    }

    fn cut_between(&mut self, a: &[u64], b: &[u64]) -> Result<()> {
        let pairs: Vec<(u64, u64)> = a
            .iter()
            .flat_map(|x| b.iter().map(move |y| (*x, *y)))
            .collect();
        self.net.cut(&pairs)?;
        self.active.cut = true;
        Ok(())
    }

    fn kill(&mut self, ids: &[u64]) {
        for &id in ids {
            self.cluster.kill9(id);
            if !self.active.killed.contains(&id) {
                self.active.killed.push(id);
            }
        }
        self.active.paused.retain(|p| !ids.contains(p));
    }

    fn pause(&mut self, ids: &[u64]) -> Result<()> {
        for &id in ids {
            if let Some(pid) = self.cluster.node(id).pid() {
                signal(pid, "-STOP")?;
                self.active.paused.push(id);
            }
        }
        Ok(())
    }

    fn set_skew(&self, id: u64, offset: &str) -> Result<()> {
        let f = skew_file(&self.skew_dir, id);
        std::fs::write(&f, format!("{offset}\n"))
            .with_context(|| format!("writing {}", f.display()))
    }

    /// Injects `n`, holds it for `hold`, and leaves it for [`Faults::heal`].
    pub async fn fault(&mut self, n: Nemesis, hold: Duration) -> Result<()> {
        self.injected += 1;
        let all = self.ids();
        match n {
            Nemesis::Partition => {
                let minority = self.minority();
                let rest: Vec<u64> = all
                    .iter()
                    .copied()
                    .filter(|i| !minority.contains(i))
                    .collect();
                self.cut_between(&minority, &rest)?;
                self.record(format!("partition {minority:?} | {rest:?}"));
            }
            Nemesis::PartitionLeader => {
                let l = self.some_leader().await;
                let rest: Vec<u64> = all.iter().copied().filter(|i| *i != l).collect();
                self.cut_between(&[l], &rest)?;
                self.record(format!("isolate leader {l} from {rest:?}"));
            }
            Nemesis::PartitionBridge => {
                let mut ids = all.clone();
                ids.shuffle(&mut self.rng);
                let bridge = ids[ids.len() / 2];
                let (a, b) = ids.split_at(ids.len() / 2);
                let b: Vec<u64> = b[1..].to_vec();
                self.cut_between(a, &b)?;
                self.record(format!("bridge {bridge}: {a:?} x {b:?} cut"));
            }
            Nemesis::Kill => {
                let m = self.minority();
                self.kill(&m);
                self.record(format!("kill -9 {m:?}"));
            }
            Nemesis::KillLeaders => {
                let mut ls: Vec<u64> = self.leaders().await.into_values().collect();
                ls.sort_unstable();
                ls.dedup();
                ls.shuffle(&mut self.rng);
                ls.truncate(((all.len() - 1) / 2).max(1));
                if ls.is_empty() {
                    ls = self.minority();
                }
                self.kill(&ls);
                self.record(format!("kill -9 leaders {ls:?}"));
            }
            Nemesis::Pause => {
                let m = self.minority();
                self.pause(&m)?;
                self.record(format!("SIGSTOP {m:?}"));
            }
            Nemesis::PauseKill => {
                let m = self.minority();
                self.pause(&m)?;
                self.record(format!("SIGSTOP {m:?}"));
                tokio::time::sleep(hold / 2).await;
                self.kill(&m);
                self.record(format!("kill -9 paused {m:?}"));
                tokio::time::sleep(hold - hold / 2).await;
                return Ok(());
            }
            Nemesis::ClockSkew => {
                let l = self.some_leader().await;
                let mut m = self.minority();
                if !m.contains(&l) {
                    m[0] = l;
                }
                m.sort_unstable();
                m.dedup();
                let mut what = Vec::new();
                for &id in &m {
                    let secs = self.rng.gen_range(30..=300);
                    let sign = if self.rng.gen_bool(0.5) { "+" } else { "-" };
                    let off = format!("{sign}{secs}s");
                    self.set_skew(id, &off)?;
                    what.push(format!("{id}:{off}"));
                }
                self.active.skewed.extend(m.iter().copied());
                self.record(format!("clock skew {}", what.join(" ")));
            }
            Nemesis::Corrupt => {
                let ids = self.ids();
                let id = ids[self.rng.gen_range(0..ids.len())];
                self.corrupt(id).await?;
            }
            Nemesis::CorruptWal => {
                let ids = self.ids();
                let id = ids[self.rng.gen_range(0..ids.len())];
                self.corrupt_wal(id).await?;
            }
            Nemesis::WalLoss => {
                self.wal_loss(hold).await?;
                return Ok(());
            }
            Nemesis::Membership => {
                self.membership().await?;
                return Ok(());
            }
            Nemesis::KillAll => {
                self.kill(&all);
                self.record(format!("kill -9 all {all:?}"));
            }
            Nemesis::Slow => {
                let p = self.proxies.context("slow runs behind the proxies")?;
                let mut what = Vec::new();
                for &to in &all {
                    let sources: Vec<Option<Source>> = if p.per_link() {
                        all.iter()
                            .filter(|&&f| f != to)
                            .map(|&f| Some(Source::Node(f)))
                            .collect()
                    } else {
                        vec![None]
                    };
                    for from in sources {
                        if !self.rng.gen_bool(0.6) {
                            continue;
                        }
                        let lo = self.rng.gen_range(5..=50);
                        let hi = lo + self.rng.gen_range(0..=150);
                        p.set(
                            from,
                            to,
                            LinkFault {
                                delay_ms: (lo, hi),
                                reset_per_mille: 0,
                            },
                        );
                        what.push(match from {
                            Some(Source::Node(f)) => format!("{f}->{to} {lo}-{hi}ms"),
                            _ => format!("*->{to} {lo}-{hi}ms"),
                        });
                    }
                }
                self.active.proxied = true;
                self.record(format!("slow links {}", what.join(", ")));
            }
            Nemesis::Flaky => {
                let p = self.proxies.context("flaky runs behind the proxies")?;
                let m = self.minority();
                let fault = LinkFault {
                    delay_ms: (0, 30),
                    reset_per_mille: 20,
                };
                if p.per_link() {
                    for &a in &m {
                        for &b in all.iter().filter(|b| !m.contains(b)) {
                            p.set(Some(Source::Node(a)), b, fault);
                            p.set(Some(Source::Node(b)), a, fault);
                        }
                    }
                } else {
                    for &a in &m {
                        p.set(None, a, fault);
                    }
                }
                self.active.proxied = true;
                self.record(format!("flaky links between {m:?} and the rest"));
            }
        }
        tokio::time::sleep(hold).await;
        Ok(())
    }

    /// Stops `id` cleanly, backs its data dir up, damages one file, and
    /// checks that the node refuses to start on it.
    async fn corrupt(&mut self, id: u64) -> Result<()> {
        let stopped = tokio::task::block_in_place(|| self.cluster.stop(id));
        if let Err(e) = stopped {
            self.notes.push(format!("node {id}: {e:#}"));
            self.cluster.kill9(id);
        }
        self.active.killed.push(id);
        let dir = self.cluster.node(id).data_dir.clone();
        let backup = self.cluster.dir.path().join(format!("node{id}.backup"));
        copy_dir(&dir, &backup)?;
        self.active.corrupted = Some((id, backup));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .collect();
        files.sort();
        let (file, how) = if files.is_empty() {
            // No table file yet: damage the MANIFEST instead.
            let mut m: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("MANIFEST-"))
                })
                .collect();
            m.sort();
            match m.pop() {
                Some(f) => (f, "truncate"),
                None => bail!("node {id}: no RocksDB file to damage in {}", dir.display()),
            }
        } else {
            let f = files[self.rng.gen_range(0..files.len())].clone();
            (
                f,
                if self.rng.gen_bool(0.5) {
                    "truncate"
                } else {
                    "bit-flip"
                },
            )
        };
        let len = std::fs::metadata(&file)?.len();
        if how == "truncate" {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)?
                .set_len(len / 2)?;
        } else {
            let mut bytes = std::fs::read(&file)?;
            let at = (bytes.len() / 3)
                .max(64)
                .min(bytes.len().saturating_sub(16));
            for b in bytes.iter_mut().skip(at).take(16) {
                *b ^= 0x5a;
            }
            std::fs::write(&file, bytes)?;
        }
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        // It must refuse to start on the damaged dir.
        let log_before = std::fs::metadata(&self.cluster.node(id).log)
            .map(|m| m.len())
            .unwrap_or(0);
        self.cluster.spawn(id)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut refused = false;
        while Instant::now() < deadline {
            let running = self
                .cluster
                .nodes
                .get_mut(&id)
                .map(|n| n.is_running())
                .unwrap_or(false);
            if !running {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.cluster.kill9(id);
        let log = std::fs::read(&self.cluster.node(id).log).unwrap_or_default();
        let said = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or_default())
            .contains("refuses to start");
        if !refused {
            self.corrupt_started += 1;
            self.notes.push(format!(
                "node {id} STARTED on a data dir with {how} of {name} (expected a refusal)"
            ));
        }
        self.record(format!(
            "node {id} stopped; {how} of {name} ({len} bytes): {}",
            if refused && said {
                "refused to start, as it must"
            } else if refused {
                "exited without saying it refuses"
            } else {
                "STARTED (anomaly)"
            }
        ));
        Ok(())
    }

    /// [`Nemesis::Membership`]: join a fresh node, let the rebalancer give it
    /// its share, drain and remove an old node, stop it.
    async fn membership(&mut self) -> Result<()> {
        use natter_tests::ops::admin;
        let host = self
            .spare
            .pop()
            .context("no spare host for a joining node")?;
        let old = self.ids();
        let via = old[0];
        let listen = host.listen.clone();
        let id = self
            .cluster
            .join_node_on(via, host, &natter_tests::ClusterOpts::default().node_args)
            .await?;
        self.record(format!("node {id} joined on {listen}"));
        let limit = Duration::from_secs(120);
        match self.cluster.wait_balanced(limit).await {
            Ok(b) => self.record(format!(
                "rebalanced onto node {id}: replicas {:?}, leaders {:?}",
                b.replicas, b.leads
            )),
            Err(e) => bail!("the cluster did not rebalance onto node {id}: {e:#}"),
        }
        let victim = old[self.rng.gen_range(0..old.len())];
        let addr = self.cluster.node(id).addr.clone();
        let secs = limit.as_secs().to_string();
        let (code, out, err) = tokio::task::block_in_place(|| {
            admin(
                &addr,
                &["drain", &victim.to_string(), "--wait", "--timeout", &secs],
            )
        });
        if code != 0 {
            bail!("drain {victim} failed: {out}{err}");
        }
        let (code, out, err) =
            tokio::task::block_in_place(|| admin(&addr, &["remove-node", &victim.to_string()]));
        if code != 0 {
            bail!("remove-node {victim} failed: {out}{err}");
        }
        let freed = self.cluster.host_of(victim).context("victim host")?;
        if let Err(e) = tokio::task::block_in_place(|| self.cluster.stop(victim)) {
            self.notes.push(format!("node {victim}: {e:#}"));
            self.cluster.kill9(victim);
        }
        if let Some(n) = self.cluster.forget(victim) {
            self.removed_logs.push(n.log);
        }
        self.spare.push(freed);
        self.record(format!(
            "node {victim} drained, removed and stopped ({})",
            out.lines().last().unwrap_or_default()
        ));
        Ok(())
    }

    /// The scripted scenario of [`Nemesis::WalLoss`].
    async fn wal_loss(&mut self, hold: Duration) -> Result<()> {
        let ids = self.ids();
        if ids.len() != 3 {
            bail!("wal-loss is scripted for 3 nodes");
        }
        let a = self.leaders().await.get(&1).copied().unwrap_or(ids[0]);
        let rest: Vec<u64> = ids.iter().copied().filter(|i| *i != a).collect();
        let (b, c) = (rest[0], rest[1]);
        self.cut_between(&[c], &[a, b])?;
        self.record(format!(
            "wal-loss: shard 1 leader {a}; isolate {c}, so commits need {b}'s acknowledgement"
        ));
        tokio::time::sleep((hold / 2).max(Duration::from_secs(2))).await;
        self.cut_between(&[b], &[a])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.kill(&[b]);
        let dir = self.cluster.node(b).data_dir.clone();
        let mut wals: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
            .collect();
        wals.sort();
        let what = match wals.pop() {
            Some(wal) => {
                let len = std::fs::metadata(&wal)?.len();
                let cut = (len / 3).clamp(1, 256 * 1024);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&wal)?
                    .set_len(len - cut)?;
                format!(
                    "cut {cut} of {len} bytes off {}",
                    wal.file_name().unwrap_or_default().to_string_lossy()
                )
            }
            None => "no WAL file to cut".to_string(),
        };
        self.kill(&[a]);
        self.net.heal()?;
        self.active.cut = false;
        self.cluster.spawn(b)?;
        self.active.killed.retain(|k| *k != b);
        self.record(format!(
            "wal-loss: killed {b}, {what}; killed leader {a}; restarted {b} with {c}"
        ));
        tokio::time::sleep((hold / 2).max(Duration::from_secs(3))).await;
        Ok(())
    }

    /// kill -9 `id`, cut the last bytes off its newest WAL file, and start it
    /// cut off from its peers (so nothing is re-replicated to it): it must
    /// refuse, or come back with every log entry it had.
    async fn corrupt_wal(&mut self, id: u64) -> Result<()> {
        // Cut it off first and let it finish (fsync) whatever it received,
        // so every entry it reports is durable before the damage.
        let others: Vec<u64> = self.ids().into_iter().filter(|i| *i != id).collect();
        self.cut_between(&[id], &others)?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let before = tokio::time::timeout(Duration::from_secs(3), self.cluster.status(id))
            .await
            .ok()
            .and_then(|r| r.ok());
        self.kill(&[id]);
        let dir = self.cluster.node(id).data_dir.clone();
        let mut wals: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
            .collect();
        wals.sort();
        let Some(wal) = wals.pop() else {
            self.record(format!("node {id} killed; no non-empty WAL file to damage"));
            return Ok(());
        };
        let backup = self.cluster.dir.path().join(format!("node{id}.backup"));
        copy_dir(&dir, &backup)?;
        let len = std::fs::metadata(&wal)?.len();
        let cut = self.rng.gen_range(1..=(len / 4).clamp(1, 2048));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)?
            .set_len(len - cut)?;
        let name = wal
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        self.cluster.spawn(id)?;
        self.active.killed.retain(|k| *k != id);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut after = None;
        let mut exited = false;
        while Instant::now() < deadline {
            if !self
                .cluster
                .nodes
                .get_mut(&id)
                .map(|n| n.is_running())
                .unwrap_or(false)
            {
                exited = true;
                break;
            }
            if let Ok(Ok(st)) =
                tokio::time::timeout(Duration::from_secs(2), self.cluster.status(id)).await
            {
                if st.groups.len() as u32 > self.cluster.shards {
                    after = Some(st);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let verdict = if exited {
            // Refused: heal restores the copy and restarts it.
            self.active.killed.push(id);
            self.active.corrupted = Some((id, backup));
            self.cluster.kill9(id);
            "refused to start, as it must".to_string()
        } else if let (Some(b), Some(a)) = (before, after.take()) {
            let _ = std::fs::remove_dir_all(&backup);
            let mut forgot = Vec::new();
            for g in &b.groups {
                if let Some(ag) = a.groups.iter().find(|x| x.group == g.group) {
                    if ag.last_log_index < g.last_log_index {
                        forgot.push(format!(
                            "group {}: last log index {} before, {} after",
                            g.group, g.last_log_index, ag.last_log_index
                        ));
                    }
                }
            }
            if forgot.is_empty() {
                "started and kept every log entry it had".to_string()
            } else {
                self.corrupt_started += 1;
                self.notes.push(format!(
                    "node {id} started on a WAL missing its last {cut} bytes and forgot acknowledged log entries: {}",
                    forgot.join("; ")
                ));
                format!("STARTED and forgot entries ({})", forgot.join("; "))
            }
        } else {
            let _ = std::fs::remove_dir_all(&backup);
            "started (no status to compare)".to_string()
        };
        self.record(format!(
            "node {id} killed; cut {cut} of {len} bytes off {name}: {verdict}"
        ));
        Ok(())
    }

    /// Heals everything: network, paused, killed, corrupted, skewed nodes.
    pub async fn heal(&mut self) -> Result<()> {
        let mut what = Vec::new();
        if self.active.proxied {
            if let Some(p) = self.proxies {
                p.heal();
                what.push(format!(
                    "links healed ({} connections reset so far)",
                    p.resets()
                ));
            }
            self.active.proxied = false;
        }
        if self.active.cut {
            self.net.heal()?;
            self.active.cut = false;
            what.push("network healed".to_string());
        }
        for id in std::mem::take(&mut self.active.paused) {
            if let Some(pid) = self.cluster.node(id).pid() {
                signal(pid, "-CONT")?;
            }
            what.push(format!("SIGCONT {id}"));
        }
        if let Some((id, backup)) = self.active.corrupted.take() {
            let dir = self.cluster.node(id).data_dir.clone();
            copy_dir(&backup, &dir)?;
            let _ = std::fs::remove_dir_all(&backup);
            what.push(format!("node {id}'s data dir restored"));
        }
        for id in std::mem::take(&mut self.active.skewed) {
            self.set_skew(id, "+0")?;
            what.push(format!("clock of {id} reset"));
        }
        let mut killed = std::mem::take(&mut self.active.killed);
        killed.sort_unstable();
        for &id in &killed {
            self.cluster.spawn(id)?;
        }
        if !killed.is_empty() {
            what.push(format!("restarted {killed:?}"));
        }
        if !what.is_empty() {
            self.record(format!("heal: {}", what.join(", ")));
        }
        Ok(())
    }
}

/// Copies a flat directory (a RocksDB data dir) over `to`.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}
