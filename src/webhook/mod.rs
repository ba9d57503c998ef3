//! Webhooks: Pusher-format lifecycle events and Standard Webhooks event subscriptions,
//! queued durably in the shard's WAL and delivered by per-endpoint workers.
//!
//! - `event`: what is sent (payload bodies, channel and event filters, batching).
//! - `sign`: signatures per attempt.
//! - `retry`: the retry schedule, a pure function.
//! - `target`: endpoint URLs and the SSRF guard.
//! - `admin`: the admin API's typed requests and answers, and how shards' answers merge.
//! - `client`: outbound HTTP/1.1 (plain or rustls), one keep-alive connection per worker.
//! - `dispatch`: a shard's deliveries, endpoint workers, retries, dead letters, admin.

pub mod admin;
pub mod client;
pub mod dispatch;
pub mod event;
pub mod retry;
pub mod sign;
pub mod target;
