//! Channel state cluster-wide (docs/cluster.md, "Presence, occupancy, users: keys and
//! scripts", "Dead nodes", "Cluster-wide queries"): in cluster mode the home shard of a channel
//! stays this node's authority, and each **node-level** transition it sees (a user's first or
//! last connection on this node in a presence channel, a channel's first or last subscriber on
//! this node) runs a script in Redis, which decides whether the transition is also
//! cluster-wide. Only that decision publishes `member_added` / `member_removed` (as the script
//! sender) and creates the lifecycle webhook, on the node whose script decided it.
//!
//! Also here: the node's lease and the reaper of dead nodes (shard 0), and the channel queries
//! answered from Redis.
//!
//! Ordering: a home shard queues its scripts on its own command link in the order it sees the
//! transitions and Redis runs them in that order, so a join followed by a leave of the same
//! user can never be applied the other way round. A join's reply is handled inside the
//! supervisor, before it reads on (docs/cluster.md, "The join's place in the stream"); other
//! replies by one task per request.
//!
//! Invariant: what this node contributes to Redis is in `P:n:{node}:keys` before the script
//! that contributes it runs, so a reaper finds every contribution of a dead node.

use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use super::home::{HomeEffect, LifecycleKind};
use super::mesh::{HomeJoin, JoinReply};
use super::presence::{LeaveTicket, Left};
use super::Shard;
use crate::apps::AppIndex;
use crate::cluster::bucket;
use crate::cluster::commands::Command;
use crate::cluster::link::Reply;
use crate::cluster::message::{Kind, Sender, SCRIPT_SHARD};
use crate::cluster::outbound::Unavailable;
use crate::cluster::scripts::{self, integer, strings, ChannelKeys, JoinAnswer, Member};
use crate::cluster::sequence::BucketId;
use crate::pusher::channel::{self, ChannelKind};
use crate::pusher::message;

/// A node-level transition whose script could not run (the link was down or failed); run again
/// at the next `link_up` if the local state still says so. Every script is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Retry {
    /// A member's last connection on this node left.
    Leave(AppIndex, Box<str>, Box<str>),
    /// A channel's occupancy on this node changed: occupy or vacate as the count says now.
    Occupancy(AppIndex, Box<str>),
}

/// A join answer waiting for the bucket's stream to reach the snapshot it carries.
struct Held {
    app: AppIndex,
    bucket: u16,
    /// The script sender (incarnation, number) the snapshot was taken at; `None`: before it.
    position: Option<(u64, u64)>,
    /// The joining shard.
    to: usize,
    reply: JoinReply,
}

/// Removes and returns the entries of `list` that `matches`, keeping the others in order.
fn take_matching(list: &mut Vec<Held>, matches: impl Fn(&Held) -> bool) -> Vec<Held> {
    let (taken, kept) = std::mem::take(list).into_iter().partition(|h| matches(h));
    *list = kept;
    taken
}

/// The cluster-side state of a shard: where its buckets' script streams are, join answers
/// waiting for them, transitions waiting for the link, and its randomness.
#[derive(Default)]
pub(super) struct ClusterHome {
    /// Per (app, bucket) this shard receives: the script sender's last message delivered.
    script_seen: HashMap<(AppIndex, u16), (u64, u64)>,
    /// Join answers waiting for their place in the stream (released by any script message of
    /// their bucket at or past it, a gap or a barrier). Bounded by the joins in flight
    /// (each waits at most until the next message, gap or barrier of its bucket).
    held: Vec<Held>,
    /// Transitions to run again at the next `link_up`. Bounded by the presence members and
    /// channels this shard is home for (each at most once).
    retries: indexmap::IndexSet<Retry>,
    /// Draws the script sender's incarnation candidates.
    rng: fastrand::Rng,
}

impl ClusterHome {
    fn retry(&mut self, retry: Retry) {
        // A set, in order: during an outage every transition lands here once.
        self.retries.insert(retry);
    }
}

/// A channel's cluster-wide counts, as `GET /channels/{name}` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelCounts {
    /// Some node has a subscriber.
    pub occupied: bool,
    /// Subscribers on all nodes (each node's count is refreshed once a second).
    pub subscription_count: u64,
    /// Presence members.
    pub user_count: u64,
}

impl Shard {
    fn cluster_handle(&self) -> &super::cluster_link::ClusterHandle {
        self.cluster().expect("called in cluster mode only")
    }

    /// Runs `task` with this shard, on its runtime.
    fn spawn_task<Fut: Future<Output = ()> + 'static>(&self, task: impl FnOnce(Rc<Shard>) -> Fut) {
        if let Some(shard) = self.cluster_handle().shard.upgrade() {
            monoio::spawn(task(shard));
        }
    }

    /// This shard's keys of a channel (the app by index).
    fn channel_keys(&self, app: AppIndex, channel: &str) -> ChannelKeys {
        let cluster = self.cluster_handle();
        ChannelKeys::new(&cluster.prefix, &self.apps().get(app).config.id, channel, cluster.buckets)
    }

    /// Runs commands on this shard's command link; their replies, in order.
    pub async fn cluster_request(&self, commands: Vec<Command>) -> Result<Vec<Reply>, Unavailable> {
        let pending = self.cluster().ok_or(Unavailable)?.commands.request(commands)?;
        pending.replies().await
    }

    /// Starts the lease task on shard 0 (one per node). Call once, in the shard's runtime.
    pub(super) fn start_cluster_home(self: &Rc<Self>) {
        if self.index == 0 {
            monoio::spawn(self.clone().lease_loop());
        }
    }

    /// The link is up again: runs the transitions that could not run while it was down.
    pub(super) fn cluster_link_up(&self) {
        self.release_held_joins(None);
        let retries = std::mem::take(&mut self.cluster_handle().home.borrow_mut().retries);
        for retry in retries {
            match retry {
                Retry::Leave(app, channel, user_id) => {
                    if !self.state.borrow().home.presence.contains(app, &channel, &user_id) {
                        self.run_presence_leave(app, channel, user_id);
                    }
                }
                Retry::Occupancy(app, channel) => {
                    let occupied = self.state.borrow().home.subscribers(app, &channel) > 0;
                    self.cluster_occupancy(app, channel, occupied);
                }
            }
        }
    }

    // ---- presence ----------------------------------------------------------------------

    /// Home shard, cluster mode: counts the member on this node and runs `presence_join`
    /// (which announces the member if it is new cluster-wide and answers the members of every
    /// node); the answer goes to the joining shard at the snapshot's place in the bucket's
    /// stream (`place_join_answer`).
    pub(super) fn cluster_presence_join(&self, join: HomeJoin) {
        let cluster = self.cluster_handle();
        let (user_id, info) = join.member.clone().expect("a presence join");
        let members_max = self.apps().get(join.app).config.presence_members_max;
        // Counted on this node for its leaves; whether the member is new (or the channel full)
        // is the script's to decide, cluster-wide, so the local answer does not matter here.
        let _ = self.state.borrow_mut().home.presence.join(join.app, &join.channel, &user_id, &info, usize::MAX);
        let keys = self.channel_keys(join.app, &join.channel);
        let member = Member { node: &cluster.node, keys: &keys, channel: &join.channel, user_id: &user_id };
        let frame = message::member_added(&join.channel, &user_id, &info);
        let commands = {
            let rng = &mut cluster.home.borrow_mut().rng;
            scripts::presence_join(&member, &info, members_max, &frame, join.socket_id, rng)
        };
        let cache = if join.cache { self.cache_frames(join.app, &join.channel) } else { Vec::new() };
        let Some(shard) = cluster.shard.upgrade() else { return };
        let on_replies = Box::new(move |replies: Result<Vec<Reply>, Unavailable>| {
            shard.finish_presence_join(join, replies, cache, members_max);
        });
        cluster.commands.request_then(commands, on_replies);
    }

    /// Runs inside the supervisor, right after Redis answered (`Commands::request_then`).
    fn finish_presence_join(
        &self,
        join: HomeJoin,
        replies: Result<Vec<Reply>, Unavailable>,
        cache: Vec<Bytes>,
        members_max: usize,
    ) {
        // Err(true): the link failed (the client is sent to reconnect); Err(false): Redis
        // answered something else than the script's answer.
        let answer = match replies {
            Err(Unavailable) => Err(true),
            Ok(replies) => replies.last().and_then(JoinAnswer::read).ok_or(false),
        };
        let (new_member, position, snapshot) = match answer {
            Err(reconnect) => {
                tracing::warn!(shard = self.index, channel = &*join.channel, reconnect, "presence join not decided");
                let (app, channel) = (join.app, join.channel.clone());
                let (user_id, _) = join.member.clone().expect("a presence join");
                let frames = if reconnect { Vec::new() } else { vec![unavailable_frame(&channel)] };
                self.refuse_join(join, frames, reconnect);
                // Redis may have run the script without its answer arriving (the link failed
                // after writing it): take the member back, now or when the link is up again.
                // A script that never ran makes this leave decide nothing.
                if !self.state.borrow().home.presence.contains(app, &channel, &user_id) {
                    self.run_presence_leave(app, channel, user_id);
                }
                return;
            }
            Ok(JoinAnswer::Full) => {
                let reason = format!("presence channel is full: at most {members_max} members");
                let frame = message::error(None, &reason, Some(&join.channel));
                return self.refuse_join(join, vec![frame], false);
            }
            Ok(JoinAnswer::Joined { new_member, position, snapshot }) => (new_member, position, snapshot),
        };
        if new_member {
            let (user_id, _) = join.member.as_ref().expect("a presence join");
            self.decided(join.app, &*join.channel, LifecycleKind::MemberAdded(user_id.clone()));
        }
        let mut frames = vec![message::presence_subscription_succeeded(&join.channel, &snapshot)];
        frames.extend(cache);
        let number = bucket::of_channel(&join.channel, self.cluster_handle().buckets);
        let (app, to) = (join.app, join.from);
        let HomeJoin { conn, socket_id, ticket, channel, .. } = join;
        let reply = JoinReply { conn, socket_id, ticket, channel, frames, accepted: true, reconnect: false };
        self.place_join_answer(Held { app, bucket: number, position, to, reply });
    }

    /// Answers a join once this shard has delivered the bucket's stream up to the snapshot's
    /// place (now, if it has): the joining connection is routed exactly between the member
    /// events its list already reflects and those it does not, because this shard forwards
    /// both the bucket's messages and the answer through the same mesh ring (docs/cluster.md,
    /// "The join's place in the stream"). The answer never comes too late: it is handled
    /// before the supervisor reads anything Redis published after the snapshot.
    fn place_join_answer(&self, held: Held) {
        let reached = match held.position {
            None => true,
            Some((incarnation, sequence)) => {
                let home = self.cluster_handle().home.borrow();
                home.script_seen.get(&(held.app, held.bucket)).is_some_and(|&(i, s)| i == incarnation && s >= sequence)
            }
        };
        if reached {
            return self.apply(vec![HomeEffect::Reply { to: held.to, reply: held.reply }]);
        }
        self.cluster_handle().home.borrow_mut().held.push(held);
    }

    /// The bucket shard delivered a script message (or learned the script sender's number at
    /// a barrier): join answers waiting for that place go out now.
    /// A script's message (any kind: member events and the watchlist's online/offline share
    /// the script sender's stream) is about to be delivered: a join answer whose member list
    /// is older than it goes out first, so that its connection, routed before the delivery,
    /// gets this message (otherwise the answer would wait for a later member event and the
    /// connection would miss this one).
    pub(super) fn script_message_arriving(&self, bucket: BucketId, sender: Sender, sequence: u64) {
        if sender.shard != SCRIPT_SHARD {
            return;
        }
        let released = {
            let mut home = self.cluster_handle().home.borrow_mut();
            let older = |h: &Held| {
                h.app == bucket.app
                    && h.bucket == bucket.number
                    && h.position.is_some_and(|(i, s)| i == sender.incarnation && s < sequence)
            };
            take_matching(&mut home.held, older)
        };
        self.release(released);
    }

    /// A script's message was delivered: join answers whose member list already reflects it
    /// go out now (their connections must not get it again).
    pub(super) fn script_message_seen(&self, bucket: BucketId, sender: Sender, sequence: u64) {
        if sender.shard != SCRIPT_SHARD {
            return;
        }
        let released = {
            let mut home = self.cluster_handle().home.borrow_mut();
            home.script_seen.insert((bucket.app, bucket.number), (sender.incarnation, sequence));
            let waiting = |h: &Held| {
                h.app == bucket.app
                    && h.bucket == bucket.number
                    && h.position.is_some_and(|(i, s)| i == sender.incarnation && s <= sequence)
            };
            take_matching(&mut home.held, waiting)
        };
        self.release(released);
    }

    /// Join answers waiting in `bucket` (or in every bucket) go out now: after a gap (the
    /// bucket's connections are being closed with 4200) or a barrier (which passed every
    /// message published before it, or found a gap).
    pub(super) fn release_held_joins(&self, bucket: Option<BucketId>) {
        let released = {
            let mut home = self.cluster_handle().home.borrow_mut();
            take_matching(&mut home.held, |h| bucket.is_none_or(|b| h.app == b.app && h.bucket == b.number))
        };
        self.release(released);
    }

    fn release(&self, released: Vec<Held>) {
        for held in released {
            self.apply(vec![HomeEffect::Reply { to: held.to, reply: held.reply }]);
        }
    }

    /// Creates a lifecycle webhook at once: for a transition Redis decided, or a cache miss
    /// (not through `apply`, which sends node-level occupancy changes to Redis).
    fn decided(&self, app: AppIndex, channel: impl AsRef<str>, kind: LifecycleKind) {
        self.lifecycle(app, || kind.event(channel.as_ref()));
    }

    /// Takes back this node's count of a join that was not accepted, and refuses it. Another
    /// connection of the same user may have been counted meanwhile: its own script (queued
    /// after this one) decides for it, so nothing else is undone here.
    fn refuse_join(&self, join: HomeJoin, frames: Vec<Bytes>, reconnect: bool) {
        let (user_id, _) = join.member.as_ref().expect("a presence join");
        self.state.borrow_mut().home.presence.leave(join.app, &join.channel, user_id);
        let HomeJoin { from, conn, socket_id, ticket, channel, .. } = join;
        let reply = JoinReply { conn, socket_id, ticket, channel, frames, accepted: false, reconnect };
        self.apply(vec![HomeEffect::Reply { to: from, reply }]);
    }

    /// A cache channel's frames after subscription_succeeded: its last event, or cache_miss
    /// (kept per node in this slice: docs/cluster.md).
    fn cache_frames(&self, app: AppIndex, channel: &str) -> Vec<Bytes> {
        match self.cached(app, channel) {
            Some((frame, _, _)) => vec![frame],
            None => {
                let kind = LifecycleKind::CacheMiss;
                self.decided(app, channel, kind);
                vec![message::cache_miss(channel)]
            }
        }
    }

    /// Home shard, cluster mode: one connection of a member left; the member's last
    /// connection on this node runs `presence_leave` — at once, or with `debounce` after the
    /// window, unless the user joins again on this node meanwhile. Until then Redis still
    /// counts the user on this node, so a rejoin on another node is no new member either.
    pub(super) fn cluster_presence_leave(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>, debounce: bool) {
        let left = if debounce {
            self.state.borrow_mut().home.presence.leave_later(app, &channel, &user_id)
        } else if self.state.borrow_mut().home.presence.leave(app, &channel, &user_id) {
            Left::Removed
        } else {
            Left::Stayed
        };
        match left {
            Left::Stayed => {}
            Left::Later(ticket) => self.apply(vec![HomeEffect::LeaveLater { app, channel, user_id, ticket }]),
            Left::Removed => self.cluster_member_gone(app, channel, user_id),
        }
    }

    /// Home shard, cluster mode: a member's debounce window ended; if it did not come back on
    /// this node, its `presence_leave` runs now.
    pub(super) fn cluster_presence_leave_due(
        &self,
        app: AppIndex,
        channel: Box<str>,
        user_id: Box<str>,
        ticket: LeaveTicket,
    ) {
        if self.state.borrow_mut().home.presence.leave_due(app, &channel, &user_id, ticket) {
            self.cluster_member_gone(app, channel, user_id);
        }
    }

    /// The member's last connection on this node is gone: `presence_leave`, then the
    /// channel's `vacate` if it waited for this leave (queued after it, so Redis runs them in
    /// that order).
    fn cluster_member_gone(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>) {
        self.run_presence_leave(app, channel.clone(), user_id);
        let vacate = self.state.borrow_mut().home.vacate_after_leaves(app, channel);
        self.apply(vacate.into_iter().collect());
    }

    fn run_presence_leave(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>) {
        let cluster = self.cluster_handle();
        let keys = self.channel_keys(app, &channel);
        let member = Member { node: &cluster.node, keys: &keys, channel: &channel, user_id: &user_id };
        let frame = message::member_removed(&channel, &user_id);
        let node_name = scripts::node_name(&cluster.node);
        let command = scripts::presence_leave(&member, &node_name, &frame, &mut cluster.home.borrow_mut().rng);
        let retry = Retry::Leave(app, channel.clone(), user_id.clone());
        let Ok(pending) = cluster.commands.request(vec![command]) else {
            return cluster.home.borrow_mut().retry(retry);
        };
        self.spawn_task(|shard| async move {
            match pending.replies().await.as_deref().map(|r| r.first().and_then(integer)) {
                Ok(Some(1)) => {
                    let kind = LifecycleKind::MemberRemoved(user_id);
                    shard.decided(app, channel, kind);
                }
                Ok(Some(_)) => {}
                _ => shard.cluster_handle().home.borrow_mut().retry(retry),
            }
        });
    }

    // ---- occupancy and subscription counts ----------------------------------------------

    /// Home shard, cluster mode: the channel's first subscriber on this node arrived
    /// (`occupied`) or its last left: `occupy` / `vacate`, and `channel_occupied` /
    /// `channel_vacated` if that made the channel so cluster-wide.
    pub(super) fn cluster_occupancy(&self, app: AppIndex, channel: Box<str>, occupied: bool) {
        let cluster = self.cluster_handle();
        let keys = self.channel_keys(app, &channel);
        let node_name = scripts::node_name(&cluster.node);
        let commands = if occupied {
            scripts::occupy(&keys, &node_name, &channel)
        } else {
            vec![scripts::vacate(&keys, &node_name, &channel)]
        };
        let retry = Retry::Occupancy(app, channel.clone());
        let Ok(pending) = cluster.commands.request(commands) else {
            return cluster.home.borrow_mut().retry(retry);
        };
        self.spawn_task(|shard| async move {
            match pending.replies().await.as_deref().map(|r| r.last().and_then(integer)) {
                Ok(Some(1)) => {
                    let kind = if occupied { LifecycleKind::Occupied } else { LifecycleKind::Vacated };
                    shard.decided(app, channel, kind);
                }
                Ok(Some(_)) => {}
                _ => shard.cluster_handle().home.borrow_mut().retry(retry),
            }
        });
    }

    /// Once a second (the ticker): writes this node's changed counts to `{k}:subs` and, for
    /// apps with `subscription_count`, publishes the cluster-wide sum through the bucket.
    pub(super) fn cluster_announce_counts(&self) {
        let changed = self.state.borrow_mut().home.take_subscription_counts();
        let cluster = self.cluster_handle();
        let node_name = scripts::node_name(&cluster.node);
        for (app, channel, count) in changed {
            let keys = self.channel_keys(app, &channel);
            let Ok(pending) = cluster.commands.request(vec![scripts::subscribers(&keys, &node_name, count)]) else {
                continue;
            };
            let apps = self.apps();
            // subscription_count is never sent for presence channels (as on a single node).
            let announce =
                apps.get(app).config.subscription_count_enabled && ChannelKind::of(&channel) != ChannelKind::Presence;
            self.spawn_task(|shard| async move {
                let Ok(Some(sum)) = pending.replies().await.as_deref().map(|r| r.first().and_then(integer)) else {
                    return;
                };
                if !announce || sum <= 0 {
                    return;
                }
                let sum = sum as u64;
                let frame = message::subscription_count(&channel, sum);
                let cluster = shard.cluster_handle();
                if let Ok(sent) = cluster.outbound.send(Kind::SubscriptionCount, app, &channel, frame, None) {
                    // A count that was not published is superseded by the next one.
                    let _ = sent.outcome().await;
                }
                let kind = LifecycleKind::SubscriptionCount(sum);
                shard.decided(app, channel, kind);
            });
        }
    }

    // ---- queries --------------------------------------------------------------------------

    /// `GET /channels/{name}` from Redis: occupancy, summed subscriber counts, members.
    pub async fn cluster_channel(&self, app_id: &str, name: &str) -> Result<ChannelCounts, Unavailable> {
        let cluster = self.cluster().ok_or(Unavailable)?;
        let keys = ChannelKeys::new(&cluster.prefix, app_id, name, cluster.buckets);
        let replies = self
            .cluster_request(vec![
                vec![b"SCARD".to_vec(), keys.occupiers().into_bytes()],
                vec![b"HVALS".to_vec(), keys.subscribers().into_bytes()],
                vec![b"HLEN".to_vec(), keys.members().into_bytes()],
            ])
            .await?;
        let occupied = replies.first().and_then(integer).ok_or(Unavailable)? > 0;
        let subscription_count = sum_of(replies.get(1).ok_or(Unavailable)?).ok_or(Unavailable)?;
        let user_count = replies.get(2).and_then(integer).ok_or(Unavailable)? as u64;
        Ok(ChannelCounts { occupied, subscription_count, user_count })
    }

    /// `GET /channels` from Redis: the occupied channels whose names start with `prefix`,
    /// in name order, with their counts.
    pub async fn cluster_channels(
        &self,
        app_id: &str,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelCounts)>, Unavailable> {
        let cluster = self.cluster().ok_or(Unavailable)?;
        let occupied = scripts::occupied(&cluster.prefix, app_id);
        let replies = self.cluster_request(vec![vec![b"SMEMBERS".to_vec(), occupied.into_bytes()]]).await?;
        let names = replies.first().and_then(strings).ok_or(Unavailable)?;
        let mut names: Vec<String> = names
            .into_iter()
            .filter_map(|n| std::str::from_utf8(n).ok())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect();
        names.sort();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        // One request per group of channels, all queued before the first is awaited (so they
        // still share pipelines): one request for every channel would overflow
        // `cluster.pipeline_bytes_max` past a few thousand occupied channels and be refused.
        let mut pending = Vec::new();
        for group in names.chunks(CHANNELS_PER_REQUEST) {
            let mut commands = Vec::with_capacity(group.len() * 2);
            for name in group {
                let keys = ChannelKeys::new(&cluster.prefix, app_id, name, cluster.buckets);
                commands.push(vec![b"HVALS".to_vec(), keys.subscribers().into_bytes()]);
                commands.push(vec![b"HLEN".to_vec(), keys.members().into_bytes()]);
            }
            pending.push(cluster.commands.request(commands)?);
        }
        let mut replies = Vec::with_capacity(names.len() * 2);
        for group in pending {
            replies.extend(group.replies().await?);
        }
        let mut channels = Vec::with_capacity(names.len());
        for (name, pair) in names.into_iter().zip(replies.chunks_exact(2)) {
            let subscription_count = sum_of(&pair[0]).ok_or(Unavailable)?;
            let user_count = integer(&pair[1]).ok_or(Unavailable)? as u64;
            channels.push((name, ChannelCounts { occupied: true, subscription_count, user_count }));
        }
        Ok(channels)
    }

    /// `GET /channels/{name}/users` from Redis.
    pub async fn cluster_users(&self, app_id: &str, name: &str) -> Result<Vec<Box<str>>, Unavailable> {
        let cluster = self.cluster().ok_or(Unavailable)?;
        let keys = ChannelKeys::new(&cluster.prefix, app_id, name, cluster.buckets);
        let replies = self.cluster_request(vec![vec![b"HKEYS".to_vec(), keys.members().into_bytes()]]).await?;
        let ids = replies.first().and_then(strings).ok_or(Unavailable)?;
        Ok(ids.into_iter().filter_map(|id| std::str::from_utf8(id).ok()).map(Box::from).collect())
    }

    // ---- lease and reaper -----------------------------------------------------------------

    /// Shutdown, after the connections' leaves reached their home shards: waits (until
    /// `deadline`) until Redis ran every script this shard queued, so the lifecycle webhooks
    /// they decide are created before the WAL commit; shard 0 also ends the node's lease, so
    /// another node reaps whatever is left at once instead of after `lease_ms`.
    pub(super) async fn cluster_shutdown(&self, deadline: std::time::Instant) {
        let cluster = self.cluster_handle();
        let mut commands = vec![vec![b"PING".to_vec()]];
        if self.index == 0 {
            let (nodes, _) = scripts::leases(&cluster.prefix);
            let node = scripts::node_name(&cluster.node).into_bytes();
            commands.push(vec![b"ZADD".to_vec(), nodes.into_bytes(), b"XX".to_vec(), b"0".to_vec(), node]);
        }
        let Ok(pending) = cluster.commands.request(commands) else { return };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if monoio::time::timeout(left, pending.replies()).await.is_err() {
            tracing::warn!(shard = self.index, "scripts still in flight at exit; the lease covers them");
        }
        // The tasks handling earlier replies were woken before this one: let them run.
        super::yield_back().await;
    }

    /// Shard 0: registers this node's lease as soon as the link is up, renews it every
    /// `lease_ms / 3`, and each time claims and reaps one dead node, if any.
    async fn lease_loop(self: Rc<Self>) {
        let lease_ms = self.config().cluster.lease_ms;
        let period = Duration::from_millis(lease_ms / 3);
        let mut registered = false;
        loop {
            monoio::time::sleep(if registered { period } else { Duration::from_millis(10) }).await;
            let cluster = self.cluster_handle();
            if !cluster.commands.is_up() {
                continue;
            }
            let node_name = scripts::node_name(&cluster.node);
            let lease = scripts::lease(&cluster.prefix, &cluster.node, lease_ms, !registered);
            let claim = scripts::claim_dead(&cluster.prefix, lease_ms);
            let Ok(replies) = self.cluster_request(vec![lease, claim]).await else { continue };
            match replies.first().and_then(integer) {
                Some(1) => registered = true,
                Some(-1) => {
                    // docs/cluster.md, "When Redis is unreachable": cut off longer than
                    // lease_ms, its members were removed cluster-wide by a reaper, so its
                    // clients must not go on believing otherwise: every subscribed connection
                    // is closed with 4200 (pusher-js reconnects and joins again), which also
                    // empties this node's channel state. It registered again above.
                    tracing::error!(
                        node = node_name,
                        "this node's lease had expired and it was reaped: closing its connections with 4200"
                    );
                    self.close_every_bucket();
                }
                _ => tracing::warn!(node = node_name, reply = ?replies.first(), "lease script failed"),
            }
            if let Some(Reply::BulkString(dead)) = replies.get(1) {
                let dead = String::from_utf8_lossy(dead).into_owned();
                tracing::info!(reaper = node_name, dead, "reaping a node whose lease expired");
                if self.reap(&dead).await.is_err() {
                    tracing::warn!(dead, "reaping stopped by the link; the next claim continues");
                }
            }
        }
    }

    /// Closes every subscribed connection of every shard with 4200, bucket by bucket.
    fn close_every_bucket(&self) {
        let buckets = self.cluster_handle().buckets;
        let apps = self.apps();
        for app in apps.list.iter().filter(|a| !a.removed) {
            for number in 0..buckets {
                self.bucket_gap(app.index, number);
            }
        }
    }

    /// Takes back every contribution of the dead node `dead`: its members leave (each
    /// `member_removed` once, through the scripts), its channels are vacated, its keys deleted.
    async fn reap(&self, dead: &str) -> Result<(), Unavailable> {
        let cluster = self.cluster_handle();
        let (prefix, buckets) = (cluster.prefix.clone(), cluster.buckets);
        let entries_key = scripts::node_entries(&prefix, dead);
        let replies = self.cluster_request(vec![vec![b"SMEMBERS".to_vec(), entries_key.clone().into_bytes()]]).await?;
        let entries: Vec<(String, String)> = strings(replies.first().ok_or(Unavailable)?)
            .ok_or(Unavailable)?
            .into_iter()
            .filter_map(scripts::parse_entry)
            .map(|(app, channel)| (app.to_string(), channel.to_string()))
            .collect();
        for (app_id, channel) in entries {
            // Redis is shared: what it holds is checked like a message before it is used.
            let app_id_fits = (1..=crate::cluster::message::APP_ID_BYTES_MAX).contains(&app_id.len());
            if channel::validate(&channel).is_err() || !app_id_fits {
                tracing::warn!(dead, app_id, channel, "a dead node's entry names no valid app and channel; skipped");
                let entry = format!("{app_id}\n{channel}").into_bytes();
                self.cluster_request(vec![vec![b"SREM".to_vec(), entries_key.clone().into_bytes(), entry]]).await?;
                continue;
            }
            let keys = ChannelKeys::new(&prefix, &app_id, &channel, buckets);
            let app = self.apps().by_id(&app_id).map(|a| a.index);
            if ChannelKind::of(&channel) == ChannelKind::Presence {
                self.reap_members(dead, &keys, &channel, app).await?;
            }
            let node_users = keys.node_users(dead).into_bytes();
            let replies = self
                .cluster_request(vec![
                    scripts::vacate(&keys, dead, &channel),
                    vec![b"DEL".to_vec(), node_users],
                    vec![b"SREM".to_vec(), entries_key.clone().into_bytes(), keys.entry.clone().into_bytes()],
                ])
                .await?;
            if let (Some(1), Some(app)) = (replies.first().and_then(integer), app) {
                self.decided(app, channel, LifecycleKind::Vacated);
            }
        }
        self.reap_online(dead).await?;
        let (_, reaping) = scripts::leases(&prefix);
        self.cluster_request(vec![
            vec![b"DEL".to_vec(), entries_key.into_bytes()],
            vec![b"ZREM".to_vec(), reaping.into_bytes(), dead.as_bytes().to_vec()],
        ])
        .await?;
        Ok(())
    }

    async fn reap_members(
        &self,
        dead: &str,
        keys: &ChannelKeys,
        channel: &str,
        app: Option<AppIndex>,
    ) -> Result<(), Unavailable> {
        let cluster = self.cluster_handle();
        let replies =
            self.cluster_request(vec![vec![b"SMEMBERS".to_vec(), keys.node_users(dead).into_bytes()]]).await?;
        let users: Vec<String> = strings(replies.first().ok_or(Unavailable)?)
            .ok_or(Unavailable)?
            .into_iter()
            .filter_map(|u| std::str::from_utf8(u).ok())
            .filter(|u| !u.is_empty() && u.len() <= crate::pusher::message::USER_ID_BYTES_MAX)
            .map(str::to_string)
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        // In groups: a dead node's members of one channel can be many thousands, and one
        // request over `cluster.pipeline_bytes_max` would be refused whole.
        for group in users.chunks(REAP_MEMBERS_GROUP) {
            let commands = group
                .iter()
                .map(|user_id| {
                    let member = Member { node: &cluster.node, keys, channel, user_id };
                    let frame = message::member_removed(channel, user_id);
                    scripts::presence_leave(&member, dead, &frame, &mut cluster.home.borrow_mut().rng)
                })
                .collect();
            let replies = self.cluster_request(commands).await?;
            for (user_id, reply) in group.iter().zip(&replies) {
                if let (Some(1), Some(app)) = (integer(reply), app) {
                    let kind = LifecycleKind::MemberRemoved(user_id.as_str().into());
                    self.decided(app, channel, kind);
                }
            }
        }
        Ok(())
    }
}

/// Channels counted per request of `GET /channels`: two commands each, keys of at most a
/// few hundred bytes, so a group stays well under the smallest `cluster.pipeline_bytes_max`
/// (64 KiB).
const CHANNELS_PER_REQUEST: usize = 64;

/// Members of one channel a reaper removes per request: each `presence_leave` call carries its
/// frame and keys (about 1.2 KB), so 64 stay far below any sane `cluster.pipeline_bytes_max`.
const REAP_MEMBERS_GROUP: usize = 64;

/// Why a presence subscribe is refused with 4200 while Redis cannot decide it.
pub(super) const PRESENCE_UNAVAILABLE: &str = "presence unavailable while the cluster link is down, reconnect";

/// The `pusher:error` a presence join gets when Redis answered it with something unexpected.
fn unavailable_frame(channel: &str) -> Bytes {
    message::error(None, "presence unavailable: cluster unavailable, retry", Some(channel))
}

/// The sum of an `HVALS` reply of counts; `None` if it is not a list of numbers.
fn sum_of(reply: &Reply) -> Option<u64> {
    let values = strings(reply)?;
    values.into_iter().try_fold(0u64, |sum, value| {
        let value: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
        sum.checked_add(value)
    })
}
