//! Configuration: one TOML file, parsed and validated before any thread starts.
//!
//! Owns the config types and their defaults. The documented default file
//! (`config/ringwire.default.toml`) is embedded in the binary and parses to exactly
//! `Config::default()` (a test holds it to that). Every error names the key and, where the
//! file has it, the line: a bad config must never start a half-working gateway.

use std::fmt;

use serde::Deserialize;

mod apps;
mod cluster;
mod dashboard;
mod live;
mod server;
mod webhooks;

pub use apps::AppConfig;
pub use cluster::ClusterConfig;
pub use dashboard::{DashboardConfig, DASHBOARD_TOKEN_BYTES_MIN};
pub use live::running_config;
pub use server::{HttpConfig, IoDriver, MeshConfig, ServerConfig, TlsConfig, WebSocketConfig};
pub use webhooks::{
    decode_standard_secret, DurabilityMode, WebhookConfig, WebhookFormat, WebhooksConfig, PUSHER_WEBHOOK_EVENTS,
};

/// The commented default configuration, embedded so `ringwire` runs with no file at all.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/ringwire.default.toml");

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener, shards and shutdown.
    pub server: ServerConfig,
    /// HTTP/1.1 server limits.
    pub http: HttpConfig,
    /// WebSocket and Pusher connection limits.
    pub websocket: WebSocketConfig,
    /// Cross-shard rings.
    pub mesh: MeshConfig,
    /// Webhook delivery: the durable queue, the HTTP client, retries, the SSRF guard.
    pub webhooks: WebhooksConfig,
    /// Cluster mode on Redis (docs/cluster.md); off unless `redis_url` is set.
    pub cluster: ClusterConfig,
    /// `wss://` and `https://` beside the plain listener; off unless `[tls]` is present.
    pub tls: Option<TlsConfig>,
    /// The operator dashboard at `/dashboard` (docs/dashboard.md); off by default.
    pub dashboard: DashboardConfig,
    /// The applications this node serves (at least one).
    pub apps: Vec<AppConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            http: HttpConfig::default(),
            websocket: WebSocketConfig::default(),
            mesh: MeshConfig::default(),
            webhooks: WebhooksConfig::default(),
            cluster: ClusterConfig::default(),
            tls: None,
            dashboard: DashboardConfig::default(),
            apps: vec![AppConfig::demo()],
        }
    }
}

/// A configuration error: what is wrong, which key, and where in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `apps[1].key`.
    pub key: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "config error at line {line}, key `{}`: {}", self.key, self.message),
            None => write!(f, "config error, key `{}`: {}", self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates a TOML document. `text` is kept only to point errors at lines.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        config.validate(text)?;
        Ok(config)
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Config {
        Config::from_toml(DEFAULT_CONFIG_TOML).expect("the embedded default config is valid")
    }

    /// Number of shards to start: `server.shards`, or one per available CPU.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    /// Semantic checks that the types cannot express.
    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let err = |key: String, message: String| {
            let line = find_key_line(text, &key);
            Err(ConfigError { key, line, message })
        };
        if self.server.shards > MAX_SHARDS {
            return err("server.shards".into(), format!("at most {MAX_SHARDS} shards are supported"));
        }
        let positive: [(&str, u64); 29] = [
            ("server.backlog", self.server.backlog.into()),
            ("server.connections_per_shard_max", self.server.connections_per_shard_max as u64),
            ("http.request_line_bytes_max", self.http.request_line_bytes_max as u64),
            ("http.header_bytes_max", self.http.header_bytes_max as u64),
            ("http.headers_count_max", self.http.headers_count_max as u64),
            ("http.header_timeout_ms", self.http.header_timeout_ms),
            ("http.keepalive_timeout_ms", self.http.keepalive_timeout_ms),
            ("http.write_timeout_ms", self.http.write_timeout_ms),
            ("websocket.frame_bytes_max", self.websocket.frame_bytes_max as u64),
            ("websocket.message_bytes_max", self.websocket.message_bytes_max as u64),
            ("websocket.write_queue_bytes_max", self.websocket.write_queue_bytes_max as u64),
            ("websocket.activity_timeout_s", self.websocket.activity_timeout_s.into()),
            ("websocket.pong_timeout_s", self.websocket.pong_timeout_s.into()),
            ("mesh.ring_capacity", self.mesh.ring_capacity as u64),
            ("webhooks.batch_sync_ms", self.webhooks.batch_sync_ms),
            ("webhooks.segment_bytes_max", self.webhooks.segment_bytes_max),
            ("webhooks.queue_bytes_max", self.webhooks.queue_bytes_max),
            ("webhooks.endpoint_queue_bytes_max", self.webhooks.endpoint_queue_bytes_max),
            ("webhooks.dns_timeout_ms", self.webhooks.dns_timeout_ms),
            ("webhooks.dns_threads", self.webhooks.dns_threads as u64),
            ("webhooks.connect_timeout_ms", self.webhooks.connect_timeout_ms),
            ("webhooks.request_timeout_ms", self.webhooks.request_timeout_ms),
            ("webhooks.response_bytes_max", self.webhooks.response_bytes_max as u64),
            ("webhooks.connections_per_endpoint_max", self.webhooks.connections_per_endpoint_max as u64),
            ("webhooks.pipeline_max", self.webhooks.pipeline_max as u64),
            ("webhooks.breaker_failures", self.webhooks.breaker_failures.into()),
            ("webhooks.batch_ms", self.webhooks.batch_ms),
            ("webhooks.batch_events_max", self.webhooks.batch_events_max as u64),
            ("webhooks.attempt_log_max", self.webhooks.attempt_log_max as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return err(key.into(), "must be greater than 0".into());
            }
        }
        if self.http.request_line_bytes_max > self.http.header_bytes_max {
            return err(
                "http.request_line_bytes_max".into(),
                "must not exceed http.header_bytes_max (the request line is part of the head)".into(),
            );
        }
        self.validate_webhooks(text)?;
        self.validate_cluster(text)?;
        self.validate_dashboard(text)?;
        if let Some(tls) = &self.tls {
            if tls.handshake_timeout_ms == 0 {
                return err("tls.handshake_timeout_ms".into(), "must be greater than 0".into());
            }
            if tls.bind == self.server.bind && tls.bind.port() != 0 {
                return err("tls.bind".into(), "must differ from server.bind".into());
            }
        }
        if self.apps.is_empty() {
            return err("apps".into(), "at least one [[apps]] table is required".into());
        }
        for (i, app) in self.apps.iter().enumerate() {
            for (field, value) in [("id", &app.id), ("key", &app.key), ("secret", &app.secret)] {
                if value.is_empty() {
                    return err(format!("apps[{i}].{field}"), "must not be empty".into());
                }
            }
            if !app.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return err(format!("apps[{i}].id"), "only letters, digits, '-' and '_' are allowed".into());
            }
            if !app.key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return err(format!("apps[{i}].key"), "only letters, digits, '-' and '_' are allowed".into());
            }
            for (j, other) in self.apps[..i].iter().enumerate() {
                if other.id == app.id {
                    return err(format!("apps[{i}].id"), format!("duplicates apps[{j}].id"));
                }
                if other.key == app.key {
                    return err(format!("apps[{i}].key"), format!("duplicates apps[{j}].key"));
                }
            }
            for (field, value) in [
                ("event_data_bytes_max", app.event_data_bytes_max),
                ("event_channels_max", app.event_channels_max),
                ("batch_events_max", app.batch_events_max),
                ("presence_members_max", app.presence_members_max),
                ("presence_user_info_bytes_max", app.presence_user_info_bytes_max),
                ("cache_ttl_s", app.cache_ttl_s as usize),
                ("channels_per_connection_max", app.channels_per_connection_max),
            ] {
                if value == 0 {
                    return err(format!("apps[{i}].{field}"), "must be greater than 0".into());
                }
            }
            if app.presence_debounce_ms > PRESENCE_DEBOUNCE_MS_MAX {
                let message = format!("at most {PRESENCE_DEBOUNCE_MS_MAX} (0 turns the debounce off)");
                return err(format!("apps[{i}].presence_debounce_ms"), message);
            }
        }
        Ok(())
    }
}

/// Longest presence debounce: a member who left stays listed this long at most (Pusher's own
/// window is 3 s; a minute is already a stale member list, not a debounce).
pub const PRESENCE_DEBOUNCE_MS_MAX: u64 = 60_000;

/// Most DNS lookup threads (each blocked lookup holds one; more is a typo, not a need).
pub const DNS_THREADS_MAX: usize = 64;

/// Most shards one process runs (the mesh keeps a ring per shard; beyond this it is a mistake).
pub const MAX_SHARDS: usize = 256;

/// Turns a toml/serde error into a ConfigError naming the key and line.
fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let line = error.span().map(|span| line_of(text, span.start));
    let message = error.message().trim().to_string();
    // serde reports unknown keys as "unknown field `x`"; the span points at the key itself.
    let key = error
        .span()
        .and_then(|span| text.get(span.clone()))
        .map(|s| s.trim().trim_matches(['[', ']']).to_string())
        .filter(|s| !s.is_empty() && s.len() < 80 && !s.contains('\n'))
        .unwrap_or_else(|| "(document)".into());
    ConfigError { key, line, message }
}

fn line_of(text: &str, offset: usize) -> usize {
    // Bytes, not str slicing: a span offset need not fall on a char boundary.
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Best-effort line of a dotted key path such as `server.shards` or `apps[1].key`.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let (table, field) = key.rsplit_once('.').unwrap_or(("", key));
    let (table_name, index) = match table.split_once('[') {
        Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut current = String::new();
    let mut array_seen = 0usize;
    let mut in_target = table_name.is_empty();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            current = header.trim().to_string();
            if current == table_name {
                in_target = index.is_none_or(|i| i == array_seen);
                array_seen += 1;
            } else {
                in_target = false;
            }
            if field.is_empty() && in_target {
                return Some(n + 1);
            }
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = header.trim().to_string();
            in_target = current == table_name;
            continue;
        }
        let name = line.split('=').next().unwrap_or("").trim();
        if in_target && name == field {
            return Some(n + 1);
        }
    }
    let _ = current;
    None
}

#[cfg(test)]
mod tests;
