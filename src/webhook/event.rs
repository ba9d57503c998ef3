//! What webhooks carry: Pusher lifecycle events, Standard Webhooks payloads, and the filters
//! that pick which endpoint gets what. Pure functions over strings; bodies are built once per
//! delivery and sent byte for byte on every attempt.

use bytes::Bytes;
use serde_json::json;
use serde_json::value::RawValue;

/// `*` matches any run of characters, `?` exactly one; everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((star_p, star_t)) = star {
            pi = star_p + 1;
            ti = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether any pattern matches; `None` (no filter) matches everything.
pub fn any_match(patterns: Option<&[String]>, text: &str) -> bool {
    patterns.is_none_or(|list| list.iter().any(|p| glob_match(p, text)))
}

/// One Pusher lifecycle event (an element of the webhook's `events` array), already JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// Its `name`, for the endpoint's `events` filter.
    pub name: &'static str,
    /// The JSON object.
    pub json: Box<str>,
}

impl LifecycleEvent {
    fn new(name: &'static str, value: serde_json::Value) -> LifecycleEvent {
        LifecycleEvent { name, json: value.to_string().into() }
    }

    /// `channel_occupied` / `channel_vacated`.
    pub fn occupancy(channel: &str, occupied: bool) -> LifecycleEvent {
        let name = if occupied { "channel_occupied" } else { "channel_vacated" };
        LifecycleEvent::new(name, json!({"name": name, "channel": channel}))
    }

    /// `member_added` / `member_removed`.
    pub fn member(channel: &str, user_id: &str, added: bool) -> LifecycleEvent {
        let name = if added { "member_added" } else { "member_removed" };
        LifecycleEvent::new(name, json!({"name": name, "channel": channel, "user_id": user_id}))
    }

    /// `client_event` (with `user_id` on presence channels).
    pub fn client_event(channel: &str, event: &str, data: &str, socket_id: &str, user_id: Option<&str>) -> Self {
        let mut value =
            json!({"name": "client_event", "channel": channel, "event": event, "data": data, "socket_id": socket_id});
        if let Some(user_id) = user_id {
            value["user_id"] = json!(user_id);
        }
        LifecycleEvent::new("client_event", value)
    }

    /// `cache_miss`.
    pub fn cache_miss(channel: &str) -> LifecycleEvent {
        LifecycleEvent::new("cache_miss", json!({"name": "cache_miss", "channel": channel}))
    }

    /// `subscription_count`.
    pub fn subscription_count(channel: &str, count: u64) -> LifecycleEvent {
        LifecycleEvent::new(
            "subscription_count",
            json!({"name": "subscription_count", "channel": channel, "subscription_count": count}),
        )
    }
}

/// A Pusher webhook body: `{"time_ms": …, "events": [ … ]}` (docs/webhooks.md, "Bodies";
/// <https://pusher.com/docs/channels/server_api/webhooks/>), from the events' JSON objects.
pub fn pusher_body<'a>(time_ms: u64, events: impl Iterator<Item = &'a str>) -> Bytes {
    let mut body = String::with_capacity(256);
    body.push_str("{\"time_ms\":");
    body.push_str(&time_ms.to_string());
    body.push_str(",\"events\":[");
    for (i, event) in events.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(event);
    }
    body.push_str("]}");
    Bytes::from(body)
}

/// A batch for a Standard Webhooks endpoint with `batch_events_max` > 1:
/// `{"type": "ringwire.batch", "timestamp", "data": [<event payloads as standard_body makes them>]}`
/// — one payload in the spec's shape whose data is the list.
pub fn standard_batch_body<'a>(time_ms: u64, events: impl Iterator<Item = &'a str>) -> Bytes {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms);
    let mut body = String::with_capacity(256);
    body.push_str("{\"type\":\"ringwire.batch\",\"timestamp\":\"");
    body.push_str(&humantime::format_rfc3339_millis(time).to_string());
    body.push_str("\",\"data\":[");
    for (i, event) in events.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(event);
    }
    body.push_str("]}");
    Bytes::from(body)
}

/// A Standard Webhooks payload for a published event:
/// `{"type", "timestamp" (ISO 8601), "channel", "data"}`. `data` is embedded as JSON when the
/// event's data string is a JSON object or array (the usual case), else as a string.
pub fn standard_body(event: &str, channel: &str, data: &str, time_ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms);
    let timestamp = humantime::format_rfc3339_millis(time).to_string();
    let trimmed = data.trim_start();
    let data_json: Box<RawValue> = match serde_json::from_str::<Box<RawValue>>(data) {
        Ok(raw) if trimmed.starts_with('{') || trimmed.starts_with('[') => raw,
        _ => RawValue::from_string(serde_json::to_string(data).expect("strings serialize")).expect("valid JSON"),
    };
    json!({"type": event, "timestamp": timestamp, "channel": channel, "data": data_json}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Globs: `*` any run, `?` one character, anchored at both ends.
    #[test]
    fn globs() {
        for (pattern, text, expected) in [
            ("orders-*", "orders-1", true),
            ("orders-*", "orders-", true),
            ("orders-*", "xorders-1", false),
            ("order.*", "order.created", true),
            ("*", "", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*-*-end", "a-b-c-end", true),
            ("private-*", "presence-x", false),
            ("exact", "exact", true),
            ("exact", "exact2", false),
        ] {
            assert_eq!(glob_match(pattern, text), expected, "{pattern} ~ {text}");
        }
        assert!(any_match(None, "x"));
        assert!(!any_match(Some(&["a*".into()]), "b"));
    }

    /// Bodies have the documented shapes; JSON data is embedded, other data is a string.
    #[test]
    fn bodies() {
        let events = [LifecycleEvent::occupancy("c", true), LifecycleEvent::member("presence-c", "u1", false)];
        assert_eq!(
            &pusher_body(1700000000000, events.iter().map(|e| &*e.json))[..],
            br#"{"time_ms":1700000000000,"events":[{"channel":"c","name":"channel_occupied"},{"channel":"presence-c","name":"member_removed","user_id":"u1"}]}"#
        );
        let body = standard_body("order.created", "orders-1", r#"{"id":7}"#, 1700000000123);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            value,
            json!({"type": "order.created", "timestamp": "2023-11-14T22:13:20.123Z", "channel": "orders-1", "data": {"id": 7}})
        );
        let body = standard_body("e", "c", "plain 7", 0);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["data"], json!("plain 7"));
        let value: serde_json::Value = serde_json::from_str(&standard_body("e", "c", "7", 0)).unwrap();
        assert_eq!(value["data"], json!("7"));
        let one = standard_body("e", "c", "{}", 0);
        let batch = standard_batch_body(0, [one.as_str(); 2].into_iter());
        let value: serde_json::Value = serde_json::from_slice(&batch).unwrap();
        assert_eq!(value["type"], "ringwire.batch");
        assert_eq!(value["data"].as_array().unwrap().len(), 2);
        assert_eq!(value["data"][1]["channel"], "c");
    }
}
