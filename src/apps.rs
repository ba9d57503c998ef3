//! The applications a node serves: immutable settings shared by every shard, plus the one
//! piece of cross-shard admission state, each app's live connection count (an atomic touched
//! once per connect and disconnect, never per message).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use ring::hmac;

use crate::config::{AppConfig, WebhookFormat};
use crate::rate::RateWindow;

/// Index of an app in `Apps::list`; small and `Copy`, used on hot paths instead of names.
pub type AppIndex = u32;

/// One application.
pub struct App {
    /// Its position in `Apps::list`.
    pub index: AppIndex,
    /// Settings from the config.
    pub config: AppConfig,
    /// HMAC-SHA256 key precomputed from the secret.
    pub secret_key: hmac::Key,
    /// It has Pusher-format (lifecycle) webhooks.
    pub wants_lifecycle: bool,
    /// Channel occupancy must be counted on home shards (subscription_count or
    /// occupied/vacated webhooks).
    pub counts_subscriptions: bool,
    /// Live WebSocket connections across all shards.
    connections: AtomicU32,
    /// Backend-event rate window, all shards: a `RateWindow::pack`ed word.
    backend_events: AtomicU64,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("App").field("id", &self.config.id).field("key", &self.config.key).finish_non_exhaustive()
    }
}

impl App {
    /// Admits one more connection unless the app is at `max_connections`.
    pub fn try_admit(&self) -> bool {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .is_ok()
    }

    /// Releases a connection admitted by `try_admit`.
    pub fn release(&self) {
        let previous = self.connections.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(previous > 0, "released more connections than admitted");
    }

    /// Admits `events` published events in second `now_s` unless that would pass
    /// `backend_events_per_second_max` (a fixed one-second window shared by all shards).
    pub fn try_publish(&self, events: u32, now_s: u64) -> bool {
        let max = self.config.backend_events_per_second_max;
        if max == 0 {
            return true;
        }
        self.backend_events
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let mut window = RateWindow::unpack(word);
                window.try_admit(now_s & 0xffff_ffff, events, max).then(|| window.pack())
            })
            .is_ok()
    }

    /// Live connections.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// All apps, with lookups by key (WebSocket path) and id (HTTP API path).
#[derive(Debug)]
pub struct Apps {
    /// Apps in config order.
    pub list: Vec<App>,
    by_key: HashMap<String, AppIndex>,
    by_id: HashMap<String, AppIndex>,
}

impl Apps {
    /// Builds the registry from validated configs.
    pub fn new(configs: &[AppConfig]) -> Apps {
        let list: Vec<App> = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let wants_lifecycle = config.webhooks.iter().any(|w| w.format == WebhookFormat::Pusher);
                App {
                    index: i as AppIndex,
                    config: config.clone(),
                    secret_key: hmac::Key::new(hmac::HMAC_SHA256, config.secret.as_bytes()),
                    wants_lifecycle,
                    counts_subscriptions: config.subscription_count_enabled || wants_lifecycle,
                    connections: AtomicU32::new(0),
                    backend_events: AtomicU64::new(0),
                }
            })
            .collect();
        let by_key = list.iter().map(|a| (a.config.key.clone(), a.index)).collect();
        let by_id = list.iter().map(|a| (a.config.id.clone(), a.index)).collect();
        Apps { list, by_key, by_id }
    }

    /// The app with this public key.
    pub fn by_key(&self, key: &str) -> Option<&App> {
        self.by_key.get(key).map(|&i| &self.list[i as usize])
    }

    /// The app with this id.
    pub fn by_id(&self, id: &str) -> Option<&App> {
        self.by_id.get(id).map(|&i| &self.list[i as usize])
    }

    /// The app at an index.
    pub fn get(&self, index: AppIndex) -> &App {
        &self.list[index as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend-event window admits up to the limit per second, batches counted whole.
    #[test]
    fn backend_event_rate() {
        let mut config = AppConfig::demo();
        config.backend_events_per_second_max = 5;
        let apps = Apps::new(&[config]);
        let app = apps.get(0);
        assert!(app.try_publish(3, 100));
        assert!(!app.try_publish(3, 100), "3 + 3 > 5: refused whole");
        assert!(app.try_publish(2, 100));
        assert!(!app.try_publish(1, 100));
        assert!(app.try_publish(5, 101), "a new second starts empty");
    }
}
