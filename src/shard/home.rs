//! Channel-wide and user-wide state, kept on one "home" shard per channel or user:
//! presence members, cache channels' last events, subscription counts, users' online
//! counts and their watchers. `presence::home(app, name)` picks the shard; every other shard
//! sends it joins, leaves and deltas through the mesh, so each of these questions has exactly
//! one authoritative answer and each resulting event is sent once.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::mesh::{HomeJoin, JoinReply, MeshMessage, Watcher};
use super::presence::{self, Joined};
use super::router::ConnKey;
use super::{CachedEvent, Shard};
use crate::apps::AppIndex;
use crate::metrics::ShardMetrics;
use crate::pusher::channel::ChannelKind;
use crate::pusher::message;
use crate::webhook::event::LifecycleEvent;

impl Shard {
    // ---- users -------------------------------------------------------------------------

    /// Closes every connection of a signed-in user, on every shard, with 4009.
    pub fn terminate_user(&self, app: AppIndex, user_id: &str) {
        self.terminate_user_locally(app, user_id);
        for target in (0..self.mesh.shards()).filter(|&t| t != self.index) {
            self.mesh_send(target, MeshMessage::TerminateUser { app, user_id: user_id.into() });
        }
    }

    pub(super) fn terminate_user_locally(&self, app: AppIndex, user_id: &str) {
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
    pub(super) fn home_join_at_home(&self, join: HomeJoin) {
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
                        self.lifecycle(join.app, || LifecycleEvent::member(&join.channel, user_id, true));
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
                None => {
                    frames.push(message::cache_miss(&join.channel));
                    self.lifecycle(join.app, || LifecycleEvent::cache_miss(&join.channel));
                }
            }
        }
        let reply = JoinReply {
            conn: join.conn,
            socket_id: join.socket_id,
            ticket: join.ticket,
            channel: join.channel,
            frames,
            accepted,
        };
        if join.from == self.index {
            self.joined(reply);
        } else {
            self.mesh_send(join.from, MeshMessage::Joined(Box::new(reply)));
        }
    }

    /// Joining shard: the home shard's answer arrived. The connection is subscribed only now,
    /// so it receives exactly the events that follow its member list and cached event.
    ///
    /// Only the reply to the connection's pending join for the channel counts: a reply whose
    /// ticket is not pending answers a join the client has unsubscribed from since (its leave
    /// is already on its way), even when the client has subscribed again meanwhile. So the
    /// router, the connection's channels and the home shard's count always change together.
    pub(super) fn joined(&self, reply: JoinReply) {
        let JoinReply { conn: key, socket_id, ticket, channel, frames, accepted } = reply;
        let cancelled = self.state.borrow_mut().cancelled_joins.remove(&ticket);
        if let Some((app, channel, user_id)) = cancelled {
            if accepted {
                self.presence_leave(app, channel, user_id);
            }
            return;
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
            for frame in &frames {
                self.enqueue(conn, frame, state.now_s);
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
    }

    // ---- subscription_count ------------------------------------------------------------

    /// Tells the channel's home shard that its subscriber count changed here, for apps that
    /// count subscriptions (`subscription_count`, or lifecycle webhooks: the home shard is the
    /// one place that knows when a channel becomes occupied or vacated).
    pub fn subscription_changed(&self, app: AppIndex, channel: &str, delta: i32) {
        let config = self.apps.get(app);
        if !config.counts_subscriptions {
            return;
        }
        let home = presence::home(app, channel, self.mesh.shards());
        if home != self.index {
            return self.mesh_send(home, MeshMessage::SubscriptionDelta { app, channel: channel.into(), delta });
        }
        // subscription_count is never sent for presence channels (reference §1.3).
        let announce = config.config.subscription_count_enabled && ChannelKind::of(channel) != ChannelKind::Presence;
        let (before, after) = {
            let mut state = self.state.borrow_mut();
            let key = (app, Box::<str>::from(channel));
            let count = state.subscription_counts.entry(key.clone()).or_default();
            let before = *count;
            *count += i64::from(delta);
            let after = *count;
            if after <= 0 && !announce {
                state.subscription_counts.remove(&key);
            }
            if announce && !state.subscription_counts_changed.contains(&key) {
                state.subscription_counts_changed.push(key);
            }
            (before, after)
        };
        if before <= 0 && after > 0 {
            self.lifecycle(app, || LifecycleEvent::occupancy(channel, true));
        } else if before > 0 && after <= 0 {
            self.lifecycle(app, || LifecycleEvent::occupancy(channel, false));
        }
    }

    /// Announces the counts that changed since the last tick (the throttle: once a second).
    pub(super) fn announce_subscription_counts(&self) {
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
                self.lifecycle(app, || LifecycleEvent::subscription_count(&channel, count as u64));
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
    pub(super) fn cached(&self, app: AppIndex, channel: &str) -> Option<(Bytes, Box<str>, u64)> {
        let mut state = self.state.borrow_mut();
        let key = (app, Box::<str>::from(channel));
        let entry = state.cache.get(&key)?;
        let now = Instant::now();
        if entry.expires <= now {
            state.cache.swap_remove(&key);
            return None;
        }
        Some((entry.frame.clone(), entry.data.clone(), (entry.expires - now).as_secs()))
    }

    /// A presence subscription ends: the member leaves now, or, while its join (`pending`,
    /// a ticket) still waits for the home shard, once the reply says the join was counted.
    pub(super) fn presence_leave_after(
        &self,
        pending: Option<u64>,
        app: AppIndex,
        channel: Box<str>,
        user_id: Box<str>,
    ) {
        match pending {
            Some(ticket) => {
                self.state.borrow_mut().cancelled_joins.insert(ticket, (app, channel, user_id));
            }
            None => self.presence_leave(app, channel, user_id),
        }
    }

    /// Drops expired cache events, at least `CACHE_SWEEP_MIN` entries or an eighth of the
    /// table per call (once a second from the ticker), so a table of per-user `cache-`
    /// channels that are never looked up again is swept whole within about eight seconds
    /// without one long pause.
    pub(super) fn sweep_cache(&self, now: Instant) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let budget = CACHE_SWEEP_MIN.max(state.cache.len() / 8);
        let mut index = state.cache_sweep_cursor;
        for _ in 0..budget {
            if index >= state.cache.len() {
                index = 0;
                break;
            }
            if state.cache[index].expires <= now {
                // The last entry moves into `index`: look at it next.
                state.cache.swap_remove_index(index);
            } else {
                index += 1;
            }
        }
        state.cache_sweep_cursor = index;
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
            self.lifecycle(app, || LifecycleEvent::member(&channel, &user_id, false));
        }
    }
}

/// Cache entries one sweep looks at, at least.
pub(super) const CACHE_SWEEP_MIN: usize = 1024;

/// What a user's home shard is computed from (distinct from any channel name).
fn user_home_key(user_id: &str) -> String {
    format!("#user:{user_id}")
}
