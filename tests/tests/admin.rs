//! `natter-admin` against a real cluster: status (human and JSON), a node
//! going down, and a leadership hand-off.

use natter_tests::ops::admin_status_healthy;
use natter_tests::{Cluster, ClusterOpts};

/// `natter-admin --node NODE ARGS`: (exit code, stdout).
fn admin(node: &str, args: &[&str]) -> (i32, String) {
    let (code, out, _) = natter_tests::ops::admin(node, args);
    (code, out)
}

#[tokio::test]
async fn status_reports_nodes_shards_leaders_and_survives_a_node_going_down() {
    let mut c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let node1 = c.node(1).addr.clone();

    // A fresh cluster may still be settling an election.
    let (code, text, _) = admin_status_healthy(&node1, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("3/3 nodes up, 4/4 shards with a leader"),
        "{text}"
    );
    for id in 1..=3 {
        assert!(
            text.contains(&c.node(id).addr),
            "node {id} missing:\n{text}"
        );
    }

    let (code, json, _) = admin_status_healthy(&node1, &["--json"]);
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["shards"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["healthy"], true);
    // Leaderships start spread and the rebalancer keeps them even; once they are,
    // hand shard 1 to the node leading the fewest shards, which keeps every
    // node at or below its fair share, so the rebalancer leaves it there.
    let b = c
        .wait_balanced(std::time::Duration::from_secs(120))
        .await
        .unwrap();
    let shard1_leader = b.leader[&1];
    let to = (1..=3u64)
        .filter(|id| *id != shard1_leader)
        .min_by_key(|id| b.leads.get(id).copied().unwrap_or(0))
        .unwrap();
    let (code, text) = admin(
        &node1,
        &["transfer-leader", "--shard", "1", "--to", &to.to_string()],
    );
    assert_eq!(code, 0, "{text}");
    let (_, json, _) = admin_status_healthy(&node1, &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["shards"][0]["leader"].as_u64(), Some(to), "{json}");

    // A node down: reported, and the exit code says unhealthy.
    c.kill9(2);
    let (code, text) = admin(&node1, &["status"]);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("DOWN") && text.contains("2/3 nodes up"),
        "{text}"
    );
}
