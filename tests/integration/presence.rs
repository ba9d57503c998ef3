//! Presence channels: member lists, and member events exactly once across shards.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// The shard a connection is on, from its socket_id (`counter × shards + shard + 1`).
fn shard_of(socket_id: &str) -> u64 {
    (socket_id.split('.').next().unwrap().parse::<u64>().unwrap() - 1) % 2
}

/// A connection on the given shard.
fn connect_on(server: &TestServer, shard: u64) -> (Ws, String) {
    for _ in 0..200 {
        let (ws, id) = connect(server.addr);
        if shard_of(&id) == shard {
            return (ws, id);
        }
    }
    panic!("no connection landed on shard {shard}");
}

fn sign(to_sign: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    format!(
        "{KEY}:{}",
        hex::encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref())
    )
}

/// Subscribes to a presence channel as `user_id` and returns the decoded subscription data.
fn join(ws: &mut Ws, socket_id: &str, channel: &str, user_id: &str) -> Value {
    let channel_data =
        json!({"user_id": user_id, "user_info": {"name": format!("user {user_id}")}}).to_string();
    let auth = sign(&format!("{socket_id}:{channel}:{channel_data}"));
    send_json(
        ws,
        json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}),
    );
    let reply = recv_json(ws);
    assert_eq!(
        reply["event"], "pusher_internal:subscription_succeeded",
        "{reply}"
    );
    serde_json::from_str(reply["data"].as_str().expect("data is a string")).unwrap()
}

/// Next message, or None if nothing arrives within `ms`.
fn try_recv(ws: &mut Ws, ms: u64) -> Option<Value> {
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(ms)))
        .unwrap();
    let result = match ws.read() {
        Ok(tungstenite::Message::Text(text)) => Some(serde_json::from_str(&text).unwrap()),
        Ok(other) => panic!("{other:?}"),
        Err(tungstenite::Error::Io(e))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("{e}"),
    };
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    result
}

/// subscription_succeeded lists every member, the joiner included, with hash and count.
#[test]
fn member_list() {
    let server = TestServer::start(|_| {});
    let (mut a, a_id) = connect(server.addr);
    let data = join(&mut a, &a_id, "presence-room", "1");
    assert_eq!(
        data,
        json!({"presence": {"ids": ["1"], "hash": {"1": {"name": "user 1"}}, "count": 1}})
    );
    let (mut b, b_id) = connect(server.addr);
    let data = join(&mut b, &b_id, "presence-room", "2");
    assert_eq!(data["presence"]["count"], 2);
    assert_eq!(data["presence"]["ids"], json!(["1", "2"]));
    let added = recv_json(&mut a);
    assert_eq!(added["event"], "pusher_internal:member_added");
    assert_eq!(added["channel"], "presence-room");
    assert_eq!(
        serde_json::from_str::<Value>(added["data"].as_str().unwrap()).unwrap(),
        json!({"user_id": "2", "user_info": {"name": "user 2"}})
    );
}

/// One user with connections on both shards: one member_added, and one member_removed only
/// when the last connection goes (the first clean, the last abrupt).
#[test]
fn one_user_on_two_shards() {
    let server = TestServer::start(|_| {});
    let (mut observer, observer_id) = connect_on(&server, 0);
    join(&mut observer, &observer_id, "presence-x", "watcher");
    let (mut tab0, tab0_id) = connect_on(&server, 0);
    let (mut tab1, tab1_id) = connect_on(&server, 1);
    join(&mut tab0, &tab0_id, "presence-x", "alice");
    let data = join(&mut tab1, &tab1_id, "presence-x", "alice");
    assert_eq!(data["presence"]["count"], 2, "alice counted once: {data}");
    assert_eq!(
        recv_json(&mut observer)["event"],
        "pusher_internal:member_added"
    );
    assert!(
        try_recv(&mut observer, 300).is_none(),
        "second tab must be silent"
    );

    send_json(
        &mut tab0,
        json!({"event": "pusher:unsubscribe", "data": {"channel": "presence-x"}}),
    );
    assert!(
        try_recv(&mut observer, 300).is_none(),
        "alice still has a connection"
    );
    drop(tab1); // abrupt: the TCP connection just goes away
    let removed = recv_json(&mut observer);
    assert_eq!(removed["event"], "pusher_internal:member_removed");
    assert_eq!(removed["data"], r#"{"user_id":"alice"}"#);
    assert!(
        try_recv(&mut observer, 300).is_none(),
        "exactly one member_removed"
    );
}

/// The member limit refuses a new user with pusher:error; the connection stays usable.
#[test]
fn member_limit() {
    let server = TestServer::start(|c| c.apps[0].presence_members_max = 1);
    let (mut a, a_id) = connect(server.addr);
    join(&mut a, &a_id, "presence-small", "1");
    let (mut b, b_id) = connect(server.addr);
    let channel_data = r#"{"user_id":"2"}"#;
    let auth = sign(&format!("{b_id}:presence-small:{channel_data}"));
    send_json(
        &mut b,
        json!({"event": "pusher:subscribe", "data": {"channel": "presence-small", "auth": auth, "channel_data": channel_data}}),
    );
    let error = recv_json(&mut b);
    assert_eq!(error["event"], "pusher:error");
    assert!(
        error["data"]["message"].as_str().unwrap().contains("full"),
        "{error}"
    );
    subscribe(&mut b, "public-after");
}

/// Bad signatures, re-serialized channel_data and oversized user_info are refused.
#[test]
fn presence_refusals() {
    let server = TestServer::start(|c| c.apps[0].presence_user_info_bytes_max = 20);
    let (mut ws, id) = connect(server.addr);
    let channel_data = r#"{"user_id":"1","user_info":{}}"#;
    let signed_other = sign(&format!(
        "{id}:presence-r:{}",
        r#"{"user_info":{},"user_id":"1"}"#
    ));
    let too_big = r#"{"user_id":"1","user_info":{"name":"aaaaaaaaaaaaaaaaaaaaaaaa"}}"#;
    for (data, auth) in [
        (channel_data.to_string(), signed_other),
        (
            too_big.to_string(),
            sign(&format!("{id}:presence-r:{too_big}")),
        ),
        (String::new(), sign(&format!("{id}:presence-r:"))),
    ] {
        send_json(
            &mut ws,
            json!({"event": "pusher:subscribe", "data": {"channel": "presence-r", "auth": auth, "channel_data": data}}),
        );
        assert_eq!(recv_json(&mut ws)["event"], "pusher:error", "{data}");
    }
}

/// Client events on presence channels carry the sender's user_id.
#[test]
fn presence_client_event_user_id() {
    let server = TestServer::start(|_| {});
    let (mut a, a_id) = connect(server.addr);
    let (mut b, b_id) = connect(server.addr);
    join(&mut a, &a_id, "presence-chat", "7");
    join(&mut b, &b_id, "presence-chat", "8");
    assert_eq!(recv_json(&mut a)["event"], "pusher_internal:member_added");
    send_json(
        &mut b,
        json!({"event": "client-wave", "channel": "presence-chat", "data": {"hi": 1}}),
    );
    assert_eq!(
        recv_text(&mut a),
        r#"{"event":"client-wave","channel":"presence-chat","data":"{\"hi\":1}","user_id":"8"}"#
    );
}

/// The HTTP API reports users and user_count from the home shard.
#[test]
fn users_api() {
    let server = TestServer::start(|_| {});
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u2", "u3"] {
        let (mut ws, id) = connect(server.addr);
        join(&mut ws, &id, "presence-api", user);
        clients.push(ws);
    }
    let path = format!("/apps/{APP_ID}/channels/presence-api/users");
    let (status, body) = http(
        server.addr,
        "GET",
        &signed_path("GET", &path, b"", &[]),
        b"",
    );
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"users":[{"id":"u1"},{"id":"u2"},{"id":"u3"}]}"#)
    );
    let path = format!("/apps/{APP_ID}/channels/presence-api");
    let target = signed_path(
        "GET",
        &path,
        b"",
        &[("info", "user_count,subscription_count")],
    );
    assert_eq!(
        http(server.addr, "GET", &target, b""),
        (
            200,
            r#"{"occupied":true,"subscription_count":4,"user_count":3}"#.into()
        )
    );
    let path = format!("/apps/{APP_ID}/channels");
    let target = signed_path(
        "GET",
        &path,
        b"",
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
    );
    assert_eq!(
        http(server.addr, "GET", &target, b""),
        (
            200,
            r#"{"channels":{"presence-api":{"user_count":3}}}"#.into()
        )
    );
    let path = format!("/apps/{APP_ID}/channels/public/users");
    assert_eq!(
        http(
            server.addr,
            "GET",
            &signed_path("GET", &path, b"", &[]),
            b""
        )
        .0,
        400
    );
}
