//! Channel-wide and user-wide state, kept on one "home" shard per channel or user:
//! presence members, cache channels' last events, subscription counts, users' online
//! counts and their watchers. `presence::home(app, name)` picks the shard; every other shard
//! sends it joins, leaves and deltas through the mesh (`shard::home_link`), so each of these
//! questions has exactly one authoritative answer and each resulting event is sent once.
//!
//! Pure: `HomeState` never sends. Each change returns the `HomeEffect`s it causes (frames to
//! broadcast or send, lifecycle webhooks, the answer to a join), in order, and the caller
//! executes them. That keeps the rules unit-testable here and lets another authority (a
//! cluster-wide one) stand in for this one behind the same effects. Time comes in as an
//! argument. Also here: `JoinTickets`, the joining side's record of the joins it sent.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;
use indexmap::IndexMap;

use super::mesh::{HomeJoin, JoinReply, Watcher};
use super::presence::{Joined, LeaveTicket, Left, PresenceTable};
use crate::apps::AppIndex;
use crate::pusher::message::{self, SocketId};
use crate::webhook::event::LifecycleEvent;

/// Cache entries one sweep looks at, at least.
pub(super) const CACHE_SWEEP_MIN: usize = 1024;

/// Something a change of home state requires, for the caller to execute in order.
#[derive(Debug)]
pub enum HomeEffect {
    /// Send `frame` to every subscriber of the channel, on every shard, except `exclude`.
    Broadcast {
        /// The app.
        app: AppIndex,
        /// The channel.
        channel: Box<str>,
        /// The frame.
        frame: Bytes,
        /// A connection that must not receive it.
        exclude: Option<SocketId>,
    },
    /// Send `frame` to one connection on any shard.
    SendTo {
        /// The connection.
        watcher: Watcher,
        /// The frame.
        frame: Bytes,
    },
    /// A lifecycle webhook event, for apps whose Pusher-format webhooks select it.
    Lifecycle {
        /// The app.
        app: AppIndex,
        /// The channel.
        channel: Box<str>,
        /// Which event.
        kind: LifecycleKind,
    },
    /// A member's last connection left: remove it (`presence_leave_due`) after the app's
    /// `presence_debounce_ms`, unless it comes back first.
    LeaveLater {
        /// The app.
        app: AppIndex,
        /// The channel.
        channel: Box<str>,
        /// The member.
        user_id: Box<str>,
        /// Names this window.
        ticket: LeaveTicket,
    },
    /// The answer to a join, for the connection's shard `to`.
    Reply {
        /// The joining shard.
        to: usize,
        /// The answer.
        reply: JoinReply,
    },
}

/// The lifecycle events home state causes; built into a `LifecycleEvent` only when some
/// endpoint wants it (`LifecycleKind::event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleKind {
    /// `channel_occupied`.
    Occupied,
    /// `channel_vacated`.
    Vacated,
    /// `member_added` of this user id.
    MemberAdded(Box<str>),
    /// `member_removed` of this user id.
    MemberRemoved(Box<str>),
    /// `cache_miss`.
    CacheMiss,
    /// `subscription_count` with this count.
    SubscriptionCount(u64),
}

impl LifecycleKind {
    /// The webhook event on `channel`.
    pub fn event(&self, channel: &str) -> LifecycleEvent {
        match self {
            LifecycleKind::Occupied => LifecycleEvent::occupancy(channel, true),
            LifecycleKind::Vacated => LifecycleEvent::occupancy(channel, false),
            LifecycleKind::MemberAdded(user_id) => LifecycleEvent::member(channel, user_id, true),
            LifecycleKind::MemberRemoved(user_id) => LifecycleEvent::member(channel, user_id, false),
            LifecycleKind::CacheMiss => LifecycleEvent::cache_miss(channel),
            LifecycleKind::SubscriptionCount(count) => LifecycleEvent::subscription_count(channel, *count),
        }
    }
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

/// The state of the channels and users this shard is home for.
#[derive(Default)]
pub struct HomeState {
    /// Members of the presence channels.
    pub(super) presence: PresenceTable,
    /// Last events of the cache channels. An `IndexMap`, so the ticker can sweep expired
    /// entries a slice at a time (`sweep_cache`).
    cache: IndexMap<(AppIndex, Box<str>), CachedEvent>,
    /// Where the next cache sweep starts. Invariant: at most `cache.len()`.
    cache_sweep_cursor: usize,
    /// Subscriber counts on all shards (apps that count subscriptions only). Invariant: an
    /// entry at 0 or below is kept only until the next announcement, and only for channels
    /// whose count is announced (it is then in `subscription_counts_changed`).
    subscription_counts: HashMap<(AppIndex, Box<str>), i64>,
    /// Channels whose count changed since the last announcement, each once.
    subscription_counts_changed: indexmap::IndexSet<(AppIndex, Box<str>)>,
    /// Channels whose last subscriber left while members' removals were pending: vacated
    /// once those ran (member_removed, then channel_vacated), or never if a subscriber comes
    /// back first. Invariant: each has no subscriber counted here, and had a member waiting
    /// out its debounce when it was held (one that came back since is followed by its
    /// connection's count, which cancels the vacate).
    vacating: HashSet<(AppIndex, Box<str>)>,
    /// Signed-in connections per user, on all shards. Invariant: every count is at least 1.
    users_online: HashMap<(AppIndex, Box<str>), u32>,
    /// Watchers of each user. Invariant: no list is empty.
    watchers: HashMap<(AppIndex, Box<str>), Vec<Watcher>>,
}

impl HomeState {
    /// Counts a join here (`members_max`: the app's presence limit): a presence member is
    /// counted, a new one announced (`member_added`, to everyone but the joining connection),
    /// a cache channel's last event looked up; the last effect is always the `Reply`, whose
    /// frames (subscription_succeeded or an error, then the cached event or cache_miss) the
    /// connection receives before anything published after.
    pub fn join(&mut self, join: HomeJoin, members_max: usize, now: Instant) -> Vec<HomeEffect> {
        let mut effects = Vec::new();
        let mut frames = Vec::with_capacity(2);
        let mut accepted = true;
        match &join.member {
            Some((user_id, user_info)) => {
                match self.presence.join(join.app, &join.channel, user_id, user_info, members_max) {
                    Joined::Full => {
                        let reason = format!("presence channel is full: at most {members_max} members");
                        frames.push(message::error(None, &reason, Some(&join.channel)));
                        accepted = false;
                    }
                    joined => {
                        if joined == Joined::NewMember {
                            let frame = message::member_added(&join.channel, user_id, user_info);
                            let channel = join.channel.clone();
                            effects.push(HomeEffect::Broadcast {
                                app: join.app,
                                channel,
                                frame,
                                exclude: Some(join.socket_id),
                            });
                            let kind = LifecycleKind::MemberAdded(user_id.clone());
                            effects.push(HomeEffect::Lifecycle { app: join.app, channel: join.channel.clone(), kind });
                        }
                        let snapshot = self.presence.snapshot(join.app, &join.channel);
                        frames.push(message::presence_subscription_succeeded(&join.channel, &snapshot));
                    }
                }
            }
            None => frames.push(message::subscription_succeeded(&join.channel)),
        }
        if accepted && join.cache {
            // Pusher's cache channels: the last event comes right after subscription_succeeded.
            match self.cached(join.app, &join.channel, now) {
                Some((frame, _, _)) => frames.push(frame),
                None => {
                    frames.push(message::cache_miss(&join.channel));
                    let kind = LifecycleKind::CacheMiss;
                    effects.push(HomeEffect::Lifecycle { app: join.app, channel: join.channel.clone(), kind });
                }
            }
        }
        let HomeJoin { from, conn, socket_id, ticket, channel, .. } = join;
        effects.push(HomeEffect::Reply {
            to: from,
            reply: JoinReply { conn, socket_id, ticket, channel, frames, accepted, reconnect: false },
        });
        effects
    }

    /// One connection of a member leaves; the user's last one removes the member, announced
    /// with `member_removed` — at once, or with `debounce` after a window (`LeaveLater`) in
    /// which a join of the same user cancels it (Pusher's presence debounce).
    pub fn presence_leave(
        &mut self,
        app: AppIndex,
        channel: Box<str>,
        user_id: Box<str>,
        debounce: bool,
    ) -> Vec<HomeEffect> {
        let left = if debounce {
            self.presence.leave_later(app, &channel, &user_id)
        } else if self.presence.leave(app, &channel, &user_id) {
            Left::Removed
        } else {
            Left::Stayed
        };
        match left {
            Left::Stayed => Vec::new(),
            Left::Later(ticket) => vec![HomeEffect::LeaveLater { app, channel, user_id, ticket }],
            Left::Removed => self.member_removed(app, channel, user_id),
        }
    }

    /// The debounce window `ticket` of a member ended: if no connection came back, the member
    /// is removed now (`member_removed`, then `channel_vacated` if that was all that kept the
    /// channel's vacate waiting).
    pub fn presence_leave_due(
        &mut self,
        app: AppIndex,
        channel: Box<str>,
        user_id: Box<str>,
        ticket: LeaveTicket,
    ) -> Vec<HomeEffect> {
        if !self.presence.leave_due(app, &channel, &user_id, ticket) {
            return Vec::new();
        }
        self.member_removed(app, channel, user_id)
    }

    fn member_removed(&mut self, app: AppIndex, channel: Box<str>, user_id: Box<str>) -> Vec<HomeEffect> {
        let frame = message::member_removed(&channel, &user_id);
        let mut effects = vec![
            HomeEffect::Broadcast { app, channel: channel.clone(), frame, exclude: None },
            HomeEffect::Lifecycle { app, channel: channel.clone(), kind: LifecycleKind::MemberRemoved(user_id) },
        ];
        effects.extend(self.vacate_after_leaves(app, channel));
        effects
    }

    /// A member of `channel` was removed: a vacate that waited for the channel's pending
    /// removals happens now if none is left (cluster mode calls this after its own leave).
    pub fn vacate_after_leaves(&mut self, app: AppIndex, channel: Box<str>) -> Option<HomeEffect> {
        let key = (app, channel);
        if self.presence.has_leaving(app, &key.1) || !self.vacating.remove(&key) {
            return None;
        }
        debug_assert!(self.subscribers(app, &key.1) <= 0, "an occupied channel's vacate is cancelled");
        Some(HomeEffect::Lifecycle { app, channel: key.1, kind: LifecycleKind::Vacated })
    }

    /// A channel's subscriber count changed by `delta` on some shard: `channel_occupied` when
    /// it becomes occupied, `channel_vacated` when it empties. With `announce`, the channel is
    /// marked for the next `announce_subscription_counts`.
    pub fn count_subscriptions(&mut self, app: AppIndex, channel: &str, delta: i32, announce: bool) -> Vec<HomeEffect> {
        let key = (app, Box::<str>::from(channel));
        let count = self.subscription_counts.entry(key.clone()).or_default();
        let before = *count;
        *count += i64::from(delta);
        let after = *count;
        if after <= 0 && !announce {
            self.subscription_counts.remove(&key);
        }
        if announce {
            // A set: in cluster mode every channel announces, and a reconnect storm changes
            // thousands in one second (a list's `contains` made that quadratic).
            self.subscription_counts_changed.insert(key);
        }
        let kind = if before <= 0 && after > 0 {
            // A subscriber within a pending vacate's window: the channel never emptied.
            if self.vacating.remove(&(app, Box::<str>::from(channel))) {
                return Vec::new();
            }
            LifecycleKind::Occupied
        } else if before > 0 && after <= 0 {
            // Members still waiting out their debounce leave first (member_removed, then
            // channel_vacated): the vacate waits for them (`vacate_after_leaves`).
            if self.presence.has_leaving(app, channel) {
                self.vacating.insert((app, channel.into()));
                return Vec::new();
            }
            LifecycleKind::Vacated
        } else {
            return Vec::new();
        };
        vec![HomeEffect::Lifecycle { app, channel: channel.into(), kind }]
    }

    /// Announces the counts that changed since the last call (the throttle: the ticker calls
    /// it once a second); channels that emptied are forgotten without an announcement.
    pub fn announce_subscription_counts(&mut self) -> Vec<HomeEffect> {
        let mut effects = Vec::new();
        for key in self.subscription_counts_changed.drain(..) {
            let count = self.subscription_counts.get(&key).copied().unwrap_or(0);
            if count <= 0 {
                self.subscription_counts.remove(&key);
                continue;
            }
            let (app, channel) = key;
            let count = count as u64;
            let frame = message::subscription_count(&channel, count);
            effects.push(HomeEffect::Broadcast { app, channel: channel.clone(), frame, exclude: None });
            effects.push(HomeEffect::Lifecycle { app, channel, kind: LifecycleKind::SubscriptionCount(count) });
        }
        effects
    }

    /// Cluster mode: the counts that changed since the last call, as (app, channel, count);
    /// channels that emptied are forgotten (their `vacate` clears their count in Redis).
    pub fn take_subscription_counts(&mut self) -> Vec<(AppIndex, Box<str>, u64)> {
        let mut counts = Vec::new();
        for key in self.subscription_counts_changed.drain(..) {
            match self.subscription_counts.get(&key).copied() {
                Some(count) if count > 0 => counts.push((key.0, key.1, count as u64)),
                _ => {
                    self.subscription_counts.remove(&key);
                }
            }
        }
        counts
    }

    /// A channel's subscribers on all shards of this node, as counted here.
    pub fn subscribers(&self, app: AppIndex, channel: &str) -> i64 {
        self.subscription_counts.get(&(app, Box::<str>::from(channel))).copied().unwrap_or(0)
    }

    /// A connection of a user signed in (`online`) or a signed-in one ended; the watchers hear
    /// when the first connection arrives and when the last one leaves.
    pub fn user_presence(&mut self, app: AppIndex, user_id: Box<str>, online: bool) -> Vec<HomeEffect> {
        let key = (app, user_id);
        let changed = self.count_user(&key, online);
        let Some(watchers) = self.watchers.get(&key).filter(|_| changed) else {
            return Vec::new();
        };
        let frame = message::watchlist_event(if online { "online" } else { "offline" }, &[&key.1]);
        watchers.iter().map(|&watcher| HomeEffect::SendTo { watcher, frame: frame.clone() }).collect()
    }

    /// Counts a signed-in connection of a user arriving (`online`) or ending here; true when
    /// it was the first or the last one (cluster mode: a node-level transition).
    pub fn count_user(&mut self, key: &(AppIndex, Box<str>), online: bool) -> bool {
        if online {
            let count = self.users_online.entry(key.clone()).or_default();
            *count += 1;
            *count == 1
        } else {
            match self.users_online.get_mut(key) {
                Some(1) => self.users_online.remove(key).is_some(),
                Some(count) => {
                    *count -= 1;
                    false
                }
                None => false,
            }
        }
    }

    /// Whether a user has signed-in connections here (this shard counts all of the node's).
    pub fn is_online(&self, key: &(AppIndex, Box<str>)) -> bool {
        self.users_online.contains_key(key)
    }

    /// The connections watching a user.
    pub fn watchers_of(&self, key: &(AppIndex, Box<str>)) -> &[Watcher] {
        self.watchers.get(key).map_or(&[], Vec::as_slice)
    }

    /// Starts or stops watching a user; a new watcher of a user who is online hears so at once.
    pub fn watch(&mut self, app: AppIndex, user_id: Box<str>, watcher: Watcher, watch: bool) -> Vec<HomeEffect> {
        let key = (app, user_id);
        if watch {
            self.watchers.entry(key.clone()).or_default().push(watcher);
        } else if let Some(list) = self.watchers.get_mut(&key) {
            list.retain(|w| *w != watcher);
            if list.is_empty() {
                self.watchers.remove(&key);
            }
        }
        if watch && self.users_online.contains_key(&key) {
            return vec![HomeEffect::SendTo { watcher, frame: message::watchlist_event("online", &[&key.1]) }];
        }
        Vec::new()
    }

    /// Keeps `frame` (with its `data`, for `info=cache`) as a cache channel's last event until
    /// `expires`.
    pub fn cache_store(&mut self, app: AppIndex, channel: &str, frame: Bytes, data: &str, expires: Instant) {
        self.cache.insert((app, channel.into()), CachedEvent { frame, data: data.into(), expires });
    }

    /// The live cached event of a channel at `now`: (frame, data, whole seconds left). An
    /// expired one is dropped.
    pub fn cached(&mut self, app: AppIndex, channel: &str, now: Instant) -> Option<(Bytes, Box<str>, u64)> {
        let key = (app, Box::<str>::from(channel));
        let entry = self.cache.get(&key)?;
        if entry.expires <= now {
            self.cache.swap_remove(&key);
            return None;
        }
        Some((entry.frame.clone(), entry.data.clone(), (entry.expires - now).as_secs()))
    }

    /// Drops events expired at `now`, looking at `CACHE_SWEEP_MIN` entries or an eighth of the
    /// table per call, whichever is more (once a second from the ticker), so a table of
    /// per-user `cache-` channels that are never looked up again is swept whole within about
    /// eight seconds without one long pause.
    pub fn sweep_cache(&mut self, now: Instant) {
        let budget = CACHE_SWEEP_MIN.max(self.cache.len() / 8);
        let mut index = self.cache_sweep_cursor;
        for _ in 0..budget {
            if index >= self.cache.len() {
                index = 0;
                break;
            }
            if self.cache[index].expires <= now {
                // The last entry moves into `index`: look at it next.
                self.cache.swap_remove_index(index);
            } else {
                index += 1;
            }
        }
        self.cache_sweep_cursor = index;
        debug_assert!(self.cache_sweep_cursor <= self.cache.len(), "the sweep cursor stays in the table");
    }

    /// Drops the cached events of the channels `forget` names (cluster mode: their bucket may
    /// have missed newer events, so the next join reads Redis instead).
    pub fn cache_forget(&mut self, mut forget: impl FnMut(AppIndex, &str) -> bool) {
        self.cache.retain(|(app, channel), _| !forget(*app, channel));
        self.cache_sweep_cursor = self.cache_sweep_cursor.min(self.cache.len());
    }

    /// Cached events held, expired or not.
    #[cfg(test)]
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Every (app, channel, count) this shard keeps, for consistency checks.
    #[cfg(test)]
    pub fn subscription_counts(&self) -> impl Iterator<Item = (AppIndex, &str, i64)> {
        self.subscription_counts.iter().map(|((app, channel), &count)| (*app, channel.as_ref(), count))
    }
}

/// Names one join among those a shard has sent to home shards (unique per shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JoinTicket(u64);

/// A presence member to take back out of its channel.
pub type MemberLeave = (AppIndex, Box<str>, Box<str>);

/// What a home shard's reply to a join means to the shard that sent the join.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// The join was not given up: the connection's own pending join decides what it means.
    Wanted,
    /// Given up while waiting, and refused: nothing was counted, nothing to undo.
    Dropped,
    /// Given up while waiting but counted at home: this member must leave again.
    Undo(MemberLeave),
}

/// The joining side's tickets: the next one to issue, and the presence joins given up
/// (unsubscribe, disconnect) while waiting for their home shard.
///
/// A given-up member leaves only if the reply says its join was counted: a leave for a
/// refused join would uncount another connection of the same user.
#[derive(Debug, Default)]
pub struct JoinTickets {
    /// The next ticket's number.
    next: u64,
    /// Given-up presence joins by ticket. Invariant: only tickets already issued.
    cancelled: HashMap<JoinTicket, MemberLeave>,
}

impl JoinTickets {
    /// A fresh ticket for a join about to be sent.
    pub fn issue(&mut self) -> JoinTicket {
        let ticket = JoinTicket(self.next);
        self.next += 1;
        ticket
    }

    /// The presence join `ticket` was given up; `leave` undoes it if it turns out counted.
    pub fn cancel(&mut self, ticket: JoinTicket, leave: MemberLeave) {
        debug_assert!(ticket.0 < self.next, "only issued tickets are cancelled");
        self.cancelled.insert(ticket, leave);
    }

    /// The reply to `ticket` arrived, `accepted` or not.
    pub fn answered(&mut self, ticket: JoinTicket, accepted: bool) -> Answered {
        match self.cancelled.remove(&ticket) {
            None => Answered::Wanted,
            Some(leave) if accepted => Answered::Undo(leave),
            Some(_) => Answered::Dropped,
        }
    }

    /// Whether no given-up join waits for its reply.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.cancelled.is_empty()
    }
}

#[cfg(test)]
#[path = "home_tests.rs"]
mod tests;
