//! The webhook admin API's typed questions and answers (docs/webhooks.md, "Admin API").
//!
//! Owns `AdminRequest` (what the HTTP edge asks every shard), `AdminAnswer` (what one shard
//! answers for its own deliveries) and how the answers of all shards merge into one
//! (`AdminAnswer::merge`, `Health::merge`). Never touches JSON, sockets or the dispatcher's
//! state: the dispatcher fills an answer, the mesh carries it, `http::api` renders it once.
//!
//! Invariant: merging is associative and keeps each list's per-shard order, so the edge's
//! answer does not depend on which shard replied first beyond that order.

/// Admin operations, answered by every shard for its own deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// Each endpoint's health.
    Health,
    /// Dead letters of an endpoint.
    DeadLetters {
        /// The endpoint's id within its app.
        endpoint: String,
    },
    /// Attempts of a delivery.
    Attempts {
        /// The webhook id the receiver saw.
        webhook_id: String,
    },
    /// Replay one dead letter.
    Replay {
        /// The webhook id the receiver saw.
        webhook_id: String,
    },
    /// Replay the dead letters of an endpoint created in `[from_ms, to_ms]`.
    ReplayRange {
        /// The endpoint's id within its app.
        endpoint: String,
        /// Oldest creation time, unix milliseconds.
        from_ms: u64,
        /// Newest creation time, unix milliseconds.
        to_ms: u64,
    },
    /// Re-enable a disabled endpoint and close its breaker.
    Enable {
        /// The endpoint's id within its app.
        endpoint: String,
    },
    /// Delete one dead letter.
    Delete {
        /// The webhook id the receiver saw.
        webhook_id: String,
    },
    /// Delete the dead letters of an endpoint created in `[from_ms, to_ms]`.
    DeleteRange {
        /// The endpoint's id within its app.
        endpoint: String,
        /// Oldest creation time, unix milliseconds.
        from_ms: u64,
        /// Newest creation time, unix milliseconds.
        to_ms: u64,
    },
}

/// Where an endpoint stands, from best to worst (the order `Health::merge` ranks by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndpointState {
    /// Its last attempt succeeded (or none was made).
    Healthy,
    /// Its last attempts failed, the breaker is still closed.
    Failing,
    /// The breaker is open: no attempts until its cooldown ends.
    BreakerOpen,
    /// A 410 Gone disabled it until an admin enables it.
    Disabled,
}

impl EndpointState {
    /// Its name in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Failing => "failing",
            EndpointState::BreakerOpen => "breaker_open",
            EndpointState::Disabled => "disabled",
        }
    }
}

/// One endpoint's health on one shard, or summed over shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The endpoint's id within its app.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// `"pusher"` or `"standard"`.
    pub format: &'static str,
    /// The worst state of any shard.
    pub state: EndpointState,
    /// Why it is disabled (from the shard with the worst state).
    pub disabled_reason: Option<String>,
    /// The last HTTP status (from the shard with the worst state).
    pub last_status: Option<u16>,
    /// The last error (from the shard with the worst state).
    pub last_error: Option<String>,
    /// Failures since the last success (from the shard with the worst state).
    pub consecutive_failures: u32,
    /// Deliveries waiting for an attempt or a retry.
    pub pending: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Bytes of live deliveries and batch items.
    pub queued_bytes: u64,
    /// Deliveries answered with a 2xx.
    pub delivered: u64,
    /// Attempts that failed.
    pub failed_attempts: u64,
}

impl Health {
    /// Adds another shard's health of the same endpoint: counters are summed; the state and
    /// its explanation come from whichever shard is worse off (ties keep `self`).
    pub fn merge(&mut self, other: Health) {
        debug_assert_eq!(self.id, other.id, "merging the health of different endpoints");
        self.pending += other.pending;
        self.dead_letters += other.dead_letters;
        self.queued_bytes += other.queued_bytes;
        self.delivered += other.delivered;
        self.failed_attempts += other.failed_attempts;
        if other.state > self.state {
            self.state = other.state;
            self.disabled_reason = other.disabled_reason;
            self.last_status = other.last_status;
            self.last_error = other.last_error;
            self.consecutive_failures = other.consecutive_failures;
        }
    }

    /// Delivered over all finished attempts; `None` before the first.
    pub fn success_rate(&self) -> Option<f64> {
        let (delivered, failed) = (self.delivered as f64, self.failed_attempts as f64);
        (delivered + failed > 0.0).then(|| delivered / (delivered + failed))
    }
}

/// A dead letter, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The webhook id the receiver saw.
    pub webhook_id: String,
    /// When it was created, unix milliseconds.
    pub created_ms: u64,
    /// Its body (lossy UTF-8).
    pub body: String,
}

/// One recorded attempt, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    /// The webhook id the receiver saw.
    pub webhook_id: String,
    /// The endpoint's id within its app.
    pub endpoint: String,
    /// When it ended, unix milliseconds.
    pub at_ms: u64,
    /// The HTTP status, if a response came.
    pub status: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
    /// When the next attempt is due, if one is scheduled.
    pub next_attempt_in_ms: Option<u64>,
}

/// One shard's answer to an `AdminRequest`, or the merged answer of all shards.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminAnswer {
    /// To `Health`: one entry per endpoint of the app.
    Health(Vec<Health>),
    /// To `DeadLetters`.
    DeadLetters(Vec<DeadLetter>),
    /// To `Attempts`.
    Attempts(Vec<AttemptReport>),
    /// To `Replay` and `ReplayRange`: the webhook ids made pending again.
    Replayed(Vec<String>),
    /// To `Delete` and `DeleteRange`: the webhook ids deleted.
    Deleted(Vec<String>),
    /// To `Enable`.
    Enabled,
}

impl AdminAnswer {
    /// The answer of a shard that has nothing for `request` (no dispatcher, or nothing of it).
    pub fn empty(request: &AdminRequest) -> AdminAnswer {
        match request {
            AdminRequest::Health => AdminAnswer::Health(Vec::new()),
            AdminRequest::DeadLetters { .. } => AdminAnswer::DeadLetters(Vec::new()),
            AdminRequest::Attempts { .. } => AdminAnswer::Attempts(Vec::new()),
            AdminRequest::Replay { .. } | AdminRequest::ReplayRange { .. } => AdminAnswer::Replayed(Vec::new()),
            AdminRequest::Delete { .. } | AdminRequest::DeleteRange { .. } => AdminAnswer::Deleted(Vec::new()),
            AdminRequest::Enable { .. } => AdminAnswer::Enabled,
        }
    }

    /// Adds another shard's answer to the same request: lists are appended, health is merged
    /// per endpoint id (first seen first).
    pub fn merge(&mut self, other: AdminAnswer) {
        match (self, other) {
            (AdminAnswer::Health(mine), AdminAnswer::Health(theirs)) => {
                for health in theirs {
                    match mine.iter_mut().find(|h| h.id == health.id) {
                        Some(existing) => existing.merge(health),
                        None => mine.push(health),
                    }
                }
            }
            (AdminAnswer::DeadLetters(mine), AdminAnswer::DeadLetters(theirs)) => mine.extend(theirs),
            (AdminAnswer::Attempts(mine), AdminAnswer::Attempts(theirs)) => mine.extend(theirs),
            (AdminAnswer::Replayed(mine), AdminAnswer::Replayed(theirs)) => mine.extend(theirs),
            (AdminAnswer::Deleted(mine), AdminAnswer::Deleted(theirs)) => mine.extend(theirs),
            (AdminAnswer::Enabled, AdminAnswer::Enabled) => {}
            (mine, theirs) => debug_assert!(false, "answers to different requests: {mine:?} and {theirs:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(id: &str, state: EndpointState, failures: u32, delivered: u64, failed: u64) -> Health {
        Health {
            id: id.into(),
            url: format!("https://example.com/{id}"),
            format: "standard",
            state,
            disabled_reason: (state == EndpointState::Disabled).then(|| "gone".into()),
            last_status: Some(if state == EndpointState::Healthy { 200 } else { 500 }),
            last_error: None,
            consecutive_failures: failures,
            pending: 1,
            dead_letters: 2,
            queued_bytes: 10,
            delivered,
            failed_attempts: failed,
        }
    }

    /// Health of one endpoint from two shards sums its counters and takes the worse state with
    /// that shard's explanation; other endpoints keep their place.
    #[test]
    fn health_merges_by_endpoint_worst_state_wins() {
        let mut merged = AdminAnswer::Health(vec![health("a", EndpointState::Failing, 2, 5, 1)]);
        merged.merge(AdminAnswer::Health(vec![
            health("a", EndpointState::Disabled, 7, 3, 3),
            health("b", EndpointState::Healthy, 0, 1, 0),
        ]));
        merged.merge(AdminAnswer::Health(vec![health("a", EndpointState::Healthy, 0, 2, 0)]));
        let AdminAnswer::Health(list) = merged else { panic!("health stays health") };
        assert_eq!(list.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let a = &list[0];
        assert_eq!((a.state, a.consecutive_failures, a.last_status), (EndpointState::Disabled, 7, Some(500)));
        assert_eq!(a.disabled_reason.as_deref(), Some("gone"));
        assert_eq!((a.pending, a.dead_letters, a.queued_bytes, a.delivered, a.failed_attempts), (3, 6, 30, 10, 4));
        assert_eq!(a.success_rate(), Some(10.0 / 14.0));
        assert_eq!(health("c", EndpointState::Healthy, 0, 0, 0).success_rate(), None);
    }

    /// Equal states keep the first shard's explanation (the merge is stable).
    #[test]
    fn health_tie_keeps_first() {
        let mut first = health("a", EndpointState::Failing, 1, 0, 1);
        first.last_error = Some("first".into());
        let mut second = health("a", EndpointState::Failing, 9, 0, 1);
        second.last_error = Some("second".into());
        first.merge(second);
        assert_eq!((first.last_error.as_deref(), first.consecutive_failures), (Some("first"), 1));
    }

    /// Lists from several shards are concatenated in reply order; an empty answer is neutral.
    #[test]
    fn lists_concatenate_and_empty_is_neutral() {
        let request = AdminRequest::Replay { webhook_id: "msg_x".into() };
        let mut merged = AdminAnswer::empty(&request);
        merged.merge(AdminAnswer::Replayed(vec!["one".into()]));
        merged.merge(AdminAnswer::empty(&request));
        merged.merge(AdminAnswer::Replayed(vec!["two".into()]));
        assert_eq!(merged, AdminAnswer::Replayed(vec!["one".into(), "two".into()]));
        let mut enabled = AdminAnswer::empty(&AdminRequest::Enable { endpoint: "e".into() });
        enabled.merge(AdminAnswer::Enabled);
        assert_eq!(enabled, AdminAnswer::Enabled);
    }
}
