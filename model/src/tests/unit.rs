//! One test per rule.

use std::cell::Cell;
use std::ops::Bound;

use natter_kv::{KvRead, KvResult, KvWrite, Pair, StateMachine};
use prost::Message as _;

use super::*;
use crate::limits::*;
use crate::pb::{ConversationKind, FriendRelation, FriendState, Role};

fn users() -> (String, String, String, String) {
    (uid(0), uid(1), uid(2), uid(3))
}

/// A world with one shard (so raw keys are easy to inspect) or three.
fn world() -> World {
    World::new(3)
}

fn mark_read(w: &mut World, conv: &str, user: &str, seq: u64) -> R {
    w.exec(Op::MarkRead(pb::MarkRead {
        conversation_id: conv.into(),
        user_id: user.into(),
        seq,
    }))
}

fn delete_msg(w: &mut World, conv: &str, actor: &str, seq: u64, for_everyone: bool) -> R {
    w.exec(Op::DeleteMessage(pb::DeleteMessage {
        conversation_id: conv.into(),
        actor_id: actor.into(),
        seq,
        for_everyone,
    }))
}

fn update(w: &mut World, u: pb::UpdateConversation) -> R {
    w.exec(Op::UpdateConversation(u))
}

fn feed_of(w: &World, user: &str) -> Vec<pb::FeedEntry> {
    w.full_feed(user, 0).0
}

fn feed_ids(w: &World, user: &str) -> Vec<String> {
    feed_of(w, user)
        .into_iter()
        .map(|e| {
            e.conversation
                .map(|c| c.conversation_id)
                .unwrap_or_default()
        })
        .collect()
}

fn feed_row(w: &World, user: &str, conv: &str) -> Option<pb::FeedUpdate> {
    feed_of(w, user)
        .into_iter()
        .filter_map(|e| e.conversation)
        .find(|c| c.conversation_id == conv)
}

fn texts(state: &ConvState) -> Vec<String> {
    state.messages.values().map(|m| m.text.clone()).collect()
}

// ---------------------------------------------------------------------------
// Ordering and idempotency
// ---------------------------------------------------------------------------

#[test]
fn seqs_are_a_total_order_per_conversation() {
    let mut w = world();
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b, &c], 0);
    let seqs: Vec<u64> = ["one", "two", "three"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let sender = [&a, &b, &c][i];
            w.send(&g, sender, t)
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let (state, _) = w.full_conversation(&b, &g, 0).expect("member");
    assert_eq!(texts(&state), vec!["one", "two", "three"]);
    let ids: std::collections::BTreeSet<_> = state
        .messages
        .values()
        .map(|m| m.message_id.clone())
        .collect();
    assert_eq!(ids.len(), 3, "message ids are distinct");
    // Another conversation has its own sequence.
    let g2 = w.group(1, &a, &[], 0);
    assert_eq!(w.send(&g2, &a, "x"), 1);
}

#[test]
fn a_retried_send_returns_the_original_message() {
    let mut w = world();
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    let first = want!(w.send_full(&g, &a, "k1", "hello", 0), Sent);
    assert!(!first.duplicate);
    w.now += 10;
    let again = want!(w.send_full(&g, &a, "k1", "hello (edited retry)", 0), Sent);
    assert!(again.duplicate);
    assert_eq!(again.message, first.message);
    // Same client id from another sender is another message.
    let other = want!(w.send_full(&g, &b, "k1", "mine", 0), Sent);
    assert_eq!(other.message.map(|m| m.seq), Some(2));
    let (state, _) = w.full_conversation(&a, &g, 0).expect("member");
    assert_eq!(texts(&state), vec!["hello", "mine"]);
}

// ---------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------

#[test]
fn non_members_cannot_read_send_or_learn_that_a_conversation_exists() {
    let mut w = world();
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    w.send(&g, &a, "secret");
    let missing = gid(99);
    let probes = |w: &mut World, conv: &str| -> Vec<R> {
        vec![
            w.sync(&c, conv, 0, 0),
            w.sync(&c, conv, 1, 0),
            w.ask(Q::GetConversation(pb::GetConversation {
                viewer_id: c.clone(),
                conversation_id: conv.into(),
            })),
            w.ask(Q::History(pb::History {
                viewer_id: c.clone(),
                conversation_id: conv.into(),
                before_seq: 0,
                limit: 0,
            })),
            w.send_full(conv, &c, "x", "hi", 0),
            delete_msg(w, conv, &c, 1, true),
            mark_read(w, conv, &c, 1),
            update(
                w,
                pb::UpdateConversation {
                    conversation_id: conv.into(),
                    actor_id: c.clone(),
                    name: Some("mine now".into()),
                    ..Default::default()
                },
            ),
            w.exec(Op::DeleteConversation(pb::DeleteConversation {
                conversation_id: conv.into(),
                actor_id: c.clone(),
                for_everyone: false,
            })),
        ]
    };
    let existing = probes(&mut w, &g);
    let nonexistent = probes(&mut w, &missing);
    for (x, y) in existing.iter().zip(&nonexistent) {
        assert_eq!(code(x), ErrorCode::NotFound);
        assert_eq!(
            x, y,
            "a non-member can tell an existing conversation from a missing one"
        );
    }
}

#[test]
fn removed_members_stop_receiving_and_lose_access() {
    let mut w = world();
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b, &c], 0);
    w.send(&g, &a, "before");
    w.deliver();
    let r = update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            remove_member_ids: vec![c.clone()],
            ..Default::default()
        },
    );
    want!(r, Conversation);
    w.deliver();
    // The removed member's feed row says so and leaves the visible feed.
    let (_, token) = w.full_feed(&c, 0);
    assert!(!feed_ids(&w, &c).contains(&g));
    w.send(&g, &a, "after");
    // No fan-out to the removed member.
    let pending = want!(
        w.ask_on(
            w.shard_for(&crate::conversation_route_key(&g)),
            Q::PendingOutbox(pb::PendingOutbox::default())
        ),
        Outbox
    );
    assert!(pending.entries.iter().all(|e| e.user_id != c));
    w.deliver();
    let delta = want!(
        w.ask(Q::SyncFeed(pb::SyncFeed {
            user_id: c.clone(),
            token,
            limit: 0
        })),
        Feed
    );
    assert!(
        delta.entries.is_empty(),
        "a removed member's feed changed: {delta:?}"
    );
    assert_eq!(code(&w.sync(&c, &g, 0, 0)), ErrorCode::NotFound);
    assert_eq!(code(&w.sync(&c, &g, 1, 0)), ErrorCode::NotFound);
    assert_eq!(
        code(&w.send_full(&g, &c, "x", "let me in", 0)),
        ErrorCode::NotFound
    );
}

#[test]
fn removal_is_reported_in_the_removed_members_feed_delta() {
    let mut w = world();
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    w.deliver();
    let (_, token) = w.full_feed(&b, 0);
    update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            remove_member_ids: vec![b.clone()],
            ..Default::default()
        },
    );
    w.deliver();
    let delta = want!(
        w.ask(Q::SyncFeed(pb::SyncFeed {
            user_id: b.clone(),
            token,
            limit: 0
        })),
        Feed
    );
    let row = delta.entries[0].conversation.clone().expect("row");
    assert!(row.removed && !row.deleted);
}

#[test]
fn blocked_users_cannot_message_each_other() {
    let mut w = world();
    let (a, b, _, _) = users();
    // No friendship: no direct conversation.
    let r = w.exec(Op::CreateDirect(pb::CreateDirect {
        user_a: a.clone(),
        user_b: b.clone(),
    }));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    w.befriend(&a, &b);
    let d = w.direct(&a, &b);
    assert_eq!(Some(d.clone()), crate::direct_conversation_id(&b, &a));
    assert_eq!(w.direct(&b, &a), d, "one direct conversation per pair");
    w.send(&d, &b, "hi");
    let f = want!(
        w.exec(Op::FriendBlock(pb::FriendBlock {
            user_id: a.clone(),
            other_id: b.clone()
        })),
        Friendship
    );
    assert_eq!(f.state, FriendState::Blocked as i32);
    assert_eq!(
        code(&w.send_full(&d, &b, "k2", "hello?", 0)),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(&w.send_full(&d, &a, "k3", "bye", 0)),
        ErrorCode::PermissionDenied
    );
    // A retry of a send from before the block still answers with it.
    let first = w.ask(Q::History(pb::History {
        viewer_id: b.clone(),
        conversation_id: d.clone(),
        before_seq: 0,
        limit: 0,
    }));
    let cmid = want!(first, History).messages[0].client_msg_id.clone();
    assert!(want!(w.send_full(&d, &b, &cmid, "hi", 0), Sent).duplicate);
    // No requests while blocked, either way.
    let r = w.exec(Op::FriendRequest(pb::FriendRequest {
        from: b.clone(),
        to: a.clone(),
    }));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    // Unblocking makes them strangers, who may message in the existing chat.
    let f = want!(
        w.exec(Op::FriendUnblock(pb::FriendUnblock {
            user_id: a.clone(),
            other_id: b.clone()
        })),
        Friendship
    );
    assert_eq!(f.state, FriendState::None as i32);
    want!(w.send_full(&d, &b, "k4", "sorry", 0), Sent);
}

#[test]
fn group_changes_need_an_admin_but_anyone_may_leave() {
    let mut w = world();
    let (a, b, c, d) = users();
    let g = w.group(0, &a, &[&b, &c], 0);
    let by = |actor: &str| pb::UpdateConversation {
        conversation_id: g.clone(),
        actor_id: actor.into(),
        ..Default::default()
    };
    let denied = [
        pb::UpdateConversation {
            name: Some("hijack".into()),
            ..by(&b)
        },
        pb::UpdateConversation {
            add_member_ids: vec![d.clone()],
            ..by(&b)
        },
        pb::UpdateConversation {
            remove_member_ids: vec![c.clone()],
            ..by(&b)
        },
        pb::UpdateConversation {
            set_roles: vec![pb::RoleChange {
                user_id: b.clone(),
                role: Role::Admin as i32,
            }],
            ..by(&b)
        },
        pb::UpdateConversation {
            retention_ms: Some(1),
            ..by(&b)
        },
        pb::UpdateConversation {
            remove_member_ids: vec![b.clone(), c.clone()],
            ..by(&b)
        },
    ];
    for u in denied {
        assert_eq!(code(&update(&mut w, u)), ErrorCode::PermissionDenied);
    }
    let r = w.exec(Op::DeleteConversation(pb::DeleteConversation {
        conversation_id: g.clone(),
        actor_id: b.clone(),
        for_everyone: true,
    }));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    // Admin may.
    let conv = want!(
        update(
            &mut w,
            pb::UpdateConversation {
                name: Some("renamed".into()),
                add_member_ids: vec![d.clone()],
                set_roles: vec![pb::RoleChange {
                    user_id: b.clone(),
                    role: Role::Admin as i32
                }],
                ..by(&a)
            }
        ),
        Conversation
    );
    assert_eq!(conv.name, "renamed");
    assert_eq!(conv.members.len(), 4);
    // A member may leave.
    let r = update(
        &mut w,
        pb::UpdateConversation {
            remove_member_ids: vec![c.clone()],
            ..by(&c)
        },
    );
    want!(r, Conversation);
    assert_eq!(code(&w.sync(&c, &g, 0, 0)), ErrorCode::NotFound);
    // Demoting the last admin is refused; leaving as last admin promotes.
    let r = update(
        &mut w,
        pb::UpdateConversation {
            set_roles: vec![
                pb::RoleChange {
                    user_id: a.clone(),
                    role: Role::Member as i32,
                },
                pb::RoleChange {
                    user_id: b.clone(),
                    role: Role::Member as i32,
                },
            ],
            ..by(&a)
        },
    );
    assert_eq!(code(&r), ErrorCode::FailedPrecondition);
    for admin in [&a, &b] {
        want!(
            update(
                &mut w,
                pb::UpdateConversation {
                    remove_member_ids: vec![admin.to_string()],
                    ..by(admin)
                }
            ),
            Conversation
        );
    }
    let conv = want!(
        w.ask(Q::GetConversation(pb::GetConversation {
            viewer_id: d.clone(),
            conversation_id: g.clone()
        })),
        Conversation
    );
    assert_eq!(
        conv.my_role,
        Role::Admin as i32,
        "the remaining member was promoted"
    );
}

#[test]
fn direct_conversations_keep_their_members() {
    let mut w = world();
    let (a, b, c, _) = users();
    w.befriend(&a, &b);
    let d = w.direct(&a, &b);
    let base = pb::UpdateConversation {
        conversation_id: d.clone(),
        actor_id: a.clone(),
        ..Default::default()
    };
    for u in [
        pb::UpdateConversation {
            add_member_ids: vec![c.clone()],
            ..base.clone()
        },
        pb::UpdateConversation {
            name: Some("us".into()),
            ..base.clone()
        },
    ] {
        assert_eq!(code(&update(&mut w, u)), ErrorCode::FailedPrecondition);
    }
    // Either member may set disappearing messages.
    let conv = want!(
        update(
            &mut w,
            pb::UpdateConversation {
                actor_id: b.clone(),
                retention_ms: Some(60_000),
                ..base.clone()
            }
        ),
        Conversation
    );
    assert_eq!(conv.retention_ms, 60_000);
    let r = w.exec(Op::DeleteConversation(pb::DeleteConversation {
        conversation_id: d.clone(),
        actor_id: a.clone(),
        for_everyone: true,
    }));
    assert_eq!(code(&r), ErrorCode::FailedPrecondition);
}

#[test]
fn who_may_delete_a_message_for_everyone() {
    let mut w = world();
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b, &c], 0);
    let s1 = w.send(&g, &b, "from b");
    let s2 = w.send(&g, &c, "from c");
    let s3 = w.send(&g, &b, "again b");
    // Another member may not.
    assert_eq!(
        code(&delete_msg(&mut w, &g, &c, s1, true)),
        ErrorCode::PermissionDenied
    );
    // The sender may.
    let t = want!(delete_msg(&mut w, &g, &b, s1, true), Message);
    assert!(t.deleted && t.text.is_empty());
    // A group admin may.
    want!(delete_msg(&mut w, &g, &a, s2, true), Message);
    let (state, _) = w.full_conversation(&c, &g, 0).expect("member");
    assert_eq!(state.messages.keys().copied().collect::<Vec<_>>(), vec![s3]);
    // Deleting again is a no-op answer; an unknown seq is NOT_FOUND.
    want!(delete_msg(&mut w, &g, &b, s1, true), Message);
    assert_eq!(
        code(&delete_msg(&mut w, &g, &b, 99, true)),
        ErrorCode::NotFound
    );
    // In a direct chat only the sender may.
    w.befriend(&a, &b);
    let d = w.direct(&a, &b);
    let m = w.send(&d, &a, "mine");
    assert_eq!(
        code(&delete_msg(&mut w, &d, &b, m, true)),
        ErrorCode::PermissionDenied
    );
    want!(delete_msg(&mut w, &d, &a, m, true), Message);
}

#[test]
fn delete_for_me_hides_only_for_me_and_only_my_delta_says_so() {
    let mut w = world();
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    let s1 = w.send(&g, &a, "one");
    w.send(&g, &a, "two");
    let (_, ta) = w.full_conversation(&a, &g, 0).expect("a");
    let (_, tb) = w.full_conversation(&b, &g, 0).expect("b");
    let t = want!(delete_msg(&mut w, &g, &b, s1, false), Message);
    assert!(t.deleted);
    let (sb, _) = w.full_conversation(&b, &g, 0).expect("b");
    let (sa, _) = w.full_conversation(&a, &g, 0).expect("a");
    assert_eq!(texts(&sb), vec!["two"]);
    assert_eq!(texts(&sa), vec!["one", "two"]);
    let db = want!(w.sync(&b, &g, tb, 0), ConversationSync);
    assert!(db.changes.iter().any(|c| matches!(
        &c.change,
        Some(pb::conversation_change::Change::Message(m)) if m.seq == s1 && m.deleted
    )));
    let da = want!(w.sync(&a, &g, ta, 0), ConversationSync);
    assert!(
        da.changes
            .iter()
            .all(|c| !matches!(&c.change, Some(pb::conversation_change::Change::Message(_)))),
        "another member's delete-for-me leaked: {da:?}"
    );
    // b can't delete it again or for everyone... it's gone for b only.
    want!(delete_msg(&mut w, &g, &b, s1, false), Message);
}

#[test]
fn new_members_see_messages_from_when_they_joined() {
    let mut w = world();
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    w.send(&g, &a, "old");
    update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            add_member_ids: vec![c.clone()],
            ..Default::default()
        },
    );
    w.send(&g, &b, "new");
    let (state, _) = w.full_conversation(&c, &g, 0).expect("member");
    assert_eq!(texts(&state), vec!["new"]);
    let conv = state.meta.expect("meta");
    assert_eq!(conv.my_unread_count, 1);
}

// ---------------------------------------------------------------------------
// Feed
// ---------------------------------------------------------------------------

#[test]
fn feed_is_unread_first_then_by_activity_with_exact_unread_counts() {
    let mut w = world();
    let (a, b, c, _) = users();
    let g1 = w.group(0, &a, &[&b, &c], 0);
    w.now += 1;
    let g2 = w.group(1, &a, &[&b], 0);
    w.now += 1;
    let g3 = w.group(2, &a, &[&c], 0);
    w.now += 1;
    w.send(&g1, &b, "1");
    w.now += 1;
    w.send(&g1, &c, "2");
    w.now += 1;
    w.send(&g2, &b, "3");
    w.now += 1;
    w.send(&g3, &a, "mine");
    w.deliver();
    let feed = feed_of(&w, &a);
    assert_feed_order(&feed);
    // g2 and g1 are unread (g2 newer); g3 is read (own message).
    assert_eq!(feed_ids(&w, &a), vec![g2.clone(), g1.clone(), g3.clone()]);
    let row = |conv: &str| feed_row(&w, &a, conv).expect("row");
    assert_eq!(row(&g1).unread_count, 2);
    assert_eq!(row(&g2).unread_count, 1);
    assert_eq!(row(&g3).unread_count, 0);
    assert_eq!(row(&g1).preview.map(|p| p.text), Some("2".into()));
    // Reading g2 drops it below g1; read marks never go back.
    want!(mark_read(&mut w, &g2, &a, 1), Conversation);
    let conv = want!(mark_read(&mut w, &g2, &a, 0), Conversation);
    assert_eq!(conv.my_last_read_seq, 1);
    w.deliver();
    assert_eq!(
        feed_ids(&w, &a),
        vec![g1.clone(), g3.clone(), g2.clone()],
        "read ones by activity"
    );
    // Reading part of g1.
    want!(mark_read(&mut w, &g1, &a, 1), Conversation);
    w.deliver();
    assert_eq!(feed_row(&w, &a, &g1).expect("g1").unread_count, 1);
    // Deleting an unread message for everyone fixes the count.
    want!(delete_msg(&mut w, &g1, &c, 2, true), Message);
    w.deliver();
    let r = feed_row(&w, &a, &g1).expect("g1");
    assert_eq!(r.unread_count, 0);
    assert_eq!(
        r.preview.map(|p| p.text),
        Some("1".into()),
        "preview falls back"
    );
    // Muted conversations don't float up for being unread.
    w.now += 1;
    w.send(&g3, &c, "new in g3");
    w.now += 1;
    w.send(&g2, &b, "new in g2");
    w.deliver();
    assert_eq!(feed_ids(&w, &a)[..2], [g2.clone(), g3.clone()]);
    let e = want!(
        w.exec(Op::SetFeedFlags(pb::SetFeedFlags {
            user_id: a.clone(),
            conversation_id: g2.clone(),
            muted: Some(true),
            archived: None
        })),
        FeedEntry
    );
    assert!(e.muted);
    assert_eq!(feed_ids(&w, &a)[..2], [g3.clone(), g2.clone()]);
    assert_feed_order(&feed_of(&w, &a));
}

#[test]
fn delete_chat_for_me_clears_history_and_hides_until_new_activity() {
    let mut w = world();
    let (a, b, _, _) = users();
    w.befriend(&a, &b);
    let d = w.direct(&a, &b);
    w.send(&d, &a, "old");
    w.deliver();
    assert!(feed_ids(&w, &b).contains(&d));
    let conv = want!(
        w.exec(Op::DeleteConversation(pb::DeleteConversation {
            conversation_id: d.clone(),
            actor_id: b.clone(),
            for_everyone: false
        })),
        Conversation
    );
    assert_eq!(conv.my_cleared_through_seq, 1);
    w.deliver();
    assert!(!feed_ids(&w, &b).contains(&d));
    let (state, _) = w.full_conversation(&b, &d, 0).expect("still a member");
    assert!(state.messages.is_empty());
    let (state, _) = w.full_conversation(&a, &d, 0).expect("a");
    assert_eq!(texts(&state), vec!["old"]);
    w.send(&d, &a, "new");
    w.deliver();
    assert!(feed_ids(&w, &b).contains(&d));
    let (state, _) = w.full_conversation(&b, &d, 0).expect("b");
    assert_eq!(texts(&state), vec!["new"]);
}

#[test]
fn direct_chats_reach_the_peers_feed_with_the_first_message() {
    let mut w = world();
    let (a, b, _, _) = users();
    w.befriend(&a, &b);
    let d = w.direct(&a, &b);
    w.deliver();
    assert_eq!(feed_ids(&w, &a), vec![d.clone()]);
    assert!(feed_ids(&w, &b).is_empty());
    w.send(&d, &a, "hi");
    w.deliver();
    let row = feed_row(&w, &b, &d).expect("b's row");
    assert_eq!(row.kind, ConversationKind::Direct as i32);
    assert_eq!(row.peer_user_id, a);
    assert_eq!(row.unread_count, 1);
}

#[test]
fn deleting_a_group_for_everyone_removes_it_and_purges_its_rows() {
    let mut w = World::new(1);
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    for i in 0..300 {
        w.send(&g, &b, &format!("m{i}"));
    }
    w.send_full(&g, &a, "ttl", "short-lived", 1_000_000);
    w.deliver();
    want!(
        w.exec(Op::DeleteConversation(pb::DeleteConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            for_everyone: true
        })),
        Conversation
    );
    w.deliver();
    let row = feed_of(&w, &b);
    assert!(row.is_empty());
    assert_eq!(code(&w.sync(&a, &g, 0, 0)), ErrorCode::NotFound);
    let next = want!(w.ask_on(0, Q::NextExpiry(pb::NextExpiry {})), NextExpiry);
    assert!(next.at_ms > 0 && next.at_ms <= w.now);
    w.tick();
    w.tick();
    let id = crate::ids::Id::parse(&g, "g").expect("id");
    let left = w.shards[0]
        .scan_prefix(&crate::keys::message_prefix(&id), usize::MAX)
        .expect("scan");
    assert!(left.is_empty(), "{} message rows left", left.len());
    let next = want!(w.ask_on(0, Q::NextExpiry(pb::NextExpiry {})), NextExpiry);
    assert_eq!(next.at_ms, 0, "nothing left to do");
    // The id stays taken.
    let r = w.exec(Op::CreateGroup(pb::CreateGroup {
        conversation_id: g.clone(),
        creator_id: b.clone(),
        ..Default::default()
    }));
    assert_eq!(code(&r), ErrorCode::AlreadyExists);
}

// ---------------------------------------------------------------------------
// Retention and TTL
// ---------------------------------------------------------------------------

#[test]
fn ttl_messages_disappear_at_their_time() {
    let mut w = world();
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    w.send(&g, &a, "stays");
    let m = want!(w.send_full(&g, &a, "t", "poof", 5_000), Sent)
        .message
        .expect("m");
    assert_eq!(m.expires_at_ms, w.now + 5_000);
    w.deliver();
    let (_, token) = w.full_conversation(&b, &g, 0).expect("b");
    let shard = w.shard_for(&crate::conversation_route_key(&g));
    let next = want!(
        w.ask_on(shard, Q::NextExpiry(pb::NextExpiry {})),
        NextExpiry
    );
    assert_eq!(next.at_ms, m.expires_at_ms);
    // Past its time, queries hide it even before the purge.
    w.now += 5_000;
    let (state, _) = w.full_conversation(&b, &g, 0).expect("b");
    assert_eq!(texts(&state), vec!["stays"]);
    assert!(
        feed_row(&w, &b, &g).expect("row").preview.is_none(),
        "expired preview shown"
    );
    // The tick purges it: a tombstone in the delta, unread fixed.
    w.tick();
    let delta = want!(w.sync(&b, &g, token, 0), ConversationSync);
    let tomb = delta
        .changes
        .iter()
        .find_map(|c| match &c.change {
            Some(pb::conversation_change::Change::Message(m)) => Some(m.clone()),
            _ => None,
        })
        .expect("tombstone");
    assert!(tomb.deleted && tomb.expired && tomb.text.is_empty());
    w.deliver();
    let row = feed_row(&w, &b, &g).expect("row");
    assert_eq!(row.unread_count, 1);
    assert_eq!(row.preview.map(|p| p.text), Some("stays".into()));
    let next = want!(
        w.ask_on(shard, Q::NextExpiry(pb::NextExpiry {})),
        NextExpiry
    );
    assert_eq!(next.at_ms, 0);
}

#[test]
fn a_new_retention_policy_applies_to_old_messages() {
    let mut w = World::new(1);
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    for i in 0..600 {
        w.send(&g, &b, &format!("old {i}"));
        w.now += 10;
    }
    // Set a 1 s retention: everything older than a second goes.
    w.now += 5_000;
    let keep = w.send(&g, &b, "recent");
    want!(
        update(
            &mut w,
            pb::UpdateConversation {
                conversation_id: g.clone(),
                actor_id: a.clone(),
                retention_ms: Some(1_000),
                ..Default::default()
            }
        ),
        Conversation
    );
    // Hidden at once by queries...
    let (state, token) = w.full_conversation(&a, &g, 0).expect("a");
    assert_eq!(texts(&state), vec!["recent"]);
    // ...and purged in bounded batches by ticks.
    let next = want!(w.ask_on(0, Q::NextExpiry(pb::NextExpiry {})), NextExpiry);
    assert!(next.at_ms <= w.now);
    let mut purged = 0;
    for _ in 0..4 {
        purged += want!(w.exec_on(0, Op::Tick(pb::Tick {})), Ticked).purged;
    }
    assert_eq!(purged, 600);
    let next = want!(w.ask_on(0, Q::NextExpiry(pb::NextExpiry {})), NextExpiry);
    assert_eq!(next.at_ms, w.now + 1_000, "the recent message is next");
    let mut client = state.clone();
    w.catch_up(&a, &g, &mut client, token, 100).expect("a");
    assert_eq!(client, w.full_conversation(&a, &g, 0).expect("a").0);
    // The new message's own expiry.
    w.now += 1_000;
    w.tick();
    let (state, _) = w.full_conversation(&a, &g, 0).expect("a");
    assert!(
        state.messages.is_empty(),
        "message {keep} survived retention"
    );
    w.deliver();
    assert_eq!(feed_row(&w, &b, &g).expect("row").unread_count, 0);
}

#[test]
fn retention_caps_the_ttl_and_a_longer_policy_does_not_revive() {
    let mut w = world();
    let (a, _, _, _) = users();
    let g = w.group(0, &a, &[], 2_000);
    let m = want!(w.send_full(&g, &a, "x", "short", 0), Sent)
        .message
        .expect("m");
    assert_eq!(m.expires_at_ms, w.now + 2_000);
    let m2 = want!(w.send_full(&g, &a, "y", "shorter", 500), Sent)
        .message
        .expect("m");
    assert_eq!(m2.expires_at_ms, w.now + 500);
    update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            retention_ms: Some(0),
            ..Default::default()
        },
    );
    w.now += 2_000;
    w.tick();
    let (state, _) = w.full_conversation(&a, &g, 0).expect("a");
    assert!(state.messages.is_empty());
}

// ---------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------

fn pending_on(w: &World, shard: usize, limit: u32, after: Vec<u8>) -> pb::OutboxBatch {
    want!(
        w.ask_on(
            shard,
            Q::PendingOutbox(pb::PendingOutbox {
                limit,
                after,
                ..Default::default()
            })
        ),
        Outbox
    )
}

#[test]
fn the_outbox_coalesces_and_stale_acks_keep_newer_updates() {
    let mut w = World::new(1);
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b, &c], 0);
    w.send(&g, &a, "1");
    w.send(&g, &b, "2");
    let first = pending_on(&w, 0, 0, Vec::new());
    assert_eq!(
        first.entries.len(),
        1,
        "one pending row for the conversation"
    );
    let row = &first.entries[0];
    assert_eq!(row.kind, pb::OutboxKind::Conversation as i32);
    assert_eq!(row.updates.len(), 3, "an update per member");
    let version = row.version;
    assert!(row.updates.iter().all(|u| u.version == version));
    // Another change before the ack: the old ack is stale.
    w.send(&g, &c, "3");
    let acked = want!(
        w.exec_on(0, Op::AckOutbox(outbox_ack(&first.entries))),
        OutboxAcked
    );
    assert_eq!((acked.deleted, acked.stale), (0, 1));
    // Delivering the stale batch late is harmless; the newer one wins.
    let second = pending_on(&w, 0, 0, Vec::new());
    assert!(second.entries.iter().all(|e| e.version > version));
    for d in outbox_deliveries(&second.entries, 1) {
        assert_eq!(d.entries, vec![0]);
        let r = want!(
            w.exec_on(d.shard as usize - 1, Op::ApplyFeedUpdates(d.updates)),
            FeedApplied
        );
        // Each changed feed is named with its version after the command:
        // exactly the token a full sync of that feed now answers.
        assert_eq!(r.feeds.len(), 3, "one version per member's feed");
        for f in &r.feeds {
            let page = want!(
                w.ask(Q::SyncFeed(pb::SyncFeed {
                    user_id: f.user_id.clone(),
                    token: 0,
                    limit: 50,
                })),
                Feed
            );
            assert_eq!(page.token, f.version, "feed version of {}", f.user_id);
        }
    }
    for d in outbox_deliveries(&first.entries, 1) {
        let r = want!(
            w.exec_on(d.shard as usize - 1, Op::ApplyFeedUpdates(d.updates)),
            FeedApplied
        );
        assert_eq!((r.applied, r.ignored), (0, 3));
        assert!(r.feeds.is_empty(), "no feed changed: none named");
    }
    let acked = want!(
        w.exec_on(0, Op::AckOutbox(outbox_ack(&second.entries))),
        OutboxAcked
    );
    assert_eq!((acked.deleted, acked.stale), (1, 0));
    assert!(pending_on(&w, 0, 0, Vec::new()).entries.is_empty());
    assert_eq!(
        feed_row(&w, &a, &g).expect("row").preview.map(|p| p.text),
        Some("3".into())
    );
    // An ack of a conversation row names no user.
    let mut bad = outbox_ack(&second.entries);
    bad.entries[0].user_id = a.clone();
    assert_eq!(
        code(&w.exec_on(0, Op::AckOutbox(bad))),
        ErrorCode::InvalidArgument
    );
}

/// The worker says which conversation rows it delivered (and has not acked
/// yet): a row still at that version comes back without its updates, one
/// changed since with them.
#[test]
fn a_delivered_conversation_row_is_not_expanded_again_until_it_changes() {
    let mut w = World::new(1);
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b, &c], 0);
    w.send(&g, &a, "1");
    let first = pending_on(&w, 0, 0, Vec::new());
    let hint = |batch: &pb::OutboxBatch| pb::PendingOutbox {
        delivered: outbox_ack(&batch.entries).entries,
        ..Default::default()
    };
    let again = want!(w.ask_on(0, Q::PendingOutbox(hint(&first))), Outbox);
    assert_eq!(again.entries.len(), 1);
    assert!(again.entries[0].updates.is_empty(), "not computed again");
    w.send(&g, &b, "2");
    let changed = want!(w.ask_on(0, Q::PendingOutbox(hint(&first))), Outbox);
    assert_eq!(changed.entries[0].updates.len(), 3, "a newer version is");
    let mut too_many = hint(&first);
    too_many.delivered = vec![too_many.delivered[0].clone(); crate::MAX_BATCH + 1];
    assert_eq!(
        code(&w.ask_on(0, Q::PendingOutbox(too_many))),
        ErrorCode::LimitExceeded
    );
}

/// A change every member sees writes one outbox row, however many members;
/// a change for one member writes that member's row.
#[test]
fn a_group_change_writes_one_outbox_row_and_a_read_mark_one_per_reader() {
    let mut w = World::new(1);
    let members: Vec<String> = (1..200).map(uid).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let g = w.group(0, &uid(0), &refs, 0);
    w.deliver();
    w.send(&g, &uid(0), "hello");
    let b = pending_on(&w, 0, 500, Vec::new());
    assert_eq!(b.entries.len(), 1);
    assert_eq!(b.entries[0].updates.len(), 200);
    w.deliver();
    w.exec(Op::MarkRead(pb::MarkRead {
        conversation_id: g.clone(),
        user_id: uid(1),
        seq: 1,
    }));
    let b = pending_on(&w, 0, 500, Vec::new());
    assert_eq!(b.entries.len(), 1);
    assert_eq!(b.entries[0].kind, pb::OutboxKind::Feed as i32);
    assert_eq!(b.entries[0].user_id, uid(1));
    assert!(b.entries[0].updates.is_empty());
}

#[test]
fn outbox_pages_with_a_cursor_by_rows_and_updates() {
    let mut w = World::new(1);
    // Five conversations of two members: five rows of two updates each.
    for i in 0..5 {
        w.group(i, &uid(0), &[&uid(i + 1)], 0);
    }
    let big: Vec<String> = (10..30).map(uid).collect();
    let refs: Vec<&str> = big.iter().map(String::as_str).collect();
    w.group(9, &uid(0), &refs, 0);
    let (mut after, mut seen, mut pages) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let b = pending_on(&w, 0, 3, after.clone());
        pages.push(
            b.entries
                .iter()
                .map(|e| e.updates.len())
                .collect::<Vec<_>>(),
        );
        seen.extend(b.entries.clone());
        if !b.has_more {
            break;
        }
        after = b.next_after;
    }
    // A page ends once 3 updates are in; a row of 21 goes alone.
    let mut sizes: Vec<usize> = pages.iter().flatten().copied().collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![2, 2, 2, 2, 2, 21]);
    assert!(pages
        .iter()
        .all(|p| { p.len() == 1 || p.iter().take(p.len() - 1).sum::<usize>() < 3 }));
    let mut sources: Vec<&str> = seen.iter().map(|e| e.source_id.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    assert_eq!(sources.len(), 6, "every row once");
    let bad = w.ask_on(
        0,
        Q::PendingOutbox(pb::PendingOutbox {
            limit: 7,
            after: vec![0],
            ..Default::default()
        }),
    );
    assert_eq!(code(&bad), ErrorCode::InvalidArgument);
}

#[test]
fn outbox_deliveries_group_by_shard_and_split_at_the_batch_limit() {
    let mut w = World::new(4);
    let members: Vec<String> = (1..20).map(uid).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let g = w.group(0, &uid(0), &refs, 0);
    let shard = w.shard_for(&crate::conversation_route_key(&g));
    let b = pending_on(&w, shard, 500, Vec::new());
    assert_eq!(b.entries.len(), 1);
    let deliveries = outbox_deliveries(&b.entries, 4);
    let total: usize = deliveries.iter().map(|d| d.updates.updates.len()).sum();
    assert_eq!(total, 20);
    for d in &deliveries {
        assert_eq!(d.entries, vec![0]);
        for u in &d.updates.updates {
            assert_eq!(
                crate::shard_of(&crate::user_route_key(&u.user_id), 4),
                d.shard
            );
        }
    }
    // More updates for one shard than one command may carry: several
    // deliveries, each within the limit, each naming the row.
    let many = pb::OutboxEntry {
        kind: pb::OutboxKind::Conversation as i32,
        source_id: g.clone(),
        version: 1,
        updates: (0..2_500)
            .map(|i| pb::FeedUpdate {
                user_id: uid(i),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let split = outbox_deliveries(&[b.entries[0].clone(), many], 1);
    let sizes: Vec<usize> = split.iter().map(|d| d.updates.updates.len()).collect();
    assert_eq!(sizes, vec![1_000, 1_000, 520]);
    assert_eq!(split[0].entries, vec![0, 1]);
    assert_eq!(split[2].entries, vec![1]);
}

// ---------------------------------------------------------------------------
// Friends and users
// ---------------------------------------------------------------------------

#[test]
fn friend_requests_accepts_and_the_friend_index() {
    let mut w = world();
    let (a, b, c, _) = users();
    let req = |w: &mut World, from: &str, to: &str| {
        w.exec(Op::FriendRequest(pb::FriendRequest {
            from: from.into(),
            to: to.into(),
        }))
    };
    let f = want!(req(&mut w, &a, &b), Friendship);
    assert_eq!(f.state, FriendState::Requested as i32);
    // Asking someone who asked you accepts.
    let f = want!(req(&mut w, &b, &a), Friendship);
    assert_eq!(f.state, FriendState::Accepted as i32);
    want!(req(&mut w, &c, &a), Friendship);
    assert_eq!(code(&req(&mut w, &a, &a)), ErrorCode::InvalidArgument);
    let r = w.exec(Op::FriendAccept(pb::FriendAccept {
        user_id: c.clone(),
        requester_id: a.clone(),
    }));
    assert_eq!(
        code(&r),
        ErrorCode::NotFound,
        "c can't accept its own request"
    );
    w.deliver();
    let list = |w: &World, u: &str| {
        want!(
            w.ask(Q::ListFriends(pb::ListFriends {
                user_id: u.into(),
                after: String::new(),
                limit: 0
            })),
            Friends
        )
        .entries
        .into_iter()
        .map(|e| {
            (
                e.other_id,
                FriendRelation::try_from(e.relation).unwrap_or(FriendRelation::None),
            )
        })
        .collect::<Vec<_>>()
    };
    let mut expected = vec![
        (b.clone(), FriendRelation::Friend),
        (c.clone(), FriendRelation::Incoming),
    ];
    expected.sort();
    assert_eq!(list(&w, &a), expected);
    assert_eq!(list(&w, &c), vec![(a.clone(), FriendRelation::Outgoing)]);
    // Blocking: the blocker sees BLOCKED, the blocked sees nothing.
    want!(
        w.exec(Op::FriendBlock(pb::FriendBlock {
            user_id: b.clone(),
            other_id: a.clone()
        })),
        Friendship
    );
    w.deliver();
    assert_eq!(list(&w, &b), vec![(a.clone(), FriendRelation::Blocked)]);
    assert_eq!(list(&w, &a), vec![(c.clone(), FriendRelation::Incoming)]);
    want!(
        w.exec(Op::FriendRemove(pb::FriendRemove {
            user_id: a.clone(),
            other_id: c.clone()
        })),
        Friendship
    );
    w.deliver();
    assert!(list(&w, &a).is_empty());
    assert!(list(&w, &c).is_empty());
}

#[test]
fn usernames_and_users() {
    let mut w = world();
    let (a, b, _, _) = users();
    let claim = |w: &mut World, name: &str, user: &str| {
        w.exec(Op::ClaimUsername(pb::ClaimUsername {
            username: name.into(),
            user_id: user.into(),
        }))
    };
    want!(claim(&mut w, "alice", &a), Username);
    want!(claim(&mut w, "alice", &a), Username);
    assert_eq!(code(&claim(&mut w, "alice", &b)), ErrorCode::AlreadyExists);
    for bad in ["al", "Alice", "al ice", "a-b", &"x".repeat(33)] {
        assert_eq!(
            code(&claim(&mut w, bad, &b)),
            ErrorCode::InvalidArgument,
            "{bad}"
        );
    }
    let found = want!(
        w.ask(Q::LookupUsername(pb::LookupUsername {
            username: "alice".into()
        })),
        Username
    );
    assert_eq!(found.user_id, a);
    let create = pb::CreateUser {
        user_id: a.clone(),
        username: "alice".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$abc$def".into(),
        home_region: "eu-west".into(),
        ..Default::default()
    };
    let u = want!(w.exec(Op::CreateUser(create.clone())), User);
    assert_eq!(u.privacy, pb::Privacy::Everyone as i32);
    assert_eq!(u.notifications, pb::Notifications::All as i32);
    want!(w.exec(Op::CreateUser(create.clone())), User);
    let r = w.exec(Op::CreateUser(pb::CreateUser {
        username: "mallory".into(),
        ..create.clone()
    }));
    assert_eq!(code(&r), ErrorCode::AlreadyExists);
    let u = want!(
        w.exec(Op::UpdateUserSettings(pb::UpdateUserSettings {
            user_id: a.clone(),
            privacy: Some(pb::Privacy::Nobody as i32),
            notifications: None,
            home_region: None,
            password_hash: None
        })),
        User
    );
    assert_eq!((u.privacy, u.version), (pb::Privacy::Nobody as i32, 2));
    let r = w.exec(Op::UpdateUserSettings(pb::UpdateUserSettings {
        user_id: a.clone(),
        privacy: Some(42),
        ..Default::default()
    }));
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    let got = want!(w.ask(Q::GetUser(pb::GetUser { user_id: a.clone() })), User);
    assert_eq!(got.home_region, "eu-west");
    // Home regions are names of [a-z0-9_-], at most 64 bytes.
    for (bad, want) in [
        ("EU", ErrorCode::InvalidArgument),
        ("eu west", ErrorCode::InvalidArgument),
        ("é", ErrorCode::InvalidArgument),
        (&*"r".repeat(65), ErrorCode::LimitExceeded),
    ] {
        let r = w.exec(Op::UpdateUserSettings(pb::UpdateUserSettings {
            user_id: a.clone(),
            home_region: Some(bad.to_string()),
            ..Default::default()
        }));
        assert_eq!(code(&r), want, "{bad:?}");
        let r = w.exec(Op::CreateUser(pb::CreateUser {
            user_id: b.clone(),
            username: "bob".into(),
            home_region: bad.to_string(),
            ..create.clone()
        }));
        assert_eq!(code(&r), want, "{bad:?}");
    }
    let got = want!(w.ask(Q::GetUser(pb::GetUser { user_id: a.clone() })), User);
    assert_eq!(got.home_region, "eu-west");
    assert_eq!(
        code(&w.ask(Q::GetUser(pb::GetUser { user_id: b.clone() }))),
        ErrorCode::NotFound
    );
}

#[test]
fn sessions_expire_by_shard_time_and_revocation_is_final() {
    let mut w = world();
    let (a, b, _, _) = users();
    let hash = vec![7u8; SESSION_TOKEN_HASH_BYTES];
    let create = pb::CreateSession {
        token_hash: hash.clone(),
        user_id: a.clone(),
        device: "laptop".into(),
        ttl_ms: 1_000,
    };
    let get = |w: &World, h: &[u8]| {
        w.ask(Q::GetSession(pb::GetSession {
            token_hash: h.to_vec(),
        }))
    };
    let s = want!(w.exec(Op::CreateSession(create.clone())), Session);
    assert_eq!((s.created_at_ms, s.expires_at_ms), (w.now, w.now + 1_000));
    // A retry answers the stored row; another user can't take the hash.
    assert_eq!(want!(w.exec(Op::CreateSession(create.clone())), Session), s);
    let r = w.exec(Op::CreateSession(pb::CreateSession {
        user_id: b.clone(),
        ..create.clone()
    }));
    assert_eq!(code(&r), ErrorCode::AlreadyExists);
    assert_eq!(want!(get(&w, &hash), Session).user_id, a);
    // Valid strictly before expires_at, by the query's time.
    w.now += 999;
    want!(get(&w, &hash), Session);
    w.now += 1;
    assert_eq!(code(&get(&w, &hash)), ErrorCode::NotFound);
    // Housekeeping deletes the expired row and its index entry.
    let shard = w.shard_for(&crate::session_route_key(&hash));
    let next = want!(
        w.ask_on(shard, Q::NextExpiry(pb::NextExpiry {})),
        NextExpiry
    );
    assert_eq!(next.at_ms, w.now);
    w.tick();
    assert!(w.shards[shard]
        .0
        .keys()
        .all(|k| k[0] != crate::keys::SESSION && k[0] != crate::keys::SESSION_EXPIRY));
    let next = want!(
        w.ask_on(shard, Q::NextExpiry(pb::NextExpiry {})),
        NextExpiry
    );
    assert_eq!(next.at_ms, 0);

    // Revocation: immediate, idempotent, and a late create can't revive it.
    let other = vec![9u8; SESSION_TOKEN_HASH_BYTES];
    let create = pb::CreateSession {
        token_hash: other.clone(),
        ..create
    };
    want!(w.exec(Op::CreateSession(create.clone())), Session);
    let revoke = || {
        Op::RevokeSession(pb::RevokeSession {
            token_hash: other.clone(),
        })
    };
    assert!(want!(w.exec(revoke()), Session).revoked);
    assert!(want!(w.exec(revoke()), Session).revoked);
    assert_eq!(code(&get(&w, &other)), ErrorCode::NotFound);
    let r = w.exec(Op::CreateSession(create.clone()));
    assert_eq!(code(&r), ErrorCode::FailedPrecondition);
    let r = w.exec(Op::RevokeSession(pb::RevokeSession {
        token_hash: vec![1; SESSION_TOKEN_HASH_BYTES],
    }));
    assert_eq!(code(&r), ErrorCode::NotFound);

    // Bad input.
    for bad in [
        pb::CreateSession {
            token_hash: vec![1; 31],
            ..create.clone()
        },
        pb::CreateSession {
            ttl_ms: 0,
            ..create.clone()
        },
        pb::CreateSession {
            ttl_ms: MAX_SESSION_TTL_MS + 1,
            ..create.clone()
        },
        pb::CreateSession {
            user_id: "Not-A-Uuid".into(),
            ..create.clone()
        },
    ] {
        assert_eq!(
            code(&w.exec(Op::CreateSession(bad.clone()))),
            ErrorCode::InvalidArgument,
            "{bad:?}"
        );
    }
    let r = w.exec(Op::CreateSession(pb::CreateSession {
        device: "d".repeat(MAX_DEVICE_BYTES + 1),
        ..create
    }));
    assert_eq!(code(&r), ErrorCode::LimitExceeded);
    assert_eq!(code(&get(&w, b"short")), ErrorCode::InvalidArgument);
}

// ---------------------------------------------------------------------------
// Limits and malformed input
// ---------------------------------------------------------------------------

#[test]
fn limits_are_enforced_with_clear_errors() {
    let mut w = world();
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    let send = |w: &mut World, cmid: &str, text: String, media: usize| {
        w.exec(Op::SendMessage(pb::SendMessage {
            conversation_id: g.clone(),
            sender_id: a.clone(),
            client_msg_id: cmid.into(),
            text,
            media: (0..media)
                .map(|i| pb::Media {
                    object_id: format!("obj{i}"),
                    content_type: "image/png".into(),
                    size: 10,
                    ..Default::default()
                })
                .collect(),
            ttl_ms: 0,
        }))
    };
    want!(
        send(
            &mut w,
            "ok",
            "x".repeat(MAX_TEXT_BYTES),
            MAX_MEDIA_PER_MESSAGE
        ),
        Sent
    );
    assert_eq!(
        code(&send(&mut w, "t", "x".repeat(MAX_TEXT_BYTES + 1), 0)),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(&send(&mut w, "m", "x".into(), MAX_MEDIA_PER_MESSAGE + 1)),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(&send(&mut w, "", "x".into(), 0)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(&send(&mut w, &"k".repeat(65), "x".into(), 0)),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(&send(&mut w, "e", String::new(), 0)),
        ErrorCode::InvalidArgument
    );
    want!(send(&mut w, &"k".repeat(64), "x".into(), 0), Sent);
    let media_only = want!(send(&mut w, "media", String::new(), 1), Sent);
    assert_eq!(media_only.message.map(|m| m.media.len()), Some(1));
    w.deliver();
    assert_eq!(
        feed_row(&w, &b, &g).and_then(|r| r.preview).map(|p| p.text),
        Some("[media]".into())
    );
    let bad_sha = w.exec(Op::SendMessage(pb::SendMessage {
        conversation_id: g.clone(),
        sender_id: a.clone(),
        client_msg_id: "sha".into(),
        media: vec![pb::Media {
            object_id: "o".into(),
            sha256: "XYZ".into(),
            ..Default::default()
        }],
        ..Default::default()
    }));
    assert_eq!(code(&bad_sha), ErrorCode::InvalidArgument);
    // Groups.
    let many: Vec<String> = (1..=MAX_GROUP_MEMBERS as u32).map(uid).collect();
    let r = w.exec(Op::CreateGroup(pb::CreateGroup {
        conversation_id: gid(5),
        creator_id: uid(0),
        member_ids: many.clone(),
        ..Default::default()
    }));
    assert_eq!(code(&r), ErrorCode::LimitExceeded);
    let r = w.exec(Op::CreateGroup(pb::CreateGroup {
        conversation_id: gid(5),
        creator_id: uid(0),
        member_ids: many[..MAX_GROUP_MEMBERS - 1].to_vec(),
        ..Default::default()
    }));
    assert_eq!(want!(r, Conversation).members.len(), MAX_GROUP_MEMBERS);
    let r = update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: gid(5),
            actor_id: uid(0),
            add_member_ids: vec![uid(5000)],
            ..Default::default()
        },
    );
    assert_eq!(code(&r), ErrorCode::LimitExceeded);
    let r = w.exec(Op::CreateGroup(pb::CreateGroup {
        conversation_id: gid(6),
        creator_id: uid(0),
        name: "n".repeat(MAX_NAME_BYTES + 1),
        ..Default::default()
    }));
    assert_eq!(code(&r), ErrorCode::LimitExceeded);
    // Group ids must be random v4 (direct ids are v5).
    let r = w.exec(Op::CreateGroup(pb::CreateGroup {
        conversation_id: crate::direct_conversation_id(&a, &b).expect("id"),
        creator_id: a.clone(),
        ..Default::default()
    }));
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    // Pages.
    assert_eq!(
        code(&w.sync(&a, &g, 0, MAX_PAGE_LIMIT + 1)),
        ErrorCode::LimitExceeded
    );
    want!(w.sync(&a, &g, 0, MAX_PAGE_LIMIT), ConversationSync);
    // Ids.
    for bad in [
        "",
        "nope",
        "00000000-0000-4000-8000-00000000000A",
        "00000000-0000-0000-0000-000000000000",
    ] {
        assert_eq!(
            code(&w.send_full(&g, bad, "z", "x", 0)),
            ErrorCode::InvalidArgument,
            "{bad:?}"
        );
        assert_eq!(
            code(&w.sync(bad, &g, 0, 0)),
            ErrorCode::InvalidArgument,
            "{bad:?}"
        );
    }
}

#[test]
fn malformed_bytes_are_rejected_not_panicked_on() {
    let mut w = World::new(1);
    for bytes in [
        &b"\xff\xff\xff"[..],
        b"\x0a\x05\x08",
        &[0x82, 0x02, 0x7f],
        b"garbage that is not protobuf",
    ] {
        let r = w.apply_on(0, bytes);
        assert_eq!(code(&r), ErrorCode::InvalidArgument, "{bytes:?}");
        let out = Model.query(&w.shards[0], bytes).expect("no storage error");
        let r = decode_response(&out).expect("decodes").expect("some");
        assert_eq!(code(&r), ErrorCode::InvalidArgument);
    }
    // An empty command decodes but has no op.
    assert_eq!(code(&w.apply_on(0, b"")), ErrorCode::InvalidArgument);
    // An unknown enum value inside a valid message.
    let r = w.exec(Op::UpdateConversation(pb::UpdateConversation {
        conversation_id: gid(0),
        actor_id: uid(0),
        set_roles: vec![pb::RoleChange {
            user_id: uid(1),
            role: 77,
        }],
        ..Default::default()
    }));
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
}

#[test]
fn corrupt_rows_are_storage_errors_not_panics() {
    let mut w = World::new(1);
    let (a, b, _, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    let id = crate::ids::Id::parse(&g, "g").expect("id");
    w.shards[0]
        .0
        .insert(crate::keys::conversation(&id), vec![0xff, 0xff]);
    let cmd = command(
        w.now,
        Op::SendMessage(pb::SendMessage {
            conversation_id: g.clone(),
            sender_id: a.clone(),
            client_msg_id: "c".into(),
            text: "x".into(),
            ..Default::default()
        }),
    );
    let err = Model.apply(&mut w.shards[0], &cmd.encode_to_vec());
    assert!(matches!(err, Err(natter_kv::KvError::Corrupt { .. })));
    let q = query(
        w.now,
        Q::SyncConversation(pb::SyncConversation {
            viewer_id: a.clone(),
            conversation_id: g,
            token: 0,
            limit: 0,
        }),
    );
    assert!(Model.query(&w.shards[0], &q.encode_to_vec()).is_err());
}

#[test]
fn a_rejected_command_writes_nothing() {
    let mut w = World::new(1);
    let (a, b, c, _) = users();
    let g = w.group(0, &a, &[&b], 0);
    w.send(&g, &a, "x");
    w.tick();
    let before = w.shards[0].clone();
    // Valid until the role check at the end: adds, renames, then fails.
    let r = update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            name: Some("new".into()),
            add_member_ids: vec![c.clone()],
            set_roles: vec![pb::RoleChange {
                user_id: uid(9),
                role: Role::Admin as i32,
            }],
            ..Default::default()
        },
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    assert_eq!(w.shards[0], before);
}

// ---------------------------------------------------------------------------
// Clock, history, cost
// ---------------------------------------------------------------------------

#[test]
fn time_never_goes_backwards() {
    let mut w = World::new(1);
    w.now = 5_000;
    assert_eq!(
        want!(w.exec_on(0, Op::Tick(pb::Tick {})), Ticked).now_ms,
        5_000
    );
    w.now = 4_000;
    assert_eq!(
        want!(w.exec_on(0, Op::Tick(pb::Tick {})), Ticked).now_ms,
        5_000
    );
    let g = w.group(0, &uid(0), &[], 0);
    let m = want!(w.send_full(&g, &uid(0), "c", "x", 0), Sent)
        .message
        .expect("m");
    assert_eq!(m.created_at_ms, 5_000);
    // A command without a stamp uses the shard's time.
    let bytes = pb::Command {
        stamp: None,
        op: Some(Op::Tick(pb::Tick {})),
    }
    .encode_to_vec();
    assert_eq!(want!(w.apply_on(0, &bytes), Ticked).now_ms, 5_000);
}

#[test]
fn history_pages_backwards_to_the_beginning() {
    let mut w = World::new(1);
    let a = uid(0);
    let g = w.group(0, &a, &[], 0);
    for i in 1..=120 {
        w.send(&g, &a, &format!("{i}"));
    }
    want!(delete_msg(&mut w, &g, &a, 60, true), Message);
    let s = want!(w.sync(&a, &g, 0, 50), ConversationSync);
    assert_eq!(s.changes.len(), 51);
    assert_eq!(s.before_seq, 71);
    let page = |before| {
        want!(
            w.ask(Q::History(pb::History {
                viewer_id: a.clone(),
                conversation_id: g.clone(),
                before_seq: before,
                limit: 50
            })),
            History
        )
    };
    let p = page(71);
    assert_eq!(p.messages.first().map(|m| m.seq), Some(20));
    assert_eq!(p.messages.last().map(|m| m.seq), Some(70));
    assert_eq!(p.messages.len(), 50);
    assert_eq!(p.before_seq, 20);
    let p = page(20);
    assert_eq!(p.messages.len(), 19);
    assert_eq!(p.before_seq, 0);
}

/// Counts the rows a query reads.
struct Counting<'a> {
    inner: &'a MemKv,
    rows: Cell<usize>,
}

impl KvRead for Counting<'_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.rows.set(self.rows.get() + 1);
        self.inner.get(key)
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>> {
        let out = self.inner.scan(start, end, reverse, limit)?;
        self.rows.set(self.rows.get() + out.len() + 1);
        Ok(out)
    }
}

#[test]
fn delta_sync_cost_does_not_grow_with_the_conversation() {
    let cost = |messages: u32| {
        let mut w = World::new(1);
        let (a, b) = (uid(0), uid(1));
        let g = w.group(0, &a, &[&b], 0);
        for i in 0..messages {
            w.send_full(&g, &b, &format!("c{i}"), "x", 0);
        }
        let (_, token) = w.full_conversation(&a, &g, 50).expect("a");
        w.send(&g, &b, "new");
        let counting = Counting {
            inner: &w.shards[0],
            rows: Cell::new(0),
        };
        let q = query(
            w.now,
            Q::SyncConversation(pb::SyncConversation {
                viewer_id: a.clone(),
                conversation_id: g.clone(),
                token,
                limit: 50,
            }),
        );
        let out = Model.query(&counting, &q.encode_to_vec()).expect("query");
        let s = want!(
            decode_response(&out).expect("decode").expect("some"),
            ConversationSync
        );
        assert_eq!(s.changes.len(), 2, "the new message and the metadata");
        counting.rows.get()
    };
    let small = cost(10);
    let large = cost(3_000);
    assert_eq!(
        small, large,
        "delta sync read {small} rows for 10 messages but {large} for 3000"
    );
}

/// A store written before the metadata left the change index holds one
/// metadata entry per conversation, at the version of its last change
/// then. Delta sync skips it: every token and page size reads exactly
/// what a store without it reads (the metadata once, at the row's version).
#[test]
fn a_metadata_entry_left_by_an_older_store_changes_no_sync() {
    let build = |legacy: bool| {
        let mut w = World::new(1);
        let (a, b) = (uid(0), uid(1));
        let g = w.group(0, &a, &[&b], 0);
        w.send(&g, &b, "one");
        w.send(&g, &a, "two");
        if legacy {
            let id = crate::ids::Id::parse(&g, "g").expect("id");
            let row = crate::codec::get::<pb::ConversationRow>(
                &w.shards[0],
                &crate::keys::conversation(&id),
            )
            .expect("read")
            .expect("row");
            let entry = pb::IndexRef {
                meta: true,
                ..Default::default()
            };
            w.shards[0].put(
                &crate::keys::change(&id, row.version),
                &entry.encode_to_vec(),
            );
        }
        w.send(&g, &b, "three");
        w.send(&g, &b, "four");
        (w, a, g)
    };
    let (old, a, g) = build(true);
    let (new, _, _) = build(false);
    let (_, last) = new.full_conversation(&a, &g, 50).expect("member");
    for token in 1..=last {
        for limit in [1, 2, 3, 50] {
            let was = want!(old.sync(&a, &g, token, limit), ConversationSync);
            let is = want!(new.sync(&a, &g, token, limit), ConversationSync);
            assert_eq!(was, is, "token {token}, limit {limit}");
            let metas = is
                .changes
                .iter()
                .filter(|c| {
                    matches!(
                        c.change,
                        Some(pb::conversation_change::Change::Conversation(_))
                    )
                })
                .count();
            assert!(
                metas <= 1,
                "token {token}, limit {limit}: {metas} metadata changes"
            );
        }
    }
}

/// The metadata change a sync page carries.
fn meta_change(s: &pb::ConversationSync) -> pb::Conversation {
    s.changes
        .iter()
        .find_map(|c| match &c.change {
            Some(pb::conversation_change::Change::Conversation(m)) => Some(m.clone()),
            _ => None,
        })
        .expect("a metadata change")
}

/// The metadata change of a delta sync names only the members whose view
/// changed after the token (a message moves its sender's read mark), not the
/// whole list — a message in a group of N would otherwise send N members to
/// each of N devices — and the whole list again after a join; a client
/// merging either stays equal to a full read.
#[test]
fn delta_sync_sends_only_the_members_that_changed() {
    let mut w = world();
    let ids: Vec<String> = (0..40).map(uid).collect();
    let others: Vec<&str> = ids[1..].iter().map(String::as_str).collect();
    let g = w.group(0, &ids[0], &others, 0);
    w.send(&g, &ids[1], "hello");
    let (mut held, token) = w.full_conversation(&ids[0], &g, 50).expect("member");
    assert_eq!(held.meta.as_ref().map(|m| m.members.len()), Some(40));

    w.send(&g, &ids[2], "hi all");
    let s = want!(w.sync(&ids[0], &g, token, 50), ConversationSync);
    let meta = meta_change(&s);
    assert!(!meta.members_complete);
    let named: Vec<&str> = meta.members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(
        named,
        vec![ids[2].as_str()],
        "only the sender's read mark moved"
    );
    held.apply(&s.changes).expect("apply");
    let (full, _) = w.full_conversation(&ids[0], &g, 50).expect("member");
    assert_eq!(held, full);

    let newcomer = uid(99);
    update(
        &mut w,
        pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: ids[0].clone(),
            add_member_ids: vec![newcomer.clone()],
            ..Default::default()
        },
    );
    let s2 = want!(w.sync(&ids[0], &g, s.token, 50), ConversationSync);
    let meta = meta_change(&s2);
    assert!(meta.members_complete, "a join sends the whole list");
    assert_eq!(meta.members.len(), 41);
    held.apply(&s2.changes).expect("apply");
    let (full, _) = w.full_conversation(&ids[0], &g, 50).expect("member");
    assert_eq!(held, full);
}

#[test]
fn route_keys_put_each_row_on_its_owners_shard() {
    let (a, b) = (uid(0), uid(1));
    let direct = crate::direct_conversation_id(&a, &b).expect("id");
    let cmd = |op| command(0, op);
    let friend = cmd(Op::FriendBlock(pb::FriendBlock {
        user_id: a.clone(),
        other_id: b.clone(),
    }));
    let send = cmd(Op::SendMessage(pb::SendMessage {
        conversation_id: direct.clone(),
        ..Default::default()
    }));
    assert_eq!(route_key(&friend), route_key(&send));
    let feed = cmd(Op::SetFeedFlags(pb::SetFeedFlags {
        user_id: a.clone(),
        ..Default::default()
    }));
    let q = query(
        0,
        Q::GetFeed(pb::GetFeed {
            user_id: a.clone(),
            ..Default::default()
        }),
    );
    assert_eq!(route_key(&feed), query_route_key(&q));
    assert!(route_key(&cmd(Op::Tick(pb::Tick {}))).is_empty());
}
