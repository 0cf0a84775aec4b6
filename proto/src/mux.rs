//! Many calls on one long-lived bidirectional gRPC stream: a frame per
//! call, answered by a reply frame carrying the call's id, in any order.
//!
//! A unary gRPC call costs an HTTP/2 stream, request headers, response
//! headers and trailers; a frame on an open stream costs only its bytes.
//! Nodes send Raft messages to each other this way (`RaftStream`), and
//! routers their proposals and reads to nodes (`Calls`). [`Mux`] is the
//! calling side, [`serve`] the serving side.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// A call's frame: the mux numbers it.
pub trait Frame: Send + 'static {
    fn set_id(&mut self, id: u64);
}

/// A reply frame: names the call it answers.
pub trait Reply: Send + 'static {
    fn id(&self) -> u64;
}

type Waiter<R> = oneshot::Sender<Result<R, Status>>;

/// One open stream: frames out, replies matched to their callers by id.
/// Once it ends (the peer closed it, the connection broke), every caller
/// waiting gets the error; the owner opens a new one ([`Mux::is_open`]).
pub struct Mux<F, R> {
    /// What the stream is, for error messages ("raft stream").
    name: &'static str,
    out: mpsc::Sender<F>,
    pending: Mutex<HashMap<u64, Waiter<R>>>,
    next_id: AtomicU64,
    open: AtomicBool,
}

impl<F: Frame, R: Reply> Mux<F, R> {
    /// Opens a stream: `start` makes the gRPC call from the outbound frames
    /// (at most `queue` of them wait to be written).
    pub fn open<S>(name: &'static str, queue: usize, start: S) -> Arc<Self>
    where
        S: FnOnce(ReceiverStream<F>) -> Box<dyn StreamStart<R>>,
    {
        let (out, rx) = mpsc::channel(queue);
        let mux = Arc::new(Mux {
            name,
            out,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicBool::new(true),
        });
        let call = start(ReceiverStream::new(rx));
        let me = mux.clone();
        tokio::spawn(async move {
            let ended = match Box::into_pin(call).await {
                Ok(replies) => {
                    let mut replies = replies.into_inner();
                    loop {
                        match replies.message().await {
                            Ok(Some(r)) => me.complete(r),
                            Ok(None) => {
                                break Status::unavailable(format!("the peer closed the {name}"))
                            }
                            Err(e) => break e,
                        }
                    }
                }
                Err(e) => e,
            };
            me.close(&ended);
        });
        mux
    }

    /// Whether the stream still carries calls.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    /// Calls waiting for their reply.
    pub fn waiting(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.len())
    }

    fn complete(&self, reply: R) {
        let waiter = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&reply.id()));
        if let Some(w) = waiter {
            // The caller may have given up (timeout): nobody to tell.
            let _ = w.send(Ok(reply));
        }
    }

    /// Marks the stream ended and fails every waiter with `why`. A caller
    /// registering concurrently sees `open` false after registering, so no
    /// waiter is left behind.
    fn close(&self, why: &Status) {
        self.open.store(false, Ordering::SeqCst);
        let waiters: Vec<Waiter<R>> = match self.pending.lock() {
            Ok(mut p) => p.drain().map(|(_, w)| w).collect(),
            Err(_) => Vec::new(),
        };
        for w in waiters {
            let _ = w.send(Err(Status::new(why.code(), why.message().to_string())));
        }
    }

    /// Sends `frame` (numbered here) and waits for its reply until
    /// `deadline`.
    pub async fn call(&self, mut frame: F, deadline: Instant) -> Result<R, Status> {
        let name = self.name;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| Status::internal(format!("{name} waiters poisoned")))?
            .insert(id, tx);
        // Whatever happens below (even the caller dropping this future), the
        // waiter does not outlive the call.
        let _forget = Forget { mux: self, id };
        if !self.is_open() {
            return Err(Status::unavailable(format!("the {name} ended")));
        }
        frame.set_id(id);
        match tokio::time::timeout_at(deadline, self.out.send(frame)).await {
            Err(_) => return Err(Status::deadline_exceeded(format!("{name} send queue full"))),
            Ok(Err(_)) => return Err(Status::unavailable(format!("the {name} ended"))),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(Status::deadline_exceeded(format!("no reply on the {name}"))),
            Ok(Err(_)) => Err(Status::unavailable(format!("the {name} ended"))),
            Ok(Ok(r)) => r,
        }
    }
}

/// The serving side of a multiplexed stream: each inbound frame is
/// answered by `handle` on a task of its own, replies queued (at most
/// `queue`) in any order; at most `max_in_flight` frames are handled at
/// once if given (past that, frames wait in HTTP/2 flow control). Serving
/// ends when the caller closes the stream or it breaks (an undecodable or
/// over-size frame, the connection lost): the caller sees the stream end
/// and opens a new one. The outbound half of the reply stream.
pub fn serve<F, R, H, Fut>(
    mut inbound: Streaming<F>,
    queue: usize,
    max_in_flight: Option<usize>,
    handle: H,
) -> ReceiverStream<Result<R, Status>>
where
    F: Send + 'static,
    R: Send + 'static,
    H: Fn(F) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(queue);
    let limit = max_in_flight.map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    tokio::spawn(async move {
        while let Ok(Some(frame)) = inbound.message().await {
            let permit = match &limit {
                Some(l) => match l.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                None => None,
            };
            let (reply, tx) = (handle(frame), tx.clone());
            tokio::spawn(async move {
                // The caller may have gone meanwhile: nobody to tell.
                let _ = tx.send(Ok(reply.await)).await;
                drop(permit);
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The future of a stream's gRPC call (what a generated client's streaming
/// method returns).
pub trait StreamStart<R>:
    Future<Output = Result<tonic::Response<Streaming<R>>, Status>> + Send + 'static
{
}

impl<R, T> StreamStart<R> for T where
    T: Future<Output = Result<tonic::Response<Streaming<R>>, Status>> + Send + 'static
{
}

/// Removes a call's waiter when the call ends.
struct Forget<'a, F, R> {
    mux: &'a Mux<F, R>,
    id: u64,
}

impl<F, R> Drop for Forget<'_, F, R> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.mux.pending.lock() {
            p.remove(&self.id);
        }
    }
}

impl Frame for crate::cluster::RaftFrame {
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl Reply for crate::cluster::RaftFrameReply {
    fn id(&self) -> u64 {
        self.id
    }
}

impl Frame for crate::cluster::CallFrame {
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl Reply for crate::cluster::CallFrameReply {
    fn id(&self) -> u64 {
        self.id
    }
}
