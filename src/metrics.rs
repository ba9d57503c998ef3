//! Per-shard counters and their Prometheus text rendering.
//!
//! Each shard writes only its own `ShardMetrics` (relaxed atomics on a cache line of its own,
//! so there is no contention); `/metrics` on any shard reads them all. Hot paths add once per
//! batch (one writev, one ring drain), not once per recipient.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! shard_metrics {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// Counters and gauges of one shard.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct ShardMetrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl ShardMetrics {
            /// (name, type, help, value) for each metric.
            fn entries(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
                vec![$( (stringify!($name), $kind, concat!($($doc),*), self.$name.load(Ordering::Relaxed)), )*]
            }
        }
    };
}

shard_metrics! {
    /// Open WebSocket connections.
    connections: "gauge",
    /// WebSocket connections accepted since start.
    connections_opened_total: "counter",
    /// Open HTTP (non-WebSocket) connections.
    http_connections: "gauge",
    /// Channel subscriptions held by this shard's connections.
    subscriptions: "gauge",
    /// WebSocket messages received from clients.
    messages_in_total: "counter",
    /// WebSocket payload bytes received from clients.
    bytes_in_total: "counter",
    /// WebSocket frames written to clients.
    messages_out_total: "counter",
    /// Bytes written to WebSocket clients.
    bytes_out_total: "counter",
    /// Events published through the HTTP API on this shard.
    published_total: "counter",
    /// HTTP API requests served.
    http_requests_total: "counter",
    /// Messages sent to other shards.
    mesh_sent_total: "counter",
    /// Times a cross-shard ring was full and a message waited in the outbox.
    mesh_full_total: "counter",
    /// Messages waiting in this shard's outboxes for full rings.
    mesh_outbox_depth: "gauge",
    /// Connections closed with 4100 because their write queue exceeded its limit.
    slow_consumer_closes_total: "counter",
    /// Connections closed with 4201 after activity_timeout plus pong_timeout of silence.
    liveness_closes_total: "counter",
    /// Connections closed for a protocol violation (1002, 1007, 1009).
    protocol_closes_total: "counter",
    /// Connections refused because the shard was at connections_per_shard_max.
    connections_refused_total: "counter",
    /// Client messages dropped by the per-connection rate limit (pusher:error 4301).
    rate_limited_total: "counter",
    /// Config reloads applied (SIGHUP); node-wide, kept in shard 0's slot by the main thread.
    config_reloads_total: "counter",
    /// Config reloads refused (invalid file, unreadable certificate); node-wide, shard 0's slot.
    config_reload_failures_total: "counter",
    /// TLS handshakes completed on the TLS listener.
    tls_handshakes_total: "counter",
    /// TLS handshakes that failed, timed out (`tls.handshake_timeout_ms`) or met plain HTTP.
    tls_handshake_failures_total: "counter",
    /// 1 once the shard's thread has panicked (the node then stops; `/health` says 503).
    shard_down: "gauge",
    /// Webhook deliveries created (one per matching endpoint and batch).
    webhook_deliveries_total: "counter",
    /// Webhook deliveries answered with a 2xx.
    webhook_delivered_total: "counter",
    /// Webhook attempts that failed (any reason).
    webhook_attempts_failed_total: "counter",
    /// Webhook attempts refused by the SSRF guard (non-public address not allowed).
    webhook_ssrf_refused_total: "counter",
    /// Deliveries that became dead letters (retries exhausted or endpoint disabled).
    webhook_dead_letters_total: "counter",
    /// Deliveries waiting for an attempt or in flight.
    webhook_pending: "gauge",
    /// Dead letters kept for replay.
    webhook_dead_letters: "gauge",
    /// Lifecycle events not queued because the shard's webhook queue was full.
    webhook_events_dropped_total: "counter",
    /// Publishes refused with 503 because the webhook queue was full or failed.
    webhook_publishes_refused_total: "counter",
    /// fsync calls of the webhook WAL.
    wal_fsyncs_total: "counter",
    /// Bytes written to the webhook WAL.
    wal_bytes_written_total: "counter",
    /// 1 once this shard's webhook WAL has failed (deliveries refused, /ready 503) until restart.
    wal_failed: "gauge",
    /// The OS error number of that failure (0 when none or not a system call's).
    wal_failed_os_error: "gauge",
    /// 1 while this shard's links to Redis are down in cluster mode (then /ready says 503).
    cluster_link_down: "gauge",
    /// Buckets found gapped by this shard's link (a message may be missed; docs/cluster.md).
    cluster_gaps_total: "counter",
    /// Connections this shard closed with 4200 because a bucket they use was gapped.
    cluster_gap_closes_total: "counter",
    /// Dashboard requests refused for a wrong token (Bearer header or login form).
    dashboard_auth_failures_total: "counter",
}

impl ShardMetrics {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge.
    #[inline]
    pub fn sub(gauge: &AtomicU64, n: u64) {
        gauge.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Renders every shard's metrics, plus the ring depths read from the mesh.
pub fn render(shards: &[ShardMetrics], ring_depths: &[usize], ready: bool) -> String {
    let mut out = String::with_capacity(4096);
    let per_shard: Vec<_> = shards.iter().map(ShardMetrics::entries).collect();
    if let Some(first) = per_shard.first() {
        for (i, (name, kind, help, _)) in first.iter().enumerate() {
            let _ = writeln!(out, "# HELP ringwire_{name} {}", help.trim());
            let _ = writeln!(out, "# TYPE ringwire_{name} {kind}");
            for (shard, entries) in per_shard.iter().enumerate() {
                let _ = writeln!(out, "ringwire_{name}{{shard=\"{shard}\"}} {}", entries[i].3);
            }
        }
    }
    let _ = writeln!(out, "# HELP ringwire_mesh_ring_depth Messages waiting in the ring into this shard.");
    let _ = writeln!(out, "# TYPE ringwire_mesh_ring_depth gauge");
    for (shard, depth) in ring_depths.iter().enumerate() {
        let _ = writeln!(out, "ringwire_mesh_ring_depth{{shard=\"{shard}\"}} {depth}");
    }
    let _ = writeln!(out, "# HELP ringwire_ready 1 while accepting connections, 0 while shutting down.");
    let _ = writeln!(out, "# TYPE ringwire_ready gauge");
    let _ = writeln!(out, "ringwire_ready {}", u8::from(ready));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric appears once per shard with HELP and TYPE lines.
    #[test]
    fn render_shape() {
        let shards = [ShardMetrics::default(), ShardMetrics::default()];
        ShardMetrics::add(&shards[1].connections, 3);
        let text = render(&shards, &[0, 5], true);
        assert!(text.contains("# TYPE ringwire_connections gauge\nringwire_connections{shard=\"0\"} 0\nringwire_connections{shard=\"1\"} 3\n"), "{text}");
        assert!(text.contains("ringwire_mesh_ring_depth{shard=\"1\"} 5\n"));
        assert!(text.contains("# HELP ringwire_slow_consumer_closes_total Connections closed with 4100"));
        assert!(text.ends_with("ringwire_ready 1\n"));
    }
}
