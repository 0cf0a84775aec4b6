//! Offline notifications, presence and cross-router typing on real
//! processes: 3 nodes (each with the notifier, pointed at a webhook
//! receiver inside the test) and 2 routers.
//!
//! What users rely on: a message to someone connected is pushed and not
//! also notified; someone offline gets exactly one signed webhook POST per
//! message, retried with the same delivery id when the receiver fails;
//! the notification setting and muted conversations are honoured; coming
//! back, the device delta-syncs with no gap and no duplicate. Friends see
//! each other come online and go offline (with a last seen); typing on
//! one router reaches the other router.
//!
//! "No POST" is never judged by waiting: the test waits until the
//! message is in the recipient's feed (the command that would enqueue the
//! notification) and the user's queue is empty (the notifier handled it),
//! and only then checks what the receiver got.

use std::time::{Duration, Instant};

use natter_model::pb::{self, command::Op, query::Q, response::R};
use natter_tests::natter::Natter;
use natter_tests::router::{login, register, sync_until, Client, RouterProc, Synced, T};
use natter_tests::webhook::Receiver;
use natter_tests::{Cluster, ClusterOpts, ShardClient};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";
const SECRET: &str = "test webhook secret";

async fn cluster(hook: Option<&Receiver>) -> Cluster {
    let mut opts = ClusterOpts::default();
    opts.node_args
        .extend(["--presence-lease-ms".to_string(), "3000".to_string()]);
    if let Some(h) = hook {
        opts.node_args.extend([
            "--webhook-url".to_string(),
            h.url.clone(),
            "--webhook-secret".to_string(),
            SECRET.to_string(),
        ]);
    }
    Cluster::start(opts).await.expect("cluster starts")
}

async fn router(c: &Cluster, name: &str) -> RouterProc {
    RouterProc::start(c.dir.path(), name, &c.addrs(), &[])
        .await
        .expect("router starts")
}

/// Two friends, each connected to a router and resumed; answers their
/// clients, ids and tokens, and their direct conversation.
async fn friends(
    ra: &RouterProc,
    rb: &RouterProc,
) -> (Client, Client, String, String, String, String) {
    let (mut a, b, ida, idb, _, tb) =
        natter_tests::router::friends(&ra.addr, &rb.addr, "alice", "bob", PW)
            .await
            .unwrap();
    let conv = natter_tests::router::direct_with(&mut a, &idb)
        .await
        .unwrap();
    (a, b, ida, idb, tb, conv)
}

async fn send(c: &mut Client, conv: &str, text: &str) -> u64 {
    let r = c
        .call(
            "send",
            json!({"conversation_id": conv, "client_msg_id": text, "text": text}),
        )
        .await
        .unwrap();
    r["message"]["seq"].as_u64().unwrap()
}

/// Follows `user`'s presence (get_presence) and waits until it is
/// `online`; answers the last presence seen.
async fn await_presence(c: &mut Client, user: &str, online: bool) -> Value {
    let r = c
        .call("get_presence", json!({"user_ids": [user]}))
        .await
        .unwrap();
    let now = &r["users"][0];
    assert_eq!(now["user_id"], user, "{r}");
    if now["online"] == online {
        return now.clone();
    }
    let deadline = Instant::now() + T;
    loop {
        let ev = c
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|e| panic!("no presence event online={online} for {user}: {e}"));
        if ev["event"] == "presence" && ev["user_id"] == user && ev["online"] == online {
            return ev;
        }
    }
}

/// Waits until `cond` holds for a cluster answer (polling the cluster).
async fn until<F: Fn(&R) -> bool>(n: &Natter, q: Q, what: &str, cond: F) {
    let deadline = Instant::now() + T;
    loop {
        let r = n.query(q.clone()).await.unwrap();
        if cond(&r) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The message is in the user's feed: the command that enqueues (or
/// doesn't) its notification has applied.
async fn in_feed(n: &Natter, user: &str, conv: &str, seq: u64) {
    let q = Q::GetFeed(pb::GetFeed {
        user_id: user.into(),
        limit: 500,
        cursor: Vec::new(),
    });
    until(n, q, "message in the feed", |r| match r {
        R::Feed(p) => p.entries.iter().any(|e| {
            e.conversation
                .as_ref()
                .is_some_and(|c| c.conversation_id == conv && c.last_seq >= seq)
        }),
        _ => false,
    })
    .await;
}

/// The user's notification queue is empty (the notifier handled it all).
async fn drained(n: &Natter, user: &str) {
    let q = Q::PendingNotifications(pb::PendingNotifications {
        limit: 10,
        after: Vec::new(),
        user_id: user.into(),
    });
    until(
        n,
        q,
        "notification queue drained",
        |r| matches!(r, R::Notifications(b) if b.notifications.is_empty()),
    )
    .await;
}

async fn set_notifications(n: &Natter, user: &str, v: pb::Notifications) {
    let r = n
        .exec(Op::UpdateUserSettings(pb::UpdateUserSettings {
            user_id: user.into(),
            notifications: Some(v as i32),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(matches!(r, R::User(_)), "{r:?}");
}

async fn mute(n: &Natter, user: &str, conv: &str, muted: bool) {
    let r = n
        .exec(Op::SetFeedFlags(pb::SetFeedFlags {
            user_id: user.into(),
            conversation_id: conv.into(),
            muted: Some(muted),
            archived: None,
        }))
        .await
        .unwrap();
    assert!(matches!(r, R::FeedEntry(_)), "{r:?}");
}

#[tokio::test]
async fn offline_users_get_exactly_one_signed_webhook_per_message_and_online_ones_none() {
    let mut hook = Receiver::start(SECRET).await.unwrap();
    let c = cluster(Some(&hook)).await;
    let r1 = router(&c, "router1").await;
    let r2 = router(&c, "router2").await;
    let natter = Natter::new(ShardClient::new(c.addrs()), c.shards);
    let (mut a, mut b, ida, idb, tb, conv) = friends(&r1, &r2).await;

    // Bob is online (Alice sees it): her message is pushed to him on router
    // 2, and no webhook is sent.
    await_presence(&mut a, &idb, true).await;
    let mut bs = Synced::default();
    let s1 = send(&mut a, &conv, "m1").await;
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv) == ["m1"])
        .await
        .unwrap();
    in_feed(&natter, &idb, &conv, s1).await;
    drained(&natter, &idb).await;
    assert!(hook.drain().is_empty(), "an online user was notified");

    // Bob goes offline (Alice sees it): exactly one signed POST.
    b.ws.close(None).await.ok();
    drop(b);
    let gone = await_presence(&mut a, &idb, false).await;
    assert!(gone["last_seen_ms"].as_u64().unwrap_or(0) > 0, "{gone}");
    let s2 = send(&mut a, &conv, "m2").await;
    let p = hook.next(T).await.unwrap();
    assert!(p.signature_ok, "bad signature: {p:?}");
    assert!(!p.timestamp.is_empty());
    assert_eq!(p.status, 200);
    assert_eq!(
        p.body["id"],
        json!(p.delivery),
        "delivery id = notification id"
    );
    assert_eq!(p.body["user_id"], json!(idb));
    assert_eq!(p.body["conversation_id"], json!(conv));
    assert_eq!(p.body["conversation_kind"], "direct");
    assert_eq!(p.body["seq"], json!(s2));
    assert_eq!(p.body["sender_id"], json!(ida));
    assert_eq!(p.body["preview"], "m2");
    drained(&natter, &idb).await;
    assert!(hook.drain().is_empty(), "a second POST for one message");

    // The receiver fails once: retried, with the same delivery id.
    hook.fail_next(1);
    let s3 = send(&mut a, &conv, "m3").await;
    let first = hook.next(T).await.unwrap();
    let second = hook.next(T).await.unwrap();
    assert_eq!((first.status, second.status), (500, 200));
    assert_eq!(first.delivery, second.delivery);
    assert!(first.signature_ok && second.signature_ok);
    assert_eq!(second.body["seq"], json!(s3));
    assert_ne!(second.delivery, p.delivery);
    drained(&natter, &idb).await;
    assert!(hook.drain().is_empty(), "POSTed again after a 2xx");

    // Setting NONE: nothing. A muted conversation: nothing.
    set_notifications(&natter, &idb, pb::Notifications::None).await;
    let s4 = send(&mut a, &conv, "m4").await;
    in_feed(&natter, &idb, &conv, s4).await;
    drained(&natter, &idb).await;
    set_notifications(&natter, &idb, pb::Notifications::All).await;
    mute(&natter, &idb, &conv, true).await;
    let s5 = send(&mut a, &conv, "m5").await;
    in_feed(&natter, &idb, &conv, s5).await;
    drained(&natter, &idb).await;
    assert!(hook.drain().is_empty(), "notified despite NONE or mute");
    // Unmuted, the next message is notified — and it is the next POST.
    mute(&natter, &idb, &conv, false).await;
    let s6 = send(&mut a, &conv, "m6").await;
    let p = hook.next(T).await.unwrap();
    assert_eq!(p.body["seq"], json!(s6), "{p:?}");
    assert!(p.signature_ok);
    drained(&natter, &idb).await;
    assert!(hook.drain().is_empty());

    // Bob comes back: delta sync from his tokens, no gap, no duplicate
    // (Synced::apply checks every page continues from his token).
    let mut b = Client::connect(&r2.addr, &tb).await.unwrap();
    let seen = bs.received.len();
    b.call("resume", bs.resume_params()).await.unwrap();
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv).len() == 6)
        .await
        .unwrap();
    let s7 = send(&mut a, &conv, "m7").await;
    sync_until(&mut b, &mut bs, T, |s| s.texts(&conv).len() == 7)
        .await
        .unwrap();
    let got = bs.received_since(seen, &conv);
    assert_eq!(got, ["m2", "m3", "m4", "m5", "m6", "m7"]);
    // Online again: m7 is not notified.
    in_feed(&natter, &idb, &conv, s7).await;
    drained(&natter, &idb).await;
    assert!(hook.drain().is_empty(), "notified while online");
}

#[tokio::test]
async fn friends_see_presence_and_typing_crosses_routers() {
    let c = cluster(None).await;
    let r1 = router(&c, "router1").await;
    let r2 = router(&c, "router2").await;
    let natter = Natter::new(ShardClient::new(c.addrs()), c.shards);
    let (mut a, mut b, ida, idb, _tb, conv) = friends(&r1, &r2).await;

    // Bob sees Alice online, then offline with a last seen.
    await_presence(&mut b, &ida, true).await;
    let ta = login(&r1.addr, "alice", PW, "tablet").await.unwrap();
    a.ws.close(None).await.ok();
    drop(a);
    let off = await_presence(&mut b, &ida, false).await;
    let last_seen = off["last_seen_ms"].as_u64().unwrap_or(0);
    assert!(last_seen > 0, "{off}");
    // Last seen is durable (a Raft command on Alice's shard).
    until(
        &natter,
        Q::GetLastSeen(pb::GetLastSeen {
            user_id: ida.clone(),
        }),
        "last seen recorded",
        |r| matches!(r, R::LastSeen(l) if l.last_seen_ms > 0),
    )
    .await;
    let r = b
        .call("get_presence", json!({"user_ids": [ida]}))
        .await
        .unwrap();
    assert_eq!(r["users"][0]["online"], false, "{r}");
    assert!(r["users"][0]["last_seen_ms"].as_u64().unwrap_or(0) > 0);

    // Someone who isn't a friend is not visible; bad ids are refused.
    let idc = register(&r1.addr, "carol", PW).await.unwrap();
    let r = b
        .call("get_presence", json!({"user_ids": [idc]}))
        .await
        .unwrap();
    assert_eq!(r["users"], json!([]), "{r}");
    assert_eq!(
        b.call_err("get_presence", json!({"user_ids": ["nope"]}))
            .await
            .unwrap(),
        "invalid_argument"
    );

    // Alice comes back on router 1 (Bob sees it) and types: Bob on router 2
    // gets it.
    let mut a = Client::connect(&r1.addr, &ta).await.unwrap();
    a.call("resume", json!({})).await.unwrap();
    let mut bs = Synced::default();
    let mut as_ = Synced::default();
    send(&mut a, &conv, "hello").await;
    sync_until(&mut a, &mut as_, T, |s| s.texts(&conv) == ["hello"])
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    let mut online = false;
    let mut synced = false;
    while !(online && synced) {
        let ev = b
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap();
        online |= ev["event"] == "presence" && ev["user_id"] == ida && ev["online"] == true;
        bs.apply(&ev).unwrap();
        synced = bs.texts(&conv) == ["hello"];
    }
    a.call("typing", json!({"conversation_id": conv}))
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let ev = b
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
            .expect("typing event on router 2");
        if ev["event"] == "typing" {
            assert_eq!(ev["conversation_id"], json!(conv));
            assert_eq!(ev["user_id"], json!(ida));
            break;
        }
    }
    // Typing in a conversation one doesn't track is refused.
    assert_eq!(
        a.call_err(
            "typing",
            json!({"conversation_id": "00000000-0000-4000-8000-000000000001"})
        )
        .await
        .unwrap(),
        "not_found"
    );
    let _ = idb;
}
