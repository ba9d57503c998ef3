//! Cluster mode: several nodes sharing one Redis act as one Pusher app (docs/cluster.md).
//!
//! This module owns the Redis link and the pieces fan-out and channel state are built from
//! (what `cluster.redis_url` means is the leaf `crate::redis_url`, which config validates
//! with): `link` (one connection from a shard's runtime to Redis: pipelined commands, or
//! sharded pub/sub pushes), `message` (the bucket message format, sans-IO), `bucket` (channel →
//! bucket, Redis names), `sequence` (gap detection, pure), `outbound` (a shard's messages
//! waiting for its command link), `commands` (a shard's scripts and queries waiting for it), `dashboard` (the
//! dashboard's cluster view: what nodes share for it and its one read),
//! `scripts` (the Lua scripts that decide cluster-wide transitions, their keys and calls) and
//! `supervisor` (a shard's two links: reconnects, re-subscribes, checks sequences, publishes
//! the outbound batches, runs the commands). It never touches shard state: `shard::cluster_link`
//! and `shard::cluster_home` connect it to the shard (docs/cluster.md).
//!
//! Invariant: a link belongs to one shard's runtime and is used by that shard only; shards
//! never share a Redis connection (the thread-per-core rule).

pub mod bucket;
pub mod commands;
pub mod dashboard;
pub mod limits;
pub mod link;
pub mod message;
pub mod outbound;
pub mod scripts;
pub mod sequence;
pub mod supervisor;
pub mod users;
/// Who this node is in messages and Redis keys (docs/cluster.md, "Message format").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `cluster.node_id`, or `node-{incarnation as 16 hex digits}` when unset.
    pub node_id: String,
    /// Random per process and never 0, so a restarted node (same `node_id` or not) is a new
    /// sender whose sequence numbers never start again.
    pub incarnation: u64,
}

impl NodeIdentity {
    /// This process's identity: `configured` (already validated) or one made from the
    /// incarnation drawn from `rng`.
    pub fn new(configured: Option<&str>, rng: &mut fastrand::Rng) -> NodeIdentity {
        let incarnation = rng.u64(1..);
        let node_id = configured.map_or_else(|| format!("node-{incarnation:016x}"), str::to_owned);
        NodeIdentity { node_id, incarnation }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The incarnation is never 0 and differs per process; a default node id follows the
    /// `node_id` rule and is unique with it; a configured one is kept.
    #[test]
    fn node_identity() {
        let mut rng = fastrand::Rng::with_seed(1);
        let a = NodeIdentity::new(None, &mut rng);
        let b = NodeIdentity::new(None, &mut rng);
        assert!(a.incarnation != 0 && a.incarnation != b.incarnation);
        assert_ne!(a.node_id, b.node_id);
        assert_eq!(a.node_id, format!("node-{:016x}", a.incarnation));
        assert!(a.node_id.len() <= message::NODE_ID_BYTES_MAX);
        assert_eq!(NodeIdentity::new(Some("eu-1"), &mut rng).node_id, "eu-1");
    }
}
