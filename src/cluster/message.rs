//! The bucket message: what one node `SPUBLISH`es to a bucket and every node reads back
//! (docs/cluster.md, "Message format"). Sans-IO: `encode` appends to a caller's buffer,
//! `decode_header` reads a `&[u8]`, `decode` hands the WebSocket frame on as a slice of the
//! received `Bytes` (no copy).
//!
//! Owns the byte layout and the per-kind field rules; knows nothing of Redis, buckets or
//! shards. Invariant: whatever `encode` accepts, `decode` returns unchanged, and whatever
//! `decode` accepts, `encode` accepts; both check one rule set (`check`).

use bytes::Bytes;

use crate::pusher::channel::{self, CHANNEL_NAME_BYTES_MAX};
use crate::pusher::message::{SocketId, USER_ID_BYTES_MAX};

/// The only layout version this build reads and writes.
pub const VERSION: u8 = 1;
/// Longest node id (the `cluster.node_id` rule).
pub const NODE_ID_BYTES_MAX: usize = 64;
/// Longest app id a message can carry (its one-byte length).
pub const APP_ID_BYTES_MAX: usize = 255;
/// Bytes before the first variable-length field.
const FIXED_BYTES: usize = 20;

/// Who numbered a message: one shard of one node's process, or the Redis scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sender {
    /// The node's random id for this process (for scripts: the id kept in Redis); never 0.
    pub incarnation: u64,
    /// The shard index, or `SCRIPT_SHARD`.
    pub shard: u16,
}

/// The shard field of messages that Redis scripts publish with their own sequence
/// (docs/cluster.md, "Scripts are senders of their own").
pub const SCRIPT_SHARD: u16 = 0xFFFF;

/// What a message asks the receiving node to do (the kind table of docs/cluster.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An event published through the HTTP API, for a channel's subscribers.
    Publication = 1,
    /// A `client-*` event relayed from a connection, for a channel's other subscribers.
    ClientEvent = 2,
    /// `pusher_internal:member_added`, decided cluster-wide by a script.
    MemberAdded = 3,
    /// `pusher_internal:member_removed`, decided cluster-wide by a script.
    MemberRemoved = 4,
    /// `pusher_internal:subscription_count` for a channel.
    SubscriptionCount = 5,
    /// An event on `#server-to-user-{user_id}`, for the user's signed-in connections.
    UserEvent = 6,
    /// `terminate_connections`: close the user's connections (no frame).
    TerminateUser = 7,
    /// A watchlist `online` event, for connections watching the user.
    UserOnline = 8,
    /// A watchlist `offline` event, for connections watching the user.
    UserOffline = 9,
}

/// Whether a kind needs a field, allows it, or forbids it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    Required,
    Optional,
    Forbidden,
}

/// One kind's field rules: (channel, user_id, exclude, frame).
struct Rules {
    channel: Rule,
    user_id: Rule,
    exclude: Rule,
    frame: Rule,
}

impl Kind {
    /// The kind of a wire byte.
    pub fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Publication,
            2 => Kind::ClientEvent,
            3 => Kind::MemberAdded,
            4 => Kind::MemberRemoved,
            5 => Kind::SubscriptionCount,
            6 => Kind::UserEvent,
            7 => Kind::TerminateUser,
            8 => Kind::UserOnline,
            9 => Kind::UserOffline,
            _ => return None,
        })
    }

    fn rules(self) -> Rules {
        use Rule::{Forbidden as No, Optional as Maybe, Required as Yes};
        let (channel, user_id, exclude, frame) = match self {
            Kind::Publication => (Yes, No, Maybe, Yes),
            Kind::ClientEvent => (Yes, No, Yes, Yes),
            // member_added skips the joining connection, as on a single node.
            Kind::MemberAdded => (Yes, Yes, Maybe, Yes),
            Kind::MemberRemoved => (Yes, Yes, No, Yes),
            Kind::SubscriptionCount => (Yes, No, No, Yes),
            Kind::UserEvent => (No, Yes, Maybe, Yes),
            Kind::TerminateUser => (No, Yes, No, No),
            Kind::UserOnline | Kind::UserOffline => (No, Yes, No, Yes),
        };
        Rules { channel, user_id, exclude, frame }
    }
}

/// Everything in a message but the frame, borrowed from the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// What the receiver does with it.
    pub kind: Kind,
    /// Who numbered it.
    pub sender: Sender,
    /// The sender's number for it in its bucket; starts at 1.
    pub sequence: u64,
    /// The node that built it (for a script: the node that called the script).
    pub node_id: &'a str,
    /// The app, by its configured id (app indexes differ between nodes).
    pub app_id: &'a str,
    /// The channel; empty for kinds addressed to a user.
    pub channel: &'a str,
    /// The user; empty for kinds that need none.
    pub user_id: &'a str,
    /// A connection that must not receive it (`socket_id` exclusion, a client event's sender).
    pub exclude: Option<SocketId>,
}

/// Why a payload is not a message (decode) or a header cannot be sent (encode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The payload ends inside this field.
    #[error("cluster message truncated in {0}")]
    Truncated(&'static str),
    /// A layout version this build does not read.
    #[error("cluster message version {0} is not {VERSION}")]
    Version(u8),
    /// A kind byte this build does not know.
    #[error("cluster message kind {0} is unknown")]
    Kind(u8),
    /// A field breaks its rule.
    #[error("cluster message field {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        reason: &'static str,
    },
}

fn invalid(field: &'static str, reason: &'static str) -> MessageError {
    MessageError::Invalid { field, reason }
}

/// Checks the rules shared by `encode` and `decode` (docs/cluster.md's layout and kind table).
fn check(header: &Header, frame_bytes: usize) -> Result<(), MessageError> {
    if header.sender.incarnation == 0 {
        return Err(invalid("incarnation", "never 0"));
    }
    if header.sequence == 0 {
        return Err(invalid("sequence", "starts at 1"));
    }
    let node = header.node_id.as_bytes();
    let node_allowed = |b: &u8| b.is_ascii_alphanumeric() || b"._-".contains(b);
    if node.is_empty() || node.len() > NODE_ID_BYTES_MAX || !node.iter().all(node_allowed) {
        return Err(invalid("node_id", "1 to 64 ASCII letters, digits, '.', '_' or '-'"));
    }
    if header.app_id.is_empty() || header.app_id.len() > APP_ID_BYTES_MAX {
        return Err(invalid("app_id", "1 to 255 bytes"));
    }
    let rules = header.kind.rules();
    match (rules.channel, header.channel.is_empty()) {
        (Rule::Forbidden, false) => return Err(invalid("channel", "must be empty for this kind")),
        (Rule::Required, true) => return Err(invalid("channel", "required for this kind")),
        // The sender validated the name; a receiver checks it again because Redis is shared.
        (_, false) if channel::validate(header.channel).is_err() => {
            return Err(invalid("channel", "not a valid channel name"))
        }
        _ => {}
    }
    match (rules.user_id, header.user_id.is_empty()) {
        (Rule::Forbidden, false) => return Err(invalid("user_id", "must be empty for this kind")),
        (Rule::Required, true) => return Err(invalid("user_id", "required for this kind")),
        (_, false) if header.user_id.len() > USER_ID_BYTES_MAX => return Err(invalid("user_id", "over 128 bytes")),
        _ => {}
    }
    match (rules.exclude, header.exclude.is_none()) {
        (Rule::Forbidden, false) => return Err(invalid("exclude", "must be none for this kind")),
        (Rule::Required, true) => return Err(invalid("exclude", "required for this kind")),
        _ => {}
    }
    match (rules.frame, frame_bytes == 0) {
        (Rule::Forbidden, false) => return Err(invalid("frame", "must be empty for this kind")),
        (Rule::Required, true) => return Err(invalid("frame", "required for this kind")),
        _ => {}
    }
    Ok(())
}

/// Appends the message (`header`, then `frame`) to `out`; on an error `out` is unchanged.
pub fn encode(header: &Header, frame: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
    check(header, frame.len())?;
    // `check` bounds every length below to one byte.
    out.reserve(encoded_len(header, frame.len()));
    out.push(VERSION);
    out.push(header.kind as u8);
    out.extend_from_slice(&header.sender.shard.to_le_bytes());
    out.extend_from_slice(&header.sender.incarnation.to_le_bytes());
    out.extend_from_slice(&header.sequence.to_le_bytes());
    for field in [header.node_id, header.app_id, header.channel, header.user_id] {
        out.push(field.len() as u8);
        out.extend_from_slice(field.as_bytes());
    }
    match header.exclude {
        None => out.push(0),
        Some(socket_id) => {
            out.push(1);
            out.extend_from_slice(&socket_id.sequence.to_le_bytes());
            out.extend_from_slice(&socket_id.random.to_le_bytes());
        }
    }
    out.extend_from_slice(frame);
    Ok(())
}

/// The size `encode` appends.
pub fn encoded_len(header: &Header, frame_bytes: usize) -> usize {
    let fields = header.node_id.len() + header.app_id.len() + header.channel.len() + header.user_id.len();
    let exclude = if header.exclude.is_some() { 13 } else { 1 };
    FIXED_BYTES + 4 + fields + exclude + frame_bytes
}

/// Reads a payload's header; returns it and the offset where the frame starts.
pub fn decode_header(payload: &[u8]) -> Result<(Header<'_>, usize), MessageError> {
    let mut cursor = Cursor { rest: payload };
    let version = cursor.byte("version")?;
    if version != VERSION {
        return Err(MessageError::Version(version));
    }
    let kind_byte = cursor.byte("kind")?;
    let kind = Kind::from_byte(kind_byte).ok_or(MessageError::Kind(kind_byte))?;
    let shard = u16::from_le_bytes(cursor.array("shard")?);
    let incarnation = u64::from_le_bytes(cursor.array("incarnation")?);
    let sequence = u64::from_le_bytes(cursor.array("sequence")?);
    let node_id = cursor.text("node_id")?;
    let app_id = cursor.text("app_id")?;
    let channel = cursor.text("channel")?;
    let user_id = cursor.text("user_id")?;
    let exclude = match cursor.byte("exclude")? {
        0 => None,
        1 => {
            let sequence = u64::from_le_bytes(cursor.array("exclude")?);
            let random = u32::from_le_bytes(cursor.array("exclude")?);
            Some(SocketId { sequence, random })
        }
        _ => return Err(invalid("exclude", "flag must be 0 or 1")),
    };
    let sender = Sender { incarnation, shard };
    let header = Header { kind, sender, sequence, node_id, app_id, channel, user_id, exclude };
    let frame_start = payload.len() - cursor.rest.len();
    check(&header, cursor.rest.len())?;
    Ok((header, frame_start))
}

/// Reads a received payload: its header, borrowed, and its frame as a slice of `payload`.
pub fn decode(payload: &Bytes) -> Result<(Header<'_>, Bytes), MessageError> {
    let (header, frame_start) = decode_header(payload)?;
    Ok((header, payload.slice(frame_start..)))
}

/// Reads fields front to back; every read names its field when the payload ends early.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MessageError> {
        if self.rest.len() < n {
            return Err(MessageError::Truncated(field));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, MessageError> {
        Ok(self.take(1, field)?[0])
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MessageError> {
        let bytes = self.take(N, field)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    /// A one-byte length, then that many bytes of UTF-8.
    fn text(&mut self, field: &'static str) -> Result<&'a str, MessageError> {
        let len = self.byte(field)? as usize;
        std::str::from_utf8(self.take(len, field)?).map_err(|_| invalid(field, "not UTF-8"))
    }
}

// Lengths written with one byte must fit one: the rule constants say so.
const _: () = assert!(NODE_ID_BYTES_MAX <= 255 && APP_ID_BYTES_MAX <= 255);
const _: () = assert!(CHANNEL_NAME_BYTES_MAX <= 255 && USER_ID_BYTES_MAX <= 255);

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: Sender = Sender { incarnation: 0x0102_0304_0506_0708, shard: 3 };

    fn header(kind: Kind) -> Header<'static> {
        Header {
            kind,
            sender: NODE,
            sequence: 42,
            node_id: "eu-1",
            app_id: "app",
            channel: "",
            user_id: "",
            exclude: None,
        }
    }

    fn publication() -> Header<'static> {
        Header { channel: "presence-room", ..header(Kind::Publication) }
    }

    /// Decodes `input`; expects the header and frame, or the error.
    fn check(input: &[u8], expected: Result<(Header, &[u8]), MessageError>) {
        let payload = Bytes::copy_from_slice(input);
        let got = decode(&payload);
        match (got, expected) {
            (Ok((header, frame)), Ok((want, want_frame))) => {
                assert_eq!(header, want, "{input:?}");
                assert_eq!(&frame[..], want_frame, "{input:?}");
                // The frame is a slice of the payload, not a copy.
                assert_eq!(frame.as_ptr(), payload[payload.len() - frame.len()..].as_ptr());
            }
            (Err(error), Err(want)) => assert_eq!(error, want, "{input:?}"),
            (got, want) => panic!("{input:?}: got {got:?}, expected {want:?}"),
        }
    }

    fn encoded(header: &Header, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(header, frame, &mut out).unwrap();
        assert_eq!(out.len(), encoded_len(header, frame.len()));
        out
    }

    /// The layout is byte for byte the one docs/cluster.md draws (little-endian).
    #[test]
    fn layout_matches_the_design() {
        let exclude = Some(SocketId { sequence: 0x1122, random: 0x33 });
        let header = Header { exclude, ..publication() };
        let mut want = vec![1, 1, 3, 0, 8, 7, 6, 5, 4, 3, 2, 1, 42, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"\x04eu-1\x03app\x0dpresence-room\x00");
        want.extend_from_slice(&[1, 0x22, 0x11, 0, 0, 0, 0, 0, 0, 0x33, 0, 0, 0]);
        want.extend_from_slice(b"FRAME");
        assert_eq!(encoded(&header, b"FRAME"), want);
        check(&want, Ok((header, b"FRAME")));
    }

    /// Every kind round-trips with the fields its row of the table allows.
    #[test]
    fn every_kind_round_trips() {
        let exclude = Some(SocketId { sequence: u64::MAX, random: u32::MAX });
        let cases = [
            Header { exclude, ..publication() },
            publication(),
            Header { exclude, ..Header { channel: "private-chat", ..header(Kind::ClientEvent) } },
            Header { channel: "presence-room", user_id: "u1", ..header(Kind::MemberAdded) },
            Header { channel: "presence-room", user_id: "u1", exclude, ..header(Kind::MemberAdded) },
            Header { channel: "presence-room", user_id: "u1", ..header(Kind::MemberRemoved) },
            Header { channel: "chat", ..header(Kind::SubscriptionCount) },
            Header { user_id: "u1", exclude, ..header(Kind::UserEvent) },
            Header { user_id: "u1", ..header(Kind::UserOnline) },
            Header { user_id: "u1", ..header(Kind::UserOffline) },
            Header {
                sender: Sender { incarnation: 7, shard: SCRIPT_SHARD },
                channel: "presence-room",
                user_id: "u",
                ..header(Kind::MemberAdded)
            },
        ];
        for header in cases {
            check(&encoded(&header, b"\x81\x02{}"), Ok((header, b"\x81\x02{}")));
        }
        let terminate = Header { user_id: "u1", ..header(Kind::TerminateUser) };
        check(&encoded(&terminate, b""), Ok((terminate, b"")));
        let longest = "n".repeat(NODE_ID_BYTES_MAX);
        let app = "a".repeat(APP_ID_BYTES_MAX);
        let channel = "c".repeat(CHANNEL_NAME_BYTES_MAX);
        let user = "u".repeat(USER_ID_BYTES_MAX);
        let widest = Header { node_id: &longest, app_id: &app, channel: &channel, ..publication() };
        check(&encoded(&widest, b"f"), Ok((widest, b"f")));
        let widest = Header { user_id: &user, ..header(Kind::UserEvent) };
        check(&encoded(&widest, b"f"), Ok((widest, b"f")));
    }

    /// A payload cut short anywhere is `Truncated` naming the field, never a panic.
    #[test]
    fn truncation_names_the_field() {
        let header = Header { exclude: Some(SocketId { sequence: 1, random: 2 }), ..publication() };
        let full = encoded(&header, b"F");
        check(&full[..0], Err(MessageError::Truncated("version")));
        check(&full[..1], Err(MessageError::Truncated("kind")));
        check(&full[..3], Err(MessageError::Truncated("shard")));
        check(&full[..11], Err(MessageError::Truncated("incarnation")));
        check(&full[..19], Err(MessageError::Truncated("sequence")));
        check(&full[..20], Err(MessageError::Truncated("node_id")));
        check(&full[..23], Err(MessageError::Truncated("node_id")));
        check(&full[..26], Err(MessageError::Truncated("app_id")));
        check(&full[..30], Err(MessageError::Truncated("channel")));
        check(&full[..43], Err(MessageError::Truncated("user_id")));
        check(&full[..44], Err(MessageError::Truncated("exclude")));
        check(&full[..50], Err(MessageError::Truncated("exclude")));
        // Without the frame, a publication breaks its kind's rule.
        check(&full[..full.len() - 1], Err(invalid("frame", "required for this kind")));
        for cut in 0..full.len() {
            assert!(decode_header(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Versions, kinds, flags and fields outside the design are refused with what is wrong.
    #[test]
    fn refuses_what_the_design_does_not_allow() {
        let good = encoded(&publication(), b"F");
        let with = |offset: usize, byte: u8| {
            let mut bad = good.clone();
            bad[offset] = byte;
            bad
        };
        check(&with(0, 2), Err(MessageError::Version(2)));
        check(&with(1, 0), Err(MessageError::Kind(0)));
        check(&with(1, 10), Err(MessageError::Kind(10)));
        // Shard 0xFFFF with a node's incarnation, and incarnation 0 with a real shard.
        let mut no_incarnation = good.clone();
        no_incarnation[4..12].fill(0);
        check(&no_incarnation, Err(invalid("incarnation", "never 0")));
        check(&with(12, 0), Err(invalid("sequence", "starts at 1")));
        check(&with(21, b'{'), Err(invalid("node_id", "1 to 64 ASCII letters, digits, '.', '_' or '-'")));
        check(&with(26, 0xFF), Err(invalid("app_id", "not UTF-8")));
        check(&with(30, b' '), Err(invalid("channel", "not a valid channel name")));
        let exclude_flag = good.len() - 2;
        check(&with(exclude_flag, 2), Err(invalid("exclude", "flag must be 0 or 1")));

        let cases: [(Header, &[u8], MessageError); 9] = [
            (Header { user_id: "u", ..publication() }, b"F", invalid("user_id", "must be empty for this kind")),
            (header(Kind::Publication), b"F", invalid("channel", "required for this kind")),
            (Header { channel: "c", ..header(Kind::ClientEvent) }, b"F", invalid("exclude", "required for this kind")),
            (Header { channel: "c", ..header(Kind::MemberAdded) }, b"F", invalid("user_id", "required for this kind")),
            (
                Header { channel: "c", user_id: "u", ..header(Kind::TerminateUser) },
                b"",
                invalid("channel", "must be empty for this kind"),
            ),
            (
                Header { user_id: "u", ..header(Kind::TerminateUser) },
                b"F",
                invalid("frame", "must be empty for this kind"),
            ),
            (
                Header {
                    channel: "c",
                    exclude: Some(SocketId { sequence: 1, random: 1 }),
                    ..header(Kind::SubscriptionCount)
                },
                b"F",
                invalid("exclude", "must be none for this kind"),
            ),
            (
                Header { node_id: "", ..publication() },
                b"F",
                invalid("node_id", "1 to 64 ASCII letters, digits, '.', '_' or '-'"),
            ),
            (Header { app_id: "", ..publication() }, b"F", invalid("app_id", "1 to 255 bytes")),
        ];
        for (header, frame, error) in cases {
            let mut out = b"kept".to_vec();
            assert_eq!(encode(&header, frame, &mut out), Err(error), "{header:?}");
            assert_eq!(out, b"kept", "a refused encode leaves the buffer as it was");
        }
        let long_user = "u".repeat(USER_ID_BYTES_MAX + 1);
        let too_long = Header { user_id: &long_user, ..header(Kind::UserOnline) };
        assert_eq!(encode(&too_long, b"F", &mut Vec::new()), Err(invalid("user_id", "over 128 bytes")));
        let long_channel = "c".repeat(CHANNEL_NAME_BYTES_MAX + 1);
        let too_long = Header { channel: &long_channel, ..publication() };
        assert_eq!(encode(&too_long, b"F", &mut Vec::new()), Err(invalid("channel", "not a valid channel name")));
    }
}
