//! Watchlists in cluster mode (docs/cluster.md, "Presence, occupancy, users: keys and
//! scripts"): the user's home shard on each node counts the node's signed-in connections as on
//! a single node, and only the node-level transitions (first connection on this node, last
//! one) go to Redis, where the `online` / `offline` scripts (`cluster::users`) decide whether
//! they are cluster-wide ones and publish kind 8 / 9 to the user's bucket. Watchers are told
//! from those messages only, on every node alike (the publishing node included), so each
//! change is heard once and in the order Redis decided it.
//!
//! A watcher's first interest in a user reads `HEXISTS` of the app's online hash (the user may
//! have come online before); `ClusterOnline` reconciles that read with the messages that
//! arrive meanwhile. A script that may not have run (the link failed) is run again, for the
//! node's state then, when the link is up; both scripts are idempotent.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::HashSet;

use bytes::Bytes;

use super::home_link::user_home_key;
use super::mesh::{MeshMessage, Watcher};
use super::{presence, Shard};
use crate::apps::AppIndex;
use crate::cluster::link::Reply;
use crate::cluster::outbound::Unavailable;
use crate::cluster::scripts;
use crate::cluster::users::{self, Caller, Transition};
use crate::pusher::message;

/// A user of an app.
type UserKey = (AppIndex, Box<str>);

/// Script calls per request when reaping a dead node's users.
const REAP_GROUP: usize = 16;

/// What a home shard knows of a watched user's cluster-wide state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    /// Online anywhere, as last learned.
    online: bool,
    /// A message arrived since the last read was sent: that read may be older, so it is
    /// ignored (the messages keep the state from then on).
    heard: bool,
}

/// What a new watcher of a user needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Tell it `online` now.
    Online,
    /// Nothing: the user is offline as far as the messages say, or a read is in flight whose
    /// answer tells every watcher.
    Nothing,
    /// The user was not tracked: read whether it is online (`ClusterOnline::read_done`).
    Read,
}

/// The cluster-wide online state of the users this shard is home for that have watchers on
/// this node, and the node-level transitions Redis may not know yet. Pure.
#[derive(Debug, Default)]
pub struct ClusterOnline {
    /// Watched users. Invariant: exactly the users with at least one watcher here (the caller
    /// calls `forget` when the last one stops).
    tracked: HashMap<UserKey, Tracked>,
    /// Users whose last script may not have run (the link failed): decided again at link up.
    unsynced: HashSet<UserKey>,
    /// Watched users whose read failed before any message about them arrived: read again at
    /// link up (their watchers have not been told anything yet).
    unread: HashSet<UserKey>,
}

impl ClusterOnline {
    /// A watcher started watching `key`.
    pub fn watch_started(&mut self, key: &UserKey) -> Start {
        match self.tracked.entry(key.clone()) {
            Entry::Vacant(vacant) => {
                vacant.insert(Tracked { online: false, heard: false });
                Start::Read
            }
            Entry::Occupied(tracked) if tracked.get().online => Start::Online,
            Entry::Occupied(_) => Start::Nothing,
        }
    }

    /// No watcher of `key` is left here.
    pub fn forget(&mut self, key: &UserKey) {
        self.tracked.remove(key);
    }

    /// A script's decision arrived through the bucket; true when the watchers must hear it.
    pub fn decided(&mut self, key: &UserKey, online: bool) -> bool {
        let Some(tracked) = self.tracked.get_mut(key) else { return false };
        tracked.heard = true;
        let changed = tracked.online != online;
        tracked.online = online;
        changed
    }

    /// A read of whether `key` is online answered (`None`: it failed, and is to be done
    /// again at link up); true when every watcher must hear `online` now.
    pub fn read_done(&mut self, key: &UserKey, online: Option<bool>) -> bool {
        let Some(tracked) = self.tracked.get_mut(key) else { return false };
        if tracked.heard || tracked.online {
            return false;
        }
        match online {
            None => {
                self.unread.insert(key.clone());
                false
            }
            Some(online) => {
                tracked.online = online;
                online
            }
        }
    }

    /// Takes the watched users to read again (a message since the failed read made that
    /// unnecessary for some: they are left out).
    pub fn take_unread(&mut self) -> Vec<UserKey> {
        let unread = std::mem::take(&mut self.unread);
        unread.into_iter().filter(|key| self.tracked.get(key).is_some_and(|t| !t.heard)).collect()
    }

    /// A script for `key` may not have run.
    pub fn unsynced(&mut self, key: UserKey) {
        self.unsynced.insert(key);
    }

    /// Takes the users whose scripts must run again.
    pub fn take_unsynced(&mut self) -> HashSet<UserKey> {
        std::mem::take(&mut self.unsynced)
    }
}

impl Shard {
    /// Home shard, cluster mode: counts a signed-in connection of the node; the node's first
    /// or last one asks Redis whether it is a cluster-wide change.
    pub(super) fn cluster_user_presence(&self, app: AppIndex, user_id: Box<str>, online: bool) {
        let key = (app, user_id);
        let changed = self.state.borrow_mut().home.count_user(&key, online);
        if changed {
            self.run_user_script(key, online);
        }
    }

    /// Runs `online` or `offline` for a user; one that cannot run now runs at the next link up.
    fn run_user_script(&self, key: UserKey, online: bool) {
        let Some(cluster) = self.cluster() else { return };
        let Some(shard) = cluster.shard.upgrade() else { return };
        let transition = if online { Transition::Online } else { Transition::Offline };
        let holder = scripts::node_name(&cluster.node);
        let caller = Caller {
            prefix: &cluster.prefix,
            buckets: cluster.buckets,
            node: &cluster.node,
            holder: &holder,
            candidate: fastrand::u64(1..),
        };
        let command = match users::call(&caller, &self.apps().get(key.0).config.id, &key.1, transition) {
            Ok(command) => command,
            Err(error) => return tracing::error!(%error, "a signed-in user id the cluster message refuses"),
        };
        let Ok(asked) = cluster.commands.request(vec![command]) else {
            return cluster.online.borrow_mut().unsynced(key);
        };
        monoio::spawn(async move {
            let replies = asked.replies().await;
            shard.user_script_done(key, replies);
        });
    }

    fn user_script_done(&self, key: UserKey, replies: Result<Vec<Reply>, Unavailable>) {
        let Some(cluster) = self.cluster() else { return };
        match replies.map(|r| r.first().map(users::decided)) {
            Ok(Some(Ok(_))) => {}
            // An error reply (e.g. NOSCRIPT after a `SCRIPT FLUSH`) decided nothing: run it again
            // at the next link_up, which loads the scripts again, as for a lost reply.
            Ok(Some(Err(reason))) => {
                tracing::error!(
                    reason,
                    user = &*key.1,
                    "the online/offline script failed; run again at the next link up"
                );
                cluster.online.borrow_mut().unsynced(key)
            }
            Ok(None) | Err(Unavailable) => cluster.online.borrow_mut().unsynced(key),
        }
    }

    /// Link up: runs the scripts that may not have run, for the state the node holds now,
    /// and the reads of watched users that failed.
    ///
    /// Users whose scripts did run are not registered again: Redis keeps them unless it lost
    /// its data, and then the script sender's numbers in every online user's bucket are gone
    /// too, so the barrier reports a gap there and the user's connections (and watchers) are
    /// closed with 4200 and sign in anew. That keeps a reconnect O(unsynced users), not
    /// O(users online).
    pub(super) fn users_register(&self) {
        let Some(cluster) = self.cluster() else { return };
        let unsynced = cluster.online.borrow_mut().take_unsynced();
        let users: Vec<(UserKey, bool)> = {
            let state = self.state.borrow();
            unsynced.into_iter().map(|key| (key.clone(), state.home.is_online(&key))).collect()
        };
        for (key, online) in users {
            self.run_user_script(key, online);
        }
        let unread = cluster.online.borrow_mut().take_unread();
        for key in unread {
            self.read_online(key);
        }
    }

    /// Reaper: takes the dead node `dead`'s signed-in users offline (each `offline` once
    /// cluster-wide, through the script) and deletes its sets, app by app. Idempotent: a
    /// reaper that dies midway leaves what it did not take for the next one.
    pub(super) async fn reap_online(&self, dead: &str) -> Result<(), Unavailable> {
        let Some(cluster) = self.cluster() else { return Ok(()) };
        let apps = self.apps();
        for app in apps.list.iter().filter(|a| !a.removed) {
            let key = users::node_key(&cluster.prefix, &app.config.id, dead);
            let replies = cluster.commands.request(vec![vec![b"SMEMBERS".to_vec(), key.clone().into_bytes()]])?;
            let replies = replies.replies().await?;
            let Some(Reply::Array(members)) = replies.first() else { return Err(Unavailable) };
            let caller = Caller {
                prefix: &cluster.prefix,
                buckets: cluster.buckets,
                node: &cluster.node,
                holder: dead,
                candidate: fastrand::u64(1..),
            };
            // Redis is shared: a member that no connection could sign in as is skipped (the
            // message format refuses it).
            let calls: Vec<_> = members
                .iter()
                .filter_map(|m| match m {
                    Reply::BulkString(user) => std::str::from_utf8(user).ok(),
                    _ => None,
                })
                .filter_map(|user| users::call(&caller, &app.config.id, user, Transition::Offline).ok())
                .collect();
            // In groups, so a request stays well below `cluster.pipeline_bytes_max` (a script
            // call is at most about 2 KiB; the smallest allowed pipeline is 64 KiB).
            for group in calls.chunks(REAP_GROUP) {
                cluster.commands.request(group.to_vec())?.replies().await?;
            }
            cluster.commands.request(vec![vec![b"DEL".to_vec(), key.into_bytes()]])?.replies().await?;
        }
        Ok(())
    }

    /// Home shard, cluster mode: starts or stops watching a user. The node's own count says
    /// nothing cluster-wide, so a new watcher hears `online` from what the messages (or a read
    /// of Redis) say.
    pub(super) fn cluster_watch(&self, app: AppIndex, user_id: Box<str>, watcher: Watcher, watch: bool) {
        let Some(cluster) = self.cluster() else { return };
        // Its effects judge by this node's connections only: the cluster-wide state decides.
        let _ = self.state.borrow_mut().home.watch(app, user_id.clone(), watcher, watch);
        let key = (app, user_id);
        if !watch {
            if self.state.borrow().home.watchers_of(&key).is_empty() {
                cluster.online.borrow_mut().forget(&key);
            }
            return;
        }
        let start = cluster.online.borrow_mut().watch_started(&key);
        match start {
            Start::Online => self.send_to(watcher, message::watchlist_event("online", &[&key.1])),
            Start::Nothing => {}
            Start::Read => self.read_online(key),
        }
    }

    /// Reads whether a newly watched user is online anywhere; a failed read is done again at
    /// link up unless a message about the user arrives first.
    fn read_online(&self, key: UserKey) {
        let Some(cluster) = self.cluster() else { return };
        let Some(shard) = cluster.shard.upgrade() else { return };
        let command = users::is_online(&cluster.prefix, &self.apps().get(key.0).config.id, &key.1);
        let asked = cluster.commands.request(vec![command]);
        monoio::spawn(async move {
            let replies = match asked {
                Ok(asked) => asked.replies().await,
                Err(unavailable) => Err(unavailable),
            };
            let online = replies.ok().and_then(|r| r.first().and_then(|r| users::decided(r).ok()));
            shard.online_read(key, online);
        });
    }

    fn online_read(&self, key: UserKey, online: Option<bool>) {
        let Some(cluster) = self.cluster() else { return };
        if cluster.online.borrow_mut().read_done(&key, online) {
            self.tell_watchers(&key, message::watchlist_event("online", &[&key.1]));
        }
    }

    /// A watchlist message arrived from the bucket: to the user's home shard on this node.
    pub(super) fn watchlist_arrived(&self, app: AppIndex, user_id: &str, online: bool, frame: Bytes) {
        let home = presence::home(app, &user_home_key(user_id), self.mesh.shards());
        let user_id = user_id.into();
        if home == self.index {
            return self.watchlist_decided(app, user_id, online, frame);
        }
        self.mesh_send(home, MeshMessage::Watchlist { app, user_id, online, frame });
    }

    /// Home shard: a script decided a user's cluster-wide change; its watchers here hear it.
    pub(super) fn watchlist_decided(&self, app: AppIndex, user_id: Box<str>, online: bool, frame: Bytes) {
        let Some(cluster) = self.cluster() else { return };
        let key = (app, user_id);
        if cluster.online.borrow_mut().decided(&key, online) {
            self.tell_watchers(&key, frame);
        }
    }

    fn tell_watchers(&self, key: &UserKey, frame: Bytes) {
        let watchers: Vec<Watcher> = self.state.borrow().home.watchers_of(key).to_vec();
        for watcher in watchers {
            self.send_to(watcher, frame.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str) -> UserKey {
        (0, user.into())
    }

    /// A first watcher reads; later ones follow what the read or the messages said; a read is
    /// ignored once a message arrived after it was sent; repeated decisions are not news.
    #[test]
    fn reads_and_messages() {
        let mut state = ClusterOnline::default();
        let alice = key("alice");
        assert_eq!(state.watch_started(&alice), Start::Read);
        assert_eq!(state.watch_started(&alice), Start::Nothing);
        assert!(state.read_done(&alice, Some(true)));
        assert_eq!(state.watch_started(&alice), Start::Online);
        assert!(!state.decided(&alice, true), "already known online");
        assert!(state.decided(&alice, false));
        assert!(!state.decided(&alice, false));
        state.forget(&alice);
        assert!(!state.decided(&alice, true), "not watched: nothing to tell");
        assert_eq!(state.watch_started(&alice), Start::Read);
        assert!(!state.decided(&alice, false), "offline already: not news");
        assert!(!state.read_done(&alice, Some(true)), "a message arrived after the read was sent");
        assert_eq!(state.watch_started(&alice), Start::Nothing);
        let bob = key("bob");
        assert_eq!(state.watch_started(&bob), Start::Read);
        assert!(!state.read_done(&bob, None), "a failed read tells nothing");
        assert_eq!(state.take_unread(), vec![bob.clone()], "and is done again");
        assert!(state.take_unread().is_empty());
        assert!(!state.read_done(&bob, Some(false)));
        assert!(!state.read_done(&bob, None));
        assert!(state.decided(&bob, true));
        assert!(state.take_unread().is_empty(), "a message made the read unnecessary");
        state.unsynced(bob.clone());
        assert_eq!(state.take_unsynced().into_iter().collect::<Vec<_>>(), vec![bob]);
        assert!(state.take_unsynced().is_empty());
    }
}
