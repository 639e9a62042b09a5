//! The connection loop every DKSP server shares: read a frame, refuse an over-long line, parse,
//! dispatch, and write the replies in request order. A server supplies only a [`Handler`]: how
//! to parse a line and what to do with a request.
//!
//! A request's reply is either ready at once or still waiting (an `APPEND` in a Raft batch, a
//! kvstore write in the log). [`Replies`] is the connection's ordered reply queue, holding both:
//! the loop writes replies from its head as they become ready, and meanwhile goes on reading
//! (pipelining) while fewer than [`MAX_PIPELINE`] are queued.
//!
//! Invariants:
//! - **Replies go out in request order**, whatever order they become ready in: a reply is
//!   written only from the head of the queue, and a handler writing to the connection itself
//!   (a streamed `SCAN`, a `TAIL`) first [`settle`](Cx::settle)s the queue.
//! - **At most [`MAX_PIPELINE`] replies are queued**; past it the loop stops reading until the
//!   head is answered, so a client that pipelines without end is held back, not buffered.
//! - Queued replies are flushed as soon as no further request is already buffered, so a
//!   pipelining client gets its replies in batches and a lone request its reply at once.
//! - A handler's [`deadline`](Handler::deadline) bounds only the wait for the next request; when
//!   it passes, [`expired`](Handler::expired) is called and the loop goes on.
//! - The connection ends when the peer closes, the read fails (a timeout or the read budget:
//!   the connection then says why as its last line), the server shuts down, or the handler says
//!   so; unless a write failed or the handler took the connection over ([`Flow::Dropped`]),
//!   the replies already queued are written first.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::Frame;
use crate::connection::Connection;
use crate::response::{Response, ServerError};
use crate::trust::Verdict;

/// Replies one connection may have queued (ready or waiting) before the loop stops reading.
pub const MAX_PIPELINE: usize = 4096;

/// A reply that is not known yet.
pub type Waiting = Pin<Box<dyn Future<Output = Response> + Send>>;

enum Slot {
    Ready(Response),
    Lines(Vec<Response>),
    Waiting {
        reply: Waiting,
        /// Bytes the request holds until it is answered (see [`Replies::held`]).
        held: usize,
    },
}

/// One connection's replies, in request order: ready ones and still-waiting ones.
#[derive(Default)]
pub struct Replies {
    slots: VecDeque<Slot>,
    /// Slots that are `Waiting`.
    waiting: usize,
    /// Sum of the waiting slots' `held`.
    held: usize,
}

impl Replies {
    /// Replies queued, ready or not.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if nothing is queued (every earlier reply has been written to the connection).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Replies still waiting.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Bytes the waiting requests hold, as their handler declared them.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Queues a ready reply line.
    pub fn push(&mut self, r: Response) {
        self.slots.push_back(Slot::Ready(r));
    }

    /// Queues a ready reply of several lines.
    pub fn push_lines(&mut self, lines: Vec<Response>) {
        self.slots.push_back(Slot::Lines(lines));
    }

    /// Queues a reply that `reply` will give; the request holds `held` bytes until then.
    pub fn push_waiting(&mut self, reply: Waiting, held: usize) {
        self.waiting += 1;
        self.held = self.held.saturating_add(held);
        self.slots.push_back(Slot::Waiting { reply, held });
    }

    /// Marks the head, which was waiting and now has its reply, ready.
    fn head_ready(&mut self, r: Response) {
        if let Some(slot) = self.slots.front_mut() {
            if let Slot::Waiting { held, .. } = slot {
                self.waiting -= 1;
                self.held = self.held.saturating_sub(*held);
            }
            // Drops the waiting future (and whatever it holds) now.
            *slot = Slot::Ready(r);
        }
    }

    /// True if the head is still waiting.
    fn head_waiting(&self) -> bool {
        matches!(self.slots.front(), Some(Slot::Waiting { .. }))
    }

    /// Writes every reply from the head that is ready now, without waiting.
    pub fn write_ready(&mut self, conn: &mut Connection) {
        while let Some(slot) = self.slots.front_mut() {
            if let Slot::Waiting { reply, .. } = slot {
                // A look, not a wait: the loop's select waits for the head with a real waker.
                match reply.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(r) => {
                        self.head_ready(r);
                        continue;
                    }
                    Poll::Pending => return,
                }
            }
            match self.slots.pop_front() {
                Some(Slot::Ready(r)) => conn.write_response(&r),
                Some(Slot::Lines(lines)) => lines.iter().for_each(|l| conn.write_response(l)),
                // The head is not waiting (checked above).
                Some(Slot::Waiting { .. }) | None => return,
            }
        }
    }

    /// Resolves once the head has its reply (then ready; [`write_ready`](Self::write_ready)
    /// writes it). Cancel-safe: the head stays queued.
    async fn wait_head(&mut self) {
        if let Some(Slot::Waiting { reply, .. }) = self.slots.front_mut() {
            let r = reply.await;
            self.head_ready(r);
        }
    }

    /// Waits for and writes every queued reply, in order (not flushed).
    pub async fn drain(&mut self, conn: &mut Connection) {
        while !self.slots.is_empty() {
            self.wait_head().await;
            self.write_ready(conn);
        }
    }
}

/// What the loop does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Read the next request.
    Continue,
    /// Write what is queued, then shut the connection down in order (`QUIT`).
    Close,
    /// The handler took the connection over and is done with it (a `TAIL` stream): drop it as
    /// it is.
    Dropped,
}

/// What a handler's dispatch works with: the connection, its reply queue and the server's
/// shutdown token.
pub struct Cx<'a> {
    /// The connection. Write to it directly only with the queue empty (see [`Cx::settle`]).
    pub conn: &'a mut Connection,
    /// The queued replies.
    pub replies: &'a mut Replies,
    /// Fires when the server shuts down (for a handler that streams).
    pub shutdown: &'a CancellationToken,
}

impl Cx<'_> {
    /// Answers the request with a ready line, in order.
    pub fn reply(&mut self, r: Response) {
        if self.replies.is_empty() {
            self.conn.write_response(&r);
        } else {
            self.replies.push(r);
        }
    }

    /// Answers the request with several ready lines, in order.
    pub fn reply_lines(&mut self, lines: Vec<Response>) {
        if self.replies.is_empty() {
            lines.iter().for_each(|l| self.conn.write_response(l));
        } else {
            self.replies.push_lines(lines);
        }
    }

    /// Answers the request once `reply` resolves; the request holds `held` bytes until then.
    pub fn reply_later(&mut self, reply: Waiting, held: usize) {
        self.replies.push_waiting(reply, held);
    }

    /// Waits for and writes every queued reply, so what the handler writes next follows them.
    pub async fn settle(&mut self) {
        self.replies.drain(self.conn).await;
    }
}

/// A request language: how one line parses.
pub trait ParseLine: Sized + Send {
    /// Parses one line: `Ok(None)` for a blank line (no reply).
    fn parse_line(line: &[u8]) -> Result<Option<Self>, ServerError>;
}

impl ParseLine for crate::kv::Request {
    fn parse_line(line: &[u8]) -> Result<Option<Self>, ServerError> {
        Self::parse(line)
    }
}

impl ParseLine for crate::seq::Request {
    fn parse_line(line: &[u8]) -> Result<Option<Self>, ServerError> {
        Self::parse(line)
    }
}

impl ParseLine for crate::log::Request {
    fn parse_line(line: &[u8]) -> Result<Option<Self>, ServerError> {
        Self::parse(line)
    }
}

/// One server's part of the connection loop.
pub trait Handler: Send {
    /// The requests it serves.
    type Request: ParseLine;

    /// The reply to a line refused before dispatch: over the line limit, or unparsable. The
    /// default is the error itself.
    fn refused(&mut self, e: ServerError) -> Response {
        Response::Err(e)
    }

    /// When to stop waiting for the next request and call [`expired`](Self::expired).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The [`deadline`](Self::deadline) passed with no request.
    fn expired(&mut self) {}

    /// Runs one request, answering it through `cx`. An error means the connection is gone.
    fn dispatch(
        &mut self,
        req: Self::Request,
        cx: &mut Cx<'_>,
    ) -> impl Future<Output = io::Result<Flow>> + Send;
}

/// Serves one connection with `handler` until it ends (see the module comment).
pub async fn run<H: Handler>(mut conn: Connection, mut handler: H, shutdown: CancellationToken) {
    let mut replies = Replies::default();
    loop {
        replies.write_ready(&mut conn);
        let can_read = replies.len() < MAX_PIPELINE;
        let idle = !replies.is_empty() && !conn.has_buffered_line();
        if (idle || !can_read) && conn.flush().await.is_err() {
            return;
        }
        let head_waiting = replies.head_waiting();
        let deadline = handler.deadline();
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = replies.wait_head(), if head_waiting => continue,
            f = read_until(&mut conn, deadline), if can_read => f,
        };
        let line = match frame {
            None => {
                handler.expired();
                continue;
            }
            Some(Ok(Some(Frame::Line(line)))) => line,
            Some(Ok(Some(Frame::TooLong))) => {
                let r = match Response::too_large(conn.max_line()) {
                    Response::Err(e) => handler.refused(e),
                    r => r,
                };
                replies.push(r);
                continue;
            }
            Some(Ok(None)) => break,
            Some(Err(e)) => {
                // Also a timeout or the read budget: `shutdown` then says why.
                tracing::debug!("connection error: {e}");
                break;
            }
        };
        if let Some(gate) = conn.gate_mut() {
            match gate.check(&line) {
                Verdict::Pass => {}
                Verdict::Answer(r) => {
                    replies.push(r);
                    continue;
                }
                Verdict::Close(r) => {
                    replies.push(r);
                    break;
                }
            }
        }
        let req = match H::Request::parse_line(&line) {
            Ok(Some(req)) => req,
            Ok(None) => continue,
            Err(e) => {
                let r = handler.refused(e);
                replies.push(r);
                continue;
            }
        };
        let mut cx = Cx {
            conn: &mut conn,
            replies: &mut replies,
            shutdown: &shutdown,
        };
        match handler.dispatch(req, &mut cx).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => break,
            Ok(Flow::Dropped) | Err(_) => return,
        }
    }
    replies.drain(&mut conn).await;
    let _ = conn.shutdown().await;
}

/// The next frame, or `None` if `deadline` passes first.
async fn read_until(
    conn: &mut Connection,
    deadline: Option<Instant>,
) -> Option<io::Result<Option<Frame>>> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, conn.read_frame()).await.ok(),
        None => Some(conn.read_frame().await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::ErrorCode;
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, oneshot};

    /// A line of the test language: a verb and an argument.
    struct Line(String, String);

    impl ParseLine for Line {
        fn parse_line(line: &[u8]) -> Result<Option<Self>, ServerError> {
            let s = String::from_utf8_lossy(line).trim().to_string();
            if s.is_empty() {
                return Ok(None);
            }
            match s.split_once(' ') {
                Some((v, a)) => Ok(Some(Line(v.into(), a.into()))),
                None if s == "bad" => Err(ServerError::new(ErrorCode::Syntax, "bad line")),
                None => Ok(Some(Line(s, String::new()))),
            }
        }
    }

    /// `now X` answers `X` at once; `wait X` answers `X` once the test sends it through the
    /// sender it receives; `arm` sets a deadline long past; `expired` answers how often the
    /// deadline passed; `quit` closes; `take` ends the connection as a streaming handler does.
    struct Test {
        later: mpsc::UnboundedSender<(String, oneshot::Sender<Response>)>,
        deadline: Option<Instant>,
        expired: usize,
        refused: Arc<Mutex<usize>>,
    }

    fn value(s: &str) -> Response {
        Response::Value(Bytes::from(s.to_string()))
    }

    impl Handler for Test {
        type Request = Line;

        fn refused(&mut self, e: ServerError) -> Response {
            *self.refused.lock().unwrap() += 1;
            Response::Err(e)
        }

        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }

        fn expired(&mut self) {
            self.deadline = None;
            self.expired += 1;
        }

        async fn dispatch(&mut self, Line(verb, arg): Line, cx: &mut Cx<'_>) -> io::Result<Flow> {
            match verb.as_str() {
                "now" => cx.reply(value(&arg)),
                "wait" => {
                    let (tx, rx) = oneshot::channel();
                    let _ = self.later.send((arg, tx));
                    let held = 10;
                    cx.reply_later(
                        Box::pin(async move { rx.await.unwrap_or_else(|_| value("dropped")) }),
                        held,
                    );
                }
                "held" => cx.reply(value(&format!(
                    "{}/{}",
                    cx.replies.waiting(),
                    cx.replies.held()
                ))),
                "arm" => {
                    // Well past (a deadline of "now" is rounded up to the timer's next tick).
                    let now = Instant::now();
                    self.deadline = Some(now.checked_sub(Duration::from_secs(60)).unwrap_or(now));
                    cx.reply(value("armed"));
                }
                "expired" => cx.reply(value(&self.expired.to_string())),
                "quit" => {
                    cx.reply(Response::ok());
                    return Ok(Flow::Close);
                }
                "take" => {
                    cx.settle().await;
                    cx.conn.write_response(&value("taken"));
                    cx.conn.flush().await?;
                    return Ok(Flow::Dropped);
                }
                _ => cx.reply(Response::err(ErrorCode::Syntax, "unknown")),
            }
            Ok(Flow::Continue)
        }
    }

    struct Peer {
        lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
        write: tokio::net::tcp::OwnedWriteHalf,
        later: mpsc::UnboundedReceiver<(String, oneshot::Sender<Response>)>,
        refused: Arc<Mutex<usize>>,
    }

    impl Peer {
        async fn send(&mut self, s: &str) {
            self.write.write_all(s.as_bytes()).await.unwrap();
        }
        async fn line(&mut self) -> Option<String> {
            self.lines.next_line().await.unwrap()
        }
    }

    /// A server running the loop with [`Test`] on one connection, and its client.
    async fn start() -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, later) = mpsc::unbounded_channel();
        let refused = Arc::new(Mutex::new(0));
        let handler = Test {
            later: tx,
            deadline: None,
            expired: 0,
            refused: refused.clone(),
        };
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            run(
                Connection::new(stream, 64),
                handler,
                CancellationToken::new(),
            )
            .await;
        });
        let (read, write) = TcpStream::connect(addr).await.unwrap().into_split();
        Peer {
            lines: BufReader::new(read).lines(),
            write,
            later,
            refused,
        }
    }

    #[tokio::test]
    async fn replies_go_out_in_request_order_whatever_order_they_become_ready_in() {
        let mut p = start().await;
        p.send("wait a\nnow b\nwait c\nnow d\nheld\n").await;
        let (a, ta) = p.later.recv().await.unwrap();
        let (c, tc) = p.later.recv().await.unwrap();
        assert_eq!((a.as_str(), c.as_str()), ("a", "c"));
        // `held` is answered only after both waits: it is behind them in the queue, but was
        // dispatched while they waited.
        tc.send(value("c")).unwrap();
        ta.send(value("a")).unwrap();
        for want in ["VALUE a", "VALUE b", "VALUE c", "VALUE d", "VALUE 2/20"] {
            assert_eq!(p.line().await.unwrap(), want);
        }
        p.send("held\n").await;
        assert_eq!(
            p.line().await.unwrap(),
            "VALUE 0/0",
            "answered waits hold nothing"
        );
    }

    #[tokio::test]
    async fn refused_lines_are_answered_in_order_and_blank_lines_not_at_all() {
        let mut p = start().await;
        let long = "x".repeat(200);
        p.send(&format!("wait a\n\n{long}\nbad\nnow b\n")).await;
        let (_, ta) = p.later.recv().await.unwrap();
        ta.send(value("a")).unwrap();
        assert_eq!(p.line().await.unwrap(), "VALUE a");
        assert!(p.line().await.unwrap().starts_with("ERR TOO_LARGE"));
        assert!(p.line().await.unwrap().starts_with("ERR SYNTAX"));
        assert_eq!(p.line().await.unwrap(), "VALUE b");
        assert_eq!(
            *p.refused.lock().unwrap(),
            2,
            "the handler saw both refusals"
        );
    }

    #[tokio::test]
    async fn a_deadline_that_passes_while_waiting_for_a_request_calls_expired() {
        let mut p = start().await;
        p.send("expired\narm\n").await;
        assert_eq!(p.line().await.unwrap(), "VALUE 0");
        // The loop waits for the next request only after `armed` is flushed, and this side
        // sends it only after reading `armed`: the deadline has passed by then.
        assert_eq!(p.line().await.unwrap(), "VALUE armed");
        p.send("expired\n").await;
        assert_eq!(p.line().await.unwrap(), "VALUE 1");
    }

    #[tokio::test]
    async fn close_answers_what_is_queued_first_and_dropped_after_taking_over() {
        // The last request ends the connection; a reply queued before it still goes out first.
        for (last, want) in [("quit\nnow never", "OK"), ("take", "VALUE taken")] {
            let mut p = start().await;
            p.send(&format!("wait a\n{last}\n")).await;
            let (_, ta) = p.later.recv().await.unwrap();
            ta.send(value("a")).unwrap();
            assert_eq!(p.line().await.unwrap(), "VALUE a", "{last}");
            assert_eq!(p.line().await.unwrap(), want, "{last}");
            assert_eq!(p.line().await, None, "closed after {last}");
        }
    }

    #[tokio::test]
    async fn a_waiting_reply_whose_sender_is_gone_is_answered_not_lost() {
        let mut p = start().await;
        p.send("wait a\nnow b\n").await;
        let (_, ta) = p.later.recv().await.unwrap();
        drop(ta);
        assert_eq!(p.line().await.unwrap(), "VALUE dropped");
        assert_eq!(p.line().await.unwrap(), "VALUE b");
    }
}
