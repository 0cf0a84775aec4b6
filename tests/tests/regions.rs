//! Two regions on one machine: 3 nodes (one global cluster), router A in
//! region "a" and router B in region "b", each knowing the other's URL.
//! What users rely on: a user homed in b who logs in at A is sent to B
//! (with B's URL) and gets no session at A; a session of that user can't
//! open a stream at A either; once at B, they chat live, both ways, with a
//! user homed in a who is connected to A.

use natter_tests::router::{
    http, login, register, sync_until, ws_connect, Auth, Client, RouterProc, Synced, T,
};
use natter_tests::{free_port, Cluster, ClusterOpts};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

fn send(conv: &str, cmid: &str, text: &str) -> Value {
    json!({"conversation_id": conv, "client_msg_id": cmid, "text": text})
}

#[tokio::test]
async fn a_user_homed_elsewhere_is_sent_to_their_region_and_chats_across_regions() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let addr_a = format!("127.0.0.1:{}", free_port());
    let addr_b = format!("127.0.0.1:{}", free_port());
    let (url_a, url_b) = (format!("http://{addr_a}"), format!("http://{addr_b}"));
    let ra = RouterProc::start_at(
        c.dir.path(),
        "router-a",
        addr_a.clone(),
        &c.addrs(),
        &["--region", "a", "--region-router", &format!("b={url_b}")],
    )
    .await
    .unwrap();
    let rb = RouterProc::start_at(
        c.dir.path(),
        "router-b",
        addr_b.clone(),
        &c.addrs(),
        &["--region", "b", "--region-router", &format!("a={url_a}")],
    )
    .await
    .unwrap();

    // Sign-up homes a user in the router's region.
    let alice = register(&ra.addr, "alice", PW).await.unwrap();
    let bob = register(&rb.addr, "bob", PW).await.unwrap();

    // Bob logs in at A: 421 wrong_region naming b and B's URL; no token.
    let creds = json!({"username": "bob", "password": PW, "device": "phone"});
    let (s, v) = http(&ra.addr, "POST", "/v1/login", None, Some(&creds))
        .await
        .unwrap();
    assert_eq!(s, 421, "{v}");
    assert_eq!(v["error"]["code"], "wrong_region", "{v}");
    assert_eq!(v["error"]["home_region"], "b", "{v}");
    assert_eq!(v["error"]["router_url"], json!(url_b), "{v}");
    assert!(v.get("token").is_none());
    // The redirect needs the right password: a wrong one is just 401, so
    // nobody learns where a user lives without it.
    let wrong = json!({"username": "bob", "password": "not his password"});
    let (s, v) = http(&ra.addr, "POST", "/v1/login", None, Some(&wrong))
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );

    // He follows the URL and logs in at B.
    let follow = v_url(&url_b);
    let tb = login(&follow, "bob", PW, "phone").await.unwrap();
    // A session of Bob can't open a stream at A: an error frame naming B,
    // then close 4010.
    let ws = ws_connect(&ra.addr, Auth::Header(&tb), None)
        .await
        .unwrap()
        .expect("upgraded");
    let mut stray = Client::new(ws);
    let (code, frames) = stray.until_closed(T).await.unwrap();
    assert_eq!(code, Some(4010), "{frames:?}");
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["error"]["code"], "wrong_region");
    assert_eq!(frames[0]["error"]["home_region"], "b");
    assert_eq!(frames[0]["error"]["router_url"], json!(url_b));

    // Alice is served at A and sent to A from B.
    let ta = login(&ra.addr, "alice", PW, "laptop").await.unwrap();
    let (s, v) = http(
        &rb.addr,
        "POST",
        "/v1/login",
        None,
        Some(&json!({"username": "alice", "password": PW})),
    )
    .await
    .unwrap();
    assert_eq!((s, v["error"]["router_url"].clone()), (421, json!(url_a)));

    let mut a = Client::connect(&ra.addr, &ta).await.unwrap();
    let mut b = Client::connect(&follow, &tb).await.unwrap();
    assert_eq!(
        a.call("me", json!({})).await.unwrap()["user"]["home_region"],
        "a"
    );
    assert_eq!(
        b.call("me", json!({})).await.unwrap()["user"]["home_region"],
        "b"
    );
    a.call("resume", json!({})).await.unwrap();
    b.call("resume", json!({})).await.unwrap();
    a.call("friend_request", json!({"user_id": bob}))
        .await
        .unwrap();
    b.call("friend_accept", json!({"user_id": alice}))
        .await
        .unwrap();
    let conv = a
        .call("create_direct", json!({"user_id": bob}))
        .await
        .unwrap()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Live on their streams, both ways, three rounds.
    let (mut sa, mut sb) = (Synced::default(), Synced::default());
    for i in 0..3 {
        let to_b = format!("a->b {i}");
        a.call("send", send(&conv, &format!("a{i}"), &to_b))
            .await
            .unwrap();
        sync_until(&mut b, &mut sb, T, |s| s.texts(&conv).contains(&to_b))
            .await
            .unwrap();
        let to_a = format!("b->a {i}");
        b.call("send", send(&conv, &format!("b{i}"), &to_a))
            .await
            .unwrap();
        sync_until(&mut a, &mut sa, T, |s| s.texts(&conv).contains(&to_a))
            .await
            .unwrap();
    }
    let want: Vec<String> = (0..3)
        .flat_map(|i| [format!("a->b {i}"), format!("b->a {i}")])
        .collect();
    sync_until(&mut a, &mut sa, T, |s| s.texts(&conv) == want)
        .await
        .unwrap();
    sync_until(&mut b, &mut sb, T, |s| s.texts(&conv) == want)
        .await
        .unwrap();
}

/// The `host:port` of a router URL, as the test client dials it.
fn v_url(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}
