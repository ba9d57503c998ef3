//! Cluster mode: several nodes sharing one Redis act as one Pusher app (docs/cluster.md).
//!
//! Today this module owns the Redis link and the pieces the fan-out is built from (what
//! `cluster.redis_url` means is the leaf `crate::redis_url`, which config validates with), `link` (one connection from a shard's runtime to Redis:
//! pipelined commands, or sharded pub/sub pushes), `message` (the bucket message format,
//! sans-IO), `bucket` (channel → bucket, Redis names), `sequence` (gap detection, pure) and
//! `supervisor` (a shard's two links: reconnects, re-subscribes, checks sequences). It never
//! touches shard state; fan-out, presence leases and the Redis-down contract build on it
//! (docs/cluster.md says how).
//!
//! Invariant: a link belongs to one shard's runtime and is used by that shard only; shards
//! never share a Redis connection (the thread-per-core rule).

pub mod bucket;
pub mod link;
pub mod message;
pub mod sequence;
pub mod supervisor;
