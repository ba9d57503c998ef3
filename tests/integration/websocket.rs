//! The Pusher WebSocket protocol over real sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use crate::support::*;

/// connection_established carries a numeric socket_id and a non-zero activity_timeout, with
/// data double-encoded as a string.
#[test]
fn connection_established_shape() {
    let server = TestServer::start(|_| {});
    let mut ws = ws_connect(server.addr, &format!("/app/{KEY}?protocol=7"));
    let text = recv_text(&mut ws);
    let prefix = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\""#;
    assert!(text.starts_with(prefix), "{text}");
    let rest = &text[prefix.len()..];
    let (socket_id, tail) = rest.split_once(r#"\""#).unwrap();
    let (a, b) = socket_id.split_once('.').unwrap();
    assert!(a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit()), "{socket_id}");
    assert_eq!(tail, r#",\"activity_timeout\":120}"}"#);
}

/// socket_ids are unique across shards.
#[test]
fn socket_ids_unique() {
    let server = TestServer::start(|_| {});
    let mut ids: Vec<String> = (0..30).map(|_| connect(server.addr).1).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30);
}

/// Unknown app key: pusher:error 4001 then close 4001, exact bytes.
#[test]
fn unknown_app_key_4001() {
    let server = TestServer::start(|_| {});
    let mut ws = ws_connect(server.addr, "/app/nope?protocol=7");
    assert_eq!(
        recv_text(&mut ws),
        r#"{"event":"pusher:error","data":{"code":4001,"message":"App key nope does not exist"}}"#
    );
    assert_eq!(recv_close(&mut ws), 4001);
}

/// Protocol 5–7 are accepted; others and a missing one are refused with the documented codes.
#[test]
fn protocol_versions() {
    let server = TestServer::start(|_| {});
    for (query, expected) in [
        ("?protocol=6", None),
        ("?protocol=5", None),
        ("?protocol=8", Some(4007)),
        ("", Some(4008)),
        ("?protocol=x", Some(4006)),
    ] {
        let mut ws = ws_connect(server.addr, &format!("/app/{KEY}{query}"));
        let first = recv_json(&mut ws);
        match expected {
            None => assert_eq!(first["event"], "pusher:connection_established", "{query}"),
            Some(code) => {
                assert_eq!(first["event"], "pusher:error", "{query}");
                assert_eq!(first["data"]["code"], code);
                assert_eq!(recv_close(&mut ws), code);
            }
        }
    }
}

/// pusher:ping is answered with pusher:pong, exact bytes; a WebSocket ping with a pong.
#[test]
fn ping_pong() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    send_json(&mut ws, json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(recv_text(&mut ws), r#"{"event":"pusher:pong","data":"{}"}"#);
    ws.send(Message::Ping(b"abc".to_vec().into())).unwrap();
    match ws.read().unwrap() {
        Message::Pong(payload) => assert_eq!(&payload[..], b"abc"),
        other => panic!("{other:?}"),
    }
}

/// A published event reaches a subscriber as exact bytes, with data passed through verbatim.
#[test]
fn publish_exact_bytes() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    subscribe(&mut ws, "my-channel");
    let (status, body) = publish(server.addr, &["my-channel"], "my-event", r#"{"message":"hello"}"#, None);
    assert_eq!((status, body.as_str()), (200, "{}"));
    assert_eq!(recv_text(&mut ws), r#"{"event":"my-event","channel":"my-channel","data":"{\"message\":\"hello\"}"}"#);
}

/// Every subscriber on every shard receives every event; connections land on both shards.
#[test]
fn fan_out_across_shards() {
    let server = TestServer::start(|_| {});
    let mut clients: Vec<Ws> = (0..24)
        .map(|_| {
            let (mut ws, _) = connect(server.addr);
            subscribe(&mut ws, "fan");
            ws
        })
        .collect();
    let per_shard = metric(server.addr, "connections");
    assert_eq!(per_shard.iter().sum::<u64>(), 24);
    assert!(per_shard.iter().all(|&n| n > 0), "connections on both shards: {per_shard:?}");
    for i in 0..5 {
        assert_eq!(publish(server.addr, &["fan"], "tick", &i.to_string(), None).0, 200);
    }
    for ws in &mut clients {
        for i in 0..5 {
            assert_eq!(recv_json(ws)["data"], i.to_string());
        }
    }
}

/// The publisher's socket_id is excluded; other subscribers still receive.
#[test]
fn socket_id_exclusion() {
    let server = TestServer::start(|_| {});
    let (mut a, a_id) = connect(server.addr);
    let (mut b, _) = connect(server.addr);
    subscribe(&mut a, "ex");
    subscribe(&mut b, "ex");
    assert_eq!(publish(server.addr, &["ex"], "first", "1", Some(&a_id)).0, 200);
    assert_eq!(publish(server.addr, &["ex"], "second", "2", None).0, 200);
    assert_eq!(recv_json(&mut b)["event"], "first");
    assert_eq!(recv_json(&mut b)["event"], "second");
    assert_eq!(recv_json(&mut a)["event"], "second", "a never got `first`");
}

/// After unsubscribe no more events arrive; subscribing twice is answered twice.
#[test]
fn unsubscribe_and_resubscribe() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    subscribe(&mut ws, "u");
    subscribe(&mut ws, "u");
    send_json(&mut ws, json!({"event": "pusher:unsubscribe", "data": {"channel": "u"}}));
    subscribe(&mut ws, "other");
    publish(server.addr, &["u"], "gone", "1", None);
    publish(server.addr, &["other"], "here", "1", None);
    assert_eq!(recv_json(&mut ws)["event"], "here");
}

/// Private channels need a valid signature over socket_id:channel; a bad one is refused
/// with pusher:error and the connection stays up.
#[test]
fn private_channel_auth() {
    let server = TestServer::start(|_| {});
    let (mut ws, socket_id) = connect(server.addr);
    send_json(
        &mut ws,
        json!({"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": format!("{KEY}:00")}}),
    );
    let error = recv_json(&mut ws);
    assert_eq!(error["event"], "pusher:error");
    assert_eq!(error["channel"], "private-x");
    assert!(error["data"]["message"].as_str().unwrap().starts_with("Invalid signature"));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let signature = hex::encode(ring::hmac::sign(&key, format!("{socket_id}:private-x").as_bytes()).as_ref());
    send_json(
        &mut ws,
        json!({"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": format!("{KEY}:{signature}")}}),
    );
    assert_eq!(recv_json(&mut ws)["event"], "pusher_internal:subscription_succeeded");
}

/// Client events on a private channel reach the other subscribers, not the sender; on a
/// public channel they are refused.
#[test]
fn client_events() {
    let server = TestServer::start(|_| {});
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let join = || {
        let (mut ws, socket_id) = connect(server.addr);
        let signature = hex::encode(ring::hmac::sign(&key, format!("{socket_id}:private-chat").as_bytes()).as_ref());
        send_json(
            &mut ws,
            json!({"event": "pusher:subscribe", "data": {"channel": "private-chat", "auth": format!("{KEY}:{signature}")}}),
        );
        assert_eq!(recv_json(&mut ws)["event"], "pusher_internal:subscription_succeeded");
        ws
    };
    let (mut a, mut b) = (join(), join());
    send_json(&mut a, json!({"event": "client-typing", "channel": "private-chat", "data": {"who": "a"}}));
    assert_eq!(recv_text(&mut b), r#"{"event":"client-typing","channel":"private-chat","data":"{\"who\":\"a\"}"}"#);
    subscribe(&mut a, "public");
    send_json(&mut a, json!({"event": "client-x", "channel": "public", "data": {}}));
    let error = recv_json(&mut a);
    assert_eq!(error["event"], "pusher:error", "{error}");
}

/// The client's close frame is answered with a close echoing its code.
#[test]
fn close_handshake() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect(server.addr);
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).unwrap();
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(metric(server.addr, "connections").iter().sum::<u64>(), 0);
}

/// A client silent past activity_timeout is pinged, then closed with 4201.
#[test]
fn liveness_4201() {
    let server = TestServer::start(|c| {
        c.websocket.activity_timeout_s = 1;
        c.websocket.pong_timeout_s = 1;
    });
    let (mut ws, _) = connect(server.addr);
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    assert_eq!(recv_text(&mut ws), r#"{"event":"pusher:ping","data":"{}"}"#);
    assert_eq!(recv_close(&mut ws), 4201);
    assert_eq!(metric(server.addr, "liveness_closes_total").iter().sum::<u64>(), 1);
}

/// A client that never reads is closed with 4100 once its queue passes the limit, and the
/// others keep receiving.
#[test]
fn slow_consumer_4100() {
    let server = TestServer::start(|c| {
        c.websocket.write_queue_bytes_max = 256 * 1024;
        c.apps[0].event_data_bytes_max = 60_000;
    });
    let (mut slow, _) = connect(server.addr);
    subscribe(&mut slow, "flood");
    let (mut fast, _) = connect(server.addr);
    subscribe(&mut fast, "flood");
    let data = "x".repeat(50_000);
    // Lockstep: `fast` reads each event before the next is published, so only `slow` falls
    // behind: ~15 MB against kernel buffers of a few MB and a 256 KiB queue limit.
    for _ in 0..300 {
        assert_eq!(publish(server.addr, &["flood"], "big", &data, None).0, 200);
        assert_eq!(recv_json(&mut fast)["event"], "big");
    }
    assert!(metric(server.addr, "slow_consumer_closes_total").iter().sum::<u64>() >= 1);
    slow.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(recv_close(&mut slow), 4100);
}

/// Data sent in the same packet as the upgrade request is not lost.
#[test]
fn frames_pipelined_after_upgrade() {
    let server = TestServer::start(|_| {});
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = format!("GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").into_bytes();
    request.extend(masked_text(br#"{"event":"pusher:ping","data":{}}"#));
    stream.write_all(&request).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("pusher:pong") {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
    }
}

/// A masked client text frame.
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    masked_frame(0x81, payload)
}

/// A masked client frame with the given first byte.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![first];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
