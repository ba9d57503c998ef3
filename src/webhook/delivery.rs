//! A shard's live deliveries (pending and dead) and the byte budgets they count against, and
//! the webhook ids receivers see.
//!
//! Owns `Delivery`, `Deliveries` (the dispatcher's index: by sequence number, dead letters by
//! creation time, bytes per endpoint) and the webhook id format. Never touches the WAL, the
//! queues or sockets: the dispatcher writes the log first and then tells this index.
//!
//! Invariants: `live_bytes` is the sum of `endpoint_bytes`; `dead` holds exactly the
//! `(created_ms, seq)` of the deliveries whose `dead` flag is set; batch items (events not yet
//! in a delivery) are charged through `charge`/`refund` and are not in `by_seq`.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use crate::wal::WalError;

/// Why a delivery could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The shard's queue is at `queue_bytes_max`.
    #[error("the webhook queue is full (webhooks.queue_bytes_max); retry later")]
    QueueFull,
    /// One endpoint's queue is at `endpoint_queue_bytes_max`: its receiver is slow or failing.
    #[error(
        "the webhook queue of endpoint {0} is full (webhooks.endpoint_queue_bytes_max): its receiver is slow or \
         failing; retry later"
    )]
    EndpointFull(String),
    /// The WAL failed.
    #[error("{0}")]
    Wal(#[from] WalError),
}

/// A live delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its endpoint's index.
    pub endpoint: usize,
    /// The request body, sent as is on every attempt.
    pub body: Bytes,
    /// When it was created, unix milliseconds.
    pub created_ms: u64,
    /// Attempts since it was created or last replayed.
    pub attempts: u32,
    /// A dead letter (not retried until replayed).
    pub dead: bool,
}

/// The live deliveries of one shard.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// By sequence number.
    by_seq: HashMap<u64, Delivery>,
    /// Dead letters by (created_ms, seq), for `dead_letter_retention_s` and ranges.
    dead: BTreeSet<(u64, u64)>,
    /// Per endpoint: bytes of its live deliveries and batch items (pending and dead), for
    /// `endpoint_queue_bytes_max`.
    endpoint_bytes: Vec<u64>,
    /// Bytes of every live delivery and batch item, for `queue_bytes_max`.
    live_bytes: u64,
}

impl Deliveries {
    /// An empty index for `endpoints` endpoints.
    pub fn new(endpoints: usize) -> Deliveries {
        Deliveries { endpoint_bytes: vec![0; endpoints], ..Deliveries::default() }
    }

    /// Counts `bytes` of `endpoint` against both budgets.
    pub fn charge(&mut self, endpoint: usize, bytes: u64) {
        self.live_bytes += bytes;
        self.endpoint_bytes[endpoint] += bytes;
    }

    /// Gives back what `charge` counted.
    pub fn refund(&mut self, endpoint: usize, bytes: u64) {
        debug_assert!(self.endpoint_bytes[endpoint] >= bytes && self.live_bytes >= bytes, "refund of uncharged bytes");
        self.live_bytes -= bytes;
        self.endpoint_bytes[endpoint] -= bytes;
    }

    /// Bytes of every live delivery and batch item.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Bytes of one endpoint's live deliveries and batch items.
    pub fn endpoint_bytes(&self, endpoint: usize) -> u64 {
        self.endpoint_bytes[endpoint]
    }

    /// Adds a delivery (charged to its endpoint).
    pub fn insert(&mut self, seq: u64, delivery: Delivery) {
        self.charge(delivery.endpoint, delivery.body.len() as u64);
        if delivery.dead {
            self.dead.insert((delivery.created_ms, seq));
        }
        let previous = self.by_seq.insert(seq, delivery);
        debug_assert!(previous.is_none(), "sequence numbers are never reused");
    }

    /// A delivery.
    pub fn get(&self, seq: u64) -> Option<&Delivery> {
        self.by_seq.get(&seq)
    }

    /// Counts an attempt; returns the attempts made so far.
    pub fn count_attempt(&mut self, seq: u64) -> u32 {
        let delivery = self.by_seq.get_mut(&seq).expect("in flight deliveries are live");
        delivery.attempts += 1;
        delivery.attempts
    }

    /// Removes a delivery (delivered, or a dead letter discarded), refunding its bytes.
    pub fn remove(&mut self, seq: u64) -> Option<Delivery> {
        let delivery = self.by_seq.remove(&seq)?;
        if delivery.dead {
            self.dead.remove(&(delivery.created_ms, seq));
        }
        self.refund(delivery.endpoint, delivery.body.len() as u64);
        Some(delivery)
    }

    /// Makes a pending delivery a dead letter; `false` if it is not a pending one.
    pub fn mark_dead(&mut self, seq: u64) -> bool {
        let Some(delivery) = self.by_seq.get_mut(&seq).filter(|d| !d.dead) else { return false };
        delivery.dead = true;
        self.dead.insert((delivery.created_ms, seq));
        true
    }

    /// Makes a dead letter pending again with a fresh schedule; `false` if it is not one.
    pub fn mark_pending(&mut self, seq: u64) -> bool {
        let Some(delivery) = self.by_seq.get_mut(&seq).filter(|d| d.dead) else { return false };
        delivery.dead = false;
        delivery.attempts = 0;
        self.dead.remove(&(delivery.created_ms, seq));
        true
    }

    /// Dead letters created before `cutoff_ms`, oldest first.
    pub fn dead_before(&self, cutoff_ms: u64) -> Vec<u64> {
        self.dead.range(..(cutoff_ms, 0)).map(|&(_, seq)| seq).collect()
    }

    /// Dead letters of `endpoint` created in `[from_ms, to_ms]`, oldest first.
    pub fn dead_between(&self, endpoint: usize, from_ms: u64, to_ms: u64) -> Vec<u64> {
        let range = self.dead.range((from_ms, 0)..=(to_ms, u64::MAX));
        range.map(|&(_, seq)| seq).filter(|seq| self.by_seq[seq].endpoint == endpoint).collect()
    }

    /// Dead letters of `endpoint`, by sequence number.
    pub fn dead_of(&self, endpoint: usize) -> Vec<(u64, &Delivery)> {
        let mut list: Vec<(u64, &Delivery)> =
            self.by_seq.iter().filter(|(_, d)| d.dead && d.endpoint == endpoint).map(|(&s, d)| (s, d)).collect();
        list.sort_by_key(|&(seq, _)| seq);
        list
    }

    /// (pending, dead) deliveries of `endpoint`.
    pub fn counts(&self, endpoint: usize) -> (u64, u64) {
        let of_endpoint = self.by_seq.values().filter(|d| d.endpoint == endpoint);
        of_endpoint.fold((0, 0), |(pending, dead), d| if d.dead { (pending, dead + 1) } else { (pending + 1, dead) })
    }
}

/// The webhook id a receiver sees for delivery `seq` of the log `log_id` (stable across
/// attempts and restarts): `msg_` and 32 lowercase hex digits.
pub fn webhook_id(log_id: u64, seq: u64) -> String {
    format!("msg_{log_id:016x}{seq:016x}")
}

/// The sequence number in one of log `log_id`'s webhook ids; `None` for anything else. The
/// id comes from a request path: it is checked to be ASCII hex before it is sliced.
pub fn parse_webhook_id(log_id: u64, id: &str) -> Option<u64> {
    let hex = id.strip_prefix("msg_")?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (log, seq) = hex.split_at(16);
    if u64::from_str_radix(log, 16).ok()? != log_id {
        return None;
    }
    u64::from_str_radix(seq, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(endpoint: usize, created_ms: u64, dead: bool) -> Delivery {
        Delivery { endpoint, body: Bytes::from_static(b"0123456789"), created_ms, attempts: 0, dead }
    }

    /// Budgets follow inserts, batch charges and removals; the dead index follows the flag.
    #[test]
    fn budgets_and_dead_index_stay_in_step() {
        let mut index = Deliveries::new(2);
        index.insert(1, delivery(0, 100, false));
        index.insert(2, delivery(0, 200, true));
        index.insert(3, delivery(1, 150, false));
        index.charge(1, 5);
        assert_eq!((index.live_bytes(), index.endpoint_bytes(0), index.endpoint_bytes(1)), (35, 20, 15));
        assert_eq!(index.counts(0), (1, 1));
        assert!(index.mark_dead(3) && !index.mark_dead(3), "only a pending delivery dies");
        assert_eq!(index.dead_before(u64::MAX), vec![3, 2]);
        assert_eq!(index.dead_between(0, 0, 1000), vec![2]);
        assert!(index.mark_pending(2) && !index.mark_pending(2), "only a dead letter is replayed");
        assert_eq!(index.dead_of(0).len(), 0);
        assert_eq!(index.remove(3).map(|d| d.dead), Some(true));
        assert_eq!(index.dead_before(u64::MAX), Vec::<u64>::new());
        index.refund(1, 5);
        assert_eq!((index.live_bytes(), index.endpoint_bytes(1)), (20, 0));
        assert_eq!(index.count_attempt(1), 1);
    }

    /// Webhook ids round-trip; another log's ids, non-hex and wrong lengths are refused.
    #[test]
    fn webhook_ids_round_trip_and_refuse_strangers() {
        let id = webhook_id(0xabc, 42);
        assert_eq!(id, "msg_0000000000000abc000000000000002a");
        assert_eq!(parse_webhook_id(0xabc, &id), Some(42));
        assert_eq!(parse_webhook_id(0xabd, &id), None);
        for bad in
            ["", "msg_", "msg_zz00000000000abc000000000000002a", "msg_0abc", "msg_é000000000000abc00000000000002a"]
        {
            assert_eq!(parse_webhook_id(0xabc, bad), None, "{bad:?}");
        }
    }
}
