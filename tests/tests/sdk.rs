//! The Rust SDK (`natter-client`) against a real cluster: 3 nodes and 2
//! routers. What an app relies on: a message written while offline goes
//! out exactly once when a router is reachable again (the queue survives a
//! restart of the app); the cache survives a restart and is not fetched
//! again; after 1,000 missed messages delta sync fetches exactly those; a
//! non-member is refused; and when a router is killed under load, clients
//! configured with both routers move to the other one and every
//! acknowledged message is in every member's view exactly once, in order.

use std::collections::HashMap;
use std::time::Duration;

use natter_tests::router::RouterProc;
use natter_tests::sdk::{account, befriend, check_view, open, until_cached};
use natter_tests::{free_port, Cluster, ClusterOpts};

const T: Duration = Duration::from_secs(60);

async fn router(c: &Cluster, name: &str) -> RouterProc {
    RouterProc::start(c.dir.path(), name, &c.addrs(), &[])
        .await
        .expect("router starts")
}

#[tokio::test]
async fn offline_queue_restarts_and_delta_sync_of_a_thousand_missed_messages() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(&c, "router1").await;
    let r2 = router(&c, "router2").await;
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("127.0.0.1:{}", free_port());

    let alice = open(dir.path(), "alice", &[&r1.addr]).unwrap();
    let bob = open(dir.path(), "bob", &[&r2.addr]).unwrap();
    let carol = open(dir.path(), "carol", &[&r1.addr]).unwrap();
    let a_id = account(&alice, "alice").await.unwrap();
    let b_id = account(&bob, "bob").await.unwrap();
    account(&carol, "carol").await.unwrap();
    befriend(&alice, &bob, &b_id, &a_id).await.unwrap();
    let conv = alice.create_direct(&b_id).await.unwrap().id;
    alice.start().unwrap();
    bob.start().unwrap();
    alice.wait_connected(T).await.unwrap();
    bob.wait_connected(T).await.unwrap();
    alice.send_text(&conv, "hello").unwrap();
    alice.flush(T).await.unwrap();
    until_cached(&bob, &conv, T, |m| m.len() == 1)
        .await
        .unwrap();

    // A non-member can't read the conversation.
    let e = carol.history(&conv, 0, 10).await.unwrap_err();
    assert_eq!(e.code(), "not_found", "{e}");

    // Offline: Alice's app only knows a dead router; sends are queued and
    // tried (and fail), then the app quits.
    alice.stop();
    drop(alice);
    {
        let offline = open(dir.path(), "alice", &[&dead]).unwrap();
        offline.start().unwrap();
        for i in 0..5 {
            offline.send_text(&conv, &format!("offline {i}")).unwrap();
        }
        let deadline = std::time::Instant::now() + T;
        while offline.pending().unwrap().iter().all(|p| p.attempts == 0) {
            assert!(std::time::Instant::now() < deadline, "never tried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(offline.flush(Duration::from_millis(300)).await.is_err());
        assert_eq!(offline.pending().unwrap().len(), 5);
        offline.stop();
    }
    // Restarted with a reachable router: the queue goes out, exactly once.
    let alice = open(dir.path(), "alice", &[&dead, &r1.addr]).unwrap();
    assert_eq!(alice.pending().unwrap().len(), 5, "the queue survived");
    alice.start().unwrap();
    alice.flush(T).await.unwrap();
    assert_eq!(alice.stats().sends_acked, 5);
    let msgs = until_cached(&bob, &conv, T, |m| m.len() == 6)
        .await
        .unwrap();
    let sent = HashMap::from([(
        a_id.clone(),
        msgs.iter().map(|m| m.client_msg_id.clone()).collect(),
    )]);
    check_view(&msgs, &sent).unwrap();
    let texts: Vec<&str> = msgs.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "hello",
            "offline 0",
            "offline 1",
            "offline 2",
            "offline 3",
            "offline 4"
        ]
    );
    let (server, _) = alice.history(&conv, 0, 100).await.unwrap();
    assert_eq!(server.len(), 6, "each message exactly once on the server");

    // Bob's app restarts: the cache is there offline, and resuming fetches
    // nothing it had (only the one new message).
    bob.stop();
    drop(bob);
    let bob = open(dir.path(), "bob", &[&r2.addr]).unwrap();
    assert_eq!(bob.messages(&conv, 100).unwrap().len(), 6, "offline read");
    assert!(bob
        .feed()
        .unwrap()
        .iter()
        .any(|f| f.conversation_id == conv));
    bob.start().unwrap();
    bob.wait_connected(T).await.unwrap();
    alice.send_text(&conv, "after restart").unwrap();
    alice.flush(T).await.unwrap();
    until_cached(&bob, &conv, T, |m| m.len() == 7)
        .await
        .unwrap();
    assert_eq!(bob.stats().messages_fetched, 1, "{:?}", bob.stats());

    // 1,000 messages while Bob is away: delta sync fetches exactly those.
    bob.stop();
    drop(bob);
    for i in 0..1000 {
        alice.send_text(&conv, &format!("missed {i}")).unwrap();
    }
    alice.flush(Duration::from_secs(300)).await.unwrap();
    let bob = open(dir.path(), "bob", &[&r2.addr]).unwrap();
    bob.start().unwrap();
    let msgs = until_cached(&bob, &conv, T, |m| m.len() == 1007)
        .await
        .unwrap();
    assert_eq!(msgs.last().map(|m| m.text.as_str()), Some("missed 999"));
    let s = bob.stats();
    assert_eq!(s.messages_fetched, 1000, "{s:?}");
    check_view(
        &msgs,
        &HashMap::from([(
            a_id.clone(),
            msgs.iter().map(|m| m.client_msg_id.clone()).collect(),
        )]),
    )
    .unwrap();
}

#[tokio::test]
async fn a_router_killed_under_load_loses_nothing() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(&c, "router1").await;
    let r2 = router(&c, "router2").await;
    let dir = tempfile::tempdir().unwrap();
    let names = ["alice", "bob", "carol"];
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for (i, n) in names.iter().enumerate() {
        // Two start on router 1 (the one that dies), one on router 2.
        let order = if i < 2 {
            [r1.addr.as_str(), r2.addr.as_str()]
        } else {
            [r2.addr.as_str(), r1.addr.as_str()]
        };
        let cl = open(dir.path(), n, &order).unwrap();
        ids.push(account(&cl, n).await.unwrap());
        clients.push(cl);
    }
    let group = clients[0]
        .create_group("load", vec![ids[1].clone(), ids[2].clone()])
        .await
        .unwrap()
        .id;
    for cl in &clients {
        cl.start().unwrap();
        cl.wait_connected(T).await.unwrap();
    }
    const N: usize = 150;
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..N {
        for (k, cl) in clients.iter().enumerate() {
            let id = cl.send_text(&group, &format!("{} {i}", names[k])).unwrap();
            sent.entry(ids[k].clone()).or_default().push(id);
        }
    }
    // Kill -9 router 1 once the load is under way.
    let deadline = std::time::Instant::now() + T;
    while clients[0].stats().sends_acked < (N / 4) as u64 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(r1);
    for cl in &clients {
        cl.flush(T).await.unwrap();
        assert_eq!(cl.current_router(), r2.addr, "moved to the live router");
    }
    let mut views = Vec::new();
    for cl in &clients {
        let v = until_cached(cl, &group, T, |m| m.len() == 3 * N)
            .await
            .unwrap();
        check_view(&v, &sent).unwrap();
        views.push(v);
    }
    assert!(
        views.windows(2).all(|w| w[0] == w[1]),
        "members' views differ"
    );
    assert!(clients[0].stats().connects >= 2, "alice reconnected");
}
