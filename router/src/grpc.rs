//! The client API over gRPC (`proto/natter/client.proto`), served on the
//! router's HTTP port (HTTP/2; tonic's routes merged into the axum router).
//!
//! Everything protocol-neutral is shared with the WebSocket: operations run
//! through [`Ops::call`] (authorization, model commands, the cluster), pushes
//! come from the same [`Hub`](crate::push::Hub) device actors, queued in the
//! same bounded [`Outbound`] (typed: protobuf events instead of JSON text),
//! and sessions are checked by the same [`Accounts`](crate::auth::Accounts)
//! and watchdog. This module only maps protobuf to [`Request`]s and
//! [`Answer`]s back, and errors to gRPC statuses.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use natter_model::pb::{self, response::R};
use natter_proto::client::{self as cp, natter_server::Natter, natter_server::NatterServer};
use tokio::sync::mpsc;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request as GrpcRequest, Response, Status};

use crate::auth::SessionInfo;
use crate::conn::{close, Closer, Frame, Outbound};
use crate::error::ApiError;
use crate::json;
use crate::ops::{Answer, Ops, Request, RoleIn};
use crate::push::{Push, Resume, MAX_TRACKED};
use crate::AppState;

/// Largest request message (a `Subscribe` with 10,000 conversation tokens
/// fits; every other request is far smaller, and the model's own limits
/// apply to texts, members and pages).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Metadata key of the protocol's error code in an error status.
pub const ERROR_CODE_KEY: &str = "natter-error";

/// The gRPC service, to merge into the router's axum router: only its own
/// paths (`/natter.client.Natter/<method>`), so every other path keeps the
/// HTTP router's answers (an unknown one is a plain 404).
pub fn routes(state: Arc<AppState>) -> axum::Router {
    let svc = NatterServer::new(Api { state }).max_decoding_message_size(MAX_REQUEST_BYTES);
    let path = format!(
        "/{}/{{*method}}",
        <NatterServer<Api> as tonic::server::NamedService>::NAME
    );
    axum::Router::new().route_service(&path, svc)
}

/// The gRPC status of an error: the code maps the protocol's code
/// (docs/protocol.md), which is also in the `natter-error` metadata.
pub fn status(e: &ApiError) -> Status {
    let code = match e.code() {
        "invalid_argument" => Code::InvalidArgument,
        "limit_exceeded" => Code::OutOfRange,
        "unauthenticated" => Code::Unauthenticated,
        "permission_denied" => Code::PermissionDenied,
        "not_found" => Code::NotFound,
        "already_exists" => Code::AlreadyExists,
        "failed_precondition" => Code::FailedPrecondition,
        "unavailable" => Code::Unavailable,
        "timeout" => Code::DeadlineExceeded,
        "rate_limited" => Code::ResourceExhausted,
        "wrong_region" => Code::FailedPrecondition,
        "too_large" => Code::OutOfRange,
        _ => Code::Internal,
    };
    let mut st = Status::new(code, e.to_string());
    let md = st.metadata_mut();
    md.insert(ERROR_CODE_KEY, MetadataValue::from_static(e.code()));
    match e {
        ApiError::RateLimited { retry_after_ms, .. } => {
            md.insert("retry-after-ms", MetadataValue::from(*retry_after_ms));
        }
        ApiError::WrongRegion {
            home_region,
            router_url,
        } => {
            if let Ok(v) = MetadataValue::try_from(home_region.as_str()) {
                md.insert("home-region", v);
            }
            if let Some(Ok(v)) = router_url.as_deref().map(MetadataValue::try_from) {
                md.insert("router-url", v);
            }
        }
        _ => {}
    }
    st
}

/// A pushed event as the gRPC stream's message.
pub fn event(p: Push) -> cp::Event {
    use cp::event::Event as E;
    let e = match p {
        Push::Feed { from_token, page } => E::Feed(cp::FeedEvent {
            from_token,
            page: Some(page),
        }),
        Push::Conversation {
            conversation_id,
            from_token,
            sync,
        } => E::Conversation(cp::ConversationEvent {
            conversation_id,
            from_token,
            sync: Some(sync),
        }),
        Push::ConversationGone {
            conversation_id,
            message,
        } => E::ConversationGone(cp::ConversationGone {
            conversation_id,
            message: message.unwrap_or_default(),
        }),
        Push::Friends => E::Friends(cp::FriendsChanged {}),
        Push::Typing {
            conversation_id,
            user_id,
        } => E::Typing(cp::TypingEvent {
            conversation_id,
            user_id,
        }),
        Push::SessionEnded { reason } => E::SessionEnded(cp::SessionEnded {
            reason: reason.unwrap_or_else(|| "session ended".into()),
        }),
        Push::Reconnect { reason } => E::Reconnect(cp::Reconnect { reason }),
        Push::Presence(p) => E::Presence(presence(p)),
    };
    cp::Event { event: Some(e) }
}

fn presence(p: natter_proto::cluster::UserPresence) -> cp::Presence {
    cp::Presence {
        user_id: p.user_id,
        online: p.online,
        last_seen_ms: p.last_seen_ms,
    }
}

fn token(md: &MetadataMap) -> Result<String, ApiError> {
    let Some(v) = md.get("authorization") else {
        return Err(ApiError::Unauthenticated(
            "a session token is required (authorization: Bearer <token>)".into(),
        ));
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("malformed authorization metadata".into()))?;
    match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Ok(t.trim().to_string()),
        _ => Err(ApiError::Unauthenticated(
            "authorization must be \"Bearer <token>\"".into(),
        )),
    }
}

fn privacy(p: i32) -> Result<String, ApiError> {
    match pb::Privacy::try_from(p) {
        Ok(pb::Privacy::Everyone) => Ok("everyone".into()),
        Ok(pb::Privacy::FriendsOfFriends) => Ok("friends_of_friends".into()),
        Ok(pb::Privacy::Nobody) => Ok("nobody".into()),
        _ => Err(ApiError::invalid(
            "privacy must be EVERYONE, FRIENDS_OF_FRIENDS or NOBODY",
        )),
    }
}

fn notifications(n: i32) -> Result<String, ApiError> {
    match pb::Notifications::try_from(n) {
        Ok(pb::Notifications::All) => Ok("all".into()),
        Ok(pb::Notifications::DirectOnly) => Ok("direct_only".into()),
        Ok(pb::Notifications::None) => Ok("none".into()),
        _ => Err(ApiError::invalid(
            "notifications must be ALL, DIRECT_ONLY or NONE",
        )),
    }
}

fn user(u: pb::User, own: bool) -> cp::User {
    if own {
        cp::User {
            user_id: u.id,
            username: u.username,
            created_at_ms: u.created_at_ms,
            privacy: u.privacy,
            notifications: u.notifications,
            home_region: u.home_region,
        }
    } else {
        cp::User {
            user_id: u.id,
            username: u.username,
            ..Default::default()
        }
    }
}

fn unexpected(a: &Answer) -> Status {
    let e = ApiError::Unexpected(format!("{a:?}").chars().take(200).collect());
    tracing::warn!("gRPC: {e}");
    status(&e)
}

fn model(a: Answer) -> Result<R, Status> {
    match a {
        Answer::Model(r) => Ok(r),
        other => Err(unexpected(&other)),
    }
}

fn conversation(a: Answer) -> Result<Response<cp::ConversationReply>, Status> {
    match model(a)? {
        R::Conversation(c) => Ok(Response::new(cp::ConversationReply {
            conversation: Some(c),
        })),
        other => Err(unexpected(&Answer::Model(other))),
    }
}

fn friendship(me: &str, a: Answer) -> Result<Response<cp::FriendshipReply>, Status> {
    match model(a)? {
        R::Friendship(f) => {
            let (other, rel) = json::friendship_view(&f, me);
            Ok(Response::new(cp::FriendshipReply {
                friendship: Some(cp::Friend {
                    user_id: other.to_string(),
                    relation: rel as i32,
                    version: f.version,
                    updated_at_ms: f.updated_at_ms,
                }),
            }))
        }
        other => Err(unexpected(&Answer::Model(other))),
    }
}

fn user_reply(a: Answer) -> Result<Response<cp::UserReply>, Status> {
    match a {
        Answer::User { user: u, own } => Ok(Response::new(cp::UserReply {
            user: Some(user(u, own)),
        })),
        // update_settings answers the caller's own row.
        Answer::Model(R::User(u)) => Ok(Response::new(cp::UserReply {
            user: Some(user(u, true)),
        })),
        other => Err(unexpected(&other)),
    }
}

pub struct Api {
    state: Arc<AppState>,
}

/// The client's IP address (axum's connect info), for the abuse limits.
fn peer_ip<T>(req: &GrpcRequest<T>) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

impl Api {
    async fn session(&self, md: &MetadataMap) -> Result<SessionInfo, Status> {
        let t = token(md).map_err(|e| status(&e))?;
        self.state
            .accounts
            .authenticate(&t)
            .await
            .map_err(|e| status(&e))
    }

    /// Authenticates the call, builds the operation and runs it as the
    /// session's user: (the caller's id, the answer).
    async fn run<T>(
        &self,
        req: GrpcRequest<T>,
        build: impl FnOnce(T) -> Result<Request, ApiError>,
    ) -> Result<(String, Answer), Status> {
        let s = self.session(req.metadata()).await?;
        let op = build(req.into_inner()).map_err(|e| status(&e))?;
        if matches!(op, Request::Send { .. }) {
            self.state
                .limits
                .check_send(&s.user_id, &s.token_hash)
                .map_err(|e| status(&e))?;
        }
        let ops = Ops {
            cluster: &self.state.cluster,
            me: &s.user_id,
            deadline: Instant::now() + self.state.config.request_timeout,
        };
        match ops.call(op).await {
            Ok(a) => Ok((s.user_id, a)),
            Err(e) => {
                if e.code() == "internal" {
                    tracing::warn!("gRPC request failed: {e}");
                }
                Err(status(&e))
            }
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<cp::Event, Status>> + Send>>;

/// A Subscribe stream's state: the device's queue, and what to say at the end.
struct Conn {
    rx: mpsc::UnboundedReceiver<Frame>,
    out: Arc<Outbound>,
    closer: Arc<Closer>,
    pending: VecDeque<Result<cp::Event, Status>>,
    finished: bool,
    _task: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl Drop for Conn {
    /// The client went away (or the stream ended): the device's actor and
    /// watchdog stop.
    fn drop(&mut self) {
        self.closer.close(close::NORMAL, "");
        while let Ok(f) = self.rx.try_recv() {
            self.out.done(f);
        }
    }
}

impl Conn {
    fn finish(&mut self) {
        self.finished = true;
        let (code, reason) = self.closer.reason();
        if code != close::TOO_SLOW {
            // Deliver what was queued before the close (`reconnect`,
            // `session_ended`).
            while let Ok(mut f) = self.rx.try_recv() {
                if let Some(ev) = f.take_event() {
                    self.pending.push_back(Ok(ev));
                }
                self.out.done(f);
            }
        }
        let end = match code {
            close::TOO_SLOW => {
                self.pending.push_back(Ok(cp::Event {
                    event: Some(cp::event::Event::Resync(cp::Resync {
                        reason: reason.clone(),
                    })),
                }));
                Some(Status::aborted(reason))
            }
            close::SESSION_ENDED => Some(Status::unauthenticated(reason)),
            close::RESTART => Some(Status::unavailable(
                "the router is restarting: reconnect (any router) and resume",
            )),
            _ => None,
        };
        if let Some(s) = end {
            self.pending.push_back(Err(s));
        }
    }

    async fn next(mut self) -> Option<(Result<cp::Event, Status>, Conn)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            if self.closer.is_closed() {
                self.finish();
                continue;
            }
            tokio::select! {
                biased;
                _ = self.closer.closed() => self.finish(),
                f = self.rx.recv() => match f {
                    Some(mut f) => {
                        let ev = f.take_event();
                        self.out.done(f);
                        if let Some(ev) = ev {
                            return Some((Ok(ev), self));
                        }
                    }
                    None => self.finish(),
                },
            }
        }
    }
}

macro_rules! op {
    ($self:ident, $req:ident, |$m:ident| $build:expr) => {
        $self.run($req, |$m| Ok($build)).await?
    };
}

#[tonic::async_trait]
impl Natter for Api {
    async fn register(
        &self,
        req: GrpcRequest<cp::RegisterRequest>,
    ) -> Result<Response<cp::RegisterReply>, Status> {
        let ip = peer_ip(&req);
        let r = req.into_inner();
        let (user_id, username) =
            crate::http::guarded_register(&self.state, &r.username, &r.password, ip)
                .await
                .map_err(|e| status(&e))?;
        Ok(Response::new(cp::RegisterReply { user_id, username }))
    }

    async fn login(
        &self,
        req: GrpcRequest<cp::LoginRequest>,
    ) -> Result<Response<cp::LoginReply>, Status> {
        let ip = peer_ip(&req);
        let r = req.into_inner();
        let l = crate::http::guarded_login(&self.state, &r.username, &r.password, &r.device, ip)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(cp::LoginReply {
            token: l.token,
            user_id: l.user_id,
            username: l.username,
            expires_at_ms: l.expires_at_ms,
        }))
    }

    async fn logout(&self, req: GrpcRequest<cp::Empty>) -> Result<Response<cp::Empty>, Status> {
        let t = token(req.metadata()).map_err(|e| status(&e))?;
        let s = self
            .state
            .accounts
            .logout(&t)
            .await
            .map_err(|e| status(&e))?;
        self.state.hub.end_session(&s.token_hash);
        Ok(Response::new(cp::Empty {}))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: GrpcRequest<cp::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let st = &self.state;
        if st.draining.load(Ordering::Acquire) {
            return Err(status(&ApiError::Unavailable(
                "the router is shutting down".into(),
            )));
        }
        if let Some(ip) = peer_ip(&req) {
            st.limits.check_connect_ip(ip).map_err(|e| status(&e))?;
        }
        let session = self.session(req.metadata()).await?;
        st.limits
            .check_connect_user(&session.user_id)
            .map_err(|e| status(&e))?;
        let deadline = Instant::now() + st.config.request_timeout;
        let home = crate::region::home_region(&st.cluster, &session.user_id, deadline)
            .await
            .map_err(|e| status(&e))?;
        st.config.regions.check(&home).map_err(|e| status(&e))?;
        let r = req.into_inner();
        if r.conversations.len() > MAX_TRACKED {
            return Err(status(&ApiError::invalid(format!(
                "subscribe: at most {MAX_TRACKED} conversations"
            ))));
        }
        let limits = &st.config.ws;
        let closer = Arc::new(Closer::new(&st.conns));
        let (out, rx) =
            Outbound::new_typed(limits.queue_frames, limits.queue_bytes, closer.clone());
        let out = Arc::new(out);
        let dev = st
            .hub
            .register(&session.user_id, session.token_hash, out.clone());
        tracing::debug!(device = dev.id, user = %session.user_id, "gRPC stream connected");
        dev.resume(Resume {
            feed_token: r.feed_token,
            conversations: r.conversations.into_iter().collect::<BTreeMap<_, _>>(),
        });
        st.tasks
            .spawn(crate::ws::watchdog(st.clone(), session, out.clone()));
        let conn = Conn {
            rx,
            out,
            closer,
            pending: VecDeque::from([Ok(cp::Event {
                event: Some(cp::event::Event::Connected(cp::Connected {})),
            })]),
            finished: false,
            _task: st.tasks.token(),
        };
        let stream = futures::stream::unfold(conn, Conn::next);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ping(&self, req: GrpcRequest<cp::Empty>) -> Result<Response<cp::Empty>, Status> {
        self.session(req.metadata()).await?;
        Ok(Response::new(cp::Empty {}))
    }

    async fn typing(
        &self,
        req: GrpcRequest<cp::ConversationRef>,
    ) -> Result<Response<cp::Empty>, Status> {
        let s = self.session(req.metadata()).await?;
        let c = req.into_inner().conversation_id;
        self.state
            .hub
            .typing_for_session(&s.token_hash, &c)
            .map_err(|e| status(&e))?;
        Ok(Response::new(cp::Empty {}))
    }

    async fn get_presence(
        &self,
        req: GrpcRequest<cp::GetPresenceRequest>,
    ) -> Result<Response<cp::GetPresenceReply>, Status> {
        let s = self.session(req.metadata()).await?;
        let ids = req.into_inner().user_ids;
        // The session's stream here, if any, follows them.
        let dev = self.state.hub.session_device(&s.token_hash);
        let deadline = Instant::now() + self.state.config.request_timeout;
        let users = self
            .state
            .hub
            .presence
            .get(
                &self.state.cluster,
                &s.user_id,
                dev.as_ref().map(|d| (d.id, &d.out)),
                ids,
                deadline,
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(cp::GetPresenceReply {
            users: users.into_iter().map(presence).collect(),
        }))
    }

    async fn send(
        &self,
        req: GrpcRequest<cp::SendRequest>,
    ) -> Result<Response<cp::SendReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::Send {
            conversation_id: m.conversation_id,
            client_msg_id: m.client_msg_id,
            text: m.text,
            media: m
                .media
                .into_iter()
                .map(|x| crate::ops::MediaIn {
                    object_id: x.object_id,
                    sha256: x.sha256,
                    content_type: x.content_type,
                    size: x.size,
                    name: x.name,
                    width: x.width,
                    height: x.height,
                })
                .collect(),
            ttl_ms: m.ttl_ms,
        });
        match model(a)? {
            R::Sent(s) => Ok(Response::new(cp::SendReply {
                message: s.message,
                duplicate: s.duplicate,
            })),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn create_direct(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::ConversationReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::CreateDirect { user_id: m.user_id });
        conversation(a)
    }

    async fn create_group(
        &self,
        req: GrpcRequest<cp::CreateGroupRequest>,
    ) -> Result<Response<cp::ConversationReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::CreateGroup {
            conversation_id: (!m.conversation_id.is_empty()).then_some(m.conversation_id),
            name: m.name,
            member_ids: m.member_ids,
            retention_ms: m.retention_ms,
        });
        conversation(a)
    }

    async fn update_conversation(
        &self,
        req: GrpcRequest<cp::UpdateConversationRequest>,
    ) -> Result<Response<cp::ConversationReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::UpdateConversation {
            conversation_id: m.conversation_id,
            name: m.name,
            add_member_ids: m.add_member_ids,
            remove_member_ids: m.remove_member_ids,
            set_roles: m
                .set_roles
                .into_iter()
                .map(|r| RoleIn {
                    user_id: r.user_id,
                    role: json::role(r.role).to_string(),
                })
                .collect(),
            retention_ms: m.retention_ms,
        });
        conversation(a)
    }

    async fn delete_conversation(
        &self,
        req: GrpcRequest<cp::DeleteConversationRequest>,
    ) -> Result<Response<cp::ConversationReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::DeleteConversation {
            conversation_id: m.conversation_id,
            for_everyone: m.for_everyone,
        });
        conversation(a)
    }

    async fn delete_message(
        &self,
        req: GrpcRequest<cp::DeleteMessageRequest>,
    ) -> Result<Response<cp::MessageReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::DeleteMessage {
            conversation_id: m.conversation_id,
            seq: m.seq,
            for_everyone: m.for_everyone,
        });
        match model(a)? {
            R::Message(m) => Ok(Response::new(cp::MessageReply { message: Some(m) })),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn mark_read(
        &self,
        req: GrpcRequest<cp::MarkReadRequest>,
    ) -> Result<Response<cp::ConversationReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::MarkRead {
            conversation_id: m.conversation_id,
            seq: m.seq,
        });
        conversation(a)
    }

    async fn get_conversation(
        &self,
        req: GrpcRequest<cp::ConversationRef>,
    ) -> Result<Response<cp::ConversationReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::GetConversation {
            conversation_id: m.conversation_id,
        });
        conversation(a)
    }

    async fn sync_conversation(
        &self,
        req: GrpcRequest<cp::SyncConversationRequest>,
    ) -> Result<Response<pb::ConversationSync>, Status> {
        let (_, a) = op!(self, req, |m| Request::SyncConversation {
            conversation_id: m.conversation_id,
            token: m.token,
            limit: m.limit,
        });
        match model(a)? {
            R::ConversationSync(s) => Ok(Response::new(s)),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn history(
        &self,
        req: GrpcRequest<cp::HistoryRequest>,
    ) -> Result<Response<pb::MessagePage>, Status> {
        let (_, a) = op!(self, req, |m| Request::History {
            conversation_id: m.conversation_id,
            before_seq: m.before_seq,
            limit: m.limit,
        });
        match model(a)? {
            R::History(p) => Ok(Response::new(p)),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn get_feed(
        &self,
        req: GrpcRequest<cp::GetFeedRequest>,
    ) -> Result<Response<pb::FeedPage>, Status> {
        let (_, a) = op!(self, req, |m| Request::GetFeed {
            limit: m.limit,
            cursor: (!m.cursor.is_empty()).then(|| json::b64(&m.cursor)),
        });
        match model(a)? {
            R::Feed(p) => Ok(Response::new(p)),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn sync_feed(
        &self,
        req: GrpcRequest<cp::SyncFeedRequest>,
    ) -> Result<Response<pb::FeedPage>, Status> {
        let (_, a) = op!(self, req, |m| Request::SyncFeed {
            token: m.token,
            limit: m.limit,
        });
        match model(a)? {
            R::Feed(p) => Ok(Response::new(p)),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn set_feed_flags(
        &self,
        req: GrpcRequest<cp::SetFeedFlagsRequest>,
    ) -> Result<Response<cp::FeedEntryReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::SetFeedFlags {
            conversation_id: m.conversation_id,
            muted: m.muted,
            archived: m.archived,
        });
        match model(a)? {
            R::FeedEntry(e) => Ok(Response::new(cp::FeedEntryReply { entry: Some(e) })),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn friend_request(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::FriendshipReply>, Status> {
        let (me, a) = op!(self, req, |m| Request::FriendRequest { user_id: m.user_id });
        friendship(&me, a)
    }

    async fn friend_accept(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::FriendshipReply>, Status> {
        let (me, a) = op!(self, req, |m| Request::FriendAccept { user_id: m.user_id });
        friendship(&me, a)
    }

    async fn friend_remove(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::FriendshipReply>, Status> {
        let (me, a) = op!(self, req, |m| Request::FriendRemove { user_id: m.user_id });
        friendship(&me, a)
    }

    async fn friend_block(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::FriendshipReply>, Status> {
        let (me, a) = op!(self, req, |m| Request::FriendBlock { user_id: m.user_id });
        friendship(&me, a)
    }

    async fn friend_unblock(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::FriendshipReply>, Status> {
        let (me, a) = op!(self, req, |m| Request::FriendUnblock { user_id: m.user_id });
        friendship(&me, a)
    }

    async fn get_friendship(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::FriendshipReply>, Status> {
        let (me, a) = op!(self, req, |m| Request::GetFriendship { user_id: m.user_id });
        friendship(&me, a)
    }

    async fn list_friends(
        &self,
        req: GrpcRequest<cp::ListFriendsRequest>,
    ) -> Result<Response<cp::ListFriendsReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::ListFriends {
            after: m.after,
            limit: m.limit,
        });
        match model(a)? {
            R::Friends(l) => Ok(Response::new(cp::ListFriendsReply {
                friends: l
                    .entries
                    .into_iter()
                    .map(|f| cp::Friend {
                        user_id: f.other_id,
                        relation: f.relation,
                        version: f.version,
                        updated_at_ms: f.updated_at_ms,
                    })
                    .collect(),
                next_after: l.next_after,
            })),
            other => Err(unexpected(&Answer::Model(other))),
        }
    }

    async fn get_user(
        &self,
        req: GrpcRequest<cp::UserRef>,
    ) -> Result<Response<cp::UserReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::GetUser { user_id: m.user_id });
        user_reply(a)
    }

    async fn lookup_user(
        &self,
        req: GrpcRequest<cp::LookupUserRequest>,
    ) -> Result<Response<cp::UserReply>, Status> {
        let (_, a) = op!(self, req, |m| Request::LookupUser {
            username: m.username
        });
        user_reply(a)
    }

    async fn me(&self, req: GrpcRequest<cp::Empty>) -> Result<Response<cp::UserReply>, Status> {
        let (_, a) = op!(self, req, |_m| Request::Me {});
        user_reply(a)
    }

    async fn update_settings(
        &self,
        req: GrpcRequest<cp::UpdateSettingsRequest>,
    ) -> Result<Response<cp::UserReply>, Status> {
        let (_, a) = self
            .run(req, |m| {
                Ok(Request::UpdateSettings {
                    privacy: m.privacy.map(privacy).transpose()?,
                    notifications: m.notifications.map(notifications).transpose()?,
                })
            })
            .await?;
        user_reply(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_grpc_codes_with_the_protocol_code() {
        let e = ApiError::not_found("conversation not found");
        let s = status(&e);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "conversation not found");
        assert_eq!(
            s.metadata()
                .get(ERROR_CODE_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("not_found")
        );
        let s = status(&ApiError::Unauthenticated("x".into()));
        assert_eq!(s.code(), Code::Unauthenticated);
        let s = status(&ApiError::Model {
            code: pb::ErrorCode::LimitExceeded,
            message: "too long".into(),
        });
        assert_eq!(s.code(), Code::OutOfRange);
    }

    #[test]
    fn bearer_tokens_are_read_strictly() {
        let mut md = MetadataMap::new();
        assert!(token(&md).is_err());
        md.insert("authorization", MetadataValue::from_static("Basic abc"));
        assert!(token(&md).is_err());
        md.insert("authorization", MetadataValue::from_static("Bearer abc"));
        assert_eq!(token(&md).ok().as_deref(), Some("abc"));
    }

    #[test]
    fn settings_enums_must_be_named() {
        assert!(privacy(pb::Privacy::Unspecified as i32).is_err());
        assert!(privacy(99).is_err());
        assert_eq!(
            privacy(pb::Privacy::Nobody as i32).ok().as_deref(),
            Some("nobody")
        );
        assert!(notifications(0).is_err());
    }
}
