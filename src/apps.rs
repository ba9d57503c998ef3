//! The applications a node serves: immutable settings shared by every shard, plus the one
//! piece of cross-shard admission state, each app's live connection count (an atomic touched
//! once per connect and disconnect, never per message).
//!
//! A reload (`Apps::reloaded`) builds a new registry that keeps every app's `AppIndex` and
//! its counters: indexes name apps in shard state and mesh messages, so a removed app stays
//! as a tombstone (`removed`) rather than shifting the apps after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

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
    /// Removed by a reload: unknown to key and id lookups, kept so indexes stay stable.
    pub removed: bool,
    /// Live WebSocket connections across all shards (shared with the app's successors after
    /// a reload, so connections admitted before it are released against the same count).
    connections: Arc<AtomicU32>,
    /// Backend-event rate window, all shards: a `RateWindow::pack`ed word.
    backend_events: Arc<AtomicU64>,
    /// Cluster mode: live connections on the other nodes, as last read from Redis (0 on a
    /// single node); shared with the app's successors after a reload like `connections`.
    elsewhere: Arc<AtomicU32>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("App").field("id", &self.config.id).field("key", &self.config.key).finish_non_exhaustive()
    }
}

/// What `Apps::reloaded` changed beyond keys, secrets and limits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AppsChange {
    /// Apps removed by this reload (their connections are to be closed with 4001).
    pub removed: Vec<AppIndex>,
    /// What changed and is not applied live: `apps.subscription_count_enabled`, and
    /// `apps.webhooks` on a node that started without any endpoint (it runs no dispatcher) or
    /// when a kept app gains its first lifecycle endpoint (its channels were not counted).
    pub needs_restart: Vec<&'static str>,
}

impl AppsChange {
    fn restart(&mut self, what: &'static str) {
        if !self.needs_restart.contains(&what) {
            self.needs_restart.push(what);
        }
    }
}

/// Whether any of these endpoints is Pusher-format (lifecycle events).
fn has_lifecycle(webhooks: &[crate::config::WebhookConfig]) -> bool {
    webhooks.iter().any(|w| w.format == WebhookFormat::Pusher)
}

impl App {
    /// A kept app under its new config. Its webhook endpoints are the new ones when
    /// `webhooks_live` (the dispatcher takes them); its subscription counting stays: the home
    /// shards' counts start at zero, so turning it on for channels that already have
    /// subscribers would count them wrong.
    fn succeeded_by(&self, config: &AppConfig, webhooks_live: bool, change: &mut AppsChange) -> App {
        let mut webhooks = config.webhooks.clone();
        if webhooks != self.config.webhooks && !webhooks_live {
            change.restart("apps.webhooks");
            webhooks = self.config.webhooks.clone();
        }
        let mut wants_lifecycle = has_lifecycle(&webhooks);
        if wants_lifecycle && !self.counts_subscriptions {
            // channel_occupied/vacated need the counts; the endpoint gets them after a restart.
            change.restart("apps.webhooks (a first lifecycle endpoint)");
            wants_lifecycle = self.wants_lifecycle;
            webhooks.retain(|w| w.format != WebhookFormat::Pusher);
        }
        if config.subscription_count_enabled != self.config.subscription_count_enabled {
            change.restart("apps.subscription_count_enabled");
        }
        let config = AppConfig {
            webhooks,
            subscription_count_enabled: self.config.subscription_count_enabled,
            ..config.clone()
        };
        App {
            index: self.index,
            secret_key: hmac::Key::new(hmac::HMAC_SHA256, config.secret.as_bytes()),
            config,
            wants_lifecycle,
            counts_subscriptions: self.counts_subscriptions,
            removed: false,
            connections: self.connections.clone(),
            backend_events: self.backend_events.clone(),
            elsewhere: self.elsewhere.clone(),
        }
    }

    /// An app added by a reload, with its webhook endpoints when `webhooks_live` (it has no
    /// subscribers yet, so its subscriptions are counted from zero rightly).
    fn fresh(index: AppIndex, config: &AppConfig, webhooks_live: bool, change: &mut AppsChange) -> App {
        let mut config = config.clone();
        if !config.webhooks.is_empty() && !webhooks_live {
            change.restart("apps.webhooks");
            config.webhooks.clear();
        }
        App::built(index, config)
    }

    /// A new app with zeroed counters (at start, or added by a reload).
    fn built(index: AppIndex, config: AppConfig) -> App {
        let wants_lifecycle = has_lifecycle(&config.webhooks);
        App {
            index,
            secret_key: hmac::Key::new(hmac::HMAC_SHA256, config.secret.as_bytes()),
            wants_lifecycle,
            counts_subscriptions: config.subscription_count_enabled || wants_lifecycle,
            removed: false,
            connections: Arc::default(),
            backend_events: Arc::default(),
            elsewhere: Arc::default(),
            config,
        }
    }

    /// Admits one more connection unless the app is at `max_connections` (in cluster mode,
    /// counting the other nodes' connections as last read).
    pub fn try_admit(&self) -> bool {
        if self.removed {
            return false;
        }
        let max = self.config.max_connections;
        let elsewhere = self.elsewhere.load(Ordering::Relaxed);
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n.saturating_add(elsewhere) < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Cluster mode: the other nodes' live connections, as just read from Redis.
    pub fn set_elsewhere(&self, connections: u32) {
        self.elsewhere.store(connections, Ordering::Relaxed);
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
        let list: Vec<App> =
            configs.iter().enumerate().map(|(i, config)| App::built(i as AppIndex, config.clone())).collect();
        Apps::indexed(list)
    }

    fn indexed(list: Vec<App>) -> Apps {
        let live = || list.iter().filter(|a| !a.removed);
        let by_key = live().map(|a| (a.config.key.clone(), a.index)).collect();
        let by_id = live().map(|a| (a.config.id.clone(), a.index)).collect();
        Apps { list, by_key, by_id }
    }

    /// The registry after a reload to `configs` (validated), matching apps by id: a kept app
    /// keeps its index and counters and takes its new key, secret and limits; an app no
    /// longer configured becomes a tombstone; a new app is appended (or revives its own
    /// tombstone). Webhook endpoints change live when `webhooks_live` (the node runs a webhook
    /// dispatcher, which takes them); subscription counting does not (the home shards' counts
    /// start at zero). What is not applied is kept as it runs and named in
    /// `AppsChange::needs_restart`.
    pub fn reloaded(&self, configs: &[AppConfig], webhooks_live: bool) -> (Apps, AppsChange) {
        let mut change = AppsChange::default();
        let mut list: Vec<App> = Vec::with_capacity(self.list.len().max(configs.len()));
        for old in &self.list {
            let successor = configs.iter().find(|c| c.id == old.config.id);
            if !old.removed && successor.is_none() {
                change.removed.push(old.index);
            }
            list.push(match successor {
                Some(config) if !old.removed => old.succeeded_by(config, webhooks_live, &mut change),
                // A revived app keeps the tombstone's counters: connections of its previous
                // life may still be tearing down and release against them.
                Some(config) => App {
                    connections: old.connections.clone(),
                    backend_events: old.backend_events.clone(),
                    elsewhere: old.elsewhere.clone(),
                    ..App::fresh(old.index, config, webhooks_live, &mut change)
                },
                None => App { removed: true, ..old.succeeded_by(&old.config, webhooks_live, &mut change) },
            });
        }
        for config in configs.iter().filter(|c| !self.list.iter().any(|a| a.config.id == c.id)) {
            list.push(App::fresh(list.len() as AppIndex, config, webhooks_live, &mut change));
        }
        (Apps::indexed(list), change)
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

    fn app(id: &str) -> AppConfig {
        AppConfig { id: id.into(), key: format!("key-{id}"), secret: format!("secret-{id}"), ..AppConfig::demo() }
    }

    /// A reload keeps indexes and connection counts, tombstones a removed app (unknown to
    /// lookups, admitting nobody), appends a new one, and revives a tombstone in place.
    #[test]
    fn reload_keeps_indexes_and_counters() {
        let apps = Apps::new(&[app("a"), app("b"), app("c")]);
        assert!(apps.get(1).try_admit());
        let rotated = AppConfig { secret: "new".into(), max_connections: 7, ..app("c") };
        let (next, change) = apps.reloaded(&[app("a"), rotated, app("d")], false);
        assert_eq!(change, AppsChange { removed: vec![1], needs_restart: vec![] });
        assert!(next.by_id("b").is_none() && next.by_key("key-b").is_none() && !next.get(1).try_admit());
        assert_eq!(next.get(1).connections(), 1, "the removed app's count outlives it");
        let c = next.by_id("c").unwrap();
        assert_eq!((c.index, c.config.secret.as_str(), c.config.max_connections), (2, "new", 7));
        assert_eq!(next.by_key("key-d").unwrap().index, 3);
        let (revived, _) = next.reloaded(&[app("a"), app("b"), app("c"), app("d")], false);
        assert_eq!((revived.by_id("b").unwrap().index, revived.get(1).connections()), (1, 1));
        assert_eq!(revived.list.len(), 4);
    }

    /// Subscription counting is not changed live, nor webhook endpoints on a node without a
    /// dispatcher, and the reload says so.
    #[test]
    fn reload_reports_webhooks_as_needing_a_restart() {
        let apps = Apps::new(&[app("a")]);
        let mut changed = app("a");
        changed.subscription_count_enabled = true;
        changed.webhooks = vec![hook(WebhookFormat::Standard)];
        let (next, change) = apps.reloaded(&[changed], false);
        assert_eq!(change.needs_restart, ["apps.webhooks", "apps.subscription_count_enabled"]);
        let a = next.get(0);
        assert!(!a.counts_subscriptions && !a.config.subscription_count_enabled && a.config.webhooks.is_empty());
    }

    fn hook(format: WebhookFormat) -> crate::config::WebhookConfig {
        match format {
            WebhookFormat::Pusher => crate::config::WebhookConfig::pusher("http://127.0.0.1:9/hook"),
            WebhookFormat::Standard => crate::config::WebhookConfig::standard("http://127.0.0.1:9/hook", "whsec_AAAA"),
        }
    }

    /// With a dispatcher, endpoints change live; a kept app's first lifecycle endpoint is held
    /// back (its channels were never counted), a new app's is taken and counted from zero.
    #[test]
    fn reload_takes_webhooks_live_with_a_dispatcher() {
        let apps = Apps::new(&[app("a")]);
        let a = AppConfig { webhooks: vec![hook(WebhookFormat::Standard), hook(WebhookFormat::Pusher)], ..app("a") };
        let b = AppConfig { webhooks: vec![hook(WebhookFormat::Pusher)], ..app("b") };
        let (next, change) = apps.reloaded(&[a, b], true);
        assert_eq!(change.needs_restart, ["apps.webhooks (a first lifecycle endpoint)"]);
        let (a, b) = (next.get(0), next.get(1));
        assert_eq!(a.config.webhooks, [hook(WebhookFormat::Standard)]);
        assert!(!a.wants_lifecycle && b.wants_lifecycle && b.counts_subscriptions);
    }
}
