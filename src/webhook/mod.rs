//! Webhooks: Pusher-format lifecycle events and Standard Webhooks event subscriptions,
//! queued durably in the shard's WAL and delivered by per-endpoint workers.
//!
//! - `event`: what is sent (payload bodies, channel and event filters, batching).
//! - `sign`: signatures per attempt.
//! - `retry`: the retry schedule, a pure function.
//! - `target`: endpoint URLs and the SSRF guard.
//! - `admin`: the admin API's typed requests and answers, and how shards' answers merge.
//! - `client`: outbound HTTP/1.1 (plain or rustls), one keep-alive connection per worker.
//! - `endpoint`: configured endpoints, request heads, the pipelined transport.
//! - `health`: the circuit breaker and the pure settle decision.
//! - `batch`: events waiting to become one delivery.
//! - `delivery`: the live deliveries, their byte budgets, webhook ids.
//! - `queue` (private): ready queues, timers, the attempt log.
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
pub mod retry;
pub mod sign;
pub mod target;
