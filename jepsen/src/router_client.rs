//! The workload's client path through real routers: every operation is a
//! gRPC call to a `natter-router` process, as the SDK and the mobile apps
//! make them, with the session token of the process's own account. The
//! routers run outside the nodes' network namespaces, like routers on their
//! own machines: partitions cut nodes off from each other, not from the
//! routers.
//!
//! Outcomes are recorded honestly: a send is `fail` only when the router
//! refused it before proposing (validation, auth, rate limit); every other
//! error (timeouts, unavailable, internal) may have committed and is `info`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use natter_model::pb;
use natter_proto::client as cp;
use natter_tests::grpc::{self, Api};
use tonic::Code;

use crate::history::Seen;
use crate::workload::{
    feed_pages, sync_pages, FeedSync, MessagingClient, SendResult, SyncResult, MAX_SYNC_PAGES,
};

/// Every workload process's account: its user id, session token and the
/// router it talks to.
struct Account {
    user_id: String,
    token: String,
    api: Api,
}

/// The workload's client through routers.
#[derive(Clone)]
pub struct RouterClient {
    /// By process number.
    accounts: Arc<Vec<Account>>,
    /// By user id: index into `accounts`.
    by_user: Arc<HashMap<String, usize>>,
}

const PASSWORD: &str = "jepsen-workload-password";

impl RouterClient {
    /// Registers and logs in one account per process, spreading the
    /// processes over `routers` (process `p` uses router `p % n`).
    pub async fn connect(routers: &[String], processes: u64) -> Result<RouterClient> {
        if routers.is_empty() {
            bail!("no routers");
        }
        let mut apis = Vec::new();
        for r in routers {
            apis.push(grpc::api(r).await?);
        }
        let mut accounts = Vec::new();
        let mut by_user = HashMap::new();
        for p in 0..processes {
            let mut api = apis[p as usize % apis.len()].clone();
            let name = format!("jepsen_p{p}");
            let (user_id, token) = grpc::account(&mut api, &name, PASSWORD)
                .await
                .with_context(|| format!("account of process {p}"))?;
            by_user.insert(user_id.clone(), accounts.len());
            accounts.push(Account {
                user_id,
                token,
                api,
            });
        }
        Ok(RouterClient {
            accounts: Arc::new(accounts),
            by_user: Arc::new(by_user),
        })
    }

    fn account(&self, user: &str) -> Result<&Account> {
        self.by_user
            .get(user)
            .and_then(|&i| self.accounts.get(i))
            .ok_or_else(|| anyhow!("no account for user {user}"))
    }
}

/// Whether a refused call certainly changed nothing: the router answers
/// these before anything is proposed.
fn refused_before_proposing(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::AlreadyExists
            | Code::OutOfRange
    )
}

fn status_text(s: &tonic::Status) -> String {
    let code = grpc::error_code(s);
    if code.is_empty() {
        format!("{:?}: {}", s.code(), s.message())
    } else {
        format!("{code}: {}", s.message())
    }
}

impl MessagingClient for RouterClient {
    fn user_id(&self, p: u64) -> String {
        self.accounts
            .get(p as usize)
            .map(|a| a.user_id.clone())
            .unwrap_or_default()
    }

    async fn create_group(&self, creator: &str, members: &[String]) -> Result<String> {
        let a = self.account(creator)?;
        let id = natter_tests::natter::uuid();
        let r = a
            .api
            .clone()
            .create_group(grpc::authed(
                &a.token,
                cp::CreateGroupRequest {
                    conversation_id: id.clone(),
                    name: "jepsen".into(),
                    member_ids: members.to_vec(),
                    retention_ms: 0,
                },
            ))
            .await
            .map_err(|s| anyhow!("create group: {}", status_text(&s)))?;
        match r.into_inner().conversation {
            Some(c) => Ok(c.id),
            None => bail!("create group: no conversation in the reply"),
        }
    }

    async fn send(&self, conv: &str, sender: &str, cmid: &str, text: &str) -> SendResult {
        let a = match self.account(sender) {
            Ok(a) => a,
            Err(e) => return SendResult::Fail(format!("{e:#}")),
        };
        let r = a
            .api
            .clone()
            .send(grpc::authed(
                &a.token,
                cp::SendRequest {
                    conversation_id: conv.into(),
                    client_msg_id: cmid.into(),
                    text: text.into(),
                    media: Vec::new(),
                    ttl_ms: 0,
                },
            ))
            .await;
        match r {
            Ok(reply) => match reply.into_inner().message {
                Some(m) => SendResult::Ok(m.seq),
                None => SendResult::Info("sent without a message".into()),
            },
            Err(s) if refused_before_proposing(s.code()) => {
                SendResult::Fail(format!("refused: {}", status_text(&s)))
            }
            Err(s) => SendResult::Info(status_text(&s)),
        }
    }

    async fn sync(&self, viewer: &str, conv: &str, token: u64) -> Result<SyncResult> {
        let a = self.account(viewer)?;
        sync_pages(token, |at| {
            let mut api = a.api.clone();
            let req = grpc::authed(
                &a.token,
                cp::SyncConversationRequest {
                    conversation_id: conv.into(),
                    token: at,
                    limit: 50,
                },
            );
            async move {
                api.sync_conversation(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| anyhow!("sync: {}", status_text(&s)))
            }
        })
        .await
    }

    async fn history(&self, viewer: &str, conv: &str) -> Result<Vec<Seen>> {
        let a = self.account(viewer)?;
        let mut api = a.api.clone();
        let mut out: Vec<Seen> = Vec::new();
        let mut before = 0;
        for _ in 0..MAX_SYNC_PAGES * 10 {
            let page = match api
                .history(grpc::authed(
                    &a.token,
                    cp::HistoryRequest {
                        conversation_id: conv.into(),
                        before_seq: before,
                        limit: 100,
                    },
                ))
                .await
            {
                Ok(p) => p.into_inner(),
                // A conversation that was never created reads as empty.
                Err(s) if s.code() == Code::NotFound && before == 0 => return Ok(Vec::new()),
                Err(s) => bail!("history of {conv}: {}", status_text(&s)),
            };
            out.extend(
                page.messages
                    .iter()
                    .map(|m: &pb::Message| (m.seq, m.client_msg_id.clone())),
            );
            if page.before_seq == 0 {
                out.sort_unstable_by_key(|(s, _)| *s);
                return Ok(out);
            }
            before = page.before_seq;
        }
        bail!("history of {conv} did not end")
    }

    async fn feed(&self, user: &str, token: u64) -> Result<FeedSync> {
        let a = self.account(user)?;
        feed_pages(
            token,
            |cursor| {
                let mut api = a.api.clone();
                let req = grpc::authed(&a.token, cp::GetFeedRequest { limit: 100, cursor });
                async move {
                    api.get_feed(req)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| anyhow!("feed: {}", status_text(&s)))
                }
            },
            |at| {
                let mut api = a.api.clone();
                let req = grpc::authed(
                    &a.token,
                    cp::SyncFeedRequest {
                        token: at,
                        limit: 50,
                    },
                );
                async move {
                    api.sync_feed(req)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| anyhow!("feed sync: {}", status_text(&s)))
                }
            },
        )
        .await
    }
}
