//! The shard's side of cluster mode (docs/cluster.md): starts the shard's link supervisor,
//! delivers the bucket messages it hands over, closes a gapped bucket's connections with 4200,
//! and relays this shard's client events through Redis.
//!
//! Wired: fan-out (kinds 1 and 2, `#server-to-user-` events among them, as kind 1 to the
//! channel's subscribers exactly as on a single node), the channel state of
//! `shard::cluster_home` (kinds 3–5), `terminate_connections` (kind 7), cache channels (each
//! arriving publication kept on its home shard; a join this node holds nothing for reads Redis
//! first) and watchlist events (kinds 8–9, to the user's home shard, `shard::cluster_watch`);
//! the supervisor's other kinds are logged and ignored here.
//!
//! Invariant: in cluster mode every publish and client event reaches this node's own
//! subscribers through Redis too (never directly), so all nodes see one order per bucket.

use std::cell::RefCell;
use std::collections::hash_map::{Entry, HashMap};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::cluster_watch::ClusterOnline;
use super::mesh::{HomeJoin, JoinReply, MeshMessage};
use super::router::ConnKey;
use super::Shard;
use crate::apps::AppIndex;
use crate::cluster::bucket;
use crate::cluster::commands::Commands;
use crate::cluster::link::{LinkError, Reply};
use crate::cluster::message::{self as cluster_message, Header, Kind, Sender};
use crate::cluster::outbound::{NewApps, Outbound, Unavailable};
use crate::cluster::sequence::BucketId;
use crate::cluster::supervisor::{Events, Gap, Supervisor, SupervisorOptions};
use crate::cluster::NodeIdentity;
use crate::metrics::ShardMetrics;
use crate::pusher::channel;
use crate::pusher::message::{self, SocketId};

/// Close code for connections that may have missed messages: pusher-js reconnects at once
/// (Pusher's protocol: 4200–4299 mean "reconnect immediately").
pub const MISSED_MESSAGES: u16 = 4200;

/// A cache channel of an app.
type CacheChannel = (AppIndex, Box<str>);

/// What a shard in cluster mode keeps of its supervisor.
pub struct ClusterHandle {
    /// Where this shard's publishes and client events wait for the command link.
    pub outbound: Rc<Outbound>,
    /// Where its scripts and queries wait for the command link.
    pub commands: Rc<Commands>,
    /// `cluster.buckets`.
    pub buckets: u16,
    /// `cluster.prefix`, for the keys this shard reads.
    pub prefix: String,
    /// This node.
    pub node: NodeIdentity,
    /// The shard itself, for the tasks that wait on Redis for it (weak: the shard owns this).
    pub(super) shard: Weak<Shard>,
    /// What this shard, as home of watched users, knows of their cluster-wide online state.
    pub(super) online: RefCell<ClusterOnline>,
    /// Cache joins waiting for their channel's `{k}:cache`, in arrival order: one read per
    /// channel however many clients join at once (a reconnect storm after a gap).
    cache_reads: RefCell<HashMap<CacheChannel, Vec<HomeJoin>>>,
    /// Cluster-side state of the home shard (`shard::cluster_home`).
    pub(super) home: RefCell<super::cluster_home::ClusterHome>,
}

impl ClusterHandle {
    /// Publishes through Redis and waits until Redis executed it.
    pub async fn publish(
        &self,
        kind: Kind,
        app: AppIndex,
        channel: &str,
        frame: Bytes,
        exclude: Option<SocketId>,
    ) -> Result<(), Unavailable> {
        self.outbound.send(kind, app, channel, frame, exclude)?.outcome().await
    }

    /// Closes a user's connections on every node (`terminate_connections`) and waits until
    /// Redis executed it. A user id no connection can sign in with (empty or over
    /// `USER_ID_BYTES_MAX`) has no connections anywhere: nothing is sent.
    pub async fn terminate_user(&self, app: AppIndex, user_id: &str) -> Result<(), Unavailable> {
        if user_id.is_empty() || user_id.len() > message::USER_ID_BYTES_MAX {
            return Ok(());
        }
        self.outbound.send_to_user(Kind::TerminateUser, app, user_id, Bytes::new())?.outcome().await
    }
}

/// The supervisor's `Events`, delivered on this shard.
struct ShardEvents {
    shard: Rc<Shard>,
}

impl ShardEvents {
    /// Hands one bucket message to what it is for on this node.
    fn deliver(&self, bucket: BucketId, header: &Header<'_>, frame: Bytes) {
        match header.kind {
            // The frame is a slice of the link's read buffer: every local subscriber, on
            // every shard, queues these same bytes.
            Kind::Publication | Kind::ClientEvent => {
                // A cache channel's event is kept before it is delivered, in the bucket's order
                // (on its home shard, as a single node keeps it at publish).
                if header.kind == Kind::Publication && channel::is_cache(header.channel) {
                    match event_data(&frame) {
                        Some(data) => self.shard.cache_store(bucket.app, header.channel, frame.clone(), data),
                        None => {
                            tracing::warn!(channel = header.channel, "a cache channel's event has no data; not kept")
                        }
                    }
                }
                self.shard.broadcast(bucket.app, header.channel, frame, header.exclude)
            }
            Kind::SubscriptionCount => self.shard.broadcast(bucket.app, header.channel, frame, header.exclude),
            // Decided once cluster-wide by a script (`shard::cluster_home`).
            Kind::MemberAdded | Kind::MemberRemoved => {
                self.shard.broadcast(bucket.app, header.channel, frame, header.exclude)
            }
            // The user's connections on every shard of this node, closed as on a single node.
            Kind::TerminateUser => self.shard.terminate_user(bucket.app, header.user_id),
            // Decided once cluster-wide by a script; the user's home shard tells the watchers.
            Kind::UserOnline | Kind::UserOffline => {
                let online = header.kind == Kind::UserOnline;
                self.shard.watchlist_arrived(bucket.app, header.user_id, online, frame)
            }
            other => tracing::debug!(kind = ?other, node = header.node_id, "cluster message kind not wired; ignored"),
        }
    }
}

impl Events for ShardEvents {
    fn message(&mut self, bucket: BucketId, header: &Header<'_>, frame: Bytes) {
        // Join answers held for their place in the script sender's stream (`shard::cluster_home`)
        // follow every script message, whatever its kind.
        self.shard.script_message_arriving(bucket, header.sender, header.sequence);
        self.deliver(bucket, header, frame);
        self.shard.script_message_seen(bucket, header.sender, header.sequence);
    }

    fn gap(&mut self, bucket: BucketId, gap: Gap) {
        tracing::warn!(
            shard = self.shard.index,
            app = bucket.app,
            bucket = bucket.number,
            ?gap,
            "messages may be missed in a bucket: closing its connections with 4200"
        );
        ShardMetrics::add(&self.shard.metrics().cluster_gaps_total, 1);
        self.shard.bucket_gap(bucket.app, bucket.number);
        self.shard.release_held_joins(Some(bucket));
    }

    fn resynced(&mut self, bucket: BucketId, sender: Sender, last: u64) {
        self.shard.script_message_seen(bucket, sender, last);
    }

    fn link_up(&mut self) {
        tracing::info!(shard = self.shard.index, "cluster link up");
        self.shard.cluster_link_up();
        self.shard.users_register();
    }

    fn link_down(&mut self, error: &LinkError) {
        tracing::warn!(shard = self.shard.index, %error, "cluster link down");
    }
}

impl Shard {
    /// The cluster link, in cluster mode.
    pub fn cluster(&self) -> Option<&ClusterHandle> {
        self.cluster_cell.get()
    }

    /// Whether cluster mode is on and this shard cannot publish through Redis now.
    pub fn cluster_down(&self) -> bool {
        self.cluster().is_some_and(|c| !c.outbound.is_up())
    }

    /// Starts this shard's link supervisor (call once, inside the shard's runtime).
    pub fn start_cluster(self: &Rc<Self>, options: SupervisorOptions) {
        let buckets = options.buckets;
        let (prefix, node) = (options.prefix.clone(), options.node.clone());
        let rng = fastrand::Rng::new();
        let events = ShardEvents { shard: self.clone() };
        let supervisor = Supervisor::new(options, events, self.all_metrics.clone(), rng);
        let handle = ClusterHandle {
            outbound: supervisor.outbound(),
            commands: supervisor.commands(),
            buckets,
            prefix,
            node,
            shard: Rc::downgrade(self),
            cache_reads: RefCell::default(),
            home: RefCell::default(),
            online: RefCell::default(),
        };
        assert!(self.cluster_cell.set(handle).is_ok(), "the cluster link starts once");
        if self.index == 0 {
            self.start_connection_sharing();
        }
        monoio::spawn(supervisor.run());
        self.start_cluster_home();
    }

    /// Relays a client event to the channel's other subscribers: through the mesh on a single
    /// node, through Redis in cluster mode (where a refusal is told to the sender as a
    /// `pusher:error`, docs/cluster.md open question 4).
    pub(super) async fn relay(&self, key: ConnKey, app: AppIndex, channel: &str, frame: Bytes, sender: SocketId) {
        let Some(cluster) = self.cluster() else {
            return self.publish(app, channel, frame, Some(sender)).await;
        };
        if cluster.publish(Kind::ClientEvent, app, channel, frame, Some(sender)).await.is_err() {
            self.send(key, relay_refused(channel));
        }
    }

    /// Home shard, cluster mode: a cache channel's join that this node holds no event for
    /// reads the channel's last event from Redis first (`GET` and `PTTL` of `{k}:cache`), keeps
    /// it unless a newer one arrived through the bucket meanwhile, then answers the join.
    pub(super) fn cache_join_from_redis(&self, join: HomeJoin) {
        let Some(cluster) = self.cluster() else { return self.home_join_answer(join) };
        let Some(shard) = cluster.shard.upgrade() else { return };
        let (app, channel) = (join.app, join.channel.clone());
        match cluster.cache_reads.borrow_mut().entry((app, channel.clone())) {
            Entry::Occupied(mut waiting) => return waiting.get_mut().push(join),
            Entry::Vacant(first) => first.insert(Vec::new()).push(join),
        }
        let mut key = String::new();
        bucket::channel_key(&cluster.prefix, &self.apps().get(app).config.id, &channel, "cache", &mut key);
        let get = |command: &[u8]| vec![command.to_vec(), key.as_bytes().to_vec()];
        let pending = cluster.commands.request(vec![get(b"GET"), get(b"PTTL")]);
        monoio::spawn(async move {
            let replies = match pending {
                Ok(pending) => pending.replies().await,
                Err(unavailable) => Err(unavailable),
            };
            shard.cache_fetched(app, channel, replies);
        });
    }

    /// The channel's `{k}:cache` was read (or not): every join waiting for it is answered.
    fn cache_fetched(&self, app: AppIndex, channel: Box<str>, replies: Result<Vec<Reply>, Unavailable>) {
        let key = (app, channel);
        let joins = self.cluster().and_then(|c| c.cache_reads.borrow_mut().remove(&key)).unwrap_or_default();
        let (app, channel) = key;
        let Ok(replies) = replies else {
            for join in joins {
                self.cache_join_refused(join);
            }
            return;
        };
        // One that arrived through the bucket meanwhile is as new or newer: it stays.
        if self.cached(app, &channel).is_none() {
            let apps = self.apps();
            let app_id = &apps.get(app).config.id;
            match last_event(&replies, app_id, &channel) {
                Ok(Some(LastEvent { frame, data, ttl })) => {
                    let expires = Instant::now() + ttl;
                    self.state.borrow_mut().home.cache_store(app, &channel, frame, &data, expires);
                }
                Ok(None) => {}
                Err(reason) => tracing::warn!(
                    channel = &*channel,
                    reason,
                    "a cache channel's last event in Redis is unreadable; ignored"
                ),
            }
        }
        for join in joins {
            self.home_join_cached(join);
        }
    }

    /// Loud rather than a cache_miss that may be wrong: the client may subscribe again.
    fn cache_join_refused(&self, join: HomeJoin) {
        let reason = "cache channel unavailable: cluster unavailable, retry";
        let HomeJoin { from, conn, socket_id, ticket, channel, .. } = join;
        let frames = vec![message::error(None, reason, Some(&channel))];
        let reply = JoinReply { conn, socket_id, ticket, channel, frames, accepted: false, reconnect: false };
        match from == self.index {
            true => self.joined(reply),
            false => self.mesh_send(from, MeshMessage::Joined(Box::new(reply))),
        }
    }

    /// Reload in cluster mode: this shard's supervisor subscribes the added apps' buckets;
    /// `done` learns the outcome (the reloading thread waits for every shard before any of
    /// them serves the apps).
    pub(super) fn cluster_apps(
        &self,
        apps: Vec<(AppIndex, String)>,
        done: std::sync::mpsc::Sender<Result<usize, usize>>,
    ) {
        let index = self.index;
        let Some(cluster) = self.cluster() else {
            let _ = done.send(Ok(index));
            return;
        };
        // The reloading thread may have given up waiting; nothing is lost if so.
        let done = Box::new(move |result: Result<(), Unavailable>| {
            let _ = done.send(result.map(|()| index).map_err(|_| index));
        });
        cluster.outbound.add_apps(NewApps { apps, done });
    }

    /// A bucket of `app` may have lost messages: its connections on every shard are closed.
    pub(super) fn bucket_gap(&self, app: AppIndex, number: u16) {
        self.close_bucket(app, number);
        for target in (0..self.mesh.shards()).filter(|&t| t != self.index) {
            self.mesh_send(target, MeshMessage::BucketGap { app, bucket: number });
        }
    }

    /// Closes this shard's connections subscribed (or joining) to a channel of the bucket, or
    /// signed in as a user whose messages go to it (a missed `terminate_connections`), or
    /// watching one (a missed watchlist event), with 4200, so their clients reconnect, sign in
    /// and resubscribe.
    pub(super) fn close_bucket(&self, app: AppIndex, number: u16) {
        let Some(buckets) = self.cluster().map(|c| c.buckets) else { return };
        let keys: Vec<ConnKey> = {
            let state = self.state.borrow();
            let in_bucket = |name: &str| bucket::of_channel(name, buckets) == number;
            let user_in_bucket =
                |user: &Option<Box<str>>| user.as_deref().is_some_and(|u| bucket::of_user(u, buckets) == number);
            let affected = state.connections.iter().filter(|(_, c)| {
                let watches = c.watchlist.iter().any(|u| bucket::of_user(u, buckets) == number);
                c.app == app && (c.channels.iter().any(|n| in_bucket(n)) || user_in_bucket(&c.user_id) || watches)
            });
            affected.map(|(key, _)| key).collect()
        };
        ShardMetrics::add(&self.metrics().cluster_gap_closes_total, keys.len() as u64);
        for key in keys {
            self.close(key, MISSED_MESSAGES, "messages may have been missed, reconnect");
        }
        // The events kept for the bucket's cache channels may be stale: the next join reads Redis.
        let in_bucket = |a: AppIndex, name: &str| a == app && bucket::of_channel(name, buckets) == number;
        self.state.borrow_mut().home.cache_forget(in_bucket);
    }
}

/// The `pusher:error` a client event gets when it could not be relayed cluster-wide.
pub(super) fn relay_refused(channel: &str) -> Bytes {
    message::error(None, "client event not relayed: cluster unavailable, retry", Some(channel))
}

/// The `data` of a channel event's frame (an unmasked server text frame), as raw JSON.
fn event_data(frame: &[u8]) -> Option<&str> {
    // RFC 6455 §5.2: a 7-bit length, or 126 then 16 bits, or 127 then 64 bits.
    let header = match frame.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        data: &'a serde_json::value::RawValue,
    }
    let event: Event = serde_json::from_slice(frame.get(header..)?).ok()?;
    Some(event.data.get())
}

/// A cache channel's last event from the replies to `GET` and `PTTL` of its `{k}:cache`: the
/// message's frame, its data and the time left; `None` when there is none. Redis is shared, so
/// the message is checked like any received one.
fn last_event(replies: &[Reply], app_id: &str, channel: &str) -> Result<Option<LastEvent>, &'static str> {
    let ttl = match replies.get(1) {
        Some(Reply::Integer(ms)) if *ms > 0 => Duration::from_millis(*ms as u64),
        // -2: no key (expired between the two commands); -1: no expiry, which we never write.
        Some(Reply::Integer(_)) => return Ok(None),
        _ => return Err("PTTL did not answer a number"),
    };
    let payload = match replies.first() {
        Some(Reply::BulkString(payload)) => payload,
        Some(Reply::Null) => return Ok(None),
        _ => return Err("GET did not answer a string"),
    };
    let (header, frame) = cluster_message::decode(payload).map_err(|_| "not a cluster message")?;
    if header.kind != Kind::Publication || header.app_id != app_id || header.channel != channel {
        return Err("not a publication of this channel");
    }
    let data = event_data(&frame).ok_or("the frame has no data")?.into();
    Ok(Some(LastEvent { frame, data, ttl }))
}

/// A cache channel's last event as Redis keeps it.
#[derive(Debug, PartialEq)]
struct LastEvent {
    /// The event's WebSocket frame, as published.
    frame: Bytes,
    /// Its `data`, raw JSON (for `info=cache`).
    data: Box<str>,
    /// How long Redis keeps it still.
    ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::message::Sender;

    fn stored(channel: &str, kind: Kind, frame: &[u8]) -> Reply {
        let header = Header {
            kind,
            sender: Sender { incarnation: 1, shard: 0 },
            sequence: 1,
            node_id: "n",
            app_id: "app",
            channel,
            user_id: "",
            exclude: None,
        };
        let mut payload = Vec::new();
        cluster_message::encode(&header, frame, &mut payload).unwrap();
        Reply::BulkString(payload.into())
    }

    fn check(replies: &[Reply], expected: Result<Option<LastEvent>, &str>) {
        assert_eq!(last_event(replies, "app", "cache-a"), expected, "{replies:?}");
    }

    fn event(frame: &Bytes, data: &str, ms: u64) -> Option<LastEvent> {
        Some(LastEvent { frame: frame.clone(), data: data.into(), ttl: Duration::from_millis(ms) })
    }

    /// The last event read from Redis: the frame, its raw data and the time left; none when
    /// missing or expiring; anything Redis holds that is not this channel's publication is
    /// refused with a reason, never a panic.
    #[test]
    fn last_event_from_redis() {
        let frame =
            message::channel_event("e", "cache-a", &serde_json::value::RawValue::from_string(r#""x""#.into()).unwrap());
        let good = stored("cache-a", Kind::Publication, &frame);
        check(&[good.clone(), Reply::Integer(1500)], Ok(event(&frame, r#""x""#, 1500)));
        check(&[Reply::Null, Reply::Integer(-2)], Ok(None));
        check(&[good.clone(), Reply::Integer(-1)], Ok(None));
        check(std::slice::from_ref(&good), Err("PTTL did not answer a number"));
        check(&[Reply::Integer(1), Reply::Integer(5)], Err("GET did not answer a string"));
        check(&[Reply::BulkString("junk".into()), Reply::Integer(5)], Err("not a cluster message"));
        let other = stored("cache-b", Kind::Publication, &frame);
        check(&[other, Reply::Integer(5)], Err("not a publication of this channel"));
        let client = Reply::BulkString(match stored("cache-a", Kind::Publication, b"\x81\x02{}") {
            Reply::BulkString(b) => b,
            _ => unreachable!(),
        });
        check(&[client, Reply::Integer(5)], Err("the frame has no data"));
    }

    /// The data of frames with each of RFC 6455's three length forms; none without one.
    #[test]
    fn data_of_frames() {
        for size in [10, 200, 70_000] {
            let data = format!("\"{}\"", "d".repeat(size));
            let raw = serde_json::value::RawValue::from_string(data.clone()).unwrap();
            assert_eq!(event_data(&message::channel_event("e", "c", &raw)), Some(data.as_str()));
        }
        assert_eq!(event_data(b""), None);
        assert_eq!(event_data(b"\x81"), None);
        assert_eq!(event_data(b"\x81\x7f"), None);
    }
}
