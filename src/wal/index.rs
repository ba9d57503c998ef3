//! The one index of a shard's live webhook records: deliveries (pending or dead) and batch
//! items (events waiting to be batched into one delivery), with the byte budgets they count
//! against and where the log holds them.
//!
//! Owns `LiveIndex`, its entries and the endpoint key table. It is pure (no I/O, no clock):
//! `Wal` changes it only together with the record that says so, so the index is what recovery
//! would rebuild from the durable log, plus what is still buffered. The dispatcher reads it
//! and keeps only what the log does not know (attempt counts, ready queues, timers); in
//! `memory` durability the `Wal` keeps this index without writing records.
//!
//! Endpoint keys (`"{app_id}/{endpoint_id}"`) are interned: the keys given at creation get
//! ids `0..n` in that order (the dispatcher's endpoint indexes), a key met only in the log (an
//! endpoint that left the config) gets the next free id.
//!
//! Invariants: `live_bytes` is the sum of every entry's `bytes`, `endpoint_bytes[e]` the sum
//! over endpoint `e`'s entries; `dead` holds exactly the `(created_ms, seq)` of entries whose
//! `dead` flag is set; a batch item is never dead.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use super::record::SequenceNumber;

/// What a live record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A delivery: one POST to one endpoint.
    Delivery,
    /// An event waiting in its endpoint's batch (its body is the event's JSON object).
    BatchItem,
}

/// One live record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// A delivery or a batch item.
    pub kind: Kind,
    /// Its endpoint's id in the key table.
    pub endpoint: usize,
    /// When it was created, unix milliseconds.
    pub created_ms: u64,
    /// The exact body to POST (a batch item's: the event's JSON).
    pub body: Bytes,
    /// A dead letter (not retried until replayed).
    pub dead: bool,
    /// The segment holding its newest `Delivery`/`BatchItem` record (stale while a copy is
    /// buffered; `None` until its first record is written).
    pub(super) copy_at: Option<u64>,
    /// The segment holding its newest `Ack dead` or `Replay` record, if any.
    pub(super) state_at: Option<u64>,
    /// Bytes of its framed record: what it counts against the budgets and compaction.
    pub(super) bytes: u64,
}

impl Live {
    /// Whether its newest copy or state record is in `segment`.
    pub(super) fn refers_to(&self, segment: u64) -> bool {
        self.copy_at == Some(segment) || self.state_at == Some(segment)
    }

    /// Bytes it counts against `queue_bytes_max` and its endpoint's budget.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The live records of one shard's log.
#[derive(Debug, Default)]
pub struct LiveIndex {
    /// By sequence number.
    entries: HashMap<SequenceNumber, Live>,
    /// Dead letters by (created_ms, seq), for `dead_letter_retention_s` and ranges.
    dead: BTreeSet<(u64, SequenceNumber)>,
    /// Endpoint keys by id.
    keys: Vec<Box<str>>,
    /// Endpoint ids by key.
    ids: HashMap<Box<str>, usize>,
    /// Per endpoint id: bytes of its live records, for `endpoint_queue_bytes_max`.
    endpoint_bytes: Vec<u64>,
    /// Bytes of every live record, for `queue_bytes_max` and compaction.
    live_bytes: u64,
}

impl LiveIndex {
    /// An empty index whose endpoint ids `0..keys.len()` are `keys`.
    pub fn new(keys: &[&str]) -> LiveIndex {
        let mut index = LiveIndex::default();
        for key in keys {
            index.endpoint_id(key);
        }
        debug_assert_eq!(index.keys.len(), keys.len(), "endpoint keys are unique");
        index
    }

    /// The id of an endpoint key, interning it when new.
    pub fn endpoint_id(&mut self, key: &str) -> usize {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = self.keys.len();
        self.keys.push(key.into());
        self.ids.insert(key.into(), id);
        self.endpoint_bytes.push(0);
        id
    }

    /// Endpoint keys interned so far (ids are `0..endpoint_count()`).
    pub fn endpoint_count(&self) -> usize {
        self.keys.len()
    }

    /// The key of endpoint id `id`.
    pub fn key(&self, id: usize) -> &str {
        &self.keys[id]
    }

    /// A live record.
    pub fn get(&self, seq: SequenceNumber) -> Option<&Live> {
        self.entries.get(&seq)
    }

    pub(super) fn get_mut(&mut self, seq: SequenceNumber) -> Option<&mut Live> {
        self.entries.get_mut(&seq)
    }

    /// Live records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of every live record.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Bytes of one endpoint's live records.
    pub fn endpoint_bytes(&self, endpoint: usize) -> u64 {
        self.endpoint_bytes[endpoint]
    }

    /// Adds a record, or replaces it with its compaction copy; returns the one it replaced.
    pub(super) fn insert(&mut self, seq: SequenceNumber, live: Live) -> Option<Live> {
        debug_assert!(!(live.dead && live.kind == Kind::BatchItem), "a batch item is never dead");
        // The copy's entry is uncounted first: it may have the same place in `dead`.
        let previous = self.remove(seq);
        self.live_bytes += live.bytes;
        self.endpoint_bytes[live.endpoint] += live.bytes;
        if live.dead {
            self.dead.insert((live.created_ms, seq));
        }
        self.entries.insert(seq, live);
        previous
    }

    /// Removes a record (delivered, discarded, or a batch item now in a delivery).
    pub(super) fn remove(&mut self, seq: SequenceNumber) -> Option<Live> {
        let live = self.entries.remove(&seq)?;
        self.uncount(seq, &live);
        Some(live)
    }

    fn uncount(&mut self, seq: SequenceNumber, live: &Live) {
        debug_assert!(self.live_bytes >= live.bytes && self.endpoint_bytes[live.endpoint] >= live.bytes);
        self.live_bytes -= live.bytes;
        self.endpoint_bytes[live.endpoint] -= live.bytes;
        if live.dead {
            self.dead.remove(&(live.created_ms, seq));
        }
    }

    /// Makes a delivery dead (`true`) or pending again; `false` when it is not a delivery in
    /// the other state.
    pub(super) fn set_dead(&mut self, seq: SequenceNumber, dead: bool) -> bool {
        let Some(live) = self.entries.get_mut(&seq) else { return false };
        if live.dead == dead || live.kind != Kind::Delivery {
            return false;
        }
        live.dead = dead;
        if dead {
            self.dead.insert((live.created_ms, seq));
        } else {
            self.dead.remove(&(live.created_ms, seq));
        }
        true
    }

    /// The records whose newest copy or state record is in `segment`, by sequence number.
    pub(super) fn referring_to(&self, segment: u64) -> Vec<SequenceNumber> {
        let mut seqs: Vec<SequenceNumber> =
            self.entries.iter().filter(|(_, l)| l.refers_to(segment)).map(|(&s, _)| s).collect();
        seqs.sort_unstable();
        seqs
    }

    /// Every live record's sequence number, in order.
    pub fn seqs(&self) -> Vec<SequenceNumber> {
        let mut seqs: Vec<SequenceNumber> = self.entries.keys().copied().collect();
        seqs.sort_unstable();
        seqs
    }

    /// Dead letters created before `cutoff_ms`, oldest first.
    pub fn dead_before(&self, cutoff_ms: u64) -> Vec<SequenceNumber> {
        self.dead.range(..(cutoff_ms, SequenceNumber::MIN)).map(|&(_, seq)| seq).collect()
    }

    /// Dead letters of `endpoint` created in `[from_ms, to_ms]`, oldest first.
    pub fn dead_between(&self, endpoint: usize, from_ms: u64, to_ms: u64) -> Vec<SequenceNumber> {
        let range = self.dead.range((from_ms, SequenceNumber::MIN)..=(to_ms, SequenceNumber::MAX));
        range.map(|&(_, seq)| seq).filter(|seq| self.entries[seq].endpoint == endpoint).collect()
    }

    /// Dead letters of `endpoint`, by sequence number.
    pub fn dead_of(&self, endpoint: usize) -> Vec<(SequenceNumber, &Live)> {
        let mut list: Vec<(SequenceNumber, &Live)> =
            self.entries.iter().filter(|(_, l)| l.dead && l.endpoint == endpoint).map(|(&s, l)| (s, l)).collect();
        list.sort_by_key(|&(seq, _)| seq);
        list
    }

    /// (pending, dead) deliveries of `endpoint` (batch items are not deliveries yet).
    pub fn counts(&self, endpoint: usize) -> (u64, u64) {
        let deliveries = self.entries.values().filter(|l| l.endpoint == endpoint && l.kind == Kind::Delivery);
        deliveries.fold((0, 0), |(pending, dead), l| if l.dead { (pending, dead + 1) } else { (pending + 1, dead) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> SequenceNumber {
        SequenceNumber::new(n)
    }

    fn seqs(list: &[u64]) -> Vec<SequenceNumber> {
        list.iter().copied().map(SequenceNumber::new).collect()
    }

    fn live(kind: Kind, endpoint: usize, created_ms: u64, dead: bool) -> Live {
        let body = Bytes::from_static(b"0123456789");
        Live { kind, endpoint, created_ms, body, dead, copy_at: None, state_at: None, bytes: 10 }
    }

    /// Budgets follow inserts, copies and removals; the dead index follows the flag; batch
    /// items count against budgets but are not deliveries and never die.
    #[test]
    fn budgets_and_dead_index_stay_in_step() {
        let mut index = LiveIndex::new(&["app/a", "app/b"]);
        assert_eq!((index.endpoint_id("app/b"), index.endpoint_id("gone/x")), (1, 2));
        assert_eq!(index.key(2), "gone/x");
        index.insert(seq(1), live(Kind::Delivery, 0, 100, false));
        index.insert(seq(2), live(Kind::Delivery, 0, 200, true));
        index.insert(seq(3), live(Kind::Delivery, 1, 150, false));
        index.insert(seq(4), live(Kind::BatchItem, 1, 160, false));
        assert_eq!((index.live_bytes(), index.endpoint_bytes(0), index.endpoint_bytes(1)), (40, 20, 20));
        assert_eq!((index.counts(0), index.counts(1)), ((1, 1), (1, 0)));
        // A compaction copy replaces the entry without counting it twice.
        assert!(index.insert(seq(2), live(Kind::Delivery, 0, 200, true)).is_some());
        assert_eq!((index.live_bytes(), index.dead_before(u64::MAX)), (40, seqs(&[2])));
        assert!(index.set_dead(seq(3), true) && !index.set_dead(seq(3), true), "only a pending delivery dies");
        assert!(!index.set_dead(seq(4), true), "a batch item never dies");
        assert_eq!(index.dead_before(u64::MAX), seqs(&[3, 2]));
        assert_eq!(index.dead_between(0, 0, 1000), seqs(&[2]));
        assert!(index.set_dead(seq(2), false) && !index.set_dead(seq(2), false), "only a dead letter is replayed");
        assert_eq!(index.dead_of(0).len(), 0);
        assert_eq!(index.remove(seq(3)).map(|l| l.dead), Some(true));
        assert_eq!(index.dead_before(u64::MAX), seqs(&[]));
        index.remove(seq(4));
        assert_eq!((index.live_bytes(), index.endpoint_bytes(1), index.seqs()), (20, 0, seqs(&[1, 2])));
    }
}
