//! The WAL's on-disk records and segment header (`docs/wal.md`): sans-IO encoders into a
//! caller's buffer and decoders over `&[u8]` that say "need more bytes" without consuming.
//!
//! Owns nothing but bytes; never touches files. Every decoder bounds what it reads.

use bytes::Bytes;

/// Segment header size.
pub const HEADER_BYTES: usize = 40;
/// Bytes of the header its CRC covers.
const HEADER_CRC_AT: usize = 32;
/// Segment magic: "RWWAL", two zero bytes, format 3.
pub const MAGIC: [u8; 8] = *b"RWWAL\0\0\x03";
/// Segment format version (2 added the `Mark` record, 3 the `BatchItem` record; docs/wal.md).
pub const VERSION: u32 = 3;
/// What every format's magic starts with, to tell "another version" from "not a header".
const MAGIC_PREFIX: [u8; 7] = *b"RWWAL\0\0";
/// Record frame: length + crc.
pub const FRAME_BYTES: usize = 8;
/// Largest `kind + payload` a record may have; anything longer is garbage.
pub const RECORD_BYTES_MAX: usize = 64 << 20;
/// Bytes a `Delivery` record's `kind + payload` takes besides its endpoint key and body.
pub const DELIVERY_OVERHEAD_BYTES: usize = 1 + 18;

const KIND_DELIVERY: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_REPLAY: u8 = 3;
const KIND_MARK: u8 = 4;
const KIND_BATCH_ITEM: u8 = 5;
/// `kind + payload` of a `Mark`: fixed, so recovery can look for marks at every offset.
const MARK_BODY_BYTES: usize = 17;
/// Bytes of a framed `Mark`.
pub const MARK_BYTES: usize = FRAME_BYTES + MARK_BODY_BYTES;

/// A live record's sequence number in its shard's log: handed out once, in order, and never
/// again by that log (recovery resumes above every number it has seen). It names a delivery or
/// a batch item everywhere (the index, the dispatcher's queues, the webhook id); the record
/// encoder and decoder alone turn it into the plain little-endian number of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceNumber(u64);

impl SequenceNumber {
    /// The lowest number, where a new log starts.
    pub const MIN: SequenceNumber = SequenceNumber(0);
    /// The highest number (a range bound; never handed out in practice).
    pub const MAX: SequenceNumber = SequenceNumber(u64::MAX);

    /// The number `value` as read from the log or a webhook id.
    pub fn new(value: u64) -> SequenceNumber {
        SequenceNumber(value)
    }

    /// The plain number, for the log's bytes and the webhook id.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The number after this one.
    pub fn next(self) -> SequenceNumber {
        SequenceNumber(self.0 + 1)
    }
}

impl std::fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The shard that writes this log.
    pub shard: u32,
    /// Random id of the log, the same in every segment.
    pub log_id: u64,
    /// The next sequence number when the segment was created (also its file name).
    pub first_seq: u64,
}

impl SegmentHeader {
    /// The header bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.shard.to_le_bytes());
        out[16..24].copy_from_slice(&self.log_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc32fast::hash(&out[..HEADER_CRC_AT]);
        out[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a header: `Ok(None)` when short, damaged or not a ringwire header,
    /// `Err(version)` when it is one of another format version (the magic's last byte and the
    /// version field agree on it).
    pub fn decode(bytes: &[u8]) -> Result<Option<SegmentHeader>, u32> {
        let version = bytes.get(8..12).map(|v| u32_at(v, 0));
        if bytes.get(0..7) == Some(&MAGIC_PREFIX[..]) && version == Some(bytes[7].into()) && bytes[7] != MAGIC[7] {
            return Err(u32::from(bytes[7]));
        }
        let Some(bytes) = bytes.get(..HEADER_BYTES) else { return Ok(None) };
        let crc = u32_at(bytes, HEADER_CRC_AT);
        let reserved_zero = bytes[HEADER_CRC_AT + 4..].iter().all(|&b| b == 0);
        if bytes[0..8] != MAGIC
            || version != Some(VERSION)
            || crc32fast::hash(&bytes[..HEADER_CRC_AT]) != crc
            || !reserved_zero
        {
            return Ok(None);
        }
        Ok(Some(SegmentHeader { shard: u32_at(bytes, 12), log_id: u64_at(bytes, 16), first_seq: u64_at(bytes, 24) }))
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: forget it.
    Delivered,
    /// Retries exhausted or endpoint disabled: keep it as a dead letter.
    Dead,
    /// A dead letter deleted through the admin API or expired: forget it, undelivered.
    Discarded,
}

/// One delivery to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Sequence number within its log (part of the webhook id).
    pub seq: SequenceNumber,
    /// Unix milliseconds when it was created.
    pub created_ms: u64,
    /// `"{app_id}/{endpoint_id}"`.
    pub endpoint: Box<str>,
    /// The exact body to POST.
    pub body: Bytes,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A new (or copied-forward) delivery.
    Delivery(Delivery),
    /// A new (or copied-forward) batch item: an event waiting to be batched into one delivery
    /// to `endpoint`; its body is the event's JSON object. Acked `Delivered` once the delivery
    /// holding it is appended.
    BatchItem(Delivery),
    /// A delivery ended.
    Ack {
        /// Which delivery.
        seq: SequenceNumber,
        /// How.
        outcome: Outcome,
    },
    /// A delivery is pending again.
    Replay {
        /// Which delivery.
        seq: SequenceNumber,
    },
    /// The first record of every batch: what was known durable when the batch was written.
    /// A valid mark proves that the bytes before `durable` were fsynced, so damage there is
    /// corruption, not a torn tail (docs/wal.md, "Recovery").
    Mark {
        /// Bytes of this segment (header included) fsynced before this batch was written; at
        /// most the mark's own offset.
        durable: u64,
        /// The log's next sequence number when the batch was written (above every seq in it).
        next_seq: SequenceNumber,
    },
}

/// Why bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A length of 0 or over `RECORD_BYTES_MAX`.
    Length,
    /// The CRC does not match.
    Checksum,
    /// An unknown kind, or a payload of the wrong shape.
    Malformed,
}

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_BYTES]);
        match self {
            Record::Delivery(d) => {
                encode_delivery_payload(out, KIND_DELIVERY, d.seq, d.created_ms, &d.endpoint, &d.body)
            }
            Record::BatchItem(d) => {
                encode_delivery_payload(out, KIND_BATCH_ITEM, d.seq, d.created_ms, &d.endpoint, &d.body)
            }
            Record::Ack { seq, outcome } => {
                out.push(KIND_ACK);
                out.extend_from_slice(&seq.get().to_le_bytes());
                out.push(match outcome {
                    Outcome::Delivered => 1,
                    Outcome::Dead => 2,
                    Outcome::Discarded => 3,
                });
            }
            Record::Replay { seq } => {
                out.push(KIND_REPLAY);
                out.extend_from_slice(&seq.get().to_le_bytes());
            }
            Record::Mark { durable, next_seq } => {
                out.push(KIND_MARK);
                out.extend_from_slice(&durable.to_le_bytes());
                out.extend_from_slice(&next_seq.get().to_le_bytes());
            }
        }
        finish_frame(out, start);
    }

    /// Bytes `encode` appends.
    pub fn encoded_len(&self) -> usize {
        FRAME_BYTES
            + 1
            + match self {
                Record::Delivery(d) | Record::BatchItem(d) => {
                    DELIVERY_OVERHEAD_BYTES - 1 + d.endpoint.len() + d.body.len()
                }
                Record::Ack { .. } => 9,
                Record::Replay { .. } => 8,
                Record::Mark { .. } => MARK_BODY_BYTES - 1,
            }
    }

    /// Decodes the record at the start of `bytes`: `Ok(None)` when the bytes end before it
    /// does (need more, or a torn tail), else the record and the bytes it took.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Record, usize)>, DecodeError> {
        if bytes.len() < FRAME_BYTES {
            return Ok(None);
        }
        let length = u32_at(bytes, 0) as usize;
        if length == 0 || length > RECORD_BYTES_MAX {
            return Err(DecodeError::Length);
        }
        let Some(body) = bytes.get(FRAME_BYTES..FRAME_BYTES + length) else {
            return Ok(None);
        };
        if crc32fast::hash(body) != u32_at(bytes, 4) {
            return Err(DecodeError::Checksum);
        }
        let (kind, payload) = (body[0], &body[1..]);
        let record = match kind {
            KIND_DELIVERY => Record::Delivery(decode_delivery(payload)?),
            KIND_BATCH_ITEM => Record::BatchItem(decode_delivery(payload)?),
            KIND_ACK if payload.len() == 9 => Record::Ack {
                seq: SequenceNumber::new(u64_at(payload, 0)),
                outcome: match payload[8] {
                    1 => Outcome::Delivered,
                    2 => Outcome::Dead,
                    3 => Outcome::Discarded,
                    _ => return Err(DecodeError::Malformed),
                },
            },
            KIND_REPLAY if payload.len() == 8 => Record::Replay { seq: SequenceNumber::new(u64_at(payload, 0)) },
            KIND_MARK if payload.len() == MARK_BODY_BYTES - 1 => {
                Record::Mark { durable: u64_at(payload, 0), next_seq: SequenceNumber::new(u64_at(payload, 8)) }
            }
            _ => return Err(DecodeError::Malformed),
        };
        Ok(Some((record, FRAME_BYTES + length)))
    }

    /// The delivery sequence number the record is about (`None` for a `Mark`).
    pub fn seq(&self) -> Option<SequenceNumber> {
        match self {
            Record::Delivery(d) | Record::BatchItem(d) => Some(d.seq),
            Record::Ack { seq, .. } | Record::Replay { seq } => Some(*seq),
            Record::Mark { .. } => None,
        }
    }
}

/// The framed bytes of a `Mark` (written over the placeholder that starts every batch).
pub fn mark_bytes(durable: u64, next_seq: SequenceNumber) -> [u8; MARK_BYTES] {
    let mut out = [0u8; MARK_BYTES];
    out[0..4].copy_from_slice(&(MARK_BODY_BYTES as u32).to_le_bytes());
    out[8] = KIND_MARK;
    out[9..17].copy_from_slice(&durable.to_le_bytes());
    out[17..25].copy_from_slice(&next_seq.get().to_le_bytes());
    let crc = crc32fast::hash(&out[FRAME_BYTES..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The valid `Mark`s that start after `from` in a segment's bytes, with their offsets.
/// Marks have one fixed size, so this looks at every offset in linear time: it finds them
/// even past bytes that do not parse (a damaged length hides where the next record starts).
pub fn marks_after(bytes: &[u8], from: usize) -> impl Iterator<Item = (usize, u64, SequenceNumber)> + '_ {
    let last = bytes.len().saturating_sub(MARK_BYTES);
    (from..=last).filter_map(move |at| {
        let frame = &bytes[at..at + MARK_BYTES];
        if u32_at(frame, 0) as usize != MARK_BODY_BYTES || frame[FRAME_BYTES] != KIND_MARK {
            return None;
        }
        match Record::decode(frame) {
            // A genuine mark never claims bytes past itself.
            Ok(Some((Record::Mark { durable, next_seq }, _))) if durable <= at as u64 => Some((at, durable, next_seq)),
            _ => None,
        }
    })
}

/// Appends a framed `Delivery` (or, with `batch_item`, `BatchItem`) record without building a
/// `Record` (the WAL's append path: no copy of the endpoint key).
pub fn encode_delivery(
    out: &mut Vec<u8>,
    batch_item: bool,
    seq: SequenceNumber,
    created_ms: u64,
    endpoint: &str,
    body: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_BYTES]);
    let kind = if batch_item { KIND_BATCH_ITEM } else { KIND_DELIVERY };
    encode_delivery_payload(out, kind, seq, created_ms, endpoint, body);
    finish_frame(out, start);
}

/// Bytes `encode_delivery` appends.
pub fn delivery_len(endpoint: &str, body: &[u8]) -> usize {
    FRAME_BYTES + DELIVERY_OVERHEAD_BYTES + endpoint.len() + body.len()
}

fn encode_delivery_payload(
    out: &mut Vec<u8>,
    kind: u8,
    seq: SequenceNumber,
    created_ms: u64,
    endpoint: &str,
    body: &[u8],
) {
    assert!(endpoint.len() <= usize::from(u16::MAX), "endpoint keys are validated short");
    out.push(kind);
    out.extend_from_slice(&seq.get().to_le_bytes());
    out.extend_from_slice(&created_ms.to_le_bytes());
    out.extend_from_slice(&(endpoint.len() as u16).to_le_bytes());
    out.extend_from_slice(endpoint.as_bytes());
    out.extend_from_slice(body);
}

/// Fills in the length and CRC of the record that starts at `start` in `out`.
fn finish_frame(out: &mut [u8], start: usize) {
    let length = out.len() - start - FRAME_BYTES;
    assert!(length <= RECORD_BYTES_MAX, "records are bounded by the API's body limit");
    let crc = crc32fast::hash(&out[start + FRAME_BYTES..]);
    out[start..start + 4].copy_from_slice(&(length as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn decode_delivery(payload: &[u8]) -> Result<Delivery, DecodeError> {
    if payload.len() < 18 {
        return Err(DecodeError::Malformed);
    }
    let endpoint_len = usize::from(u16::from_le_bytes([payload[16], payload[17]]));
    let endpoint = payload.get(18..18 + endpoint_len).ok_or(DecodeError::Malformed)?;
    let endpoint = std::str::from_utf8(endpoint).map_err(|_| DecodeError::Malformed)?;
    Ok(Delivery {
        seq: SequenceNumber::new(u64_at(payload, 0)),
        created_ms: u64_at(payload, 8),
        endpoint: endpoint.into(),
        body: Bytes::copy_from_slice(&payload[18 + endpoint_len..]),
    })
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(record: Record) {
        let mut out = vec![0xAA];
        record.encode(&mut out);
        assert_eq!(out.len() - 1, record.encoded_len());
        assert_eq!(Record::decode(&out[1..]), Ok(Some((record.clone(), out.len() - 1))));
        // Every strict prefix is "need more", never an error or a different record.
        for cut in 1..out.len() - 1 {
            assert_eq!(Record::decode(&out[1..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    /// Each kind round-trips, and a prefix of a record is never mistaken for one.
    #[test]
    fn records_round_trip() {
        check(Record::Delivery(Delivery {
            seq: SequenceNumber::new(7),
            created_ms: 1_700_000_000_123,
            endpoint: "app/0".into(),
            body: Bytes::from_static(br#"{"a":1}"#),
        }));
        let item = Delivery {
            seq: SequenceNumber::new(8),
            created_ms: 5,
            endpoint: "app/1".into(),
            body: Bytes::from_static(b"{}"),
        };
        check(Record::BatchItem(item.clone()));
        let mut direct = Vec::new();
        encode_delivery(&mut direct, true, item.seq, item.created_ms, &item.endpoint, &item.body);
        let mut built = Vec::new();
        Record::BatchItem(item.clone()).encode(&mut built);
        assert_eq!((direct.len(), &direct), (delivery_len(&item.endpoint, &item.body), &built));
        check(Record::Ack { seq: SequenceNumber::new(u64::MAX), outcome: Outcome::Delivered });
        check(Record::Ack { seq: SequenceNumber::new(3), outcome: Outcome::Dead });
        check(Record::Ack { seq: SequenceNumber::new(4), outcome: Outcome::Discarded });
        check(Record::Replay { seq: SequenceNumber::new(9) });
        check(Record::Mark { durable: 4096, next_seq: SequenceNumber::new(12) });
        let mut mark = Vec::new();
        Record::Mark { durable: 4096, next_seq: SequenceNumber::new(12) }.encode(&mut mark);
        assert_eq!(mark, mark_bytes(4096, SequenceNumber::new(12)));
    }

    /// Marks are found at any offset, past garbage, and never when they claim bytes past
    /// themselves.
    #[test]
    fn marks_are_found_past_garbage() {
        let mut out = vec![0xEE; 5];
        Record::Mark { durable: 3, next_seq: SequenceNumber::new(9) }.encode(&mut out);
        Record::Replay { seq: SequenceNumber::new(1) }.encode(&mut out);
        Record::Mark { durable: 1000, next_seq: SequenceNumber::new(10) }.encode(&mut out);
        Record::Mark { durable: 30, next_seq: SequenceNumber::new(11) }.encode(&mut out);
        let found: Vec<_> = marks_after(&out, 1).collect();
        assert_eq!(found, vec![(5, 3, SequenceNumber::new(9)), (5 + 2 * MARK_BYTES + 17, 30, SequenceNumber::new(11))]);
        assert_eq!(marks_after(&out, 6).count(), 1);
    }

    /// A flipped bit anywhere after the length is a checksum error; bad lengths are refused.
    #[test]
    fn corruption_is_detected() {
        let mut out = Vec::new();
        Record::Replay { seq: SequenceNumber::new(1) }.encode(&mut out);
        for i in 4..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert_eq!(Record::decode(&bad), Err(DecodeError::Checksum), "byte {i}");
        }
        assert_eq!(Record::decode(&[0; 16]), Err(DecodeError::Length));
        assert_eq!(Record::decode(&[0xff; 16]), Err(DecodeError::Length));
    }

    /// The header round-trips and rejects other formats.
    #[test]
    fn header_round_trips() {
        let header = SegmentHeader { shard: 3, log_id: 0xdead_beef, first_seq: 42 };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(Some(header)));
        assert_eq!(SegmentHeader::decode(&bytes[..HEADER_BYTES - 1]), Ok(None));
        for i in 0..HEADER_BYTES {
            let mut flipped = bytes;
            flipped[i] ^= 0x04;
            assert_eq!(SegmentHeader::decode(&flipped), Ok(None), "a flip in byte {i} is a damaged header");
        }
        // A format-2 header (same layout, no batch items) is another version, not damage.
        let mut two = bytes;
        two[7] = 2;
        two[8] = 2;
        assert_eq!(SegmentHeader::decode(&two), Err(2));
        // A format-1 header (32 bytes, no CRC) is recognised as another version.
        let mut other = bytes;
        other[7] = 1;
        other[8] = 1;
        assert_eq!(SegmentHeader::decode(&other[..32]), Err(1));
        other[0] = b'X';
        assert_eq!(SegmentHeader::decode(&other), Ok(None));
    }
}
