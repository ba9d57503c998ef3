//! An endpoint's batch: events (lifecycle ones, or published ones for a batching Standard
//! endpoint) waiting to become one delivery, at `batch_max` events or `batch_ms` after the
//! first.
//!
//! Owns `Batch`. Never touches the WAL or sockets: the dispatcher writes each event to the log
//! as a batch item (which holds its JSON) before its sequence number is pushed here, and acks
//! the items once their batch delivery is created. Time is passed in.
//!
//! Invariant: `since` is set exactly when the batch holds items (it is the first one's time).

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::event;
use crate::config::WebhookFormat;
use crate::wal::SequenceNumber;

/// The events of one endpoint not yet in a delivery.
#[derive(Debug, Default)]
pub struct Batch {
    /// The events' batch items (sequence numbers in the WAL), in arrival order.
    items: Vec<SequenceNumber>,
    /// When the first of `items` arrived.
    since: Option<Instant>,
}

impl Batch {
    /// Adds an event that arrived at `now`; returns how many the batch holds.
    pub fn push(&mut self, item: SequenceNumber, now: Instant) -> usize {
        self.items.push(item);
        self.since.get_or_insert(now);
        self.items.len()
    }

    /// When its first event arrived (`None` when empty).
    pub fn since(&self) -> Option<Instant> {
        debug_assert_eq!(self.since.is_some(), !self.items.is_empty(), "since is set exactly when non-empty");
        self.since
    }

    /// Whether it has waited `period` by `now`.
    pub fn is_due(&self, now: Instant, period: Duration) -> bool {
        self.since().is_some_and(|since| since + period <= now)
    }

    /// Takes every event, leaving the batch empty.
    pub fn take(&mut self) -> Vec<SequenceNumber> {
        self.since = None;
        std::mem::take(&mut self.items)
    }
}

/// The body of one delivery holding `events` (JSON objects), in `format`'s batch shape.
pub fn body<'a>(format: WebhookFormat, time_ms: u64, events: impl Iterator<Item = &'a str>) -> Bytes {
    match format {
        WebhookFormat::Pusher => event::pusher_body(time_ms, events),
        WebhookFormat::Standard => event::standard_batch_body(time_ms, events),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch remembers its first event's time, is due `period` later, and empties on take.
    #[test]
    fn due_after_period_from_the_first_event() {
        let start = Instant::now();
        let period = Duration::from_millis(100);
        let mut batch = Batch::default();
        assert!(!batch.is_due(start + period, period), "an empty batch is never due");
        assert_eq!(batch.push(SequenceNumber::new(1), start), 1);
        assert_eq!(batch.push(SequenceNumber::new(2), start + Duration::from_millis(90)), 2);
        assert_eq!(batch.since(), Some(start));
        assert!(!batch.is_due(start + Duration::from_millis(99), period));
        assert!(batch.is_due(start + period, period));
        assert_eq!(batch.take(), vec![SequenceNumber::new(1), SequenceNumber::new(2)]);
        assert_eq!(batch.since(), None);
    }

    /// The delivery body wraps the events in the format's batch shape, in order.
    #[test]
    fn body_keeps_event_order() {
        let items = [r#"{"n":1}"#, r#"{"n":2}"#];
        let pusher: serde_json::Value =
            serde_json::from_slice(&body(WebhookFormat::Pusher, 5, items.iter().copied())).unwrap();
        assert_eq!(pusher["time_ms"], 5);
        assert_eq!(pusher["events"][1]["n"], 2);
        let standard = body(WebhookFormat::Standard, 5, items.iter().copied());
        let text = std::str::from_utf8(&standard).unwrap();
        assert!(text.find("\"n\":1").unwrap() < text.find("\"n\":2").unwrap(), "{text}");
    }
}
