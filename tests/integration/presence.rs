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
    format!("{KEY}:{}", hex::encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref()))
}

/// Subscribes to a presence channel as `user_id` and returns the decoded subscription data.
fn join(ws: &mut Ws, socket_id: &str, channel: &str, user_id: &str) -> Value {
    let channel_data = json!({"user_id": user_id, "user_info": {"name": format!("user {user_id}")}}).to_string();
    let auth = sign(&format!("{socket_id}:{channel}:{channel_data}"));
    send_json(
        ws,
        json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}),
    );
    let reply = recv_json(ws);
    assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
    serde_json::from_str(reply["data"].as_str().expect("data is a string")).unwrap()
}

/// Next message, or None if nothing arrives within `ms`.
fn try_recv(ws: &mut Ws, ms: u64) -> Option<Value> {
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
    let result = match ws.read() {
        Ok(tungstenite::Message::Text(text)) => Some(serde_json::from_str(&text).unwrap()),
        Ok(other) => panic!("{other:?}"),
        Err(tungstenite::Error::Io(e))
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("{e}"),
    };
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    result
}

/// subscription_succeeded lists every member, the joiner included, with hash and count.
#[test]
fn member_list() {
    let server = TestServer::start(|_| {});
    let (mut a, a_id) = connect(server.addr);
    let data = join(&mut a, &a_id, "presence-room", "1");
    assert_eq!(data, json!({"presence": {"ids": ["1"], "hash": {"1": {"name": "user 1"}}, "count": 1}}));
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
    assert_eq!(recv_json(&mut observer)["event"], "pusher_internal:member_added");
    assert!(try_recv(&mut observer, 300).is_none(), "second tab must be silent");

    send_json(&mut tab0, json!({"event": "pusher:unsubscribe", "data": {"channel": "presence-x"}}));
    assert!(try_recv(&mut observer, 300).is_none(), "alice still has a connection");
    drop(tab1); // abrupt: the TCP connection just goes away
    let removed = recv_json(&mut observer);
    assert_eq!(removed["event"], "pusher_internal:member_removed");
    assert_eq!(removed["data"], r#"{"user_id":"alice"}"#);
    assert!(try_recv(&mut observer, 300).is_none(), "exactly one member_removed");
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
    assert!(error["data"]["message"].as_str().unwrap().contains("full"), "{error}");
    subscribe(&mut b, "public-after");
}

/// Bad signatures, re-serialized channel_data and oversized user_info are refused.
#[test]
fn presence_refusals() {
    let server = TestServer::start(|c| c.apps[0].presence_user_info_bytes_max = 20);
    let (mut ws, id) = connect(server.addr);
    let channel_data = r#"{"user_id":"1","user_info":{}}"#;
    let signed_other = sign(&format!("{id}:presence-r:{}", r#"{"user_info":{},"user_id":"1"}"#));
    let too_big = r#"{"user_id":"1","user_info":{"name":"aaaaaaaaaaaaaaaaaaaaaaaa"}}"#;
    for (data, auth) in [
        (channel_data.to_string(), signed_other),
        (too_big.to_string(), sign(&format!("{id}:presence-r:{too_big}"))),
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
    send_json(&mut b, json!({"event": "client-wave", "channel": "presence-chat", "data": {"hi": 1}}));
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
    let (status, body) = http(server.addr, "GET", &signed_path("GET", &path, b"", &[]), b"");
    assert_eq!((status, body.as_str()), (200, r#"{"users":[{"id":"u1"},{"id":"u2"},{"id":"u3"}]}"#));
    let path = format!("/apps/{APP_ID}/channels/presence-api");
    let target = signed_path("GET", &path, b"", &[("info", "user_count,subscription_count")]);
    assert_eq!(
        http(server.addr, "GET", &target, b""),
        (200, r#"{"occupied":true,"subscription_count":4,"user_count":3}"#.into())
    );
    let path = format!("/apps/{APP_ID}/channels");
    let target = signed_path("GET", &path, b"", &[("filter_by_prefix", "presence-"), ("info", "user_count")]);
    assert_eq!(
        http(server.addr, "GET", &target, b""),
        (200, r#"{"channels":{"presence-api":{"user_count":3}}}"#.into())
    );
    let path = format!("/apps/{APP_ID}/channels/public/users");
    assert_eq!(http(server.addr, "GET", &signed_path("GET", &path, b"", &[]), b"").0, 400);
}

/// Sign-in with the reference's string-to-sign, #server-to-user- delivery, and
/// terminate_connections closing every connection of the user (on any shard) with 4009.
#[test]
fn signin_and_user_channel() {
    let server = TestServer::start(|_| {});
    let mut tabs = Vec::new();
    for shard in [0, 1] {
        let (mut ws, id) = connect_on(&server, shard);
        let user_data = r#"{"id":"alice","user_info":{"name":"A"}}"#;
        let auth = sign(&format!("{id}::user::{user_data}"));
        send_json(&mut ws, json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}));
        let success = recv_json(&mut ws);
        assert_eq!(success["event"], "pusher:signin_success");
        assert_eq!(
            serde_json::from_str::<Value>(success["data"].as_str().unwrap()).unwrap(),
            json!({"user_data": user_data})
        );
        subscribe(&mut ws, "#server-to-user-alice");
        send_json(&mut ws, json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-bob"}}));
        assert_eq!(recv_json(&mut ws)["event"], "pusher:error");
        tabs.push(ws);
    }
    assert_eq!(publish(server.addr, &["#server-to-user-alice"], "note", "hi", None).0, 200);
    for ws in &mut tabs {
        assert_eq!(recv_json(ws)["event"], "note");
    }
    let path = format!("/apps/{APP_ID}/users/alice/terminate_connections");
    assert_eq!(http(server.addr, "POST", &signed_path("POST", &path, b"{}", &[]), b"{}"), (200, "{}".into()));
    for ws in &mut tabs {
        assert_eq!(recv_json(ws)["data"]["code"], 4009);
        assert_eq!(recv_close(ws), 4009);
    }
}

/// A bad sign-in signature is refused with pusher:error 4009 and close 4009.
#[test]
fn signin_refused() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    send_json(
        &mut ws,
        json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:00"), "user_data": r#"{"id":"x"}"#}}),
    );
    assert_eq!(recv_json(&mut ws)["data"]["code"], 4009);
    assert_eq!(recv_close(&mut ws), 4009);
}

/// Authorized connections: a connection that neither signs in nor joins a private channel in
/// time is closed with 4009; one that signed in stays.
#[test]
fn authorized_connections_timeout() {
    let server = TestServer::start(|c| c.apps[0].authorized_connections_timeout_s = 1);
    let (mut idle, _) = connect(server.addr);
    let (mut signed, id) = connect(server.addr);
    let user_data = r#"{"id":"u"}"#;
    send_json(
        &mut signed,
        json!({"event": "pusher:signin", "data": {"auth": sign(&format!("{id}::user::{user_data}")), "user_data": user_data}}),
    );
    assert_eq!(recv_json(&mut signed)["event"], "pusher:signin_success");
    idle.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(recv_json(&mut idle)["data"]["code"], 4009);
    assert_eq!(recv_close(&mut idle), 4009);
    assert!(try_recv(&mut signed, 500).is_none());
}

/// Client events over client_events_per_second_max are dropped with pusher:error 4301.
#[test]
fn client_event_rate_limit() {
    let server = TestServer::start(|c| c.apps[0].client_events_per_second_max = 3);
    let (mut a, a_id) = connect(server.addr);
    let (mut b, b_id) = connect(server.addr);
    join(&mut a, &a_id, "presence-rate", "a");
    join(&mut b, &b_id, "presence-rate", "b");
    recv_json(&mut a); // member_added for b
    for i in 0..10 {
        send_json(&mut a, json!({"event": "client-n", "channel": "presence-rate", "data": i}));
    }
    let mut relayed = 0;
    while let Some(message) = try_recv(&mut b, 300) {
        assert_eq!(message["event"], "client-n");
        relayed += 1;
    }
    let mut limited = 0;
    while let Some(message) = try_recv(&mut a, 300) {
        assert_eq!(message["data"]["code"], 4301, "{message}");
        limited += 1;
    }
    assert!((3..=6).contains(&relayed) && relayed + limited == 10, "relayed {relayed}, limited {limited}");
}

/// Cache channels: cache_miss when empty; the last published event is replayed first to a
/// new subscriber (exact bytes); info=cache reports it; it expires after cache_ttl_s.
#[test]
fn cache_channels() {
    let server = TestServer::start(|c| c.apps[0].cache_ttl_s = 2);
    let (mut first, _) = connect(server.addr);
    subscribe(&mut first, "cache-prices");
    assert_eq!(recv_text(&mut first), r#"{"event":"pusher:cache_miss","channel":"cache-prices"}"#);
    assert_eq!(publish(server.addr, &["cache-prices"], "price", "1", None).0, 200);
    assert_eq!(publish(server.addr, &["cache-prices"], "price", "2", None).0, 200);
    assert_eq!(recv_json(&mut first)["data"], "1");
    assert_eq!(recv_json(&mut first)["data"], "2");
    for _ in 0..6 {
        let (mut late, _) = connect(server.addr);
        subscribe(&mut late, "cache-prices");
        assert_eq!(recv_text(&mut late), r#"{"event":"price","channel":"cache-prices","data":"2"}"#);
    }
    let path = format!("/apps/{APP_ID}/channels/cache-prices");
    let (status, body) = http(server.addr, "GET", &signed_path("GET", &path, b"", &[("info", "cache")]), b"");
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["cache"]["data"], "2", "{body}");
    assert!(body["cache"]["ttl"].as_u64().unwrap() <= 2);
    std::thread::sleep(Duration::from_millis(2100));
    let (mut expired, _) = connect(server.addr);
    subscribe(&mut expired, "cache-prices");
    assert_eq!(recv_json(&mut expired)["event"], "pusher:cache_miss");
}

/// presence-cache channels give the member list, then the cached event.
#[test]
fn presence_cache_channel() {
    let server = TestServer::start(|_| {});
    assert_eq!(publish(server.addr, &["presence-cache-room"], "state", "s1", None).0, 200);
    let (mut ws, id) = connect(server.addr);
    let data = join(&mut ws, &id, "presence-cache-room", "9");
    assert_eq!(data["presence"]["count"], 1);
    assert_eq!(recv_json(&mut ws)["data"], "s1");
}

/// subscription_count (opt-in): subscribers across shards hear the channel's total, throttled
/// to once a second; presence channels never get it.
#[test]
fn subscription_count_events() {
    let server = TestServer::start(|c| c.apps[0].subscription_count_enabled = true);
    let (mut a, _) = connect_on(&server, 0);
    let (mut b, _) = connect_on(&server, 1);
    subscribe(&mut a, "counted");
    subscribe(&mut b, "counted");
    let wait_for = |ws: &mut Ws, count: u64| loop {
        let message = try_recv(ws, 3000).expect("a subscription_count event");
        assert_eq!(message["event"], "pusher_internal:subscription_count", "{message}");
        let data: Value = serde_json::from_str(message["data"].as_str().unwrap()).unwrap();
        if data["subscription_count"] == count {
            break;
        }
    };
    wait_for(&mut a, 2);
    wait_for(&mut b, 2);
    send_json(&mut b, json!({"event": "pusher:unsubscribe", "data": {"channel": "counted"}}));
    wait_for(&mut a, 1);
    let (mut p, p_id) = connect(server.addr);
    join(&mut p, &p_id, "presence-uncounted", "1");
    assert!(try_recv(&mut p, 1500).is_none(), "no subscription_count on presence channels");
    // Cache channels are counted too (their subscription completes on the home shard).
    for ws in [&mut a, &mut b] {
        subscribe(ws, "cache-counted");
        assert_eq!(recv_json(ws)["event"], "pusher:cache_miss");
    }
    wait_for(&mut a, 2);
}

fn signin(ws: &mut Ws, socket_id: &str, user_data: &str) {
    let auth = sign(&format!("{socket_id}::user::{user_data}"));
    send_json(ws, json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}));
    assert_eq!(recv_json(ws)["event"], "pusher:signin_success");
}

fn watchlist_event(ws: &mut Ws) -> Value {
    let message = try_recv(ws, 3000).expect("a watchlist event");
    assert_eq!(message["event"], "pusher_internal:watchlist_events", "{message}");
    serde_json::from_str(message["data"].as_str().unwrap()).unwrap()
}

/// Watchlist: online for watched users already online at sign-in and when they arrive (once
/// per user, whatever shards their connections are on), offline when their last one leaves.
#[test]
fn watchlist_online_offline() {
    let server = TestServer::start(|_| {});
    let (mut carol, carol_id) = connect_on(&server, 1);
    signin(&mut carol, &carol_id, r#"{"id":"carol"}"#);
    let (mut bob, bob_id) = connect_on(&server, 0);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice","carol"]}"#);
    assert_eq!(watchlist_event(&mut bob), json!({"events": [{"name": "online", "user_ids": ["carol"]}]}));
    let (mut alice0, alice0_id) = connect_on(&server, 0);
    signin(&mut alice0, &alice0_id, r#"{"id":"alice"}"#);
    assert_eq!(watchlist_event(&mut bob), json!({"events": [{"name": "online", "user_ids": ["alice"]}]}));
    let (mut alice1, alice1_id) = connect_on(&server, 1);
    signin(&mut alice1, &alice1_id, r#"{"id":"alice"}"#);
    assert!(try_recv(&mut bob, 300).is_none(), "a second connection of alice is not news");
    drop(alice0);
    assert!(try_recv(&mut bob, 300).is_none(), "alice is still online");
    drop(alice1);
    assert_eq!(watchlist_event(&mut bob), json!({"events": [{"name": "offline", "user_ids": ["alice"]}]}));
    drop(carol);
    assert_eq!(watchlist_event(&mut bob), json!({"events": [{"name": "offline", "user_ids": ["carol"]}]}));
}

/// Publishing with info=user_count,subscription_count reports the channel's counts.
#[test]
fn publish_with_info() {
    let server = TestServer::start(|_| {});
    let (mut a, a_id) = connect(server.addr);
    let (mut b, b_id) = connect(server.addr);
    join(&mut a, &a_id, "presence-info", "u1");
    join(&mut b, &b_id, "presence-info", "u1");
    let body =
        json!({"name": "e", "channels": ["presence-info"], "data": "d", "info": "user_count,subscription_count"})
            .to_string();
    let path = format!("/apps/{APP_ID}/events");
    let (status, reply) = http(server.addr, "POST", &signed_path("POST", &path, body.as_bytes(), &[]), body.as_bytes());
    assert_eq!(status, 200);
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply, json!({"channels": {"presence-info": {"user_count": 1, "subscription_count": 2}}}));
}

/// Test settings for a Pusher-format lifecycle webhook to `receiver` (fresh data dir).
fn lifecycle_hook(config: &mut ringwire::Config, receiver: std::net::SocketAddr, name: &str) {
    config.webhooks.data_dir = temp_dir(name);
    config.webhooks.allow_private_targets = true;
    config.webhooks.batch_ms = 20;
    config.apps[0].webhooks = vec![ringwire::config::WebhookConfig {
        id: Some("lifecycle".into()),
        ..ringwire::config::WebhookConfig::pusher(format!("http://{receiver}/pusher"))
    }];
}

/// Polls until `done` holds for the receiver's lifecycle events (or 5 s pass); returns them.
fn wait_lifecycle(
    receiver: &Receiver,
    done: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let events = receiver.lifecycle_events();
        if done(&events) || std::time::Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw client pipelining subscribe, unsubscribe, subscribe of a cache channel homed on the
/// other shard in one TCP write is counted once: one subscription_succeeded, and leaving
/// vacates the channel (the stale home reply to the first subscribe is ignored).
#[test]
fn pipelined_resubscribe_to_remote_cache_channel_counts_once() {
    use std::io::Write;
    let receiver = Receiver::start();
    let server = TestServer::start(|c| lifecycle_hook(c, receiver.addr, "pipelined-cache"));
    let (mut ws, _) = connect_on(&server, 0);
    let channel = (0..)
        .map(|i| format!("cache-remote-{i}"))
        .find(|name| ringwire::shard::presence::home(0, name, 2) == 1)
        .unwrap();
    let subscribe = json!({"event": "pusher:subscribe", "data": {"auth": "", "channel": channel}}).to_string();
    let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}}).to_string();
    let mut segment = crate::websocket::masked_text(subscribe.as_bytes());
    segment.extend(crate::websocket::masked_text(unsubscribe.as_bytes()));
    segment.extend(crate::websocket::masked_text(subscribe.as_bytes()));
    ws.get_mut().write_all(&segment).unwrap();
    let mut events = Vec::new();
    while let Some(message) = try_recv(&mut ws, 500) {
        events.push(message["event"].as_str().unwrap().to_string());
    }
    let frames = events;
    let occupied = wait_lifecycle(&receiver, |e| e.iter().any(|(n, _, _)| n == "channel_occupied"));
    assert!(occupied.iter().any(|(n, c, _)| n == "channel_occupied" && *c == channel), "{occupied:?}");
    drop(ws);
    let events = wait_lifecycle(&receiver, |e| e.iter().any(|(n, _, _)| n == "channel_vacated"));
    let names: Vec<&str> =
        events.iter().filter(|(n, _, _)| n.starts_with("channel_")).map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["channel_occupied", "channel_vacated"], "{events:?}");
    assert_eq!(frames, ["pusher_internal:subscription_succeeded", "pusher:cache_miss"]);
}

/// Signing in again as another user drops the previous user's #server-to-user- channel:
/// that user's events no longer reach the socket, and terminate_connections follows the new
/// identity (the old user's misses it because it no longer is that user in any way).
#[test]
fn signin_again_drops_previous_user_channel() {
    let server = TestServer::start(|_| {});
    let (mut ws, id) = connect(server.addr);
    signin(&mut ws, &id, r#"{"id":"alice"}"#);
    subscribe(&mut ws, "#server-to-user-alice");
    subscribe(&mut ws, "public-marker");
    signin(&mut ws, &id, r#"{"id":"bob"}"#);
    // Published in sequence, so delivered in order: the marker proves the note was not sent.
    assert_eq!(publish(server.addr, &["#server-to-user-alice"], "note", "for alice", None).0, 200);
    assert_eq!(publish(server.addr, &["public-marker"], "marker", "1", None).0, 200);
    assert_eq!(recv_json(&mut ws)["event"], "marker", "alice's event must not reach bob's socket");
    let terminate = |user: &str| {
        let path = format!("/apps/{APP_ID}/users/{user}/terminate_connections");
        assert_eq!(http(server.addr, "POST", &signed_path("POST", &path, b"{}", &[]), b"{}"), (200, "{}".into()));
    };
    terminate("alice");
    assert_eq!(publish(server.addr, &["public-marker"], "marker", "2", None).0, 200);
    assert_eq!(recv_json(&mut ws)["data"], "2", "terminating alice leaves bob's socket open");
    terminate("bob");
    assert_eq!(recv_json(&mut ws)["data"]["code"], 4009);
    assert_eq!(recv_close(&mut ws), 4009);
}

/// Graceful shutdown keeps every lifecycle event of the connections it closes: presence
/// members on channels homed on both shards, from connections on both shards, are all
/// removed (at once, though their debounce window is a minute) and both channels vacated.
/// The guarantee tested is durability: shutdown commits
/// the events to the WAL (the endpoint is down during the first run), and a restart on the
/// same data directory delivers every member_removed and channel_vacated.
#[test]
fn graceful_shutdown_keeps_lifecycle_events() {
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed again: refused
    let data_dir = temp_dir("shutdown-lifecycle");
    let configure = |c: &mut ringwire::Config| {
        lifecycle_hook(c, address, "unused");
        c.webhooks.data_dir = data_dir.clone();
        c.webhooks.retry_schedule_ms = vec![0, 100, 100, 100, 100, 100, 100, 100, 100, 100];
        c.webhooks.retry_jitter_percent = 0;
        c.server.shutdown_grace_ms = 2000;
        // A debounce far longer than the test: shutdown must run the pending leaves at once.
        c.apps[0].presence_debounce_ms = 60_000;
    };
    let channels: Vec<String> = (0..2)
        .map(|home| {
            (0..)
                .map(|i| format!("presence-shutdown-{i}"))
                .find(|n| ringwire::shard::presence::home(0, n, 2) == home)
                .unwrap()
        })
        .collect();
    let server = TestServer::start(configure);
    let mut readers = Vec::new();
    let mut expected_removed = Vec::new();
    for shard in [0, 1] {
        for (c, channel) in channels.iter().enumerate() {
            let user = format!("user-{shard}-{c}");
            let (mut ws, id) = connect_on(&server, shard);
            join(&mut ws, &id, channel, &user);
            expected_removed.push((channel.clone(), user));
            // Like a real client, answer the server's close frame (tungstenite does on read);
            // shard 1's clients answer late, so shard 0 is done with its own connections
            // while shard 1's leaves are still to come.
            readers.push(std::thread::spawn(move || {
                if shard == 1 {
                    std::thread::sleep(Duration::from_millis(500));
                }
                while ws.read().is_ok() {}
            }));
        }
    }
    drop(server); // graceful: shutdown, then join every shard
    for reader in readers {
        reader.join().unwrap();
    }
    let receiver = Receiver::start_on(&address.to_string());
    let _restarted = TestServer::start(configure);
    let complete = |events: &[(String, String, String)]| {
        let vacated = channels.iter().all(|c| events.iter().any(|(n, ch, _)| n == "channel_vacated" && ch == c));
        let removed = expected_removed
            .iter()
            .all(|(c, u)| events.iter().any(|(n, ch, user)| n == "member_removed" && ch == c && user == u));
        vacated && removed
    };
    let events = wait_lifecycle(&receiver, complete);
    assert!(complete(&events), "missing member_removed or channel_vacated after restart: {events:?}");
}

/// The presence debounce window of the tests below (shorter than Pusher's 3 s to keep them
/// quick; the mechanism does not depend on its length).
const DEBOUNCE_MS: u64 = 1_000;

/// Pusher's presence debounce on one node: a user whose only connection closes and who joins
/// again (from another shard) within the window causes no member_removed/member_added at
/// another subscriber and no member webhooks; the member list never loses the user.
#[test]
fn reconnect_within_debounce_is_silent() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| {
        lifecycle_hook(c, receiver.addr, "debounce-rejoin");
        c.apps[0].presence_debounce_ms = DEBOUNCE_MS;
    });
    let channel = "presence-debounce";
    let (mut watcher, watcher_id) = connect(server.addr);
    join(&mut watcher, &watcher_id, channel, "watcher");
    let (mut first, first_id) = connect_on(&server, 0);
    join(&mut first, &first_id, channel, "u1");
    assert_eq!(recv_json(&mut watcher)["event"], "pusher_internal:member_added");
    let added = |e: &[(String, String, String)]| e.iter().filter(|(n, _, _)| n == "member_added").count() == 2;
    wait_lifecycle(&receiver, added);
    let left_at = std::time::Instant::now();
    drop(first);
    // The close reaches the server before the new join (its leave is in the home shard's
    // window when the join arrives).
    std::thread::sleep(Duration::from_millis(100));
    let (mut second, second_id) = connect_on(&server, 1);
    let data = join(&mut second, &second_id, channel, "u1");
    assert_eq!(data["presence"]["count"], 2, "{data}");
    let rejoined = left_at.elapsed();
    assert!(rejoined < Duration::from_millis(DEBOUNCE_MS), "the rejoin took {rejoined:?}: not within the window");
    // Nothing may arrive during the window nor once it has passed: only waiting shows that.
    assert_eq!(try_recv(&mut watcher, DEBOUNCE_MS + 500), None, "a reconnect within the window is silent");
    let events = receiver.lifecycle_events();
    let members: Vec<_> = events.iter().filter(|(n, _, _)| n.starts_with("member_")).collect();
    assert_eq!(members.len(), 2, "only the two joins: {events:?}");
    // The member is still counted once: its real leave is announced after the window.
    drop(second);
    let removed = recv_json(&mut watcher);
    assert_eq!(removed["event"], "pusher_internal:member_removed", "{removed}");
    let removed = |e: &[(String, String, String)]| e.iter().any(|(n, _, _)| n == "member_removed");
    let events = wait_lifecycle(&receiver, removed);
    let u1: Vec<&str> = events.iter().filter(|(_, _, u)| u == "u1").map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(u1, ["member_added", "member_removed"], "{events:?}");
}

/// A member who stays away is removed after about the window (the client event and the
/// webhook); the channel is vacated only after its last member's delayed removal, so the
/// webhooks say member_removed, then channel_vacated, each once.
#[test]
fn leave_is_announced_after_the_window_then_vacated() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| {
        lifecycle_hook(c, receiver.addr, "debounce-leave");
        c.apps[0].presence_debounce_ms = DEBOUNCE_MS;
    });
    let channel = "presence-debounce-leave";
    let (mut watcher, watcher_id) = connect(server.addr);
    join(&mut watcher, &watcher_id, channel, "watcher");
    let (mut leaver, leaver_id) = connect(server.addr);
    join(&mut leaver, &leaver_id, channel, "u1");
    assert_eq!(recv_json(&mut watcher)["event"], "pusher_internal:member_added");
    let left_at = std::time::Instant::now();
    drop(leaver);
    let removed = recv_json(&mut watcher);
    let waited = left_at.elapsed();
    assert_eq!(removed["event"], "pusher_internal:member_removed", "{removed}");
    assert!(waited >= Duration::from_millis(DEBOUNCE_MS - 100), "removed after the window, not {waited:?}");
    assert!(waited < Duration::from_millis(DEBOUNCE_MS + 1_500), "removed soon after the window, not {waited:?}");
    drop(watcher);
    let vacated = |e: &[(String, String, String)]| e.iter().any(|(n, _, _)| n == "channel_vacated");
    wait_lifecycle(&receiver, vacated);
    // A late duplicate would come with the next batch: give it one.
    std::thread::sleep(Duration::from_millis(200));
    let events: Vec<(String, String)> = receiver
        .lifecycle_events()
        .into_iter()
        .filter(|(n, _, _)| n != "member_added" && n != "channel_occupied")
        .map(|(n, _, u)| (n, u))
        .collect();
    let expected = [("member_removed", "u1"), ("member_removed", "watcher"), ("channel_vacated", "")];
    let expected: Vec<(String, String)> = expected.iter().map(|(n, u)| (n.to_string(), u.to_string())).collect();
    assert_eq!(events, expected, "{events:?}");
}
