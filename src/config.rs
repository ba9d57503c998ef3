//! Configuration: one TOML file, parsed and validated before any thread starts.
//!
//! Owns the config types and their defaults. The documented default file
//! (`config/ringwire.default.toml`) is embedded in the binary and parses to exactly
//! `Config::default()` (a test holds it to that). Every error names the key and, where the
//! file has it, the line: a bad config must never start a half-working gateway.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

/// The commented default configuration, embedded so `ringwire` runs with no file at all.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/ringwire.default.toml");

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
    /// The applications this node serves (at least one).
    pub apps: Vec<AppConfig>,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the single listening port.
    pub bind: SocketAddr,
    /// Shard threads; 0 = one per available CPU.
    pub shards: usize,
    /// Which io driver each shard's runtime uses.
    pub io_driver: IoDriver,
    /// Listen backlog per shard socket.
    pub backlog: u32,
    /// Open connections per shard.
    pub connections_per_shard_max: usize,
    /// Window over which WebSockets are closed with 4200 at shutdown.
    pub shutdown_close_window_ms: u64,
    /// Longest wait for connections to close at shutdown.
    pub shutdown_grace_ms: u64,
}

/// The io driver of a shard runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    Auto,
    /// io_uring or refuse to start.
    IoUring,
    /// epoll only.
    Epoll,
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Longest request line.
    pub request_line_bytes_max: usize,
    /// All header bytes including the request line.
    pub header_bytes_max: usize,
    /// Number of headers.
    pub headers_count_max: usize,
    /// Request body bytes.
    pub body_bytes_max: usize,
    /// Time allowed for a request head to arrive.
    pub header_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this.
    pub keepalive_timeout_ms: u64,
}

/// `[websocket]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest declared frame payload a client may send.
    pub frame_bytes_max: usize,
    /// Largest reassembled message.
    pub message_bytes_max: usize,
    /// Unsent bytes queued for one connection before it is closed as a slow consumer.
    pub write_queue_bytes_max: usize,
    /// Advertised activity timeout in seconds.
    pub activity_timeout_s: u32,
    /// Extra seconds a silent client gets before it is closed with 4201.
    pub pong_timeout_s: u32,
    /// Messages per second one connection may send; 0 = unlimited.
    pub messages_per_second_max: u32,
    /// Serve `/echo`: a plain WebSocket echo on the same code path, for conformance suites.
    pub echo_enabled: bool,
}

/// `[mesh]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Messages per cross-shard ring.
    pub ring_capacity: usize,
}

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
    /// Client events one connection may send per second; 0 = unlimited.
    #[serde(default = "default_client_events_per_second_max")]
    pub client_events_per_second_max: u32,
    /// Seconds a connection may stay without signing in or joining a private or presence
    /// channel before it is closed with 4009; 0 = no limit ("authorized connections" off).
    #[serde(default)]
    pub authorized_connections_timeout_s: u32,
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
fn default_client_events_per_second_max() -> u32 {
    10
}
fn default_presence_members_max() -> usize {
    100
}
fn default_presence_user_info_bytes_max() -> usize {
    1024
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 6001)),
            shards: 0,
            io_driver: IoDriver::Auto,
            backlog: 1024,
            connections_per_shard_max: 100_000,
            shutdown_close_window_ms: 2000,
            shutdown_grace_ms: 5000,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            request_line_bytes_max: 8192,
            header_bytes_max: 16384,
            headers_count_max: 64,
            body_bytes_max: 262_144,
            header_timeout_ms: 10_000,
            keepalive_timeout_ms: 60_000,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            frame_bytes_max: 65536,
            message_bytes_max: 65536,
            write_queue_bytes_max: 1 << 20,
            activity_timeout_s: 120,
            pong_timeout_s: 30,
            messages_per_second_max: 100,
            echo_enabled: false,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig { ring_capacity: 4096 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            http: HttpConfig::default(),
            websocket: WebSocketConfig::default(),
            mesh: MeshConfig::default(),
            apps: vec![AppConfig::demo()],
        }
    }
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
            client_events_per_second_max: default_client_events_per_second_max(),
            authorized_connections_timeout_s: 0,
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
        let positive: [(&str, u64); 13] = [
            ("server.backlog", self.server.backlog.into()),
            ("server.connections_per_shard_max", self.server.connections_per_shard_max as u64),
            ("http.request_line_bytes_max", self.http.request_line_bytes_max as u64),
            ("http.header_bytes_max", self.http.header_bytes_max as u64),
            ("http.headers_count_max", self.http.headers_count_max as u64),
            ("http.header_timeout_ms", self.http.header_timeout_ms),
            ("http.keepalive_timeout_ms", self.http.keepalive_timeout_ms),
            ("websocket.frame_bytes_max", self.websocket.frame_bytes_max as u64),
            ("websocket.message_bytes_max", self.websocket.message_bytes_max as u64),
            ("websocket.write_queue_bytes_max", self.websocket.write_queue_bytes_max as u64),
            ("websocket.activity_timeout_s", self.websocket.activity_timeout_s.into()),
            ("websocket.pong_timeout_s", self.websocket.pong_timeout_s.into()),
            ("mesh.ring_capacity", self.mesh.ring_capacity as u64),
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
        }
        Ok(())
    }
}

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
mod tests {
    use super::*;

    fn check_error(text: &str, key: &str, line: Option<usize>, fragment: &str) {
        let e = Config::from_toml(text).expect_err("config should be refused");
        assert_eq!(e.key, key, "{e}");
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    /// The embedded, documented default file is exactly the built-in defaults.
    #[test]
    fn embedded_default_parses_to_defaults() {
        assert_eq!(Config::embedded_default(), Config::default());
    }

    /// An empty file is the defaults too (every key optional), demo app included.
    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    /// Unknown keys are refused with their name and line.
    #[test]
    fn unknown_key_names_key_and_line() {
        check_error("[server]\nbind = \"127.0.0.1:1\"\nshardz = 2\n", "shardz", Some(3), "unknown field");
    }

    /// Bad values are refused with their key and line.
    #[test]
    fn bad_value_names_line() {
        let e = Config::from_toml("[server]\nbind = \"nope\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = Config::from_toml("[server]\nio_driver = \"kqueue\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("unknown variant"), "{e}");
    }

    /// Semantic errors name the key and find its line.
    #[test]
    fn semantic_errors_name_key() {
        check_error("[websocket]\nframe_bytes_max = 0\n", "websocket.frame_bytes_max", Some(2), "greater than 0");
        let two_apps =
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n\n[[apps]]\nid = \"1\"\nkey = \"k2\"\nsecret = \"s\"\n";
        check_error(two_apps, "apps[1].id", Some(7), "duplicates apps[0].id");
        check_error("[[apps]]\nid = \"1\"\nkey = \"\"\nsecret = \"s\"\n", "apps[0].key", Some(3), "empty");
        check_error("apps = []\n", "apps", Some(1), "at least one");
    }
}
