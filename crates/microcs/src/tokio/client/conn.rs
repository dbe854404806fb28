//! One connection of an async client: its pending requests, and the reader, writer and deadline
//! tasks that serve them (see the parent module).

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ::tokio::net::UnixStream;
use ::tokio::sync::{Notify, mpsc, oneshot};
use ::tokio::time::{Instant, sleep, sleep_until};

use super::super::io::{Outbox, Stream, read_more, read_more_with_fds, shutdown};
use crate::io::{Filled, IdMap, ReadBuf};
use crate::proto::client_conn::{self, Incoming, Loss, Outcome, Written};
use crate::proto::{Credit, Decoded, Frame, Header, HelloAck, Kind};

/// One connection and the requests waiting on it.
pub(super) struct Conn {
    pub(super) stream: Stream,
    /// The server's handshake answer: limits and identity.
    pub(super) server: HelloAck,
    /// Requests to write, and the pending table, under one lock: a request is either queued
    /// and registered, or refused because the connection is dead — never half of it.
    pub(super) outbox: Outbox<Book>,
    /// Wakes the deadline task: a request's deadline is earlier than the one it sleeps until,
    /// or the connection ended.
    pub(super) deadlines: Notify,
    /// The instance slot it reached (`None`: the name's exclusive server).
    pub(super) slot: Option<u32>,
    /// The loop that reads the connection's frames and hands them out (`None` once it ended).
    /// The reader task drives it; a lone caller drives it too while it waits (see `Reader`).
    pub(super) reader: Reader,
    /// The socket it was opened on (the name's, or its instance's), for
    /// [`Client::socket_path`](super::Client::socket_path).
    pub(super) path: PathBuf,
    /// Cleared, under the book lock, when the connection is closed or retired; read without
    /// the lock by [`is_usable`](Conn::is_usable), once per request. A request that races with
    /// the change is refused under the lock and sent again elsewhere, as before.
    pub(super) usable: AtomicBool,
}

/// The connection's read loop, as a future that more than one task may poll (one at a time).
///
/// Its reader task polls it as the connection's tasks always did. A caller whose request is
/// the only one pending polls it as well while it waits for its answer ([`Conn::wait_lone`]):
/// the loop then registers the *caller's* waker with the socket (or the rings), so the reply
/// wakes the caller directly and the caller reads it, instead of the reader task reading it and
/// waking the caller through a `oneshot` — a hand-off that, in a `block_on` caller, also costs
/// tokio's current-thread scheduler a zero-timeout `epoll_wait`. The answer it reads lands in
/// the connection's [`LoneSlot`] without waking anyone (no channel per request). Whatever the loop waits for
/// wakes whoever polled it last, so while a caller drives it (`caller`) the reader task leaves
/// it alone, and the caller hands it back — `caller` cleared, the reader task woken — when it
/// stops (answered, or dropped) or when another request joins (whose sender does the same, so
/// a caller's future left unpolled cannot hold the connection's replies up).
#[derive(Default)]
pub(super) struct Reader {
    lp: Mutex<Option<ReadLoop>>,
    /// The reader task's waker, to hand the loop back to it.
    task: Mutex<Option<Waker>>,
    /// A lone caller drives the loop. Set and cleared under the connection's book lock, with
    /// the pending table's size, so it is never set while another request is pending.
    caller: AtomicBool,
}

type ReadLoop = Pin<Box<dyn Future<Output = Loss> + Send>>;

impl Reader {
    /// The reader task's turn: polls the loop unless a lone caller drives it. `Ready(())` once
    /// the loop has ended (the connection is closed).
    fn poll_task(&self, conn: &Conn, cx: &mut Context<'_>) -> Poll<()> {
        let lp = self.lp.lock().unwrap_or_else(|p| p.into_inner());
        // Looked at under `lp`, which a caller holds while it sets it: either this poll comes
        // before the caller's (whose registration then wins) or it sees the flag.
        if self.caller.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        Self::poll_loop(lp, conn, cx)
    }

    /// The turn of the caller of request `id`, while that request is the connection's only
    /// pending one (`false`: it is not — another joined, or it was settled — or the reader task
    /// is polling the loop right now; the caller then waits for the reader task's hand-off).
    /// Sets `caller` when it polls.
    fn poll_caller(&self, conn: &Conn, cx: &mut Context<'_>, id: u64) -> bool {
        let lp = match self.lp.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        {
            let st = conn.book();
            if st.extra.pending.len() != 1 || !st.extra.pending.contains_key(&id) || st.is_closed() {
                return false;
            }
            self.caller.store(true, Ordering::Release);
        }
        let _ = Self::poll_loop(lp, conn, cx);
        true
    }

    fn poll_loop(mut lp: MutexGuard<'_, Option<ReadLoop>>, conn: &Conn, cx: &mut Context<'_>) -> Poll<()> {
        let Some(f) = lp.as_mut() else { return Poll::Ready(()) };
        let Poll::Ready(dead) = f.as_mut().poll(cx) else { return Poll::Pending };
        // Dropped outside the lock: the loop holds a reference to the connection.
        let done = lp.take();
        drop(lp);
        drop(done);
        tracing::debug!(reason = ?dead, "connection ended");
        conn.close(dead);
        Poll::Ready(())
    }

    /// Hands the loop back to the reader task. Called under the book lock with `caller` set,
    /// or after it; `wake` then wakes the reader task (outside the lock).
    pub(super) fn release(&self) -> bool {
        self.caller.swap(false, Ordering::AcqRel)
    }

    /// Wakes the reader task so that it polls the loop again (after [`Reader::release`]).
    pub(super) fn wake(&self) {
        if let Some(w) = self.task.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            w.wake_by_ref();
        }
    }

    /// Ends the loop without polling it again (its task is gone): breaks the loop's reference
    /// to the connection.
    fn drop_loop(&self) {
        let lp = self.lp.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(lp);
    }
}

/// Per-connection state kept under the outbox lock.
#[derive(Default)]
pub(super) struct Book {
    pub(super) pending: IdMap<Pending>,
    /// Why the connection ended, once it has.
    pub(super) dead: Option<Loss>,
    /// No longer used for new requests; closed once its last pending request is answered.
    pub(super) retired: bool,
    /// Bytes the writer task handed to the kernel, once it has stopped: from then on whoever
    /// ends the connection settles the requests still pending.
    pub(super) written_final: Option<u64>,
    /// When the deadline task next looks at the pending requests' deadlines (`None`: when one
    /// is added).
    pub(super) next_deadline: Option<Instant>,
    /// The reader's last read carried more than one reply: their callers are likely to send
    /// again together, so they leave their requests to the writer task's next batch instead of
    /// each sending its own (see `attempt`).
    pub(super) burst: bool,
    /// Where the answer of a lone caller's request ([`Waiter::Lone`]) waits for it: from the
    /// request's sending until its caller takes the answer or stops waiting. One at a time: a
    /// request sent while it is taken waits through a `oneshot` instead.
    pub(super) lone: Option<LoneSlot>,
}

/// The answer of the one request whose caller reads its own reply (see [`Reader`]).
pub(super) struct LoneSlot {
    pub(super) id: u64,
    pub(super) outcome: Option<Outcome>,
    /// Woken when the answer arrives other than through the caller's own read: the reader
    /// task's, the deadline task's, the connection's end.
    pub(super) waker: Option<Waker>,
}

/// Where a request's answer goes.
pub(super) enum Waiter {
    /// A unary call: its one outcome.
    Once(oneshot::Sender<Outcome>),
    /// A unary call that was alone on its connection when sent: its outcome goes to the
    /// connection's [`LoneSlot`] (no channel to allocate, and the caller's own read of its
    /// reply does not wake it).
    Lone,
    /// A stream: each item, then its end (docs/PROTOCOL.md § 17). Unbounded, yet bounded by the
    /// window the caller grants: the server sends no more than that ahead of the application.
    Stream(mpsc::UnboundedSender<Event>),
}

/// What reaches a stream's caller.
pub(super) enum Event {
    Item(Vec<u8>),
    /// The end: an empty `Reply`, or how it failed.
    End(Outcome),
}

impl Waiter {
    /// Delivers the outcome of request `id` (a stream's end). Called without the book lock.
    pub(super) fn settle(self, conn: &Conn, id: u64, outcome: Outcome) {
        match self {
            Waiter::Once(tx) => {
                let _ = tx.send(outcome);
            }
            Waiter::Lone => conn.settle_lone(id, outcome, true),
            Waiter::Stream(tx) => {
                let _ = tx.send(Event::End(outcome));
            }
        }
    }
}

/// A caller waiting for a reply.
pub(super) struct Pending {
    pub(super) tx: Waiter,
    /// When the caller stops waiting (the deadline task then answers `TimedOut`).
    pub(super) deadline: Instant,
    /// Offsets of the request's frame in the connection's byte stream.
    pub(super) start: u64,
    pub(super) end: u64,
}

impl Conn {
    pub(super) fn book(&self) -> MutexGuard<'_, super::super::io::OutState<Book>> {
        self.outbox.lock()
    }

    /// Usable for new requests.
    /// Requests (and streams) waiting for their answer.
    pub(super) fn in_flight(&self) -> usize {
        self.book().extra.pending.len()
    }

    pub(super) fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Ends the connection: no more requests; the writer task settles the pending ones.
    pub(super) fn close(&self, why: Loss) {
        let settle = {
            let mut st = self.book();
            let dead = st.extra.dead.get_or_insert(why).clone();
            st.close();
            self.usable.store(false, Ordering::Release);
            // With the writer still running, it settles them when it stops (it alone knows how
            // many bytes went out).
            st.extra.written_final.map(|w| (dead, w, std::mem::take(&mut st.extra.pending)))
        };
        self.outbox.close();
        self.deadlines.notify_one();
        shutdown(&self.stream);
        if let Some((dead, written, pending)) = settle {
            settle_lost(self, pending, &dead, self.seen(&dead, written));
        }
    }

    /// How much of the `written` bytes the server may have read. On shared memory a dead
    /// server's ring still takes our bytes, but it read only up to its consumed index: the
    /// requests after it never ran (PROTOCOL.md § 18), as a socket's failed write shows. (A
    /// server that sent garbage is not believed.)
    fn seen(&self, dead: &Loss, written: u64) -> u64 {
        match (dead, self.stream.link().shm().and_then(|s| s.unread_by_peer())) {
            (Loss::Closed(_), Some(unread)) => written.saturating_sub(unread),
            _ => written,
        }
    }

    /// Answers `TimedOut` to the callers whose deadline is at or before `now`, queues a `Cancel`
    /// for each, and sets when to look again.
    pub(super) fn expire(&self, now: Instant) {
        let (expired, close) = {
            let mut st = self.book();
            let ids: Vec<u64> =
                st.extra.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(&id, _)| id).collect();
            let mut expired = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(p) = st.extra.pending.remove(&id) {
                    // Best effort: a Cancel that cannot be queued is moot (the connection is gone).
                    let _ = st.push(&Header::new(Kind::Cancel, id), b"", b"");
                    expired.push((id, p.tx));
                }
            }
            st.extra.next_deadline = st.extra.pending.values().map(|p| p.deadline).min();
            (expired, st.extra.retired && st.extra.pending.is_empty())
        };
        if !expired.is_empty() {
            self.outbox.wake();
        }
        for (id, tx) in expired {
            tx.settle(self, id, Outcome::TimedOut);
        }
        if close {
            self.close(Loss::Closed(None));
        }
    }

    /// Waits for the answer of request `id`, sent as [`Waiter::Lone`]: the caller reads it
    /// itself while nothing else is pending (see [`Reader`]). `None`: the answer's slot is gone
    /// (it cannot be, while the caller waits).
    pub(super) async fn wait_lone(&self, id: u64) -> Option<Outcome> {
        // However this ends (also when dropped): the slot is freed and the loop handed back to
        // the reader task.
        struct Done<'a>(&'a Conn, u64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.give_back(Some(self.1));
            }
        }
        let _done = Done(self, id);
        std::future::poll_fn(|cx| {
            // It reads only while its request is the one pending: with others, the reader task
            // hands the replies out (a pipeline's batches stay with it). A reply it reads itself
            // lands in the slot without waking it: it looks there next.
            let drove = self.reader.poll_caller(self, cx, id);
            let answer = {
                let mut st = self.book();
                match st.extra.lone.as_mut() {
                    Some(slot) if slot.id == id => match slot.outcome.take() {
                        Some(outcome) => Poll::Ready(Some(outcome)),
                        None => {
                            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                                slot.waker = Some(cx.waker().clone());
                            }
                            Poll::Pending
                        }
                    },
                    _ => Poll::Ready(None),
                }
            };
            if !drove && answer.is_pending() {
                self.give_back(None);
            }
            answer
        })
        .await
    }

    /// Leaves the outcome of the lone request `id` in its slot, if its caller still waits;
    /// `wake`: and wakes the caller (not when the caller is the one reading: it looks in the
    /// slot after its read).
    fn settle_lone(&self, id: u64, outcome: Outcome, wake: bool) {
        let waker = {
            let mut st = self.book();
            match st.extra.lone.as_mut() {
                Some(slot) if slot.id == id => {
                    slot.outcome = Some(outcome);
                    slot.waker.take()
                }
                _ => None,
            }
        };
        if let Some(w) = waker.filter(|_| wake) {
            w.wake();
        }
    }

    /// Ends a lone caller's turn at the read loop, if it had one; `done`: the caller of that
    /// request stops waiting, so its answer's slot is freed too.
    fn give_back(&self, done: Option<u64>) {
        let released = {
            let mut st = self.book();
            if done.is_some() && st.extra.lone.as_ref().map(|l| l.id) == done {
                st.extra.lone = None;
            }
            self.reader.release()
        };
        if released {
            self.reader.wake();
        }
    }

    /// Delivers an answer to the caller waiting for `id`, if it still waits. `burst`: it is not
    /// the first reply of its read.
    pub(super) fn resolve(&self, id: u64, outcome: Outcome, burst: bool) {
        let (waiter, close) = {
            let mut st = self.book();
            st.extra.burst = burst;
            let w = st.extra.pending.remove(&id);
            (w, st.extra.retired && st.extra.pending.is_empty())
        };
        match waiter.map(|p| p.tx) {
            // Read by the loop: `caller` set means the lone caller is the one polling it (the
            // reader task leaves the loop alone while it is set), so the caller looks in the
            // slot when the read returns. (Cleared meanwhile by a request joining, it costs a
            // wake-up the caller does not need.) Whoever else settles it wakes it.
            Some(Waiter::Lone) => self.settle_lone(id, outcome, !self.reader.caller.load(Ordering::Acquire)),
            Some(tx) => tx.settle(self, id, outcome),
            None => {}
        }
        if close {
            self.close(Loss::Closed(None));
        }
    }

    /// Hands an item to the stream `id`, if its caller still waits (a late item of a cancelled
    /// stream is dropped).
    pub(super) fn item(&self, id: u64, payload: Vec<u8>) {
        let st = self.book();
        if let Some(Pending { tx: Waiter::Stream(tx), .. }) = st.extra.pending.get(&id) {
            let _ = tx.send(Event::Item(payload));
        }
    }

    /// Grants the stream `id` more room (best effort: a dead connection ends the stream anyway).
    pub(super) fn credit(&self, id: u64, credit: Credit) {
        let pushed = self.book().push(&Header::new(Kind::Credit, id), b"", &credit.to_bytes()).is_some();
        if pushed {
            self.outbox.wake();
        }
    }

    /// Forgets a request whose caller gave up and tells the server, if it was still pending.
    pub(super) fn abandon(&self, id: u64) {
        let close = {
            let mut st = self.book();
            if st.extra.pending.remove(&id).is_none() {
                return;
            }
            // Best effort: a Cancel that cannot be queued is moot (the connection is gone).
            let _ = st.push(&Header::new(Kind::Cancel, id), b"", b"");
            st.extra.retired && st.extra.pending.is_empty()
        };
        self.outbox.wake();
        if close {
            self.close(Loss::Closed(None));
        }
    }

    /// Stops using this connection for new requests; closes it once nothing waits on it.
    pub(super) fn retire(&self) {
        let close = {
            let mut st = self.book();
            st.extra.retired = true;
            self.usable.store(false, Ordering::Release);
            st.extra.pending.is_empty()
        };
        if close {
            self.close(Loss::Closed(None));
        }
    }
}

/// Sends a `Cancel` for a request whose caller stops waiting (timeout, or its future dropped).
pub(super) struct CancelOnDrop<'a> {
    pub(super) conn: &'a Conn,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.abandon(self.id);
        }
    }
}

/// Starts the connection's read loop (see [`Reader`]).
pub(super) fn start_reader(conn: &Arc<Conn>, rbuf: ReadBuf, max_payload: u32) {
    let lp: ReadLoop = Box::pin(read_loop(conn.clone(), rbuf, max_payload));
    *conn.reader.lp.lock().unwrap_or_else(|p| p.into_inner()) = Some(lp);
    ::tokio::spawn(reader_task(conn.clone()));
}

/// Drives the connection's read loop until it ends.
async fn reader_task(conn: Arc<Conn>) {
    let orphaned = TaskGuard { conn: &conn, writer: false };
    std::future::poll_fn(|cx| {
        let mut task = conn.reader.task.lock().unwrap_or_else(|p| p.into_inner());
        if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *task = Some(cx.waker().clone());
        }
        drop(task);
        conn.reader.poll_task(&conn, cx)
    })
    .await;
    std::mem::forget(orphaned);
}

/// Reads frames and hands them to their callers until the connection ends; why it ended.
async fn read_loop(conn: Arc<Conn>, mut rbuf: ReadBuf, max_payload: u32) -> Loss {
    // Replies handed out since the last read.
    let mut replies = 0usize;
    loop {
        let needed = match rbuf.decode(max_payload) {
            Err(e) => return Loss::Protocol(e),
            Ok(Decoded::Incomplete { needed }) => needed,
            Ok(Decoded::Frame(f)) => {
                let len = f.len;
                match client_conn::classify(&f) {
                    Incoming::Reply(id) => {
                        // A large payload was read into a vector of its own: moved, not copied.
                        let small = (!rbuf.is_large()).then(|| f.payload.to_vec());
                        let payload = small.or_else(|| rbuf.take_payload()).unwrap_or_default();
                        conn.resolve(id, Outcome::Reply(payload), replies > 0);
                        replies += 1;
                    }
                    Incoming::Item(id) => {
                        let small = (!rbuf.is_large()).then(|| f.payload.to_vec());
                        conn.item(id, small.or_else(|| rbuf.take_payload()).unwrap_or_default());
                    }
                    Incoming::Error { id, status, flags, message } => {
                        conn.resolve(id, Outcome::Error { status, flags, message }, replies > 0);
                        replies += 1;
                    }
                    Incoming::Closing(loss) => return loss,
                    Incoming::Ping(id) => {
                        conn.outbox.push(&Header::new(Kind::Pong, id), b"", f.payload);
                    }
                    Incoming::Ignore => {}
                }
                rbuf.consume(len);
                continue;
            }
        };
        replies = 0;
        match read_more(&conn.stream, &mut rbuf, needed).await {
            Ok(Filled::Data) => {}
            Ok(Filled::Eof) => return Loss::Closed(None),
            Err(e) => return Loss::from_io(e),
        }
    }
}

/// Answers `TimedOut` to the callers whose deadline passed and tells the server to cancel their
/// requests, until the connection ends.
///
/// One timer per connection, set to the earliest deadline it knows of, instead of a tokio timer
/// per request: registering and removing a timer in tokio's wheel for every call (and the wheel
/// walk every park then does) was about a quarter of the client's instructions per request.
pub(super) async fn deadline_task(conn: Arc<Conn>) {
    loop {
        let next = {
            let st = conn.book();
            // Every end of a connection goes through `Conn::close`, which sets `dead` and wakes
            // this task. Until then requests may still be answered (a connection whose writing
            // failed keeps reading), so their deadlines still count.
            if st.extra.dead.is_some() {
                return;
            }
            st.extra.next_deadline
        };
        match next {
            None => conn.deadlines.notified().await,
            Some(at) => {
                ::tokio::select! {
                    () = sleep_until(at) => conn.expire(Instant::now()),
                    () = conn.deadlines.notified() => {}
                }
            }
        }
    }
}

/// Writes queued frames; when writing stops, settles the requests that cannot be answered.
pub(super) async fn writer_task(conn: Arc<Conn>) {
    let orphaned = TaskGuard { conn: &conn, writer: true };
    let end = conn.outbox.run_writer(&conn.stream, None).await;
    std::mem::forget(orphaned);
    let (lost, dead, close) = {
        let mut st = conn.book();
        st.extra.written_final = Some(end.written);
        st.close();
        conn.usable.store(false, Ordering::Release);
        match (st.extra.dead.clone(), &end.error) {
            // The connection was ended: nothing more will be answered.
            (Some(dead), _) => (std::mem::take(&mut st.extra.pending), dead, None),
            // Only writing failed (for example the server shut our direction down as it drains):
            // requests written in full may still be answered, so the reader keeps going for
            // them; the others are settled now, and the connection takes no new ones.
            (None, Some(e)) => {
                let dead = Loss::from_io_ref(e);
                let unsent: Vec<u64> =
                    st.extra.pending.iter().filter(|(_, p)| p.end > end.written).map(|(id, _)| *id).collect();
                let lost =
                    unsent.into_iter().filter_map(|id| Some((id, st.extra.pending.remove(&id)?))).collect();
                st.extra.retired = true;
                let close = st.extra.pending.is_empty().then(|| dead.clone());
                (lost, dead, close)
            }
            (None, None) => (IdMap::default(), Loss::Closed(None), Some(Loss::Closed(None))),
        }
    };
    settle_lost(&conn, lost, &dead, conn.seen(&dead, end.written));
    if let Some(why) = close {
        conn.close(why);
    }
}

/// Ends the connection when its reader or writer task is dropped before it finished — the
/// runtime it was spawned on shut down — so that the client's next request opens a connection
/// on the runtime it runs on instead of queueing into a connection nobody serves.
pub(super) struct TaskGuard<'a> {
    pub(super) conn: &'a Conn,
    pub(super) writer: bool,
}

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        if self.writer {
            // How much went out is unknown: every pending request may have run.
            self.conn.book().extra.written_final.get_or_insert(u64::MAX);
        }
        if !self.writer {
            self.conn.reader.drop_loop();
        }
        let gone = io::Error::other("the runtime that ran this connection shut down");
        self.conn.close(Loss::Io(Arc::new(gone)));
    }
}

/// Tells each request that the connection ended first, and how much of it was written.
pub(super) fn settle_lost(conn: &Conn, pending: IdMap<Pending>, dead: &Loss, written: u64) {
    for (id, p) in pending {
        let written = Written::of(p.start, p.end, written);
        p.tx.settle(conn, id, Outcome::Lost { loss: dead.clone(), written });
    }
}

/// `connect()`, waiting while the server's listen backlog is full (a non-blocking `connect` on a
/// Unix socket fails with `EAGAIN` then, instead of waiting as a blocking one does). The caller
/// bounds the wait.
pub(super) async fn connect(path: &Path) -> io::Result<UnixStream> {
    let mut backoff = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path).await {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Reads one whole frame (the handshake answer) and gives it to `look`.
///
/// `fds`: keep the descriptors that come with the bytes (the shared-memory offer's).
pub(super) async fn read_frame<T>(
    stream: &Stream,
    rbuf: &mut ReadBuf,
    max_payload: u32,
    mut fds: Option<&mut Vec<OwnedFd>>,
    look: impl FnOnce(&Frame<'_>) -> T,
) -> Result<T, Loss> {
    loop {
        let needed = match rbuf.decode(max_payload).map_err(Loss::Protocol)? {
            Decoded::Frame(f) => {
                let (out, len) = (look(&f), f.len);
                rbuf.consume(len);
                return Ok(out);
            }
            Decoded::Incomplete { needed } => needed,
        };
        let read = match fds.as_deref_mut() {
            Some(fds) => read_more_with_fds(stream, rbuf, needed, fds).await,
            None => read_more(stream, rbuf, needed).await,
        };
        match read {
            Ok(Filled::Data) => {}
            Ok(Filled::Eof) => return Err(Loss::Closed(None)),
            Err(e) => return Err(Loss::from_io(e)),
        }
    }
}
