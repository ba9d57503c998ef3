//! The Pusher HTTP API and the operational endpoints.

use serde_json::{json, Value};

use crate::support::*;

fn events_path() -> String {
    format!("/apps/{APP_ID}/events")
}

/// A correctly signed publish is accepted with `{}`.
#[test]
fn signed_publish_accepted() {
    let server = TestServer::start(|_| {});
    assert_eq!(publish(server.addr, &["a", "b"], "e", "d", None), (200, "{}".into()));
}

/// A wrong signature, a stale timestamp (a replay) and a wrong body are refused with 401 and
/// a JSON reason.
#[test]
fn signature_refusals() {
    let server = TestServer::start(|_| {});
    let body = br#"{"name":"e","channel":"a","data":"x"}"#;
    let good = signed_path("POST", &events_path(), body, &[]);
    let tampered = good.replace("auth_signature=", "auth_signature=0");
    let (status, reply) = http(server.addr, "POST", &tampered, body);
    assert_eq!(status, 401, "{reply}");
    assert!(reply.contains("not hex") || reply.contains("invalid signature"), "{reply}");

    let old = now() - 601;
    let query = ringwire::pusher::auth::signed_query("POST", &events_path(), KEY, SECRET, body, old, &[]);
    let (status, reply) = http(server.addr, "POST", &format!("{}?{query}", events_path()), body);
    assert_eq!(status, 401);
    assert!(reply.contains("more than 600 s"), "{reply}");

    let (status, reply) = http(server.addr, "POST", &good, br#"{"name":"e","channel":"a","data":"y"}"#);
    assert_eq!(status, 401);
    assert!(reply.contains("body_md5"), "{reply}");

    let (status, reply) = http(server.addr, "POST", &events_path(), body);
    assert_eq!(status, 401);
    let parsed: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(parsed["status"], 401);
}

/// The Python SDK's GET with the MD5 of the empty body is accepted.
#[test]
fn get_with_empty_body_md5() {
    let server = TestServer::start(|_| {});
    let path = format!("/apps/{APP_ID}/channels");
    let target = signed_path("GET", &path, b"", &[("body_md5", "d41d8cd98f00b204e9800998ecf8427e")]);
    assert_eq!(http(server.addr, "GET", &target, b""), (200, r#"{"channels":{}}"#.into()));
}

/// Event limits: data size → 413, channel count → 400, batch size → 400, bad names → 400.
#[test]
fn event_limits() {
    let server = TestServer::start(|_| {});
    let big = "x".repeat(10_241);
    assert_eq!(publish(server.addr, &["a"], "e", &big, None).0, 413);
    assert_eq!(publish(server.addr, &["a"], "e", &"x".repeat(10_240), None).0, 200);
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(publish(server.addr, &many, "e", "d", None).0, 400);
    assert_eq!(publish(server.addr, &["bad name"], "e", "d", None).0, 400);
    assert_eq!(publish(server.addr, &["a"], "e", "d", Some("not-a-socket")).0, 400);

    let batch: Vec<Value> = (0..11).map(|i| json!({"name": "e", "channel": format!("c{i}"), "data": "d"})).collect();
    let body = json!({ "batch": batch }).to_string();
    let path = format!("/apps/{APP_ID}/batch_events");
    let (status, reply) = http(server.addr, "POST", &signed_path("POST", &path, body.as_bytes(), &[]), body.as_bytes());
    assert_eq!(status, 400, "{reply}");

    let body = r#"{"name":"e""#;
    assert_eq!(
        http(server.addr, "POST", &signed_path("POST", &events_path(), body.as_bytes(), &[]), body.as_bytes()).0,
        400
    );
}

/// batch_events delivers every event, in order.
#[test]
fn batch_events_delivered() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    subscribe(&mut ws, "b");
    let batch: Vec<Value> = (0..10).map(|i| json!({"name": format!("e{i}"), "channel": "b", "data": "d"})).collect();
    let body = json!({ "batch": batch }).to_string();
    let path = format!("/apps/{APP_ID}/batch_events");
    assert_eq!(
        http(server.addr, "POST", &signed_path("POST", &path, body.as_bytes(), &[]), body.as_bytes()),
        (200, "{}".into())
    );
    for i in 0..10 {
        assert_eq!(recv_json(&mut ws)["event"], format!("e{i}"));
    }
}

/// Channel queries count subscribers on every shard.
#[test]
fn channel_queries() {
    let server = TestServer::start(|_| {});
    let _clients: Vec<Ws> = (0..8)
        .map(|i| {
            let (mut ws, _) = connect(server.addr);
            subscribe(&mut ws, if i % 2 == 0 { "room-a" } else { "room-b" });
            subscribe(&mut ws, "lobby");
            ws
        })
        .collect();
    let path = format!("/apps/{APP_ID}/channels");
    let target = signed_path("GET", &path, b"", &[("filter_by_prefix", "room-"), ("info", "subscription_count")]);
    let (status, body) = http(server.addr, "GET", &target, b"");
    assert_eq!(status, 200);
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed, json!({"channels": {"room-a": {"subscription_count": 4}, "room-b": {"subscription_count": 4}}}));

    let path = format!("/apps/{APP_ID}/channels/lobby");
    let target = signed_path("GET", &path, b"", &[("info", "subscription_count")]);
    assert_eq!(http(server.addr, "GET", &target, b""), (200, r#"{"occupied":true,"subscription_count":8}"#.into()));
    let path = format!("/apps/{APP_ID}/channels/empty");
    assert_eq!(
        http(server.addr, "GET", &signed_path("GET", &path, b"", &[]), b""),
        (200, r#"{"occupied":false}"#.into())
    );
    let target = signed_path("GET", &format!("/apps/{APP_ID}/channels"), b"", &[("info", "user_count")]);
    assert_eq!(http(server.addr, "GET", &target, b"").0, 400);
}

/// Routing errors: unknown app 404, unknown route 404, wrong method 405, all with JSON bodies.
#[test]
fn routing_errors() {
    let server = TestServer::start(|_| {});
    assert_eq!(http(server.addr, "POST", "/apps/999/events", b"{}").0, 404);
    let (status, body) = http(server.addr, "GET", "/nope", b"");
    assert_eq!((status, body.as_str()), (404, r#"{"error":"no such endpoint","status":404}"#));
    assert_eq!(http(server.addr, "GET", &events_path(), b"").0, 405);
    assert_eq!(http(server.addr, "POST", "/health", b"").0, 405);
}

/// Health, readiness and metrics answer without auth.
#[test]
fn operational_endpoints() {
    let server = TestServer::start(|_| {});
    assert_eq!(http(server.addr, "GET", "/health", b""), (200, r#"{"ok":true}"#.into()));
    assert_eq!(http(server.addr, "GET", "/ready", b""), (200, r#"{"ready":true}"#.into()));
    let (status, text) = http(server.addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    for name in [
        "connections",
        "subscriptions",
        "messages_in_total",
        "messages_out_total",
        "bytes_in_total",
        "bytes_out_total",
        "mesh_ring_depth",
        "mesh_full_total",
        "slow_consumer_closes_total",
    ] {
        assert!(text.contains(&format!("ringwire_{name}{{shard=\"1\"}}")), "{name} missing");
    }
}

/// Keep-alive: several requests on one connection, each answered in order.
#[test]
fn keep_alive() {
    use std::io::{Read, Write};
    let server = TestServer::start(|_| {});
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .write_all(
            b"GET /health HTTP/1.1\r\n\r\nGET /ready HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut all = String::new();
    stream.read_to_string(&mut all).unwrap();
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 3, "{all}");
    assert!(all.contains(r#"{"ready":true}"#));
}

/// Several apps: keys and channels are isolated, each app has its own secret and limits, and
/// backend_events_per_second_max answers 429.
#[test]
fn multiple_apps() {
    let server = TestServer::start(|c| {
        let mut second = ringwire::config::AppConfig::demo();
        second.id = "2".into();
        second.key = "second-key".into();
        second.secret = "second-secret".into();
        second.backend_events_per_second_max = 3;
        c.apps.push(second);
    });
    let (mut first_app, _) = connect(server.addr);
    subscribe(&mut first_app, "shared-name");
    let mut second_app = ws_connect(server.addr, "/app/second-key?protocol=7");
    assert_eq!(recv_json(&mut second_app)["event"], "pusher:connection_established");
    subscribe(&mut second_app, "shared-name");

    let body = br#"{"name":"e","channel":"shared-name","data":"for-two"}"#;
    let path = "/apps/2/events";
    let sign_second = |body: &[u8]| {
        let query = ringwire::pusher::auth::signed_query("POST", path, "second-key", "second-secret", body, now(), &[]);
        format!("{path}?{query}")
    };
    assert_eq!(http(server.addr, "POST", &sign_second(body), body), (200, "{}".into()));
    assert_eq!(recv_json(&mut second_app)["data"], "for-two");
    // The first app's credentials do not open the second app.
    assert_eq!(http(server.addr, "POST", &signed_path("POST", path, body, &[]), body).0, 401);
    assert_eq!(publish(server.addr, &["shared-name"], "e", "for-one", None).0, 200);
    assert_eq!(recv_json(&mut first_app)["data"], "for-one", "the first app never saw for-two");
    // Three events a second for the second app; a burst gets 429 with a JSON reason.
    let statuses: Vec<u16> = (0..6).map(|_| http(server.addr, "POST", &sign_second(body), body).0).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().filter(|&&s| s == 200).count() <= 5, "{statuses:?}");
}

/// A validly signed query cannot have a parameter neutralised: the key in another case still
/// filters, and folding `info` into the previous value with an escaped `&` is refused with
/// 401 and a JSON reason instead of answering without it.
#[test]
fn signed_parameters_cannot_be_neutralised() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    subscribe(&mut ws, "room-a");
    subscribe(&mut ws, "lobby");
    let path = format!("/apps/{APP_ID}/channels");
    let target = signed_path("GET", &path, b"", &[("filter_by_prefix", "room-")]);
    let shouted = target.replace("filter_by_prefix=", "FILTER_BY_PREFIX=");
    let (status, body) = http(server.addr, "GET", &shouted, b"");
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()), (200, json!({"channels": {"room-a": {}}})));

    let target = signed_path("GET", &path, b"", &[("filter_by_prefix", "room-"), ("info", "subscription_count")]);
    let folded = target.replace("filter_by_prefix=room-&info=", "filter_by_prefix=room-%26info%3D");
    assert_ne!(folded, target);
    let (status, body) = http(server.addr, "GET", &folded, b"");
    assert_eq!(status, 401, "{body}");
    let reason: Value = serde_json::from_str(&body).unwrap();
    assert!(reason.to_string().contains("reserved character"), "{reason}");
}
