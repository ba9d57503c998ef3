//! What the config gives a shard's webhook dispatcher: the endpoints, by their place in the
//! WAL's key table, and the `[webhooks]` settings derived from it (retry policy, breaker,
//! transport). Built at start and again by every reload, and swapped whole: a task that awaits
//! keeps the `Setup` it started with.
//!
//! Owns `Setup`. Never touches the queues, the WAL's records or sockets.
//!
//! Invariant: an endpoint's `EndpointIndex` is the id of its key (`"{app_id}/{endpoint_id}"`)
//! in the WAL's key table, so it is the same before and after a reload, and the records in the
//! log name it by key, so a restart on any config maps them to the right endpoint.

use std::sync::Arc;
use std::time::Duration;

use monoio_rustls::TlsConnector;

use super::endpoint::{build_endpoints, Endpoint, EndpointIndex, Transport};
use super::health::BreakerSettings;
use super::retry::RetryPolicy;
use crate::apps::{AppIndex, Apps};
use crate::config::Config;
use crate::target::{AddressPolicy, Cidr};

/// The dispatcher's configuration.
pub(super) struct Setup {
    /// The running config (its `[webhooks]` keys).
    pub(super) config: Arc<Config>,
    /// `retry_*`.
    pub(super) policy: RetryPolicy,
    /// `breaker_*`.
    pub(super) breaker: BreakerSettings,
    /// Address guard, TLS and the bounds of one exchange.
    pub(super) transport: Transport,
    /// Per endpoint index: the configured endpoint, `None` for a key met only in the log (an
    /// endpoint that left the config, at start or by a reload).
    endpoints: Vec<Option<Endpoint>>,
    /// Per app, the indexes of its endpoints, in config order.
    by_app: Vec<Vec<EndpointIndex>>,
}

impl Setup {
    /// The setup for `config` and the apps' endpoints (removed apps have none); `index_of`
    /// gives an endpoint key's index (the WAL interns it).
    pub(super) fn new(
        config: Arc<Config>,
        apps: &Apps,
        tls: Option<TlsConnector>,
        mut index_of: impl FnMut(&str) -> usize,
    ) -> Setup {
        let settings = &config.webhooks;
        let mut endpoints: Vec<Option<Endpoint>> = Vec::new();
        let mut by_app = vec![Vec::new(); apps.list.len()];
        for endpoint in build_endpoints(apps, settings.batch_events_max) {
            let index = index_of(&endpoint.key);
            if index >= endpoints.len() {
                endpoints.resize_with(index + 1, || None);
            }
            by_app[endpoint.app as usize].push(EndpointIndex::new(index));
            endpoints[index] = Some(endpoint);
        }
        let policy = RetryPolicy {
            schedule_ms: settings.retry_schedule_ms.clone(),
            jitter_percent: settings.retry_jitter_percent,
            overload_floor_ms: settings.retry_overload_floor_ms,
            retry_after_max_ms: settings.retry_after_max_ms,
        };
        let breaker = BreakerSettings {
            failures: settings.breaker_failures,
            cooldown: Duration::from_millis(settings.breaker_cooldown_ms),
        };
        let transport = Transport {
            addresses: AddressPolicy {
                allow_private: settings.allow_private_targets,
                allowed: settings.allowed_cidrs.iter().filter_map(|c| Cidr::parse(c).ok()).collect(),
            },
            tls,
            connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
            request_timeout: Duration::from_millis(settings.request_timeout_ms),
            response_bytes_max: settings.response_bytes_max,
        };
        Setup { config, policy, breaker, transport, endpoints, by_app }
    }

    /// The endpoint at `index`, if it is configured.
    pub(super) fn endpoint(&self, index: EndpointIndex) -> Option<&Endpoint> {
        self.endpoints.get(index.get()).and_then(Option::as_ref)
    }

    /// The endpoint at `index`, which the caller knows is configured (it came from
    /// `endpoints_of` on this setup).
    pub(super) fn configured(&self, index: EndpointIndex) -> &Endpoint {
        self.endpoint(index).expect("endpoints_of lists configured endpoints")
    }

    /// The app's endpoints (none for an app without any, or removed).
    pub(super) fn endpoints_of(&self, app: AppIndex) -> &[EndpointIndex] {
        self.by_app.get(app as usize).map_or(&[], Vec::as_slice)
    }

    /// Every configured endpoint with its index.
    pub(super) fn configured_endpoints(&self) -> impl Iterator<Item = (EndpointIndex, &Endpoint)> {
        let slots = self.endpoints.iter().enumerate();
        slots.filter_map(|(i, slot)| slot.as_ref().map(|endpoint| (EndpointIndex::new(i), endpoint)))
    }
}
