//! Hostile input: every limit answers its documented error and the server keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use tungstenite::Message;

use crate::support::*;
use crate::websocket::{masked_frame, masked_text};

/// Another client is still served normally.
fn still_serving(server: &TestServer) {
    let (mut ws, _) = connect(server.addr);
    subscribe(&mut ws, "alive");
    assert_eq!(http(server.addr, "GET", "/health", b"").0, 200);
}

/// Request line, header and body limits answer 414, 431 and 413 with JSON bodies.
#[test]
fn http_head_limits() {
    let server = TestServer::start(|c| c.http.body_bytes_max = 1000);
    let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
    assert_eq!(raw_http(server.addr, long_target.as_bytes()).0, 414);
    let big_header = format!("GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(17_000));
    let (status, body) = raw_http(server.addr, big_header.as_bytes());
    assert_eq!(status, 431);
    assert!(body.contains("\"status\":431"), "{body}");
    let many: String = (0..70).map(|i| format!("X-{i}: 1\r\n")).collect();
    assert_eq!(raw_http(server.addr, format!("GET /health HTTP/1.1\r\n{many}\r\n").as_bytes()).0, 431);
    assert_eq!(raw_http(server.addr, b"POST /apps/1/events HTTP/1.1\r\nContent-Length: 1001\r\n\r\n").0, 413);
    assert_eq!(raw_http(server.addr, b"GARBAGE\r\n\r\n").0, 400);
    still_serving(&server);
}

/// Slowloris: a head that trickles in is cut off at header_timeout with 408, while other
/// clients are served meanwhile; the same holds for a WebSocket handshake.
#[test]
fn slowloris() {
    let server = TestServer::start(|c| c.http.header_timeout_ms = 400);
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nX-A: 1\r\n").unwrap();
    let mut slow_ws = TcpStream::connect(server.addr).unwrap();
    slow_ws.write_all(format!("GET /app/{KEY}?protocol=7 HTTP/1.1\r\nUpgrade: websocket\r\n").as_bytes()).unwrap();
    still_serving(&server);
    std::thread::sleep(Duration::from_millis(300));
    let _ = slow.write_all(b"X-B: 2\r\n");
    for stream in [&mut slow, &mut slow_ws] {
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        assert_eq!(parse_response(&response).0, 408, "{}", String::from_utf8_lossy(&response));
    }
}

/// Frame-level violations close with their RFC 6455 codes; other clients are unaffected.
#[test]
fn frame_violations() {
    let server = TestServer::start(|c| c.websocket.frame_bytes_max = 4096);
    let mut bomb = vec![0x82, 0x80 | 127];
    bomb.extend_from_slice(&(1u64 << 62).to_be_bytes());
    bomb.extend_from_slice(&[1, 2, 3, 4]);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (vec![0x81, 0x01, b'a'], 1002),            // unmasked
        (masked_frame(0x81, &[0xff, 0xfe]), 1007), // invalid UTF-8
        (masked_frame(0x81, &[b'a'; 5000]), 1009), // over frame_bytes_max
        (bomb, 1009),                              // 2^62-byte declared length
        (masked_frame(0x82, b"bin"), 1003),        // binary
        (masked_frame(0xC1, b"a"), 1002),          // RSV1 without an extension
    ];
    for (bytes, code) in cases {
        let (mut ws, _) = connect(server.addr);
        ws.get_mut().write_all(&bytes).unwrap();
        assert_eq!(recv_close(&mut ws), code, "{bytes:02x?}");
    }
    assert!(metric(server.addr, "protocol_closes_total").iter().sum::<u64>() >= 4);
    still_serving(&server);
}

/// Malformed JSON, unknown events and bad subscriptions get pusher:error and the connection
/// stays open.
#[test]
fn bad_messages_are_non_fatal() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    for bad in ["{", "[]", r#"{"event":"pusher:subscribe","data":{}}"#, r#"{"event":"nope"}"#] {
        ws.send(Message::text(bad)).unwrap();
        assert_eq!(recv_json(&mut ws)["event"], "pusher:error", "{bad}");
    }
    for channel in ["", "a b", &"x".repeat(201), "#other", "#server-to-user-"] {
        send_json(&mut ws, json!({"event": "pusher:subscribe", "data": {"channel": channel}}));
        let error = recv_json(&mut ws);
        assert_eq!(error["event"], "pusher:error");
        assert!(error["data"]["message"].as_str().unwrap().starts_with("invalid channel name"), "{error}");
    }
    subscribe(&mut ws, "fine");
}

/// A subscribe flood stops at channels_per_connection_max.
#[test]
fn subscribe_flood() {
    let server = TestServer::start(|c| {
        c.apps[0].channels_per_connection_max = 5;
        c.websocket.messages_per_second_max = 0;
    });
    let (mut ws, _) = connect(server.addr);
    for i in 0..5 {
        subscribe(&mut ws, &format!("c{i}"));
    }
    for i in 5..50 {
        send_json(&mut ws, json!({"event": "pusher:subscribe", "data": {"channel": format!("c{i}")}}));
        let error = recv_json(&mut ws);
        assert!(error["data"]["message"].as_str().unwrap().contains("at most 5 channels"), "{error}");
    }
    assert_eq!(metric(server.addr, "subscriptions").iter().sum::<u64>(), 5);
    still_serving(&server);
}

/// Over messages_per_second_max, messages are dropped with pusher:error 4301.
#[test]
fn message_rate_limit() {
    let server = TestServer::start(|c| c.websocket.messages_per_second_max = 10);
    let (mut ws, _) = connect(server.addr);
    let mut raw = Vec::new();
    for _ in 0..40 {
        raw.extend(masked_text(br#"{"event":"pusher:ping","data":{}}"#));
    }
    ws.get_mut().write_all(&raw).unwrap();
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 40 {
        let message = recv_json(&mut ws);
        match message["event"].as_str().unwrap() {
            "pusher:pong" => pongs += 1,
            "pusher:error" if message["data"]["code"] == 4301 => limited += 1,
            other => panic!("{other}"),
        }
    }
    assert!(pongs >= 10 && limited >= 1, "pongs {pongs}, limited {limited}");
}

/// Over connections_per_shard_max, new connections are closed at once and counted.
#[test]
fn connection_limit_per_shard() {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.server.connections_per_shard_max = 3;
    });
    let _held: Vec<Ws> = (0..3).map(|_| connect(server.addr).0).collect();
    let mut extra = TcpStream::connect(server.addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\n\r\n");
    let mut buf = [0u8; 64];
    assert!(matches!(extra.read(&mut buf), Ok(0) | Err(_)), "closed without an answer");
    drop(_held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(metric(server.addr, "connections_refused_total"), vec![1]);
}

/// The per-app connection quota refuses with 4004.
#[test]
fn app_connection_quota() {
    let server = TestServer::start(|c| c.apps[0].max_connections = 2);
    let _a = connect(server.addr);
    let _b = connect(server.addr);
    let mut ws = ws_connect(server.addr, &format!("/app/{KEY}?protocol=7"));
    assert_eq!(recv_json(&mut ws)["data"]["code"], 4004);
    assert_eq!(recv_close(&mut ws), 4004);
}

/// A burst that overflows tiny mesh rings: messages wait in the outbox (counted), none is
/// lost or reordered, and the publisher is not failed.
#[test]
fn mesh_ring_burst() {
    let server = TestServer::start(|c| {
        c.mesh.ring_capacity = 2;
    });
    let mut clients: Vec<Ws> = (0..10)
        .map(|_| {
            let (mut ws, _) = connect(server.addr);
            subscribe(&mut ws, "burst");
            ws
        })
        .collect();
    let path = format!("/apps/{APP_ID}/batch_events");
    for round in 0..20 {
        let batch: Vec<serde_json::Value> =
            (0..10).map(|i| json!({"name": "e", "channel": "burst", "data": (round * 10 + i).to_string()})).collect();
        let body = json!({ "batch": batch }).to_string();
        let target = signed_path("POST", &path, body.as_bytes(), &[]);
        assert_eq!(http(server.addr, "POST", &target, body.as_bytes()).0, 200);
    }
    for ws in &mut clients {
        for expected in 0..200 {
            assert_eq!(recv_json(ws)["data"], expected.to_string());
        }
    }
    assert!(metric(server.addr, "mesh_full_total").iter().sum::<u64>() > 0, "the rings did fill");
    assert_eq!(metric(server.addr, "mesh_outbox_depth").iter().sum::<u64>(), 0);
}

/// Validly signed requests with hostile paths (UTF-8 split where an id is sliced, percent
/// escapes, overlong and empty segments) on every admin route get JSON errors, and the node —
/// one shard, so a dead shard would stop it — keeps serving.
#[test]
fn signed_hostile_admin_paths() {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.webhooks.durability = ringwire::config::DurabilityMode::Memory;
        c.apps[0].webhooks = vec![standard_hook("events", "http://127.0.0.1:9/hook".into())];
    });
    let split_utf8 = format!("msg_{}é{}", "0".repeat(15), "0".repeat(15));
    let ids = [
        split_utf8.as_str(),
        "msg_ééééééééééééééééé",
        "msg_%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9",
        "msg_+0000000000000000000000000000000",
        "msg_",
        "",
        "msg_ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    ];
    for id in ids {
        for (method, route) in [("GET", "attempts"), ("POST", "replay")] {
            let path = format!("/apps/{APP_ID}/webhooks/deliveries/{id}/{route}");
            let (status, body) = http(server.addr, method, &signed_path(method, &path, b"", &[]), b"");
            assert!(matches!(status, 400 | 404), "{method} {path}: {status} {body}");
            assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok(), "{body}");
        }
    }
    for endpoint in ["é", "%00", "events%2F..", ""] {
        for (method, route) in [("GET", "dead_letters"), ("POST", "enable"), ("POST", "replay")] {
            let path = format!("/apps/{APP_ID}/webhooks/{endpoint}/{route}");
            let (status, body) = http(server.addr, method, &signed_path(method, &path, b"", &[]), b"");
            assert!(matches!(status, 400 | 404), "{method} {path}: {status} {body}");
        }
    }
    assert_eq!(publish(server.addr, &["after"], "e", "{}", None).0, 200, "the shard still publishes");
    still_serving(&server);
}

/// The settings `TestServer::start` uses, for tests that start a `Server` themselves.
fn test_config() -> ringwire::Config {
    let mut config = ringwire::Config::default();
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.server.shards = 2;
    config.server.shutdown_grace_ms = 300;
    config.server.shutdown_close_window_ms = 10;
    if let Ok(driver) = std::env::var("RINGWIRE_TEST_DRIVER") {
        config.server.io_driver =
            if driver == "epoll" { ringwire::config::IoDriver::Epoll } else { ringwire::config::IoDriver::IoUring };
    }
    config
}

/// A Standard Webhooks endpoint called `id` posting to `url`.
fn standard_hook(id: &str, url: String) -> ringwire::config::WebhookConfig {
    ringwire::config::WebhookConfig { id: Some(id.into()), ..ringwire::config::WebhookConfig::standard(url, WHSEC) }
}

/// A webhook host whose DNS lookup never answers fails only its own attempts, with "DNS
/// lookup of hang.test timed out after 300 ms", at the cost of one lookup (one DNS thread) for
/// the whole node; deliveries to another named host keep flowing, and fsync'd publishes (the
/// WAL's blocking pool) keep being accepted.
#[test]
fn hanging_dns_lookup_fails_only_its_own_host() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let receiver = Receiver::start();
    let hung = Arc::new(AtomicUsize::new(0));
    // The lookup for hang.test blocks until the test ends (drops `release`), like a nameserver
    // that never answers; good.test is the receiver.
    let (release, released) = crossbeam::channel::bounded::<()>(0);
    let counter = hung.clone();
    let lookup: ringwire::webhook::resolver::Lookup = Arc::new(move |host: &str| {
        if host == "good.test" {
            return Ok(vec![std::net::IpAddr::from([127, 0, 0, 1])]);
        }
        counter.fetch_add(1, Ordering::SeqCst);
        let _ = released.recv();
        Err(std::io::Error::other("released"))
    });
    let mut config = test_config();
    config.webhooks.data_dir = temp_dir("hanging-dns");
    config.webhooks.durability = ringwire::config::DurabilityMode::Fsync;
    // Small segments: the WAL creates new ones (on the runtime's blocking pool) while the
    // lookup hangs.
    config.webhooks.segment_bytes_max = 2048;
    config.webhooks.allow_private_targets = true;
    config.webhooks.retry_schedule_ms = vec![0, 100, 200, 300];
    config.webhooks.retry_jitter_percent = 0;
    config.webhooks.dns_timeout_ms = 300;
    config.webhooks.dns_threads = 2;
    config.apps[0].webhooks = vec![
        standard_hook("hang", "http://hang.test:9/".into()),
        standard_hook("good", format!("http://good.test:{}/", receiver.addr.port())),
    ];
    let server = ringwire::Server::start_with_lookup(config, None, lookup).expect("server starts");
    let events = 20;
    for n in 0..events {
        let (status, body) = publish(server.addr, &[&format!("c{n}")], "e", "{}", None);
        assert_eq!(status, 200, "publish {n} while hang.test hangs: {body}");
    }
    assert_eq!(receiver.wait_for(events, Duration::from_secs(10)).len(), events, "good.test deliveries flow");
    let expected = "DNS lookup of hang.test timed out after 300 ms";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let health = loop {
        let (_, health) = api(server.addr, "GET", "/apps/1/webhooks", &[]);
        if health.to_string().contains(expected) || std::time::Instant::now() > deadline {
            break health;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let hang = health["endpoints"].as_array().unwrap().iter().find(|e| e["id"] == "hang").cloned();
    assert!(hang.as_ref().is_some_and(|e| e["last_error"].as_str().unwrap_or("").contains(expected)), "{health}");
    assert_eq!(hung.load(Ordering::SeqCst), 1, "one lookup of the dead host in flight node-wide");
    server.shutdown();
    server.join();
    drop(release);
}

/// Open HTTP connections (keep-alive and in progress), all shards; the connection asking
/// counts itself.
fn http_connections(server: std::net::SocketAddr) -> u64 {
    metric(server, "http_connections").iter().sum()
}

/// A client that pipelines requests for large responses (/metrics) and never reads them, on a
/// small receive buffer, is disconnected once a response has waited write_timeout_ms to be
/// written, instead of holding the connection and its buffers forever; others are served.
#[test]
fn unread_responses_hit_the_write_timeout() {
    let server = TestServer::start(|c| c.http.write_timeout_ms = 300);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stalled: TcpStream = socket.into();
    let requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    stalled.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = stalled.write_all(&requests);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while http_connections(server.addr) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(http_connections(server.addr) >= 2, "the stalled connection is open");
    while http_connections(server.addr) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_connections(server.addr), 1, "the unread connection is closed after write_timeout_ms");
    still_serving(&server);
    drop(stalled);
}
