//! The dashboard's live JSON: the shards' parts of one `Query::Dashboard` scatter-gather,
//! summed per app, plus the counters every shard already keeps in `metrics`.
//!
//! Pure: takes the parts and the counters, returns a JSON value. Rates are not computed here:
//! the page keeps the previous snapshot and divides the counters' deltas by the time between.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::apps::Apps;
use crate::metrics::ShardMetrics;
use crate::shard::mesh::ShardSnapshot;

/// What the snapshot is built from, besides the shards' parts.
pub struct Inputs<'a> {
    /// Every shard's counters.
    pub metrics: &'a [ShardMetrics],
    /// Messages waiting in each shard's inbound ring.
    pub ring_depths: &'a [usize],
    /// The apps (their node-wide connection counts, ids and webhook endpoints).
    pub apps: &'a Apps,
    /// Entries listed per app in `hot_channels` and `presence`.
    pub channels_shown_max: usize,
    /// Unix milliseconds, for the page's rate computation.
    pub now_ms: u64,
}

/// Counters shown per shard and summed in `totals`.
const SHARD_COUNTERS: [&str; 6] =
    ["connections", "subscriptions", "messages_in_total", "messages_out_total", "published_total", "mesh_outbox_depth"];

/// Node-wide counters shown in `totals` only.
const NODE_COUNTERS: [&str; 9] = [
    "http_requests_total",
    "slow_consumer_closes_total",
    "webhook_deliveries_total",
    "webhook_delivered_total",
    "webhook_attempts_failed_total",
    "webhook_pending",
    "webhook_dead_letters",
    "dashboard_auth_failures_total",
    "shard_down",
];

/// Builds the snapshot from the parts of every shard (in any order).
pub fn render(inputs: &Inputs<'_>, mut parts: Vec<ShardSnapshot>) -> Value {
    parts.sort_by_key(|p| p.shard);
    let values: Vec<HashMap<&str, u64>> = inputs.metrics.iter().map(counters).collect();
    let mut totals = serde_json::Map::new();
    for name in SHARD_COUNTERS.iter().chain(NODE_COUNTERS.iter()) {
        totals.insert((*name).into(), values.iter().map(|v| v.get(name).copied().unwrap_or(0)).sum::<u64>().into());
    }
    totals.insert("write_queue_bytes".into(), parts.iter().map(|p| p.write_queue_bytes).sum::<u64>().into());
    totals.insert("ring_depth".into(), inputs.ring_depths.iter().sum::<usize>().into());
    let shards: Vec<Value> = parts
        .iter()
        .map(|part| {
            let mut shard = serde_json::Map::new();
            shard.insert("shard".into(), part.shard.into());
            for name in SHARD_COUNTERS {
                shard
                    .insert(name.into(), values.get(part.shard).and_then(|v| v.get(name)).copied().unwrap_or(0).into());
            }
            shard.insert("ring_depth".into(), inputs.ring_depths.get(part.shard).copied().unwrap_or(0).into());
            shard.insert("write_queue_bytes".into(), part.write_queue_bytes.into());
            let down = values.get(part.shard).and_then(|v| v.get("shard_down")).is_some_and(|&d| d != 0);
            shard.insert("down".into(), down.into());
            Value::Object(shard)
        })
        .collect();
    let apps: Vec<Value> =
        inputs.apps.list.iter().filter(|app| !app.removed).map(|app| app_json(inputs, &parts, app)).collect();
    json!({ "time_ms": inputs.now_ms, "totals": totals, "shards": shards, "apps": apps })
}

fn counters(metrics: &ShardMetrics) -> HashMap<&'static str, u64> {
    let mut map = HashMap::new();
    // Read straight from the atomics rather than through the Prometheus text.
    let fields: [(&'static str, &std::sync::atomic::AtomicU64); 15] = [
        ("connections", &metrics.connections),
        ("subscriptions", &metrics.subscriptions),
        ("messages_in_total", &metrics.messages_in_total),
        ("messages_out_total", &metrics.messages_out_total),
        ("published_total", &metrics.published_total),
        ("mesh_outbox_depth", &metrics.mesh_outbox_depth),
        ("http_requests_total", &metrics.http_requests_total),
        ("slow_consumer_closes_total", &metrics.slow_consumer_closes_total),
        ("webhook_deliveries_total", &metrics.webhook_deliveries_total),
        ("webhook_delivered_total", &metrics.webhook_delivered_total),
        ("webhook_attempts_failed_total", &metrics.webhook_attempts_failed_total),
        ("webhook_pending", &metrics.webhook_pending),
        ("webhook_dead_letters", &metrics.webhook_dead_letters),
        ("dashboard_auth_failures_total", &metrics.dashboard_auth_failures_total),
        ("shard_down", &metrics.shard_down),
    ];
    for (name, value) in fields {
        map.insert(name, value.load(Ordering::Relaxed));
    }
    map
}

/// One app: its channels summed over shards, the hottest and the largest presence channels,
/// its webhook endpoints' health merged over shards.
fn app_json(inputs: &Inputs<'_>, parts: &[ShardSnapshot], app: &crate::apps::App) -> Value {
    let index = app.index as usize;
    let mut channels: HashMap<&str, u64> = HashMap::new();
    for (name, count) in parts.iter().filter_map(|p| p.channels.get(index)).flatten() {
        *channels.entry(name.as_ref()).or_default() += u64::from(*count);
    }
    let subscriptions: u64 = channels.values().sum();
    let mut hot: Vec<(&str, u64)> = channels.iter().map(|(n, c)| (*n, *c)).collect();
    hot.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    hot.truncate(inputs.channels_shown_max);
    // Each presence channel has one home shard, so its count comes from exactly one part.
    let mut presence: Vec<(&str, u32)> =
        parts.iter().filter_map(|p| p.presence.get(index)).flatten().map(|(n, c)| (n.as_ref(), *c)).collect();
    let presence_channels = presence.len();
    presence.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    presence.truncate(inputs.channels_shown_max);
    let mut webhooks = crate::webhook::admin::AdminAnswer::Health(Vec::new());
    for part in parts {
        let list = part.webhooks.get(index).cloned().unwrap_or_default();
        webhooks.merge(crate::webhook::admin::AdminAnswer::Health(list));
    }
    let crate::webhook::admin::AdminAnswer::Health(webhooks) = webhooks else {
        unreachable!("health merges to health")
    };
    // A connection lives on one shard, so the app's messages are the sum of the shards' counts.
    let traffic = parts.iter().filter_map(|p| p.traffic.get(index));
    let (messages_in, messages_out) = traffic.fold((0u64, 0u64), |(i, o), t| (i + t.messages_in, o + t.messages_out));
    json!({
        "id": app.config.id,
        "connections": app.connections(),
        "channels": channels.len(),
        "subscriptions": subscriptions,
        "presence_channels": presence_channels,
        "messages_in_total": messages_in,
        "messages_out_total": messages_out,
        "hot_channels": hot.iter().map(|(n, c)| json!({"name": n, "subscribers": c})).collect::<Vec<_>>(),
        "presence": presence.iter().map(|(n, c)| json!({"name": n, "members": c})).collect::<Vec<_>>(),
        "webhooks": webhooks.iter().map(crate::http::api::health_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AppConfig;
    use crate::shard::mesh::AppTraffic;

    fn part(shard: usize, channels: &[(&str, u32)], presence: &[(&str, u32)], queued: u64) -> ShardSnapshot {
        let list = |l: &[(&str, u32)]| l.iter().map(|(n, c)| (Box::<str>::from(*n), *c)).collect();
        ShardSnapshot {
            shard,
            write_queue_bytes: queued,
            channels: vec![list(channels)],
            presence: vec![list(presence)],
            webhooks: vec![Vec::new()],
            traffic: vec![AppTraffic { messages_in: shard as u64 + 1, messages_out: 10 * (shard as u64 + 1) }],
        }
    }

    /// Subscribers of one channel on several shards are summed, the hottest listed first and
    /// cut at `channels_shown_max`, and so are an app's messages; shards come out in order
    /// with their own load.
    #[test]
    fn sums_channels_over_shards_and_ranks_them() {
        let metrics: Vec<ShardMetrics> = (0..2).map(|_| ShardMetrics::default()).collect();
        ShardMetrics::add(&metrics[0].messages_out_total, 5);
        ShardMetrics::add(&metrics[1].messages_out_total, 7);
        let apps = Apps::new(&[AppConfig::demo()]);
        let inputs = Inputs { metrics: &metrics, ring_depths: &[0, 3], apps: &apps, channels_shown_max: 2, now_ms: 9 };
        let parts = vec![
            part(1, &[("a", 2), ("b", 1), ("presence-x", 1)], &[("presence-x", 2)], 40),
            part(0, &[("a", 1), ("c", 4), ("presence-x", 1)], &[], 2),
        ];
        let snapshot = render(&inputs, parts);
        let app = &snapshot["apps"][0];
        assert_eq!(app["channels"], 4);
        assert_eq!(app["subscriptions"], 10);
        assert_eq!(app["hot_channels"], json!([{"name": "c", "subscribers": 4}, {"name": "a", "subscribers": 3}]));
        assert_eq!(app["presence"], json!([{"name": "presence-x", "members": 2}]));
        assert_eq!((&app["messages_in_total"], &app["messages_out_total"]), (&json!(3), &json!(30)));
        assert_eq!(snapshot["shards"][0]["shard"], 0);
        assert_eq!(snapshot["shards"][1]["ring_depth"], 3);
        assert_eq!(snapshot["shards"][1]["write_queue_bytes"], 40);
        assert_eq!(snapshot["totals"]["messages_out_total"], 12);
        assert_eq!(snapshot["totals"]["write_queue_bytes"], 42);
    }
}
