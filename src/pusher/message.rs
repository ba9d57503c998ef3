//! Pusher protocol v7 messages: parsing what clients send, encoding what the server sends.
//!
//! Owns the JSON shapes and the double-encoding rule (reference §1.2): server messages carry
//! `data` as a JSON *string*, except `pusher:error`, whose `data` is an object. Client messages
//! may carry `data` as an object or as a string holding JSON; both are accepted. Knows nothing
//! of sockets or subscribers: encoders return complete WebSocket frames, ready to share.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::ws::frame;

/// A connection's id: two decimal integers, `^\d+\.\d+$`, as every server SDK requires.
/// The first part is unique within the process (a per-shard counter interleaved by shard);
/// the second is random, so ids are not guessable across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId {
    /// Unique part.
    pub sequence: u64,
    /// Random part.
    pub random: u32,
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.sequence, self.random)
    }
}

impl SocketId {
    /// Parses `123.456`; `None` for anything else (the SDKs' own rule).
    pub fn parse(text: &str) -> Option<SocketId> {
        let (a, b) = text.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return None;
        }
        Some(SocketId { sequence: a.parse().ok()?, random: b.parse().ok()? })
    }
}

/// A message from a client, borrowed from the received text.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    /// `pusher:ping`
    Ping,
    /// `pusher:pong`
    Pong,
    /// `pusher:subscribe`
    Subscribe(Subscribe<'a>),
    /// `pusher:unsubscribe`
    Unsubscribe {
        /// The channel.
        channel: Cow<'a, str>,
    },
    /// `client-*` on a channel.
    ClientEvent {
        /// Event name.
        event: Cow<'a, str>,
        /// Channel.
        channel: Cow<'a, str>,
        /// Data exactly as received.
        data: Option<&'a RawValue>,
    },
    /// `pusher:signin`
    Signin(Signin),
    /// Any other event (answered with a non-fatal error).
    Unknown {
        /// Event name.
        event: Cow<'a, str>,
    },
}

/// The data of `pusher:signin` (rare: owned, not borrowed).
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct Signin {
    /// `key:signature` over `socket_id::user::user_data`.
    pub auth: String,
    /// The user object as a JSON string, exactly as signed.
    pub user_data: String,
}

/// The data of `pusher:subscribe`.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct Subscribe<'a> {
    /// Channel name.
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    /// `key:signature` for private and presence channels (pusher-js sends "" otherwise).
    #[serde(borrow, default)]
    pub auth: Option<Cow<'a, str>>,
    /// Presence member data, the exact string that was signed.
    #[serde(borrow, default)]
    pub channel_data: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Why a client message could not be understood (answered with `pusher:error`, not a close).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError(pub String);

/// Parses one client text message.
pub fn parse_client_message(text: &str) -> Result<ClientMessage<'_>, MessageError> {
    let envelope: Envelope =
        serde_json::from_str(text).map_err(|e| MessageError(format!("invalid JSON message: {e}")))?;
    let message = match envelope.event.as_ref() {
        "pusher:ping" => ClientMessage::Ping,
        "pusher:pong" => ClientMessage::Pong,
        "pusher:subscribe" => ClientMessage::Subscribe(data_object(envelope.data, "pusher:subscribe")?),
        "pusher:unsubscribe" => {
            let Subscribe { channel, .. } = data_object(envelope.data, "pusher:unsubscribe")?;
            ClientMessage::Unsubscribe { channel }
        }
        event if event.starts_with("client-") => {
            let channel = envelope.channel.ok_or_else(|| MessageError("client event without a channel".into()))?;
            ClientMessage::ClientEvent { event: envelope.event, channel, data: envelope.data }
        }
        "pusher:signin" => {
            let raw = envelope.data.ok_or_else(|| MessageError("pusher:signin without data".into()))?;
            let inner: Cow<str> = if raw.get().starts_with('"') {
                Cow::Owned(serde_json::from_str(raw.get()).map_err(|e| MessageError(e.to_string()))?)
            } else {
                Cow::Borrowed(raw.get())
            };
            let signin =
                serde_json::from_str(&inner).map_err(|e| MessageError(format!("invalid pusher:signin data: {e}")))?;
            ClientMessage::Signin(signin)
        }
        _ => ClientMessage::Unknown { event: envelope.event },
    };
    Ok(message)
}

/// Decodes `data` that is either an object or a string holding an object (reference §1.2).
fn data_object<'a>(data: Option<&'a RawValue>, event: &str) -> Result<Subscribe<'a>, MessageError> {
    let raw = data.ok_or_else(|| MessageError(format!("{event} without data")))?;
    let parsed = if raw.get().starts_with('"') {
        // A string holding JSON: it must be unescaped, so it cannot borrow from the input.
        let inner: String = serde_json::from_str(raw.get()).map_err(|e| MessageError(e.to_string()))?;
        let owned: Subscribe<'_> =
            serde_json::from_str(&inner).map_err(|e| MessageError(format!("invalid {event} data: {e}")))?;
        Subscribe {
            channel: Cow::Owned(owned.channel.into_owned()),
            auth: owned.auth.map(|a| Cow::Owned(a.into_owned())),
            channel_data: owned.channel_data.map(|c| Cow::Owned(c.into_owned())),
        }
    } else {
        serde_json::from_str(raw.get()).map_err(|e| MessageError(format!("invalid {event} data: {e}")))?
    };
    Ok(parsed)
}

/// Most user ids one connection may watch.
pub const WATCHLIST_MAX: usize = 100;

/// Longest event name a publish may carry (the server SDKs' limit).
pub const EVENT_NAME_BYTES_MAX: usize = 200;

/// The user id of signed `user_data` (a non-empty string `id` that can name its
/// `#server-to-user-` channel) and its optional `watchlist` of user ids.
pub fn parse_user(user_data: &str) -> Result<(Box<str>, Vec<Box<str>>), String> {
    let value: serde_json::Value = serde_json::from_str(user_data).map_err(|e| format!("invalid user_data: {e}"))?;
    let Some(id) = value.get("id").and_then(|id| id.as_str()) else {
        return Err("user_data must have a string id".into());
    };
    if id.len() > USER_ID_BYTES_MAX
        || crate::pusher::channel::validate(&format!("{}{id}", crate::pusher::channel::SERVER_TO_USER_PREFIX)).is_err()
    {
        return Err(format!("user_data.id must be 1 to {USER_ID_BYTES_MAX} characters of A-Z a-z 0-9 _ - = @ , . ;"));
    }
    let watchlist = match value.get("watchlist") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(ids)) if ids.len() <= WATCHLIST_MAX => {
            let ids: Option<Vec<Box<str>>> = ids.iter().map(|id| id.as_str().map(Box::from)).collect();
            let mut ids = ids.ok_or("user_data.watchlist must hold user id strings")?;
            ids.sort();
            ids.dedup();
            ids
        }
        Some(_) => return Err(format!("user_data.watchlist must be an array of at most {WATCHLIST_MAX} user ids")),
    };
    Ok((id.into(), watchlist))
}

/// Longest presence `user_id` accepted.
pub const USER_ID_BYTES_MAX: usize = 128;

/// `channel_data` of a presence subscription.
#[derive(Deserialize)]
struct ChannelData<'a> {
    user_id: serde_json::Value,
    #[serde(borrow, default)]
    user_info: Option<&'a RawValue>,
}

/// Parses `channel_data` into (user id as a string, raw user_info JSON).
pub fn parse_member(channel_data: &str, user_info_bytes_max: usize) -> Result<(Box<str>, Box<str>), String> {
    let data: ChannelData = serde_json::from_str(channel_data).map_err(|e| format!("invalid channel_data: {e}"))?;
    // pusher-js keys members by user_id, which may arrive as a number; compare as strings.
    let user_id = match &data.user_id {
        serde_json::Value::String(id) => id.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err("channel_data.user_id must be a string or a number".into()),
    };
    if user_id.is_empty() || user_id.len() > USER_ID_BYTES_MAX {
        return Err(format!("channel_data.user_id must be 1 to {USER_ID_BYTES_MAX} characters"));
    }
    let user_info = data.user_info.map(RawValue::get).unwrap_or("null");
    if user_info.len() > user_info_bytes_max {
        return Err(format!("channel_data.user_info is over {user_info_bytes_max} bytes"));
    }
    Ok((user_id.into(), user_info.into()))
}

/// Appends `text` as a JSON string literal.
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing a string to a Vec cannot fail");
}

/// `pusher:connection_established`, with `data` double-encoded.
pub fn connection_established(socket_id: SocketId, activity_timeout_s: u32) -> Bytes {
    let data = format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout_s}}}");
    event("pusher:connection_established", None, Some(&data))
}

/// A server message `{"event":..,"channel":..,"data":..}` with `data` (JSON text) sent as a
/// string, as every server message but `pusher:error` is (reference §1.2). `channel` and
/// `data` are left out when `None`.
fn event(name: &str, channel: Option<&str>, data: Option<&str>) -> Bytes {
    let mut out = Vec::with_capacity(48 + name.len() + channel.map_or(0, str::len) + data.map_or(0, |d| d.len() * 2));
    out.extend_from_slice(b"{\"event\":");
    push_json_string(&mut out, name);
    if let Some(channel) = channel {
        out.extend_from_slice(b",\"channel\":");
        push_json_string(&mut out, channel);
    }
    if let Some(data) = data {
        out.extend_from_slice(b",\"data\":");
        push_json_string(&mut out, data);
    }
    out.push(b'}');
    frame::encode_text(&out)
}

/// `pusher:error` with `data` as an object, as hosted Pusher sends it. A `None` code is sent
/// as `null`, as Pusher does for non-fatal errors such as a bad signature.
pub fn error(code: Option<u16>, message: &str, channel: Option<&str>) -> Bytes {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"{\"event\":\"pusher:error\",");
    if let Some(channel) = channel {
        out.extend_from_slice(b"\"channel\":");
        push_json_string(&mut out, channel);
        out.push(b',');
    }
    out.extend_from_slice(b"\"data\":{\"code\":");
    match code {
        Some(code) => out.extend_from_slice(code.to_string().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"message\":");
    push_json_string(&mut out, message);
    out.extend_from_slice(b"}}");
    frame::encode_text(&out)
}

/// `pusher_internal:subscription_succeeded` for a non-presence channel (`data` = `"{}"`).
pub fn subscription_succeeded(channel: &str) -> Bytes {
    event("pusher_internal:subscription_succeeded", Some(channel), Some("{}"))
}

/// `pusher_internal:subscription_succeeded` for a presence channel; `presence` is the JSON of
/// `{"presence":{...}}`, sent double-encoded.
pub fn presence_subscription_succeeded(channel: &str, presence: &str) -> Bytes {
    event("pusher_internal:subscription_succeeded", Some(channel), Some(presence))
}

/// `pusher_internal:member_added` with `{"user_id":..,"user_info":..}` double-encoded.
pub fn member_added(channel: &str, user_id: &str, user_info: &str) -> Bytes {
    let data = format!("{{\"user_id\":{},\"user_info\":{user_info}}}", json_string(user_id));
    event("pusher_internal:member_added", Some(channel), Some(&data))
}

/// `pusher_internal:member_removed` with `{"user_id":..}` double-encoded.
pub fn member_removed(channel: &str, user_id: &str) -> Bytes {
    let data = format!("{{\"user_id\":{}}}", json_string(user_id));
    event("pusher_internal:member_removed", Some(channel), Some(&data))
}

/// `pusher_internal:watchlist_events` with one event (`online` or `offline`), as pusher-js
/// expects: `{"events":[{"name":"online","user_ids":[...]}]}` double-encoded.
pub fn watchlist_event(name: &str, user_ids: &[&str]) -> Bytes {
    let ids: Vec<String> = user_ids.iter().map(|id| json_string(id)).collect();
    let data = format!("{{\"events\":[{{\"name\":{},\"user_ids\":[{}]}}]}}", json_string(name), ids.join(","));
    event("pusher_internal:watchlist_events", None, Some(&data))
}

/// `pusher_internal:subscription_count` with `{"subscription_count":N}` double-encoded.
pub fn subscription_count(channel: &str, count: u64) -> Bytes {
    let data = format!("{{\"subscription_count\":{count}}}");
    event("pusher_internal:subscription_count", Some(channel), Some(&data))
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

/// `pusher:signin_success` with `{"user_data":"<as signed>"}` double-encoded.
pub fn signin_success(user_data: &str) -> Bytes {
    event("pusher:signin_success", None, Some(&format!("{{\"user_data\":{}}}", json_string(user_data))))
}

/// `pusher:cache_miss` on a cache channel with nothing cached (no data, as Pusher sends it).
pub fn cache_miss(channel: &str) -> Bytes {
    event("pusher:cache_miss", Some(channel), None)
}

/// `pusher:pong`
pub fn pong() -> Bytes {
    frame::encode_text(br#"{"event":"pusher:pong","data":"{}"}"#)
}

/// `pusher:ping`, sent by the server to a client that has been silent for activity_timeout.
pub fn ping() -> Bytes {
    frame::encode_text(br#"{"event":"pusher:ping","data":"{}"}"#)
}

/// A channel event. `data` is the JSON value from the publish request: a string literal is
/// passed through byte for byte (never re-encoded); anything else is sent as its JSON text
/// inside a string, so clients always receive `data` as a string.
pub fn channel_event(event: &str, channel: &str, data: &RawValue) -> Bytes {
    channel_event_from(event, channel, data, None)
}

/// A channel event with the sender's `user_id` at the top level, as a client event on a
/// presence channel is relayed (reference §1.2).
pub fn channel_event_from(event: &str, channel: &str, data: &RawValue, user_id: Option<&str>) -> Bytes {
    let raw = data.get();
    let mut out = Vec::with_capacity(48 + event.len() + channel.len() + raw.len());
    out.extend_from_slice(b"{\"event\":");
    push_json_string(&mut out, event);
    out.extend_from_slice(b",\"channel\":");
    push_json_string(&mut out, channel);
    out.extend_from_slice(b",\"data\":");
    if raw.starts_with('"') {
        out.extend_from_slice(raw.as_bytes());
    } else {
        push_json_string(&mut out, raw);
    }
    if let Some(user_id) = user_id {
        out.extend_from_slice(b",\"user_id\":");
        push_json_string(&mut out, user_id);
    }
    out.push(b'}');
    frame::encode_text(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> &str {
        // Server frames here are short: a 2-byte header, or 4 with a 16-bit length.
        let offset = if frame[1] == 126 { 4 } else { 2 };
        std::str::from_utf8(&frame[offset..]).unwrap()
    }

    /// socket_id round-trips and rejects what the SDKs reject.
    #[test]
    fn socket_ids() {
        let id = SocketId { sequence: 12, random: 345 };
        assert_eq!(id.to_string(), "12.345");
        assert_eq!(SocketId::parse("12.345"), Some(id));
        for bad in ["12", "a.1", "1.", ".1", "1.2.3", "1.-2", " 1.2", "99999999999999999999999.1"] {
            assert_eq!(SocketId::parse(bad), None, "{bad}");
        }
    }

    /// The exact bytes of each server message.
    #[test]
    fn server_messages() {
        let id = SocketId { sequence: 1, random: 2 };
        assert_eq!(
            payload(&connection_established(id, 120)),
            r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#
        );
        assert_eq!(
            payload(&error(Some(4001), "no app", None)),
            r#"{"event":"pusher:error","data":{"code":4001,"message":"no app"}}"#
        );
        assert_eq!(
            payload(&error(None, "bad \"name\"", Some("c"))),
            r#"{"event":"pusher:error","channel":"c","data":{"code":null,"message":"bad \"name\""}}"#
        );
        assert_eq!(
            payload(&subscription_succeeded("my-channel")),
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"my-channel","data":"{}"}"#
        );
        assert_eq!(payload(&pong()), r#"{"event":"pusher:pong","data":"{}"}"#);
        assert_eq!(
            payload(&watchlist_event("online", &["1", "2"])),
            r#"{"event":"pusher_internal:watchlist_events","data":"{\"events\":[{\"name\":\"online\",\"user_ids\":[\"1\",\"2\"]}]}"}"#
        );
        assert_eq!(
            payload(&signin_success(r#"{"id":"1"}"#)),
            r#"{"event":"pusher:signin_success","data":"{\"user_data\":\"{\\\"id\\\":\\\"1\\\"}\"}"}"#
        );
        match parse_client_message(r#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{\"id\":\"1\"}"}}"#) {
            Ok(ClientMessage::Signin(s)) => {
                assert_eq!((s.auth.as_str(), s.user_data.as_str()), ("k:s", r#"{"id":"1"}"#))
            }
            other => panic!("{other:?}"),
        }
    }

    /// String data passes through verbatim; other JSON is wrapped in a string once.
    #[test]
    fn channel_event_double_encoding() {
        let string: Box<RawValue> = serde_json::from_str(r#""{\"some\":\"data\"}""#).unwrap();
        assert_eq!(
            payload(&channel_event("my-event", "c", &string)),
            r#"{"event":"my-event","channel":"c","data":"{\"some\":\"data\"}"}"#
        );
        assert_eq!(
            payload(&channel_event_from("client-x", "presence-c", &string, Some("7"))),
            r#"{"event":"client-x","channel":"presence-c","data":"{\"some\":\"data\"}","user_id":"7"}"#
        );
        assert_eq!(
            payload(&member_added("presence-c", "7", r#"{"name":"a"}"#)),
            r#"{"event":"pusher_internal:member_added","channel":"presence-c","data":"{\"user_id\":\"7\",\"user_info\":{\"name\":\"a\"}}"}"#
        );
        assert_eq!(
            payload(&member_removed("presence-c", "7")),
            r#"{"event":"pusher_internal:member_removed","channel":"presence-c","data":"{\"user_id\":\"7\"}"}"#
        );
        let object: Box<RawValue> = serde_json::from_str(r#"{"a":1}"#).unwrap();
        assert_eq!(payload(&channel_event("e", "c", &object)), r#"{"event":"e","channel":"c","data":"{\"a\":1}"}"#);
    }

    /// What clients send, in both data encodings.
    #[test]
    fn client_messages() {
        assert!(matches!(parse_client_message(r#"{"event":"pusher:ping","data":{}}"#), Ok(ClientMessage::Ping)));
        let subscribe = Subscribe { channel: "c".into(), auth: Some("".into()), channel_data: None };
        match parse_client_message(r#"{"event":"pusher:subscribe","data":{"auth":"","channel":"c"}}"#) {
            Ok(ClientMessage::Subscribe(s)) => assert_eq!(s, subscribe),
            other => panic!("{other:?}"),
        }
        match parse_client_message(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"c\"}"}"#) {
            Ok(ClientMessage::Subscribe(s)) => {
                assert_eq!(s, Subscribe { channel: "c".into(), auth: None, channel_data: None })
            }
            other => panic!("{other:?}"),
        }
        match parse_client_message(r#"{"event":"pusher:unsubscribe","data":{"channel":"c"}}"#) {
            Ok(ClientMessage::Unsubscribe { channel }) => assert_eq!(channel, "c"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_client_message(r#"{"event":"x"}"#), Ok(ClientMessage::Unknown { .. })));
        assert!(matches!(
            parse_client_message(r#"{"event":"client-x","channel":"private-c","data":{"a":1}}"#),
            Ok(ClientMessage::ClientEvent { .. })
        ));
        for bad in [
            "",
            "{",
            "[]",
            r#"{"data":{}}"#,
            r#"{"event":"pusher:subscribe"}"#,
            r#"{"event":"pusher:subscribe","data":{}}"#,
            r#"{"event":"pusher:subscribe","data":"nope"}"#,
            r#"{"event":"client-x"}"#,
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad}");
        }
    }
}
