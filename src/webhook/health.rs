//! An endpoint's health on one shard: the circuit breaker, who may send now, and the pure
//! decision of what an attempt's result means (delivered, retried when, dead, or gone).
//!
//! Owns `Breaker` and `Verdict`. Never touches the WAL, queues, sockets or clocks: `now` and
//! the random source are arguments, so every rule is unit-tested here (docs/webhooks.md,
//! "Retries and the circuit breaker"; `Retry-After` is RFC 9110 §10.2.3).
//!
//! Invariants: `open_until` is set only once `consecutive_failures` reached the threshold
//! (or after a failed probe); at most one probe is in flight while the breaker is open;
//! `probing` implies `open_until` is set.

use std::time::{Duration, Instant};

use super::client::Response;
use super::endpoint::AttemptError;
use super::retry::{self, Failure, RetryPolicy};

/// When the breaker opens and for how long (from `[webhooks]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// `breaker_failures`: consecutive failures that open it.
    pub failures: u32,
    /// `breaker_cooldown_ms`: how long it stays open before one probe.
    pub cooldown: Duration,
}

/// One endpoint's breaker and counters on this shard.
#[derive(Debug, Default)]
pub struct Breaker {
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// The last attempt's HTTP status, if it got one.
    pub last_status: Option<u16>,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
    /// Attempts answered with a 2xx.
    pub delivered: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// While open, no attempts until then (then one probe).
    pub open_until: Option<Instant>,
    /// A probe is in flight after the breaker's cooldown.
    pub probing: bool,
    /// Why the endpoint is disabled (410 Gone), if it is.
    pub disabled: Option<String>,
}

/// What an attempt's result means for its delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: done.
    Delivered,
    /// Failed; try again after this delay.
    Retry(Duration),
    /// Failed and the schedule is exhausted: a dead letter.
    Dead,
    /// 410 Gone: the endpoint is disabled and the delivery becomes a dead letter.
    Gone,
}

/// The decision about one attempt, with what the attempt log shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What happens to the delivery.
    pub verdict: Verdict,
    /// The HTTP status, if a response came.
    pub status: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl Breaker {
    /// How many ready deliveries a worker may take now (at most `pipeline_max`; exactly one
    /// as the probe of a cooled-down breaker), or `None` to wait. Taking the probe marks it.
    pub fn admit(&mut self, now: Instant, in_flight: usize, ready: usize, pipeline_max: usize) -> Option<usize> {
        let mut limit = pipeline_max;
        if let Some(until) = self.open_until {
            if until > now || self.probing || in_flight > 0 {
                return None;
            }
            // Cooled down: one probe decides.
            self.probing = true;
            limit = 1;
        }
        if ready == 0 || self.disabled.is_some() {
            self.probing &= in_flight > 0;
            return None;
        }
        debug_assert!(!self.probing || self.open_until.is_some(), "a probe only while the breaker is open");
        Some(ready.min(limit))
    }

    /// Whether the breaker is open and cooled down by `now` (a probe may go).
    pub fn cooled(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| until <= now)
    }

    /// Closes the breaker and re-enables the endpoint (the admin API's `enable`).
    pub fn enable(&mut self) {
        self.disabled = None;
        self.open_until = None;
        self.consecutive_failures = 0;
    }

    /// Records an attempt's `result` (its delivery has now had `attempts_made` attempts, this
    /// one included) and decides what follows. Pure: `now` and `rng` are the caller's.
    pub fn settle(
        &mut self,
        result: &Result<Response, AttemptError>,
        attempts_made: u32,
        now: Instant,
        policy: &RetryPolicy,
        settings: BreakerSettings,
        rng: &mut fastrand::Rng,
    ) -> Decision {
        let success = matches!(result, Ok(r) if (200..300).contains(&r.status));
        let (status, error, failure, retry_after, gone) = match result {
            Ok(r) => {
                let error = (!success).then(|| {
                    let excerpt = String::from_utf8_lossy(&r.excerpt).into_owned();
                    if r.status / 100 == 3 {
                        format!("redirect not followed: {excerpt}")
                    } else {
                        excerpt
                    }
                });
                // RFC 6585 §4: 429 Too Many Requests means the receiver is overloaded.
                let failure = if r.status == 429 { Failure::Overloaded } else { Failure::Other };
                (Some(r.status), error, failure, r.retry_after, r.status == 410)
            }
            Err(e) => {
                let failure = if matches!(e, AttemptError::Timeout) { Failure::Overloaded } else { Failure::Other };
                (None, Some(e.to_string()), failure, None, false)
            }
        };
        self.last_status = status;
        self.last_error = error.clone();
        self.probing = false;
        let verdict = if success {
            self.delivered += 1;
            self.consecutive_failures = 0;
            self.open_until = None;
            Verdict::Delivered
        } else {
            self.failed += 1;
            self.consecutive_failures += 1;
            if self.consecutive_failures >= settings.failures {
                self.open_until = Some(now + settings.cooldown);
            }
            if gone {
                Verdict::Gone
            } else {
                match retry::next_attempt(policy, attempts_made, failure, retry_after, rng) {
                    Some(delay) => Verdict::Retry(delay),
                    None => Verdict::Dead,
                }
            }
        };
        Decision { verdict, status, error }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings { failures: 3, cooldown: Duration::from_secs(30) };

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule_ms: vec![0, 5_000, 300_000],
            jitter_percent: 0,
            overload_floor_ms: 60_000,
            retry_after_max_ms: 600_000,
        }
    }

    fn response(status: u16, retry_after: Option<Duration>, body: &'static str) -> Result<Response, AttemptError> {
        Ok(Response { status, retry_after, close: false, excerpt: Bytes::from_static(body.as_bytes()) })
    }

    fn settle(breaker: &mut Breaker, result: Result<Response, AttemptError>, attempts: u32, now: Instant) -> Decision {
        breaker.settle(&result, attempts, now, &policy(), SETTINGS, &mut fastrand::Rng::with_seed(7))
    }

    fn check(result: Result<Response, AttemptError>, attempts: u32, expected: Verdict) {
        let decision = settle(&mut Breaker::default(), result.clone(), attempts, Instant::now());
        assert_eq!(decision.verdict, expected, "{result:?} after {attempts} attempts");
    }

    /// 2xx delivers; 5xx and other failures follow the schedule until it runs out.
    #[test]
    fn failures_follow_the_schedule() {
        check(response(204, None, ""), 1, Verdict::Delivered);
        check(response(500, None, "boom"), 1, Verdict::Retry(Duration::from_secs(5)));
        check(response(503, None, ""), 2, Verdict::Retry(Duration::from_secs(300)));
        check(response(500, None, ""), 3, Verdict::Dead);
        check(Err(AttemptError::Other("connection refused".into())), 1, Verdict::Retry(Duration::from_secs(5)));
        check(response(302, None, ""), 1, Verdict::Retry(Duration::from_secs(5)));
    }

    /// 429 and timeouts mean overload: at least the floor; `Retry-After` is honoured above it
    /// (within `retry_after_max_ms`).
    #[test]
    fn overload_waits_at_least_the_floor_and_retry_after() {
        check(response(429, None, ""), 1, Verdict::Retry(Duration::from_secs(60)));
        check(response(429, Some(Duration::from_secs(120)), ""), 1, Verdict::Retry(Duration::from_secs(120)));
        check(response(429, Some(Duration::from_secs(3600)), ""), 1, Verdict::Retry(Duration::from_secs(600)));
        check(response(503, Some(Duration::from_secs(90)), ""), 1, Verdict::Retry(Duration::from_secs(90)));
        check(Err(AttemptError::Timeout), 1, Verdict::Retry(Duration::from_secs(60)));
    }

    /// 410 Gone is final whatever the schedule says; the attempt log keeps status and body.
    #[test]
    fn gone_disables() {
        let decision = settle(&mut Breaker::default(), response(410, None, "bye"), 1, Instant::now());
        assert_eq!(decision, Decision { verdict: Verdict::Gone, status: Some(410), error: Some("bye".into()) });
        let redirect = settle(&mut Breaker::default(), response(301, None, "moved"), 1, Instant::now());
        assert_eq!(redirect.error.as_deref(), Some("redirect not followed: moved"));
    }

    /// The breaker opens after `failures` consecutive failures; nothing is sent until the
    /// cooldown ends; then exactly one probe goes; a failed probe opens it again, a successful
    /// one closes it and every worker may send a full pipeline again.
    #[test]
    fn breaker_opens_probes_and_closes() {
        let start = Instant::now();
        let mut breaker = Breaker::default();
        assert_eq!(breaker.admit(start, 0, 10, 4), Some(4));
        for attempt in 1..=3 {
            assert_eq!(breaker.open_until, None, "closed before the threshold");
            settle(&mut breaker, response(500, None, ""), attempt, start);
        }
        assert_eq!(breaker.open_until, Some(start + SETTINGS.cooldown));
        assert_eq!(breaker.admit(start + Duration::from_secs(29), 0, 10, 4), None, "open: wait");
        let cooled = start + SETTINGS.cooldown;
        assert!(breaker.cooled(cooled));
        assert_eq!(breaker.admit(cooled, 0, 10, 4), Some(1), "one probe");
        assert!(breaker.probing);
        assert_eq!(breaker.admit(cooled, 1, 10, 4), None, "only one probe at a time");
        settle(&mut breaker, response(500, None, ""), 1, cooled);
        assert_eq!(breaker.open_until, Some(cooled + SETTINGS.cooldown), "a failed probe opens it again");
        let later = cooled + SETTINGS.cooldown;
        assert_eq!(breaker.admit(later, 0, 10, 4), Some(1));
        let decision = settle(&mut breaker, response(200, None, ""), 1, later);
        assert_eq!(decision.verdict, Verdict::Delivered);
        assert_eq!((breaker.open_until, breaker.consecutive_failures, breaker.probing), (None, 0, false));
        assert_eq!(breaker.admit(later, 0, 10, 4), Some(4), "closed: full pipeline");
        assert_eq!((breaker.delivered, breaker.failed), (1, 4));
    }

    /// A cooled breaker with nothing ready takes no probe (and does not stay marked probing);
    /// a disabled endpoint sends nothing until enabled.
    #[test]
    fn no_probe_without_work_and_disabled_waits() {
        let now = Instant::now();
        let mut breaker = Breaker { open_until: Some(now), ..Breaker::default() };
        assert_eq!(breaker.admit(now, 0, 0, 4), None);
        assert!(!breaker.probing);
        let mut disabled = Breaker { disabled: Some("gone".into()), ..Breaker::default() };
        assert_eq!(disabled.admit(now, 0, 5, 4), None);
        disabled.enable();
        assert_eq!(disabled.admit(now, 0, 5, 4), Some(4));
    }
}
