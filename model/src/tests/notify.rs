//! The offline-notification queue and last seen.

use std::collections::BTreeSet;

use super::*;
use crate::pb::Notifications;

fn pending(w: &World, user: &str) -> Vec<pb::Notification> {
    want!(
        w.ask(Q::PendingNotifications(pb::PendingNotifications {
            limit: 500,
            after: Vec::new(),
            user_id: user.into(),
        })),
        Notifications
    )
    .notifications
}

/// The conversations of `user`'s pending notifications, in queue order.
fn pending_conversations(w: &World, user: &str) -> Vec<String> {
    pending(w, user)
        .into_iter()
        .map(|n| n.conversation_id)
        .collect()
}

/// Every pending notification of every shard, paging with small pages.
pub(crate) fn all_pending(w: &World) -> Vec<pb::Notification> {
    let mut out = Vec::new();
    for s in 0..w.shards.len() {
        let mut after = Vec::new();
        loop {
            let b = want!(
                w.ask_on(
                    s,
                    Q::PendingNotifications(pb::PendingNotifications {
                        limit: 2,
                        after: after.clone(),
                        user_id: String::new(),
                    })
                ),
                Notifications
            );
            out.extend(b.notifications);
            if !b.has_more {
                break;
            }
            after = b.next_after;
        }
    }
    out
}

fn create_user(w: &mut World, id: &str, name: &str) {
    want!(
        w.exec(Op::CreateUser(pb::CreateUser {
            user_id: id.into(),
            username: name.into(),
            password_hash: "h".into(),
            ..Default::default()
        })),
        User
    );
}

fn set_notifications(w: &mut World, user: &str, n: Notifications) {
    want!(
        w.exec(Op::UpdateUserSettings(pb::UpdateUserSettings {
            user_id: user.into(),
            notifications: Some(n as i32),
            ..Default::default()
        })),
        User
    );
}

fn mute(w: &mut World, user: &str, conv: &str, muted: bool) {
    want!(
        w.exec(Op::SetFeedFlags(pb::SetFeedFlags {
            user_id: user.into(),
            conversation_id: conv.into(),
            muted: Some(muted),
            archived: None,
        })),
        FeedEntry
    );
}

fn ack(w: &mut World, user: &str, ns: &[pb::Notification]) -> pb::NotificationsAcked {
    let shard = w.shard_for(&crate::user_route_key(user));
    want!(
        w.exec_on(shard, Op::AckNotifications(crate::notification_ack(ns))),
        NotificationsAcked
    )
}

/// Alice and Bob are friends with a direct conversation.
fn pair() -> (World, String, String, String) {
    let mut w = World::new(3);
    let (a, b) = (uid(0), uid(1));
    create_user(&mut w, &a, "alice");
    create_user(&mut w, &b, "bob");
    w.befriend(&a, &b);
    let d = w.direct(&a, &b);
    w.deliver();
    (w, a, b, d)
}

#[test]
fn a_message_enqueues_one_notification_for_the_recipient_only() {
    let (mut w, a, b, d) = pair();
    let seq = w.send(&d, &a, "hello bob");
    w.deliver();
    assert!(pending(&w, &a).is_empty(), "never for your own message");
    let ns = pending(&w, &b);
    assert_eq!(ns.len(), 1);
    let n = &ns[0];
    assert_eq!(
        (
            n.user_id.as_str(),
            n.conversation_id.as_str(),
            n.seq,
            n.sender_id.as_str(),
            n.preview.as_str()
        ),
        (b.as_str(), d.as_str(), seq, a.as_str(), "hello bob")
    );
    assert_eq!(n.kind, pb::ConversationKind::Direct as i32);
    assert!(crate::is_canonical_uuid(&n.id));
    assert_eq!(n.enqueued_at_ms, w.now);

    // The outbox redelivers the same update (no ack): still one row, same id.
    let conv_shard = w.shard_for(&crate::conversation_route_key(&d));
    let user_shard = w.shard_for(&crate::user_route_key(&b));
    let row = w
        .full_feed(&b, 0)
        .0
        .into_iter()
        .find_map(|e| e.conversation)
        .expect("bob's feed row");
    want!(
        w.exec_on(
            user_shard,
            Op::ApplyFeedUpdates(pb::ApplyFeedUpdates {
                updates: vec![row],
                ..Default::default()
            })
        ),
        FeedApplied
    );
    assert!(!w.deliver_from(conv_shard, 10));
    assert_eq!(pending(&w, &b), ns);

    // Acked: gone; acking again is harmless.
    assert_eq!(ack(&mut w, &b, &ns).deleted, 1);
    assert!(pending(&w, &b).is_empty());
    let again = ack(&mut w, &b, &ns);
    assert_eq!((again.deleted, again.missing), (0, 1));
}

#[test]
fn no_notification_for_a_user_the_leader_saw_online_or_without_a_webhook() {
    let (mut w, a, b, d) = pair();
    // Bob is online when his feed update is proposed: he got it live.
    w.online = vec![b.clone()];
    w.send(&d, &a, "seen live");
    w.deliver();
    assert!(pending(&w, &b).is_empty());
    // Offline again: the next message is queued.
    w.online.clear();
    w.send(&d, &a, "while away");
    w.deliver();
    let ns = pending(&w, &b);
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].preview, "while away");
    // Back online: a newer message withdraws the pending one and adds none.
    w.online = vec![b.clone()];
    w.send(&d, &a, "back");
    w.deliver();
    assert!(pending(&w, &b).is_empty());
    // Someone else online does not silence Bob.
    w.online = vec![a.clone()];
    w.send(&d, &a, "again away");
    w.deliver();
    assert_eq!(pending(&w, &b).len(), 1);
    // A leader without a webhook queues nothing, and still withdraws.
    w.online.clear();
    w.notifications_off = true;
    w.send(&d, &a, "no webhook");
    w.deliver();
    assert!(pending(&w, &b).is_empty());
    // The feed itself is updated all the same.
    let row = w
        .full_feed(&b, 0)
        .0
        .into_iter()
        .find_map(|e| e.conversation)
        .expect("bob's feed row");
    assert_eq!(row.preview.map(|p| p.text), Some("no webhook".into()));
}

/// The key of `b`'s feed row of `d`, and the shard holding it.
fn feed_row_at(w: &World, b: &str, d: &str) -> (usize, Vec<u8>) {
    let user = crate::ids::Id::parse(b, "b").unwrap();
    let conv = crate::ids::Id::parse(d, "d").unwrap();
    (
        w.shard_for(&crate::user_route_key(b)),
        crate::keys::feed(&user, &conv),
    )
}

/// Bob's stored feed row of `d`, as his shard holds it.
fn stored_row(w: &World, b: &str, d: &str) -> pb::FeedEntry {
    let (shard, key) = feed_row_at(w, b, d);
    crate::codec::get::<pb::FeedEntry>(&w.shards[shard], &key)
        .unwrap()
        .expect("bob's feed row")
}

#[test]
fn a_feed_row_says_whether_a_notification_may_be_pending_and_answers_never_do() {
    let (mut w, a, b, d) = pair();
    w.send(&d, &a, "queued");
    w.deliver();
    assert_eq!(pending(&w, &b).len(), 1);
    assert_eq!(stored_row(&w, &b, &d).notification_pending, Some(true));
    // Bob online: the newer message withdraws it, and the row says none is
    // pending (so the next update does not look for one).
    w.online = vec![b.clone()];
    w.send(&d, &a, "live");
    w.deliver();
    assert!(pending(&w, &b).is_empty());
    assert_eq!(stored_row(&w, &b, &d).notification_pending, Some(false));
    // Served rows and the flags' answer never carry it.
    let (feed, _) = w.full_feed(&b, 0);
    assert!(feed.iter().all(|e| e.notification_pending.is_none()));
    let muted = want!(
        w.exec(Op::SetFeedFlags(pb::SetFeedFlags {
            user_id: b.clone(),
            conversation_id: d.clone(),
            muted: Some(true),
            archived: None,
        })),
        FeedEntry
    );
    assert_eq!(muted.notification_pending, None);
    assert_eq!(stored_row(&w, &b, &d).notification_pending, Some(false));

    // A row written before the flag existed (unset) is looked behind: its
    // pending notification is still withdrawn by the next update.
    mute(&mut w, &b, &d, false);
    w.online.clear();
    w.send(&d, &a, "queued again");
    w.deliver();
    assert_eq!(pending(&w, &b).len(), 1);
    let mut legacy = stored_row(&w, &b, &d);
    legacy.notification_pending = None;
    let (shard, key) = feed_row_at(&w, &b, &d);
    crate::codec::put(&mut w.shards[shard], &key, &legacy);
    w.online = vec![b.clone()];
    w.send(&d, &a, "seen live");
    w.deliver();
    assert!(
        pending(&w, &b).is_empty(),
        "a legacy row's notification stayed"
    );
}

#[test]
fn too_many_online_users_in_a_feed_update_are_refused() {
    let (mut w, _a, b, _d) = pair();
    let user_shard = w.shard_for(&crate::user_route_key(&b));
    let r = w.exec_on(
        user_shard,
        Op::ApplyFeedUpdates(pb::ApplyFeedUpdates {
            online_user_ids: vec![b.clone(); crate::limits::MAX_BATCH + 1],
            ..Default::default()
        }),
    );
    assert_eq!(code(&r), ErrorCode::LimitExceeded);
}

#[test]
fn notification_ids_are_deterministic() {
    let (mut w1, a, _b, d) = pair();
    let (mut w2, _, b, _) = pair();
    w1.send(&d, &a, "x");
    w2.send(&d, &a, "x");
    w1.deliver();
    w2.deliver();
    let (n1, n2) = (pending(&w1, &b), pending(&w2, &b));
    assert_eq!(n1[0].id, n2[0].id);
    w1.send(&d, &a, "y");
    w1.deliver();
    assert_ne!(pending(&w1, &b)[0].id, n1[0].id, "another seq, another id");
}

#[test]
fn a_newer_message_replaces_the_pending_one_and_reading_withdraws_it() {
    let (mut w, a, b, d) = pair();
    w.send(&d, &a, "one");
    w.deliver();
    let s2 = w.send(&d, &a, "two");
    w.deliver();
    let ns = pending(&w, &b);
    assert_eq!(ns.len(), 1, "one row per conversation");
    assert_eq!((ns[0].seq, ns[0].preview.as_str()), (s2, "two"));
    // Read on a connected device: the pending notification is withdrawn.
    want!(
        w.exec(Op::MarkRead(pb::MarkRead {
            conversation_id: d.clone(),
            user_id: b.clone(),
            seq: s2,
        })),
        Conversation
    );
    w.deliver();
    assert!(pending(&w, &b).is_empty());
    // Bob answering doesn't notify Bob, and a read change doesn't notify Alice.
    w.send(&d, &b, "hi alice");
    w.deliver();
    assert!(pending(&w, &b).is_empty());
    assert_eq!(pending(&w, &a).len(), 1);
}

#[test]
fn the_setting_and_muting_are_honoured() {
    let (mut w, a, b, d) = pair();
    let c = uid(2);
    create_user(&mut w, &c, "carol");
    let g = w.group(0, &a, &[&b, &c], 0);
    w.deliver();

    set_notifications(&mut w, &b, Notifications::None);
    w.send(&d, &a, "direct");
    w.send(&g, &a, "group");
    w.deliver();
    assert!(pending(&w, &b).is_empty(), "NONE: nothing");
    assert_eq!(pending(&w, &c).len(), 1, "carol (ALL) gets the group one");

    set_notifications(&mut w, &b, Notifications::DirectOnly);
    w.send(&d, &a, "direct 2");
    w.send(&g, &a, "group 2");
    w.deliver();
    assert_eq!(
        pending_conversations(&w, &b),
        vec![d.clone()],
        "DIRECT_ONLY: only the direct conversation"
    );

    set_notifications(&mut w, &b, Notifications::All);
    mute(&mut w, &b, &d, true);
    assert!(pending(&w, &b).is_empty(), "muting withdraws a pending one");
    w.send(&d, &a, "muted");
    w.send(&g, &a, "group 3");
    w.deliver();
    assert_eq!(
        pending_conversations(&w, &b),
        vec![g.clone()],
        "muted conversation: nothing"
    );
    mute(&mut w, &b, &d, false);
    w.send(&d, &a, "unmuted");
    w.deliver();
    assert_eq!(pending(&w, &b).len(), 2);
}

#[test]
fn a_member_added_later_is_not_notified_of_old_messages() {
    let (mut w, a, b, _d) = pair();
    let c = uid(2);
    let g = w.group(0, &a, &[&b], 0);
    w.send(&g, &a, "before carol");
    w.deliver();
    want!(
        w.exec(Op::UpdateConversation(pb::UpdateConversation {
            conversation_id: g.clone(),
            actor_id: a.clone(),
            add_member_ids: vec![c.clone()],
            ..Default::default()
        })),
        Conversation
    );
    w.deliver();
    assert!(pending(&w, &c).is_empty());
    w.send(&g, &a, "after carol");
    w.deliver();
    assert_eq!(pending(&w, &c).len(), 1);
}

#[test]
fn bad_queries_and_acks_are_rejected() {
    let (mut w, _a, b, _d) = pair();
    let r = w.ask_on(
        0,
        Q::PendingNotifications(pb::PendingNotifications {
            limit: 10,
            after: vec![0x01, 2, 3],
            user_id: String::new(),
        }),
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    let r = w.ask(Q::PendingNotifications(pb::PendingNotifications {
        limit: 10,
        after: Vec::new(),
        user_id: "nope".into(),
    }));
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    let r = w.exec_on(
        0,
        Op::AckNotifications(pb::AckNotifications {
            keys: vec![pb::NotificationKey {
                user_id: b,
                conversation_id: "x".into(),
                seq: 1,
            }],
        }),
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
}

#[test]
fn last_seen_is_the_command_time_and_never_goes_back() {
    let mut w = World::new(3);
    let u = uid(0);
    let get = |w: &World| {
        want!(
            w.ask(Q::GetLastSeen(pb::GetLastSeen { user_id: u.clone() })),
            LastSeen
        )
        .last_seen_ms
    };
    assert_eq!(get(&w), 0);
    let rec = |w: &mut World| {
        want!(
            w.exec(Op::RecordLastSeen(pb::RecordLastSeen {
                user_id: u.clone()
            })),
            LastSeen
        )
        .last_seen_ms
    };
    w.now = 5_000_000;
    assert_eq!(rec(&mut w), 5_000_000);
    // A leader with a slower clock: the shard clock keeps time monotonic.
    w.now = 4_000_000;
    assert_eq!(rec(&mut w), 5_000_000);
    assert_eq!(get(&w), 5_000_000);
}

/// Invariants of the queue after any history (checked by the property test
/// once every outbox row is delivered): at most one row per (user,
/// conversation); never for the user's own message; only for a message
/// still unread and not above the conversation's last seq, in a feed row
/// that is visible and not muted.
pub(crate) fn check_notifications(w: &World) {
    let mut seen = BTreeSet::new();
    for n in all_pending(w) {
        assert!(
            seen.insert((n.user_id.clone(), n.conversation_id.clone())),
            "two rows for one (user, conversation): {n:?}"
        );
        assert_ne!(n.sender_id, n.user_id, "notified of own message: {n:?}");
        let feed = w.full_feed(&n.user_id, 0).0;
        let e = feed
            .iter()
            .find(|e| {
                e.conversation
                    .as_ref()
                    .is_some_and(|c| c.conversation_id == n.conversation_id)
            })
            .unwrap_or_else(|| panic!("notification without a visible feed row: {n:?}"));
        let c = e.conversation.as_ref().expect("row");
        assert!(!e.muted, "notification in a muted conversation: {n:?}");
        assert_eq!(
            c.preview.as_ref().map(|p| p.seq),
            Some(n.seq),
            "notification of a message that isn't the last one any more: {n:?}"
        );
        assert!(
            n.seq > c.last_read_seq && n.seq <= c.last_seq,
            "notification of a read or unknown message: {n:?} vs {c:?}"
        );
    }
}
