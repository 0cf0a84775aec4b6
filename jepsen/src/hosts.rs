//! Where the nodes run and how the network between them is cut.
//!
//! **netns mode** (the default when `ip netns` works, i.e. as root with
//! iproute2): every node gets its own network namespace `natj-n<i>` with one
//! veth (`eth0`, address `10.213.47.<10+i>/24`) plugged into a bridge that
//! lives in a namespace of its own (`natj-hub`), so the bridged traffic never
//! crosses the host's own firewall. The suite itself reaches the nodes
//! through one more veth (`natj-c0`, `10.213.47.1/24`, the only interface
//! added to the host namespace). A partition is a pair of iptables DROP rules
//! (INPUT by source, OUTPUT by destination) inside each affected node's
//! namespace; healing flushes them. Deleting the namespaces removes
//! everything.
//!
//! **loopback mode** (fallback): node i listens on `127.0.0.<10+i>` and runs
//! with its own group id (`setpriv --regid 47000+i`). On loopback every
//! connection's source address is 127.0.0.1, so sources can't be told apart
//! by address; instead a chain `NATJ` hooked into the host's OUTPUT drops
//! packets *owned by* node a's group *to* node b's address, and the
//! reverse. Each direction of a TCP connection is cut, so both are.
//!
//! Leftovers of a crashed run (namespaces `natj-*`, the `natj-c0` link, the
//! `NATJ` chain) are removed before setting up.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use natter_tests::NodeHost;

const PREFIX: &str = "natj-";
const HUB: &str = "natj-hub";
const CLIENT_LINK: &str = "natj-c0";
const SUBNET: &str = "10.213.47";
const CHAIN: &str = "NATJ";
const NODE_PORT: u16 = 7000;
const GID_BASE: u32 = 47000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Netns,
    Loopback,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Netns => "netns",
            Mode::Loopback => "loopback",
        })
    }
}

/// Runs a command; its failure (or absence) is an error naming it.
pub fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn quiet(argv: &[&str]) {
    let _ = run(argv);
}

/// Installs a Debian package when `probe` (a command) does not run.
pub fn ensure_package(probe: &[&str], package: &str) -> Result<()> {
    if run(probe).is_ok() {
        return Ok(());
    }
    tracing::info!("installing {package}");
    let _ = run(&["apt-get", "update"]);
    run(&["apt-get", "install", "-y", package]).with_context(|| format!("installing {package}"))?;
    run(probe).map(|_| ())
}

/// The hosts of one cluster and the network between them.
pub struct Net {
    pub mode: Mode,
    /// Why netns mode was not used, when it was not.
    pub fallback_reason: Option<String>,
    ips: BTreeMap<u64, String>,
    ports: BTreeMap<u64, u16>,
    active: bool,
}

fn ns(id: u64) -> String {
    format!("{PREFIX}n{id}")
}

impl Net {
    /// Sets up hosts for nodes `1..=nodes`.
    pub fn setup(nodes: u64, force_loopback: bool) -> Result<Net> {
        cleanup_leftovers();
        ensure_package(&["iptables", "--version"], "iptables")?;
        if !force_loopback {
            match Net::setup_netns(nodes) {
                Ok(net) => return Ok(net),
                Err(e) => {
                    tracing::warn!(
                        "network namespaces unavailable, falling back to loopback: {e:#}"
                    );
                    cleanup_leftovers();
                    let mut net = Net::setup_loopback(nodes)?;
                    net.fallback_reason = Some(format!("{e:#}"));
                    return Ok(net);
                }
            }
        }
        let mut net = Net::setup_loopback(nodes)?;
        net.fallback_reason = Some("--loopback was given".into());
        Ok(net)
    }

    fn setup_netns(nodes: u64) -> Result<Net> {
        // The subnet must be ours alone: no address or route of the host in it.
        let addrs = run(&["ip", "-o", "addr", "show"])?;
        let routes = run(&["ip", "route", "show", &format!("{SUBNET}.0/24")])?;
        if addrs.contains(&format!(" {SUBNET}.")) || !routes.trim().is_empty() {
            bail!("{SUBNET}.0/24 is already in use on this machine");
        }
        let mut net = Net {
            mode: Mode::Netns,
            fallback_reason: None,
            ips: BTreeMap::new(),
            ports: BTreeMap::new(),
            active: true,
        };
        run(&["ip", "netns", "add", HUB])?;
        run(&["ip", "-n", HUB, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", HUB, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", HUB, "link", "set", "br0", "up"])?;
        run(&[
            "ip",
            "link",
            "add",
            CLIENT_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            HUB,
        ])?;
        run(&["ip", "-n", HUB, "link", "set", "c0", "master", "br0", "up"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{SUBNET}.1/24"),
            "dev",
            CLIENT_LINK,
        ])?;
        run(&["ip", "link", "set", CLIENT_LINK, "up"])?;
        for id in 1..=nodes {
            let n = ns(id);
            let hub_end = format!("h{id}");
            let ip = format!("{SUBNET}.{}", 10 + id);
            run(&["ip", "netns", "add", &n])?;
            run(&["ip", "-n", &n, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "-n", HUB, "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0",
                "netns", &n,
            ])?;
            run(&[
                "ip", "-n", HUB, "link", "set", &hub_end, "master", "br0", "up",
            ])?;
            run(&[
                "ip",
                "-n",
                &n,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &n, "link", "set", "eth0", "up"])?;
            // Partitions are iptables rules in here: check that they work.
            run(&["ip", "netns", "exec", &n, "iptables", "-S", "INPUT"])?;
            // Traffic to a node must go over our link and nowhere else.
            let route = run(&["ip", "route", "get", &ip])?;
            if !route.contains(&format!("dev {CLIENT_LINK}")) {
                bail!("route to {ip} does not use {CLIENT_LINK}: {route}");
            }
            net.ips.insert(id, ip);
            net.ports.insert(id, NODE_PORT);
        }
        Ok(net)
    }

    fn setup_loopback(nodes: u64) -> Result<Net> {
        ensure_package(&["setpriv", "--version"], "util-linux")?;
        run(&["iptables", "-N", CHAIN])?;
        run(&["iptables", "-I", "OUTPUT", "-j", CHAIN])?;
        let mut net = Net {
            mode: Mode::Loopback,
            fallback_reason: None,
            ips: BTreeMap::new(),
            ports: BTreeMap::new(),
            active: true,
        };
        for id in 1..=nodes {
            let ip = format!("127.0.0.{}", 10 + id);
            let port = std::net::TcpListener::bind((ip.as_str(), 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .with_context(|| format!("no free port on {ip}"))?;
            net.ips.insert(id, ip);
            net.ports.insert(id, port);
        }
        Ok(net)
    }

    /// Every node's address (`ip:port`).
    pub fn addr(&self, id: u64) -> String {
        format!(
            "{}:{}",
            self.ips.get(&id).map(String::as_str).unwrap_or("127.0.0.1"),
            self.ports.get(&id).copied().unwrap_or(NODE_PORT)
        )
    }

    /// Where and how each node runs, for the harness.
    pub fn hosts(&self) -> BTreeMap<u64, NodeHost> {
        self.ips
            .keys()
            .map(|&id| {
                let prefix = match self.mode {
                    Mode::Netns => vec!["ip".into(), "netns".into(), "exec".into(), ns(id)],
                    Mode::Loopback => vec![
                        "setpriv".into(),
                        "--regid".into(),
                        (GID_BASE + id as u32).to_string(),
                        "--clear-groups".into(),
                    ],
                };
                (
                    id,
                    NodeHost {
                        listen: self.addr(id),
                        advertise: None,
                        prefix,
                        env: Vec::new(),
                    },
                )
            })
            .collect()
    }

    /// Where the proxies of the `slow` and `flaky` nemeses listen and what
    /// they forward to, by node; and the nodes' source addresses (empty on
    /// loopback, where every connection comes from 127.0.0.1).
    #[allow(clippy::type_complexity)]
    pub fn proxy_plan(
        &self,
    ) -> (
        BTreeMap<u64, (String, String)>,
        BTreeMap<std::net::IpAddr, u64>,
    ) {
        let host_ip = match self.mode {
            // The suite's own end of the bridge: every node can reach it.
            Mode::Netns => format!("{SUBNET}.1"),
            Mode::Loopback => "127.0.0.1".to_string(),
        };
        let targets = self
            .ips
            .keys()
            .map(|&id| (id, (format!("{host_ip}:0"), self.addr(id))))
            .collect();
        let sources = match self.mode {
            Mode::Netns => self
                .ips
                .iter()
                .filter_map(|(&id, ip)| ip.parse().ok().map(|ip| (ip, id)))
                .collect(),
            Mode::Loopback => BTreeMap::new(),
        };
        (targets, sources)
    }

    /// Cuts traffic between every pair in `cuts`, both ways.
    pub fn cut(&self, cuts: &[(u64, u64)]) -> Result<()> {
        for &(a, b) in cuts {
            let (Some(ia), Some(ib)) = (self.ips.get(&a), self.ips.get(&b)) else {
                bail!("no such nodes {a}, {b}");
            };
            match self.mode {
                Mode::Netns => {
                    for (me, other) in [(a, ib), (b, ia)] {
                        let n = ns(me);
                        run(&[
                            "ip", "netns", "exec", &n, "iptables", "-A", "INPUT", "-s", other,
                            "-j", "DROP",
                        ])?;
                        run(&[
                            "ip", "netns", "exec", &n, "iptables", "-A", "OUTPUT", "-d", other,
                            "-j", "DROP",
                        ])?;
                    }
                }
                Mode::Loopback => {
                    for (me, other) in [(a, ib), (b, ia)] {
                        let gid = (GID_BASE + me as u32).to_string();
                        run(&[
                            "iptables",
                            "-A",
                            CHAIN,
                            "-o",
                            "lo",
                            "-m",
                            "owner",
                            "--gid-owner",
                            &gid,
                            "-d",
                            other,
                            "-j",
                            "DROP",
                        ])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<()> {
        match self.mode {
            Mode::Netns => {
                for &id in self.ips.keys() {
                    let n = ns(id);
                    run(&["ip", "netns", "exec", &n, "iptables", "-F", "INPUT"])?;
                    run(&["ip", "netns", "exec", &n, "iptables", "-F", "OUTPUT"])?;
                }
            }
            Mode::Loopback => {
                run(&["iptables", "-F", CHAIN])?;
            }
        }
        Ok(())
    }

    /// Removes everything this run created.
    pub fn teardown(&mut self) {
        if self.active {
            self.active = false;
            cleanup_leftovers();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes what a previous (possibly crashed) run left: our namespaces, our
/// link in the host namespace, our iptables chain.
pub fn cleanup_leftovers() {
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                // Node processes of a crashed run still inside our namespace.
                if let Ok(pids) = run(&["ip", "netns", "pids", name]) {
                    for pid in pids.split_whitespace() {
                        quiet(&["kill", "-9", pid]);
                    }
                }
                quiet(&["ip", "netns", "del", name]);
            }
        }
    }
    // Loopback-mode nodes of a crashed run: ours by their group id.
    for pid in loopback_leftovers() {
        quiet(&["kill", "-9", &pid.to_string()]);
    }
    if run(&["ip", "link", "show", CLIENT_LINK]).is_ok() {
        quiet(&["ip", "link", "del", CLIENT_LINK]);
    }
    if run(&["iptables", "-S", CHAIN]).is_ok() {
        // The jump may have been inserted more than once by crashed runs.
        for _ in 0..16 {
            if run(&["iptables", "-D", "OUTPUT", "-j", CHAIN]).is_err() {
                break;
            }
        }
        quiet(&["iptables", "-F", CHAIN]);
        quiet(&["iptables", "-X", CHAIN]);
    }
}

/// Processes running with one of the group ids loopback mode gives nodes
/// (47001..=47099) that are natter-node processes.
fn loopback_leftovers() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let gid = status
            .lines()
            .find(|l| l.starts_with("Gid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|g| g.parse::<u32>().ok())
            .unwrap_or(0);
        if !(GID_BASE + 1..GID_BASE + 100).contains(&gid) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("natter-node") {
            out.push(pid);
        }
    }
    out
}

/// Only one suite at a time may own the `natj-*` namespaces and the `NATJ`
/// chain: a lock file holding the owner's pid, removed on drop.
pub struct RunLock {
    path: std::path::PathBuf,
}

impl RunLock {
    pub fn acquire() -> Result<RunLock> {
        let path = std::env::temp_dir().join("natter-jepsen.lock");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(pid) = text.trim().parse::<u32>() {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if pid != std::process::id()
                    && String::from_utf8_lossy(&cmd).contains("natter-jepsen")
                {
                    bail!(
                        "another natter-jepsen (pid {pid}) is running; {} says so",
                        path.display()
                    );
                }
            }
        }
        std::fs::write(&path, std::process::id().to_string())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(RunLock { path })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
