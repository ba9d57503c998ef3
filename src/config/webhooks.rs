//! `[webhooks]` and `[[apps.webhooks]]`: the types, their defaults and their validation.

use std::path::PathBuf;

use serde::Deserialize;

use super::{find_key_line, Config, ConfigError, DNS_THREADS_MAX};

/// `[webhooks]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Directory of the write-ahead logs (one subdirectory per shard).
    pub data_dir: PathBuf,
    /// When an accepted event counts as safe: `fsync`, `batch` or `memory`.
    pub durability: DurabilityMode,
    /// `batch` durability: fsync period.
    pub batch_sync_ms: u64,
    /// A WAL segment is rotated past this size.
    pub segment_bytes_max: u64,
    /// Bytes of queued (pending or dead) deliveries per shard, all endpoints together: the
    /// node's memory ceiling; over it the API answers 503.
    pub queue_bytes_max: u64,
    /// Bytes of queued (pending or dead) deliveries per endpoint per shard: one slow or gone
    /// receiver fills only its own budget; over it, publishes for that endpoint get 503.
    pub endpoint_queue_bytes_max: u64,
    /// Dead letters are kept this long after their creation, then dropped (0 = forever).
    pub dead_letter_retention_s: u64,
    /// Let webhooks reach loopback, private and other non-public addresses.
    pub allow_private_targets: bool,
    /// Non-public address blocks allowed anyway, e.g. `["10.1.0.0/16"]`.
    pub allowed_cidrs: Vec<String>,
    /// Extra CA certificates (PEM) trusted for `https://` endpoints, besides the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Delay before each attempt (the first is normally 0); its length is the attempt count.
    pub retry_schedule_ms: Vec<u64>,
    /// Each retry delay moves by up to ± this percentage.
    pub retry_jitter_percent: u32,
    /// Least delay after a 429 or a timeout.
    pub retry_overload_floor_ms: u64,
    /// Largest `Retry-After` honoured.
    pub retry_after_max_ms: u64,
    /// Time to wait for a DNS lookup of an endpoint's host.
    pub dns_timeout_ms: u64,
    /// Threads that run DNS lookups, per node (apart from the WAL's blocking pool).
    pub dns_threads: usize,
    /// How long a successful DNS answer is reused; 0 = not cached.
    pub dns_cache_ttl_ms: u64,
    /// Time to connect to an endpoint.
    pub connect_timeout_ms: u64,
    /// Time for a whole attempt (connect, send, response).
    pub request_timeout_ms: u64,
    /// Response body bytes read at most.
    pub response_bytes_max: usize,
    /// Keep-alive connections per endpoint per shard.
    pub connections_per_endpoint_max: usize,
    /// Requests written at once on one connection (1 = no pipelining).
    pub pipeline_max: usize,
    /// Consecutive failures that open an endpoint's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before a probe.
    pub breaker_cooldown_ms: u64,
    /// Pusher-format batching: longest wait.
    pub batch_ms: u64,
    /// Pusher-format batching: most events per request.
    pub batch_events_max: usize,
    /// Attempts remembered per shard for the admin API.
    pub attempt_log_max: usize,
}

/// `webhooks.durability`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityMode {
    /// The API answers after the delivery records are fsynced.
    Fsync,
    /// The API answers after they are written; fsync every `batch_sync_ms`.
    Batch,
    /// No disk: a crash loses what is queued.
    Memory,
}

/// `[[apps.webhooks]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name in the admin API; default: its position (`"0"`, `"1"`, …).
    #[serde(default)]
    pub id: Option<String>,
    /// Where to POST (`http://` or `https://`).
    pub url: String,
    /// `pusher` (lifecycle events) or `standard` (published events, Standard Webhooks).
    pub format: WebhookFormat,
    /// `pusher`: lifecycle events to send; absent = all.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// `standard`: the signing secret (`whsec_…`).
    #[serde(default)]
    pub secret: Option<String>,
    /// `standard`: further secrets that also sign (key rotation).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// `standard`: channel-name globs; absent = all.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// `standard`: event-name globs; absent = all.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    /// `standard`: events per delivery (a `ringwire.batch` payload); absent or 1 = one event
    /// per delivery. Batches wait at most `webhooks.batch_ms`.
    #[serde(default)]
    pub batch_events_max: Option<usize>,
}

impl WebhookConfig {
    /// A Pusher-format endpoint for every lifecycle event, with no id (tests, examples).
    pub fn pusher(url: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            id: None,
            url: url.into(),
            format: WebhookFormat::Pusher,
            events: None,
            secret: None,
            secrets: Vec::new(),
            channels: None,
            event_types: None,
            batch_events_max: None,
        }
    }

    /// A Standard Webhooks endpoint for every published event, signed with `secret`.
    pub fn standard(url: impl Into<String>, secret: impl Into<String>) -> WebhookConfig {
        WebhookConfig { format: WebhookFormat::Standard, secret: Some(secret.into()), ..WebhookConfig::pusher(url) }
    }

    /// Its name in the admin API and the WAL: `id`, or its position in the app's list.
    pub fn endpoint_id(&self, position: usize) -> String {
        self.id.clone().unwrap_or_else(|| position.to_string())
    }
}

/// `[[apps.webhooks]] format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// Pusher's lifecycle webhooks.
    Pusher,
    /// Standard Webhooks event subscriptions.
    Standard,
}

/// The lifecycle events a `pusher` endpoint may select.
pub const PUSHER_WEBHOOK_EVENTS: [&str; 7] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
];

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            data_dir: PathBuf::from("./ringwire-data"),
            durability: DurabilityMode::Fsync,
            batch_sync_ms: 100,
            segment_bytes_max: 64 << 20,
            queue_bytes_max: 256 << 20,
            endpoint_queue_bytes_max: 64 << 20,
            dead_letter_retention_s: 7 * 24 * 3600,
            allow_private_targets: false,
            allowed_cidrs: Vec::new(),
            ca_file: None,
            retry_schedule_ms: vec![0, 5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 36_000_000],
            retry_jitter_percent: 20,
            retry_overload_floor_ms: 60_000,
            retry_after_max_ms: 3_600_000,
            dns_timeout_ms: 5_000,
            dns_threads: 4,
            dns_cache_ttl_ms: 30_000,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 15_000,
            response_bytes_max: 65_536,
            connections_per_endpoint_max: 4,
            pipeline_max: 1,
            breaker_failures: 10,
            breaker_cooldown_ms: 30_000,
            batch_ms: 250,
            batch_events_max: 20,
            attempt_log_max: 10_000,
        }
    }
}

impl Config {
    /// The `[webhooks]` table and every `[[apps.webhooks]]`.
    pub(super) fn validate_webhooks(&self, text: &str) -> Result<(), ConfigError> {
        use crate::target::{Cidr, Target};
        let hooks = &self.webhooks;
        let err = |key: String, message: String| {
            let line = find_key_line(text, &key);
            Err(ConfigError { key, line, message })
        };
        if hooks.retry_schedule_ms.is_empty() {
            return err("webhooks.retry_schedule_ms".into(), "needs at least one entry (the first attempt)".into());
        }
        if hooks.dns_threads > DNS_THREADS_MAX {
            return err("webhooks.dns_threads".into(), format!("must be at most {DNS_THREADS_MAX}"));
        }
        if hooks.retry_jitter_percent > 100 {
            return err("webhooks.retry_jitter_percent".into(), "must be at most 100".into());
        }
        // Only that the file is there: its certificates are parsed once, when the server
        // builds its TLS connector (`Webhooks::tls_connector`), not here and again there.
        if let Some(path) = hooks.ca_file.as_ref().filter(|p| !p.is_file()) {
            return err("webhooks.ca_file".into(), format!("{} is not a readable file", path.display()));
        }
        for cidr in &hooks.allowed_cidrs {
            if let Err(e) = Cidr::parse(cidr) {
                return err("webhooks.allowed_cidrs".into(), format!("{cidr:?}: {e}"));
            }
        }
        let pusher_hooks = self.apps.iter().flat_map(|a| &a.webhooks).any(|h| h.format == WebhookFormat::Pusher);
        let pusher_event = pusher_event_bytes_max(self.websocket.message_bytes_max);
        if let Some(bytes) = delivery_bytes_over_limit(hooks.batch_events_max, pusher_event).filter(|_| pusher_hooks) {
            return err(
                "webhooks.batch_events_max".into(),
                format!(
                    "{} events of websocket.message_bytes_max can make a {bytes}-byte delivery, over the \
                     WAL's record limit of {} bytes",
                    hooks.batch_events_max,
                    crate::wal::record::RECORD_BYTES_MAX
                ),
            );
        }
        for (i, app) in self.apps.iter().enumerate() {
            for (j, hook) in app.webhooks.iter().enumerate() {
                let herr = |field: &str, message: String| {
                    let line = find_webhook_line(text, i, j, field);
                    Err(ConfigError { key: format!("apps[{i}].webhooks[{j}].{field}"), line, message })
                };
                if let Err(e) = Target::parse(&hook.url) {
                    return herr("url", e);
                }
                let id = hook.endpoint_id(j);
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    return herr("id", "only letters, digits, '-' and '_' are allowed".into());
                }
                if id == "deliveries" {
                    return herr("id", "\"deliveries\" is reserved by the admin API".into());
                }
                let duplicate = app.webhooks[..j].iter().enumerate().any(|(k, h)| h.endpoint_id(k) == id);
                if duplicate {
                    return herr("id", format!("another webhook of this app is already called {id:?}"));
                }
                match hook.format {
                    WebhookFormat::Pusher => {
                        if hook.secret.is_some() || !hook.secrets.is_empty() {
                            return herr("secret", "pusher-format webhooks are signed with the app secret".into());
                        }
                        if hook.batch_events_max.is_some() {
                            return herr(
                                "batch_events_max",
                                "pusher-format batching is webhooks.batch_events_max".into(),
                            );
                        }
                        if hook.channels.is_some() || hook.event_types.is_some() {
                            return herr("channels", "channels and event_types apply to format = \"standard\"".into());
                        }
                        for event in hook.events.iter().flatten() {
                            if !PUSHER_WEBHOOK_EVENTS.contains(&event.as_str()) {
                                let known = PUSHER_WEBHOOK_EVENTS.join(", ");
                                return herr("events", format!("unknown event {event:?}; known: {known}"));
                            }
                        }
                    }
                    WebhookFormat::Standard => {
                        if hook.events.is_some() {
                            return herr(
                                "events",
                                "format = \"standard\" selects with channels and event_types".into(),
                            );
                        }
                        if hook.batch_events_max.is_some_and(|n| n == 0 || n > 1000) {
                            return herr("batch_events_max", "must be 1 to 1000".into());
                        }
                        let events = hook.batch_events_max.unwrap_or(1);
                        let data = app.event_data_bytes_max.min(self.http.body_bytes_max);
                        if let Some(bytes) = delivery_bytes_over_limit(events, standard_event_bytes_max(data)) {
                            return herr(
                                "batch_events_max",
                                format!(
                                    "{events} events of apps[{i}].event_data_bytes_max can make a {bytes}-byte \
                                     delivery, over the WAL's record limit of {} bytes",
                                    crate::wal::record::RECORD_BYTES_MAX
                                ),
                            );
                        }
                        let secrets: Vec<String> = hook.secret.iter().chain(&hook.secrets).cloned().collect();
                        if secrets.is_empty() {
                            return herr("secret", "a standard endpoint needs at least one secret".into());
                        }
                        if let Some(Err(e)) = secrets.iter().map(|s| decode_standard_secret(s)).find(Result::is_err) {
                            return herr("secret", e);
                        }
                        for (field, globs) in [("channels", &hook.channels), ("event_types", &hook.event_types)] {
                            if globs.as_ref().is_some_and(|g| g.is_empty() || g.iter().any(String::is_empty)) {
                                return herr(
                                    field,
                                    "an empty list or pattern matches nothing; leave it out to match all".into(),
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why `name` cannot be a node id or prefix: 1 to 64 ASCII letters, digits and `extra`.
/// The key bytes of a Standard Webhooks secret (`whsec_<base64>`, the prefix optional): 16..=64
/// of them. Validation and `webhook::sign` both decode with this, so they agree.
pub fn decode_standard_secret(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "a secret must be whsec_ followed by base64".to_string())?;
    // The spec asks for 24..=64 random bytes; its test vector uses 24.
    if !(16..=64).contains(&bytes.len()) {
        return Err(format!("a secret must decode to 16..=64 bytes (24 or more recommended), not {}", bytes.len()));
    }
    Ok(bytes)
}

/// Largest JSON one Standard Webhooks event can take: every string it carries (data, event
fn standard_event_bytes_max(data_bytes_max: usize) -> usize {
    let names = crate::pusher::message::EVENT_NAME_BYTES_MAX + crate::pusher::channel::CHANNEL_NAME_BYTES_MAX;
    data_bytes_max.saturating_add(names).saturating_mul(6).saturating_add(256)
}

/// Largest JSON one Pusher lifecycle event can take: a client event carries strings from one
/// client message (channel, event, data) and a user id, each escaped up to six bytes per byte.
fn pusher_event_bytes_max(message_bytes_max: usize) -> usize {
    let user_id = crate::pusher::message::USER_ID_BYTES_MAX;
    message_bytes_max.saturating_add(user_id).saturating_mul(6).saturating_add(256)
}

/// The worst-case delivery of `events` events of `event_bytes` each (separators and the
/// envelope included), when it passes the WAL's record limit (the endpoint key is bounded by
/// a margin of 64 KiB); `None` when it fits.
fn delivery_bytes_over_limit(events: usize, event_bytes: usize) -> Option<usize> {
    let bytes = events.saturating_mul(event_bytes.saturating_add(1)).saturating_add(256);
    let limit = crate::wal::record::RECORD_BYTES_MAX - crate::wal::record::DELIVERY_OVERHEAD_BYTES - (64 << 10);
    (bytes > limit).then_some(bytes)
}

/// Line of `field` in the `j`-th `[[apps.webhooks]]` of the `i`-th `[[apps]]`.
fn find_webhook_line(text: &str, app: usize, hook: usize, field: &str) -> Option<usize> {
    let (mut apps_seen, mut hooks_seen, mut inside) = (0usize, 0usize, false);
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("[[apps]]") {
            apps_seen += 1;
            hooks_seen = 0;
            inside = false;
        } else if line.starts_with("[[apps.webhooks]]") {
            hooks_seen += 1;
            inside = apps_seen == app + 1 && hooks_seen == hook + 1;
        } else if line.starts_with('[') {
            inside = false;
        } else if inside && line.split('=').next().unwrap_or("").trim() == field {
            return Some(n + 1);
        }
    }
    None
}
