//! Per-sender sequence tracking: did this node receive every message of every sender in a
//! bucket? (docs/cluster.md, "Gap detection").
//!
//! Pure and single-threaded: one `GapDetector` per shard, for the buckets that shard
//! subscribes to. It never sees sockets or Redis; the link supervisor feeds it each message's
//! `(bucket, sender, sequence)` and, at a resync barrier, the bucket's `:seq` hash as Redis
//! returned it. Invariant: a message is reported as a gap or delivered in order — a loss is
//! never silent; only a number the detector already passed is dropped (as a duplicate).

use std::collections::{HashMap, HashSet};

use crate::apps::AppIndex;

use super::bucket::parse_sequence_field;
use super::message::Sender;

/// One bucket of one app, as this node numbers apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId {
    /// The app (its index on this node).
    pub app: AppIndex,
    /// The bucket number, `0..cluster.buckets`.
    pub number: u16,
}

/// What one received message is, in its sender's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The number after the last one seen: deliver.
    InOrder,
    /// The first message of this sender in this bucket: deliver.
    NewSender,
    /// A number at or below the last one seen: drop it.
    Duplicate {
        /// The last number seen.
        last: u64,
    },
    /// Messages `expected..got` never arrived: deliver this one, and close the bucket's
    /// connections with 4200.
    Gap {
        /// The number that should have come.
        expected: u64,
        /// The number that came.
        got: u64,
    },
    /// `senders_max` senders are tracked already, so this one cannot be: deliver it, and count
    /// the bucket as gapped (nothing can be checked for this sender).
    TooManySenders,
}

impl Verdict {
    /// Whether the message goes to local connections.
    pub fn deliver(self) -> bool {
        !matches!(self, Verdict::Duplicate { .. })
    }

    /// Whether the bucket's connections may have missed messages.
    pub fn is_gap(self) -> bool {
        matches!(self, Verdict::Gap { .. } | Verdict::TooManySenders)
    }
}

/// Which barrier ran: the first after start, or one after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// First connect: the hash's numbers count as seen (no client can have missed anything).
    Baseline,
    /// After a reconnect: the hash's numbers are checked against what this node saw.
    Reconnect,
}

/// Why a barrier found a gap (the first reason found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// The hash's number for a sender differs from the last one this node saw (0: never seen).
    Missed {
        /// The sender.
        sender: Sender,
        /// The last number this node saw.
        seen: u64,
        /// The number in the hash.
        published: u64,
    },
    /// A sender this node saw is not in the hash: the hash (Redis's data) is gone. Reported
    /// once per sender and bucket until the sender is back in the hash.
    Lost {
        /// The sender.
        sender: Sender,
    },
    /// A field or value of the hash does not parse.
    Unreadable,
    /// A sender in the hash would pass `senders_max`.
    TooManySenders,
}

/// What the detector knows of one sender in one bucket.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The last number seen.
    sequence: u64,
    /// Missing from the hash at the last barrier (already reported as `Lost`).
    lost: bool,
}

/// The last sequence seen per (sender, bucket), with a bound on senders.
#[derive(Debug)]
pub struct GapDetector {
    /// Last number seen per sender and bucket.
    last: HashMap<(Sender, BucketId), Seen>,
    /// Buckets tracked per sender (a sender leaves when its last bucket does).
    senders: HashMap<Sender, u32>,
    /// Buckets whose first barrier ran: from then on a sender's first message must be 1.
    synced: HashSet<BucketId>,
    /// Most senders tracked (`cluster.senders_max`).
    senders_max: usize,
}

impl GapDetector {
    /// An empty detector holding at most `senders_max` senders.
    pub fn new(senders_max: usize) -> GapDetector {
        assert!(senders_max > 0, "cluster.senders_max is at least 1");
        GapDetector { last: HashMap::new(), senders: HashMap::new(), synced: HashSet::new(), senders_max }
    }

    /// Judges one received message and remembers its number.
    pub fn observe(&mut self, bucket: BucketId, sender: Sender, sequence: u64) -> Verdict {
        if let Some(seen) = self.last.get_mut(&(sender, bucket)) {
            let expected = seen.sequence + 1;
            return if sequence == expected {
                seen.sequence = sequence;
                Verdict::InOrder
            } else if sequence < expected {
                Verdict::Duplicate { last: seen.sequence }
            } else {
                seen.sequence = sequence;
                Verdict::Gap { expected, got: sequence }
            };
        }
        if !self.track(sender, bucket, sequence) {
            return Verdict::TooManySenders;
        }
        // After the bucket's barrier this node has seen every number the sender published
        // there (the hash counted the earlier ones), so its first message must be number 1.
        if sequence != 1 && self.synced.contains(&bucket) {
            return Verdict::Gap { expected: 1, got: sequence };
        }
        Verdict::NewSender
    }

    /// Compares a bucket's `:seq` hash (field, value pairs as `HGETALL` returned them, read
    /// before the barrier's `PING` and applied at its `pong`) with what this node saw.
    /// Afterwards the detector continues from the hash's numbers.
    pub fn resync<'a>(
        &mut self,
        bucket: BucketId,
        barrier: Barrier,
        hash: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Option<GapReason> {
        let mut gap = None;
        let mut in_hash = HashSet::new();
        for (field, value) in hash {
            let (Some(sender), Some(published)) = (parse_sequence_field(field), parse_sequence(value)) else {
                gap = gap.or(Some(GapReason::Unreadable));
                continue;
            };
            in_hash.insert(sender);
            let seen = self.last.get(&(sender, bucket)).map(|seen| seen.sequence);
            let keep = match barrier {
                Barrier::Baseline => seen.map_or(published, |seen| seen.max(published)),
                Barrier::Reconnect => {
                    if seen.unwrap_or(0) != published {
                        gap = gap.or(Some(GapReason::Missed { sender, seen: seen.unwrap_or(0), published }));
                    }
                    published
                }
            };
            if seen.is_some() {
                self.last.insert((sender, bucket), Seen { sequence: keep, lost: false });
            } else if !self.track(sender, bucket, keep) {
                gap = gap.or(Some(GapReason::TooManySenders));
            }
        }
        if barrier == Barrier::Reconnect {
            // Kept, not forgotten: a sender that goes on after Redis lost its data continues
            // its own numbers, and its next message is then in order.
            let mut lost: Vec<Sender> = Vec::new();
            for ((sender, _), seen) in self.last.iter_mut().filter(|((s, b), _)| *b == bucket && !in_hash.contains(s)) {
                if !seen.lost {
                    seen.lost = true;
                    lost.push(*sender);
                }
            }
            // The smallest, so that the reason reported does not depend on hash map order.
            if let Some(sender) = lost.into_iter().min() {
                gap = gap.or(Some(GapReason::Lost { sender }));
            }
        }
        self.synced.insert(bucket);
        gap
    }

    /// Forgets every shard of a reaped node's incarnation.
    pub fn forget(&mut self, incarnation: u64) {
        self.last.retain(|(sender, _), _| sender.incarnation != incarnation);
        self.senders.retain(|sender, _| sender.incarnation != incarnation);
    }

    /// Senders tracked now.
    pub fn senders(&self) -> usize {
        self.senders.len()
    }

    /// Starts tracking a (sender, bucket) at `sequence`; false when a new sender would pass
    /// `senders_max`.
    fn track(&mut self, sender: Sender, bucket: BucketId, sequence: u64) -> bool {
        if !self.senders.contains_key(&sender) && self.senders.len() >= self.senders_max {
            return false;
        }
        *self.senders.entry(sender).or_insert(0) += 1;
        self.last.insert((sender, bucket), Seen { sequence, lost: false });
        true
    }
}

/// A sequence value in the hash: decimal, at least 1.
fn parse_sequence(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Sender = Sender { incarnation: 0xa, shard: 0 };
    const A1: Sender = Sender { incarnation: 0xa, shard: 1 };
    const B: Sender = Sender { incarnation: 0xb, shard: 0 };
    /// Node A restarted: a new incarnation.
    const A_AGAIN: Sender = Sender { incarnation: 0xaa, shard: 0 };
    const X: BucketId = BucketId { app: 0, number: 3 };
    const Y: BucketId = BucketId { app: 0, number: 4 };

    /// Feeds messages in order and checks each verdict.
    fn check(detector: &mut GapDetector, input: &[(BucketId, Sender, u64)], expected: &[Verdict]) {
        let got: Vec<Verdict> = input.iter().map(|&(b, s, n)| detector.observe(b, s, n)).collect();
        assert_eq!(got, expected, "{input:?}");
    }

    fn field(sender: Sender) -> Vec<u8> {
        let mut out = String::new();
        super::super::bucket::sequence_field(sender, &mut out);
        out.into_bytes()
    }

    fn resync(
        detector: &mut GapDetector,
        bucket: BucketId,
        barrier: Barrier,
        hash: &[(Sender, &str)],
    ) -> Option<GapReason> {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = hash.iter().map(|(s, n)| (field(*s), n.as_bytes().to_vec())).collect();
        detector.resync(bucket, barrier, fields.iter().map(|(f, v)| (f.as_slice(), v.as_slice())))
    }

    /// Steady state: in order, duplicates dropped, a jump reported with what is missing, and
    /// each (sender, bucket) counted on its own.
    #[test]
    fn steady_state_verdicts() {
        let mut detector = GapDetector::new(16);
        check(
            &mut detector,
            &[(X, A, 1), (X, A, 2), (X, A, 2), (X, A, 1), (X, A, 5), (X, A, 6), (Y, A, 1), (X, A1, 1), (X, B, 9)],
            &[
                Verdict::NewSender,
                Verdict::InOrder,
                Verdict::Duplicate { last: 2 },
                Verdict::Duplicate { last: 2 },
                Verdict::Gap { expected: 3, got: 5 },
                Verdict::InOrder,
                Verdict::NewSender,
                Verdict::NewSender,
                // Before the bucket's first barrier, a sender may start anywhere.
                Verdict::NewSender,
            ],
        );
        assert!(Verdict::Gap { expected: 3, got: 5 }.deliver() && Verdict::Gap { expected: 3, got: 5 }.is_gap());
        assert!(!Verdict::Duplicate { last: 2 }.deliver() && !Verdict::InOrder.is_gap());
        assert_eq!(detector.senders(), 3);
    }

    /// A node that restarts has a new incarnation: its stream starts again at 1 without a
    /// gap, even after the barrier; the old incarnation is forgotten once reaped.
    #[test]
    fn restarted_sender_is_a_new_sender() {
        let mut detector = GapDetector::new(16);
        assert_eq!(resync(&mut detector, X, Barrier::Baseline, &[(A, "7")]), None);
        check(
            &mut detector,
            &[(X, A, 8), (X, A_AGAIN, 1), (X, A_AGAIN, 2)],
            &[Verdict::InOrder, Verdict::NewSender, Verdict::InOrder],
        );
        assert_eq!(detector.senders(), 2);
        detector.forget(A.incarnation);
        assert_eq!(detector.senders(), 1);
        // After the barrier a new sender's first message must be 1: 3 means 1 and 2 were lost.
        check(&mut detector, &[(X, B, 3), (X, B, 4)], &[Verdict::Gap { expected: 1, got: 3 }, Verdict::InOrder]);
    }

    /// The first barrier only learns: the hash's numbers count as seen, never as a gap.
    #[test]
    fn baseline_adopts_the_hash() {
        let mut detector = GapDetector::new(16);
        check(&mut detector, &[(X, A, 12)], &[Verdict::NewSender]);
        assert_eq!(resync(&mut detector, X, Barrier::Baseline, &[(A, "10"), (B, "4")]), None);
        check(&mut detector, &[(X, A, 13), (X, B, 5)], &[Verdict::InOrder, Verdict::InOrder]);
    }

    /// After a reconnect the hash tells what was missed: a number beyond the last seen, a
    /// sender never seen, a sender missing from the hash (Redis lost it), an unreadable field.
    #[test]
    fn reconnect_barrier_finds_gaps() {
        let mut detector = GapDetector::new(16);
        resync(&mut detector, X, Barrier::Baseline, &[(A, "5")]);
        check(&mut detector, &[(X, A, 6)], &[Verdict::InOrder]);
        // Nothing was published while the link was down.
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[(A, "6")]), None);
        // A published 7 and 8 while the link was down.
        let missed = GapReason::Missed { sender: A, seen: 6, published: 8 };
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[(A, "8")]), Some(missed));
        check(&mut detector, &[(X, A, 9)], &[Verdict::InOrder]);
        // B started and published while the link was down.
        let missed = GapReason::Missed { sender: B, seen: 0, published: 2 };
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[(A, "9"), (B, "2")]), Some(missed));
        // Redis restarted empty: the senders seen are lost, reported once, and their streams
        // go on in order.
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[]), Some(GapReason::Lost { sender: A }));
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[]), None);
        check(&mut detector, &[(X, A, 10), (X, B, 3)], &[Verdict::InOrder, Verdict::InOrder]);
        // Back in the hash, a sender can be lost again.
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[(A, "10"), (B, "3")]), None);
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[(B, "3")]), Some(GapReason::Lost { sender: A }));
        // Other buckets are untouched by a bucket's barrier.
        check(&mut detector, &[(Y, A, 1)], &[Verdict::NewSender]);
        assert_eq!(resync(&mut detector, X, Barrier::Reconnect, &[(B, "3")]), None);
        check(&mut detector, &[(Y, A, 2)], &[Verdict::InOrder]);
        for (field, value) in
            [(&b"junk"[..], &b"1"[..]), (&field(A)[..], b"0"), (&field(A)[..], b"x"), (&field(A)[..], b"")]
        {
            let got = detector.resync(X, Barrier::Reconnect, [(field, value)]);
            assert_eq!(got, Some(GapReason::Unreadable), "{field:?} {value:?}");
        }
    }

    /// Past `senders_max` a new sender is a gap (loud), in a message or in a barrier; a known
    /// sender still works, and a forgotten one makes room.
    #[test]
    fn senders_are_bounded() {
        let mut detector = GapDetector::new(2);
        check(
            &mut detector,
            &[(X, A, 1), (Y, A, 1), (X, B, 1), (X, A1, 1), (X, A, 2)],
            &[Verdict::NewSender, Verdict::NewSender, Verdict::NewSender, Verdict::TooManySenders, Verdict::InOrder],
        );
        assert!(Verdict::TooManySenders.is_gap() && Verdict::TooManySenders.deliver());
        assert_eq!(resync(&mut detector, X, Barrier::Baseline, &[(A1, "3")]), Some(GapReason::TooManySenders));
        detector.forget(B.incarnation);
        check(&mut detector, &[(X, A1, 4)], &[Verdict::Gap { expected: 1, got: 4 }]);
        assert_eq!(detector.senders(), 2);
    }
}
