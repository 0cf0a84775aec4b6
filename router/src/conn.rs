//! Per-connection plumbing shared by the WebSocket handler and the push
//! hub: the bounded outgoing queue and the connection's close signal.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

/// WebSocket close codes the router uses (docs/protocol.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const BAD_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTART: u16 = 1012;
    pub const IDLE: u16 = 4000;
    pub const SESSION_ENDED: u16 = 4001;
    pub const TOO_SLOW: u16 = 4008;
}

/// Ends a connection once, remembering why.
#[derive(Default)]
pub struct Closer {
    token: CancellationToken,
    reason: OnceLock<(u16, String)>,
}

impl Closer {
    pub fn new(parent: &CancellationToken) -> Closer {
        Closer {
            token: parent.child_token(),
            reason: OnceLock::new(),
        }
    }

    /// Closes with `code` unless the connection is already closing (a
    /// shutdown, which cancels every connection at once, wins).
    pub fn close(&self, code: u16, reason: &str) {
        if self.token.is_cancelled() {
            let _ = self.reason.set(Self::restart());
            return;
        }
        let _ = self.reason.set((code, reason.to_string()));
        self.token.cancel();
    }

    fn restart() -> (u16, String) {
        (close::RESTART, "the router is restarting".into())
    }

    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn closed(&self) {
        self.token.cancelled().await
    }

    /// Why the connection closes; a cancelled parent (shutdown) counts as
    /// a restart.
    pub fn reason(&self) -> (u16, String) {
        self.reason.get().cloned().unwrap_or_else(Self::restart)
    }
}

/// One queued frame. A reply to a request carries the request's in-flight
/// permit, released once the frame is written: replies are bounded by the
/// in-flight limit (a client that doesn't read its replies stops being
/// read). Everything else (events, error frames, pings' replies) counts
/// against the queue's budget.
pub struct Frame {
    pub text: String,
    /// A gRPC stream's event (instead of `text`).
    event: Option<Box<natter_proto::client::Event>>,
    len: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl Frame {
    fn new(text: String, permit: Option<OwnedSemaphorePermit>) -> Frame {
        Frame {
            len: text.len(),
            text,
            event: None,
            permit,
        }
    }

    /// The event to write on a gRPC stream (the frame keeps its accounting).
    pub fn take_event(&mut self) -> Option<natter_proto::client::Event> {
        self.event.take().map(|e| *e)
    }

    fn budgeted(&self) -> bool {
        self.permit.is_none()
    }

    /// The text to write (the frame keeps its accounting).
    pub fn take_text(&mut self) -> String {
        std::mem::take(&mut self.text)
    }
}

/// A connection's outgoing frames: replies and pushed events. The budgeted
/// part is bounded in frames and bytes: a client that doesn't read fast
/// enough overflows it and is disconnected (close 4008) instead of growing
/// the router's memory; it reconnects and resumes from its tokens.
pub struct Outbound {
    tx: mpsc::UnboundedSender<Frame>,
    frames: AtomicUsize,
    bytes: AtomicUsize,
    max_frames: usize,
    max_bytes: usize,
    closer: std::sync::Arc<Closer>,
    /// Pushes are queued as protobuf events (gRPC), not JSON text.
    typed: bool,
}

impl Outbound {
    pub fn new(
        max_frames: usize,
        max_bytes: usize,
        closer: std::sync::Arc<Closer>,
    ) -> (Outbound, mpsc::UnboundedReceiver<Frame>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Outbound {
                tx,
                frames: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_frames,
                max_bytes,
                closer,
                typed: false,
            },
            rx,
        )
    }

    /// A queue of protobuf events (a gRPC stream) with the same budget.
    pub fn new_typed(
        max_frames: usize,
        max_bytes: usize,
        closer: std::sync::Arc<Closer>,
    ) -> (Outbound, mpsc::UnboundedReceiver<Frame>) {
        let (mut out, rx) = Outbound::new(max_frames, max_bytes, closer);
        out.typed = true;
        (out, rx)
    }

    /// Queues a pushed event in this connection's encoding (budgeted, like
    /// [`Outbound::send`]).
    pub fn push(&self, p: crate::push::Push) -> bool {
        if !self.typed {
            return self.send_json(&p.to_json());
        }
        let ev = crate::grpc::event(p);
        let len = prost::Message::encoded_len(&ev);
        let frame = Frame {
            text: String::new(),
            event: Some(Box::new(ev)),
            len,
            permit: None,
        };
        self.enqueue(frame)
    }

    /// Queues a budgeted frame; false (and the connection closes) when the
    /// budget is exhausted. One frame larger than the byte budget is let
    /// through when nothing budgeted is queued.
    pub fn send(&self, text: String) -> bool {
        self.enqueue(Frame::new(text, None))
    }

    fn enqueue(&self, frame: Frame) -> bool {
        if self.closer.is_closed() {
            return false;
        }
        let len = frame.len;
        let frames = self.frames.fetch_add(1, Ordering::AcqRel) + 1;
        let bytes = self.bytes.fetch_add(len, Ordering::AcqRel) + len;
        if frames > self.max_frames || (bytes > self.max_bytes && frames > 1) {
            self.uncount(len);
            self.closer.close(
                close::TOO_SLOW,
                "too far behind: reconnect and resume from your tokens",
            );
            return false;
        }
        if self.tx.send(frame).is_err() {
            self.uncount(len);
            return false;
        }
        true
    }

    pub fn send_json(&self, v: &serde_json::Value) -> bool {
        crate::metrics::frame_out(v);
        self.send(v.to_string())
    }

    /// Queues the reply of a request, with the request's in-flight permit.
    pub fn reply(&self, v: &serde_json::Value, permit: OwnedSemaphorePermit) -> bool {
        if self.closer.is_closed() {
            return false;
        }
        crate::metrics::frame_out(v);
        self.tx
            .send(Frame::new(v.to_string(), Some(permit)))
            .is_ok()
    }

    fn uncount(&self, len: usize) {
        self.frames.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(len, Ordering::AcqRel);
    }

    /// Called by the writer once a frame left the queue (written or
    /// dropped); releases its budget or permit.
    pub fn done(&self, f: Frame) {
        if f.budgeted() {
            self.uncount(f.len);
        }
    }

    /// Bytes of budgeted frames queued.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    pub fn closer(&self) -> &Closer {
        &self.closer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_closes_the_connection_as_too_slow() {
        let closer = std::sync::Arc::new(Closer::new(&CancellationToken::new()));
        let (out, mut rx) = Outbound::new(3, 100, closer.clone());
        assert!(out.send("x".repeat(10)));
        assert!(out.send("x".repeat(10)));
        assert!(out.send("x".repeat(10)));
        assert!(!closer.is_closed());
        assert!(!out.send("y".into()));
        assert!(closer.is_closed());
        assert_eq!(closer.reason().0, close::TOO_SLOW);
        assert!(!out.send("z".into()));
        assert_eq!(rx.try_recv().unwrap().text.len(), 10);
        // Byte budget: one big frame passes an empty queue, not a busy one.
        let closer = std::sync::Arc::new(Closer::new(&CancellationToken::new()));
        let (out, mut rx) = Outbound::new(100, 100, closer.clone());
        assert!(out.send("x".repeat(500)));
        out.done(rx.try_recv().unwrap());
        assert_eq!(out.queued_bytes(), 0);
        assert!(out.send("x".repeat(60)));
        assert!(!out.send("x".repeat(60)));
        assert_eq!(closer.reason().0, close::TOO_SLOW);
    }
}
