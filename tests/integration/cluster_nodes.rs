//! Cluster mode end to end: several in-process nodes (2 shards each, their own ports) sharing
//! one real redis-server; exact wire messages at clients of every node (docs/cluster.md).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ringwire::cluster::bucket;
use ringwire::cluster::link::Link;
use ringwire::cluster::message::{self, Header, Kind, Sender};

use crate::cluster::{options, run, RedisServer};
use crate::support::*;

/// A node of the cluster on `redis`, keys under `prefix`; returns once its links are up. The
/// command timeout (the heartbeat's bound) is the default's: shorter ones flapped links on a
/// loaded test machine; tests of a silent Redis set their own.
pub(crate) fn node(redis: &RedisServer, prefix: &str) -> TestServer {
    node_with(redis, prefix, |_| {})
}

/// `node`, with the test's `change` to its config applied last.
pub(crate) fn node_with(redis: &RedisServer, prefix: &str, change: impl FnOnce(&mut ringwire::Config)) -> TestServer {
    let url = format!("redis://{}", redis.addr);
    let prefix = prefix.to_string();
    let server = TestServer::start(move |c| {
        c.cluster.redis_url = Some(url);
        c.cluster.prefix = prefix;
        c.cluster.command_timeout_ms = 2000;
        c.cluster.connect_timeout_ms = 500;
        change(c);
    });
    wait_ready(server.addr, 200);
    server
}

/// Another node's shard sends two empty `kind` messages into `bucket` of the keys under
/// `prefix`, numbered 1 and then 3: message 2 looks lost to every node (a gap).
pub(crate) fn lose_a_message(redis: &RedisServer, prefix: &str, bucket: u16, kind: Kind) {
    let prefix = prefix.to_string();
    run(|| async move {
        let mut link = Link::connect(redis.addr, &options()).await.unwrap();
        let mut channel = String::new();
        bucket::channel_name(&prefix, APP_ID, bucket, &mut channel);
        for sequence in [1, 3] {
            let header = Header {
                kind,
                sender: Sender { incarnation: 0x5eed, shard: 0 },
                sequence,
                node_id: "elsewhere",
                app_id: APP_ID,
                channel: "",
                user_id: "nobody",
                exclude: None,
            };
            let mut payload = Vec::new();
            message::encode(&header, b"", &mut payload).unwrap();
            link.command(&[b"SPUBLISH", channel.as_bytes(), &payload]).await.unwrap();
        }
    });
}

pub(crate) fn nodes(redis: &RedisServer, prefix: &str, count: usize) -> Vec<TestServer> {
    (0..count).map(|_| node(redis, prefix)).collect()
}

/// Polls `/ready` until it answers `status`; returns the body.
pub(crate) fn wait_ready(addr: SocketAddr, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = http(addr, "GET", "/ready", b"");
        if got == status {
            return serde_json::from_str(&body).unwrap();
        }
        assert!(Instant::now() < deadline, "/ready stayed {got} {body}, not {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn sign(to_sign: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    format!("{KEY}:{}", hex::encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref()))
}

pub(crate) fn event(data: &str) -> String {
    format!(r#"{{"event":"my-event","channel":"my-channel","data":"{}"}}"#, data.replace('"', "\\\""))
}

/// Subscribers on every node, two each, so both shards of a node are likely covered.
pub(crate) fn subscribers(nodes: &[TestServer], channel: &str) -> Vec<Ws> {
    let mut all = Vec::new();
    for node in nodes {
        for _ in 0..2 {
            let (mut ws, _) = connect(node.addr);
            subscribe(&mut ws, channel);
            all.push(ws);
        }
    }
    all
}

/// An API publish on node A reaches subscribers on A, B and C as the exact frame, once each
/// (the next publish is the next message), and is answered 200 `{}`.
#[test]
fn publish_reaches_every_node() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "fanout", 3);
    let mut subscribers = subscribers(&nodes, "my-channel");
    for n in 0..2 {
        let data = format!(r#"{{"n":{n}}}"#);
        let (status, body) = publish(nodes[0].addr, &["my-channel"], "my-event", &data, None);
        assert_eq!((status, body.as_str()), (200, "{}"));
        for ws in &mut subscribers {
            assert_eq!(recv_text(ws), event(&data));
        }
    }
}

/// `socket_id` exclusion works across nodes: the excluded connection (on B) misses the event,
/// the others on B and C get it; its next message is the following event.
#[test]
fn exclusion_across_nodes() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "exclude", 3);
    let (mut excluded, excluded_id) = connect(nodes[1].addr);
    subscribe(&mut excluded, "my-channel");
    let mut others = subscribers(&nodes[1..], "my-channel");
    let (status, _) = publish(nodes[0].addr, &["my-channel"], "my-event", r#""first""#, Some(&excluded_id));
    assert_eq!(status, 200);
    let (status, _) = publish(nodes[0].addr, &["my-channel"], "my-event", r#""second""#, None);
    assert_eq!(status, 200);
    for ws in &mut others {
        assert_eq!(recv_text(ws), event(r#""first""#));
        assert_eq!(recv_text(ws), event(r#""second""#));
    }
    assert_eq!(recv_text(&mut excluded), event(r#""second""#));
}

/// 200 events from one publisher, each sent after the previous answer and spread over the
/// three nodes' APIs, arrive in that order at subscribers on every node.
#[test]
fn order_of_one_publisher() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "order", 3);
    let mut subscribers = subscribers(&nodes, "my-channel");
    for n in 0..200 {
        let (status, _) = publish(nodes[n % 3].addr, &["my-channel"], "my-event", &n.to_string(), None);
        assert_eq!(status, 200);
    }
    for ws in &mut subscribers {
        for n in 0..200 {
            assert_eq!(recv_text(ws), event(&n.to_string()));
        }
    }
}

/// Client events are relayed to the channel's other subscribers on every node, not back to
/// the sender; on presence channels with the sender's user_id.
#[test]
fn client_events_across_nodes() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "client", 3);
    let mut sockets: Vec<(Ws, String)> = nodes.iter().map(|n| connect(n.addr)).collect();
    for (ws, id) in &mut sockets {
        let auth = sign(&format!("{id}:private-chat"));
        send_json(ws, json!({"event": "pusher:subscribe", "data": {"channel": "private-chat", "auth": auth}}));
        assert_eq!(recv_json(ws)["event"], "pusher_internal:subscription_succeeded");
    }
    send_json(&mut sockets[0].0, json!({"event": "client-typing", "channel": "private-chat", "data": {"who": "a"}}));
    for (ws, _) in &mut sockets[1..] {
        assert_eq!(recv_text(ws), r#"{"event":"client-typing","channel":"private-chat","data":"{\"who\":\"a\"}"}"#);
    }
    // The sender's next message is the API event that follows, not its own client event.
    subscribe(&mut sockets[0].0, "my-channel");
    assert_eq!(publish(nodes[2].addr, &["my-channel"], "my-event", "1", None).0, 200);
    assert_eq!(recv_text(&mut sockets[0].0), event("1"));

    for (index, (ws, id)) in sockets.iter_mut().enumerate().take(2) {
        let user_id = (7 + index).to_string();
        let channel_data = json!({"user_id": user_id}).to_string();
        let auth = sign(&format!("{id}:presence-chat:{channel_data}"));
        let data = json!({"channel": "presence-chat", "auth": auth, "channel_data": channel_data});
        send_json(ws, json!({"event": "pusher:subscribe", "data": data}));
        assert_eq!(recv_json(ws)["event"], "pusher_internal:subscription_succeeded");
    }
    // Presence is cluster-wide: the member on node B is announced on node A.
    assert_eq!(
        recv_text(&mut sockets[0].0),
        r#"{"event":"pusher_internal:member_added","channel":"presence-chat","data":"{\"user_id\":\"8\",\"user_info\":null}"}"#
    );
    send_json(&mut sockets[1].0, json!({"event": "client-wave", "channel": "presence-chat", "data": {"hi": 1}}));
    assert_eq!(
        recv_text(&mut sockets[0].0),
        r#"{"event":"client-wave","channel":"presence-chat","data":"{\"hi\":1}","user_id":"8"}"#
    );
}

/// Redis killed: node A's /ready answers 503 naming the shards whose link is down, and its
/// publishes 503 with a JSON reason (never a 200 for an event nobody can get); a client event
/// is answered with `pusher:error` instead of vanishing. Redis back
/// (empty): the links come back, /ready 200; a new subscriber on B gets A's publishes again.
/// Node B's old subscriber missed nothing (every publish of the outage was refused): it gets
/// them too, unless B's barrier ran before A wrote its numbers again, when the lost hash looks
/// like a gap and it is closed with 4200 (loud, never silent).
#[test]
fn redis_outage_and_return() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, "outage", 2);
    let (mut old, _) = connect(nodes[1].addr);
    subscribe(&mut old, "my-channel");
    assert_eq!(publish(nodes[0].addr, &["my-channel"], "my-event", "1", None).0, 200);
    assert_eq!(recv_text(&mut old), event("1"));
    let (mut sender, sender_id) = connect(nodes[0].addr);
    let auth = sign(&format!("{sender_id}:private-chat"));
    send_json(&mut sender, json!({"event": "pusher:subscribe", "data": {"channel": "private-chat", "auth": auth}}));
    assert_eq!(recv_json(&mut sender)["event"], "pusher_internal:subscription_succeeded");

    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = wait_ready(nodes[0].addr, 503);
        assert_eq!((body["ready"].clone(), body["reason"].clone()), (json!(false), json!("redis link down")));
        if body["cluster_link_down"] == json!([0, 1]) {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..4 {
        let (status, body) = publish(nodes[0].addr, &["my-channel"], "my-event", "2", None);
        assert_eq!((status, body.as_str()), (503, r#"{"error":"cluster unavailable, retry","status":503}"#));
    }
    send_json(&mut sender, json!({"event": "client-typing", "channel": "private-chat", "data": {}}));
    assert_eq!(
        recv_text(&mut sender),
        r#"{"event":"pusher:error","channel":"private-chat","data":{"code":null,"message":"client event not relayed: cluster unavailable, retry"}}"#
    );

    redis.restart();
    wait_ready(nodes[0].addr, 200);
    wait_ready(nodes[1].addr, 200);
    let (mut new, _) = connect(nodes[1].addr);
    subscribe(&mut new, "my-channel");
    assert_eq!(publish(nodes[0].addr, &["my-channel"], "my-event", "3", None).0, 200);
    assert_eq!(recv_text(&mut new), event("3"));
    match old.read().expect("a message or the close") {
        tungstenite::Message::Text(text) => assert_eq!(text.as_str(), event("3")),
        tungstenite::Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4200),
        other => panic!("{other:?}"),
    }
}

/// A channel whose bucket differs from `channel`'s (for 64 buckets).
pub(crate) fn other_bucket_channel(channel: &str) -> String {
    let taken = bucket::of_channel(channel, 64);
    (0..).map(|n| format!("other-{n}")).find(|c| bucket::of_channel(c, 64) != taken).unwrap()
}

/// A sender whose numbers jump in a bucket (a message was lost) makes every node close its
/// subscribers of that bucket's channels with 4200; a subscriber of another bucket stays.
#[test]
fn gap_closes_the_bucket_with_4200() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "gap", 2);
    let mut affected = subscribers(&nodes, "my-channel");
    let other = other_bucket_channel("my-channel");
    let mut unaffected = subscribers(&nodes, &other);
    let frame = |text: &str| [&[0x81, text.len() as u8][..], text.as_bytes()].concat();
    // Another node's shard, numbering its messages in the bucket: 1, then 3 (2 was lost).
    run(|| async {
        let mut link = Link::connect(redis.addr, &options()).await.unwrap();
        let mut channel = String::new();
        bucket::channel_name("gap", APP_ID, bucket::of_channel("my-channel", 64), &mut channel);
        for sequence in [1, 3] {
            let header = Header {
                kind: Kind::Publication,
                sender: Sender { incarnation: 0x5eed, shard: 0 },
                sequence,
                node_id: "elsewhere",
                app_id: APP_ID,
                channel: "my-channel",
                user_id: "",
                exclude: None,
            };
            let mut payload = Vec::new();
            message::encode(&header, &frame(&event(&sequence.to_string())), &mut payload).unwrap();
            link.command(&[b"SPUBLISH", channel.as_bytes(), &payload]).await.unwrap();
        }
    });
    for ws in &mut affected {
        assert_eq!(recv_text(ws), event("1"));
        assert_eq!(recv_close(ws), 4200);
    }
    assert_eq!(publish(nodes[0].addr, &[&other], "my-event", "2", None).0, 200);
    let expected = format!(r#"{{"event":"my-event","channel":"{other}","data":"2"}}"#);
    for ws in &mut unaffected {
        assert_eq!(recv_text(ws), expected);
    }
}

/// Publish-to-delivery latency through the API, single node against two nodes on one Redis (a
/// measurement, not an assertion):
/// `cargo test --release --test integration cluster_nodes::latency -- --ignored --nocapture`.
#[test]
#[ignore]
fn latency() {
    let redis = RedisServer::start();
    let single = TestServer::start(|_| {});
    let pair = nodes(&redis, "latency", 2);
    for (name, publisher, subscriber) in
        [("single node", single.addr, single.addr), ("node A -> node B", pair[0].addr, pair[1].addr)]
    {
        let (mut ws, _) = connect(subscriber);
        subscribe(&mut ws, "my-channel");
        let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for n in 0..2000 {
            let start = Instant::now();
            assert_eq!(publish(publisher, &["my-channel"], "my-event", &n.to_string(), None).0, 200);
            assert_eq!(recv_text(&mut ws), event(&n.to_string()));
            histogram.record(start.elapsed().as_micros() as u64).unwrap();
        }
        let (p50, p99) = (histogram.value_at_quantile(0.5), histogram.value_at_quantile(0.99));
        println!("{name}: publish answered and delivered, p50 {p50} us, p99 {p99} us");
    }
}
