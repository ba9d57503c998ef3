//! Live reload on one shard: the running config, the apps and the webhook endpoints arrive
//! through the mesh (`MeshMessage::Reload`, sent by `Server::reload`) and replace what the
//! shard reads; the connections of removed apps are closed with 4001. Never touches other
//! shards' state; holds no borrow across an await (it never awaits).

use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;

use monoio_rustls::TlsConnector;

use super::{ConnKey, Shard};
use crate::apps::Apps;
use crate::config::Config;

/// Pusher protocol close code 4001: "Application does not exist"
/// (pusher.com/docs/channels/library_auth_reference/pusher-websockets-protocol, "Error codes").
pub const APP_REMOVED_CODE: u16 = 4001;

/// One reload, as every shard applies it.
pub struct Reload {
    /// The running config: the keys that apply live are the new file's, the others the
    /// start's (`Server::reload` decides which).
    pub config: Arc<Config>,
    /// The apps (indexes and counters of kept apps unchanged); their webhook endpoints are
    /// the dispatcher's new endpoints.
    pub apps: Arc<Apps>,
    /// The TLS settings for `https://` endpoints, when some endpoint needs them.
    pub webhook_tls: Option<TlsConnector>,
    /// Where the shard reports that it has applied the reload (its index).
    pub done: mpsc::Sender<usize>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload").field("apps", &self.apps).finish_non_exhaustive()
    }
}

impl Shard {
    /// Swaps in the config and the apps, hands the endpoints to the webhook dispatcher, closes
    /// every connection of a removed app with 4001, then reports this shard's index on `done`
    /// (the reloading thread waits for every shard).
    pub(super) fn reload(&self, reload: Reload) {
        let Reload { config, apps, webhook_tls, done } = reload;
        let removed: Vec<ConnKey> = {
            let mut state = self.state.borrow_mut();
            state.router.grow(apps.list.len());
            let connections = state.connections.iter();
            connections.filter(|(_, conn)| apps.get(conn.app).removed).map(|(key, _)| key).collect()
        };
        if let Some(webhooks) = self.webhooks() {
            webhooks.reload(config.clone(), &apps, webhook_tls);
        }
        *self.config_cell.borrow_mut() = Rc::new(config);
        *self.apps_cell.borrow_mut() = Rc::new(apps);
        for key in removed {
            self.refuse(key, APP_REMOVED_CODE, "Application does not exist");
        }
        // The reloading thread may have given up waiting; nothing is lost if so.
        let _ = done.send(self.index);
    }
}
