//! `[[apps]]`: the type and its defaults (validated with the whole config in `Config::validate`).

use serde::Deserialize;

use super::WebhookConfig;

/// `[[apps]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// App id, as in `/apps/{id}/...`.
    pub id: String,
    /// Public key clients connect with (`/app/{key}`).
    pub key: String,
    /// Secret for HMAC signatures. Never logged.
    pub secret: String,
    /// Whether client-* events are relayed.
    #[serde(default = "default_true")]
    pub enable_client_events: bool,
    /// Concurrent WebSocket connections; 0 = unlimited.
    #[serde(default)]
    pub max_connections: u32,
    /// Largest `data` of one published event.
    #[serde(default = "default_event_data_bytes_max")]
    pub event_data_bytes_max: usize,
    /// Channels per publish.
    #[serde(default = "default_event_channels_max")]
    pub event_channels_max: usize,
    /// Events per batch.
    #[serde(default = "default_batch_events_max")]
    pub batch_events_max: usize,
    /// Members (distinct users) per presence channel.
    #[serde(default = "default_presence_members_max")]
    pub presence_members_max: usize,
    /// Bytes of one member's `user_info` JSON.
    #[serde(default = "default_presence_user_info_bytes_max")]
    pub presence_user_info_bytes_max: usize,
    /// Send `pusher_internal:subscription_count` to subscribers of non-presence channels.
    #[serde(default)]
    pub subscription_count_enabled: bool,
    /// Channels one connection may be subscribed to at once.
    #[serde(default = "default_channels_per_connection_max")]
    pub channels_per_connection_max: usize,
    /// Events per second this app may publish through the HTTP API, all shards together;
    /// 0 = unlimited. Over it: 429.
    #[serde(default)]
    pub backend_events_per_second_max: u32,
    /// Seconds a cache channel keeps its last event.
    #[serde(default = "default_cache_ttl_s")]
    pub cache_ttl_s: u64,
    /// Milliseconds a member's last connection on a node stays counted after it leaves, so a
    /// reconnect within the window causes no `member_removed`/`member_added` (Pusher's
    /// presence debounce); 0 = off.
    #[serde(default = "default_presence_debounce_ms")]
    pub presence_debounce_ms: u64,
    /// Client events one connection may send per second; 0 = unlimited.
    #[serde(default = "default_client_events_per_second_max")]
    pub client_events_per_second_max: u32,
    /// Seconds a connection may stay without signing in or joining a private or presence
    /// channel before it is closed with 4009; 0 = no limit ("authorized connections" off).
    #[serde(default)]
    pub authorized_connections_timeout_s: u32,
    /// Webhook endpoints.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
}

fn default_true() -> bool {
    true
}
fn default_event_data_bytes_max() -> usize {
    10240
}
fn default_event_channels_max() -> usize {
    100
}
fn default_batch_events_max() -> usize {
    10
}
fn default_channels_per_connection_max() -> usize {
    100
}
fn default_cache_ttl_s() -> u64 {
    3600
}
fn default_presence_debounce_ms() -> u64 {
    3000
}
fn default_client_events_per_second_max() -> u32 {
    10
}
fn default_presence_members_max() -> usize {
    100
}
fn default_presence_user_info_bytes_max() -> usize {
    1024
}

impl AppConfig {
    /// The demo app of the embedded default config.
    pub fn demo() -> AppConfig {
        AppConfig {
            id: "1".into(),
            key: "ringwire-demo-key".into(),
            secret: "ringwire-demo-secret".into(),
            enable_client_events: true,
            max_connections: 0,
            event_data_bytes_max: default_event_data_bytes_max(),
            event_channels_max: default_event_channels_max(),
            batch_events_max: default_batch_events_max(),
            presence_members_max: default_presence_members_max(),
            presence_user_info_bytes_max: default_presence_user_info_bytes_max(),
            subscription_count_enabled: false,
            channels_per_connection_max: default_channels_per_connection_max(),
            backend_events_per_second_max: 0,
            cache_ttl_s: default_cache_ttl_s(),
            presence_debounce_ms: default_presence_debounce_ms(),
            client_events_per_second_max: default_client_events_per_second_max(),
            authorized_connections_timeout_s: 0,
            webhooks: Vec::new(),
        }
    }
}
