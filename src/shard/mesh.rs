//! The mesh: bounded lock-free rings between shards, the only thing that crosses threads.
//!
//! Each shard has one inbox: a `crossbeam` `ArrayQueue` (multi-producer; every other shard
//! pushes into it), an `AtomicWaker` for the shard's pump task and a `notified` flag that
//! coalesces wake-ups. With monoio's `sync` feature, waking a task owned by another thread
//! sends the waker to that thread and unparks it (an eventfd write when its runtime sleeps in
//! io_uring), so an idle shard costs nothing and a busy one is woken once per burst.
//!
//! Invariant: a push never blocks. A full ring returns the message to the sender, which keeps
//! it in its outbox, counts the event and retries (see `shard::Shard::mesh_send`).
//!
//! The wake protocol (the prototype's hard-won order): producers push, then
//! `if !notified.swap(true) { wake }`. The consumer re-arms (`notified = false`) only
//! immediately before its final emptiness check, never before draining, or a push that lands
//! during a drain leaves `notified` set with nobody awake to clear it.

use std::future::poll_fn;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;

use crate::apps::AppIndex;
use crate::pusher::message::SocketId;
use crate::webhook::admin::{AdminAnswer, AdminRequest};

/// An event to deliver to a channel's subscribers on the receiving shard.
#[derive(Debug)]
pub struct Publication {
    /// The app.
    pub app: AppIndex,
    /// The channel.
    pub channel: Box<str>,
    /// The complete WebSocket frame, encoded once on the publishing shard.
    pub frame: Bytes,
    /// A connection that must not receive it (the publisher's `socket_id`).
    pub exclude: Option<SocketId>,
}

/// A question about channel state, answered by every shard for its own connections.
#[derive(Debug)]
pub enum Query {
    /// Occupied channels of an app whose names start with a prefix, with subscriber counts.
    Channels {
        /// The app.
        app: AppIndex,
        /// Name prefix ("" for all).
        prefix: String,
    },
    /// Presence members of one channel (answered by its home shard; others return nothing).
    PresenceUsers {
        /// The app.
        app: AppIndex,
        /// The channel.
        name: String,
    },
    /// Member counts of presence channels whose names start with a prefix (from home shards).
    PresenceCounts {
        /// The app.
        app: AppIndex,
        /// Name prefix.
        prefix: String,
    },
    /// The cached event of a cache channel: (data, seconds left), from its home shard.
    Cache {
        /// The app.
        app: AppIndex,
        /// The channel.
        name: String,
    },
    /// Subscriber count of one channel.
    Channel {
        /// The app.
        app: AppIndex,
        /// The channel.
        name: String,
    },
    /// A webhook admin request; each shard answers for its own deliveries.
    Webhooks {
        /// The app.
        app: AppIndex,
        /// What to do or report.
        request: AdminRequest,
    },
    /// Everything the operator dashboard shows of one shard, in one round trip (`dashboard`).
    Dashboard,
}

/// One shard's part of a dashboard snapshot: its load and, per app (by index), its occupied
/// channels, the presence channels it is home for and its webhook endpoints' health.
#[derive(Debug, Default)]
pub struct ShardSnapshot {
    /// The shard.
    pub shard: usize,
    /// Bytes queued on this shard's connections, waiting to be written.
    pub write_queue_bytes: u64,
    /// Per app: (channel, local subscribers).
    pub channels: Vec<Vec<(Box<str>, u32)>>,
    /// Per app: (presence channel, members), from the channels this shard is home for.
    pub presence: Vec<Vec<(Box<str>, u32)>>,
    /// Per app: this shard's view of each webhook endpoint.
    pub webhooks: Vec<Vec<crate::webhook::admin::Health>>,
    /// Per app: messages this shard received from and wrote to its connections, since start.
    pub traffic: Vec<AppTraffic>,
}

/// One app's WebSocket messages on one shard since it started. Plain counters in the shard's
/// own state: bumped where the shard already holds its state borrowed, read once per
/// dashboard snapshot, so per-app counts cost no atomics and no shared cache lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppTraffic {
    /// Text frames received from the app's connections.
    pub messages_in: u64,
    /// Frames written to the app's connections.
    pub messages_out: u64,
}

/// One shard's answer to a `Query`, or the merged answers of all shards (`merge`). Each query
/// kind has its own variant, so values travel typed from the shard to the HTTP edge, which
/// alone renders JSON.
#[derive(Debug)]
pub enum QueryReply {
    /// To `Channels` and `Channel`: (channel, subscriptions) pairs, one per shard that has any.
    Channels(Vec<(Box<str>, u32)>),
    /// To `PresenceUsers`: the user ids.
    PresenceUsers(Vec<Box<str>>),
    /// To `PresenceCounts`: (channel, members) pairs.
    PresenceCounts(Vec<(Box<str>, u32)>),
    /// To `Cache`: the cached event's data and its seconds left, from the home shard.
    Cache(Option<(Box<str>, u64)>),
    /// To `Webhooks`.
    Webhooks(AdminAnswer),
    /// To `Dashboard`: one part per shard, kept apart (the dashboard shows per-shard load).
    Dashboard(Vec<ShardSnapshot>),
}

impl QueryReply {
    /// Adds another shard's reply to the same query.
    pub fn merge(&mut self, other: QueryReply) {
        match (self, other) {
            (QueryReply::Channels(mine), QueryReply::Channels(theirs)) => mine.extend(theirs),
            (QueryReply::PresenceUsers(mine), QueryReply::PresenceUsers(theirs)) => mine.extend(theirs),
            (QueryReply::PresenceCounts(mine), QueryReply::PresenceCounts(theirs)) => mine.extend(theirs),
            (QueryReply::Cache(mine), QueryReply::Cache(theirs)) => {
                if mine.is_none() {
                    *mine = theirs;
                }
            }
            (QueryReply::Webhooks(mine), QueryReply::Webhooks(theirs)) => mine.merge(theirs),
            (QueryReply::Dashboard(mine), QueryReply::Dashboard(theirs)) => mine.extend(theirs),
            (mine, theirs) => debug_assert!(false, "replies to different queries: {mine:?} and {theirs:?}"),
        }
    }

    /// The (name, count) pairs of a `Channels`, `Channel` or `PresenceCounts` reply.
    pub fn into_counts(self) -> Vec<(Box<str>, u32)> {
        match self {
            QueryReply::Channels(list) | QueryReply::PresenceCounts(list) => list,
            other => Self::mismatch(other),
        }
    }

    /// The user ids of a `PresenceUsers` reply.
    pub fn into_users(self) -> Vec<Box<str>> {
        match self {
            QueryReply::PresenceUsers(list) => list,
            other => Self::mismatch(other),
        }
    }

    /// The cached data and seconds left of a `Cache` reply.
    pub fn into_cache(self) -> Option<(Box<str>, u64)> {
        match self {
            QueryReply::Cache(cache) => cache,
            other => Self::mismatch(other),
        }
    }

    /// A reply read as another query's: a programmer error, loud in debug builds.
    fn mismatch<T: Default>(reply: QueryReply) -> T {
        debug_assert!(false, "reply read as another query's: {reply:?}");
        T::default()
    }
}

/// A subscription that needs the channel's home shard: a presence join (to be counted) or a
/// cache channel (whose last event the home shard keeps), or both.
#[derive(Debug)]
pub struct HomeJoin {
    /// The shard of the connection.
    pub from: usize,
    /// The connection's slab key on `from`.
    pub conn: super::ConnKey,
    /// Its socket_id (guards against a reused slab key).
    pub socket_id: SocketId,
    /// Names this join among the connection's pending ones; the reply carries it back, so a
    /// reply to a join the client has since unsubscribed (and maybe subscribed again) is
    /// recognised as stale.
    pub ticket: super::home::JoinTicket,
    /// The app.
    pub app: AppIndex,
    /// The channel.
    pub channel: Box<str>,
    /// For presence: the user id (as a string) and raw `user_info` JSON (`null` if absent).
    pub member: Option<(Box<str>, Box<str>)>,
    /// Whether it is a cache channel.
    pub cache: bool,
}

/// The home shard's answer to a `HomeJoin`: the frames for the connection
/// (subscription_succeeded and, for a cache channel, the cached event or cache_miss; or a
/// pusher:error), and whether it is now subscribed.
#[derive(Debug)]
pub struct JoinReply {
    /// Slab key on the receiving shard.
    pub conn: super::ConnKey,
    /// Guards against a reused slab key.
    pub socket_id: SocketId,
    /// The join's ticket (see `HomeJoin::ticket`).
    pub ticket: super::home::JoinTicket,
    /// The channel.
    pub channel: Box<str>,
    /// The frames to send, in order.
    pub frames: Vec<Bytes>,
    /// Whether the join was accepted.
    pub accepted: bool,
    /// Refused because Redis could not decide it (cluster mode): the connection is closed with
    /// 4200, so the client reconnects, preferably to a node whose link is up.
    pub reconnect: bool,
}

/// A connection on some shard that watches a user's online state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watcher {
    /// Its shard.
    pub shard: usize,
    /// Its slab key there.
    pub conn: super::ConnKey,
    /// Its socket_id (guards against a reused slab key).
    pub socket_id: SocketId,
}

/// What travels between shards.
#[derive(Debug)]
pub enum MeshMessage {
    /// A subscription for the home shard to count and answer.
    HomeJoin(Box<HomeJoin>),
    /// The home shard's answer to a join.
    Joined(Box<JoinReply>),
    /// A connection signed in as `user_id` (to the user's home shard).
    UserOnline {
        /// The app.
        app: AppIndex,
        /// The user.
        user_id: Box<str>,
    },
    /// A signed-in connection of `user_id` ended (to the user's home shard).
    UserOffline {
        /// The app.
        app: AppIndex,
        /// The user.
        user_id: Box<str>,
    },
    /// Start (`watch`) or stop telling `watcher` when `user_id` comes online or goes offline
    /// (to the watched user's home shard).
    Watch {
        /// The app.
        app: AppIndex,
        /// The watched user.
        user_id: Box<str>,
        /// Who watches.
        watcher: Watcher,
        /// Start (true) or stop (false).
        watch: bool,
    },
    /// Cluster mode: a user came online (`online`) or went offline cluster-wide, as a Redis
    /// script decided (to the user's home shard, which tells the user's watchers).
    Watchlist {
        /// The app.
        app: AppIndex,
        /// The user.
        user_id: Box<str>,
        /// Online (true) or offline.
        online: bool,
        /// The `pusher_internal:watchlist_events` frame, as received.
        frame: Bytes,
    },
    /// A frame for one connection.
    SendTo {
        /// The connection.
        watcher: Watcher,
        /// The frame.
        frame: Bytes,
    },
    /// A channel's subscriber count changed on the sending shard (to the home shard).
    SubscriptionDelta {
        /// The app.
        app: AppIndex,
        /// The channel.
        channel: Box<str>,
        /// +1 or -1.
        delta: i32,
    },
    /// Keep this event as a cache channel's last (to the home shard).
    CacheStore {
        /// The app.
        app: AppIndex,
        /// The cache channel.
        channel: Box<str>,
        /// The event's frame, replayed to new subscribers.
        frame: Bytes,
        /// The event's `data` string, for `info=cache`.
        data: Box<str>,
    },
    /// Close every connection of a signed-in user with 4009 (from the HTTP API).
    TerminateUser {
        /// The app.
        app: AppIndex,
        /// The user id connections signed in as.
        user_id: Box<str>,
    },
    /// A presence subscription ended (to the home shard).
    PresenceLeave {
        /// The app.
        app: AppIndex,
        /// The channel.
        channel: Box<str>,
        /// The member's user id.
        user_id: Box<str>,
    },
    /// Deliver to local subscribers.
    Publish(Arc<Publication>),
    /// Cluster mode: a bucket may have lost messages; close its local connections with 4200.
    BucketGap {
        /// The app.
        app: AppIndex,
        /// The bucket number.
        bucket: u16,
    },
    /// A config reload (from `Server::reload`, not a shard): the running config, apps and
    /// webhook endpoints from now on (`shard::reload`).
    Reload(Box<crate::shard::reload::Reload>),
    /// A config reload in cluster mode (from `Server::reload`, before `Reload`): subscribe
    /// this shard's buckets of the added apps, then send `Ok(shard)` on `done` (`Err(shard)`
    /// when the shard's link is down or fails first).
    ClusterApps {
        /// Index and configured id of each added app.
        apps: Vec<(AppIndex, String)>,
        /// Where the shard reports the outcome.
        done: std::sync::mpsc::Sender<Result<usize, usize>>,
    },
    /// Answer `query` and send the reply back to shard `from` under `id`.
    Query {
        /// Asking shard.
        from: usize,
        /// Correlation id on the asking shard.
        id: u64,
        /// The question.
        query: Arc<Query>,
    },
    /// An answer to a query this shard asked.
    Reply {
        /// Correlation id.
        id: u64,
        /// The answer.
        reply: QueryReply,
    },
}

struct Inbox {
    queue: ArrayQueue<MeshMessage>,
    waker: AtomicWaker,
    notified: AtomicBool,
}

/// Per shard, for shutdown's quiescence check: messages it has sent to other shards and
/// messages it has finished handling. Each is written only by its own shard, on a cache line
/// of its own, so counting costs no contention.
#[derive(Default)]
struct Traffic {
    sent: CachePadded<AtomicU64>,
    handled: CachePadded<AtomicU64>,
}

/// All inboxes, shared by every shard through an `Arc`.
pub struct Mesh {
    inboxes: Box<[Inbox]>,
    shutdown: AtomicBool,
    traffic: Box<[Traffic]>,
    /// Shards whose connections are all gone (their leaves are sent).
    drained: AtomicUsize,
    /// Set once a shard saw every shard drained and no message in flight.
    quiesced: AtomicBool,
}

impl Mesh {
    /// A mesh of `shards` inboxes holding `capacity` messages each.
    pub fn new(shards: usize, capacity: usize) -> Mesh {
        let inboxes = (0..shards)
            .map(|_| Inbox {
                queue: ArrayQueue::new(capacity),
                waker: AtomicWaker::new(),
                notified: AtomicBool::new(false),
            })
            .collect();
        Mesh {
            inboxes,
            shutdown: AtomicBool::new(false),
            traffic: (0..shards).map(|_| Traffic::default()).collect(),
            drained: AtomicUsize::new(0),
            quiesced: AtomicBool::new(false),
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// Pushes into `target`'s ring and wakes it; gives the message back if the ring is full.
    pub fn try_send(&self, target: usize, message: MeshMessage) -> Result<(), MeshMessage> {
        let inbox = &self.inboxes[target];
        inbox.queue.push(message)?;
        self.notify(target);
        Ok(())
    }

    fn notify(&self, target: usize) {
        let inbox = &self.inboxes[target];
        fence(Ordering::SeqCst);
        if !inbox.notified.swap(true, Ordering::SeqCst) {
            inbox.waker.wake();
        }
    }

    /// Takes one message from `shard`'s inbox.
    pub fn try_recv(&self, shard: usize) -> Option<MeshMessage> {
        self.inboxes[shard].queue.pop()
    }

    /// Waits until `shard`'s inbox has messages, or until shutdown is requested if the caller
    /// has not seen it yet (`shutdown_seen`), so a shard that has seen it is not woken again.
    pub async fn ready(&self, shard: usize, shutdown_seen: bool) {
        let inbox = &self.inboxes[shard];
        let shutdown_news = || !shutdown_seen && self.is_shutting_down();
        poll_fn(|cx| {
            if !inbox.queue.is_empty() || shutdown_news() {
                return Poll::Ready(());
            }
            inbox.waker.register(cx.waker());
            // Re-arm only right before the final check (see the module doc).
            inbox.notified.store(false, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if inbox.queue.is_empty() && !shutdown_news() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Messages waiting in `shard`'s inbox.
    pub fn depth(&self, shard: usize) -> usize {
        self.inboxes[shard].queue.len()
    }

    /// Asks every shard to shut down and wakes them all.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for target in 0..self.inboxes.len() {
            self.inboxes[target].notified.store(true, Ordering::SeqCst);
            self.inboxes[target].waker.wake();
        }
    }

    /// Whether shutdown was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Counts a message `shard` sends (call before it enters a ring or an outbox).
    pub fn count_sent(&self, shard: usize) {
        self.traffic[shard].sent.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts a message `shard` has finished handling (after any messages it caused).
    pub fn count_handled(&self, shard: usize) {
        self.traffic[shard].handled.fetch_add(1, Ordering::SeqCst);
    }

    /// `shard` has no connections left: every leave it will ever send is sent.
    pub fn mark_drained(&self) {
        self.drained.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether every shard is drained and no message is in flight, so no home shard will get
    /// another leave: the point after which shards may exit. Two snapshots of the (monotonic)
    /// counters that are equal mean no counter changed between them, so at that instant
    /// every message sent had been handled; handling counts after the messages it causes.
    pub fn quiescent(&self) -> bool {
        if self.quiesced.load(Ordering::SeqCst) {
            return true;
        }
        if self.drained.load(Ordering::SeqCst) < self.shards() {
            return false;
        }
        let snapshot = || -> Vec<(u64, u64)> {
            let read = |t: &Traffic| (t.sent.load(Ordering::SeqCst), t.handled.load(Ordering::SeqCst));
            self.traffic.iter().map(read).collect()
        };
        let first = snapshot();
        let balanced = first.iter().map(|t| t.0).sum::<u64>() == first.iter().map(|t| t.1).sum::<u64>();
        if balanced && snapshot() == first {
            self.quiesced.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: u64) -> MeshMessage {
        MeshMessage::Reply { id, reply: QueryReply::Channels(Vec::new()) }
    }

    /// Replies merge by kind: lists concatenate in reply order, the first cache hit wins.
    #[test]
    fn replies_merge_typed() {
        let mut channels = QueryReply::Channels(vec![("a".into(), 1)]);
        channels.merge(QueryReply::Channels(vec![("a".into(), 2), ("b".into(), 1)]));
        assert_eq!(channels.into_counts(), vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]);
        let mut cache = QueryReply::Cache(None);
        cache.merge(QueryReply::Cache(Some(("first".into(), 5))));
        cache.merge(QueryReply::Cache(Some(("second".into(), 9))));
        assert_eq!(cache.into_cache(), Some(("first".into(), 5)));
        let mut users = QueryReply::PresenceUsers(Vec::new());
        users.merge(QueryReply::PresenceUsers(vec!["u1".into()]));
        assert_eq!(users.into_users(), vec![Box::<str>::from("u1")]);
    }

    /// A full ring hands the message back instead of blocking or dropping it.
    #[test]
    fn full_ring_returns_message() {
        let mesh = Mesh::new(2, 2);
        assert!(mesh.try_send(1, reply(1)).is_ok());
        assert!(mesh.try_send(1, reply(2)).is_ok());
        match mesh.try_send(1, reply(3)) {
            Err(MeshMessage::Reply { id: 3, .. }) => {}
            other => panic!("expected the message back, got {other:?}"),
        }
        assert_eq!(mesh.depth(1), 2);
        assert!(matches!(mesh.try_recv(1), Some(MeshMessage::Reply { id: 1, .. })));
        assert_eq!(mesh.depth(0), 0);
    }

    /// Messages pushed from another thread wake a parked monoio task, in order, none lost.
    #[test]
    fn cross_thread_wake() {
        let mesh = Arc::new(Mesh::new(1, 64));
        let producer = {
            let mesh = mesh.clone();
            std::thread::spawn(move || {
                for id in 0..10_000u64 {
                    let mut message = reply(id);
                    loop {
                        match mesh.try_send(0, message) {
                            Ok(()) => break,
                            Err(back) => {
                                message = back;
                                std::thread::yield_now();
                            }
                        }
                    }
                }
            })
        };
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
        let received = rt.block_on(async {
            let mut next = 0u64;
            while next < 10_000 {
                mesh.ready(0, false).await;
                while let Some(MeshMessage::Reply { id, .. }) = mesh.try_recv(0) {
                    assert_eq!(id, next);
                    next += 1;
                }
            }
            next
        });
        producer.join().unwrap();
        assert_eq!(received, 10_000);
    }
}
