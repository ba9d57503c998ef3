//! Buckets: which sharded pub/sub channel carries a channel's (or a user's) messages, and the
//! Redis names around it (docs/cluster.md, "Fan-out" and "Gap detection").
//!
//! Pure. The hash is 64-bit FNV-1a, written out here rather than taken from a library or
//! `std::hash`, because every node of every version must agree on it: a node that put a channel
//! in another bucket would publish where the others' subscribers never look.

use std::fmt::Write;

use crate::pusher::channel::SERVER_TO_USER_PREFIX;

use super::message::Sender;

/// FNV-1a 64-bit offset basis (the FNV parameters published by its authors).
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over the concatenation of `parts` (parts avoid building a joined string).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for byte in parts.iter().flat_map(|part| part.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The bucket of a channel, for an app with `buckets` buckets.
pub fn of_channel(channel: &str, buckets: u16) -> u16 {
    assert!(buckets > 0, "cluster.buckets is at least 1");
    (fnv1a(&[channel.as_bytes()]) % u64::from(buckets)) as u16
}

/// The bucket of a user's messages: that of the user's channel `#server-to-user-{user_id}`.
pub fn of_user(user_id: &str, buckets: u16) -> u16 {
    assert!(buckets > 0, "cluster.buckets is at least 1");
    (fnv1a(&[SERVER_TO_USER_PREFIX.as_bytes(), user_id.as_bytes()]) % u64::from(buckets)) as u16
}

/// The buckets a shard subscribes to: `n % shards == shard`.
pub fn of_shard(buckets: u16, shards: usize, shard: usize) -> impl Iterator<Item = u16> {
    assert!(shard < shards, "shard {shard} of {shards}");
    (0..buckets).filter(move |n| usize::from(*n) % shards == shard)
}

/// Writes the sharded pub/sub channel of a bucket, `{prefix}:b:{app_id}:{n}`, into `out`.
pub fn channel_name(prefix: &str, app_id: &str, bucket: u16, out: &mut String) {
    out.clear();
    let _ = write!(out, "{prefix}:b:{app_id}:{bucket}");
}

/// Writes the hash of the bucket's senders' latest sequences, `{channel}:seq`, into `out`.
pub fn sequence_key(prefix: &str, app_id: &str, bucket: u16, out: &mut String) {
    channel_name(prefix, app_id, bucket, out);
    out.push_str(":seq");
}

/// Writes a sender's field in the sequence hash: the incarnation as 16 lower-case hex digits,
/// a colon, the shard in decimal.
pub fn sequence_field(sender: Sender, out: &mut String) {
    out.clear();
    let _ = write!(out, "{:016x}:{}", sender.incarnation, sender.shard);
}

/// Writes a key of a channel, `{prefix:c:app_id:channel}:suffix`, into `out`: the channel's
/// keys share one hash tag, so one script or transaction touches one slot (docs/cluster.md,
/// "Presence, occupancy, users: keys and scripts").
pub fn channel_key(prefix: &str, app_id: &str, channel: &str, suffix: &str, out: &mut String) {
    out.clear();
    let _ = write!(out, "{{{prefix}:c:{app_id}:{channel}}}:{suffix}");
}

/// Reads a field `sequence_field` wrote; `None` for anything else.
pub fn parse_sequence_field(field: &[u8]) -> Option<Sender> {
    let text = std::str::from_utf8(field).ok()?;
    let (incarnation, shard) = text.split_once(':')?;
    let hex = incarnation.len() == 16 && incarnation.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let decimal = !shard.is_empty() && shard.len() <= 5 && shard.bytes().all(|b| b.is_ascii_digit());
    if !hex || !decimal {
        return None;
    }
    let incarnation = u64::from_str_radix(incarnation, 16).ok()?;
    (incarnation != 0).then_some(())?;
    Some(Sender { incarnation, shard: shard.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + std::fmt::Debug>(input: &str, got: T, expected: T) {
        assert_eq!(got, expected, "{input:?}");
    }

    /// The hash is FNV-1a 64 as published (its authors' test vectors), so any node of any
    /// version computes the same buckets; the bucket numbers below pin it for channel names.
    #[test]
    fn hash_is_pinned() {
        for (input, expected) in
            [("", 0xcbf2_9ce4_8422_2325), ("a", 0xaf63_dc4c_8601_ec8c), ("foobar", 0x8594_4171_f739_67e8)]
        {
            check(input, fnv1a(&[input.as_bytes()]), expected);
        }
        check("foo|bar", fnv1a(&[b"foo", b"bar"]), fnv1a(&[b"foobar"]));
        for (channel, expected) in
            [("my-channel", 13), ("presence-room", 12), ("private-chat", 45), ("#server-to-user-42", 52)]
        {
            check(channel, of_channel(channel, 64), expected);
        }
        check("user 42", of_user("42", 64), of_channel("#server-to-user-42", 64));
        check("one bucket", of_channel("anything", 1), 0);
        check("u16 buckets", of_channel("a", u16::MAX), (0xaf63_dc4c_8601_ec8c_u64 % 65_535) as u16);
    }

    /// Every bucket belongs to exactly one shard.
    #[test]
    fn shards_split_the_buckets() {
        let split: Vec<Vec<u16>> = (0..3).map(|shard| of_shard(8, 3, shard).collect()).collect();
        check("3 shards", split, vec![vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
        check("more shards than buckets", of_shard(2, 4, 3).count(), 0);
    }

    /// Redis names follow docs/cluster.md; sequence fields round-trip and anything else is
    /// refused.
    #[test]
    fn names_and_sequence_fields() {
        let mut name = String::from("stale");
        channel_name("rw", "app-1", 17, &mut name);
        check("channel", name.as_str(), "rw:b:app-1:17");
        sequence_key("rw", "app-1", 17, &mut name);
        check("seq key", name.as_str(), "rw:b:app-1:17:seq");
        let sender = Sender { incarnation: 0x00ab_cdef_0123_4567, shard: 65_535 };
        sequence_field(sender, &mut name);
        check("field", name.as_str(), "00abcdef01234567:65535");
        check("field", parse_sequence_field(name.as_bytes()), Some(sender));
        for bad in [
            "",
            ":",
            "00abcdef01234567",
            "00abcdef01234567:",
            "00ABCDEF01234567:1",
            "0abcdef01234567:1",
            "00abcdef01234567:65536",
            "00abcdef01234567:-1",
            "00abcdef01234567:+1",
            "0000000000000000:1",
            "00abcdef01234567:1:2",
            "\u{fe0f}0abcdef0123456:1",
        ] {
            check(bad, parse_sequence_field(bad.as_bytes()), None);
        }
        check("not utf-8", parse_sequence_field(b"\xff"), None);
    }
}
