//! The delta-sync property: for every user and conversation, a client that
//! did a full read at an earlier point and then applies the deltas since
//! that token ends up with exactly what a full read returns now — under
//! random interleavings of every operation, time passing, ticks and outbox
//! delivery (partial, repeated and unacknowledged too).

use std::collections::HashMap;

use natter_kv::KvRead;
use proptest::prelude::*;

use super::*;
use crate::codec::decode;
use crate::conversations::feed_update;
use crate::ids::Id;
use crate::keys;
use crate::{direct_conversation_id, sends_delta};

const USERS: u32 = 4;
const PAIRS: [(u32, u32); 6] = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
const CONVS: u32 = 9;
const RETENTIONS: [u64; 3] = [0, 3_000, 20_000];
const TTLS: [u64; 3] = [0, 2_000, 10_000];

fn conv_id(i: u32) -> String {
    let i = i % CONVS;
    match PAIRS.get(i as usize) {
        Some((a, b)) => direct_conversation_id(&uid(*a), &uid(*b)).unwrap_or_default(),
        None => gid(i - PAIRS.len() as u32),
    }
}

fn users_of(mask: u8) -> Vec<String> {
    (0..USERS)
        .filter(|u| mask & (1 << u) != 0)
        .map(uid)
        .collect()
}

#[derive(Debug, Clone)]
enum Action {
    Friend {
        kind: u8,
        a: u32,
        b: u32,
    },
    CreateDirect {
        a: u32,
        b: u32,
    },
    CreateGroup {
        g: u32,
        creator: u32,
        members: u8,
        retention: usize,
    },
    Update {
        conv: u32,
        actor: u32,
        rename: bool,
        add: u8,
        remove: u8,
        role: Option<(u32, bool)>,
        retention: Option<usize>,
    },
    DeleteConv {
        conv: u32,
        actor: u32,
        everyone: bool,
    },
    Send {
        conv: u32,
        sender: u32,
        cmid: u8,
        long: bool,
        media: bool,
        ttl: usize,
    },
    DeleteMsg {
        conv: u32,
        actor: u32,
        seq: u64,
        everyone: bool,
    },
    MarkRead {
        conv: u32,
        user: u32,
        seq: u64,
    },
    Flags {
        user: u32,
        conv: u32,
        muted: Option<bool>,
        archived: Option<bool>,
    },
    Advance {
        ms: u64,
        tick: bool,
    },
    Deliver {
        shard: usize,
        limit: u32,
        ack: bool,
    },
    Snapshot {
        user: u32,
        limit: u32,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let u = 0..USERS;
    let c = 0..CONVS;
    prop_oneof![
        3 => (0u8..5, u.clone(), u.clone()).prop_map(|(kind, a, b)| Action::Friend { kind, a, b }),
        2 => (u.clone(), u.clone()).prop_map(|(a, b)| Action::CreateDirect { a, b }),
        2 => (0..3u32, u.clone(), any::<u8>(), 0..RETENTIONS.len())
            .prop_map(|(g, creator, members, retention)| Action::CreateGroup { g, creator, members, retention }),
        3 => (c.clone(), u.clone(), any::<bool>(), any::<u8>(), any::<u8>(),
              proptest::option::of((u.clone(), any::<bool>())),
              proptest::option::weighted(0.3, 0..RETENTIONS.len()))
            .prop_map(|(conv, actor, rename, add, remove, role, retention)| Action::Update {
                conv, actor, rename, add: add & 0x0f, remove: if remove % 3 == 0 { remove & 0x0f } else { 0 }, role, retention,
            }),
        1 => (c.clone(), u.clone(), proptest::bool::weighted(0.2))
            .prop_map(|(conv, actor, everyone)| Action::DeleteConv { conv, actor, everyone }),
        16 => (c.clone(), u.clone(), 0u8..24, proptest::bool::weighted(0.2), proptest::bool::weighted(0.2), 0..TTLS.len())
            .prop_map(|(conv, sender, cmid, long, media, ttl)| Action::Send { conv, sender, cmid, long, media, ttl }),
        5 => (c.clone(), u.clone(), any::<u64>(), any::<bool>())
            .prop_map(|(conv, actor, seq, everyone)| Action::DeleteMsg { conv, actor, seq, everyone }),
        3 => (c.clone(), u.clone(), any::<u64>()).prop_map(|(conv, user, seq)| Action::MarkRead { conv, user, seq }),
        1 => (u.clone(), c.clone(), proptest::option::of(any::<bool>()), proptest::option::of(any::<bool>()))
            .prop_map(|(user, conv, muted, archived)| Action::Flags { user, conv, muted, archived }),
        3 => (0u64..4_000, any::<bool>()).prop_map(|(ms, tick)| Action::Advance { ms, tick }),
        3 => (0usize..3, 1u32..6, proptest::bool::weighted(0.8))
            .prop_map(|(shard, limit, ack)| Action::Deliver { shard, limit, ack }),
        3 => (u, 1u32..5).prop_map(|(user, limit)| Action::Snapshot { user, limit }),
    ]
}

/// What one client had read at one point.
struct Snap {
    user: String,
    convs: Vec<(String, ConvState, u64)>,
    feed: FeedState,
    feed_token: u64,
}

fn snapshot(w: &World, user: &str, limit: u32) -> Snap {
    let mut convs = Vec::new();
    for i in 0..CONVS {
        let id = conv_id(i);
        if let Ok((state, token)) = w.full_conversation(user, &id, limit) {
            convs.push((id, state, token));
        }
    }
    let (entries, feed_token) = w.full_feed(user, limit);
    assert_feed_order(&entries);
    Snap {
        user: user.to_string(),
        convs,
        feed: FeedState::from_entries(&entries, w.now).expect("feed entries"),
        feed_token,
    }
}

/// Live conversations: (id, members, last seq).
fn live(w: &World) -> Vec<(String, Vec<String>, u64)> {
    conversations(w)
        .into_iter()
        .filter(|(_, _, r)| !r.deleted)
        .map(|(_, _, r)| {
            (
                r.id.clone(),
                r.members.iter().map(|m| m.user_id.clone()).collect(),
                r.last_seq,
            )
        })
        .collect()
}

/// Mostly an existing conversation and one of its members (so most
/// operations do something); sometimes anyone, anywhere.
fn target(w: &World, conv: u32, user: u32, pick: u64) -> (String, String, u64) {
    let live = live(w);
    if pick.is_multiple_of(8) || live.is_empty() {
        return (conv_id(conv), uid(user), 1 + pick % 6);
    }
    let (id, members, last) = &live[conv as usize % live.len()];
    let who = if members.is_empty() {
        uid(user)
    } else {
        members[user as usize % members.len()].clone()
    };
    (id.clone(), who, 1 + pick % (*last).max(1))
}

fn run(w: &mut World, a: &Action, counter: &mut u64, runs: &mut Runs) {
    *counter += 1;
    let n = *counter;
    match a.clone() {
        Action::Friend { kind, a, b } => {
            let (a, b) = (uid(a), uid(b));
            let op = match kind {
                0 => Op::FriendRequest(pb::FriendRequest { from: a, to: b }),
                1 => Op::FriendAccept(pb::FriendAccept {
                    user_id: a,
                    requester_id: b,
                }),
                2 => Op::FriendRemove(pb::FriendRemove {
                    user_id: a,
                    other_id: b,
                }),
                3 => Op::FriendBlock(pb::FriendBlock {
                    user_id: a,
                    other_id: b,
                }),
                _ => Op::FriendUnblock(pb::FriendUnblock {
                    user_id: a,
                    other_id: b,
                }),
            };
            w.exec(op);
        }
        Action::CreateDirect { a, b } => {
            w.exec(Op::CreateDirect(pb::CreateDirect {
                user_a: uid(a),
                user_b: uid(b),
            }));
        }
        Action::CreateGroup {
            g,
            creator,
            members,
            retention,
        } => {
            w.exec(Op::CreateGroup(pb::CreateGroup {
                conversation_id: gid(g),
                creator_id: uid(creator),
                name: format!("g{g}"),
                member_ids: users_of(members),
                retention_ms: RETENTIONS[retention],
            }));
        }
        Action::Update {
            conv,
            actor,
            rename,
            add,
            remove,
            role,
            retention,
        } => {
            let (conv, actor, _) = target(w, conv, actor, n);
            w.exec(Op::UpdateConversation(pb::UpdateConversation {
                conversation_id: conv,
                actor_id: actor,
                name: rename.then(|| format!("name {n}")),
                add_member_ids: users_of(add),
                remove_member_ids: users_of(remove & !add),
                set_roles: role
                    .map(|(u, admin)| pb::RoleChange {
                        user_id: uid(u),
                        role: if admin {
                            pb::Role::Admin
                        } else {
                            pb::Role::Member
                        } as i32,
                    })
                    .into_iter()
                    .collect(),
                retention_ms: retention.map(|r| RETENTIONS[r]),
            }));
        }
        Action::DeleteConv {
            conv,
            actor,
            everyone,
        } => {
            let (conv, actor, _) = target(w, conv, actor, n);
            w.exec(Op::DeleteConversation(pb::DeleteConversation {
                conversation_id: conv,
                actor_id: actor,
                for_everyone: everyone,
            }));
        }
        Action::Send {
            conv,
            sender,
            cmid,
            long,
            media,
            ttl,
        } => {
            let (conv, sender, _) = target(w, conv, sender, n);
            let before = conversations(w)
                .into_iter()
                .find(|(_, _, r)| r.id == conv)
                .map_or(0, |(_, _, r)| r.version);
            let text = if long {
                format!("{n} {}", "long text ".repeat(20))
            } else {
                format!("m{n}")
            };
            let r = w.exec(Op::SendMessage(pb::SendMessage {
                conversation_id: conv.clone(),
                sender_id: sender,
                client_msg_id: format!("c{cmid}"),
                text: if media && n.is_multiple_of(2) {
                    String::new()
                } else {
                    text
                },
                media: if media {
                    vec![pb::Media {
                        object_id: format!("o{n}"),
                        content_type: "image/jpeg".into(),
                        size: n,
                        ..Default::default()
                    }]
                } else {
                    Vec::new()
                },
                ttl_ms: TTLS[ttl],
            }));
            if let R::Sent(sent) = r {
                if !sent.duplicate {
                    check_sends_delta(w, runs, &conv, before, sent);
                }
            }
        }
        Action::DeleteMsg {
            conv,
            actor,
            seq,
            everyone,
        } => {
            let (conv, actor, seq) = target(w, conv, actor, seq);
            w.exec(Op::DeleteMessage(pb::DeleteMessage {
                conversation_id: conv,
                actor_id: actor,
                seq,
                for_everyone: everyone,
            }));
        }
        Action::MarkRead { conv, user, seq } => {
            let (conv, user, seq) = target(w, conv, user, seq);
            w.exec(Op::MarkRead(pb::MarkRead {
                conversation_id: conv,
                user_id: user,
                seq,
            }));
        }
        Action::Flags {
            user,
            conv,
            muted,
            archived,
        } => {
            w.exec(Op::SetFeedFlags(pb::SetFeedFlags {
                user_id: uid(user),
                conversation_id: conv_id(conv),
                muted,
                archived,
            }));
        }
        Action::Advance { ms, tick } => {
            w.now += ms;
            if tick {
                w.tick();
            }
        }
        Action::Deliver { shard, limit, ack } => {
            if ack {
                w.deliver_from(shard % w.shards.len(), limit);
            } else {
                // A worker that applied but crashed before acking.
                let batch = want!(
                    w.ask_on(
                        shard % w.shards.len(),
                        Q::PendingOutbox(pb::PendingOutbox {
                            limit,
                            ..Default::default()
                        })
                    ),
                    Outbox
                );
                for d in outbox_deliveries(&batch.entries, w.shards.len() as u32) {
                    want!(
                        w.exec_on(d.shard as usize - 1, Op::ApplyFeedUpdates(d.updates)),
                        FeedApplied
                    );
                }
            }
        }
        Action::Snapshot { .. } => {}
    }
}

/// The client of `snap` catches up and must equal a full read now.
fn check(w: &World, snap: &Snap, limit: u32) {
    for (id, state, token) in &snap.convs {
        let full = w.full_conversation(&snap.user, id, 3);
        let mut client = state.clone();
        let delta = w.catch_up(&snap.user, id, &mut client, *token, limit);
        match (full, delta) {
            (Ok((full, full_token)), Ok(delta_token)) => {
                assert_eq!(client, full, "conversation {id} for {}", snap.user);
                assert_eq!(delta_token, full_token);
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (full, delta) => panic!("full read {full:?} but delta {delta:?}"),
        }
    }
    let (entries, token) = w.full_feed(&snap.user, 3);
    assert_feed_order(&entries);
    let full = FeedState::from_entries(&entries, w.now).expect("feed entries");
    let mut client = snap.feed.clone();
    let delta_token = w.catch_up_feed(&snap.user, &mut client, snap.feed_token, limit);
    assert_eq!(client, full, "feed of {}", snap.user);
    assert_eq!(delta_token, token);
}

/// Every conversation row on every shard.
fn conversations(w: &World) -> Vec<(usize, Id, pb::ConversationRow)> {
    let mut out = Vec::new();
    for (s, kv) in w.shards.iter().enumerate() {
        for (k, v) in kv
            .scan_prefix(&[keys::CONVERSATION], usize::MAX)
            .expect("scan")
        {
            let id = Id::from_slice(&k[1..], &k).expect("id");
            out.push((s, id, decode::<pb::ConversationRow>(&k, &v).expect("row")));
        }
    }
    out
}

/// Per conversation, the latest run of back-to-back sends: the version
/// before its first, and their results.
type Runs = HashMap<String, (u64, Vec<pb::SendResult>)>;

/// A send's own result tells each member the delta from the version
/// before it, and a run of sends the delta from before its first, exactly
/// as `sync` does right after it — what routers push without a read.
fn check_sends_delta(w: &World, runs: &mut Runs, conv: &str, before: u64, sent: pb::SendResult) {
    let row = sent
        .conversation
        .clone()
        .expect("a send carries its conversation's row");
    let run = runs.entry(conv.to_string()).or_insert((before, Vec::new()));
    let last = run.1.last().and_then(|s| s.conversation.as_ref());
    if last.map(|r| r.version) != Some(before) {
        *run = (before, Vec::new());
    }
    run.1.push(sent.clone());
    let whole: Vec<&pb::SendResult> = run.1.iter().collect();
    // A send that changed nothing but its message and the metadata (one
    // may also have expired older messages, at versions of its own).
    let plain = |sends: &[&pb::SendResult], mut at: u64| {
        sends.iter().all(|s| {
            let v = s.message.as_ref().map_or(0, |m| m.version);
            let ok = v == at + 1;
            at = v + 1;
            ok
        })
    };
    for m in &row.members {
        for (base, sends) in [(before, vec![&sent]), (run.0, whole.clone())] {
            let plain = plain(&sends, base);
            for limit in [1, 2, 3, 50] {
                let want = want!(w.sync(&m.user_id, conv, base, limit), ConversationSync);
                match sends_delta(&sends, &m.user_id, base, w.now, limit) {
                    Some(got) if got.token == row.version => assert_eq!(got, want),
                    // Only part of the run fits a page (so does sync's), or
                    // a send also changed more than its message.
                    Some(got) => assert!(
                        (want.has_more || !plain) && got.token < row.version,
                        "{got:?}"
                    ),
                    None => assert!(
                        want.has_more || !plain,
                        "no delta for {} from {base} at limit {limit}: {want:?}",
                        m.user_id
                    ),
                }
            }
        }
    }
}

/// Unread counts equal a brute-force recount.
fn check_unread(w: &World) {
    for (s, id, row) in conversations(w) {
        if row.deleted {
            continue;
        }
        let kv = &w.shards[s];
        let msgs = kv
            .scan_prefix(&keys::message_prefix(&id), usize::MAX)
            .expect("scan");
        for m in &row.members {
            let user = Id::parse(&m.user_id, "u").expect("id");
            let expected = msgs
                .iter()
                .map(|(k, v)| decode::<pb::Message>(k, v).expect("msg"))
                .filter(|msg| {
                    msg.seq > m.last_read_seq
                        && !msg.deleted
                        && msg.sender_id != m.user_id
                        && kv
                            .get(&keys::hidden(&id, &user, msg.seq))
                            .expect("get")
                            .is_none()
                })
                .count() as u64;
            assert_eq!(
                m.unread_count, expected,
                "unread of {} in {}",
                m.user_id, row.id
            );
            assert!(m.last_read_seq >= m.cleared_through_seq && m.last_read_seq <= row.last_seq);
        }
    }
}

/// After full delivery every feed row matches its conversation.
fn check_feeds_converged(w: &World) {
    for kv in &w.shards {
        let pending = kv
            .scan_prefix(&keys::outbox_prefix(), usize::MAX)
            .expect("scan");
        assert!(pending.is_empty(), "outbox not drained");
    }
    let convs = conversations(w);
    for u in 0..USERS {
        let user = uid(u);
        let uid_ = Id::parse(&user, "u").expect("id");
        let kv = &w.shards[w.shard_for(&crate::user_route_key(&user))];
        for (k, v) in kv.scan_prefix(&[keys::FEED], usize::MAX).expect("scan") {
            if k.get(1..17) != Some(uid_.bytes().as_slice()) {
                continue;
            }
            let e = decode::<pb::FeedEntry>(&k, &v)
                .expect("row")
                .conversation
                .expect("c");
            let (s, id, row) = convs
                .iter()
                .find(|(_, _, r)| r.id == e.conversation_id)
                .expect("conversation");
            if row.deleted {
                // Members at deletion learn it; earlier leavers were already removed.
                let was_member = row.members.iter().any(|m| m.user_id == user);
                assert!(e.removed && (e.deleted || !was_member));
                continue;
            }
            match row.members.iter().find(|m| m.user_id == user) {
                Some(m) => {
                    let want = feed_update(&w.shards[*s], id, row, m, false).expect("update");
                    assert!(e.version <= row.version);
                    assert_eq!(
                        pb::FeedUpdate { version: 0, ..e },
                        pb::FeedUpdate { version: 0, ..want }
                    );
                }
                None => assert!(e.removed, "a non-member's row isn't removed"),
            }
        }
        for (_, id, row) in &convs {
            let member = row.members.iter().any(|m| m.user_id == user);
            let has_row = kv.get(&keys::feed(&uid_, id)).expect("get").is_some();
            if member && !row.deleted && !has_row {
                assert!(
                    row.kind == pb::ConversationKind::Direct as i32 && row.last_seq == 0,
                    "member {user} has no feed row for {}",
                    row.id
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn deltas_since_any_earlier_read_equal_a_full_read(
        actions in proptest::collection::vec(action(), 1..160),
        sync_limit in 1u32..4,
    ) {
        let mut w = World::new(3);
        // Everyone starts as friends with a few; groups and chats come from
        // the actions.
        w.befriend(&uid(0), &uid(1));
        w.befriend(&uid(1), &uid(2));
        w.befriend(&uid(0), &uid(3));
        w.direct(&uid(0), &uid(1));
        w.direct(&uid(2), &uid(1));
        w.group(0, &uid(0), &[&uid(1), &uid(2), &uid(3)], 0);
        w.group(1, &uid(2), &[&uid(3)], 0);
        let mut snaps = vec![snapshot(&w, &uid(0), 2)];
        let mut counter = 0;
        let mut runs = Runs::new();
        for a in &actions {
            if let Action::Snapshot { user, limit } = a {
                snaps.push(snapshot(&w, &uid(*user), *limit));
            } else {
                run(&mut w, a, &mut counter, &mut runs);
            }
        }
        for u in 0..USERS {
            snaps.push(snapshot(&w, &uid(u), 4));
        }
        for s in &snaps {
            check(&w, s, sync_limit);
        }
        check_unread(&w);
        w.deliver();
        w.now += 1_000;
        w.tick();
        w.deliver();
        for s in &snaps {
            check(&w, s, sync_limit);
        }
        check_unread(&w);
        check_feeds_converged(&w);
        super::notify::check_notifications(&w);
        if std::env::var("PROP_STATS").is_ok() {
            let convs = conversations(&w);
            let msgs: u64 = convs.iter().map(|(_, _, r)| r.last_seq).sum();
            let snapped: usize = snaps.iter().map(|s| s.convs.len()).sum();
            let snap_msgs: usize = snaps.iter().flat_map(|s| s.convs.iter().map(|c| c.1.messages.len())).sum();
            let feed_rows: usize = snaps.iter().map(|s| s.feed.0.len()).sum();
            eprintln!("actions {} convs {} msgs {} snaps {} snapped convs {} snapped msgs {} feed rows {}", actions.len(), convs.len(), msgs, snaps.len(), snapped, snap_msgs, feed_rows);
        }
    }
}
