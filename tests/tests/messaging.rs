//! Issue 3's must-shows on a real 3-node cluster: the messaging model behind
//! Raft, with feeds fanned out through the durable outbox across shards.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use natter_model::client::{ConversationView, FeedView};
use natter_model::pb::{self, command::Op, query::Q, response::R};
use natter_tests::natter::{uuid, Natter};
use natter_tests::{Cluster, ClusterOpts, ShardClient};

fn ok(r: R) -> R {
    if let R::Error(e) = &r {
        panic!("rejected: {e:?}");
    }
    r
}

/// Waits until `user`'s feed agrees with each conversation as that user
/// reads it: same last seq and unread count (the outbox has delivered).
async fn wait_feed_converged(n: &Natter, user: &str, convs: &[String]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (feed, _) = n.full_feed(user).await?;
        let mut behind = Vec::new();
        for conv in convs {
            let c = match n
                .query(Q::GetConversation(pb::GetConversation {
                    viewer_id: user.into(),
                    conversation_id: conv.clone(),
                }))
                .await?
            {
                R::Conversation(c) => c,
                // Not (or no longer) a member: nothing to compare.
                _ => continue,
            };
            let row = feed.0.get(conv).and_then(|e| e.conversation.as_ref());
            let agrees = row
                .is_some_and(|r| r.last_seq == c.last_seq && r.unread_count == c.my_unread_count);
            if !agrees {
                behind.push((
                    conv.clone(),
                    c.last_seq,
                    row.map(|r| (r.last_seq, r.unread_count)),
                ));
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("feed of {user} never converged: {behind:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Snapshot {
    feed: (FeedView, u64),
    convs: BTreeMap<String, (ConversationView, u64)>,
}

async fn snapshot(n: &Natter, user: &str, convs: &[String]) -> Snapshot {
    let mut m = BTreeMap::new();
    for conv in convs {
        if let Ok(v) = n.full_conversation(user, conv).await {
            m.insert(conv.clone(), v);
        }
    }
    Snapshot {
        feed: n.full_feed(user).await.unwrap(),
        convs: m,
    }
}

/// Applying the deltas since an earlier snapshot gives exactly a full read.
async fn assert_deltas_equal_full_read(n: &Natter, user: &str, earlier: Snapshot) {
    let (mut feed, token) = earlier.feed;
    n.catch_up_feed(user, &mut feed, token).await.unwrap();
    let (full_feed, _) = n.full_feed(user).await.unwrap();
    assert_eq!(
        feed, full_feed,
        "{user}: delta-synced feed differs from a full read"
    );
    for (conv, (mut view, token)) in earlier.convs {
        match n.full_conversation(user, &conv).await {
            Ok((full, _)) => {
                n.catch_up(user, &conv, &mut view, token).await.unwrap();
                assert_eq!(
                    view, full,
                    "{user}: delta-synced {conv} differs from a full read"
                );
            }
            // Removed since: the delta must not reveal anything either.
            Err(_) => assert!(
                n.catch_up(user, &conv, &mut view, token).await.is_err(),
                "{user} still syncs {conv} after removal"
            ),
        }
    }
}

#[tokio::test]
async fn friends_direct_chat_and_a_changing_group_sync_to_exactly_a_full_read() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let n = Natter::new(ShardClient::new(c.addrs()), c.shards);
    let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
    let mut u = BTreeMap::new();
    for name in names {
        u.insert(
            name,
            n.create_user(&format!("{name}_{}", &uuid()[..6]))
                .await
                .unwrap(),
        );
    }
    let (a, b) = (u["alice"].clone(), u["bob"].clone());

    // Two users befriend and chat directly.
    n.befriend(&a, &b).await.unwrap();
    let direct = match ok(n
        .exec(Op::CreateDirect(pb::CreateDirect {
            user_a: a.clone(),
            user_b: b.clone(),
        }))
        .await
        .unwrap())
    {
        R::Conversation(c) => c.id,
        other => panic!("{other:?}"),
    };
    for (i, from) in [&a, &b, &a].iter().enumerate() {
        n.send(&direct, from, &uuid(), &format!("direct {i}"))
            .await
            .unwrap();
    }

    // Earlier reads, taken mid-way by every user.
    let members: Vec<String> = ["bob", "carol", "dave", "erin"]
        .iter()
        .map(|k| u[k].clone())
        .collect();
    let group = n
        .create_group_on(1 + (c.shards / 2), &a, &members)
        .await
        .unwrap();
    let convs = vec![direct.clone(), group.clone()];
    n.send(&group, &a, &uuid(), "hello group").await.unwrap();
    for user in u.values() {
        wait_feed_converged(&n, user, &convs).await.unwrap();
    }
    let mut earlier = BTreeMap::new();
    for user in u.values() {
        earlier.insert(user.clone(), snapshot(&n, user, &convs).await);
    }

    // The group changes in every way.
    let update = |actor: &str| pb::UpdateConversation {
        conversation_id: group.clone(),
        actor_id: actor.into(),
        ..Default::default()
    };
    ok(n.exec(Op::UpdateConversation(pb::UpdateConversation {
        name: Some("renamed".into()),
        ..update(&a)
    }))
    .await
    .unwrap());
    ok(n.exec(Op::UpdateConversation(pb::UpdateConversation {
        add_member_ids: vec![u["frank"].clone()],
        ..update(&a)
    }))
    .await
    .unwrap());
    let m1 = n
        .send(&group, &u["carol"], &uuid(), "carol was here")
        .await
        .unwrap();
    let m2 = n
        .send(&group, &u["frank"], &uuid(), "frank joined")
        .await
        .unwrap();
    ok(n.exec(Op::UpdateConversation(pb::UpdateConversation {
        remove_member_ids: vec![u["carol"].clone()],
        ..update(&a)
    }))
    .await
    .unwrap());
    ok(n.exec(Op::UpdateConversation(pb::UpdateConversation {
        retention_ms: Some(7 * 24 * 3600 * 1000),
        ..update(&a)
    }))
    .await
    .unwrap());
    let m3 = n
        .send(&group, &b, &uuid(), "to be deleted for everyone")
        .await
        .unwrap();
    n.send(&group, &u["dave"], &uuid(), "dave says hi")
        .await
        .unwrap();
    ok(n.exec(Op::DeleteMessage(pb::DeleteMessage {
        conversation_id: group.clone(),
        actor_id: b.clone(),
        seq: m3.seq,
        for_everyone: true,
    }))
    .await
    .unwrap());
    ok(n.exec(Op::DeleteMessage(pb::DeleteMessage {
        conversation_id: group.clone(),
        actor_id: u["erin"].clone(),
        seq: m2.seq,
        for_everyone: false,
    }))
    .await
    .unwrap());
    ok(n.exec(Op::MarkRead(pb::MarkRead {
        conversation_id: group.clone(),
        user_id: u["dave"].clone(),
        seq: m1.seq,
    }))
    .await
    .unwrap());
    n.send(&direct, &b, &uuid(), "direct after").await.unwrap();

    for user in u.values() {
        wait_feed_converged(&n, user, &convs).await.unwrap();
    }
    for (user, snap) in earlier {
        assert_deltas_equal_full_read(&n, &user, snap).await;
    }

    // What users rely on, spelled out.
    let (gview, _) = n.full_conversation(&a, &group).await.unwrap();
    let meta = gview.meta.clone().unwrap();
    assert_eq!(meta.name, "renamed");
    assert_eq!(meta.members.len(), 5, "alice, bob, dave, erin, frank");
    let texts: Vec<&str> = gview.messages.values().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "hello group",
            "carol was here",
            "frank joined",
            "dave says hi"
        ]
    );
    let (eview, _) = n.full_conversation(&u["erin"], &group).await.unwrap();
    assert!(
        !eview.messages.values().any(|m| m.text == "frank joined"),
        "deleted for erin only"
    );
    assert!(
        n.full_conversation(&u["carol"], &group).await.is_err(),
        "carol was removed"
    );
    let (bob_feed, _) = n.full_feed(&b).await.unwrap();
    let first = bob_feed.ordered()[0].conversation.clone().unwrap();
    assert_eq!(
        first.conversation_id, group,
        "bob's unread group sorts before his read direct chat"
    );
}

#[tokio::test]
async fn feeds_converge_when_a_feed_shard_leader_is_killed_mid_fan_out() {
    let mut c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let n = Natter::new(ShardClient::new(c.addrs()), c.shards);
    let conv_shard = 1;
    // Members whose feeds live on another shard, led by another node.
    let mut members = Vec::new();
    while members.len() < 5 {
        let id = n
            .create_user(&format!("m{}_{}", members.len(), &uuid()[..6]))
            .await
            .unwrap();
        let shard = natter_model::shard_of(&natter_model::user_route_key(&id), c.shards);
        if shard != conv_shard {
            members.push((id, shard));
        }
    }
    let feed_shard = members[0].1;
    c.transfer_leader(conv_shard, 1).await.unwrap();
    c.transfer_leader(feed_shard, 2).await.unwrap();
    let owner = members[0].0.clone();
    let others: Vec<String> = members[1..].iter().map(|(id, _)| id.clone()).collect();
    let group = n
        .create_group_on(conv_shard, &owner, &others)
        .await
        .unwrap();

    let sender = {
        let (n, group, owner) = (n.clone(), group.clone(), owner.clone());
        tokio::spawn(async move {
            for i in 0..60 {
                n.send(&group, &owner, &format!("fan-{i}"), &format!("message {i}"))
                    .await
                    .unwrap();
            }
        })
    };
    // Mid fan-out (once some messages are in): the feed shard's leader dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = n
            .query(Q::GetConversation(pb::GetConversation {
                viewer_id: owner.clone(),
                conversation_id: group.clone(),
            }))
            .await
            .unwrap();
        if matches!(r, R::Conversation(ref c) if c.last_seq >= 10) {
            break;
        }
        assert!(Instant::now() < deadline, "sends did not start");
    }
    c.kill9(2);
    sender.await.unwrap();
    c.restart(2).await.unwrap();

    let convs = vec![group.clone()];
    for (id, _) in &members {
        wait_feed_converged(&n, id, &convs).await.unwrap();
    }
    // And the outbox drains completely (acks are batched, so poll).
    let q = pb::Query {
        now_ms: 0,
        q: Some(Q::PendingOutbox(pb::PendingOutbox {
            limit: 10,
            ..Default::default()
        })),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let raw = n
            .client
            .read(
                conv_shard,
                &prost::Message::encode_to_vec(&q),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        match natter_tests::natter::decode(&raw).unwrap() {
            R::Outbox(b) if b.entries.is_empty() => break,
            R::Outbox(b) => assert!(
                Instant::now() < deadline,
                "outbox never drained: {:?}",
                b.entries
            ),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (feed, _) = n.full_feed(&members[1].0).await.unwrap();
    let row = feed.0[&group].conversation.clone().unwrap();
    assert_eq!((row.last_seq, row.unread_count), (60, 60));
}
