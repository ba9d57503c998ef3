//! A shard's webhook work in progress: per endpoint the ready deliveries, idle workers, the
//! breaker and the batch; deliveries waiting for their WAL commit; retry timers; the attempt
//! log.
//!
//! Owns `DispatchState` and `EndpointQueue`, the data the dispatcher's tasks hand each other.
//! Never touches the WAL, sockets or clocks (times are passed in); `dispatch` decides and
//! this module keeps the books.
//!
//! Invariant: a pending delivery is in exactly one of `awaiting`, `timers`, an endpoint's
//! `ready`, or in flight (taken by a worker, counted in `in_flight`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::task::Waker;
use std::time::Instant;

use super::admin::{self, EndpointState};
use super::batch::Batch;
use super::endpoint::{Endpoint, EndpointIndex};
use super::health::Breaker;
use crate::config::WebhookFormat;
use crate::wal::{LiveIndex, Lsn, SequenceNumber};

/// One endpoint's work on this shard. Invariant: every seq in `ready` is a pending delivery
/// of this endpoint; `in_flight` counts those taken by workers and not yet settled.
#[derive(Default)]
pub(super) struct EndpointQueue {
    /// Deliveries whose attempt is due, oldest first.
    pub(super) ready: VecDeque<SequenceNumber>,
    /// Workers waiting for `ready` or the breaker.
    pub(super) idle_workers: Vec<Waker>,
    /// Deliveries taken by workers and not yet settled.
    pub(super) in_flight: usize,
    /// Worker tasks running for this endpoint (at most `connections_per_endpoint_max`; they
    /// end once a reload removes the endpoint).
    pub(super) workers: usize,
    /// The breaker and counters.
    pub(super) health: Breaker,
    /// What recovery found for this endpoint while it was not configured (pending deliveries,
    /// batch items, dead letters), in log order: kept aside until a reload configures it.
    pub(super) parked: Vec<SequenceNumber>,
    /// Events waiting to be batched (each a batch item in the WAL, so a crash before the
    /// batch is formed loses none).
    pub(super) batch: Batch,
}

/// Everything the dispatcher changes. Invariant: a pending delivery is in exactly one of
/// `awaiting`, `timers`, an endpoint's `ready`, or in flight.
#[derive(Default)]
pub(super) struct DispatchState {
    /// Attempts since creation or the last replay, of deliveries attempted at least once
    /// (not logged: a restart starts the count again). The deliveries themselves live in the
    /// WAL's index.
    pub(super) attempt_counts: HashMap<SequenceNumber, u32>,
    /// Created, waiting for their WAL records to be committed before the first attempt.
    pub(super) awaiting: VecDeque<(Lsn, SequenceNumber)>,
    /// Retries by due time.
    pub(super) timers: BTreeSet<(Instant, SequenceNumber)>,
    /// Per endpoint, by index.
    pub(super) queues: Vec<EndpointQueue>,
    /// The last `attempt_log_max` attempts, for the admin API.
    pub(super) attempts: VecDeque<Attempt>,
    /// The retry timer task, while it sleeps.
    pub(super) timer_task: Option<Waker>,
    /// The batch task, while it waits for a first event.
    pub(super) batch_task: Option<Waker>,
}

/// One attempt, for the admin API.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    pub(super) seq: SequenceNumber,
    pub(super) endpoint: EndpointIndex,
    pub(super) at_ms: u64,
    pub(super) status: Option<u16>,
    pub(super) error: Option<String>,
    pub(super) duration_ms: u64,
    pub(super) next_attempt_in_ms: Option<u64>,
}

impl DispatchState {
    /// Pops the first delivery whose WAL record is committed by `reached`.
    pub(super) fn pop_released(&mut self, reached: Lsn) -> Option<SequenceNumber> {
        match self.awaiting.front() {
            Some(&(lsn, seq)) if lsn <= reached => {
                self.awaiting.pop_front();
                Some(seq)
            }
            _ => None,
        }
    }

    /// Takes the retries due by `now`, earliest first.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<SequenceNumber> {
        let later = self.timers.split_off(&(now, SequenceNumber::MAX));
        let due = std::mem::replace(&mut self.timers, later);
        due.into_iter().map(|(_, seq)| seq).collect()
    }

    /// Logs an attempt, keeping the last `attempt_log_max`.
    pub(super) fn log_attempt(&mut self, attempt: Attempt, attempt_log_max: usize) {
        if self.attempts.len() >= attempt_log_max {
            self.attempts.pop_front();
        }
        self.attempts.push_back(attempt);
    }

    /// One endpoint's health on this shard, for the admin API.
    pub(super) fn health(&self, index: EndpointIndex, endpoint: &Endpoint, live: &LiveIndex) -> admin::Health {
        let health = &self.queues[index.get()].health;
        let state = if health.disabled.is_some() {
            EndpointState::Disabled
        } else if health.open_until.is_some() {
            EndpointState::BreakerOpen
        } else if health.consecutive_failures > 0 {
            EndpointState::Failing
        } else {
            EndpointState::Healthy
        };
        let (pending, dead_letters) = live.counts(index.get());
        admin::Health {
            id: endpoint.id.clone(),
            url: endpoint.url.clone(),
            format: match endpoint.format {
                WebhookFormat::Pusher => "pusher",
                WebhookFormat::Standard => "standard",
            },
            state,
            disabled_reason: health.disabled.clone(),
            last_status: health.last_status,
            last_error: health.last_error.clone(),
            consecutive_failures: health.consecutive_failures,
            pending,
            dead_letters,
            queued_bytes: live.endpoint_bytes(index.get()),
            delivered: health.delivered,
            failed_attempts: health.failed,
        }
    }
}
