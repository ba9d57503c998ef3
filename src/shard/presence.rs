//! Presence membership, kept on each presence channel's home shard.
//!
//! `home(app, channel)` names the one shard that owns a presence channel's member list; every
//! other shard sends it joins and leaves through the mesh. Because one thread decides, "is this
//! user new to the channel?" and "was that the user's last connection?" have exactly one
//! answer, so `member_added` and `member_removed` are sent once, whatever shards the user's
//! connections are on (Pusher's presence channels count unique users, so a second tab of the
//! same user is silent: https://pusher.com/docs/channels/using_channels/presence-channels/).
//!
//! Pure state: no sockets, no mesh. The shard turns outcomes into frames and messages.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use indexmap::IndexMap;

use crate::apps::AppIndex;

/// The home shard of a channel: a fixed hash of (app, name), so every shard agrees.
pub fn home(app: AppIndex, channel: &str, shards: usize) -> usize {
    // SipHash with fixed zero keys: deterministic across threads of one process.
    let mut hasher = std::hash::DefaultHasher::new();
    app.hash(&mut hasher);
    channel.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

/// One member: a user with one or more connections on the channel, or none while its
/// removal waits out the presence debounce.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    /// `user_info` as the first connection sent it (raw JSON; `null` when absent).
    info: Box<str>,
    /// Connections of this user subscribed to the channel, on all shards. Invariant: 0 only
    /// while `leaving` is set.
    connections: u32,
    /// The pending removal of a member whose last connection left (`leave_later`): taken
    /// effect by `leave_due` with this ticket, cancelled by a join.
    leaving: Option<LeaveTicket>,
}

/// Names one delayed removal, so a timer that fires after the member came back and left again
/// does not cut the newer window short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveTicket(u64);

/// What a leave did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// The user still has connections (or was no member): nothing to announce.
    Stayed,
    /// The user's last connection left and the member is gone: announce `member_removed`.
    Removed,
    /// The user's last connection left; the member stays listed until `leave_due` with this
    /// ticket (the presence debounce).
    Later(LeaveTicket),
}

/// What a join did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The user is new to the channel: announce `member_added`.
    NewMember,
    /// Another connection of an existing member: nothing to announce.
    ExistingMember,
    /// The channel is at its member limit and the user is not a member: refused.
    Full,
}

/// Member lists of the presence channels this shard is home for.
#[derive(Debug, Default)]
pub struct PresenceTable {
    channels: HashMap<(AppIndex, Box<str>), IndexMap<Box<str>, Member>>,
    /// The next `LeaveTicket`'s number.
    next_ticket: u64,
}

impl PresenceTable {
    /// Counts one more connection of `user_id`.
    pub fn join(&mut self, app: AppIndex, channel: &str, user_id: &str, info: &str, members_max: usize) -> Joined {
        let members = self.channels.entry((app, channel.into())).or_default();
        if let Some(member) = members.get_mut(user_id) {
            // A member whose removal is pending came back within the window: it never left.
            member.leaving = None;
            member.connections += 1;
            return Joined::ExistingMember;
        }
        if members.len() >= members_max {
            if members.is_empty() {
                self.channels.remove(&(app, channel.into()));
            }
            return Joined::Full;
        }
        members.insert(user_id.into(), Member { info: info.into(), connections: 1, leaving: None });
        Joined::NewMember
    }

    /// Counts one connection of `user_id` less; true when it was the user's last, i.e. the
    /// member is gone and `member_removed` must be announced.
    pub fn leave(&mut self, app: AppIndex, channel: &str, user_id: &str) -> bool {
        self.leave_with(app, channel, user_id, false) == Left::Removed
    }

    /// Counts one connection of `user_id` less; the user's last one leaves the member listed
    /// (`Left::Later`) until `leave_due` with the returned ticket, unless a join comes first.
    pub fn leave_later(&mut self, app: AppIndex, channel: &str, user_id: &str) -> Left {
        self.leave_with(app, channel, user_id, true)
    }

    fn leave_with(&mut self, app: AppIndex, channel: &str, user_id: &str, later: bool) -> Left {
        let key = (app, Box::<str>::from(channel));
        let Some(members) = self.channels.get_mut(&key) else {
            return Left::Stayed;
        };
        let Some(member) = members.get_mut(user_id) else {
            return Left::Stayed;
        };
        // Every leave answers a counted join, so a member with no connection has none left.
        debug_assert!(member.connections > 0, "a leave without a counted connection");
        if member.connections == 0 {
            return Left::Stayed;
        }
        member.connections -= 1;
        if member.connections > 0 {
            return Left::Stayed;
        }
        if later {
            let ticket = LeaveTicket(self.next_ticket);
            self.next_ticket += 1;
            member.leaving = Some(ticket);
            return Left::Later(ticket);
        }
        members.shift_remove(user_id);
        if members.is_empty() {
            self.channels.remove(&key);
        }
        Left::Removed
    }

    /// The debounce of `ticket` ran out: true if the member is still waiting for it (no
    /// connection came back), and is now removed (`member_removed` must be announced).
    pub fn leave_due(&mut self, app: AppIndex, channel: &str, user_id: &str, ticket: LeaveTicket) -> bool {
        let key = (app, Box::<str>::from(channel));
        let Some(members) = self.channels.get_mut(&key) else {
            return false;
        };
        if members.get(user_id).is_none_or(|m| m.leaving != Some(ticket)) {
            return false;
        }
        members.shift_remove(user_id);
        if members.is_empty() {
            self.channels.remove(&key);
        }
        true
    }

    /// Whether some member of the channel waits out its debounce.
    pub fn has_leaving(&self, app: AppIndex, channel: &str) -> bool {
        self.channels.get(&(app, channel.into())).is_some_and(|m| m.values().any(|m| m.leaving.is_some()))
    }

    /// Every member waiting out its debounce, as (app, channel, user id, ticket): for shutdown,
    /// which removes them at once.
    pub fn leaving(&self) -> Vec<(AppIndex, Box<str>, Box<str>, LeaveTicket)> {
        let members = self.channels.iter().flat_map(|((app, channel), members)| {
            let leaving = members.iter().filter_map(|(user, m)| m.leaving.map(|t| (user, t)));
            leaving.map(move |(user, ticket)| (*app, channel.clone(), user.clone(), ticket))
        });
        members.collect()
    }

    /// The `presence` object of `subscription_succeeded`:
    /// `{"presence":{"ids":[...],"hash":{id:info,...},"count":N}}`.
    pub fn snapshot(&self, app: AppIndex, channel: &str) -> String {
        let mut ids = Vec::new();
        let mut hash = String::from("{");
        if let Some(members) = self.channels.get(&(app, channel.into())) {
            for (i, (id, member)) in members.iter().enumerate() {
                ids.push(serde_json::to_string(id.as_ref()).expect("strings serialize"));
                if i > 0 {
                    hash.push(',');
                }
                hash.push_str(ids.last().expect("just pushed"));
                hash.push(':');
                hash.push_str(&member.info);
            }
        }
        hash.push('}');
        format!("{{\"presence\":{{\"ids\":[{}],\"hash\":{hash},\"count\":{}}}}}", ids.join(","), ids.len())
    }

    /// Whether `user_id` is a member of the channel (with a connection counted here).
    pub fn contains(&self, app: AppIndex, channel: &str, user_id: &str) -> bool {
        self.channels.get(&(app, channel.into())).is_some_and(|m| m.contains_key(user_id))
    }

    /// Member user ids of a channel, in join order.
    pub fn users(&self, app: AppIndex, channel: &str) -> Vec<Box<str>> {
        self.channels.get(&(app, channel.into())).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Every (app, channel, user id, connections) in the table, for consistency checks.
    #[cfg(test)]
    pub fn entries(&self) -> Vec<(AppIndex, Box<str>, Box<str>, u32)> {
        let members = self.channels.iter().flat_map(|((app, channel), members)| {
            members.iter().map(move |(user, member)| (*app, channel.clone(), user.clone(), member.connections))
        });
        members.collect()
    }

    /// (channel, member count) of an app's presence channels whose names start with `prefix`.
    pub fn counts(&self, app: AppIndex, prefix: &str) -> Vec<(Box<str>, u32)> {
        self.channels
            .iter()
            .filter(|((a, name), _)| *a == app && name.starts_with(prefix))
            .map(|((_, name), members)| (name.clone(), members.len() as u32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second connection of the same user is silent; only the last leave removes.
    #[test]
    fn dedupe_by_user() {
        let mut table = PresenceTable::default();
        assert_eq!(table.join(0, "presence-a", "u1", r#"{"n":1}"#, 100), Joined::NewMember);
        assert_eq!(table.join(0, "presence-a", "u1", r#"{"n":2}"#, 100), Joined::ExistingMember);
        assert_eq!(table.join(0, "presence-a", "u2", "null", 100), Joined::NewMember);
        assert_eq!(
            table.snapshot(0, "presence-a"),
            r#"{"presence":{"ids":["u1","u2"],"hash":{"u1":{"n":1},"u2":null},"count":2}}"#
        );
        assert!(!table.leave(0, "presence-a", "u1"));
        assert!(table.leave(0, "presence-a", "u1"));
        assert!(!table.leave(0, "presence-a", "u1"), "already gone");
        assert_eq!(table.users(0, "presence-a"), vec![Box::from("u2")]);
        assert!(table.leave(0, "presence-a", "u2"));
        assert!(table.channels.is_empty());
        assert_eq!(table.snapshot(0, "presence-a"), r#"{"presence":{"ids":[],"hash":{},"count":0}}"#);
    }

    /// A delayed leave keeps the member listed; a join within the window cancels it, a stale
    /// ticket removes nothing, and only the current ticket removes.
    #[test]
    fn leave_later_is_cancelled_by_a_join() {
        let mut table = PresenceTable::default();
        table.join(0, "presence-a", "u1", "null", 100);
        let Left::Later(first) = table.leave_later(0, "presence-a", "u1") else { panic!("last connection") };
        assert!(table.contains(0, "presence-a", "u1") && table.has_leaving(0, "presence-a"));
        assert_eq!(table.join(0, "presence-a", "u1", "null", 100), Joined::ExistingMember, "came back: not new");
        assert!(!table.has_leaving(0, "presence-a"));
        let Left::Later(second) = table.leave_later(0, "presence-a", "u1") else { panic!("last connection") };
        assert!(!table.leave_due(0, "presence-a", "u1", first), "the first window was cancelled");
        assert_eq!(table.leaving(), vec![(0, "presence-a".into(), "u1".into(), second)]);
        assert!(table.leave_due(0, "presence-a", "u1", second));
        assert!(!table.contains(0, "presence-a", "u1") && table.channels.is_empty());
        assert!(!table.leave_due(0, "presence-a", "u1", second), "removed once");
    }

    /// The member limit refuses new users but not new connections of members.
    #[test]
    fn member_limit() {
        let mut table = PresenceTable::default();
        assert_eq!(table.join(0, "presence-a", "u1", "null", 1), Joined::NewMember);
        assert_eq!(table.join(0, "presence-a", "u2", "null", 1), Joined::Full);
        assert_eq!(table.join(0, "presence-a", "u1", "null", 1), Joined::ExistingMember);
        assert_eq!(table.counts(0, "presence-"), vec![(Box::from("presence-a"), 1)]);
        assert_eq!(table.counts(1, "presence-"), vec![]);
    }

    /// Every shard computes the same home.
    #[test]
    fn home_is_stable() {
        let homes: Vec<usize> = (0..4).map(|_| home(3, "presence-x", 7)).collect();
        assert!(homes.windows(2).all(|w| w[0] == w[1]));
        assert!(homes[0] < 7);
        assert_eq!(home(0, "anything", 1), 0);
    }
}
