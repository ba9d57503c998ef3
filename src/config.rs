//! Configuration: one TOML file, parsed and validated before any thread starts.
//!
//! Owns the config types and their defaults. The documented default file
//! (`config/ringwire.default.toml`) is embedded in the binary and parses to exactly
//! `Config::default()` (a test holds it to that). Every error names the key and, where the
//! file has it, the line: a bad config must never start a half-working gateway.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Time allowed for writing one whole response (WebSocket handshakes included); a client
    /// that does not read it by then is disconnected.
    pub write_timeout_ms: u64,
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

/// `[tls]`: a second listener speaking TLS (every route of the plain one: WebSocket, HTTP API,
/// health, metrics). The files are read at start and by `check-config` (`net::tls`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The address to serve TLS on, e.g. `0.0.0.0:443`.
    pub bind: SocketAddr,
    /// The certificate chain (PEM), the server's certificate first.
    pub cert_file: PathBuf,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Time for a client's whole TLS handshake; a slower one is cut and counted.
    #[serde(default = "TlsConfig::default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

impl TlsConfig {
    fn default_handshake_timeout_ms() -> u64 {
        10_000
    }
}

/// `[dashboard]`: the operator page at `/dashboard` (docs/dashboard.md).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// Serve the dashboard; without it `/dashboard` answers 404.
    pub enabled: bool,
    /// The operator's credential (at least `DASHBOARD_TOKEN_BYTES_MIN` printable ASCII bytes).
    pub token: String,
    /// Hottest channels and largest presence channels shown per app.
    pub channels_shown_max: usize,
}

/// Shortest dashboard token accepted: 16 bytes, so that guessing it online is hopeless.
pub const DASHBOARD_TOKEN_BYTES_MIN: usize = 16;

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig { enabled: false, token: String::new(), channels_shown_max: 10 }
    }
}

// Hand-written so that the token never reaches a log line through `{:?}`.
impl fmt::Debug for DashboardConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardConfig")
            .field("enabled", &self.enabled)
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("channels_shown_max", &self.channels_shown_max)
            .finish()
    }
}

/// `[cluster]`: several nodes sharing one Redis (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[[user]:password@]host[:port][/db]`; unset = single node, no Redis.
    pub redis_url: Option<String>,
    /// This node's name in Redis keys and messages; unset = generated per process.
    pub node_id: Option<String>,
    /// Prefix of every Redis key and channel, so deployments can share one Redis.
    pub prefix: String,
    /// How long a silent node's presence members and subscriptions outlive it.
    pub lease_ms: u64,
    /// Time for a TCP connect to Redis.
    pub connect_timeout_ms: u64,
    /// Time for Redis to answer a handshake or a pipeline of commands.
    pub command_timeout_ms: u64,
    /// Largest Redis reply or pushed message; over it the link is dropped and reconnected.
    pub reply_bytes_max: usize,
    /// Largest batch of commands written to Redis at once.
    pub pipeline_bytes_max: usize,
    /// Sharded pub/sub channels each app's channels hash into; equal on every node. At most
    /// 4096 (validated), so it fits the `u16` bucket numbers.
    pub buckets: usize,
    /// Most senders (node shards) whose sequences a shard tracks for gap detection.
    pub senders_max: usize,
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
            write_timeout_ms: 10_000,
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

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: None,
            node_id: None,
            prefix: "ringwire".into(),
            lease_ms: 10_000,
            connect_timeout_ms: 2_000,
            command_timeout_ms: 2_000,
            reply_bytes_max: 16 * 1024 * 1024,
            pipeline_bytes_max: 4 * 1024 * 1024,
            buckets: 64,
            senders_max: 4096,
        }
    }
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
            webhooks: Vec::new(),
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
        }
        Ok(())
    }
}

impl Config {
    /// The `[webhooks]` table and every `[[apps.webhooks]]`.
    fn validate_webhooks(&self, text: &str) -> Result<(), ConfigError> {
        use crate::webhook::{sign::StandardSigner, target::Cidr, target::Target};
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
                        if let Err(e) = StandardSigner::new(&secrets) {
                            return herr("secret", e.0);
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

/// Largest JSON one Standard Webhooks event can take: every string it carries (data, event
/// name, channel) may be escaped to six bytes per byte (`\u00XX`), plus the fixed keys.
impl Config {
    /// The `[cluster]` table.
    fn validate_cluster(&self, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: String| {
            let key = format!("cluster.{field}");
            let line = find_key_line(text, &key);
            Err(ConfigError { key, line, message })
        };
        let cluster = &self.cluster;
        if let Some(url) = &cluster.redis_url {
            if let Err(reason) = crate::cluster::url::RedisUrl::parse(url) {
                return err("redis_url", reason);
            }
            // Refused rather than ignored: a node that silently ran alone would split the app.
            return err("redis_url", "cluster mode is not wired into the server yet (docs/cluster.md)".into());
        }
        if let Some(node_id) = &cluster.node_id {
            if let Some(reason) = name_problem(node_id, b"._-") {
                return err("node_id", reason);
            }
        }
        // `{` and `}` are left out: they would make a Redis Cluster hash tag of the prefix.
        if let Some(reason) = name_problem(&cluster.prefix, b"._:-") {
            return err("prefix", reason);
        }
        let ranges: [(&str, u64, u64, u64); 7] = [
            ("lease_ms", cluster.lease_ms, 1_000, 3_600_000),
            ("connect_timeout_ms", cluster.connect_timeout_ms, 1, 600_000),
            ("command_timeout_ms", cluster.command_timeout_ms, 1, 600_000),
            ("reply_bytes_max", cluster.reply_bytes_max as u64, 65_536, 1 << 30),
            ("pipeline_bytes_max", cluster.pipeline_bytes_max as u64, 65_536, 1 << 30),
            ("buckets", cluster.buckets as u64, 1, 4096),
            ("senders_max", cluster.senders_max as u64, 16, 1 << 20),
        ];
        for (field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return err(field, format!("must be between {min} and {max}"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The `[dashboard]` table: an enabled dashboard needs a token worth the name.
    fn validate_dashboard(&self, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: String| {
            let key = format!("dashboard.{field}");
            let line = find_key_line(text, &key).or_else(|| find_key_line(text, "dashboard.enabled"));
            Err(ConfigError { key, line, message })
        };
        let dashboard = &self.dashboard;
        if !(1..=1000).contains(&dashboard.channels_shown_max) {
            return err("channels_shown_max", "must be between 1 and 1000".into());
        }
        // A token travels in an `Authorization` header and a form field: visible ASCII only.
        if !dashboard.token.bytes().all(|b| b.is_ascii_graphic()) {
            return err("token", "must be printable ASCII without spaces".into());
        }
        if dashboard.enabled && dashboard.token.len() < DASHBOARD_TOKEN_BYTES_MIN {
            let message =
                format!("an enabled dashboard needs a token of at least {DASHBOARD_TOKEN_BYTES_MIN} characters");
            return err("token", message);
        }
        Ok(())
    }
}

/// Why `name` cannot be a node id or prefix: 1 to 64 ASCII letters, digits and `extra`.
fn name_problem(name: &str, extra: &[u8]) -> Option<String> {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || extra.contains(b);
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| allowed(&b)) {
        let extra: String = extra.iter().map(|&b| b as char).collect();
        return Some(format!("must be 1 to 64 ASCII letters, digits or any of `{extra}`"));
    }
    None
}

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

    /// Webhook settings are checked with the key and line of the offending entry.
    #[test]
    fn webhook_errors_name_key_and_line() {
        let app = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n";
        let ok = "[[apps.webhooks]]\nurl = \"http://127.0.0.1:9/\"\nformat = \"pusher\"\n";
        let bad_url = format!("{app}{ok}[[apps.webhooks]]\nformat = \"pusher\"\nurl = \"ftp://x/\"\n");
        check_error(&bad_url, "apps[0].webhooks[1].url", Some(10), "http://");
        let bad_secret =
            format!("{app}[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"standard\"\nsecret = \"whsec_AAAA\"\n");
        check_error(&bad_secret, "apps[0].webhooks[0].secret", Some(8), "bytes");
        let no_secret = format!("{app}[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"standard\"\n");
        check_error(&no_secret, "apps[0].webhooks[0].secret", None, "at least one secret");
        let bad_event =
            format!("{app}[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"pusher\"\nevents = [\"nope\"]\n");
        check_error(&bad_event, "apps[0].webhooks[0].events", Some(8), "unknown event");
        check_error("[webhooks]\nallowed_cidrs = [\"10.0.0.0/40\"]\n", "webhooks.allowed_cidrs", Some(2), "prefix");
        let e = Config::from_toml("[webhooks]\ndurability = \"sometimes\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("unknown variant"), "{e}");
        check_error("[webhooks]\nretry_schedule_ms = []\n", "webhooks.retry_schedule_ms", Some(2), "at least one");
        let good = format!("{app}{ok}[[apps.webhooks]]\nurl = \"https://example.com/e\"\nformat = \"standard\"\nsecret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\nchannels = [\"orders-*\"]\n");
        assert_eq!(Config::from_toml(&good).unwrap().apps[0].webhooks.len(), 2);
    }

    /// A missing `ca_file` is refused at load, naming the key and line; its certificates are
    /// parsed later, once, by the server's TLS connector.
    #[test]
    fn missing_ca_file_names_key() {
        let text = "[webhooks]\nca_file = \"/nonexistent/ringwire-ca.pem\"\n";
        check_error(text, "webhooks.ca_file", Some(2), "not a readable file");
    }

    /// Batches whose worst case would pass the WAL's 64 MiB record limit are refused at load,
    /// naming the key and line; the defaults (and the largest standard batch with them) fit.
    #[test]
    fn webhook_batches_fit_a_wal_record() {
        let app = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n";
        let pusher = "[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"pusher\"\n";
        let big_messages =
            format!("[websocket]\nmessage_bytes_max = 4194304\n[webhooks]\nbatch_events_max = 20\n{app}{pusher}");
        check_error(&big_messages, "webhooks.batch_events_max", Some(4), "record limit");
        // The same limits without a pusher-format webhook have nothing to bound.
        assert!(Config::from_toml(&format!("[websocket]\nmessage_bytes_max = 4194304\n{app}")).is_ok());
        let secret = "secret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\n";
        let standard = |n: usize| {
            format!("[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"standard\"\n{secret}batch_events_max = {n}\n")
        };
        assert!(Config::from_toml(&format!("{app}{}", standard(1000))).is_ok());
        let big_data =
            format!("[http]\nbody_bytes_max = 1048576\n{app}event_data_bytes_max = 1048576\n{}", standard(100));
        check_error(&big_data, "apps[0].webhooks[0].batch_events_max", Some(12), "record limit");
        assert!(Config::from_toml(&format!("{app}{pusher}")).is_ok());
    }

    /// `[cluster]` values are checked with key and line: hostile URLs, names that would break
    /// Redis keys, limits out of range; a URL is refused until cluster mode is wired in.
    #[test]
    fn cluster_errors_name_key_and_line() {
        check_error("[cluster]\nredis_url = \"http://x\"\n", "cluster.redis_url", Some(2), "redis://");
        check_error("[cluster]\nredis_url = \"redis://h:0\"\n", "cluster.redis_url", Some(2), "port");
        check_error("[cluster]\nredis_url = \"redis://h\"\n", "cluster.redis_url", Some(2), "not wired");
        check_error("[cluster]\nnode_id = \"a{b}\"\n", "cluster.node_id", Some(2), "ASCII");
        check_error("[cluster]\n\nnode_id = \"\"\n", "cluster.node_id", Some(3), "1 to 64");
        check_error(&format!("[cluster]\nnode_id = \"{}\"\n", "n".repeat(65)), "cluster.node_id", Some(2), "64");
        check_error("[cluster]\nprefix = \"p{1}\"\n", "cluster.prefix", Some(2), "ASCII");
        check_error("[cluster]\nlease_ms = 10\n", "cluster.lease_ms", Some(2), "between 1000");
        check_error("[cluster]\ncommand_timeout_ms = 0\n", "cluster.command_timeout_ms", Some(2), "between 1");
        check_error("[cluster]\nreply_bytes_max = 1024\n", "cluster.reply_bytes_max", Some(2), "between 65536");
        check_error("[cluster]\nbuckets = 0\n", "cluster.buckets", Some(2), "between 1 and 4096");
        check_error("[cluster]\nbuckets = 4097\n", "cluster.buckets", Some(2), "between 1 and 4096");
        check_error("[cluster]\nsenders_max = 15\n", "cluster.senders_max", Some(2), "between 16");
        let e = Config::from_toml("[cluster]\npipeline_bytes_max = -1\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        check_error("[cluster]\n\nbuckets = 70000\n", "cluster.buckets", Some(3), "between 1 and 4096");
        let e = Config::from_toml("[cluster]\nbuckets = -1\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let good = "[cluster]\nnode_id = \"eu-1.a\"\nprefix = \"prod:rw\"\nlease_ms = 5000\n";
        assert_eq!(Config::from_toml(good).unwrap().cluster.node_id.as_deref(), Some("eu-1.a"));
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

    /// The DNS settings refuse hostile values (no threads, a thread per typo'd zero, no
    /// timeout) naming the key and line; a cache TTL of 0 (off) is allowed.
    #[test]
    fn dns_settings_are_bounded() {
        check_error("[webhooks]\ndns_threads = 0\n", "webhooks.dns_threads", Some(2), "greater than 0");
        check_error("[webhooks]\ndns_threads = 100000\n", "webhooks.dns_threads", Some(2), "at most 64");
        check_error("[webhooks]\ndns_timeout_ms = 0\n", "webhooks.dns_timeout_ms", Some(2), "greater than 0");
        assert_eq!(Config::from_toml("[webhooks]\ndns_cache_ttl_ms = 0\n").unwrap().webhooks.dns_cache_ttl_ms, 0);
    }

    /// A write timeout of 0 (every response would fail at once) is refused naming key and line.
    #[test]
    fn write_timeout_must_be_positive() {
        check_error("[http]\nwrite_timeout_ms = 0\n", "http.write_timeout_ms", Some(2), "greater than 0");
    }

    /// An enabled dashboard needs a printable token of at least 16 characters; a short, absent
    /// or spaced token and a zero or huge list size are refused naming the key and line.
    #[test]
    fn dashboard_token_and_limits_are_checked() {
        check_error("[dashboard]\nenabled = true\n", "dashboard.token", Some(2), "at least 16");
        check_error("[dashboard]\nenabled = true\ntoken = \"short\"\n", "dashboard.token", Some(3), "at least 16");
        let spaced = "[dashboard]\ntoken = \"0123456789 abcdef\"\n";
        check_error(spaced, "dashboard.token", Some(2), "printable ASCII");
        check_error("[dashboard]\nchannels_shown_max = 0\n", "dashboard.channels_shown_max", Some(2), "between 1");
        check_error("[dashboard]\nchannels_shown_max = 100000\n", "dashboard.channels_shown_max", Some(2), "between 1");
        check_error("[dashboard]\ntokn = \"x\"\n", "tokn", Some(2), "unknown field");
        let ok = Config::from_toml("[dashboard]\nenabled = true\ntoken = \"0123456789abcdef\"\n").unwrap();
        assert!(ok.dashboard.enabled);
        assert!(!format!("{ok:?}").contains("0123456789abcdef"), "Debug must not print the token");
    }
}
