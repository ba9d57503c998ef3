//! A shard: one thread, pinned to one CPU, with its own monoio runtime and listener.
//!
//! Owns, in one `ShardState` behind one `RefCell` that is never borrowed across an `.await`:
//! its connections (`connections`), its channel table (`router`), the home state of the
//! channels and users it is home for (`home`), its outboxes toward other shards (`outbox`),
//! its pending cross-shard queries, the coarse clock and the shutdown flag. Each part owns its
//! data and invariants; this module runs the tasks and routes between the parts. Other shards
//! are reached only through the mesh (`shard::mesh`).
//!
//! Tasks on a shard: the acceptor (`net::listener`), one reader and one writer per
//! WebSocket, one task per HTTP connection, the mesh pump, the outbox flusher and a one-second
//! ticker for liveness, close timeouts and subscription_count announcements.
//!
//! Submodules: `mesh` (rings), `router` (channel → local subscribers), `connections` (the
//! slab, write queues, liveness), `outbox` (messages waiting for ring space), `session` (what
//! a Pusher connection's messages do), `home` and `presence` (pure state owned by one home
//! shard per channel or user), `home_link` (routing to home shards, executing home effects),
//! `accept` (the one accept rule: create webhook records, publish, commit, acknowledge),
//! `cluster_link` (cluster mode: the shard's Redis link supervisor, fan-out through Redis, 4200
//! on gaps), `cluster_home` (cluster mode: presence and occupancy decided by scripts in Redis,
//! the node's lease and the reaper, channel queries from Redis).

pub mod accept;
pub mod cluster_home;
mod cluster_limits;
pub mod cluster_link;
mod cluster_watch;
pub mod connections;
pub mod home;
mod home_link;
pub mod mesh;
mod outbox;
pub mod presence;
pub mod reload;
pub mod router;
pub mod session;
#[cfg(test)]
mod tests;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::apps::{AppIndex, Apps};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::pusher::message::{self, SocketId};
use crate::wal::Lsn;
use crate::webhook::admin::AdminAnswer;
use crate::webhook::dispatch::Webhooks;
use crate::webhook::event::LifecycleEvent;
pub use connections::{ConnKey, ConnState, Connection, WRITE_BATCH_FRAMES_MAX};
use connections::{Connections, Enqueued, Liveness};
use home::{HomeState, JoinTickets};
use mesh::{Mesh, MeshMessage, Publication, Query, QueryReply, Watcher};
use outbox::Outbox;
use router::Router;
/// Mesh messages one pump wake-up handles before yielding to connection tasks.
const PUMP_BATCH_MAX: usize = 256;
/// How long a closing connection may take to finish the close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an HTTP API query waits for the other shards.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A cross-shard query waiting for replies.
struct PendingQuery {
    remaining: usize,
    replies: QueryReply,
    waker: Option<Waker>,
}

/// Everything a shard owns that changes.
pub struct ShardState {
    /// WebSocket connections.
    pub connections: Connections,
    /// Channel → local subscribers. Invariant: names only live connections, each for a
    /// channel in its `channels` and not in its `joins`.
    pub router: Router,
    /// State of the channels and users this shard is home for.
    pub home: HomeState,
    /// Joins this shard sent to home shards: tickets, and those given up while waiting.
    pub joins: JoinTickets,
    /// Sockets open on this shard (WebSocket and HTTP), for `connections_per_shard_max`.
    pub open_sockets: usize,
    /// Sequence part of the next socket_id issued here (see `Shard::register`).
    next_sequence: u64,
    /// Per target shard: messages waiting for ring space, in order.
    outbox: Outbox,
    queries: HashMap<u64, PendingQuery>,
    next_query_id: u64,
    /// Seconds since the shard started, advanced by the ticker (a coarse clock for timeouts).
    pub now_s: u64,
    /// Set once shutdown begins.
    pub shutting_down: bool,
    shutdown_waiters: Vec<Waker>,
    /// Per app (by index): its WebSocket messages on this shard, for the dashboard.
    app_traffic: Vec<crate::shard::mesh::AppTraffic>,
}

impl ShardState {
    /// The traffic counters of `app`, growing the table for an index it has not seen (so an
    /// app list that grows never indexes out of bounds).
    fn traffic_mut(&mut self, app: AppIndex) -> &mut crate::shard::mesh::AppTraffic {
        let index = app as usize;
        if index >= self.app_traffic.len() {
            self.app_traffic.resize(index + 1, Default::default());
        }
        &mut self.app_traffic[index]
    }
}

/// A shard and everything its tasks share.
pub struct Shard {
    /// This shard's number.
    pub index: usize,
    /// The running config, swapped whole by a reload (`reload::reload`): what can change live
    /// (`[http]`, `[websocket]`, some `[server]` keys) is new, the rest is the start's. An `Rc`
    /// around the shared `Arc`, as `apps_cell`.
    #[allow(clippy::redundant_allocation, reason = "the Rc makes snapshots shard-local counts")]
    config_cell: RefCell<Rc<Arc<Config>>>,
    /// The apps, swapped whole by a reload (`reload::reload_apps`). An `Rc` around the shared
    /// `Arc` so that taking a snapshot (`apps()`) is a shard-local count, not an atomic one on
    /// a cache line every shard writes.
    #[allow(clippy::redundant_allocation, reason = "the Rc makes snapshots shard-local counts")]
    apps_cell: RefCell<Rc<Arc<Apps>>>,
    /// The rings to and from every shard.
    pub mesh: Arc<Mesh>,
    /// Every shard's metrics; this shard writes only `metrics[index]`.
    pub all_metrics: Arc<[ShardMetrics]>,
    /// Mutable state; borrowed briefly, never across an await.
    pub state: RefCell<ShardState>,
    /// The webhook dispatcher, when some app has webhooks (set once at start).
    pub webhooks_cell: OnceCell<Rc<Webhooks>>,
    /// The Redis link, in cluster mode (set once at start).
    cluster_cell: OnceCell<cluster_link::ClusterHandle>,
    /// The WAL position of the last lifecycle event created here, committed at shutdown.
    lifecycle_lsn_max: Cell<Lsn>,
    started: Instant,
    /// This shard, for timers that outlive the call that starts them (set once, by
    /// `spawn_background`).
    me: OnceCell<std::rc::Weak<Shard>>,
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
            connections: Connections::default(),
            router: Router::new(apps.list.len()),
            home: HomeState::default(),
            joins: JoinTickets::default(),
            open_sockets: 0,
            next_sequence: 0,
            outbox: Outbox::new(shards),
            queries: HashMap::new(),
            next_query_id: 0,
            now_s: 0,
            shutting_down: false,
            shutdown_waiters: Vec::new(),
            app_traffic: vec![Default::default(); apps.list.len()],
        };
        Shard {
            index,
            config_cell: RefCell::new(Rc::new(config)),
            apps_cell: RefCell::new(Rc::new(apps)),
            mesh,
            all_metrics,
            state: RefCell::new(state),
            webhooks_cell: OnceCell::new(),
            cluster_cell: OnceCell::new(),
            lifecycle_lsn_max: Cell::new(0),
            started: Instant::now(),
            me: OnceCell::new(),
        }
    }

    /// The apps as of now: a snapshot that a reload does not change (a caller that awaits
    /// keeps the registry it started with).
    #[allow(clippy::redundant_allocation, reason = "the Rc makes snapshots shard-local counts")]
    pub fn apps(&self) -> Rc<Arc<Apps>> {
        self.apps_cell.borrow().clone()
    }

    /// The running config as of now: a snapshot that a reload does not change (a connection
    /// reads its limits once, when it starts, so a reload applies to new connections).
    #[allow(clippy::redundant_allocation, reason = "the Rc makes snapshots shard-local counts")]
    pub fn config(&self) -> Rc<Arc<Config>> {
        self.config_cell.borrow().clone()
    }

    /// The webhook dispatcher, if any app has webhooks.
    pub fn webhooks(&self) -> Option<&Rc<Webhooks>> {
        self.webhooks_cell.get()
    }

    /// Hands a lifecycle event to the app's Pusher-format webhooks (if it has any); returns
    /// the WAL position that makes it durable, for a caller that must wait for that.
    pub fn lifecycle(&self, app: AppIndex, event: impl FnOnce() -> LifecycleEvent) -> Option<Lsn> {
        let webhooks = self.webhooks()?;
        if !self.apps().get(app).wants_lifecycle {
            return None;
        }
        let lsn = webhooks.lifecycle(app, event());
        if let Some(lsn) = lsn {
            self.lifecycle_lsn_max.set(self.lifecycle_lsn_max.get().max(lsn));
        }
        lsn
    }

    /// This shard's metrics.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.all_metrics[self.index]
    }

    /// Starts the shard's background tasks. Call once, inside its runtime.
    pub fn spawn_background(self: &Rc<Self>) {
        let _ = self.me.set(Rc::downgrade(self));
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
        let key = state.connections.insert(Connection::new(app, echo, socket_id, fd, now_s));
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
            self.enqueue(conn, &frame, now_s, self.write_queue_max());
        }
    }

    /// Queues a shared frame on an open connection, enforcing the write-queue limit
    /// (`queue_max`, read once by the caller for all its recipients: the config is a `RefCell`
    /// a reload may swap, not worth a borrow per delivery).
    #[inline]
    fn enqueue(&self, conn: &mut Connection, frame: &Bytes, now_s: u64, queue_max: usize) {
        if conn.enqueue(frame, now_s, queue_max) == Enqueued::SlowConsumer {
            ShardMetrics::add(&self.metrics().slow_consumer_closes_total, 1);
        }
    }

    /// The write-queue limit now in force (`websocket.write_queue_bytes_max`).
    pub(super) fn write_queue_max(&self) -> usize {
        self.config_cell.borrow().websocket.write_queue_bytes_max
    }

    /// Starts the closing handshake with `code` (after frames already queued).
    pub fn close(&self, key: ConnKey, code: u16, reason: &str) {
        let mut state = self.state.borrow_mut();
        let now_s = state.now_s;
        if let Some(conn) = state.connections.get_mut(key) {
            conn.close(code, reason, now_s);
        }
    }

    /// `pusher:error` with a close code, then the close itself (Pusher protocol: an error
    /// with a 4000–4999 code precedes the close frame carrying it).
    pub fn refuse(&self, key: ConnKey, code: u16, reason: &str) {
        self.send(key, message::error(Some(code), reason, None));
        self.close(key, code, reason);
    }

    /// Takes up to `WRITE_BATCH_FRAMES_MAX` frames for the writer, or parks it.
    /// `Ready(None)`: the writer must stop. The bool is true when the batch ends with the
    /// final close frame.
    pub async fn next_batch(&self, key: ConnKey, batch: &mut Vec<Bytes>) -> Option<bool> {
        poll_fn(|cx| self.state.borrow_mut().connections[key].take_batch(batch, cx.waker())).await
    }

    /// Accounts a written batch.
    pub fn batch_written(&self, key: ConnKey, frames: usize, bytes: usize) {
        let mut state = self.state.borrow_mut();
        if let Some(conn) = state.connections.get_mut(key) {
            conn.written(bytes);
            if !conn.echo {
                let app = conn.app;
                state.traffic_mut(app).messages_out += frames as u64;
            }
        }
        ShardMetrics::add(&self.metrics().messages_out_total, frames as u64);
        ShardMetrics::add(&self.metrics().bytes_out_total, bytes as u64);
    }

    /// Marks the writer finished (after an error or the final close frame).
    pub fn writer_finished(&self, key: ConnKey) {
        self.state.borrow_mut().connections[key].writer_finished();
    }

    /// First half of teardown, when the reader ends. A closing connection keeps its writer
    /// until the close frame is out (the ticker cuts it after the close timeout if the peer
    /// does not read); any other is marked dead and its socket cut, so a writer stuck on a
    /// peer that stopped reading returns at once.
    pub fn begin_teardown(&self, key: ConnKey) {
        self.state.borrow_mut().connections[key].begin_teardown();
    }

    /// Second half of teardown, after the writer task ended: unsubscribe and forget.
    pub fn finish_teardown(&self, key: ConnKey) {
        let mut state = self.state.borrow_mut();
        let conn = state.connections.remove(key);
        let subscriptions = conn.channels.len() as u64;
        let left: Vec<&str> =
            conn.channels.iter().filter(|c| state.router.unsubscribe(conn.app, c, key)).map(|c| c.as_ref()).collect();
        debug_assert_eq!(left.len() + conn.joins.len(), subscriptions as usize, "each channel is routed or pending");
        drop(state);
        // Members leave before the channel empties (member_removed, then channel_vacated).
        for (channel, user_id) in conn.presence.iter() {
            let pending = conn.joins.iter().find(|(c, _)| c == channel).map(|&(_, ticket)| ticket);
            self.presence_leave_after(pending, conn.app, channel.clone(), user_id.clone());
        }
        for channel in left {
            self.subscription_changed(conn.app, channel, -1);
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
            self.apps().get(conn.app).release();
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
        let queue_max = self.write_queue_max();
        for &key in subscribers {
            let conn = &mut state.connections[key];
            if Some(conn.socket_id) != exclude {
                self.enqueue(conn, frame, state.now_s, queue_max);
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

    // ---- mesh --------------------------------------------------------------------------

    /// Sends to another shard without blocking: straight into its ring when nothing is waiting
    /// ahead of it, else into the outbox (order per target is kept).
    pub fn mesh_send(&self, target: usize, message: MeshMessage) {
        debug_assert_ne!(target, self.index, "a shard never sends to itself");
        ShardMetrics::add(&self.metrics().mesh_sent_total, 1);
        self.mesh.count_sent(self.index);
        let mut state = self.state.borrow_mut();
        let message = if state.outbox.is_clear(target) {
            match self.mesh.try_send(target, message) {
                Ok(()) => return,
                Err(back) => back,
            }
        } else {
            message
        };
        ShardMetrics::add(&self.metrics().mesh_full_total, 1);
        ShardMetrics::add(&self.metrics().mesh_outbox_depth, 1);
        state.outbox.push(target, message);
    }

    /// Waits until the outboxes are empty, i.e. everything this shard has sent is in the
    /// target rings. A publish answers only then, so an event the API acknowledged is already
    /// queued for every shard (and a later publish elsewhere cannot overtake it; see `publish`).
    async fn outbox_flushed(&self) {
        poll_fn(|cx| self.state.borrow_mut().outbox.poll_flushed(cx.waker())).await
    }

    /// Moves outbox messages into rings as space appears, retrying on a 1 ms timer (never a
    /// self-wake, which starves every other task in monoio 0.2.4).
    async fn flusher(self: Rc<Self>) {
        loop {
            poll_fn(|cx| self.state.borrow_mut().outbox.poll_work(cx.waker())).await;
            while self.flush_outbox() > 0 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// One pass over the outboxes; returns how many messages still wait.
    fn flush_outbox(&self) -> usize {
        let mut state = self.state.borrow_mut();
        let moved = state.outbox.flush(&self.mesh);
        ShardMetrics::sub(&self.metrics().mesh_outbox_depth, moved as u64);
        state.outbox.len()
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
        self.handle_mesh_message(message);
        // After the messages it caused were counted as sent (see `Mesh::quiescent`).
        self.mesh.count_handled(self.index);
    }

    fn handle_mesh_message(&self, message: MeshMessage) {
        match message {
            MeshMessage::Publish(p) => self.deliver_local(p.app, &p.channel, &p.frame, p.exclude),
            MeshMessage::HomeJoin(join) => self.home_join_at_home(*join),
            MeshMessage::Joined(reply) => self.joined(*reply),
            MeshMessage::CacheStore { app, channel, frame, data } => self.cache_store(app, &channel, frame, &data),
            MeshMessage::SubscriptionDelta { app, channel, delta } => self.subscription_changed(app, &channel, delta),
            MeshMessage::UserOnline { app, user_id } => self.user_presence(app, user_id, true),
            MeshMessage::UserOffline { app, user_id } => self.user_presence(app, user_id, false),
            MeshMessage::Watch { app, user_id, watcher, watch } => self.watch(app, user_id, watcher, watch),
            MeshMessage::SendTo { watcher, frame } => self.send_to(watcher, frame),
            MeshMessage::Watchlist { app, user_id, online, frame } => {
                self.watchlist_decided(app, user_id, online, frame)
            }
            MeshMessage::PresenceLeave { app, channel, user_id } => self.presence_leave(app, channel, user_id),
            MeshMessage::TerminateUser { app, user_id } => self.terminate_user_locally(app, &user_id),
            MeshMessage::BucketGap { app, bucket } => self.close_bucket(app, bucket),
            MeshMessage::Reload(reload) => self.reload(*reload),
            MeshMessage::ClusterApps { apps, done } => self.cluster_apps(apps, done),
            MeshMessage::Query { from, id, query } => {
                let reply = self.answer_locally(&query);
                self.mesh_send(from, MeshMessage::Reply { id, reply });
            }
            MeshMessage::Reply { id, reply } => {
                let mut state = self.state.borrow_mut();
                if let Some(pending) = state.queries.get_mut(&id) {
                    pending.replies.merge(reply);
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
            return QueryReply::Cache(self.cached(*app, name).map(|(_, data, ttl)| (data, ttl)));
        }
        if let Query::Webhooks { app, request } = query {
            let answer = self.webhooks().map(|w| w.admin(*app, request));
            return QueryReply::Webhooks(answer.unwrap_or_else(|| AdminAnswer::empty(request)));
        }
        if let Query::Dashboard = query {
            return QueryReply::Dashboard(vec![self.dashboard_part()]);
        }
        let state = self.state.borrow();
        match query {
            Query::Cache { .. } | Query::Webhooks { .. } | Query::Dashboard => unreachable!("answered above"),
            Query::Channels { app, prefix } => QueryReply::Channels(
                state
                    .router
                    .occupied(*app)
                    .filter(|(name, _)| name.starts_with(prefix.as_str()))
                    .map(|(name, count)| (name.into(), count as u32))
                    .collect(),
            ),
            Query::PresenceUsers { app, name } => QueryReply::PresenceUsers(state.home.presence.users(*app, name)),
            Query::PresenceCounts { app, prefix } => {
                QueryReply::PresenceCounts(state.home.presence.counts(*app, prefix))
            }
            Query::Channel { app, name } => QueryReply::Channels(
                state
                    .router
                    .subscribers(*app, name)
                    .map(|set| vec![(name.as_str().into(), set.len() as u32)])
                    .unwrap_or_default(),
            ),
        }
    }

    /// This shard's part of a dashboard snapshot: O(connections + channels), once per second
    /// per open dashboard page, never per message.
    fn dashboard_part(&self) -> crate::shard::mesh::ShardSnapshot {
        let mut part = crate::shard::mesh::ShardSnapshot { shard: self.index, ..Default::default() };
        let apps = self.apps();
        for app in apps.list.iter().map(|a| a.index) {
            let health = self.webhooks().map(|w| w.admin(app, &crate::webhook::admin::AdminRequest::Health));
            part.webhooks.push(match health {
                Some(AdminAnswer::Health(list)) => list,
                _ => Vec::new(),
            });
        }
        let state = self.state.borrow();
        part.write_queue_bytes = state.connections.iter().map(|(_, c)| c.queued_bytes() as u64).sum();
        for app in apps.list.iter().map(|a| a.index) {
            part.channels.push(state.router.occupied(app).map(|(name, count)| (name.into(), count as u32)).collect());
            part.presence.push(state.home.presence.counts(app, "presence-"));
        }
        part.traffic = state.app_traffic.clone();
        part
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
        let activity = u64::from(self.config().websocket.activity_timeout_s);
        let rules = Liveness {
            ping_after_s: activity,
            dead_after_s: activity + u64::from(self.config().websocket.pong_timeout_s),
            close_timeout_s: CLOSE_TIMEOUT.as_secs(),
        };
        let ping = message::ping();
        loop {
            monoio::time::sleep(Duration::from_secs(1)).await;
            // Read each tick: a reload may have changed the apps' timeouts.
            let apps = self.apps();
            let authorized_timeout_s = |app| u64::from(apps.get(app).config.authorized_connections_timeout_s);
            let now_s = self.started.elapsed().as_secs();
            let mut state = self.state.borrow_mut();
            debug_assert!(now_s >= state.now_s, "the shard clock never goes back");
            state.now_s = now_s;
            let pass = state.connections.liveness_pass(now_s, rules, authorized_timeout_s);
            ShardMetrics::add(&self.metrics().liveness_closes_total, pass.dead);
            for key in pass.to_ping {
                self.send_locked(&mut state, key, ping.clone());
            }
            drop(state);
            self.sweep_cache(Instant::now());
            self.announce_subscription_counts();
            for key in pass.unauthorized {
                self.refuse(key, 4009, "Unauthorized connection: sign in or join a private channel in time");
            }
        }
    }

    /// Records activity from a client; false when it is over its message rate (the message
    /// must then be dropped and answered with 4301).
    pub fn record_activity(&self, key: ConnKey, messages: u32) -> bool {
        let max = self.config().websocket.messages_per_second_max;
        let mut state = self.state.borrow_mut();
        let now_s = state.now_s;
        state.connections[key].record_activity(now_s, messages, max)
    }

    /// Counts a text message received on a Pusher connection for its app, wherever
    /// `messages_in_total` counts it (rate-limited and closing ones too), so the per-app
    /// counts add up to the node's.
    pub fn message_received(&self, key: ConnKey) {
        let mut state = self.state.borrow_mut();
        let conn = &state.connections[key];
        if !conn.echo {
            let app = conn.app;
            state.traffic_mut(app).messages_in += 1;
        }
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

    /// Graceful shutdown, in the order that keeps every lifecycle event: close the
    /// connections (their leaves go to the channels' home shards), keep handling mesh
    /// messages until every shard has done so and nothing is in flight (the home shards'
    /// member_removed and channel_vacated are created), commit this shard's lifecycle events
    /// to the WAL, then return so the shard exits. Each wait is bounded by
    /// `shutdown_grace_ms`, so a stuck shard or disk cannot hold the process. Without a WAL
    /// (`durability = "memory"`) events not yet delivered are lost, as that mode says.
    pub async fn shut_down_in_order(&self) {
        self.drain_connections().await;
        self.mesh.mark_drained();
        let grace = Duration::from_millis(self.config().server.shutdown_grace_ms);
        let deadline = Instant::now() + grace;
        while !self.mesh.quiescent() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        // Members still waiting out their debounce leave now, not after the process is gone.
        self.presence_leave_all_now();
        if self.cluster().is_some() {
            self.cluster_shutdown(deadline).await;
        }
        let lsn = self.lifecycle_lsn_max.get();
        if let (Some(webhooks), true) = (self.webhooks(), lsn > 0) {
            match monoio::time::timeout(grace, webhooks.commit(lsn)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(shard = self.index, %error, "lifecycle webhooks not durable at exit"),
                Err(_) => tracing::error!(shard = self.index, "lifecycle webhooks not durable within the grace"),
            }
        }
    }

    /// Closes every WebSocket with 4200, spread evenly over `shutdown_close_window_ms` so
    /// that clients (which reconnect without jitter) do not all return at once, then waits
    /// up to `shutdown_grace_ms` for the connections to finish; connections still there are
    /// cut, so their teardown (and leaves) still happens.
    pub async fn drain_connections(&self) {
        let keys = self.state.borrow().connections.keys();
        let window_ms = self.config().server.shutdown_close_window_ms.max(1);
        let per_ms = keys.len().div_ceil(window_ms as usize).max(1);
        for chunk in keys.chunks(per_ms) {
            for &key in chunk {
                self.close(key, 4200, "server shutting down, reconnect");
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let deadline = Instant::now() + Duration::from_millis(self.config().server.shutdown_grace_ms);
        while !self.state.borrow().connections.is_empty() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        for (_, conn) in self.state.borrow().connections.iter() {
            conn.shutdown_socket();
        }
        // A cut socket ends its reader and writer at once; teardown follows on the next turns.
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while !self.state.borrow().connections.is_empty() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
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
