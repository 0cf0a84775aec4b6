//! Router harness: starts real `natter-router` processes on ephemeral ports
//! against a [`crate::Cluster`], waits for `/readyz`, and talks to them as
//! clients do: HTTP for accounts, WebSocket JSON (protocol v1) for the rest.
//!
//! The binary is `NATTER_ROUTER_BIN` when set (a router built in its own
//! target dir), else `natter-router` next to the other binaries
//! ([`crate::bin_dir`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{free_port, tail};

pub type Ws = WebSocketStream<TcpStream>;

/// The router binary.
pub fn router_bin() -> PathBuf {
    match std::env::var("NATTER_ROUTER_BIN") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::bin("natter-router"),
    }
}

/// Router flags that turn every abuse limit off: for load generators
/// (benchmarks, the fault-injection workload), where a few accounts send as
/// fast as they can from one address.
pub const NO_LIMITS: &[&str] = &[
    "--rate-limit",
    "send_device=off,send_user=off,upload_device=off,upload_user=off,login_user=off,login_ip=off,register_ip=off,connect_ip=off,connect_user=off",
];

/// One router process.
pub struct RouterProc {
    pub addr: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl RouterProc {
    /// Starts a router for the cluster nodes `nodes` with extra flags, and
    /// waits until `/readyz` says ready.
    pub async fn start(
        dir: &Path,
        name: &str,
        nodes: &[String],
        extra: &[&str],
    ) -> Result<RouterProc> {
        let addr = format!("127.0.0.1:{}", free_port());
        Self::start_at(dir, name, addr, nodes, extra).await
    }

    /// Like [`RouterProc::start`] on a chosen address (routers that must
    /// know each other's URL before they start).
    pub async fn start_at(
        dir: &Path,
        name: &str,
        addr: String,
        nodes: &[String],
        extra: &[&str],
    ) -> Result<RouterProc> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(router_bin())
            .args(["--listen", &addr, "--nodes", &nodes.join(",")])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("NATTER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning natter-router")?;
        let mut r = RouterProc {
            addr,
            log,
            child: Some(child),
        };
        r.wait_ready(Duration::from_secs(30)).await?;
        Ok(r)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not asked");
        while Instant::now() < deadline {
            if !self.is_running() {
                bail!("router exited; log:\n{}", tail(&self.log, 40));
            }
            match http(&self.addr, "GET", "/readyz", None, None).await {
                Ok((200, _)) => return Ok(()),
                Ok((s, v)) => last = format!("{s} {v}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "router not ready in time: {last}; log:\n{}",
            tail(&self.log, 40)
        )
    }

    /// Resident memory of the process, in KiB (VmRSS).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().context("not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .context("no VmRSS")
    }

    /// SIGTERM; waits for the exit (killing after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("router did not exit on SIGTERM within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 request (`Connection: close`); answers (status, JSON body or
/// `null`).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .map_err(|_| anyhow!("{method} {path}: no answer in 30 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer: {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked answers are not supported by this test client");
    }
    let v = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("body {body:?}"))?
    };
    Ok((status, v))
}

/// Registers a user; answers its id.
pub async fn register(addr: &str, username: &str, password: &str) -> Result<String> {
    let (s, v) = http(
        addr,
        "POST",
        "/v1/register",
        None,
        Some(&json!({"username": username, "password": password})),
    )
    .await?;
    if s != 201 {
        bail!("register {username}: {s} {v}");
    }
    Ok(v["user_id"].as_str().unwrap_or_default().to_string())
}

/// Logs in; answers the session token.
pub async fn login(addr: &str, username: &str, password: &str, device: &str) -> Result<String> {
    let (s, v) = http(
        addr,
        "POST",
        "/v1/login",
        None,
        Some(&json!({"username": username, "password": password, "device": device})),
    )
    .await?;
    if s != 200 {
        bail!("login {username}: {s} {v}");
    }
    Ok(v["token"].as_str().unwrap_or_default().to_string())
}

/// Two users who became friends: `a` registered on router `ra` and logged
/// in as "laptop", `b` on `rb` as "phone", both connected and resumed.
/// Answers (a's client, b's client, a's id, b's id, a's token, b's token).
pub async fn friends(
    ra: &str,
    rb: &str,
    a: &str,
    b: &str,
    password: &str,
) -> Result<(Client, Client, String, String, String, String)> {
    let ida = register(ra, a, password).await?;
    let idb = register(rb, b, password).await?;
    let ta = login(ra, a, password, "laptop").await?;
    let tb = login(rb, b, password, "phone").await?;
    let mut ca = Client::connect(ra, &ta).await?;
    let mut cb = Client::connect(rb, &tb).await?;
    ca.call("resume", json!({})).await?;
    cb.call("resume", json!({})).await?;
    let f = ca.call("friend_request", json!({"user_id": idb})).await?;
    if f["friendship"]["relation"] != "outgoing" {
        bail!("friend_request answered {f}");
    }
    let f = cb.call("friend_accept", json!({"user_id": ida})).await?;
    if f["friendship"]["relation"] != "friend" {
        bail!("friend_accept answered {f}");
    }
    Ok((ca, cb, ida, idb, ta, tb))
}

/// The direct conversation of `c`'s user with `other` (a friend).
pub async fn direct_with(c: &mut Client, other: &str) -> Result<String> {
    let r = c.call("create_direct", json!({"user_id": other})).await?;
    r["conversation"]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("create_direct answered {r}"))
}

/// How a WebSocket presents its token.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Header(&'a str),
    Query(&'a str),
}

/// Opens `/v1/ws`: Ok(Ok(ws)) when upgraded, Ok(Err(status)) when refused.
/// `recv_buf` shrinks the client's socket receive buffer (slow readers).
pub async fn ws_connect(
    addr: &str,
    auth: Auth<'_>,
    recv_buf: Option<u32>,
) -> Result<Result<Ws, u16>> {
    let url = match auth {
        Auth::Query(t) => format!("ws://{addr}/v1/ws?token={t}"),
        _ => format!("ws://{addr}/v1/ws"),
    };
    let mut req = url.into_client_request()?;
    if let Auth::Header(t) = auth {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let sock = TcpSocket::new_v4()?;
    if let Some(n) = recv_buf {
        sock.set_recv_buffer_size(n)?;
    }
    let stream = sock.connect(addr.parse()?).await?;
    // A small read buffer, as the router's: tungstenite zero-fills its
    // whole read buffer (128 KiB by default) before every socket read, CPU
    // that a load generator on the same machine takes from the system
    // under test.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    match tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await {
        Ok((ws, _)) => Ok(Ok(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Ok(Err(resp.status().as_u16())),
        Err(e) => Err(e.into()),
    }
}

/// A protocol-v1 client: numbered requests, replies matched by id, events
/// kept in arrival order.
pub struct Client {
    pub ws: Ws,
    next_id: u64,
    pub events: VecDeque<Value>,
}

pub const T: Duration = Duration::from_secs(20);

impl Client {
    pub async fn connect(addr: &str, token: &str) -> Result<Client> {
        match ws_connect(addr, Auth::Header(token), None).await? {
            Ok(ws) => Ok(Client::new(ws)),
            Err(s) => bail!("WebSocket refused with {s}"),
        }
    }

    pub fn new(ws: Ws) -> Client {
        Client {
            ws,
            next_id: 1,
            events: VecDeque::new(),
        }
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<()> {
        Ok(self.ws.send(m).await?)
    }

    /// The next frame as JSON (pongs and pings skipped); an error when the
    /// connection closes.
    async fn read_value(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame in time"))?;
            match m {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
                Some(Ok(Message::Close(f))) => bail!("closed: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("read error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Sends a request and waits for its reply (the whole reply frame).
    pub async fn request(&mut self, op: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = json!({"v": 1, "id": id, "op": op});
        if let (Some(f), Value::Object(p)) = (frame.as_object_mut(), params) {
            f.extend(p);
        }
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await?;
        let deadline = Instant::now() + T;
        loop {
            let v = self
                .read_value(deadline)
                .await
                .with_context(|| format!("waiting for the reply to {op}"))?;
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else if v["id"] == json!(id) {
                return Ok(v);
            }
        }
    }

    /// A request that must succeed; answers its `ok` object.
    pub async fn call(&mut self, op: &str, params: Value) -> Result<Value> {
        let r = self.request(op, params).await?;
        match r.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => bail!("{op} failed: {r}"),
        }
    }

    /// The error code of a request that must fail.
    pub async fn call_err(&mut self, op: &str, params: Value) -> Result<String> {
        let r = self.request(op, params).await?;
        match r["error"]["code"].as_str() {
            Some(c) => Ok(c.to_string()),
            None => bail!("{op} should have failed: {r}"),
        }
    }

    /// The next pushed event.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Value> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_value(deadline).await?;
            if v.get("event").is_some() {
                return Ok(v);
            }
        }
    }

    /// Reads until the connection ends; answers the close code (None for
    /// an end without a close frame) and the text frames that came before.
    pub async fn until_closed(&mut self, timeout: Duration) -> Result<(Option<u16>, Vec<Value>)> {
        let deadline = Instant::now() + timeout;
        let mut frames: Vec<Value> = self.events.drain(..).collect();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => bail!(
                    "still open after {timeout:?} ({} frames read)",
                    frames.len()
                ),
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Ok((f.map(|f| u16::from(f.code)), frames))
                }
                Ok(Some(Ok(Message::Text(t)))) => frames.push(serde_json::from_str(t.as_str())?),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return Ok((None, frames)),
            }
        }
    }
}

/// One conversation as a client keeps it.
#[derive(Debug, Default, Clone)]
pub struct ConvState {
    pub token: u64,
    /// Live messages by seq.
    pub messages: BTreeMap<u64, Value>,
}

/// A client's synced state, built only from pushed events, checking that
/// each event continues exactly from the token the client holds.
#[derive(Debug, Default, Clone)]
pub struct Synced {
    pub feed_token: u64,
    pub feed: BTreeMap<String, Value>,
    pub convs: HashMap<String, ConvState>,
    /// (conversation, text) of every live message change applied, in order.
    pub received: Vec<(String, String)>,
}

impl Synced {
    /// Texts of `conv` received live from position `from` of `received` on.
    pub fn received_since(&self, from: usize, conv: &str) -> Vec<&str> {
        self.received[from..]
            .iter()
            .filter(|(c, _)| c == conv)
            .map(|(_, t)| t.as_str())
            .collect()
    }

    /// Tokens for `resume`.
    pub fn resume_params(&self) -> Value {
        let convs: serde_json::Map<String, Value> = self
            .convs
            .iter()
            .map(|(c, s)| (c.clone(), json!(s.token)))
            .collect();
        json!({"feed_token": self.feed_token, "conversations": convs})
    }

    /// Applies one event (others than feed/conversation are ignored).
    pub fn apply(&mut self, ev: &Value) -> Result<()> {
        let kind = ev["event"].as_str();
        if !matches!(kind, Some("feed" | "conversation")) {
            return Ok(());
        }
        let cold = ev["cold_start"].as_bool().unwrap_or(false);
        let from = ev["from_token"].as_u64().unwrap_or(u64::MAX);
        let token = ev["token"].as_u64().context("event without token")?;
        match kind {
            Some("feed") => {
                if !cold && from != self.feed_token {
                    bail!(
                        "feed event from {from} but the client is at {}: {ev}",
                        self.feed_token
                    );
                }
                if cold {
                    self.feed.clear();
                }
                for e in ev["entries"].as_array().into_iter().flatten() {
                    let id = e["conversation_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    if e["hidden"] == json!(true) || e["removed"] == json!(true) {
                        self.feed.remove(&id);
                    } else {
                        self.feed.insert(id, e.clone());
                    }
                }
                self.feed_token = token;
            }
            Some("conversation") => {
                let c = ev["conversation_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let st = self.convs.entry(c.clone()).or_default();
                if !cold && from != st.token {
                    bail!(
                        "conversation event from {from} but the client is at {}: {ev}",
                        st.token
                    );
                }
                if cold {
                    st.messages.clear();
                }
                for ch in ev["changes"].as_array().into_iter().flatten() {
                    let m = &ch["message"];
                    if m.is_null() {
                        continue;
                    }
                    let seq = m["seq"].as_u64().unwrap_or_default();
                    if m["deleted"] == json!(true) {
                        st.messages.remove(&seq);
                    } else {
                        st.messages.insert(seq, m.clone());
                        self.received.push((
                            c.clone(),
                            m["text"].as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
                st.token = token;
            }
            _ => {}
        }
        Ok(())
    }

    /// Texts of a conversation's live messages in seq order.
    pub fn texts(&self, conv: &str) -> Vec<String> {
        self.convs
            .get(conv)
            .map(|s| {
                s.messages
                    .values()
                    .map(|m| m["text"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Applies events until `done(state)` holds.
pub async fn sync_until(
    client: &mut Client,
    state: &mut Synced,
    timeout: Duration,
    done: impl Fn(&Synced) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(state) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("condition not reached in {timeout:?}; state: {state:?}");
        }
        let ev = client.next_event(left).await?;
        state.apply(&ev)?;
    }
    Ok(())
}

/// Reading single frames off a raw WebSocket.
pub trait WsExt {
    /// The next frame; Ok(None) when the stream ended, Err on a read error
    /// or when nothing came within `timeout`.
    fn next_frame(
        &mut self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Option<Message>>>;
    /// The next text frame as JSON (pings and pongs skipped).
    fn next_json(&mut self, timeout: Duration) -> impl std::future::Future<Output = Result<Value>>;
}

impl WsExt for Ws {
    async fn next_frame(&mut self, timeout: Duration) -> Result<Option<Message>> {
        match tokio::time::timeout(timeout, self.next()).await {
            Err(_) => bail!("no frame within {timeout:?}"),
            Ok(None) => Ok(None),
            Ok(Some(Ok(m))) => Ok(Some(m)),
            Ok(Some(Err(e))) => bail!("read error: {e}"),
        }
    }

    async fn next_json(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await? {
                Some(Message::Text(t)) => return Ok(serde_json::from_str(t.as_str())?),
                Some(Message::Close(f)) => bail!("closed: {f:?}"),
                Some(_) => continue,
                None => bail!("connection ended"),
            }
        }
    }
}

impl Client {
    /// Sends many requests of one op at once (the router runs them
    /// concurrently) and answers their replies in request order.
    pub async fn burst(&mut self, op: &str, params: Vec<Value>) -> Result<Vec<Value>> {
        let first = self.next_id;
        for p in params.iter() {
            let mut frame = json!({"v": 1, "id": self.next_id, "op": op});
            if let (Some(f), Value::Object(p)) = (frame.as_object_mut(), p) {
                f.extend(p.clone());
            }
            self.next_id += 1;
            self.ws
                .send(Message::Text(frame.to_string().into()))
                .await?;
        }
        let mut replies: BTreeMap<u64, Value> = BTreeMap::new();
        let deadline = Instant::now() + T * 3;
        while replies.len() < params.len() {
            let v = self.read_value(deadline).await?;
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else if let Some(id) = v["id"].as_u64().filter(|id| *id >= first) {
                replies.insert(id, v);
            }
        }
        Ok(replies.into_values().collect())
    }
}
