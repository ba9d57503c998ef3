//! The shard's side of home state: every join, leave, count delta, sign-in and watch goes to
//! the home shard of its channel or user (`presence::home`) through the mesh, or, when that is
//! this shard, into its own `HomeState`, whose effects are executed here. Also the joining
//! side: the reply to a join subscribes the connection (`joined`).
//!
//! This is the seam a cluster-wide home authority would replace: it decides where a home
//! question is answered and what is done with the answer, never the answer itself.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::home::{Answered, HomeEffect, JoinTicket, LifecycleKind};
use super::mesh::{HomeJoin, JoinReply, MeshMessage, Watcher};
use super::presence;
use super::presence::LeaveTicket;
use super::Shard;
use crate::apps::AppIndex;
use crate::cluster::bucket;
use crate::metrics::ShardMetrics;
use crate::pusher::channel::ChannelKind;

impl Shard {
    /// Executes home effects in order. Call with no state borrowed: effects reach connections
    /// on this shard.
    pub(super) fn apply(&self, effects: Vec<HomeEffect>) {
        for effect in effects {
            match effect {
                // Cluster mode: a node-level change of occupancy goes to Redis, which decides
                // whether it is one cluster-wide (`shard::cluster_home`).
                HomeEffect::Lifecycle {
                    app,
                    channel,
                    kind: kind @ (LifecycleKind::Occupied | LifecycleKind::Vacated),
                } if self.cluster().is_some() => {
                    self.cluster_occupancy(app, channel, kind == LifecycleKind::Occupied);
                }
                HomeEffect::Broadcast { app, channel, frame, exclude } => self.broadcast(app, &channel, frame, exclude),
                HomeEffect::SendTo { watcher, frame } => self.send_to(watcher, frame),
                HomeEffect::Lifecycle { app, channel, kind } => {
                    self.lifecycle(app, || kind.event(&channel));
                }
                HomeEffect::LeaveLater { app, channel, user_id, ticket } => {
                    self.presence_leave_later(app, channel, user_id, ticket)
                }
                HomeEffect::Reply { to, reply } if to == self.index => self.joined(reply),
                HomeEffect::Reply { to, reply } => self.mesh_send(to, MeshMessage::Joined(Box::new(reply))),
            }
        }
    }

    // ---- users -------------------------------------------------------------------------

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
        if self.cluster().is_some() {
            return self.cluster_user_presence(app, user_id, online);
        }
        let effects = self.state.borrow_mut().home.user_presence(app, user_id, online);
        self.apply(effects);
    }

    /// Starts or stops watching a user, on the user's home shard; a new watcher of a user who
    /// is online is told so at once.
    pub fn watch(&self, app: AppIndex, user_id: Box<str>, watcher: Watcher, watch: bool) {
        let home = presence::home(app, &user_home_key(&user_id), self.mesh.shards());
        if home != self.index {
            return self.mesh_send(home, MeshMessage::Watch { app, user_id, watcher, watch });
        }
        if self.cluster().is_some() {
            return self.cluster_watch(app, user_id, watcher, watch);
        }
        let effects = self.state.borrow_mut().home.watch(app, user_id, watcher, watch);
        self.apply(effects);
    }

    /// Sends a frame to one connection on any shard.
    pub(super) fn send_to(&self, watcher: Watcher, frame: Bytes) {
        if watcher.shard != self.index {
            return self.mesh_send(watcher.shard, MeshMessage::SendTo { watcher, frame });
        }
        let matches =
            self.state.borrow().connections.get(watcher.conn).is_some_and(|c| c.socket_id == watcher.socket_id);
        if matches {
            self.send(watcher.conn, frame);
        }
    }

    // ---- presence and cache joins ------------------------------------------------------

    /// Sends a join to the channel's home shard (or handles it here).
    pub fn home_join(&self, join: HomeJoin) {
        let home = self.channel_home(join.app, &join.channel);
        if home == self.index {
            self.home_join_at_home(join);
        } else {
            self.mesh_send(home, MeshMessage::HomeJoin(Box::new(join)));
        }
    }

    /// Home shard: counts a presence member (announcing a new one), looks up the cached event,
    /// and answers the joining shard with the frames for the connection.
    pub(super) fn home_join_at_home(&self, join: HomeJoin) {
        // Cluster mode: a cache channel this node holds no event for may have one in Redis;
        // the join goes on once it is read.
        if join.cache && self.cluster().is_some() && self.cached(join.app, &join.channel).is_none() {
            return self.cache_join_from_redis(join);
        }
        self.home_join_cached(join);
    }

    /// Home shard: goes on with a join once its channel's cached event (if any) is here: a
    /// presence join in cluster mode through Redis's member list (`shard::cluster_home`), any
    /// other from this shard's home state.
    pub(super) fn home_join_cached(&self, join: HomeJoin) {
        if self.cluster().is_some() && join.member.is_some() {
            return self.cluster_presence_join(join);
        }
        self.home_join_answer(join);
    }

    /// Home shard: answers a join from this shard's home state.
    pub(super) fn home_join_answer(&self, join: HomeJoin) {
        let members_max = self.apps().get(join.app).config.presence_members_max;
        let effects = self.state.borrow_mut().home.join(join, members_max, Instant::now());
        self.apply(effects);
    }

    /// Joining shard: the home shard's answer arrived. The connection is subscribed only now,
    /// so it receives exactly the events that follow its member list and cached event.
    ///
    /// Only the reply to the connection's pending join for the channel counts: a reply whose
    /// ticket is not pending answers a join the client has unsubscribed from since (its leave
    /// is already on its way), even when the client has subscribed again meanwhile. So the
    /// router, the connection's channels and the home shard's count always change together.
    pub(super) fn joined(&self, reply: JoinReply) {
        let JoinReply { conn: key, socket_id, ticket, channel, frames, accepted, reconnect } = reply;
        let answered = self.state.borrow_mut().joins.answered(ticket, accepted);
        match answered {
            Answered::Wanted => {}
            Answered::Dropped => return,
            Answered::Undo((app, channel, user_id)) => return self.presence_leave(app, channel, user_id),
        }
        let routed_app = {
            let mut state = self.state.borrow_mut();
            let state = &mut *state;
            let Some(conn) = state.connections.get_mut(key) else { return };
            if conn.socket_id != socket_id {
                return;
            }
            let Some(pending) = conn.joins.iter().position(|(c, t)| *t == ticket && **c == *channel) else {
                return;
            };
            conn.joins.swap_remove(pending);
            let app = conn.app;
            if !accepted {
                conn.channels.retain(|c| *c != channel);
                conn.presence.retain(|(c, _)| *c != channel);
                ShardMetrics::sub(&self.metrics().subscriptions, 1);
            }
            let queue_max = self.write_queue_max();
            for frame in &frames {
                self.enqueue(conn, frame, state.now_s, queue_max);
            }
            // A pending join is never in the router yet (subscribe refuses a channel the
            // connection already has), so a false here would be a bookkeeping bug.
            let routed = accepted && state.router.subscribe(app, &channel, key);
            debug_assert!(routed || !accepted, "a pending join was already routed");
            routed.then_some(app)
        };
        // After the borrow: the count may be kept on this very shard.
        if let Some(app) = routed_app {
            self.subscription_changed(app, &channel, 1);
        }
        if reconnect {
            let reason = super::cluster_home::PRESENCE_UNAVAILABLE;
            self.refuse(key, super::cluster_link::MISSED_MESSAGES, reason);
        }
    }

    /// A presence subscription ends: the member leaves now, or, while its join (`pending`,
    /// a ticket) still waits for the home shard, once the reply says the join was counted.
    pub(super) fn presence_leave_after(
        &self,
        pending: Option<JoinTicket>,
        app: AppIndex,
        channel: Box<str>,
        user_id: Box<str>,
    ) {
        match pending {
            Some(ticket) => self.state.borrow_mut().joins.cancel(ticket, (app, channel, user_id)),
            None => self.presence_leave(app, channel, user_id),
        }
    }

    /// Sends a presence leave to the channel's home shard (or handles it here).
    pub fn presence_leave(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>) {
        let home = self.channel_home(app, &channel);
        if home != self.index {
            return self.mesh_send(home, MeshMessage::PresenceLeave { app, channel, user_id });
        }
        let debounce = self.apps().get(app).config.presence_debounce_ms > 0;
        if self.cluster().is_some() {
            return self.cluster_presence_leave(app, channel, user_id, debounce);
        }
        let effects = self.state.borrow_mut().home.presence_leave(app, channel, user_id, debounce);
        self.apply(effects);
    }

    /// Home shard: a member's last connection left; after the app's `presence_debounce_ms`
    /// (read now, so a reload applies to the next leave) the member is removed unless it came
    /// back (docs/cluster.md, "Presence debounce").
    fn presence_leave_later(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>, ticket: LeaveTicket) {
        let window = Duration::from_millis(self.apps().get(app).config.presence_debounce_ms);
        // Only a shard whose background tasks run (every serving shard) has timers.
        debug_assert!(self.me.get().is_some(), "a debounced leave on a shard without spawn_background");
        let Some(shard) = self.me.get().cloned() else { return };
        monoio::spawn(async move {
            monoio::time::sleep(window).await;
            if let Some(shard) = shard.upgrade() {
                shard.presence_leave_due(app, channel, user_id, ticket);
            }
        });
    }

    /// Home shard: a member's debounce window ended; removes it unless it came back.
    fn presence_leave_due(&self, app: AppIndex, channel: Box<str>, user_id: Box<str>, ticket: LeaveTicket) {
        if self.cluster().is_some() {
            return self.cluster_presence_leave_due(app, channel, user_id, ticket);
        }
        let effects = self.state.borrow_mut().home.presence_leave_due(app, channel, user_id, ticket);
        self.apply(effects);
    }

    /// Shutdown: every member still waiting out its debounce is removed at once.
    pub(super) fn presence_leave_all_now(&self) {
        let leaving = self.state.borrow().home.presence.leaving();
        for (app, channel, user_id, ticket) in leaving {
            self.presence_leave_due(app, channel, user_id, ticket);
        }
    }

    // ---- subscription_count ------------------------------------------------------------

    /// Tells the channel's home shard that its subscriber count changed here, for apps that
    /// count subscriptions (`subscription_count`, or lifecycle webhooks: the home shard is the
    /// one place that knows when a channel becomes occupied or vacated).
    pub fn subscription_changed(&self, app: AppIndex, channel: &str, delta: i32) {
        let apps = self.apps();
        let config = apps.get(app);
        // In cluster mode every channel is counted: occupancy and counts are queried from Redis.
        let cluster = self.cluster().is_some();
        if !config.counts_subscriptions && !cluster {
            return;
        }
        let home = self.channel_home(app, channel);
        if home != self.index {
            return self.mesh_send(home, MeshMessage::SubscriptionDelta { app, channel: channel.into(), delta });
        }
        // subscription_count is never sent for presence channels, whose members are counted
        // by the presence protocol itself.
        let announce =
            cluster || config.config.subscription_count_enabled && ChannelKind::of(channel) != ChannelKind::Presence;
        let effects = self.state.borrow_mut().home.count_subscriptions(app, channel, delta, announce);
        self.apply(effects);
    }

    /// Announces the counts that changed since the last tick (the throttle: once a second).
    pub(super) fn announce_subscription_counts(&self) {
        if self.cluster().is_some() {
            return self.cluster_announce_counts();
        }
        let effects = self.state.borrow_mut().home.announce_subscription_counts();
        self.apply(effects);
    }

    // ---- cache channels ----------------------------------------------------------------

    /// Keeps `frame` as the last event of a cache channel, on its home shard.
    pub fn cache_store(&self, app: AppIndex, channel: &str, frame: Bytes, data: &str) {
        let home = self.channel_home(app, channel);
        if home == self.index {
            // Cluster mode: an app another shard serves already and this one not yet (a reload
            // in progress) is not kept here; a later join, finding nothing, reads Redis.
            let Some(ttl_s) = self.apps().list.get(app as usize).map(|a| a.config.cache_ttl_s) else { return };
            let expires = Instant::now() + Duration::from_secs(ttl_s);
            self.state.borrow_mut().home.cache_store(app, channel, frame, data, expires);
        } else {
            self.mesh_send(home, MeshMessage::CacheStore { app, channel: channel.into(), frame, data: data.into() });
        }
    }

    /// The live cached event of a channel this shard is home for: (frame, data, seconds left).
    pub(super) fn cached(&self, app: AppIndex, channel: &str) -> Option<(Bytes, Box<str>, u64)> {
        self.state.borrow_mut().home.cached(app, channel, Instant::now())
    }

    /// Drops expired cache events, a bounded slice per call (see `HomeState::sweep_cache`).
    pub(super) fn sweep_cache(&self, now: Instant) {
        self.state.borrow_mut().home.sweep_cache(now);
    }
}

impl Shard {
    /// The home shard of a channel: `presence::home`, except in cluster mode, where it is the
    /// shard that receives the channel's bucket from Redis, so that a presence join's answer
    /// can be placed in the bucket's stream (`shard::cluster_home`).
    fn channel_home(&self, app: AppIndex, channel: &str) -> usize {
        match self.cluster() {
            Some(cluster) => usize::from(bucket::of_channel(channel, cluster.buckets)) % self.mesh.shards(),
            None => presence::home(app, channel, self.mesh.shards()),
        }
    }
}

/// What a user's home shard is computed from (distinct from any channel name).
pub(super) fn user_home_key(user_id: &str) -> String {
    format!("#user:{user_id}")
}
