//! Live reload of the apps on one shard: the new registry arrives through the mesh
//! (`MeshMessage::ReloadApps`, sent by `Server::reload`), replaces the one the shard reads, and
//! the connections of removed apps are closed with 4001. Never touches other shards' state;
//! holds no borrow across an await (it never awaits).

use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;

use super::{ConnKey, Shard};
use crate::apps::Apps;

/// Pusher protocol close code 4001: "Application does not exist"
/// (pusher.com/docs/channels/library_auth_reference/pusher-websockets-protocol, "Error codes").
pub const APP_REMOVED_CODE: u16 = 4001;

impl Shard {
    /// Swaps in `apps`, closes every connection of a removed app with 4001, then reports this
    /// shard's index on `done` (the reloading thread waits for every shard).
    pub(super) fn reload_apps(&self, apps: Arc<Apps>, done: mpsc::Sender<usize>) {
        let removed: Vec<ConnKey> = {
            let mut state = self.state.borrow_mut();
            state.router.grow(apps.list.len());
            let connections = state.connections.iter();
            connections.filter(|(_, conn)| apps.get(conn.app).removed).map(|(key, _)| key).collect()
        };
        *self.apps_cell.borrow_mut() = Rc::new(apps);
        for key in removed {
            self.refuse(key, APP_REMOVED_CODE, "Application does not exist");
        }
        // The reloading thread may have given up waiting; nothing is lost if so.
        let _ = done.send(self.index);
    }
}
