//! ringwire: a thread-per-core real-time event gateway — Pusher Channels protocol v7
//! WebSockets and the Pusher HTTP API, on monoio/io_uring.
//!
//! # Layout
//! - `config`: the TOML configuration, its defaults and validation.
//! - `server`: binds listeners and runs one pinned shard thread per CPU.
//! - `shard`: a shard's state and tasks; `shard::mesh` (the only thing that crosses threads),
//!   `shard::router` (channel → local subscribers), `shard::connections` (slab, write queues,
//!   liveness), `shard::outbox`, `shard::session` (Pusher per connection), `shard::home` (pure
//!   home-shard state returning effects) and `shard::home_link` (routing to it),
//!   `shard::accept` (the accept rule).
//! - `buf`: `FrameBatch` (shared frames for one writev) and `read_more` (a read that appends),
//!   used by the connections, the webhook client and the Redis link; a leaf that imports
//!   nothing of the crate.
//! - `net`: sockets — `listener` (SO_REUSEPORT, accept), `conn` (HTTP keep-alive, WebSocket
//!   reader/writer), `stream` (plain or TLS, as `conn` sees it), `tls` (rustls on accepted
//!   sockets).
//! - `http`: the server side — `parse` (sans-IO request heads, responses), `api` (Pusher REST,
//!   health, metrics, webhook admin), `dashboard` (the operator page at `/dashboard`: `auth`,
//!   `snapshot` from one scatter-gather; its HTML, CSS and JS are embedded files).
//! - `ws`: `handshake` (RFC 6455 upgrade), `frame` (sans-IO frame decoder, encoders).
//! - `pusher`: `message` (protocol JSON), `channel` (names, kinds), `auth` (request signing).
//! - `apps`: the applications and their admission counters.
//! - `metrics`: per-shard counters, Prometheus text.
//! - `rate`: the fixed one-second window behind every per-second limit.
//! - `wal`: the webhook write-ahead log (`record` format, `storage` real and simulated, `index`
//!   the one index of live deliveries and batch items).
//! - `webhook`: lifecycle and event webhooks — `event` (payloads, filters), `sign`, `retry`,
//!   `resolver` (host-name lookups on their own threads), `client` (outbound HTTP/1.1, plain or
//!   TLS), `admin` (typed admin answers), `dispatch` (per-shard queues, workers, health).
//! - `target`: webhook URLs, CIDR blocks, the SSRF guard; a leaf that `config` validates with.
//! - `redis_url`: what `cluster.redis_url` means; a leaf that `config` validates with.
//! - `cluster`: cluster mode on Redis — `link` (RESP2 connection), `supervisor`, `message`,
//!   `bucket`, `sequence`, `outbound` and `commands` (a shard's queues to its link), `scripts`,
//!   `users` (watchlist scripts), `limits`.
//! - `doctor`: the host checked against the config (`ringwire doctor`, the start-up log) —
//!   `host` (facts gathered once), `checks` (pure verdicts with their fixes).
//!
//! No two top-level modules import each other (`tests/integration/tidy.rs` checks it): the
//! parsers `config` validates with live in leaves (`target`, `redis_url`) or in `config`.

pub mod apps;
pub mod buf;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod metrics;
pub mod rate;
pub mod redis_url;
pub mod server;
pub mod shard;
pub mod target;
pub mod wal;
pub mod webhook;

/// Sockets and their I/O.
pub mod net {
    pub mod conn;
    pub mod listener;
    pub mod stream;
    pub mod tls;
}

/// HTTP/1.1 server side: parsing and the API.
pub mod http {
    pub mod api;
    pub mod dashboard;
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
