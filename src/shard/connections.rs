//! The shard's WebSocket connections: a slab referred to by `ConnKey`, each connection with
//! its write queue, its writer task's waker, its close handshake and its liveness.
//!
//! Owns the write-queue limit (over it a connection is a slow consumer, closed with 4100) and
//! the per-connection message rate. Never touches the router, the mesh or home state: the
//! shard unsubscribes a connection that teardown hands back. Sockets are reached only by raw
//! fd, for `shutdown(2)` when a connection must be cut from outside its tasks.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};
use std::os::fd::RawFd;
use std::task::{Poll, Waker};

use bytes::Bytes;
use slab::Slab;

use super::home::JoinTicket;
use crate::apps::AppIndex;
use crate::pusher::message::SocketId;
use crate::rate::RateWindow;
use crate::ws::frame;

/// Frames one writev takes from a connection's queue at most.
pub const WRITE_BATCH_FRAMES_MAX: usize = 64;

/// A connection's key in its shard's slab. Meaningful only on that shard and only while the
/// connection lives (a slab key is reused; cross-shard references carry the socket_id too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(usize);

impl ConnKey {
    /// A key from a raw slab index, for tests that build tables by hand.
    #[cfg(test)]
    pub(crate) fn from_index(index: usize) -> ConnKey {
        ConnKey(index)
    }
}

/// Where a WebSocket connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Serving.
    Open,
    /// A close frame is queued; nothing else will be.
    Closing {
        /// When the close started (for the close timeout).
        since_s: u64,
    },
    /// The reader has finished; the writer must stop.
    Dead,
}

/// One WebSocket connection's shard-side state.
#[derive(Debug)]
pub struct Connection {
    /// The app it connected to (meaningless for an echo connection).
    pub app: AppIndex,
    /// A plain echo connection (`/echo`), not a Pusher one.
    pub echo: bool,
    /// Its Pusher socket_id.
    pub socket_id: SocketId,
    /// Raw fd, only for `shutdown(2)` when it must be torn down from outside.
    fd: RawFd,
    /// Life-cycle state.
    pub state: ConnState,
    /// Frames waiting for the writer.
    queue: VecDeque<Bytes>,
    /// Invariant: the bytes in `queue` plus those of the batch the writer holds (taken by
    /// `take_batch`, given back by `written`); at most `write_queue_bytes_max` plus one
    /// close frame.
    queued_bytes: usize,
    /// The writer task, parked until the queue has frames.
    writer: Option<Waker>,
    /// Set when the writer task has ended.
    writer_done: bool,
    /// Channels it is subscribed to (presence joins count from the request on).
    pub channels: Vec<Box<str>>,
    /// Invariant: each channel here is also in `channels` and not yet in the router; it waits
    /// for its home shard's reply to the join with that ticket.
    pub joins: Vec<(Box<str>, JoinTicket)>,
    /// (presence channel, user id) of each presence subscription, for the leave. Invariant:
    /// each channel here is also in `channels`.
    pub presence: Vec<(Box<str>, Box<str>)>,
    /// Shard clock second of the last frame received.
    pub last_seen_s: u64,
    /// Whether a `pusher:ping` was sent since `last_seen_s`.
    pub pinged: bool,
    /// The user it signed in as (`pusher:signin`).
    pub user_id: Option<Box<str>>,
    /// User ids whose online state it watches (from its signed `user_data`).
    pub watchlist: Vec<Box<str>>,
    /// Signed in, or joined a private or presence channel ("authorized connections").
    pub authorized: bool,
    /// Shard clock second it connected at.
    pub opened_s: u64,
    /// Client events in the current second (`client_events_per_second_max`).
    pub client_events: RateWindow,
    /// Messages received in the current second (`messages_per_second_max`).
    pub messages: RateWindow,
}

/// What `Connection::enqueue` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued (or dropped because the connection is no longer open).
    Done,
    /// Over the write-queue limit: the queue was dropped and the connection is closing (4100).
    SlowConsumer,
}

impl Connection {
    /// A new open connection at shard clock second `now_s`.
    pub fn new(app: AppIndex, echo: bool, socket_id: SocketId, fd: RawFd, now_s: u64) -> Connection {
        Connection {
            app,
            echo,
            socket_id,
            fd,
            state: ConnState::Open,
            queue: VecDeque::new(),
            queued_bytes: 0,
            writer: None,
            writer_done: false,
            channels: Vec::new(),
            joins: Vec::new(),
            presence: Vec::new(),
            user_id: None,
            watchlist: Vec::new(),
            authorized: false,
            opened_s: now_s,
            client_events: RateWindow::starting(now_s),
            last_seen_s: now_s,
            pinged: false,
            messages: RateWindow::starting(now_s),
        }
    }

    /// Bytes queued and not yet written (the dashboard's per-shard write-queue load).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues a shared frame on an open connection, enforcing `write_queue_bytes_max`.
    #[inline]
    pub fn enqueue(&mut self, frame: &Bytes, now_s: u64, write_queue_bytes_max: usize) -> Enqueued {
        if self.state != ConnState::Open {
            return Enqueued::Done;
        }
        if self.queued_bytes + frame.len() > write_queue_bytes_max {
            let dropped: usize = self.queue.drain(..).map(|f| f.len()).sum();
            self.queued_bytes -= dropped;
            self.close(4100, "slow consumer: write queue limit exceeded", now_s);
            return Enqueued::SlowConsumer;
        }
        self.queued_bytes += frame.len();
        self.queue.push_back(frame.clone());
        self.wake_writer();
        Enqueued::Done
    }

    /// Queues the close frame and marks the connection closing (no-op unless open).
    pub fn close(&mut self, code: u16, reason: &str, now_s: u64) {
        if self.state != ConnState::Open {
            return;
        }
        let close = frame::encode_close(code, reason);
        self.queued_bytes += close.len();
        self.queue.push_back(close);
        self.state = ConnState::Closing { since_s: now_s };
        self.wake_writer();
    }

    fn wake_writer(&mut self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }

    /// Moves up to `WRITE_BATCH_FRAMES_MAX` frames into `batch`, or parks the writer.
    /// `Ready(None)`: the writer must stop. The bool is true when the batch ends with the
    /// final close frame.
    pub fn take_batch(&mut self, batch: &mut Vec<Bytes>, writer: &Waker) -> Poll<Option<bool>> {
        if self.state == ConnState::Dead {
            return Poll::Ready(None);
        }
        if self.queue.is_empty() {
            self.writer = Some(writer.clone());
            return Poll::Pending;
        }
        let n = self.queue.len().min(WRITE_BATCH_FRAMES_MAX);
        batch.extend(self.queue.drain(..n));
        let last = self.queue.is_empty() && matches!(self.state, ConnState::Closing { .. });
        Poll::Ready(Some(last))
    }

    /// A batch of `bytes` taken by `take_batch` was written.
    pub fn written(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.queued_bytes, "wrote more than was queued");
        self.queued_bytes -= bytes;
    }

    /// The writer task ended (after an error or the final close frame).
    pub fn writer_finished(&mut self) {
        self.writer_done = true;
        if self.state == ConnState::Open {
            // The socket failed under the writer: nothing more can be sent.
            self.state = ConnState::Dead;
        }
    }

    /// First half of teardown, when the reader ends. A closing connection keeps its writer
    /// until the close frame is out (the ticker cuts it after the close timeout if the peer
    /// does not read); any other is marked dead and its socket cut, so a writer stuck on a
    /// peer that stopped reading returns at once.
    pub fn begin_teardown(&mut self) {
        if matches!(self.state, ConnState::Closing { .. }) && !self.writer_done {
            return;
        }
        self.state = ConnState::Dead;
        self.wake_writer();
        if !self.writer_done {
            self.shutdown_socket();
        }
    }

    /// Records a frame from the client at `now_s`; false when it is over `max` messages this
    /// second (`max` 0: unlimited).
    pub fn record_activity(&mut self, now_s: u64, messages: u32, max: u32) -> bool {
        self.last_seen_s = now_s;
        self.pinged = false;
        let count = self.messages.record(now_s, messages);
        max == 0 || count <= max
    }

    /// `shutdown(fd, SHUT_RDWR)`: wakes a reader or writer parked on a peer that went silent.
    pub fn shutdown_socket(&self) {
        // SAFETY: shutdown(2) takes a plain integer and touches no memory of ours. The fd
        // belongs to a connection still in the slab, whose read half (which owns the fd) is
        // dropped only after the slab entry is removed, so it cannot be a reused descriptor.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }
}

/// The liveness rules the ticker applies once a second.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Silence after which a client is pinged (`activity_timeout_s`).
    pub ping_after_s: u64,
    /// Silence after which it is closed with 4201 (activity plus `pong_timeout_s`).
    pub dead_after_s: u64,
    /// How long a close handshake may take before the socket is cut.
    pub close_timeout_s: u64,
}

/// What one liveness pass found for the shard to act on.
#[derive(Debug, Default)]
pub struct LivenessPass {
    /// Connections to send a `pusher:ping`.
    pub to_ping: Vec<ConnKey>,
    /// Connections past their app's `authorized_connections_timeout_s` without authorizing.
    pub unauthorized: Vec<ConnKey>,
    /// Connections closed with 4201 in this pass.
    pub dead: u64,
}

/// The WebSocket connections of one shard.
#[derive(Debug, Default)]
pub struct Connections {
    slab: Slab<Connection>,
}

impl Connections {
    /// Adds a connection and returns its key.
    pub fn insert(&mut self, conn: Connection) -> ConnKey {
        ConnKey(self.slab.insert(conn))
    }

    /// Removes a connection (which must exist) and hands it back.
    pub fn remove(&mut self, key: ConnKey) -> Connection {
        self.slab.remove(key.0)
    }

    /// The connection with `key`, if it still lives.
    pub fn get(&self, key: ConnKey) -> Option<&Connection> {
        self.slab.get(key.0)
    }

    /// The connection with `key`, if it still lives.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut Connection> {
        self.slab.get_mut(key.0)
    }

    /// Every connection with its key.
    pub fn iter(&self) -> impl Iterator<Item = (ConnKey, &Connection)> {
        self.slab.iter().map(|(key, conn)| (ConnKey(key), conn))
    }

    /// Every connection's key.
    pub fn keys(&self) -> Vec<ConnKey> {
        self.slab.iter().map(|(key, _)| ConnKey(key)).collect()
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// One liveness pass at `now_s`: closes silent connections with 4201 and cuts those whose
    /// close handshake timed out; returns who to ping and who is unauthorized too long
    /// (`authorized_timeout_s(app)`, 0 for none) for the shard to answer.
    pub fn liveness_pass(
        &mut self,
        now_s: u64,
        rules: Liveness,
        authorized_timeout_s: impl Fn(AppIndex) -> u64,
    ) -> LivenessPass {
        let mut pass = LivenessPass::default();
        for (key, conn) in self.slab.iter_mut() {
            match conn.state {
                ConnState::Open => {
                    let timeout = authorized_timeout_s(conn.app);
                    let age = now_s.saturating_sub(conn.opened_s);
                    if timeout > 0 && !conn.echo && !conn.authorized && age >= timeout {
                        pass.unauthorized.push(ConnKey(key));
                    }
                    let silent = now_s.saturating_sub(conn.last_seen_s);
                    if silent >= rules.dead_after_s {
                        pass.dead += 1;
                        conn.close(4201, "pong reply not received", now_s);
                    } else if silent >= rules.ping_after_s && !conn.pinged {
                        conn.pinged = true;
                        pass.to_ping.push(ConnKey(key));
                    }
                }
                ConnState::Closing { since_s } if now_s.saturating_sub(since_s) >= rules.close_timeout_s => {
                    conn.shutdown_socket();
                }
                _ => {}
            }
        }
        pass
    }
}

impl Index<ConnKey> for Connections {
    type Output = Connection;

    fn index(&self, key: ConnKey) -> &Connection {
        &self.slab[key.0]
    }
}

impl IndexMut<ConnKey> for Connections {
    fn index_mut(&mut self, key: ConnKey) -> &mut Connection {
        &mut self.slab[key.0]
    }
}
