//! `[server]`, `[http]`, `[websocket]`, `[mesh]` and `[tls]`: the types and their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

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
