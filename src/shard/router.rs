//! The shard-local channel table: for each app, channel name → this shard's subscribers.
//!
//! Owns nothing but the index; connections live in the shard's slab and are named here by
//! their slab key. Subscriber sets are `IndexSet`s: O(1) insert and remove, and iteration as
//! fast as a `Vec`, which is what fan-out does.

use std::collections::HashMap;

use indexmap::IndexSet;

use crate::apps::AppIndex;

/// Slab key of a connection on this shard (defined with the slab, in `connections`).
pub use super::connections::ConnKey;

/// Channel → subscribers, per app.
#[derive(Debug, Default)]
pub struct Router {
    apps: Vec<HashMap<Box<str>, IndexSet<ConnKey>>>,
}

impl Router {
    /// An empty table for `apps` apps.
    pub fn new(apps: usize) -> Router {
        Router { apps: (0..apps).map(|_| HashMap::new()).collect() }
    }

    /// Makes room for `apps` apps (a reload added some); never shrinks, since a removed app
    /// keeps its index.
    pub fn grow(&mut self, apps: usize) {
        if apps > self.apps.len() {
            self.apps.resize_with(apps, HashMap::new);
        }
    }

    /// Adds a subscriber; false if it was already subscribed.
    pub fn subscribe(&mut self, app: AppIndex, channel: &str, conn: ConnKey) -> bool {
        self.grow(app as usize + 1);
        let table = &mut self.apps[app as usize];
        match table.get_mut(channel) {
            Some(set) => set.insert(conn),
            None => {
                table.insert(channel.into(), IndexSet::from([conn]));
                true
            }
        }
    }

    /// Removes a subscriber; false if it was not subscribed. Empty channels are dropped.
    pub fn unsubscribe(&mut self, app: AppIndex, channel: &str, conn: ConnKey) -> bool {
        let Some(table) = self.apps.get_mut(app as usize) else {
            return false;
        };
        let Some(set) = table.get_mut(channel) else {
            return false;
        };
        let removed = set.swap_remove(&conn);
        if set.is_empty() {
            table.remove(channel);
        }
        removed
    }

    /// This shard's subscribers of a channel.
    pub fn subscribers(&self, app: AppIndex, channel: &str) -> Option<&IndexSet<ConnKey>> {
        // An app this shard does not know yet (another shard applied a reload first) has no
        // subscribers here.
        self.apps.get(app as usize)?.get(channel)
    }

    /// Channels of an app with at least one subscriber here, with their subscriber counts.
    pub fn occupied(&self, app: AppIndex) -> impl Iterator<Item = (&str, usize)> {
        self.apps.get(app as usize).into_iter().flatten().map(|(name, set)| (name.as_ref(), set.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subscribe and unsubscribe are idempotent and empty channels disappear.
    #[test]
    fn subscribe_unsubscribe() {
        let [one, two, three] = [1, 2, 3].map(ConnKey::from_index);
        let mut router = Router::new(2);
        assert!(router.subscribe(0, "a", one));
        assert!(!router.subscribe(0, "a", one));
        assert!(router.subscribe(0, "a", two));
        assert!(router.subscribe(1, "a", three));
        assert_eq!(router.subscribers(0, "a").map(IndexSet::len), Some(2));
        assert!(router.unsubscribe(0, "a", one));
        assert!(!router.unsubscribe(0, "a", one));
        assert!(router.unsubscribe(0, "a", two));
        assert!(router.subscribers(0, "a").is_none());
        assert_eq!(router.occupied(1).collect::<Vec<_>>(), vec![("a", 1)]);
    }
}
