//! When to try a failed delivery again: a pure function of the attempts made, what went
//! wrong, the receiver's `Retry-After`, and a random source (docs/webhooks.md, "Delivery":
//! the schedule, ±jitter, a floor after overload, `Retry-After` (RFC 9110 §10.2.3) honoured
//! within bounds).

use std::time::Duration;

/// The retry settings (from `[webhooks]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before each attempt; entry 0 is the first attempt (normally 0 = at once). Its
    /// length is the number of attempts.
    pub schedule_ms: Vec<u64>,
    /// Each delay is moved by up to ± this percentage.
    pub jitter_percent: u32,
    /// Least delay after a 429 or a timeout (the receiver is overloaded).
    pub overload_floor_ms: u64,
    /// Largest `Retry-After` honoured.
    pub retry_after_max_ms: u64,
}

/// How an attempt failed, as far as retrying cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The receiver answered 429 or did not answer in time.
    Overloaded,
    /// Anything else that is worth retrying (5xx, 4xx other than 410, 3xx, connection errors).
    Other,
}

/// The delay before the next attempt after `attempts_made` failed ones, or `None` when the
/// schedule is exhausted (the delivery becomes a dead letter).
pub fn next_attempt(
    policy: &RetryPolicy,
    attempts_made: u32,
    failure: Failure,
    retry_after: Option<Duration>,
    rng: &mut fastrand::Rng,
) -> Option<Duration> {
    let base = *policy.schedule_ms.get(attempts_made as usize)?;
    let spread = base * u64::from(policy.jitter_percent) / 100;
    let mut delay = base - spread + if spread > 0 { rng.u64(0..=2 * spread) } else { 0 };
    if let Some(retry_after) = retry_after {
        let asked = (retry_after.as_millis() as u64).min(policy.retry_after_max_ms);
        delay = delay.max(asked);
    }
    if failure == Failure::Overloaded {
        delay = delay.max(policy.overload_floor_ms);
    }
    Some(Duration::from_millis(delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule_ms: vec![0, 5_000, 300_000, 1_800_000],
            jitter_percent: 20,
            overload_floor_ms: 60_000,
            retry_after_max_ms: 3_600_000,
        }
    }

    fn check(attempts: u32, failure: Failure, retry_after_s: Option<u64>, range_ms: Option<(u64, u64)>) {
        let mut rng = fastrand::Rng::with_seed(attempts.into());
        for _ in 0..200 {
            let delay = next_attempt(&policy(), attempts, failure, retry_after_s.map(Duration::from_secs), &mut rng);
            match (delay, range_ms) {
                (Some(d), Some((low, high))) => {
                    let ms = d.as_millis() as u64;
                    assert!((low..=high).contains(&ms), "attempt {attempts}: {ms} ms not in {low}..={high}");
                }
                (None, None) => {}
                other => panic!("attempt {attempts}: {other:?}"),
            }
        }
    }

    /// The schedule with ±20 % jitter, then exhaustion.
    #[test]
    fn schedule_with_jitter() {
        check(1, Failure::Other, None, Some((4_000, 6_000)));
        check(2, Failure::Other, None, Some((240_000, 360_000)));
        check(3, Failure::Other, None, Some((1_440_000, 2_160_000)));
        check(4, Failure::Other, None, None);
    }

    /// Overload raises the delay to the floor; Retry-After is honoured up to its bound.
    #[test]
    fn overload_floor_and_retry_after() {
        check(1, Failure::Overloaded, None, Some((60_000, 60_000)));
        check(1, Failure::Other, Some(120), Some((120_000, 120_000)));
        check(1, Failure::Other, Some(1), Some((4_000, 6_000)));
        check(1, Failure::Other, Some(86_400), Some((3_600_000, 3_600_000)));
    }
}
