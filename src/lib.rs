//! ringwire: a thread-per-core real-time event gateway — Pusher Channels protocol v7
//! WebSockets and the Pusher HTTP API, on monoio/io_uring.
//!
//! # Layout
//! - `config`: the TOML configuration, its defaults and validation.
//! - `server`: binds listeners and runs one pinned shard thread per CPU.
//! - `shard`: a shard's state and tasks; `shard::mesh` (the only thing that crosses threads),
//!   `shard::router` (channel → local subscribers), `shard::session` (Pusher per connection).
//! - `net`: sockets — `listener` (SO_REUSEPORT, accept), `conn` (HTTP keep-alive, WebSocket
//!   reader/writer), `batch` (shared frames for one writev).
//! - `http`: `parse` (sans-IO request heads, responses), `api` (Pusher REST, health, metrics,
//!   webhook admin), `client` (outbound HTTP/1.1 for webhooks).
//! - `ws`: `handshake` (RFC 6455 upgrade), `frame` (sans-IO frame decoder, encoders).
//! - `pusher`: `message` (protocol JSON), `channel` (names, kinds), `auth` (request signing).
//! - `apps`: the applications and their admission counters.
//! - `metrics`: per-shard counters, Prometheus text.
//! - `wal`: the webhook write-ahead log (`record` format, `storage` real and simulated).
//! - `webhook`: lifecycle and event webhooks — `event` (payloads, filters), `sign`, `retry`,
//!   `target` (URLs, SSRF guard), `dispatch` (per-shard queues, workers, health).
//! - `cluster`: cluster mode on Redis — `url` (`cluster.redis_url`), `link` (RESP2 connection).
//! - `doctor`: the host checked against the config (`ringwire doctor`, the start-up log) —
//!   `host` (facts gathered once), `checks` (pure verdicts with their fixes).

pub mod apps;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod metrics;
pub mod server;
pub mod shard;
pub mod wal;
pub mod webhook;

/// Sockets and their I/O.
pub mod net {
    pub mod batch;
    pub mod conn;
    pub mod listener;
}

/// HTTP/1.1: parsing and the API.
pub mod http {
    pub mod api;
    pub mod client;
    pub mod parse;
}

/// WebSocket protocol (RFC 6455).
pub mod ws {
    pub mod frame;
    pub mod handshake;
}

/// Pusher Channels protocol v7.
pub mod pusher {
    pub mod auth;
    pub mod channel;
    pub mod message;
}

pub use config::Config;
pub use server::Server;
