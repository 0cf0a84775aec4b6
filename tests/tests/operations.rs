//! Issue 8's must-shows on real node processes: growing a cluster 3 → 4 → 5
//! under writes (replicas and leaders even out, nothing lost), draining and
//! removing a node under writes (nothing lost, its process then stops
//! unnoticed, and it refuses to come back), a rolling restart under load
//! (writes flow in every window), and `natter-admin status --json` plus a
//! metrics scrape.

use std::time::{Duration, Instant};

use natter_proto::cluster::{GroupStatus, StatusReply};
use natter_tests::ops::{
    admin, admin_status_healthy, check_acked, conversation_per_shard, http_get, metrics_args,
    natter, opts, sample, Load,
};
use natter_tests::{Cluster, ClusterOpts};

const WAIT: Duration = Duration::from_secs(180);

/// `shard`'s group in a node's status.
fn group_of(st: StatusReply, shard: u32) -> Option<GroupStatus> {
    st.groups.into_iter().find(|g| g.group == shard)
}

/// Polls `shard`'s `leader` and its followers until `holds(leader's status,
/// follower's status)` for every follower; fails with `what` after [`WAIT`].
async fn wait_for_followers(
    c: &Cluster,
    shard: u32,
    leader: u64,
    what: &str,
    holds: impl Fn(&GroupStatus, &GroupStatus) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let g = group_of(c.status(leader).await.unwrap(), shard).unwrap();
        let mut all = true;
        for v in g.voters.iter().filter(|v| **v != leader) {
            all &= group_of(c.status(*v).await.unwrap(), shard).is_some_and(|f| holds(&g, &f));
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {g:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn timing_args() -> Vec<String> {
    ClusterOpts::default().node_args
}

#[tokio::test]
async fn growing_from_three_to_five_nodes_under_writes_spreads_replicas_and_leaders() {
    let mut c = Cluster::start(opts(6)).await.unwrap();
    let n = natter(&c);
    let convs = conversation_per_shard(&n).await.unwrap();
    let load = Load::start(&n, &convs);
    load.wait_for_more(20, WAIT).await.unwrap();

    for expected_nodes in [4usize, 5] {
        let id = c.join_node(1, &timing_args()).await.unwrap();
        let b = c.wait_balanced(WAIT).await.unwrap();
        assert_eq!(b.replicas.len(), expected_nodes, "{b:?}");
        assert!(b.replicas[&id] > 0, "new node {id} got no replica: {b:?}");
        let counts: Vec<usize> = b.replicas.values().copied().collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "replicas not even: {b:?}");
        assert!(
            b.leads
                .values()
                .all(|l| *l <= 6usize.div_ceil(expected_nodes) + 1),
            "leaders not spread: {b:?}"
        );
        for voters in b.voters.values() {
            assert_eq!(voters.len(), 3, "{b:?}");
        }
        // Writes keep being acknowledged after the move.
        load.wait_for_more(20, WAIT).await.unwrap();
    }
    // Ids are fresh: 4 then 5.
    let ids = c
        .shard_map()
        .await
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.id)
        .collect::<Vec<_>>();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);

    let acked = load.finish().await;
    let total = check_acked(&natter(&c), &acked).await.unwrap();
    assert!(total > 0);
}

#[tokio::test]
async fn draining_and_removing_a_node_under_writes_loses_nothing_and_it_stays_out() {
    let mut c = Cluster::start(opts(4)).await.unwrap();
    let joined = c.join_node(1, &timing_args()).await.unwrap();
    assert_eq!(joined, 4);
    c.wait_balanced(WAIT).await.unwrap();
    let node2 = c.node(2).addr.clone();
    let n = natter(&c);
    let convs = conversation_per_shard(&n).await.unwrap();
    let load = Load::start(&n, &convs);
    load.wait_for_more(20, WAIT).await.unwrap();

    // Node 1 created the meta group (it likely leads it): the hardest case.
    let (code, out, err) = admin(&node2, &["drain", "1", "--wait", "--timeout", "180"]);
    assert_eq!(code, 0, "{out}{err}");
    let b = c.balance().await.unwrap();
    assert_eq!(b.replicas[&1], 0, "{b:?}");
    assert_eq!(b.leads[&1], 0, "{b:?}");
    load.wait_for_more(20, WAIT).await.unwrap();

    // Removing a node that still holds replicas is refused.
    let (code, _, err) = admin(&node2, &["remove-node", "3"]);
    assert_ne!(code, 0);
    assert!(err.contains("still holds replicas"), "{err}");

    let (code, out, err) = admin(&node2, &["remove-node", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("retired"), "{out}");
    c.stop(1).unwrap();
    let gone = c.forget(1).unwrap();

    // The cluster keeps serving without it: writes to every shard, and
    // linearizable reads of every shard (check_acked reads each one).
    c.wait_serving(WAIT).await.unwrap();
    let since = Instant::now();
    load.wait_each_since(since, WAIT).await.unwrap();
    let map = c.shard_map().await.unwrap();
    assert!(map.nodes.iter().all(|n| n.id != 1));
    assert_eq!(map.max_node_id, 4);
    let acked = load.finish().await;
    check_acked(&natter(&c), &acked).await.unwrap();

    // The removed node refuses to start again.
    let out = std::process::Command::new(natter_tests::bin("natter-node"))
        .args(["--node-id", "1", "--listen", &gone.addr])
        .arg("--data-dir")
        .arg(&gone.data_dir)
        .args(["--initial-cluster", &format!("1={},2={}", gone.addr, node2)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("removed from"), "{err}");
    // A new node never gets id 1 (or any used id) again.
    let id = c.join_node(2, &timing_args()).await.unwrap();
    assert_eq!(id, 5);
}

#[tokio::test]
async fn rolling_restart_under_load_loses_nothing_and_writes_flow_in_every_window() {
    let mut c = Cluster::start(opts(4)).await.unwrap();
    let n = natter(&c);
    let convs = conversation_per_shard(&n).await.unwrap();
    let load = Load::start(&n, &convs);
    load.wait_for_more(20, WAIT).await.unwrap();
    for id in c.ids() {
        // SIGTERM: the node hands its leaderships off, then stops.
        c.stop(id).unwrap();
        let down = Instant::now();
        // While it is down, every shard still takes writes.
        load.wait_each_since(down, WAIT).await.unwrap();
        c.spawn(id).unwrap();
        c.wait_serving(WAIT).await.unwrap();
        let up = Instant::now();
        load.wait_each_since(up, WAIT).await.unwrap();
    }
    let acked = load.finish().await;
    check_acked(&natter(&c), &acked).await.unwrap();
}

#[tokio::test]
async fn status_json_and_metrics_scrape_reflect_the_cluster_and_move_with_writes() {
    let mut c = Cluster::start(opts(4)).await.unwrap();
    let (mut args, metrics) = metrics_args();
    args.extend(timing_args());
    let id = c.join_node(1, &args).await.unwrap();
    c.wait_balanced(WAIT).await.unwrap();
    let node1 = c.node(1).addr.clone();

    let (code, json, err) = admin_status_healthy(&node1, &["--json"]);
    assert_eq!(code, 0, "{json}{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(4), "{json}");
    assert!(v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["up"] == true));
    assert_eq!(v["healthy"], true);
    assert!(v["summary"]
        .as_str()
        .unwrap()
        .contains("4/4 nodes up, 4/4 shards with a leader"));
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4);
    let mut total_replicas = 0;
    for s in shards {
        assert_eq!(s["replicas"].as_array().unwrap().len(), 3, "{s}");
        assert!(s["leader"].as_u64().is_some(), "{s}");
        assert!(s["eager_appends"].as_u64().is_some(), "{s}");
        assert!(s["eager_answered"].as_u64().is_some(), "{s}");
        total_replicas += 3;
    }
    let held: u64 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["replicas"].as_u64().unwrap())
        .sum();
    assert_eq!(held, total_replicas);

    // Health and readiness.
    assert_eq!(http_get(&metrics, "/healthz").await.unwrap().0, 200);
    let deadline = Instant::now() + WAIT;
    while http_get(&metrics, "/readyz").await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A shard the joined node hosts, and its metrics before writes.
    let st = c.status(id).await.unwrap();
    let shard = st
        .groups
        .iter()
        .map(|g| g.group)
        .find(|g| *g != 0)
        .expect("the joined node hosts a shard");
    let applied = format!("natter_group_applied_index{{group=\"{shard}\"}}");
    let (_, before) = http_get(&metrics, "/metrics").await.unwrap();
    for name in [
        "natter_group_term{group=\"0\"}",
        "natter_group_commit_index{group=\"0\"}",
        "natter_group_leader_changes_total{group=\"0\"}",
        "natter_wal_fsync_seconds_count",
        "natter_append_wait_seconds_count",
        "natter_snapshots_total{kind=\"installed\"}",
    ] {
        assert!(sample(&before, name).is_some(), "{name} missing:\n{before}");
    }
    let applied0 = sample(&before, &applied).unwrap();
    let fsyncs0 = sample(&before, "natter_wal_fsync_seconds_count").unwrap();

    let n = natter(&c);
    let conv = n
        .create_group_on(shard, natter_tests::ops::ALICE, &[])
        .await
        .unwrap();
    for i in 0..10 {
        let cmid = format!("m{i}");
        n.exec(natter_tests::natter::Natter::send_op(
            &conv,
            natter_tests::ops::ALICE,
            &cmid,
            "hello",
        ))
        .await
        .unwrap();
    }
    // Applied index and fsync count move (sampled: wait for the next sample).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, after) = http_get(&metrics, "/metrics").await.unwrap();
        let a = sample(&after, &applied).unwrap_or(0.0);
        let f = sample(&after, "natter_wal_fsync_seconds_count").unwrap_or(0.0);
        if a >= applied0 + 11.0 && f > fsyncs0 {
            break;
        }
        assert!(Instant::now() < deadline, "metrics did not move:\n{after}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Eager replication: once the shard's followers hold every entry (their
    // pipelines idle), the leader sends its next entry to them during its
    // own fsync, not after it. Three tries, as a follower's answer can still
    // be on its way when its status already shows the entry.
    let shard_of = |st: StatusReply| group_of(st, shard);
    let leader = shard_of(c.status(id).await.unwrap()).unwrap().leader_id;
    let before = shard_of(c.status(leader).await.unwrap()).unwrap();
    let (mut sent_eagerly, mut answered_eagerly) = (false, false);
    for i in 0..3 {
        wait_for_followers(&c, shard, leader, "followers never caught up", |g, f| {
            f.last_log_index >= g.last_log_index
        })
        .await;
        n.exec(natter_tests::natter::Natter::send_op(
            &conv,
            natter_tests::ops::ALICE,
            &format!("idle{i}"),
            "hello",
        ))
        .await
        .unwrap();
        let g = shard_of(c.status(leader).await.unwrap()).unwrap();
        sent_eagerly |= g.eager_appends > before.eager_appends;
        // ... and the followers' answers to it stood in for openraft's own
        // request for the same entries, which was therefore not sent.
        answered_eagerly |= g.eager_answered > before.eager_answered;
        if sent_eagerly && answered_eagerly {
            break;
        }
    }
    assert!(
        sent_eagerly,
        "no eager append in three sends to idle followers"
    );
    assert!(
        answered_eagerly,
        "no eager answer stood in for openraft's request in three sends"
    );
    // The commit notice openraft sends after such a commit was answered by
    // that eager answer instead of sent, and its commit index still reached
    // both followers (with a later request or by itself): they apply up to
    // what the leader applied.
    wait_for_followers(
        &c,
        shard,
        leader,
        "no commit notice spared, or the followers never applied what the leader did",
        |g, f| g.notices_spared > before.notices_spared && f.applied_index >= g.applied_index,
    )
    .await;
    // Human status has the summary line.
    let (code, text, _) = admin_status_healthy(&node1, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("4/4 nodes up"), "{text}");
}
