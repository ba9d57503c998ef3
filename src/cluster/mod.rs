//! Cluster mode: several nodes sharing one Redis act as one Pusher app (docs/cluster.md).
//!
//! Today this module owns the Redis link only: `url` (what `cluster.redis_url` means) and
//! `link` (one connection from a shard's runtime to Redis: pipelined commands, or sharded
//! pub/sub pushes). It never touches shard state; fan-out, presence leases and the Redis-down
//! contract build on it (docs/cluster.md says how).
//!
//! Invariant: a link belongs to one shard's runtime and is used by that shard only; shards
//! never share a Redis connection (the thread-per-core rule).

pub mod link;
pub mod url;
