//! Webhooks: Pusher-format lifecycle events and Standard Webhooks event subscriptions,
//! queued durably in the shard's WAL and delivered by per-endpoint workers.
//!
//! - `event`: what is sent (payload bodies, channel and event filters, batching).
//! - `sign`: signatures per attempt.
//! - `retry`: the retry schedule, a pure function.
//! - `resolver`: host-name lookups on their own threads (timeout, single flight, cache).
//! - `admin`: the admin API's typed requests and answers, and how shards' answers merge.
//! - `client`: outbound HTTP/1.1 (plain or rustls), one keep-alive connection per worker.
//! - `endpoint`: configured endpoints, request heads, the pipelined transport.
//! - `health`: the circuit breaker and the pure settle decision.
//! - `batch`: events waiting to become one delivery (their records are WAL batch items).
//! - `delivery`: why a delivery is refused, webhook ids (the live deliveries are in `wal::index`).
//! - `queue` (private): ready queues, timers, the attempt log.
//! - `setup` (private): the endpoints and `[webhooks]` settings a reload swaps.
//! - `dispatch`: a shard's dispatcher — the tasks and the control flow between the stages.

pub mod admin;
pub mod batch;
pub mod client;
pub mod delivery;
pub mod dispatch;
pub mod endpoint;
pub mod event;
pub mod health;
mod queue;
pub mod resolver;
pub mod retry;
mod setup;
pub mod sign;

/// The directory of shard `shard`'s WAL under `webhooks.data_dir` (the one place its name is
/// built; `wal_directory_shard` reads it back).
pub fn wal_directory(data_dir: &std::path::Path, shard: usize) -> std::path::PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// The shard whose WAL directory is called `name`, if it is one.
pub fn wal_directory_shard(name: &str) -> Option<usize> {
    name.strip_prefix("shard-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    /// A shard's WAL directory name reads back as its index; other names do not.
    #[test]
    fn wal_directory_round_trips() {
        let path = super::wal_directory(std::path::Path::new("/data"), 3);
        assert_eq!(path, std::path::Path::new("/data/shard-3"));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(super::wal_directory_shard(name), Some(3));
        assert_eq!(super::wal_directory_shard("shard-x"), None);
        assert_eq!(super::wal_directory_shard("lost+found"), None);
    }
}
