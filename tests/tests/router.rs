//! The router on real processes: 3 nodes and 1–2 routers, real gRPC, real
//! WebSockets. What clients rely on: a message reaches a device connected
//! to another router; a reconnecting device gets exactly what it missed
//! (every pushed page continues from the token the client holds); bad
//! tokens are refused and logout/expiry end open connections; non-members
//! learn nothing; garbage and clients that never read don't hurt anyone
//! else and don't grow the router's memory; requests survive leader crashes
//! and end with a clear error at their deadline; every operation answers as
//! docs/protocol.md says; shutdown tells clients to reconnect.

use std::time::{Duration, Instant};

use natter_tests::router::{
    http, login, register, sync_until, ws_connect, Auth, Client, RouterProc, Synced, WsExt, T,
};
use natter_tests::{tail, Cluster, ClusterOpts};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const PW: &str = "correct horse battery";

async fn router(c: &Cluster, name: &str, extra: &[&str]) -> RouterProc {
    RouterProc::start(c.dir.path(), name, &c.addrs(), extra)
        .await
        .expect("router starts")
}

fn id_of(v: &Value, path: &[&str]) -> String {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("no {path:?}"))
        .to_string()
}

/// Alice and Bob, friends (see `natter_tests::router::friends`).
async fn friends(
    ra: &RouterProc,
    rb: &RouterProc,
    a: &str,
    b: &str,
) -> (Client, Client, String, String, String, String) {
    natter_tests::router::friends(&ra.addr, &rb.addr, a, b, PW)
        .await
        .unwrap()
}

fn send(conv: &str, cmid: &str, text: &str) -> Value {
    json!({"conversation_id": conv, "client_msg_id": cmid, "text": text})
}

#[tokio::test]
async fn a_message_reaches_a_device_on_another_router_and_a_resumed_device_gets_exactly_what_it_missed(
) {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(&c, "router1", &[]).await;
    let mut r2 = router(&c, "router2", &[]).await;
    let (h, v) = http(&r1.addr, "GET", "/healthz", None, None).await.unwrap();
    assert_eq!((h, v["status"].as_str()), (200, Some("ok")));

    let (mut a, mut b, _alice, bob, _ta, tb) = friends(&r1, &r2, "alice", "bob").await;
    let conv = id_of(
        &a.call("create_direct", json!({"user_id": bob}))
            .await
            .unwrap(),
        &["conversation", "id"],
    );

    // Alice on router 1 sends; Bob on router 2 gets it pushed.
    let mut bs = Synced::default();
    let sent_at = Instant::now();
    let first = a
        .call("send", send(&conv, "m0", "hello bob"))
        .await
        .unwrap();
    assert_eq!(first["duplicate"], false);
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv) == ["hello bob"])
        .await
        .unwrap();
    eprintln!("pushed across routers in {:?}", sent_at.elapsed());
    // A retried send (same client_msg_id) is the same message, not a new one.
    let again = a
        .call("send", send(&conv, "m0", "hello bob"))
        .await
        .unwrap();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["message"]["seq"], first["message"]["seq"]);

    // Bob goes offline; Alice sends three more.
    b.ws.close(None).await.ok();
    drop(b);
    for i in 1..=3 {
        a.call(
            "send",
            send(&conv, &format!("m{i}"), &format!("missed {i}")),
        )
        .await
        .unwrap();
    }

    // Bob comes back with his tokens: exactly the three, each event
    // continuing from the token he holds (Synced::apply checks).
    let mut b = Client::connect(&r2.addr, &tb).await.unwrap();
    let seen = bs.received.len();
    b.call("resume", bs.resume_params()).await.unwrap();
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv).len() == 4)
        .await
        .unwrap();
    // One more live message: anything the resume pushed twice would arrive
    // before it (one device's events are ordered).
    a.call("send", send(&conv, "m4", "after resume"))
        .await
        .unwrap();
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv).len() == 5)
        .await
        .unwrap();
    let got = bs.received_since(seen, &conv);
    assert_eq!(got, ["missed 1", "missed 2", "missed 3", "after resume"]);
    // That live message continued Bob's token, so router 2 pushed it from
    // the send its change event carried, without reading it back (and
    // Synced::apply checked it continued his token like any push).
    let (status, metrics) = natter_tests::ops::http_get(&r2.addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let from_events: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("natter_router_pushes_from_events_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(from_events >= 1.0, "no push from an event:\n{metrics}");
    assert_eq!(
        bs.texts(&conv),
        [
            "hello bob",
            "missed 1",
            "missed 2",
            "missed 3",
            "after resume"
        ]
    );
    // The feed, pushed too, shows the conversation with everything unread.
    sync_until(&mut b, &mut bs, T, |s| {
        s.feed
            .get(&conv)
            .is_some_and(|e| e["unread_count"] == json!(5))
    })
    .await
    .unwrap();

    // What Bob's pushes built equals what a full read returns.
    let page = b
        .call("history", json!({"conversation_id": conv}))
        .await
        .unwrap();
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, bs.texts(&conv));

    // Graceful shutdown: Bob is told to reconnect, then closed (1012).
    let term = tokio::task::spawn_blocking(move || {
        let s = r2.terminate(Duration::from_secs(20));
        (s, r2)
    });
    let mut told = false;
    let code = loop {
        match b.ws.next_frame(Duration::from_secs(20)).await {
            Ok(Some(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                told |= v["event"] == "reconnect";
            }
            Ok(Some(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break None,
        }
    };
    let (status, r2) = term.await.unwrap();
    assert!(told, "no reconnect event before the close");
    assert_eq!(code, Some(1012));
    assert!(
        status.unwrap().success(),
        "router 2 exit; log:\n{}",
        tail(&r2.log, 20)
    );
    drop(r1);
}

/// A well-formed token nobody was given.
fn forged_token() -> String {
    let bytes: Vec<u8> = (0..32).map(|_| rand_byte()).collect();
    base64url(&bytes)
}

fn rand_byte() -> u8 {
    (uuid::Uuid::new_v4().as_u128() & 0xff) as u8
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn refused(addr: &str, auth: Auth<'_>) -> u16 {
    match ws_connect(addr, auth, None).await.unwrap() {
        Ok(_) => 0,
        Err(status) => status,
    }
}

/// Waits until an open connection is ended by the router; answers whether
/// it said `session_ended` first, and the close code.
async fn ended(c: &mut Client) -> (bool, Option<u16>) {
    let mut said = false;
    loop {
        match c.ws.next_frame(Duration::from_secs(20)).await {
            Ok(Some(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                said |= v["event"] == "session_ended";
            }
            Ok(Some(Message::Close(f))) => return (said, f.map(|f| u16::from(f.code))),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return (said, None),
        }
    }
}

#[tokio::test]
async fn missing_forged_expired_and_revoked_tokens_are_refused_and_non_members_learn_nothing() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(&c, "router1", &["--session-recheck-secs", "1"]).await;
    let short = router(
        &c,
        "short-ttl",
        &["--session-ttl-secs", "2", "--session-recheck-secs", "1"],
    )
    .await;
    let alice = register(&r1.addr, "alice", PW).await.unwrap();
    let bob = register(&r1.addr, "bob", PW).await.unwrap();
    register(&r1.addr, "carol", PW).await.unwrap();

    // Accounts: taken names, bad passwords and unknown users.
    let (s, v) = http(
        &r1.addr,
        "POST",
        "/v1/register",
        None,
        Some(&json!({"username": "Alice", "password": PW})),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("already_exists"))
    );
    for (user, pw) in [("alice", "wrong password"), ("nobody", PW)] {
        let (s, v) = http(
            &r1.addr,
            "POST",
            "/v1/login",
            None,
            Some(&json!({"username": user, "password": pw})),
        )
        .await
        .unwrap();
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("unauthenticated"))
        );
    }

    // Missing and forged tokens.
    assert_eq!(refused(&r1.addr, Auth::None).await, 401);
    let forged = forged_token();
    assert_eq!(forged.len(), 43);
    assert_eq!(refused(&r1.addr, Auth::Header(&forged)).await, 401);
    assert_eq!(refused(&r1.addr, Auth::Query(&forged)).await, 401);
    assert_eq!(refused(&r1.addr, Auth::Header("not-a-token")).await, 401);
    let (s, _) = http(&r1.addr, "POST", "/v1/logout", Some(&forged), None)
        .await
        .unwrap();
    assert_eq!(s, 401);

    // A real token works in the header and in the query; the password hash
    // never reaches a client.
    let ta = login(&r1.addr, "alice", PW, "laptop").await.unwrap();
    let mut a = Client::new(
        ws_connect(&r1.addr, Auth::Query(&ta), None)
            .await
            .unwrap()
            .unwrap(),
    );
    let me = a.call("me", json!({})).await.unwrap();
    assert_eq!(me["user"]["user_id"], json!(alice));
    let mut a2 = Client::connect(&r1.addr, &ta).await.unwrap();
    let other = a2.call("get_user", json!({"user_id": bob})).await.unwrap();
    for v in [&me, &other] {
        let text = v.to_string();
        assert!(
            !text.contains("argon2") && !text.contains("password"),
            "{text}"
        );
    }

    // Revoked: logout ends open connections and refuses the token.
    let (s, _) = http(&r1.addr, "POST", "/v1/logout", Some(&ta), None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(ended(&mut a).await, (true, Some(4001)));
    assert_eq!(ended(&mut a2).await, (true, Some(4001)));
    assert_eq!(refused(&r1.addr, Auth::Header(&ta)).await, 401);
    assert_eq!(refused(&short.addr, Auth::Header(&ta)).await, 401);
    let (s, _) = http(&r1.addr, "POST", "/v1/logout", Some(&ta), None)
        .await
        .unwrap();
    assert_eq!(s, 401);

    // Revoked through another router: the connection there is ended by its
    // periodic re-check.
    let ta = login(&r1.addr, "alice", PW, "tablet").await.unwrap();
    let mut elsewhere = Client::connect(&short.addr, &ta).await.unwrap();
    elsewhere.call("ping", json!({})).await.unwrap();
    let (s, _) = http(&r1.addr, "POST", "/v1/logout", Some(&ta), None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(ended(&mut elsewhere).await, (true, Some(4001)));

    // Expired: a 2 s session works, then is refused; poll until it is.
    let started = Instant::now();
    let tb = login(&short.addr, "bob", PW, "phone").await.unwrap();
    let mut b = Client::connect(&short.addr, &tb).await.unwrap();
    b.call("ping", json!({})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match refused(&short.addr, Auth::Header(&tb)).await {
            401 => break,
            0 => {}
            other => panic!("unexpected status {other}"),
        }
        assert!(Instant::now() < deadline, "the 2 s session never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "expired too early: {:?}",
        started.elapsed()
    );
    assert_eq!(ended(&mut b).await, (true, Some(4001)));
    assert_eq!(refused(&r1.addr, Auth::Header(&tb)).await, 401);

    // Non-members: a group of Alice and Bob is invisible to Carol, exactly
    // like a conversation that doesn't exist.
    let ta = login(&r1.addr, "alice", PW, "laptop").await.unwrap();
    let tc = login(&r1.addr, "carol", PW, "laptop").await.unwrap();
    let mut a = Client::connect(&r1.addr, &ta).await.unwrap();
    let mut carol = Client::connect(&r1.addr, &tc).await.unwrap();
    let group = id_of(
        &a.call(
            "create_group",
            json!({"name": "secret", "member_ids": [bob]}),
        )
        .await
        .unwrap(),
        &["conversation", "id"],
    );
    a.call("send", send(&group, "s1", "for members only"))
        .await
        .unwrap();
    let nowhere = uuid::Uuid::new_v4().to_string();
    for target in [&group, &nowhere] {
        for (op, params) in [
            ("get_conversation", json!({"conversation_id": target})),
            ("sync_conversation", json!({"conversation_id": target})),
            ("history", json!({"conversation_id": target})),
            ("send", send(target, "c1", "let me in")),
            ("mark_read", json!({"conversation_id": target, "seq": 1})),
        ] {
            let r = carol.request(op, params).await.unwrap();
            assert_eq!(r["error"]["code"], "not_found", "{op} on {target}: {r}");
            assert_eq!(r["error"]["message"], "conversation not found", "{op}: {r}");
        }
    }
    // Carol can't even claim to be Alice: identity fields are refused.
    let r = carol
        .request(
            "send",
            json!({"conversation_id": group, "client_msg_id": "x", "text": "hi", "sender_id": alice}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], "invalid_argument", "{r}");
    let page = a
        .call("history", json!({"conversation_id": group}))
        .await
        .unwrap();
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));
}

/// The garbage of the bad-input test, cycling through every kind, with the
/// error code each must get.
fn garbage(i: usize) -> (Message, &'static str) {
    match i % 9 {
        0 => (Message::Text("{not json".into()), "bad_frame"),
        1 => (
            Message::Text(
                json!({"v": 1, "id": i, "op": "no_such_op"})
                    .to_string()
                    .into(),
            ),
            "unknown_op",
        ),
        2 => (
            Message::Text(
                json!({"v": 1, "id": i, "op": "ping", "pad": "x".repeat(100_000)})
                    .to_string()
                    .into(),
            ),
            "too_large",
        ),
        3 => (
            Message::Binary(vec![0xff, 0xfe, 0x00, 0xc3, 0x28].into()),
            "binary_not_supported",
        ),
        4 => (
            Message::Text(json!({"v": 2, "id": i, "op": "ping"}).to_string().into()),
            "unsupported_version",
        ),
        5 => (
            Message::Text(
                json!({"v": 1, "id": i, "op": "send", "conversation_id": 5})
                    .to_string()
                    .into(),
            ),
            "invalid_argument",
        ),
        6 => (Message::Text("[1,2,3]".into()), "bad_frame"),
        7 => (
            Message::Text(json!({"v": 1, "op": "ping"}).to_string().into()),
            "bad_frame",
        ),
        _ => (
            Message::Text(format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into()),
            "bad_frame",
        ),
    }
}

#[tokio::test]
async fn garbage_frames_and_a_client_that_never_reads_leave_other_users_unharmed() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r = router(
        &c,
        "router1",
        &[
            "--ws-queue-bytes",
            "524288",
            "--ws-queue-frames",
            "256",
            "--push-page",
            "10",
        ],
    )
    .await;
    let started_rss = r.rss_kib().unwrap();
    let (mut a, mut b, alice, bob, _ta, _tb) = friends(&r, &r, "alice", "bob").await;
    let conv = id_of(
        &a.call("create_direct", json!({"user_id": bob}))
            .await
            .unwrap(),
        &["conversation", "id"],
    );
    let mut bs = Synced::default();
    let mut chat = 0;
    let mut check_chat = |label: String| {
        chat += 1;
        (chat, label)
    };

    register(&r.addr, "mallory", PW).await.unwrap();
    let tm = login(&r.addr, "mallory", PW, "bot").await.unwrap();

    // 1,000 garbage frames with a valid ping every tenth: each gets its
    // error frame, in order, and the connection stays usable throughout.
    let mut m = Client::connect(&r.addr, &tm).await.unwrap();
    for i in 0..1000 {
        let (frame, code) = garbage(i);
        m.send_raw(frame).await.unwrap();
        let reply = m.ws.next_json(T).await.unwrap();
        assert_eq!(reply["error"]["code"], code, "frame {i}: {reply}");
        if i % 10 == 9 {
            m.call("ping", json!({})).await.unwrap();
        }
        if i % 100 == 99 {
            // Meanwhile Alice and Bob chat through the same router.
            let (n, text) = check_chat(format!("during garbage {i}"));
            a.call("send", send(&conv, &format!("g{n}"), &text))
                .await
                .unwrap();
            sync_until(&mut b, &mut bs, T, |s| s.texts(&conv).contains(&text))
                .await
                .unwrap();
        }
    }
    // Only garbage: after 100 bad frames in a row the router closes (1008).
    // A few more than 100 are sent: the router reads on for a while after
    // closing, but a client still writing long after that gets the socket
    // reset (unread data), and with it loses the close frame.
    let mut m2 = Client::connect(&r.addr, &tm).await.unwrap();
    let mut errors = 0;
    let mut sent = 0;
    for i in 0..150 {
        if m2.send_raw(garbage(i).0).await.is_err() {
            break;
        }
        sent += 1;
    }
    let code = loop {
        match m2.ws.next_frame(T).await {
            Ok(Some(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert!(v["error"]["code"].is_string(), "{v}");
                errors += 1;
            }
            Ok(Some(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break None,
        }
    };
    assert_eq!(
        (errors, code),
        (100, Some(1008)),
        "after {sent} frames sent"
    );

    // Text that isn't UTF-8 (written as a raw masked frame) closes with
    // 1007; a frame above the hard limit (1 MiB) closes with 1009.
    let mut m3 = Client::connect(&r.addr, &tm).await.unwrap();
    let payload = [0xffu8, 0xfe, 0x41];
    let mask = [1u8, 2, 3, 4];
    let mut raw = vec![0x81, 0x80 | payload.len() as u8];
    raw.extend_from_slice(&mask);
    raw.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, k)| b ^ k));
    m3.ws.get_mut().write_all(&raw).await.unwrap();
    assert_eq!(m3.until_closed(T).await.unwrap().0, Some(1007));
    let mut m4 = Client::connect(&r.addr, &tm).await.unwrap();
    let huge = json!({"v": 1, "id": 1, "op": "ping", "pad": "x".repeat(2 << 20)});
    let sent = m4.send_raw(Message::Text(huge.to_string().into())).await;
    let code = m4.until_closed(T).await.unwrap().0;
    // The router may close as soon as the frame's header announces its size,
    // while the client is still writing it: then the client sees a reset
    // instead of the close frame. Either way the connection is closed.
    assert!(
        code == Some(1009) || (sent.is_err() && code.is_none()),
        "{code:?} {sent:?}"
    );

    // Typing reaches the other member (same router).
    a.call("typing", json!({"conversation_id": conv}))
        .await
        .unwrap();
    loop {
        let ev = b.next_event(T).await.unwrap();
        bs.apply(&ev).unwrap();
        if ev["event"] == "typing" {
            assert_eq!(ev["conversation_id"], json!(conv));
            assert_eq!(ev["user_id"], json!(alice));
            break;
        }
    }
    let code = m
        .call_err("typing", json!({"conversation_id": conv}))
        .await
        .unwrap();
    assert_eq!(code, "not_found");

    // A reader that never reads: eight devices of one user in a busy group
    // get more pushed than the router will hold for them.
    let sloth = register(&r.addr, "sloth", PW).await.unwrap();
    let ts = login(&r.addr, "sloth", PW, "idle").await.unwrap();
    let group = id_of(
        &a.call(
            "create_group",
            json!({"name": "busy", "member_ids": [sloth]}),
        )
        .await
        .unwrap(),
        &["conversation", "id"],
    );
    let mut sloths = Vec::new();
    for _ in 0..8 {
        let ws = ws_connect(&r.addr, Auth::Header(&ts), Some(4096))
            .await
            .unwrap()
            .unwrap();
        let mut s = Client::new(ws);
        s.call("resume", json!({})).await.unwrap();
        sloths.push(s);
    }
    let pid_rss = || r.rss_kib().unwrap();
    let before = pid_rss();
    let big = "x".repeat(12_000);
    let mut peak = before;
    for batch in 0..20 {
        let frames: Vec<Value> = (0..30)
            .map(|i| send(&group, &format!("big{batch}-{i}"), &big))
            .collect();
        for f in a.burst("send", frames).await.unwrap() {
            assert!(f.get("ok").is_some(), "{f}");
        }
        peak = peak.max(pid_rss());
    }
    // Each sloth was cut off: its stream ends (after what the kernel
    // buffered) instead of delivering all 600 messages.
    for s in sloths.iter_mut() {
        let (code, frames) = s.until_closed(Duration::from_secs(30)).await.unwrap();
        assert!(matches!(code, None | Some(4008)), "close code {code:?}");
        let delivered: usize = frames
            .iter()
            .filter(|f| f["event"] == "conversation")
            .map(|f| {
                f["changes"]
                    .as_array()
                    .map_or(0, |c| c.iter().filter(|c| !c["message"].is_null()).count())
            })
            .sum();
        eprintln!("slow reader: close {code:?} after {delivered} messages");
        assert!(
            delivered < 600,
            "{delivered} messages delivered: the slow reader was never cut off"
        );
    }
    let after = pid_rss();
    eprintln!(
        "router RSS: {started_rss} KiB at start, {before} KiB before the flood, \
         peak {peak} KiB, {after} KiB after"
    );
    // Unbounded queues would hold ~8 x 7 MB of pushes here.
    assert!(
        peak < before + 48 * 1024,
        "router RSS grew from {before} to {peak} KiB; log:\n{}",
        tail(&r.log, 20)
    );

    // Alice and Bob still chat.
    let (n, text) = check_chat("after the flood".into());
    a.call("send", send(&conv, &format!("g{n}"), &text))
        .await
        .unwrap();
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv).contains(&text))
        .await
        .unwrap();
    assert!(
        http(&r.addr, "GET", "/readyz", None, None).await.unwrap().0 == 200,
        "router not ready after the abuse"
    );
}

/// Whether a node that answers reports a leader of `shard` other than `old`.
async fn has_leader_other_than(c: &Cluster, shard: u32, old: u64) -> bool {
    for id in c.ids() {
        if let Ok(st) = c.status(id).await {
            if st
                .groups
                .iter()
                .any(|g| g.group == shard && g.leader_id != 0 && g.leader_id != old)
            {
                return true;
            }
        }
    }
    false
}

/// The leader of `shard` as node 1..=3 see it (first answer wins).
async fn leader_of(c: &Cluster, shard: u32) -> u64 {
    for id in c.ids() {
        if let Ok(st) = c.status(id).await {
            if let Some(g) = st
                .groups
                .iter()
                .find(|g| g.group == shard && g.leader_id != 0)
            {
                return g.leader_id;
            }
        }
    }
    panic!("shard {shard} has no leader");
}

#[tokio::test]
async fn requests_follow_leader_changes_and_fail_cleanly_at_the_deadline() {
    let mut c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let mut r = router(&c, "router1", &["--request-timeout-ms", "4000"]).await;
    let (mut a, mut b, _alice, bob, _ta, _tb) = friends(&r, &r, "alice", "bob").await;
    let conv = id_of(
        &a.call("create_direct", json!({"user_id": bob}))
            .await
            .unwrap(),
        &["conversation", "id"],
    );
    let shard = natter_model::shard_of(&natter_model::conversation_route_key(&conv), c.shards);
    let mut bs = Synced::default();
    let mut n = 0;
    let mut expect = Vec::new();

    // The shard's leader dies, twice: each send is retried (the cached
    // leader is gone, the survivors redirect to the new one) and pushed.
    for round in 0..2 {
        let leader = leader_of(&c, shard).await;
        c.kill9(leader);
        // What is tested is the router finding the new leader, not how
        // long an election takes on a busy machine: wait for one.
        let deadline = Instant::now() + T;
        while !has_leader_other_than(&c, shard, leader).await {
            assert!(Instant::now() < deadline, "no new leader of shard {shard}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n += 1;
        let text = format!("after crash {round}");
        a.call("send", send(&conv, &format!("m{n}"), &text))
            .await
            .unwrap();
        expect.push(text);
        sync_until(&mut b, &mut bs, T, |s| s.texts(&conv) == expect)
            .await
            .unwrap();
        c.restart(leader).await.unwrap();
    }

    // No majority: the request ends at its deadline with a clear error.
    let first = leader_of(&c, shard).await;
    c.kill9(first);
    let second = c.ids().into_iter().find(|id| *id != first).unwrap();
    c.kill9(second);
    n += 1;
    let lost = send(&conv, &format!("m{n}"), "without a majority");
    let started = Instant::now();
    let code = a.call_err("send", lost.clone()).await.unwrap();
    let took = started.elapsed();
    assert_eq!(code, "timeout");
    assert!(
        took >= Duration::from_millis(3500) && took < Duration::from_secs(10),
        "deadline of 4 s, answered after {took:?}"
    );
    let deadline = Instant::now() + T;
    while http(&r.addr, "GET", "/readyz", None, None).await.unwrap().0 == 200 {
        assert!(Instant::now() < deadline, "still ready without a majority");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Back to full strength: ready again, the retried send lands exactly
    // once, and pushes resume.
    c.spawn(first).unwrap();
    c.spawn(second).unwrap();
    c.wait_ready(Duration::from_secs(60)).await.unwrap();
    r.wait_ready(Duration::from_secs(30)).await.unwrap();
    let again = a.call("send", lost.clone()).await.unwrap();
    let again2 = a.call("send", lost).await.unwrap();
    assert_eq!(again["message"]["seq"], again2["message"]["seq"]);
    assert_eq!(again2["duplicate"], true);
    expect.push("without a majority".into());
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv) == expect)
        .await
        .unwrap();
}

/// Applies B's events until one satisfies `pred`.
async fn event_where(c: &mut Client, s: &mut Synced, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let ev = c.next_event(T).await.unwrap();
        s.apply(&ev).unwrap();
        if pred(&ev) {
            return ev;
        }
    }
}

#[tokio::test]
async fn every_operation_answers_as_documented_and_group_changes_are_pushed() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r = router(&c, "router1", &[]).await;
    let (mut a, mut b, alice, bob, _ta, _tb) = friends(&r, &r, "alice", "bob").await;
    let mut bs = Synced::default();

    // Users and privacy.
    let carol = register(&r.addr, "carol", PW).await.unwrap();
    let tc = login(&r.addr, "carol", PW, "laptop").await.unwrap();
    let mut cc = Client::connect(&r.addr, &tc).await.unwrap();
    let found = a
        .call("lookup_user", json!({"username": "Carol"}))
        .await
        .unwrap();
    assert_eq!(
        found["user"],
        json!({"user_id": carol, "username": "carol"})
    );
    let me = cc
        .call("update_settings", json!({"privacy": "nobody"}))
        .await
        .unwrap();
    assert_eq!(me["user"]["privacy"], "nobody");
    for (op, params) in [
        ("lookup_user", json!({"username": "carol"})),
        ("friend_request", json!({"user_id": carol})),
    ] {
        assert_eq!(a.call_err(op, params).await.unwrap(), "not_found", "{op}");
    }
    // Bob is Alice's friend: visible whatever his setting.
    b.call("update_settings", json!({"privacy": "nobody"}))
        .await
        .unwrap();
    let found = a
        .call("lookup_user", json!({"username": "bob"}))
        .await
        .unwrap();
    assert_eq!(found["user"]["user_id"], json!(bob));
    assert_eq!(
        a.call_err("update_settings", json!({"privacy": "secret"}))
            .await
            .unwrap(),
        "invalid_argument"
    );

    // Friends.
    let fr = a
        .call("get_friendship", json!({"user_id": bob}))
        .await
        .unwrap();
    assert_eq!(fr["friendship"]["relation"], "friend");
    // The friend list (on each user's shard) follows the friendship
    // through the durable outbox: within milliseconds, not in the same
    // commit. Clients re-read it on the `friends` event.
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let list = b.call("list_friends", json!({})).await.unwrap();
        if list["friends"][0]["relation"] == "friend" {
            break list;
        }
        assert!(Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(list["friends"][0]["user_id"], json!(alice));
    assert_eq!(list["friends"].as_array().map(Vec::len), Some(1));
    event_where(&mut b, &mut bs, |e| e["event"] == "friends").await;

    // A group: create, rename, roles, members; Bob gets each change pushed.
    let group = id_of(
        &a.call(
            "create_group",
            json!({"name": "plans", "member_ids": [bob, carol]}),
        )
        .await
        .unwrap(),
        &["conversation", "id"],
    );
    let sent = a.call("send", send(&group, "p1", "first")).await.unwrap();
    let seq = sent["message"]["seq"].as_u64().unwrap();
    sync_until(&mut b, &mut bs, T, |s| s.texts(&group) == ["first"])
        .await
        .unwrap();
    let conv = a
        .call(
            "update_conversation",
            json!({"conversation_id": group, "name": "new plans",
                   "set_roles": [{"user_id": bob, "role": "admin"}]}),
        )
        .await
        .unwrap();
    assert_eq!(conv["conversation"]["name"], "new plans");
    let ev = event_where(&mut b, &mut bs, |e| {
        e["event"] == "conversation"
            && e["changes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["conversation"]["name"] == "new plans")
    })
    .await;
    let meta = ev["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| !c["conversation"].is_null())
        .unwrap();
    assert_eq!(meta["conversation"]["my_role"], "admin");

    // Reads, marks and deletes.
    let got = b
        .call("get_conversation", json!({"conversation_id": group}))
        .await
        .unwrap();
    assert_eq!(got["conversation"]["my_unread_count"], 1);
    let marked = b
        .call("mark_read", json!({"conversation_id": group, "seq": seq}))
        .await
        .unwrap();
    assert_eq!(marked["conversation"]["my_last_read_seq"], seq);
    let synced = b
        .call(
            "sync_conversation",
            json!({"conversation_id": group, "limit": 10}),
        )
        .await
        .unwrap();
    assert_eq!(synced["cold_start"], true);
    let token = synced["token"].as_u64().unwrap();
    assert_eq!(
        b.call_err("history", json!({"conversation_id": group, "limit": 101}))
            .await
            .unwrap(),
        "limit_exceeded"
    );
    let gone = a
        .call(
            "delete_message",
            json!({"conversation_id": group, "seq": seq, "for_everyone": true}),
        )
        .await
        .unwrap();
    assert_eq!(gone["message"]["deleted"], true);
    assert_eq!(gone["message"]["text"], "");
    sync_until(&mut b, &mut bs, T, |s| s.texts(&group).is_empty())
        .await
        .unwrap();
    let delta = b
        .call(
            "sync_conversation",
            json!({"conversation_id": group, "token": token}),
        )
        .await
        .unwrap();
    assert_eq!(delta["cold_start"], false);
    assert!(delta["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["message"]["deleted"] == true));

    // The feed: pages, flags, delta.
    let direct = id_of(
        &a.call("create_direct", json!({"user_id": bob}))
            .await
            .unwrap(),
        &["conversation", "id"],
    );
    a.call("send", send(&direct, "d1", "hi")).await.unwrap();
    sync_until(&mut b, &mut bs, T, |s| s.feed.len() == 2)
        .await
        .unwrap();
    let feed = b.call("get_feed", json!({"limit": 1})).await.unwrap();
    assert_eq!(feed["entries"].as_array().map(Vec::len), Some(1));
    assert_eq!(feed["has_more"], true);
    let next = b
        .call("get_feed", json!({"limit": 1, "cursor": feed["cursor"]}))
        .await
        .unwrap();
    assert_eq!(next["entries"].as_array().map(Vec::len), Some(1));
    assert_ne!(next["entries"][0], feed["entries"][0]);
    assert!(next["cursor"].is_null());
    let ftoken = b.call("sync_feed", json!({})).await.unwrap()["token"]
        .as_u64()
        .unwrap();
    let flagged = b
        .call(
            "set_feed_flags",
            json!({"conversation_id": group, "muted": true}),
        )
        .await
        .unwrap();
    assert_eq!(flagged["entry"]["muted"], true);
    let fdelta = b.call("sync_feed", json!({"token": ftoken})).await.unwrap();
    assert!(fdelta["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["conversation_id"] == json!(group) && e["muted"] == true));

    // Carol leaves; deleting for everyone removes the group from Bob's
    // pushed feed.
    cc.call(
        "update_conversation",
        json!({"conversation_id": group, "remove_member_ids": [carol]}),
    )
    .await
    .unwrap();
    assert_eq!(
        cc.call_err("get_conversation", json!({"conversation_id": group}))
            .await
            .unwrap(),
        "not_found"
    );
    a.call(
        "delete_conversation",
        json!({"conversation_id": group, "for_everyone": true}),
    )
    .await
    .unwrap();
    sync_until(&mut b, &mut bs, T, |s| !s.feed.contains_key(&group))
        .await
        .unwrap();

    // Block and unblock: strangers again, so Bob's "nobody" setting hides
    // him until he opens up.
    for (op, rel) in [("friend_block", "blocked"), ("friend_unblock", "none")] {
        let f = a.call(op, json!({"user_id": bob})).await.unwrap();
        assert_eq!(f["friendship"]["relation"], rel, "{op}");
    }
    assert_eq!(
        a.call_err("friend_request", json!({"user_id": bob}))
            .await
            .unwrap(),
        "not_found"
    );
    b.call("update_settings", json!({"privacy": "everyone"}))
        .await
        .unwrap();
    for (op, rel) in [("friend_request", "outgoing"), ("friend_remove", "none")] {
        let f = a.call(op, json!({"user_id": bob})).await.unwrap();
        assert_eq!(f["friendship"]["relation"], rel, "{op}");
    }
    let u = b.call("get_user", json!({"user_id": alice})).await.unwrap();
    assert_eq!(u["user"], json!({"user_id": alice, "username": "alice"}));
}
