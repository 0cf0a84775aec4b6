//! The router's gRPC API (proto/natter/client.proto) on real processes:
//! 3 nodes and 2 routers. What mobile apps and the SDK rely on: every
//! WebSocket operation answers the same over gRPC with mapped status codes;
//! tokens are checked the same way; a non-member learns nothing; Subscribe
//! pushes what a device missed since its tokens and then every change (sent
//! over either protocol, through either router); a client too far behind is
//! told to resync; shutdown tells streams to reconnect.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use natter_model::pb;
use natter_proto::client as cp;
use natter_proto::client::event::Event as E;
use natter_tests::grpc::{account, api, authed, error_code, next_event, Api};
use natter_tests::router::{http, Client, RouterProc};
use natter_tests::{Cluster, ClusterOpts};
use serde_json::json;
use tonic::Code;

const PW: &str = "correct horse battery";
const T: Duration = Duration::from_secs(20);

async fn router(c: &Cluster, name: &str, extra: &[&str]) -> RouterProc {
    RouterProc::start(c.dir.path(), name, &c.addrs(), extra)
        .await
        .expect("router starts")
}

fn send(conv: &str, cmid: &str, text: &str) -> cp::SendRequest {
    cp::SendRequest {
        conversation_id: conv.into(),
        client_msg_id: cmid.into(),
        text: text.into(),
        ..Default::default()
    }
}

/// What a device applied from its stream: tokens and message texts.
#[derive(Default)]
struct View {
    feed_token: u64,
    tokens: HashMap<String, u64>,
    texts: HashMap<String, Vec<(u64, String)>>,
    typing: Vec<(String, String)>,
    /// Message rows received (every page, all conversations).
    rows: usize,
}

impl View {
    /// Applies one event, checking it continues from the token held.
    fn apply(&mut self, e: &E) {
        match e {
            E::Feed(f) => {
                let p = f.page.as_ref().expect("page");
                if !p.cold_start {
                    assert_eq!(f.from_token, self.feed_token, "feed page skips");
                }
                self.feed_token = p.token;
            }
            E::Conversation(c) => {
                let s = c.sync.as_ref().expect("sync");
                let held = self.tokens.get(&c.conversation_id).copied().unwrap_or(0);
                let texts = self.texts.entry(c.conversation_id.clone()).or_default();
                if s.cold_start {
                    texts.clear();
                } else {
                    assert_eq!(c.from_token, held, "conversation page skips");
                }
                for ch in &s.changes {
                    if let Some(pb::conversation_change::Change::Message(m)) = &ch.change {
                        self.rows += 1;
                        texts.retain(|(seq, _)| *seq != m.seq);
                        if !m.deleted {
                            texts.push((m.seq, m.text.clone()));
                        }
                    }
                }
                texts.sort();
                self.tokens.insert(c.conversation_id.clone(), s.token);
            }
            E::Typing(t) => self
                .typing
                .push((t.conversation_id.clone(), t.user_id.clone())),
            _ => {}
        }
    }

    fn has(&self, conv: &str, text: &str) -> bool {
        self.texts
            .get(conv)
            .is_some_and(|v| v.iter().any(|(_, t)| t == text))
    }
}

/// Reads events into `view` until `done` holds.
async fn until(s: &mut tonic::Streaming<cp::Event>, view: &mut View, done: impl Fn(&View) -> bool) {
    let deadline = Instant::now() + T;
    while !done(view) {
        assert!(Instant::now() < deadline, "condition not reached in time");
        match next_event(s, T).await.expect("event") {
            Some(e) => view.apply(&e),
            None => panic!("stream ended"),
        }
    }
}

async fn subscribe(
    api: &mut Api,
    token: &str,
    feed_token: u64,
    conversations: HashMap<String, u64>,
) -> tonic::Streaming<cp::Event> {
    let mut s = api
        .subscribe(authed(
            token,
            cp::SubscribeRequest {
                feed_token,
                conversations,
            },
        ))
        .await
        .expect("subscribe")
        .into_inner();
    let first = next_event(&mut s, T).await.expect("first event");
    assert!(matches!(first, Some(E::Connected(_))), "{first:?}");
    s
}

fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), error_code(&s)),
    }
}

#[tokio::test]
async fn every_operation_over_grpc_with_push_resume_and_mapped_errors() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(&c, "router1", &[]).await;
    let mut r2 = router(&c, "router2", &[]).await;
    let mut a1 = api(&r1.addr).await.unwrap();
    let mut a2 = api(&r2.addr).await.unwrap();
    // gRPC shares the port without taking over other paths.
    let (status, _) = http(&r1.addr, "POST", "/v1/no-such-endpoint", None, None)
        .await
        .unwrap();
    assert_eq!(status, 404);

    let (alice, ta) = account(&mut a1, "alice", PW).await.unwrap();
    let (bob, tb) = account(&mut a2, "bob", PW).await.unwrap();
    let (carol, tc) = account(&mut a1, "carol", PW).await.unwrap();
    let taken = a1
        .register(cp::RegisterRequest {
            username: "Alice".into(),
            password: PW.into(),
        })
        .await;
    assert_eq!(
        code_of(taken),
        (Code::AlreadyExists, "already_exists".into())
    );
    let bad = a1
        .login(cp::LoginRequest {
            username: "alice".into(),
            password: "wrong password".into(),
            device: String::new(),
        })
        .await;
    assert_eq!(code_of(bad).0, Code::Unauthenticated);

    // Bob's device is live on router 2 before anything happens.
    let mut bs = subscribe(&mut a2, &tb, 0, HashMap::new()).await;
    let mut bv = View::default();

    // Friends.
    let f = a1
        .friend_request(authed(
            &ta,
            cp::UserRef {
                user_id: bob.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let f = f.friendship.unwrap();
    assert_eq!(
        (f.user_id.as_str(), f.relation),
        (bob.as_str(), pb::FriendRelation::Outgoing as i32)
    );
    let f = a2
        .friend_accept(authed(
            &tb,
            cp::UserRef {
                user_id: alice.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .friendship
        .unwrap();
    assert_eq!(f.relation, pb::FriendRelation::Friend as i32);
    let f = a1
        .get_friendship(authed(
            &ta,
            cp::UserRef {
                user_id: bob.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .friendship
        .unwrap();
    assert_eq!(f.relation, pb::FriendRelation::Friend as i32);
    // The friend list follows the friendship through the durable outbox
    // (within milliseconds, not in the same commit).
    let deadline = Instant::now() + T;
    let l = loop {
        let l = a1
            .list_friends(authed(&ta, cp::ListFriendsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        if l.friends.first().map(|f| f.relation) == Some(pb::FriendRelation::Friend as i32) {
            break l;
        }
        assert!(Instant::now() < deadline, "{l:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(l.friends.len(), 1);
    assert_eq!(l.friends[0].user_id, bob);

    // A direct conversation; sends are idempotent.
    let direct = a1
        .create_direct(authed(
            &ta,
            cp::UserRef {
                user_id: bob.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(direct.kind, pb::ConversationKind::Direct as i32);
    let d = direct.id.clone();
    let s1 = a1
        .send(authed(&ta, send(&d, "m1", "hi bob")))
        .await
        .unwrap()
        .into_inner();
    let again = a1
        .send(authed(&ta, send(&d, "m1", "hi bob")))
        .await
        .unwrap()
        .into_inner();
    assert!(!s1.duplicate && again.duplicate);
    assert_eq!(
        s1.message.as_ref().unwrap().seq,
        again.message.as_ref().unwrap().seq
    );
    let empty = a1.send(authed(&ta, send(&d, "", "no key"))).await;
    assert_eq!(
        code_of(empty),
        (Code::InvalidArgument, "invalid_argument".into())
    );
    let long = a1
        .send(authed(&ta, send(&d, "m-long", &"x".repeat(17 * 1024))))
        .await;
    assert_eq!(code_of(long), (Code::OutOfRange, "limit_exceeded".into()));

    // Pushed to Bob on the other router, also what Alice sends over the
    // WebSocket.
    until(&mut bs, &mut bv, |v| v.has(&d, "hi bob")).await;
    let mut ws = Client::connect(&r1.addr, &ta).await.unwrap();
    ws.call(
        "send",
        json!({"conversation_id": d, "client_msg_id": "w1", "text": "over ws"}),
    )
    .await
    .unwrap();
    until(&mut bs, &mut bv, |v| v.has(&d, "over ws")).await;

    // Typing reaches another device tracking the conversation on the same
    // router; without a stream it is refused.
    let mut as2 = subscribe(&mut a2, &ta, 0, HashMap::new()).await;
    let mut av = View::default();
    until(&mut as2, &mut av, |v| v.has(&d, "over ws")).await;
    a2.typing(authed(
        &tb,
        cp::ConversationRef {
            conversation_id: d.clone(),
        },
    ))
    .await
    .unwrap();
    until(&mut as2, &mut av, |v| {
        v.typing.contains(&(d.clone(), bob.clone()))
    })
    .await;
    let no_stream = a1
        .typing(authed(
            &tc,
            cp::ConversationRef {
                conversation_id: d.clone(),
            },
        ))
        .await;
    assert_eq!(code_of(no_stream).0, Code::NotFound);

    // Reads.
    let g = a1
        .get_conversation(authed(
            &ta,
            cp::ConversationRef {
                conversation_id: d.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(g.last_seq, 2);
    let cold = a1
        .sync_conversation(authed(
            &ta,
            cp::SyncConversationRequest {
                conversation_id: d.clone(),
                token: 0,
                limit: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(cold.cold_start && cold.token > 0);
    let h = a1
        .history(authed(
            &ta,
            cp::HistoryRequest {
                conversation_id: d.clone(),
                before_seq: 0,
                limit: 10,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let texts: Vec<&str> = h.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["hi bob", "over ws"]);
    let big = a1
        .history(authed(
            &ta,
            cp::HistoryRequest {
                conversation_id: d.clone(),
                before_seq: 0,
                limit: 101,
            },
        ))
        .await;
    assert_eq!(code_of(big), (Code::OutOfRange, "limit_exceeded".into()));
    let r = a2
        .mark_read(authed(
            &tb,
            cp::MarkReadRequest {
                conversation_id: d.clone(),
                seq: 2,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!((r.my_last_read_seq, r.my_unread_count), (2, 0));
    let feed = a1
        .get_feed(authed(
            &ta,
            cp::GetFeedRequest {
                limit: 10,
                cursor: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feed.entries.len(), 1);
    let fs = a1
        .sync_feed(authed(
            &ta,
            cp::SyncFeedRequest {
                token: feed.token,
                limit: 10,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!fs.cold_start);
    let e = a1
        .set_feed_flags(authed(
            &ta,
            cp::SetFeedFlagsRequest {
                conversation_id: d.clone(),
                muted: Some(true),
                archived: None,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert!(e.muted && !e.archived);

    // Users: others see only the public fields; the hash never leaves.
    let other = a1
        .get_user(authed(
            &ta,
            cp::UserRef {
                user_id: bob.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!((other.username.as_str(), other.created_at_ms), ("bob", 0));
    let me = a1
        .me(authed(&ta, cp::Empty {}))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me.user_id, alice);
    assert!(me.created_at_ms > 0);
    let found = a1
        .lookup_user(authed(
            &ta,
            cp::LookupUserRequest {
                username: "BOB".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.user_id, bob);
    let u = a2
        .update_settings(authed(
            &tb,
            cp::UpdateSettingsRequest {
                privacy: Some(pb::Privacy::Nobody as i32),
                notifications: None,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(u.privacy, pb::Privacy::Nobody as i32);
    let bad = a2
        .update_settings(authed(
            &tb,
            cp::UpdateSettingsRequest {
                privacy: Some(0),
                notifications: None,
            },
        ))
        .await;
    assert_eq!(code_of(bad).0, Code::InvalidArgument);
    let hidden = a1
        .lookup_user(authed(
            &tc,
            cp::LookupUserRequest {
                username: "bob".into(),
            },
        ))
        .await;
    assert_eq!(code_of(hidden).0, Code::NotFound);

    // Groups: roles (a bad role is refused), deletes.
    let group = a1
        .create_group(authed(
            &ta,
            cp::CreateGroupRequest {
                name: "trip".into(),
                member_ids: vec![bob.clone(), carol.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    let gid = group.id.clone();
    assert_eq!(group.members.len(), 3);
    let up = a1
        .update_conversation(authed(
            &ta,
            cp::UpdateConversationRequest {
                conversation_id: gid.clone(),
                name: Some("trip 2".into()),
                set_roles: vec![cp::RoleSetting {
                    user_id: bob.clone(),
                    role: pb::Role::Admin as i32,
                }],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(up.name, "trip 2");
    let bad_role = a1
        .update_conversation(authed(
            &ta,
            cp::UpdateConversationRequest {
                conversation_id: gid.clone(),
                set_roles: vec![cp::RoleSetting {
                    user_id: bob.clone(),
                    role: 0,
                }],
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code_of(bad_role).0, Code::InvalidArgument);
    let not_admin = a1
        .update_conversation(authed(
            &tc,
            cp::UpdateConversationRequest {
                conversation_id: gid.clone(),
                name: Some("mine".into()),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(
        code_of(not_admin),
        (Code::PermissionDenied, "permission_denied".into())
    );
    let sent = a1
        .send(authed(&tc, send(&gid, "c1", "carol here")))
        .await
        .unwrap()
        .into_inner();
    let seq = sent.message.unwrap().seq;
    let tomb = a1
        .delete_message(authed(
            &tc,
            cp::DeleteMessageRequest {
                conversation_id: gid.clone(),
                seq,
                for_everyone: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert!(tomb.deleted && tomb.text.is_empty());
    let gone = a1
        .delete_conversation(authed(
            &ta,
            cp::DeleteConversationRequest {
                conversation_id: gid.clone(),
                for_everyone: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert!(gone.deleted);

    // A non-member learns nothing about the direct conversation.
    for r in [
        code_of(
            a1.get_conversation(authed(
                &tc,
                cp::ConversationRef {
                    conversation_id: d.clone(),
                },
            ))
            .await,
        ),
        code_of(
            a1.sync_conversation(authed(
                &tc,
                cp::SyncConversationRequest {
                    conversation_id: d.clone(),
                    token: 0,
                    limit: 0,
                },
            ))
            .await,
        ),
        code_of(
            a1.history(authed(
                &tc,
                cp::HistoryRequest {
                    conversation_id: d.clone(),
                    before_seq: 0,
                    limit: 0,
                },
            ))
            .await,
        ),
        code_of(a1.send(authed(&tc, send(&d, "x", "let me in"))).await),
        code_of(
            a1.mark_read(authed(
                &tc,
                cp::MarkReadRequest {
                    conversation_id: d.clone(),
                    seq: 1,
                },
            ))
            .await,
        ),
    ] {
        assert_eq!(r, (Code::NotFound, "not_found".into()));
    }
    // Her stream claiming to track it is told it is gone (her feed page and
    // her own conversations' events may come first, in any order), and is
    // never sent a page of it.
    let mut cs = subscribe(&mut a1, &tc, 0, HashMap::from([(d.clone(), 0)])).await;
    loop {
        match next_event(&mut cs, T).await.unwrap() {
            Some(E::ConversationGone(g)) if g.conversation_id == d => break,
            Some(E::Conversation(c)) => assert_ne!(c.conversation_id, d, "a page leaked"),
            Some(E::Feed(_)) | Some(E::ConversationGone(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    // Friends: block, unblock, remove.
    for (name, f) in [
        ("block", pb::FriendRelation::Blocked),
        ("unblock", pb::FriendRelation::None),
    ] {
        let r = if name == "block" {
            a1.friend_block(authed(
                &ta,
                cp::UserRef {
                    user_id: bob.clone(),
                },
            ))
            .await
        } else {
            a1.friend_unblock(authed(
                &ta,
                cp::UserRef {
                    user_id: bob.clone(),
                },
            ))
            .await
        };
        assert_eq!(
            r.unwrap().into_inner().friendship.unwrap().relation,
            f as i32
        );
    }
    let r = a1
        .friend_remove(authed(
            &ta,
            cp::UserRef {
                user_id: bob.clone(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().friendship.unwrap().relation,
        pb::FriendRelation::None as i32
    );
    a1.ping(authed(&ta, cp::Empty {})).await.unwrap();

    // Resume: Bob reconnects with his tokens and gets exactly what he
    // missed (pages continue from his tokens; View::apply checks it).
    drop(bs);
    for i in 0..3 {
        ws.call(
            "send",
            json!({"conversation_id": d, "client_msg_id": format!("gap{i}"), "text": format!("missed {i}")}),
        )
        .await
        .unwrap();
    }
    let rows_before = bv.rows;
    let mut bs = subscribe(&mut a2, &tb, bv.feed_token, bv.tokens.clone()).await;
    until(&mut bs, &mut bv, |v| v.has(&d, "missed 2")).await;
    assert_eq!(
        bv.rows - rows_before,
        3,
        "only the missed messages are pushed"
    );
    let texts: Vec<String> = bv.texts[&d].iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(
        texts,
        ["hi bob", "over ws", "missed 0", "missed 1", "missed 2"]
    );

    // Shutdown: the stream gets `reconnect`, then UNAVAILABLE.
    r2.terminate(Duration::from_secs(15)).unwrap();
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline);
        match tokio::time::timeout(T, bs.message()).await.expect("ends") {
            Ok(Some(cp::Event {
                event: Some(E::Reconnect(_)),
            })) => break,
            Ok(Some(_)) => {}
            other => panic!("expected reconnect, got {other:?}"),
        }
    }
    match tokio::time::timeout(T, bs.message()).await.expect("ends") {
        Err(s) => assert_eq!(s.code(), Code::Unavailable),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_forged_expired_and_revoked_tokens_are_refused_and_slow_streams_resync() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(
        &c,
        "router1",
        &["--session-recheck-secs", "1", "--ws-queue-frames", "8"],
    )
    .await;
    let short = router(&c, "short-ttl", &["--session-ttl-secs", "2"]).await;
    let mut a = api(&r1.addr).await.unwrap();
    let mut s = api(&short.addr).await.unwrap();
    let (_alice, ta) = account(&mut a, "alice", PW).await.unwrap();
    let (bob, tb) = account(&mut a, "bob", PW).await.unwrap();

    // Missing and forged.
    let r = a.me(tonic::Request::new(cp::Empty {})).await;
    assert_eq!(
        code_of(r),
        (Code::Unauthenticated, "unauthenticated".into())
    );
    let forged = "A".repeat(43);
    for t in [forged.as_str(), "not-a-token"] {
        assert_eq!(
            code_of(a.me(authed(t, cp::Empty {})).await).0,
            Code::Unauthenticated
        );
        let r = a
            .subscribe(authed(t, cp::SubscribeRequest::default()))
            .await;
        assert_eq!(code_of(r).0, Code::Unauthenticated);
    }
    let mut basic = tonic::Request::new(cp::Empty {});
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {ta}").parse().unwrap());
    assert_eq!(code_of(a.me(basic).await).0, Code::Unauthenticated);

    // Revoked: logout ends the open stream and refuses the token on every
    // router.
    let t2 = a
        .login(cp::LoginRequest {
            username: "alice".into(),
            password: PW.into(),
            device: "phone".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut st = subscribe(&mut a, &t2, 0, HashMap::new()).await;
    a.logout(authed(&t2, cp::Empty {})).await.unwrap();
    let mut ended = false;
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match tokio::time::timeout(T, st.message()).await.expect("ends") {
            Ok(Some(cp::Event {
                event: Some(E::SessionEnded(_)),
            })) => ended = true,
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without a status"),
            Err(e) => {
                assert_eq!(e.code(), Code::Unauthenticated);
                break;
            }
        }
    }
    assert!(ended, "no session_ended event");
    assert_eq!(
        code_of(a.me(authed(&t2, cp::Empty {})).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(s.me(authed(&t2, cp::Empty {})).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(a.logout(authed(&t2, cp::Empty {})).await).0,
        Code::Unauthenticated
    );

    // Expired: a 2 s session works, then is refused (poll until it is).
    let t3 = s
        .login(cp::LoginRequest {
            username: "bob".into(),
            password: PW.into(),
            device: "tablet".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    s.me(authed(&t3, cp::Empty {})).await.unwrap();
    let deadline = Instant::now() + T;
    loop {
        match s.me(authed(&t3, cp::Empty {})).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::Unauthenticated);
                break;
            }
        }
        assert!(Instant::now() < deadline, "the 2 s session never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code_of(a.me(authed(&t3, cp::Empty {})).await).0,
        Code::Unauthenticated
    );

    // A stream that isn't read falls behind (HTTP/2 flow control stops the
    // router's writes, then its 8-event queue fills): it is told to resync.
    a.friend_request(authed(
        &ta,
        cp::UserRef {
            user_id: bob.clone(),
        },
    ))
    .await
    .unwrap();
    a.friend_accept(authed(
        &tb,
        cp::UserRef {
            user_id: _alice.clone(),
        },
    ))
    .await
    .unwrap();
    let d = a
        .create_direct(authed(
            &ta,
            cp::UserRef {
                user_id: bob.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .id;
    let mut slow = subscribe(&mut a, &tb, 0, HashMap::new()).await;
    // 6 MB of messages: more than the client's HTTP/2 windows (hyper: 2 MB
    // per stream, 5 MB per connection) plus the router's 8-event queue.
    let text = "y".repeat(15_000);
    let mut resync = false;
    for i in 0..400 {
        a.send(authed(&ta, send(&d, &format!("s{i}"), &text)))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline);
        match tokio::time::timeout(T, slow.message()).await.expect("ends") {
            Ok(Some(cp::Event {
                event: Some(E::Resync(_)),
            })) => resync = true,
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without a status"),
            Err(e) => {
                assert_eq!(e.code(), Code::Aborted);
                break;
            }
        }
    }
    assert!(resync, "no resync event");
}

/// Waits on `s` for a presence event of `user` with `online`.
async fn presence_event(
    s: &mut tonic::Streaming<cp::Event>,
    user: &str,
    online: bool,
) -> cp::Presence {
    let deadline = Instant::now() + T;
    loop {
        assert!(
            Instant::now() < deadline,
            "no presence event ({user}, {online})"
        );
        if let Some(E::Presence(p)) = next_event(s, T).await.expect("event") {
            if p.user_id == user && p.online == online {
                return p;
            }
        }
    }
}

#[tokio::test]
async fn presence_over_grpc_is_friends_only_and_pushed_across_routers() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r1 = router(&c, "router1", &[]).await;
    let r2 = router(&c, "router2", &[]).await;
    let mut a1 = api(&r1.addr).await.unwrap();
    let mut a2 = api(&r2.addr).await.unwrap();
    let (alice, ta) = account(&mut a1, "alice", PW).await.unwrap();
    let (bob, tb) = account(&mut a2, "bob", PW).await.unwrap();
    let (carol, _tc) = account(&mut a1, "carol", PW).await.unwrap();
    let user = |id: &str| cp::UserRef {
        user_id: id.to_string(),
    };
    a1.friend_request(authed(&ta, user(&bob))).await.unwrap();
    a2.friend_accept(authed(&tb, user(&alice))).await.unwrap();

    // Alice's stream on router 1 follows Bob (offline) and herself; Carol,
    // not a friend, is left out like an unknown id.
    let mut s = subscribe(&mut a1, &ta, 0, HashMap::new()).await;
    let ask = |ids: Vec<String>| cp::GetPresenceRequest { user_ids: ids };
    let got = a1
        .get_presence(authed(
            &ta,
            ask(vec![bob.clone(), carol.clone(), alice.clone()]),
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    let mut ids: Vec<&str> = got.iter().map(|p| p.user_id.as_str()).collect();
    ids.sort();
    let mut want = vec![alice.as_str(), bob.as_str()];
    want.sort();
    assert_eq!(ids, want, "{got:?}");
    let b = got.iter().find(|p| p.user_id == bob).unwrap();
    assert!(!b.online, "{b:?}");

    // Bob connects on router 2: Alice's stream hears it; he leaves: she
    // hears that too, with when he was last seen.
    let bs = subscribe(&mut a2, &tb, 0, HashMap::new()).await;
    presence_event(&mut s, &bob, true).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    drop(bs);
    let off = presence_event(&mut s, &bob, false).await;
    assert!(off.last_seen_ms + 60_000 > now_ms, "{off:?}");
    // Asked again, the answer agrees (presence is soft state on Bob's
    // shard leader; last seen is written by a Raft command just after).
    let deadline = Instant::now() + T;
    loop {
        let again = a1
            .get_presence(authed(&ta, ask(vec![bob.clone()])))
            .await
            .unwrap()
            .into_inner()
            .users;
        assert_eq!(again.len(), 1);
        if !again[0].online && again[0].last_seen_ms > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{again:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Bad input and no token are refused with clear codes.
    let bad = a1.get_presence(authed(&ta, ask(vec!["nope".into()]))).await;
    assert_eq!(code_of(bad).0, Code::InvalidArgument);
    let many = (0..101).map(|_| bob.clone()).collect();
    let too_many = a1.get_presence(authed(&ta, ask(many))).await;
    assert_eq!(code_of(too_many).1, "limit_exceeded");
    let anon = a1.get_presence(ask(vec![bob.clone()])).await;
    assert_eq!(code_of(anon).0, Code::Unauthenticated);
}
