//! A shard: one thread, pinned to one CPU, with its own monoio runtime and listener.
//!
//! Owns its connections (a slab, referred to by key), its channel table, its outboxes toward
//! other shards and its pending cross-shard queries, all in one `ShardState` behind one
//! `RefCell` that is never borrowed across an `.await`. Other shards are reached only through
//! the mesh (`shard::mesh`).
//!
//! Tasks on a shard: the acceptor (`net::listener`), one reader and one writer per
//! WebSocket, one task per HTTP connection, the mesh pump, the outbox flusher and a one-second
//! ticker for liveness and close timeouts.

pub mod mesh;
pub mod presence;
pub mod router;
pub mod session;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use crate::apps::{AppIndex, Apps};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::pusher::channel::ChannelKind;
use crate::pusher::message::{self, SocketId};
use crate::ws::frame;
use mesh::{HomeJoin, Mesh, MeshMessage, Publication, Query, QueryReply, Watcher};
use presence::{Joined, PresenceTable};
use router::{ConnKey, Router};

/// Frames one writev takes from a connection's queue at most.
pub const WRITE_BATCH_FRAMES_MAX: usize = 64;
/// Mesh messages one pump wake-up handles before yielding to connection tasks.
const PUMP_BATCH_MAX: usize = 256;
/// How long a closing connection may take to finish the close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an HTTP API query waits for the other shards.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Bytes in `queue` plus the batch being written.
    queued_bytes: usize,
    /// The writer task, parked until the queue has frames.
    writer: Option<Waker>,
    /// Set when the writer task has ended.
    writer_done: bool,
    /// Channels it is subscribed to (presence joins count from the request on).
    pub channels: Vec<Box<str>>,
    /// (presence channel, user id) of each presence subscription, for the leave.
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
    /// Client-event rate window (a shard clock second) and client events in it.
    pub client_event_window_s: u64,
    /// Client events in `client_event_window_s`.
    pub client_event_count: u32,
    /// Rate-limit window (a shard clock second) and messages in it.
    pub rate_window_s: u64,
    /// Messages received in `rate_window_s`.
    pub rate_count: u32,
}

/// A cache channel's last event.
struct CachedEvent {
    /// Its frame, replayed as is.
    frame: Bytes,
    /// Its data string, for `info=cache`.
    data: Box<str>,
    /// When it stops being replayed.
    expires: Instant,
}

/// A cross-shard query waiting for replies.
struct PendingQuery {
    remaining: usize,
    replies: QueryReply,
    waker: Option<Waker>,
}

/// Everything a shard owns that changes.
pub struct ShardState {
    /// WebSocket connections.
    pub connections: Slab<Connection>,
    /// Channel → local subscribers.
    pub router: Router,
    /// Members of the presence channels this shard is home for.
    pub presence: PresenceTable,
    /// Last events of the cache channels this shard is home for.
    cache: HashMap<(AppIndex, Box<str>), CachedEvent>,
    /// Subscriber counts of the channels this shard is home for (apps with
    /// `subscription_count_enabled` only), and those changed since the last announcement.
    subscription_counts: HashMap<(AppIndex, Box<str>), i64>,
    subscription_counts_changed: Vec<(AppIndex, Box<str>)>,
    /// Signed-in connections per user, for the users this shard is home for.
    users_online: HashMap<(AppIndex, Box<str>), u32>,
    /// Watchers of the users this shard is home for.
    watchers: HashMap<(AppIndex, Box<str>), Vec<Watcher>>,
    /// Sockets open on this shard (WebSocket and HTTP), for `connections_per_shard_max`.
    pub open_sockets: usize,
    next_sequence: u64,
    /// Per target shard: messages waiting for ring space, in order.
    outbox: Vec<VecDeque<MeshMessage>>,
    outbox_len: usize,
    flusher: Option<Waker>,
    outbox_waiters: Vec<Waker>,
    queries: HashMap<u64, PendingQuery>,
    next_query_id: u64,
    /// Seconds since the shard started, advanced by the ticker (a coarse clock for timeouts).
    pub now_s: u64,
    /// Set once shutdown begins.
    pub shutting_down: bool,
    shutdown_waiters: Vec<Waker>,
}

/// A shard and everything its tasks share.
pub struct Shard {
    /// This shard's number.
    pub index: usize,
    /// The validated config.
    pub config: Arc<Config>,
    /// The apps.
    pub apps: Arc<Apps>,
    /// The rings to and from every shard.
    pub mesh: Arc<Mesh>,
    /// Every shard's metrics; this shard writes only `metrics[index]`.
    pub all_metrics: Arc<[ShardMetrics]>,
    /// Mutable state; borrowed briefly, never across an await.
    pub state: RefCell<ShardState>,
    started: Instant,
}

impl Shard {
    /// A shard with empty state.
    pub fn new(
        index: usize,
        config: Arc<Config>,
        apps: Arc<Apps>,
        mesh: Arc<Mesh>,
        all_metrics: Arc<[ShardMetrics]>,
    ) -> Shard {
        let shards = mesh.shards();
        let state = ShardState {
            connections: Slab::new(),
            router: Router::new(apps.list.len()),
            presence: PresenceTable::default(),
            cache: HashMap::new(),
            subscription_counts: HashMap::new(),
            subscription_counts_changed: Vec::new(),
            users_online: HashMap::new(),
            watchers: HashMap::new(),
            open_sockets: 0,
            next_sequence: 0,
            outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            outbox_len: 0,
            flusher: None,
            outbox_waiters: Vec::new(),
            queries: HashMap::new(),
            next_query_id: 0,
            now_s: 0,
            shutting_down: false,
            shutdown_waiters: Vec::new(),
        };
        Shard { index, config, apps, mesh, all_metrics, state: RefCell::new(state), started: Instant::now() }
    }

    /// This shard's metrics.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.all_metrics[self.index]
    }

    /// Starts the shard's background tasks. Call once, inside its runtime.
    pub fn spawn_background(self: &Rc<Self>) {
        monoio::spawn(self.clone().pump());
        monoio::spawn(self.clone().flusher());
        monoio::spawn(self.clone().ticker());
    }

    // ---- connections -------------------------------------------------------------------

    /// Registers a new WebSocket connection and returns its key and socket_id.
    pub fn register(&self, app: AppIndex, echo: bool, fd: RawFd) -> (ConnKey, SocketId) {
        let mut state = self.state.borrow_mut();
        let sequence = state.next_sequence * self.mesh.shards() as u64 + self.index as u64 + 1;
        state.next_sequence += 1;
        let socket_id = SocketId { sequence, random: fastrand::u32(..1_000_000_000) };
        let now_s = state.now_s;
        let key = state.connections.insert(Connection {
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
            presence: Vec::new(),
            user_id: None,
            watchlist: Vec::new(),
            authorized: false,
            opened_s: now_s,
            client_event_window_s: now_s,
            client_event_count: 0,
            last_seen_s: now_s,
            pinged: false,
            rate_window_s: now_s,
            rate_count: 0,
        });
        ShardMetrics::add(&self.metrics().connections, 1);
        ShardMetrics::add(&self.metrics().connections_opened_total, 1);
        (key, socket_id)
    }

    /// Queues a frame for one connection. Over the write-queue limit the connection is a slow
    /// consumer: its queue is dropped and it is closed with 4100.
    pub fn send(&self, key: ConnKey, frame: Bytes) {
        let mut state = self.state.borrow_mut();
        self.send_locked(&mut state, key, frame);
    }

    fn send_locked(&self, state: &mut ShardState, key: ConnKey, frame: Bytes) {
        let now_s = state.now_s;
        if let Some(conn) = state.connections.get_mut(key) {
            self.enqueue(conn, &frame, now_s);
        }
    }

    /// Queues a shared frame on an open connection, enforcing the write-queue limit.
    #[inline]
    fn enqueue(&self, conn: &mut Connection, frame: &Bytes, now_s: u64) {
        if conn.state != ConnState::Open {
            return;
        }
        if conn.queued_bytes + frame.len() > self.config.websocket.write_queue_bytes_max {
            ShardMetrics::add(&self.metrics().slow_consumer_closes_total, 1);
            let dropped: usize = conn.queue.drain(..).map(|f| f.len()).sum();
            conn.queued_bytes -= dropped;
            close_conn(conn, 4100, "slow consumer: write queue limit exceeded", now_s);
            return;
        }
        conn.queued_bytes += frame.len();
        conn.queue.push_back(frame.clone());
        if let Some(waker) = conn.writer.take() {
            waker.wake();
        }
    }

    /// Starts the closing handshake with `code` (after frames already queued).
    pub fn close(&self, key: ConnKey, code: u16, reason: &str) {
        let mut state = self.state.borrow_mut();
        let now_s = state.now_s;
        if let Some(conn) = state.connections.get_mut(key) {
            close_conn(conn, code, reason, now_s);
        }
    }

    /// Takes up to `WRITE_BATCH_FRAMES_MAX` frames for the writer, or parks it.
    /// `Ready(None)`: the writer must stop. The bool is true when the batch ends with the
    /// final close frame.
    pub async fn next_batch(&self, key: ConnKey, batch: &mut Vec<Bytes>) -> Option<bool> {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            let conn = &mut state.connections[key];
            if conn.state == ConnState::Dead {
                return Poll::Ready(None);
            }
            if conn.queue.is_empty() {
                conn.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = conn.queue.len().min(WRITE_BATCH_FRAMES_MAX);
            batch.extend(conn.queue.drain(..n));
            let last = conn.queue.is_empty() && matches!(conn.state, ConnState::Closing { .. });
            Poll::Ready(Some(last))
        })
        .await
    }

    /// Accounts a written batch.
    pub fn batch_written(&self, key: ConnKey, frames: usize, bytes: usize) {
        let mut state = self.state.borrow_mut();
        if let Some(conn) = state.connections.get_mut(key) {
            conn.queued_bytes -= bytes;
        }
        ShardMetrics::add(&self.metrics().messages_out_total, frames as u64);
        ShardMetrics::add(&self.metrics().bytes_out_total, bytes as u64);
    }

    /// Marks the writer finished (after an error or the final close frame).
    pub fn writer_finished(&self, key: ConnKey) {
        let mut state = self.state.borrow_mut();
        let conn = &mut state.connections[key];
        conn.writer_done = true;
        if conn.state == ConnState::Open {
            // The socket failed under the writer: nothing more can be sent.
            conn.state = ConnState::Dead;
        }
    }

    /// First half of teardown, when the reader ends. A closing connection keeps its writer
    /// until the close frame is out (the ticker cuts it after the close timeout if the peer
    /// does not read); any other is marked dead and its socket cut, so a writer stuck on a
    /// peer that stopped reading returns at once.
    pub fn begin_teardown(&self, key: ConnKey) {
        let mut state = self.state.borrow_mut();
        let conn = &mut state.connections[key];
        if matches!(conn.state, ConnState::Closing { .. }) && !conn.writer_done {
            return;
        }
        conn.state = ConnState::Dead;
        if let Some(waker) = conn.writer.take() {
            waker.wake();
        }
        if !conn.writer_done {
            shutdown_socket(conn.fd);
        }
    }

    /// Second half of teardown, after the writer task ended: unsubscribe and forget.
    pub fn finish_teardown(&self, key: ConnKey) {
        let mut state = self.state.borrow_mut();
        let conn = state.connections.remove(key);
        let subscriptions = conn.channels.len() as u64;
        let left: Vec<&str> =
            conn.channels.iter().filter(|c| state.router.unsubscribe(conn.app, c, key)).map(|c| c.as_ref()).collect();
        drop(state);
        for channel in left {
            self.subscription_changed(conn.app, channel, -1);
        }
        for (channel, user_id) in conn.presence {
            self.presence_leave(conn.app, channel, user_id);
        }
        if let Some(user_id) = conn.user_id {
            let watcher = Watcher { shard: self.index, conn: key, socket_id: conn.socket_id };
            for watched in conn.watchlist {
                self.watch(conn.app, watched, watcher, false);
            }
            self.user_presence(conn.app, user_id, false);
        }
        ShardMetrics::sub(&self.metrics().subscriptions, subscriptions);
        ShardMetrics::sub(&self.metrics().connections, 1);
        if !conn.echo {
            self.apps.get(conn.app).release();
        }
    }

    // ---- fan-out -----------------------------------------------------------------------

    /// Queues one shared frame for every local subscriber of a channel.
    pub fn deliver_local(&self, app: AppIndex, channel: &str, frame: &Bytes, exclude: Option<SocketId>) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let Some(subscribers) = state.router.subscribers(app, channel) else {
            return;
        };
        for &key in subscribers {
            let conn = &mut state.connections[key];
            if Some(conn.socket_id) != exclude {
                self.enqueue(conn, frame, state.now_s);
            }
        }
    }

    /// Publishes a frame on a channel: local subscribers now, other shards through the mesh;
    /// returns once the frame is queued on every shard.
    ///
    /// Order: first this shard handles what other shards already put in its inbox. A publish
    /// acknowledged by another shard is in this inbox by then, so events published one after
    /// the other (each after the previous answer) arrive in that order, whichever shards
    /// received them.
    pub async fn publish(&self, app: AppIndex, channel: &str, frame: Bytes, exclude: Option<SocketId>) {
        while let Some(message) = self.mesh.try_recv(self.index) {
            self.handle_mesh(message);
        }
        self.broadcast(app, channel, frame, exclude);
        self.outbox_flushed().await;
    }

    /// `publish` without the wait, for senders that cannot wait (the mesh pump).
    pub fn broadcast(&self, app: AppIndex, channel: &str, frame: Bytes, exclude: Option<SocketId>) {
        self.deliver_local(app, channel, &frame, exclude);
        let shards = self.mesh.shards();
        if shards > 1 {
            let publication = Arc::new(Publication { app, channel: channel.into(), frame, exclude });
            for target in (0..shards).filter(|&t| t != self.index) {
                self.mesh_send(target, MeshMessage::Publish(publication.clone()));
            }
        }
    }

    // ---- users -------------------------------------------------------------------------

    /// Closes every connection of a signed-in user, on every shard, with 4009.
    pub fn terminate_user(&self, app: AppIndex, user_id: &str) {
        self.terminate_user_locally(app, user_id);
        for target in (0..self.mesh.shards()).filter(|&t| t != self.index) {
            self.mesh_send(target, MeshMessage::TerminateUser { app, user_id: user_id.into() });
        }
    }

    fn terminate_user_locally(&self, app: AppIndex, user_id: &str) {
        let keys: Vec<ConnKey> = {
            let state = self.state.borrow();
            state
                .connections
                .iter()
                .filter(|(_, c)| c.app == app && c.user_id.as_deref() == Some(user_id))
                .map(|(k, _)| k)
                .collect()
        };
        for key in keys {
            self.refuse(key, 4009, "Connection terminated by the server");
        }
    }

    /// A connection signed in (`online`) or a signed-in one ended: counted on the user's home
    /// shard, which tells the user's watchers when the first connection arrives or the last
    /// one leaves.
    pub fn user_presence(&self, app: AppIndex, user_id: Box<str>, online: bool) {
        let home = presence::home(app, &user_home_key(&user_id), self.mesh.shards());
        if home != self.index {
            let message = if online {
                MeshMessage::UserOnline { app, user_id }
            } else {
                MeshMessage::UserOffline { app, user_id }
            };
            return self.mesh_send(home, message);
        }
        let changed = {
            let mut state = self.state.borrow_mut();
            let key = (app, user_id.clone());
            if online {
                let count = state.users_online.entry(key).or_default();
                *count += 1;
                *count == 1
            } else {
                match state.users_online.get_mut(&key) {
                    Some(1) => state.users_online.remove(&key).is_some(),
                    Some(count) => {
                        *count -= 1;
                        false
                    }
                    None => false,
                }
            }
        };
        if changed {
            let watchers = self.state.borrow().watchers.get(&(app, user_id.clone())).cloned().unwrap_or_default();
            let frame = message::watchlist_event(if online { "online" } else { "offline" }, &[&user_id]);
            for watcher in watchers {
                self.send_to(watcher, frame.clone());
            }
        }
    }

    /// Starts or stops watching a user, on the user's home shard; a new watcher of a user who
    /// is online is told so at once.
    pub fn watch(&self, app: AppIndex, user_id: Box<str>, watcher: Watcher, watch: bool) {
        let home = presence::home(app, &user_home_key(&user_id), self.mesh.shards());
        if home != self.index {
            return self.mesh_send(home, MeshMessage::Watch { app, user_id, watcher, watch });
        }
        let online = {
            let mut state = self.state.borrow_mut();
            let key = (app, user_id.clone());
            if watch {
                state.watchers.entry(key.clone()).or_default().push(watcher);
            } else if let Some(list) = state.watchers.get_mut(&key) {
                list.retain(|w| *w != watcher);
                if list.is_empty() {
                    state.watchers.remove(&key);
                }
            }
            state.users_online.contains_key(&key)
        };
        if watch && online {
            self.send_to(watcher, message::watchlist_event("online", &[&user_id]));
        }
    }

    /// Sends a frame to one connection on any shard.
    fn send_to(&self, watcher: Watcher, frame: Bytes) {
        if watcher.shard != self.index {
            return self.mesh_send(watcher.shard, MeshMessage::SendTo { watcher, frame });
        }
        let matches =
            self.state.borrow().connections.get(watcher.conn).is_some_and(|c| c.socket_id == watcher.socket_id);
        if matches {
            self.send(watcher.conn, frame);
        }
    }

    /// `pusher:error` with a close code, then the close itself (reference §1.4).
    pub fn refuse(&self, key: ConnKey, code: u16, reason: &str) {
        self.send(key, message::error(Some(code), reason, None));
        self.close(key, code, reason);
    }

    // ---- presence ----------------------------------------------------------------------

    /// Sends a join to the channel's home shard (or handles it here).
    pub fn home_join(&self, join: HomeJoin) {
        let home = presence::home(join.app, &join.channel, self.mesh.shards());
        if home == self.index {
            self.home_join_at_home(join);
        } else {
            self.mesh_send(home, MeshMessage::HomeJoin(Box::new(join)));
        }
    }

    /// Home shard: counts a presence member (announcing a new one), looks up the cached event,
    /// and answers the joining shard with the frames for the connection.
    fn home_join_at_home(&self, join: HomeJoin) {
        let app = self.apps.get(join.app);
        let mut frames = Vec::with_capacity(2);
        let mut accepted = true;
        match &join.member {
            Some((user_id, user_info)) => {
                let members_max = app.config.presence_members_max;
                let (joined, snapshot) = {
                    let mut state = self.state.borrow_mut();
                    let joined = state.presence.join(join.app, &join.channel, user_id, user_info, members_max);
                    (joined, state.presence.snapshot(join.app, &join.channel))
                };
                if joined == Joined::Full {
                    let reason = format!("presence channel is full: at most {members_max} members");
                    frames.push(message::error(None, &reason, Some(&join.channel)));
                    accepted = false;
                } else {
                    if joined == Joined::NewMember {
                        let added = message::member_added(&join.channel, user_id, user_info);
                        self.broadcast(join.app, &join.channel, added, Some(join.socket_id));
                    }
                    frames.push(message::presence_subscription_succeeded(&join.channel, &snapshot));
                }
            }
            None => frames.push(message::subscription_succeeded(&join.channel)),
        }
        if accepted && join.cache {
            // Reference §1.7: the last event comes first after subscription_succeeded.
            match self.cached(join.app, &join.channel) {
                Some((frame, _, _)) => frames.push(frame),
                None => frames.push(message::cache_miss(&join.channel)),
            }
        }
        if join.from == self.index {
            self.joined(join.conn, join.socket_id, &join.channel, frames, accepted);
        } else {
            let answer = MeshMessage::Joined {
                conn: join.conn,
                socket_id: join.socket_id,
                channel: join.channel,
                frames,
                accepted,
            };
            self.mesh_send(join.from, answer);
        }
    }

    /// Joining shard: the home shard's answer arrived. The connection is subscribed only now,
    /// so it receives exactly the events that follow its member list and cached event.
    fn joined(&self, key: ConnKey, socket_id: SocketId, channel: &str, frames: Vec<Bytes>, accepted: bool) {
        let routed_app = {
            let mut state = self.state.borrow_mut();
            let state = &mut *state;
            let Some(conn) = state.connections.get_mut(key) else { return };
            // Gone, replaced, or unsubscribed meanwhile: its leave (if any) is already on its way.
            if conn.socket_id != socket_id || !conn.channels.iter().any(|c| c.as_ref() == channel) {
                return;
            }
            let app = conn.app;
            if !accepted {
                conn.channels.retain(|c| c.as_ref() != channel);
                conn.presence.retain(|(c, _)| c.as_ref() != channel);
                ShardMetrics::sub(&self.metrics().subscriptions, 1);
            }
            for frame in &frames {
                self.enqueue(conn, frame, state.now_s);
            }
            accepted.then(|| state.router.subscribe(app, channel, key)).map(|_| app)
        };
        // After the borrow: the count may be kept on this very shard.
        if let Some(app) = routed_app {
            self.subscription_changed(app, channel, 1);
        }
    }

    // ---- subscription_count ------------------------------------------------------------

    /// Tells the channel's home shard that its subscriber count changed here, for apps that
    /// send `subscription_count` (never for presence channels, reference §1.3).
    pub fn subscription_changed(&self, app: AppIndex, channel: &str, delta: i32) {
        if !self.apps.get(app).config.subscription_count_enabled || ChannelKind::of(channel) == ChannelKind::Presence {
            return;
        }
        let home = presence::home(app, channel, self.mesh.shards());
        if home != self.index {
            return self.mesh_send(home, MeshMessage::SubscriptionDelta { app, channel: channel.into(), delta });
        }
        let mut state = self.state.borrow_mut();
        let key = (app, Box::<str>::from(channel));
        *state.subscription_counts.entry(key.clone()).or_default() += i64::from(delta);
        if !state.subscription_counts_changed.contains(&key) {
            state.subscription_counts_changed.push(key);
        }
    }

    /// Announces the counts that changed since the last tick (the throttle: once a second).
    fn announce_subscription_counts(&self) {
        let changed: Vec<(AppIndex, Box<str>, i64)> = {
            let mut state = self.state.borrow_mut();
            let state = &mut *state;
            let mut changed = Vec::new();
            for key in state.subscription_counts_changed.drain(..) {
                let count = state.subscription_counts.get(&key).copied().unwrap_or(0);
                if count <= 0 {
                    state.subscription_counts.remove(&key);
                }
                changed.push((key.0, key.1, count.max(0)));
            }
            changed
        };
        for (app, channel, count) in changed {
            if count > 0 {
                self.broadcast(app, &channel, message::subscription_count(&channel, count as u64), None);
            }
        }
    }

    // ---- cache channels ----------------------------------------------------------------

    /// Keeps `frame` as the last event of a cache channel, on its home shard.
    pub fn cache_store(&self, app: AppIndex, channel: &str, frame: Bytes, data: &str) {
        let home = presence::home(app, channel, self.mesh.shards());
        if home == self.index {
            let expires = Instant::now() + Duration::from_secs(self.apps.get(app).config.cache_ttl_s);
            let entry = CachedEvent { frame, data: data.into(), expires };
            self.state.borrow_mut().cache.insert((app, channel.into()), entry);
        } else {
            self.mesh_send(home, MeshMessage::CacheStore { app, channel: channel.into(), frame, data: data.into() });
        }
    }

    /// The live cached event of a channel this shard is home for: (frame, data, seconds left).
    fn cached(&self, app: AppIndex, channel: &str) -> Option<(Bytes, Box<str>, u64)> {
        let mut state = self.state.borrow_mut();
        let key = (app, Box::<str>::from(channel));
        let entry = state.cache.get(&key)?;
        let now = Instant::now();
        if entry.expires <= now {
            state.cache.remove(&key);
            return None;
        }
        Some((entry.frame.clone(), entry.data.clone(), (entry.expires - now).as_secs()))
    }

    /// Sends a presence leave to the channel's home shard (or handles it here).
    pub fn presence_leave(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>) {
        let home = presence::home(app, &channel, self.mesh.shards());
        if home != self.index {
            return self.mesh_send(home, MeshMessage::PresenceLeave { app, channel, user_id });
        }
        let removed = self.state.borrow_mut().presence.leave(app, &channel, &user_id);
        if removed {
            self.broadcast(app, &channel, message::member_removed(&channel, &user_id), None);
        }
    }

    // ---- mesh --------------------------------------------------------------------------

    /// Sends to another shard without blocking: straight into its ring when nothing is waiting
    /// ahead of it, else into the outbox (order per target is kept).
    pub fn mesh_send(&self, target: usize, message: MeshMessage) {
        debug_assert_ne!(target, self.index, "a shard never sends to itself");
        ShardMetrics::add(&self.metrics().mesh_sent_total, 1);
        let mut state = self.state.borrow_mut();
        let message = if state.outbox[target].is_empty() {
            match self.mesh.try_send(target, message) {
                Ok(()) => return,
                Err(back) => back,
            }
        } else {
            message
        };
        ShardMetrics::add(&self.metrics().mesh_full_total, 1);
        ShardMetrics::add(&self.metrics().mesh_outbox_depth, 1);
        state.outbox[target].push_back(message);
        state.outbox_len += 1;
        if let Some(waker) = state.flusher.take() {
            waker.wake();
        }
    }

    /// Waits until the outboxes are empty, i.e. everything this shard has sent is in the
    /// target rings. A publish answers only then, so an event the API acknowledged is already
    /// queued for every shard (and a later publish elsewhere cannot overtake it; see `publish`).
    async fn outbox_flushed(&self) {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.outbox_len == 0 {
                Poll::Ready(())
            } else {
                state.outbox_waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Moves outbox messages into rings as space appears, retrying on a 1 ms timer (never a
    /// self-wake, which starves every other task in monoio 0.2.4).
    async fn flusher(self: Rc<Self>) {
        loop {
            poll_fn(|cx| {
                let mut state = self.state.borrow_mut();
                if state.outbox_len > 0 {
                    Poll::Ready(())
                } else {
                    state.flusher = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            while self.flush_outbox() > 0 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// One pass over the outboxes; returns how many messages still wait.
    fn flush_outbox(&self) -> usize {
        let mut state = self.state.borrow_mut();
        let mut moved = 0;
        for target in 0..state.outbox.len() {
            while let Some(message) = state.outbox[target].pop_front() {
                match self.mesh.try_send(target, message) {
                    Ok(()) => moved += 1,
                    Err(back) => {
                        state.outbox[target].push_front(back);
                        break;
                    }
                }
            }
        }
        state.outbox_len -= moved;
        ShardMetrics::sub(&self.metrics().mesh_outbox_depth, moved as u64);
        if state.outbox_len == 0 {
            for waker in state.outbox_waiters.drain(..) {
                waker.wake();
            }
        }
        state.outbox_len
    }

    /// Drains this shard's inbox in batches.
    async fn pump(self: Rc<Self>) {
        let mut shutdown_seen = false;
        loop {
            self.mesh.ready(self.index, shutdown_seen).await;
            if !shutdown_seen && self.mesh.is_shutting_down() {
                shutdown_seen = true;
                self.begin_shutdown();
            }
            let mut handled = 0;
            while handled < PUMP_BATCH_MAX {
                let Some(message) = self.mesh.try_recv(self.index) else {
                    break;
                };
                self.handle_mesh(message);
                handled += 1;
            }
            if handled == PUMP_BATCH_MAX {
                yield_back().await;
            }
        }
    }

    fn handle_mesh(&self, message: MeshMessage) {
        match message {
            MeshMessage::Publish(p) => self.deliver_local(p.app, &p.channel, &p.frame, p.exclude),
            MeshMessage::HomeJoin(join) => self.home_join_at_home(*join),
            MeshMessage::Joined { conn, socket_id, channel, frames, accepted } => {
                self.joined(conn, socket_id, &channel, frames, accepted)
            }
            MeshMessage::CacheStore { app, channel, frame, data } => self.cache_store(app, &channel, frame, &data),
            MeshMessage::SubscriptionDelta { app, channel, delta } => self.subscription_changed(app, &channel, delta),
            MeshMessage::UserOnline { app, user_id } => self.user_presence(app, user_id, true),
            MeshMessage::UserOffline { app, user_id } => self.user_presence(app, user_id, false),
            MeshMessage::Watch { app, user_id, watcher, watch } => self.watch(app, user_id, watcher, watch),
            MeshMessage::SendTo { watcher, frame } => self.send_to(watcher, frame),
            MeshMessage::PresenceLeave { app, channel, user_id } => self.presence_leave(app, channel, user_id),
            MeshMessage::TerminateUser { app, user_id } => self.terminate_user_locally(app, &user_id),
            MeshMessage::Query { from, id, query } => {
                let reply = self.answer_locally(&query);
                self.mesh_send(from, MeshMessage::Reply { id, reply });
            }
            MeshMessage::Reply { id, reply } => {
                let mut state = self.state.borrow_mut();
                if let Some(pending) = state.queries.get_mut(&id) {
                    pending.replies.extend(reply);
                    pending.remaining -= 1;
                    if pending.remaining == 0 {
                        if let Some(waker) = pending.waker.take() {
                            waker.wake();
                        }
                    }
                }
            }
        }
    }

    /// This shard's part of a query.
    fn answer_locally(&self, query: &Query) -> QueryReply {
        if let Query::Cache { app, name } = query {
            return self.cached(*app, name).map(|(_, data, ttl)| vec![(data, ttl as u32)]).unwrap_or_default();
        }
        let state = self.state.borrow();
        match query {
            Query::Cache { .. } => unreachable!("answered above"),
            Query::Channels { app, prefix } => state
                .router
                .occupied(*app)
                .filter(|(name, _)| name.starts_with(prefix.as_str()))
                .map(|(name, count)| (name.into(), count as u32))
                .collect(),
            Query::PresenceUsers { app, name } => {
                state.presence.users(*app, name).into_iter().map(|id| (id, 1)).collect()
            }
            Query::PresenceCounts { app, prefix } => state.presence.counts(*app, prefix),
            Query::Channel { app, name } => state
                .router
                .subscribers(*app, name)
                .map(|set| vec![(name.as_str().into(), set.len() as u32)])
                .unwrap_or_default(),
        }
    }

    /// Asks every shard (this one included) and returns all answers, or `None` when another
    /// shard did not answer within `QUERY_TIMEOUT` (it is shutting down).
    pub async fn query_all(&self, query: Query) -> Option<QueryReply> {
        let local = self.answer_locally(&query);
        let shards = self.mesh.shards();
        if shards == 1 {
            return Some(local);
        }
        let id = {
            let mut state = self.state.borrow_mut();
            let id = state.next_query_id;
            state.next_query_id += 1;
            state.queries.insert(id, PendingQuery { remaining: shards - 1, replies: local, waker: None });
            id
        };
        let query = Arc::new(query);
        for target in (0..shards).filter(|&t| t != self.index) {
            self.mesh_send(target, MeshMessage::Query { from: self.index, id, query: query.clone() });
        }
        let wait = poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            let pending = state.queries.get_mut(&id).expect("pending query exists until taken");
            if pending.remaining == 0 {
                Poll::Ready(())
            } else {
                pending.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        });
        let answered = monoio::time::timeout(QUERY_TIMEOUT, wait).await.is_ok();
        let pending = self.state.borrow_mut().queries.remove(&id).expect("pending query exists until taken");
        answered.then_some(pending.replies)
    }

    // ---- time, liveness, shutdown ------------------------------------------------------

    /// Seconds since the shard started (coarse: advanced by the ticker).
    pub fn now_s(&self) -> u64 {
        self.state.borrow().now_s
    }

    /// Every second: advance the clock, ping silent clients, close dead ones with 4201, and
    /// cut connections whose close handshake timed out.
    async fn ticker(self: Rc<Self>) {
        let activity = u64::from(self.config.websocket.activity_timeout_s);
        let apps = self.apps.clone();
        let dead_after = activity + u64::from(self.config.websocket.pong_timeout_s);
        let ping = message::ping();
        loop {
            monoio::time::sleep(Duration::from_secs(1)).await;
            let now_s = self.started.elapsed().as_secs();
            let mut state = self.state.borrow_mut();
            state.now_s = now_s;
            let mut to_ping = Vec::new();
            let mut unauthorized = Vec::new();
            for (key, conn) in state.connections.iter_mut() {
                match conn.state {
                    ConnState::Open => {
                        let timeout = u64::from(apps.get(conn.app).config.authorized_connections_timeout_s);
                        let age = now_s.saturating_sub(conn.opened_s);
                        if timeout > 0 && !conn.echo && !conn.authorized && age >= timeout {
                            unauthorized.push(key);
                        }
                        let silent = now_s.saturating_sub(conn.last_seen_s);
                        if silent >= dead_after {
                            ShardMetrics::add(&self.metrics().liveness_closes_total, 1);
                            close_conn(conn, 4201, "pong reply not received", now_s);
                        } else if silent >= activity && !conn.pinged {
                            conn.pinged = true;
                            to_ping.push(key);
                        }
                    }
                    ConnState::Closing { since_s } if now_s.saturating_sub(since_s) >= CLOSE_TIMEOUT.as_secs() => {
                        shutdown_socket(conn.fd);
                    }
                    _ => {}
                }
            }
            for key in to_ping {
                self.send_locked(&mut state, key, ping.clone());
            }
            drop(state);
            self.announce_subscription_counts();
            for key in unauthorized {
                self.refuse(key, 4009, "Unauthorized connection: sign in or join a private channel in time");
            }
        }
    }

    /// Records activity from a client; false when it is over its message rate (the message
    /// must then be dropped and answered with 4301).
    pub fn record_activity(&self, key: ConnKey, messages: u32) -> bool {
        let max = self.config.websocket.messages_per_second_max;
        let mut state = self.state.borrow_mut();
        let now_s = state.now_s;
        let conn = &mut state.connections[key];
        conn.last_seen_s = now_s;
        conn.pinged = false;
        if conn.rate_window_s != now_s {
            conn.rate_window_s = now_s;
            conn.rate_count = 0;
        }
        conn.rate_count = conn.rate_count.saturating_add(messages);
        max == 0 || conn.rate_count <= max
    }

    /// Flips to shutting down (once): readiness fails, the acceptor stops.
    fn begin_shutdown(&self) {
        let mut state = self.state.borrow_mut();
        if !state.shutting_down {
            state.shutting_down = true;
            for waker in state.shutdown_waiters.drain(..) {
                waker.wake();
            }
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.state.borrow().shutting_down
    }

    /// Resolves when shutdown begins.
    pub async fn shutdown_requested(&self) {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.shutting_down {
                Poll::Ready(())
            } else {
                state.shutdown_waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Closes every WebSocket with 4200, spread evenly over `shutdown_close_window_ms` so
    /// that clients (which reconnect without jitter) do not all return at once, then waits
    /// up to `shutdown_grace_ms` for the connections to finish.
    pub async fn drain_connections(&self) {
        let keys: Vec<ConnKey> = self.state.borrow().connections.iter().map(|(k, _)| k).collect();
        let window_ms = self.config.server.shutdown_close_window_ms.max(1);
        let per_ms = keys.len().div_ceil(window_ms as usize).max(1);
        for chunk in keys.chunks(per_ms) {
            for &key in chunk {
                self.close(key, 4200, "server shutting down, reconnect");
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.server.shutdown_grace_ms);
        while !self.state.borrow().connections.is_empty() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a user's home shard is computed from (distinct from any channel name).
fn user_home_key(user_id: &str) -> String {
    format!("#user:{user_id}")
}

/// Queues the close frame and marks the connection closing (no-op unless open).
fn close_conn(conn: &mut Connection, code: u16, reason: &str, now_s: u64) {
    if conn.state != ConnState::Open {
        return;
    }
    let close = frame::encode_close(code, reason);
    conn.queued_bytes += close.len();
    conn.queue.push_back(close);
    conn.state = ConnState::Closing { since_s: now_s };
    if let Some(waker) = conn.writer.take() {
        waker.wake();
    }
}

/// `shutdown(fd, SHUT_RDWR)`: wakes a reader or writer parked on a peer that went silent.
fn shutdown_socket(fd: RawFd) {
    // SAFETY: shutdown(2) takes a plain integer and touches no memory of ours. The fd belongs
    // to a connection still in the slab, whose read half (which owns the fd) is dropped only
    // after the slab entry is removed, so it cannot be a reused descriptor.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Yields to every other ready task, then resumes. monoio 0.2.4 puts a self-woken task at the
/// *front* of the run queue (starving everything else); a waker fired from a fresh task puts
/// it at the back.
pub async fn yield_back() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        let waker = cx.waker().clone();
        monoio::spawn(async move { waker.wake() });
        Poll::Pending
    })
    .await
}
