//! Routers: one lazy gRPC channel per address, the current one, failover.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use natter_proto::client::natter_client::NatterClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::{Error, Inner};

pub(crate) type Api = NatterClient<Channel>;

/// Largest message the SDK accepts from a router.
const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

pub(crate) struct Routers {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
}

impl Routers {
    pub fn new(addrs: &[String], timeout: Duration) -> Result<Routers, Error> {
        let mut channels = Vec::new();
        for a in addrs {
            let url = if a.starts_with("http://") || a.starts_with("https://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            let ep = Endpoint::from_shared(url)
                .map_err(|e| Error::Invalid(format!("bad router address {a:?}: {e}")))?
                .connect_timeout(Duration::from_secs(3).min(timeout))
                .http2_keep_alive_interval(Duration::from_secs(15))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            channels.push(ep.connect_lazy());
        }
        Ok(Routers {
            addrs: addrs.to_vec(),
            channels,
            current: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// (index, client) of the current router.
    pub fn current(&self) -> (usize, Api) {
        let i = self.current.load(Ordering::Acquire) % self.channels.len();
        (i, self.api(i))
    }

    /// A client without the per-call deadline (for the push stream).
    pub fn api(&self, i: usize) -> Api {
        NatterClient::new(self.channels[i].clone()).max_decoding_message_size(MAX_REPLY_BYTES)
    }

    pub fn addr(&self, i: usize) -> String {
        self.addrs[i % self.addrs.len()].clone()
    }

    pub fn current_addr(&self) -> String {
        self.addr(self.current.load(Ordering::Acquire))
    }

    /// Moves on from router `i` (unless someone already did).
    pub fn failed(&self, i: usize) {
        let next = (i + 1) % self.channels.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// `msg` with `authorization: Bearer <token>`.
pub(crate) fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Whether a status means "this router can't answer now" (try another),
/// as opposed to an answer.
pub(crate) fn transport_failure(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled => s.metadata().get("natter-error").is_none(),
        _ => false,
    }
}

/// The SDK error of a status.
pub(crate) fn api_error(s: &Status) -> Error {
    let code = s
        .metadata()
        .get("natter-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| {
            match s.code() {
                Code::Unauthenticated => "unauthenticated",
                Code::NotFound => "not_found",
                Code::InvalidArgument => "invalid_argument",
                Code::PermissionDenied => "permission_denied",
                Code::AlreadyExists => "already_exists",
                Code::FailedPrecondition => "failed_precondition",
                Code::OutOfRange => "limit_exceeded",
                Code::DeadlineExceeded => "timeout",
                Code::Unavailable => "unavailable",
                _ => "internal",
            }
            .to_string()
        });
    Error::Api {
        code,
        message: s.message().to_string(),
    }
}

impl Inner {
    /// Runs a call on the current router, moving to the next one when a
    /// router can't be reached (every router once). `f` must be safe to
    /// repeat (every Natter call is idempotent or keyed).
    pub(crate) async fn call<R, F, Fut>(&self, token: Option<String>, f: F) -> Result<R, Error>
    where
        F: Fn(Api, String) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let mut last = String::new();
        for _ in 0..self.routers.len() {
            let (i, api) = self.routers.current();
            let r = tokio::time::timeout(
                self.cfg.call_timeout,
                f(api, token.clone().unwrap_or_default()),
            )
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the router did not answer in time")));
            match r {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if transport_failure(&s) => {
                    last = format!("{}: {}", self.routers.addr(i), s.message());
                    self.routers.failed(i);
                }
                Err(s) => return Err(api_error(&s)),
            }
        }
        Err(Error::Unreachable(last))
    }

    /// [`Inner::call`] with the session token.
    pub(crate) async fn authed<R, F, Fut>(&self, f: F) -> Result<R, Error>
    where
        F: Fn(Api, String) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let t = self.token()?.ok_or(Error::NotLoggedIn)?;
        self.call(Some(t), f).await
    }
}
