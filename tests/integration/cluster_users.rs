//! Cluster mode, users and cache channels across nodes: `#server-to-user-` events,
//! `terminate_connections`, cache channels' last events (docs/cluster.md), as plain WebSocket
//! clients on three nodes sharing one redis-server see them.

use serde_json::json;

use crate::cluster::RedisServer;
use crate::cluster_nodes::{nodes, sign};
use crate::support::*;

/// Signs `ws` in as `user_data` and subscribes its `#server-to-user-` channel, as pusher-js does.
fn signin(ws: &mut Ws, socket_id: &str, user_id: &str) {
    let user_data = json!({ "id": user_id }).to_string();
    let auth = sign(&format!("{socket_id}::user::{user_data}"));
    send_json(ws, json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}));
    assert_eq!(recv_json(ws)["event"], "pusher:signin_success");
    subscribe(ws, &format!("#server-to-user-{user_id}"));
}

/// Waits until every shard of the node at `addr` reports its link down.
fn wait_all_down(addr: std::net::SocketAddr) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while crate::cluster_nodes::wait_ready(addr, 503)["cluster_link_down"] != json!([0, 1]) {
        assert!(std::time::Instant::now() < deadline, "the links stay up");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn terminate(addr: std::net::SocketAddr, user_id: &str) -> (u16, String) {
    let path = format!("/apps/{APP_ID}/users/{user_id}/terminate_connections");
    http(addr, "POST", &signed_path("POST", &path, b"{}", &[]), b"{}")
}

/// An event published to `#server-to-user-alice` on node A reaches alice's connections on A, B
/// and C as the exact frame, except the one its `socket_id` excludes (its next message is the
/// next event); bob's connection gets none of them.
#[test]
fn user_events_reach_every_node() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "user-events", 3);
    let mut alice: Vec<(Ws, String)> = nodes.iter().map(|n| connect(n.addr)).collect();
    for (ws, id) in &mut alice {
        signin(ws, id, "alice");
    }
    let (mut bob, bob_id) = connect(nodes[1].addr);
    signin(&mut bob, &bob_id, "bob");
    let excluded = alice[2].1.clone();
    let frame = |data: &str| format!(r##"{{"event":"note","channel":"#server-to-user-alice","data":"{data}"}}"##);
    assert_eq!(publish(nodes[0].addr, &["#server-to-user-alice"], "note", "one", Some(&excluded)).0, 200);
    assert_eq!(publish(nodes[1].addr, &["#server-to-user-alice"], "note", "two", None).0, 200);
    for (ws, _) in &mut alice[..2] {
        assert_eq!(recv_text(ws), frame("one"));
        assert_eq!(recv_text(ws), frame("two"));
    }
    assert_eq!(recv_text(&mut alice[2].0), frame("two"));
    assert_eq!(publish(nodes[2].addr, &["#server-to-user-bob"], "note", "b", None).0, 200);
    assert_eq!(recv_text(&mut bob), r##"{"event":"note","channel":"#server-to-user-bob","data":"b"}"##);
}

/// `terminate_connections` on node C closes alice's connections on A, B and C with the
/// single-node frames (pusher:error 4009, then close 4009), answered 200 `{}`; bob's stays
/// open. A hostile user id (over 128 bytes) is answered 200 `{}` as on a single node.
#[test]
fn terminate_connections_on_every_node() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "terminate", 3);
    let mut alice: Vec<(Ws, String)> = nodes.iter().flat_map(|n| [connect(n.addr), connect(n.addr)]).collect();
    for (ws, id) in &mut alice {
        signin(ws, id, "alice");
    }
    let (mut bob, bob_id) = connect(nodes[0].addr);
    signin(&mut bob, &bob_id, "bob");
    assert_eq!(terminate(nodes[2].addr, &"x".repeat(129)), (200, "{}".into()));
    assert_eq!(terminate(nodes[2].addr, "alice"), (200, "{}".into()));
    for (ws, _) in &mut alice {
        assert_eq!(
            recv_text(ws),
            r#"{"event":"pusher:error","data":{"code":4009,"message":"Connection terminated by the server"}}"#
        );
        assert_eq!(recv_close(ws), 4009);
    }
    assert_eq!(publish(nodes[1].addr, &["#server-to-user-bob"], "note", "still here", None).0, 200);
    assert_eq!(recv_json(&mut bob)["data"], "still here");
}

/// A gap in the bucket of a user's messages (a `terminate_connections` may be lost) closes the
/// user's signed-in connections with 4200 even when they subscribed to nothing in it; another
/// user's, in another bucket, stays.
#[test]
fn gap_in_a_user_bucket_closes_the_user() {
    use ringwire::cluster::bucket;
    use ringwire::cluster::message::Kind;

    let redis = RedisServer::start();
    let nodes = nodes(&redis, "user-gap", 2);
    let user_bucket = bucket::of_user("alice", 64);
    let other = (0..).map(|n| format!("u{n}")).find(|u| bucket::of_user(u, 64) != user_bucket).unwrap();
    let mut signed_in = Vec::new();
    for node in &nodes {
        for user in ["alice", other.as_str()] {
            let (mut ws, id) = connect(node.addr);
            let user_data = json!({ "id": user }).to_string();
            let auth = sign(&format!("{id}::user::{user_data}"));
            send_json(&mut ws, json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}));
            assert_eq!(recv_json(&mut ws)["event"], "pusher:signin_success");
            signed_in.push((user, ws));
        }
    }
    // Another node's shard, numbering its messages in alice's bucket: 1, then 3 (2 was lost).
    crate::cluster_nodes::lose_a_message(&redis, "user-gap", user_bucket, Kind::TerminateUser);
    for (user, ws) in &mut signed_in {
        if *user == "alice" {
            assert_eq!(recv_close(ws), 4200);
        }
    }
    for (user, ws) in &mut signed_in {
        if *user != "alice" {
            subscribe(ws, "still-open");
        }
    }
    // On /metrics of each node: one gap found, one connection closed for it.
    for node in &nodes {
        assert_eq!(metric(node.addr, "cluster_gaps_total").iter().sum::<u64>(), 1);
        assert_eq!(metric(node.addr, "cluster_gap_closes_total").iter().sum::<u64>(), 1);
    }
}

const CACHED: &str = r#"{"event":"price","channel":"cache-prices","data":"2"}"#;

/// Subscribes a new connection on `addr` to cache-prices; returns its first message.
fn late_subscriber(addr: std::net::SocketAddr) -> String {
    let (mut ws, _) = connect(addr);
    send_json(&mut ws, json!({"event": "pusher:subscribe", "data": {"channel": "cache-prices"}}));
    assert_eq!(recv_json(&mut ws)["event"], "pusher_internal:subscription_succeeded");
    recv_text(&mut ws)
}

/// Cache channels across nodes: cache_miss while Redis holds nothing; the last event published
/// on any node is the first message of a new subscriber on every node (exact bytes), also on a
/// node started after it was published (read from Redis); Redis keeps it with the app's
/// cache_ttl_s.
#[test]
fn cache_channels_across_nodes() {
    use ringwire::cluster::link::{Link, Reply};

    let redis = RedisServer::start();
    let nodes = nodes(&redis, "cache", 3);
    let (mut first, _) = connect(nodes[1].addr);
    subscribe(&mut first, "cache-prices");
    assert_eq!(recv_text(&mut first), r#"{"event":"pusher:cache_miss","channel":"cache-prices"}"#);
    assert_eq!(publish(nodes[0].addr, &["cache-prices"], "price", "1", None).0, 200);
    assert_eq!(publish(nodes[2].addr, &["cache-prices"], "price", "2", None).0, 200);
    assert_eq!(recv_json(&mut first)["data"], "1");
    assert_eq!(recv_text(&mut first), CACHED);
    for node in &nodes {
        // A join racing the delivery of "2" to this node may get "1", as on a single node.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let got = late_subscriber(node.addr);
            if got == CACHED {
                break;
            }
            assert!(got.contains(r#""data":"1""#) && std::time::Instant::now() < deadline, "{got}");
        }
        assert_eq!(late_subscriber(node.addr), CACHED);
    }
    let late_node = crate::cluster_nodes::node(&redis, "cache");
    for _ in 0..2 {
        assert_eq!(late_subscriber(late_node.addr), CACHED);
    }
    let key = format!("{{cache:c:{APP_ID}:cache-prices}}:cache");
    let ttl = crate::cluster::run(|| async move {
        let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        link.command(&[b"PTTL", key.as_bytes()]).await.unwrap()
    });
    assert!(matches!(ttl, Reply::Integer(ms) if ms > 3_590_000 && ms <= 3_600_000), "{ttl:?}");
}

/// A gap in a cache channel's bucket makes every node forget the event it kept for it, so the
/// next subscriber gets what Redis holds (here a newer event written there directly), not a
/// stale copy.
#[test]
fn gap_forgets_kept_cache_events() {
    use ringwire::cluster::bucket;
    use ringwire::cluster::link::Link;
    use ringwire::cluster::message::{self, Header, Kind, Sender};

    let redis = RedisServer::start();
    let nodes = nodes(&redis, "cache-gap", 2);
    assert_eq!(publish(nodes[0].addr, &["cache-prices"], "price", "1", None).0, 200);
    for node in &nodes {
        assert_eq!(late_subscriber(node.addr), r#"{"event":"price","channel":"cache-prices","data":"1"}"#);
    }
    // Another node's message numbered 2 first (1 was lost), which Redis also keeps as the last
    // event, as a publishing node does in its transaction.
    crate::cluster::run(|| async {
        let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        let header = Header {
            kind: Kind::Publication,
            sender: Sender { incarnation: 0x5eed, shard: 0 },
            sequence: 2,
            node_id: "elsewhere",
            app_id: APP_ID,
            channel: "cache-prices",
            user_id: "",
            exclude: None,
        };
        let text = CACHED.as_bytes();
        let frame = [&[0x81, text.len() as u8][..], text].concat();
        let mut payload = Vec::new();
        message::encode(&header, &frame, &mut payload).unwrap();
        let key = format!("{{cache-gap:c:{APP_ID}:cache-prices}}:cache");
        link.command(&[b"SET", key.as_bytes(), &payload, b"PX", b"60000"]).await.unwrap();
        // The bucket's gap, without a delivery: a payload that is not a message.
        let mut channel = String::new();
        bucket::channel_name("cache-gap", APP_ID, bucket::of_channel("cache-prices", 64), &mut channel);
        link.command(&[b"SPUBLISH", channel.as_bytes(), b"not a message"]).await.unwrap();
    });
    // The gap is handled on the bucket's shard; a subscriber then reads Redis. One that joins
    // while the gap is being handled may be closed with 4200 or get the old copy: try again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for node in &nodes {
        loop {
            let (mut ws, _) = connect(node.addr);
            send_json(&mut ws, json!({"event": "pusher:subscribe", "data": {"channel": "cache-prices"}}));
            let mut first_event = || loop {
                match ws.read().expect("a message or the close") {
                    tungstenite::Message::Text(text) if text.contains("subscription_succeeded") => continue,
                    other => return other,
                }
            };
            match first_event() {
                tungstenite::Message::Text(text) if text.as_str() == CACHED => break,
                other => assert!(std::time::Instant::now() < deadline, "still {other:?}"),
            }
        }
    }
}

/// While the node's link to Redis is down, a cache channel subscribe is closed with 4200 (its
/// last event may be in Redis only; pusher-js reconnects, to a healthy node behind a load
/// balancer) instead of a cache_miss that may be wrong.
#[test]
fn cache_subscribe_during_outage_closes_4200() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, "cache-outage", 1);
    let (mut ws, _) = connect(nodes[0].addr);
    redis.kill();
    wait_all_down(nodes[0].addr);
    send_json(&mut ws, json!({"event": "pusher:subscribe", "data": {"channel": "cache-prices"}}));
    assert_eq!(recv_close(&mut ws), 4200);
}

/// While the node's link to Redis is down, a WebSocket upgrade is answered 503 with a JSON
/// reason (a load balancer or pusher-js tries again, elsewhere), and so is
/// `terminate_connections`; once the link is back, upgrades are accepted again.
#[test]
fn upgrades_refused_503_while_the_link_is_down() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, "upgrade", 1);
    redis.kill();
    wait_all_down(nodes[0].addr);
    let request = format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (status, body) = raw_http(nodes[0].addr, request.as_bytes());
    assert_eq!((status, body.as_str()), (503, r#"{"error":"cluster unavailable, retry","status":503}"#));
    // terminate_connections cannot reach the other nodes either: 503, so the backend retries.
    let (status, body) = terminate(nodes[0].addr, "alice");
    assert_eq!((status, body.as_str()), (503, r#"{"error":"cluster unavailable, retry","status":503}"#));
    redis.restart();
    crate::cluster_nodes::wait_ready(nodes[0].addr, 200);
    connect(nodes[0].addr);
}

/// Senders write their last numbers again after every reconnect: after Redis restarted empty,
/// a node whose first connect comes after the restart knows node A's senders, so A's next
/// publish is no gap there (no 4200, `ringwire_cluster_gaps_total` stays 0).
#[test]
fn new_node_after_redis_restart_sees_no_spurious_gap() {
    let mut redis = RedisServer::start();
    let a = crate::cluster_nodes::node(&redis, "rehset");
    // Enough publishes that each of A's shards (connections land on either) numbers some.
    for n in 0..20 {
        assert_eq!(publish(a.addr, &["my-channel"], "my-event", &n.to_string(), None).0, 200);
    }
    redis.kill();
    wait_all_down(a.addr);
    redis.restart();
    crate::cluster_nodes::wait_ready(a.addr, 200);
    let late = crate::cluster_nodes::node(&redis, "rehset");
    let (mut ws, _) = connect(late.addr);
    subscribe(&mut ws, "my-channel");
    for n in 0..4 {
        assert_eq!(publish(a.addr, &["my-channel"], "my-event", &n.to_string(), None).0, 200);
        assert_eq!(recv_text(&mut ws), crate::cluster_nodes::event(&n.to_string()));
    }
    assert_eq!(metric(late.addr, "cluster_gaps_total").iter().sum::<u64>(), 0);
}

/// A node configured with another `cluster.buckets` than the nodes already sharing its Redis
/// and prefix refuses to start, with an error naming the key and both values; one with the
/// same value starts.
#[test]
fn other_buckets_refuse_to_start() {
    let redis = RedisServer::start();
    let _first = crate::cluster_nodes::node(&redis, "buckets");
    let mut config = ringwire::config::Config::default();
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.cluster.redis_url = Some(format!("redis://{}", redis.addr));
    config.cluster.prefix = "buckets".into();
    config.cluster.buckets = 32;
    let error = ringwire::server::Server::start(config.clone()).err().expect("refused").to_string();
    assert!(error.contains("cluster.buckets is 32 here") && error.contains("use 64"), "{error}");
    config.cluster.buckets = 64;
    let same = ringwire::server::Server::start(config).expect("the same buckets start");
    same.shutdown();
    same.join();
}

/// `[[apps]]` reload in cluster mode: an app added on two nodes is served at once (nothing
/// reported as needing a restart), its buckets are subscribed on every shard before its first
/// client is accepted, so an event published for it on node A reaches its subscribers on node
/// B; the existing app's subscriber stays connected and keeps receiving.
#[test]
fn apps_added_by_reload_reach_every_node() {
    use ringwire::config::AppConfig;

    let redis = RedisServer::start();
    let mut configs = Vec::new();
    let nodes: Vec<TestServer> = (0..2)
        .map(|_| {
            let url = format!("redis://{}", redis.addr);
            let server = TestServer::start(|c| {
                c.cluster.redis_url = Some(url);
                c.cluster.prefix = "reload".into();
                configs.push(c.clone());
            });
            crate::cluster_nodes::wait_ready(server.addr, 200);
            server
        })
        .collect();
    let (mut stay, _) = connect(nodes[1].addr);
    subscribe(&mut stay, "my-channel");
    let b = AppConfig { id: "b".into(), key: "key-b".into(), secret: "secret-b".into(), ..AppConfig::demo() };
    for (node, config) in nodes.iter().zip(&mut configs) {
        config.apps.push(b.clone());
        let reloaded = node.server().reload(config).expect("reloaded");
        assert!(reloaded.apps && reloaded.needs_restart.is_empty(), "{:?}", reloaded.needs_restart);
    }
    let mut subscribers: Vec<Ws> = (0..4)
        .map(|_| {
            let mut ws = ws_connect(nodes[1].addr, "/app/key-b?protocol=7");
            assert_eq!(recv_json(&mut ws)["event"], "pusher:connection_established");
            subscribe(&mut ws, "b-channel");
            ws
        })
        .collect();
    let body = json!({"name": "hello", "channels": ["b-channel"], "data": "for b"}).to_string();
    let path = "/apps/b/events";
    let query = ringwire::pusher::auth::signed_query("POST", path, "key-b", "secret-b", body.as_bytes(), now(), &[]);
    assert_eq!(http(nodes[0].addr, "POST", &format!("{path}?{query}"), body.as_bytes()).0, 200);
    for ws in &mut subscribers {
        assert_eq!(recv_text(ws), r#"{"event":"hello","channel":"b-channel","data":"for b"}"#);
    }
    assert_eq!(publish(nodes[0].addr, &["my-channel"], "my-event", "1", None).0, 200);
    assert_eq!(recv_text(&mut stay), crate::cluster_nodes::event("1"));
}

/// A reload that adds an app while the node's link to Redis is down changes nothing and says
/// why (its buckets cannot be subscribed); the app's key is still refused.
#[test]
fn apps_reload_refused_while_the_link_is_down() {
    use ringwire::config::AppConfig;

    let mut redis = RedisServer::start();
    let url = format!("redis://{}", redis.addr);
    let mut config = None;
    let node = TestServer::start(|c| {
        c.cluster.redis_url = Some(url);
        c.cluster.prefix = "reload-down".into();
        config = Some(c.clone());
    });
    crate::cluster_nodes::wait_ready(node.addr, 200);
    redis.kill();
    wait_all_down(node.addr);
    let mut config = config.unwrap();
    config.apps.push(AppConfig { id: "b".into(), key: "key-b".into(), secret: "secret-b".into(), ..AppConfig::demo() });
    let error = node.server().reload(&config).expect_err("refused");
    assert!(error.contains("link to redis is down") && error.contains("not reloaded"), "{error}");
    redis.restart();
    crate::cluster_nodes::wait_ready(node.addr, 200);
    let mut ws = ws_connect(node.addr, "/app/key-b?protocol=7");
    assert_eq!(recv_json(&mut ws)["data"]["code"], 4001);
}

/// presence-cache channels across nodes: a member joining on node B gets its member list, then
/// the event published on node A (read from Redis by B, which never saw it: it started after).
#[test]
fn presence_cache_across_nodes() {
    let redis = RedisServer::start();
    let a = crate::cluster_nodes::node(&redis, "presence-cache");
    assert_eq!(publish(a.addr, &["presence-cache-room"], "state", "s1", None).0, 200);
    let b = crate::cluster_nodes::node(&redis, "presence-cache");
    let (mut ws, id) = connect(b.addr);
    let channel_data = json!({"user_id": "9"}).to_string();
    let auth = sign(&format!("{id}:presence-cache-room:{channel_data}"));
    let data = json!({"channel": "presence-cache-room", "auth": auth, "channel_data": channel_data});
    send_json(&mut ws, json!({"event": "pusher:subscribe", "data": data}));
    let succeeded = recv_json(&mut ws);
    assert_eq!(succeeded["event"], "pusher_internal:subscription_succeeded", "{succeeded}");
    assert_eq!(recv_text(&mut ws), r#"{"event":"state","channel":"presence-cache-room","data":"s1"}"#);
}

/// Clients joining one cache channel at once on a node that holds no event for it cause one
/// read of `{k}:cache`, not one each (a reconnect storm after a gap): Redis, paused while ten
/// joins arrive, counts one `GET`; all ten get the event.
#[test]
fn concurrent_cache_joins_read_redis_once() {
    use ringwire::cluster::link::{Link, Reply};

    let redis = RedisServer::start();
    let a = crate::cluster_nodes::node(&redis, "cache-storm");
    assert_eq!(publish(a.addr, &["cache-prices"], "price", "2", None).0, 200);
    let late = crate::cluster_nodes::node(&redis, "cache-storm");
    let mut clients: Vec<Ws> = (0..10).map(|_| connect(late.addr).0).collect();
    let command = |args: &'static [&'static [u8]]| {
        crate::cluster::run(|| async move {
            let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
            link.command(args).await.unwrap()
        })
    };
    command(&[b"CONFIG", b"RESETSTAT"]);
    command(&[b"CLIENT", b"PAUSE", b"300", b"ALL"]);
    for ws in &mut clients {
        send_json(ws, json!({"event": "pusher:subscribe", "data": {"channel": "cache-prices"}}));
    }
    for ws in &mut clients {
        assert_eq!(recv_json(ws)["event"], "pusher_internal:subscription_succeeded");
        assert_eq!(recv_text(ws), CACHED);
    }
    let Reply::BulkString(stats) = command(&[b"INFO", b"commandstats"]) else { panic!("INFO answered no text") };
    let stats = String::from_utf8_lossy(&stats);
    assert!(stats.contains("cmdstat_get:calls=1,"), "{stats}");
}
