//! `[cluster]`: the type, its defaults and its validation.

use serde::Deserialize;

use super::{find_key_line, Config, ConfigError};

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
    /// How often a node shares its app connection counts and reads the others' (for
    /// `apps.max_connections` over every node); a count not refreshed for three times this
    /// stops counting.
    pub connections_refresh_ms: u64,
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
            connections_refresh_ms: 1_000,
        }
    }
}

/// name, channel) may be escaped to six bytes per byte (`\u00XX`), plus the fixed keys.
impl Config {
    /// The `[cluster]` table.
    pub(super) fn validate_cluster(&self, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: String| {
            let key = format!("cluster.{field}");
            let line = find_key_line(text, &key);
            Err(ConfigError { key, line, message })
        };
        let cluster = &self.cluster;
        if let Some(url) = &cluster.redis_url {
            if let Err(reason) = crate::redis_url::RedisUrl::parse(url) {
                return err("redis_url", reason);
            }
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
        let ranges: [(&str, u64, u64, u64); 8] = [
            ("lease_ms", cluster.lease_ms, 1_000, 3_600_000),
            ("connect_timeout_ms", cluster.connect_timeout_ms, 1, 600_000),
            ("command_timeout_ms", cluster.command_timeout_ms, 1, 600_000),
            ("reply_bytes_max", cluster.reply_bytes_max as u64, 65_536, 1 << 30),
            ("pipeline_bytes_max", cluster.pipeline_bytes_max as u64, 65_536, 1 << 30),
            ("buckets", cluster.buckets as u64, 1, 4096),
            ("senders_max", cluster.senders_max as u64, 16, 1 << 20),
            ("connections_refresh_ms", cluster.connections_refresh_ms, 100, 60_000),
        ];
        for (field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return err(field, format!("must be between {min} and {max}"));
            }
        }
        // A presence join's answer holds the channel's whole member list (docs/cluster.md):
        // one over the limit would fail the link at every join of a full channel.
        if cluster.redis_url.is_some() {
            for app in &self.apps {
                let needed = presence_reply_bytes(app.presence_members_max, app.presence_user_info_bytes_max);
                if needed > cluster.reply_bytes_max as u128 {
                    return err(
                        "reply_bytes_max",
                        format!(
                            "must hold the member list of a full presence channel of app `{}`: at least {needed} \
                             (presence_members_max × (presence_user_info_bytes_max + {MEMBER_OVERHEAD_BYTES}) + \
                             {ANSWER_OVERHEAD_BYTES})",
                            app.id
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Bytes a member adds to a presence join's answer beyond its `user_info`: the user id (at
/// most 128 bytes) and the RESP framing of both bulk strings.
const MEMBER_OVERHEAD_BYTES: u128 = 160;
/// The rest of the answer: decision, incarnation, sequence, array headers.
const ANSWER_OVERHEAD_BYTES: u128 = 1024;

/// The largest presence join answer an app's limits allow.
fn presence_reply_bytes(members_max: usize, user_info_bytes_max: usize) -> u128 {
    members_max as u128 * (user_info_bytes_max as u128 + MEMBER_OVERHEAD_BYTES) + ANSWER_OVERHEAD_BYTES
}

fn name_problem(name: &str, extra: &[u8]) -> Option<String> {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || extra.contains(b);
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| allowed(&b)) {
        let extra: String = extra.iter().map(|&b| b as char).collect();
        return Some(format!("must be 1 to 64 ASCII letters, digits or any of `{extra}`"));
    }
    None
}
