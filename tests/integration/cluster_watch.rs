//! Cluster mode, watchlists and cluster-wide limits (docs/cluster.md): online/offline decided
//! once cluster-wide by a Redis script, app `max_connections` and
//! `backend_events_per_second_max` counted over every node, as plain WebSocket clients and
//! HTTP publishers on several nodes sharing one redis-server see them.

use serde_json::json;

use crate::cluster::RedisServer;
use crate::cluster_nodes::{nodes, sign};
use crate::support::*;

/// Signs `ws` in with `user_data` (raw JSON).
fn signin(ws: &mut Ws, socket_id: &str, user_data: &str) {
    let auth = sign(&format!("{socket_id}::user::{user_data}"));
    send_json(ws, json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}));
    assert_eq!(recv_json(ws)["event"], "pusher:signin_success");
}

/// The exact frame of one watchlist event, as on a single node.
fn watchlist(name: &str, user_id: &str) -> String {
    format!(
        r#"{{"event":"pusher_internal:watchlist_events","data":"{{\"events\":[{{\"name\":\"{name}\",\"user_ids\":[\"{user_id}\"]}}]}}"}}"#
    )
}

/// A user signed in on one node is `online` for watchers on the others: at their sign-in when
/// already online (carol, read from Redis), when the first connection anywhere arrives
/// (alice); a second connection elsewhere is no news, and `offline` comes only when the last
/// connection anywhere leaves. Each watcher hears each change once (checked by the next event
/// being about another user).
#[test]
fn watchlist_online_offline_across_nodes() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "watch", 3);
    let (mut carol, carol_id) = connect(nodes[2].addr);
    signin(&mut carol, &carol_id, r#"{"id":"carol"}"#);
    let mut watchers: Vec<Ws> = Vec::new();
    for node in &nodes[..2] {
        let (mut ws, id) = connect(node.addr);
        signin(&mut ws, &id, r#"{"id":"bob","watchlist":["alice","carol","zed"]}"#);
        assert_eq!(recv_text(&mut ws), watchlist("online", "carol"));
        watchers.push(ws);
    }
    let (mut alice_a, alice_a_id) = connect(nodes[0].addr);
    signin(&mut alice_a, &alice_a_id, r#"{"id":"alice"}"#);
    for ws in &mut watchers {
        assert_eq!(recv_text(ws), watchlist("online", "alice"));
    }
    let (mut alice_c, alice_c_id) = connect(nodes[2].addr);
    signin(&mut alice_c, &alice_c_id, r#"{"id":"alice"}"#);
    // Node C's part is decided before A's leaves (else alice would really be offline a moment).
    wait_nodes_holding(&redis, "watch", "alice", 2);
    drop(alice_a);
    // zed's sign-in is the marker: nothing about alice comes before it.
    let (mut zed, zed_id) = connect(nodes[1].addr);
    signin(&mut zed, &zed_id, r#"{"id":"zed"}"#);
    for ws in &mut watchers {
        assert_eq!(recv_text(ws), watchlist("online", "zed"));
    }
    drop(alice_c);
    for ws in &mut watchers {
        assert_eq!(recv_text(ws), watchlist("offline", "alice"));
    }
    drop(carol);
    for ws in &mut watchers {
        assert_eq!(recv_text(ws), watchlist("offline", "carol"));
    }
    // A watcher that signs in after alice left hears nothing about her, only zed's online.
    let (mut late, late_id) = connect(nodes[2].addr);
    signin(&mut late, &late_id, r#"{"id":"late","watchlist":["alice","zed"]}"#);
    assert_eq!(recv_text(&mut late), watchlist("online", "zed"));
}

/// A gap in the bucket of a watched user's messages (an `offline` may be lost) closes the
/// watchers with 4200, also when their own user and channels are in other buckets; a
/// connection watching a user of another bucket stays.
#[test]
fn gap_in_a_watched_user_bucket_closes_the_watchers() {
    use ringwire::cluster::bucket;
    use ringwire::cluster::message::Kind;

    let redis = RedisServer::start();
    let nodes = nodes(&redis, "watch-gap", 2);
    let watched = bucket::of_user("alice", 64);
    let other = |not: &[u16]| (0..).map(|n| format!("u{n}")).find(|u| !not.contains(&bucket::of_user(u, 64))).unwrap();
    let watcher_user = other(&[watched]);
    let elsewhere = other(&[watched, bucket::of_user(&watcher_user, 64)]);
    let mut watching = Vec::new();
    let mut staying = Vec::new();
    for node in &nodes {
        let (mut ws, id) = connect(node.addr);
        signin(&mut ws, &id, &json!({"id": watcher_user, "watchlist": ["alice"]}).to_string());
        watching.push(ws);
        let (mut ws, id) = connect(node.addr);
        signin(&mut ws, &id, &json!({"id": watcher_user, "watchlist": [elsewhere]}).to_string());
        staying.push(ws);
    }
    // Another node's shard, numbering its messages in alice's bucket: 1, then 3 (2 was lost).
    crate::cluster_nodes::lose_a_message(&redis, "watch-gap", watched, Kind::TerminateUser);
    for ws in &mut watching {
        assert_eq!(recv_close(ws), 4200);
    }
    for ws in &mut staying {
        subscribe(ws, "still-open");
    }
}

/// A user's last connection leaves while its node is cut off from Redis: the `offline` that
/// could not run then runs when the node's link is back, so a watcher on another node hears
/// `offline` once (not never).
#[test]
fn offline_decided_after_the_link_is_back() {
    use crate::cluster_faults::{node_on, Proxy};
    use crate::cluster_nodes::wait_ready;

    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr);
    let a = node_on(format!("redis://{}", redis.addr), "watch-cut");
    let b = node_on(format!("redis://{}", proxy.addr), "watch-cut");
    wait_ready(a.addr, 200);
    wait_ready(b.addr, 200);
    let (mut bob, bob_id) = connect(a.addr);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice"]}"#);
    let (mut alice, alice_id) = connect(b.addr);
    signin(&mut alice, &alice_id, r#"{"id":"alice"}"#);
    assert_eq!(recv_text(&mut bob), watchlist("online", "alice"));
    proxy.cut();
    wait_ready(b.addr, 503);
    drop(alice);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while metric(b.addr, "connections").iter().sum::<u64>() > 0 {
        assert!(std::time::Instant::now() < deadline, "alice's connection stays open");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    proxy.heal();
    wait_ready(b.addr, 200);
    assert_eq!(recv_text(&mut bob), watchlist("offline", "alice"));
}

/// A cluster node on `redis` with the demo app's config changed by `app`.
fn limited_node(redis: &RedisServer, prefix: &str, app: fn(&mut ringwire::config::AppConfig)) -> TestServer {
    let url = format!("redis://{}", redis.addr);
    let prefix = prefix.to_string();
    let server = TestServer::start(move |c| {
        c.cluster.redis_url = Some(url);
        c.cluster.prefix = prefix;
        app(&mut c.apps[0]);
    });
    crate::cluster_nodes::wait_ready(server.addr, 200);
    server
}

/// The `{prefix}:a:{app}:conns` entries as (connections, Redis ms) per node.
fn conns_entries(redis: &RedisServer, prefix: &str) -> Vec<(u64, u64)> {
    use ringwire::cluster::link::{Link, Reply};
    let key = format!("{prefix}:a:{APP_ID}:conns");
    let reply = crate::cluster::run(|| async move {
        let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        link.command(&[b"HVALS", key.as_bytes()]).await.unwrap()
    });
    let Reply::Array(values) = reply else { panic!("{reply:?}") };
    let text = |v: &Reply| match v {
        Reply::BulkString(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    };
    let entry = |t: String| t.split_once(':').map(|(c, at)| (c.parse().unwrap(), at.parse().unwrap())).unwrap();
    values.iter().map(text).map(entry).collect()
}

/// Connects to `addr`: true when refused with Pusher's over-quota error (exact), then close
/// 4004; false when admitted (the connection is closed again).
fn refused_over_quota(addr: std::net::SocketAddr) -> bool {
    let mut ws = ws_connect(addr, &format!("/app/{KEY}?protocol=7"));
    let first = recv_text(&mut ws);
    if first.contains("pusher:connection_established") {
        return false;
    }
    assert_eq!(
        first,
        r#"{"event":"pusher:error","data":{"code":4004,"message":"Application is over connection quota"}}"#
    );
    assert_eq!(recv_close(&mut ws), 4004);
    true
}

/// `max_connections` 4 across two nodes: with 3 connections on A, B admits one and refuses the
/// next with 4004 once it has read A's count (refreshed every second); when A's connections
/// close, B admits again after the next refresh.
#[test]
fn max_connections_across_nodes() {
    let redis = RedisServer::start();
    let a = limited_node(&redis, "conns", |app| app.max_connections = 4);
    let b = limited_node(&redis, "conns", |app| app.max_connections = 4);
    let on_a: Vec<(Ws, String)> = (0..3).map(|_| connect(a.addr)).collect();
    // B has read A's 3 when B's entry was written after A's entry with 3 (same script).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let entries = conns_entries(&redis, "conns");
        let a_at = entries.iter().find(|(count, _)| *count == 3).map(|e| e.1);
        if a_at.is_some_and(|a_at| entries.iter().any(|&(count, at)| count == 0 && at > a_at)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _fourth = connect(b.addr);
    assert!(refused_over_quota(b.addr), "a fifth connection was admitted on B");
    drop(on_a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while refused_over_quota(b.addr) {
        assert!(std::time::Instant::now() < deadline, "B keeps refusing after A's connections closed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A signed batch of `count` events on `channel`.
fn batch(addr: std::net::SocketAddr, count: usize) -> (u16, String) {
    let events: Vec<_> = (0..count).map(|n| json!({"name": "e", "channel": "rated", "data": n.to_string()})).collect();
    let body = json!({ "batch": events }).to_string();
    let path = format!("/apps/{APP_ID}/batch_events");
    http(addr, "POST", &signed_path("POST", &path, body.as_bytes(), &[]), body.as_bytes())
}

/// `backend_events_per_second_max` 5 through two nodes: within one second 3 events on A are
/// admitted, 3 more on B refused with 429 and a JSON reason, 2 on B admitted, 1 more on A
/// refused (exact: refused events are not counted).
#[test]
fn backend_events_per_second_across_nodes() {
    let redis = RedisServer::start();
    let a = limited_node(&redis, "rate", |app| app.backend_events_per_second_max = 5);
    let b = limited_node(&redis, "rate", |app| app.backend_events_per_second_max = 5);
    let over = r#"{"error":"over this app's limit of 5 events per second","status":429}"#;
    for _attempt in 0..5 {
        // Start early in a second, so the four requests likely share it (else try again).
        while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_millis() > 100 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let second = now();
        let got = [batch(a.addr, 3), batch(b.addr, 3), batch(b.addr, 2), batch(a.addr, 1)];
        if now() != second {
            continue;
        }
        assert_eq!(got, [(200, "{}".into()), (429, over.into()), (200, "{}".into()), (429, over.into())]);
        return;
    }
    panic!("no second held the four requests");
}

/// Redis restarted empty (its online hash is gone): the barrier's gap in the online user's
/// bucket closes her connection and her watchers with 4200, so nobody keeps a state Redis lost;
/// signed in again, she is online for a new watcher on the other node.
#[test]
fn redis_restart_closes_online_users_and_watchers() {
    use crate::cluster_nodes::wait_ready;

    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, "watch-restart", 2);
    let (mut alice, alice_id) = connect(nodes[0].addr);
    signin(&mut alice, &alice_id, r#"{"id":"alice"}"#);
    let (mut bob, bob_id) = connect(nodes[1].addr);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice"]}"#);
    assert_eq!(recv_text(&mut bob), watchlist("online", "alice"));
    redis.restart();
    assert_eq!(recv_close(&mut alice), 4200);
    assert_eq!(recv_close(&mut bob), 4200);
    for node in &nodes {
        wait_ready(node.addr, 200);
    }
    let (mut alice, alice_id) = connect(nodes[0].addr);
    signin(&mut alice, &alice_id, r#"{"id":"alice"}"#);
    let (mut bob, bob_id) = connect(nodes[1].addr);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice"]}"#);
    assert_eq!(recv_text(&mut bob), watchlist("online", "alice"));
}

/// A watcher signs in while its node is cut off from Redis, watching a user online on another
/// node: the read that failed is done again when the link is back, and it hears `online`.
#[test]
fn watch_read_again_after_the_link_is_back() {
    use crate::cluster_faults::{node_on, Proxy};
    use crate::cluster_nodes::wait_ready;

    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr);
    let a = node_on(format!("redis://{}", redis.addr), "watch-reread");
    let b = node_on(format!("redis://{}", proxy.addr), "watch-reread");
    wait_ready(a.addr, 200);
    wait_ready(b.addr, 200);
    let (mut alice, alice_id) = connect(a.addr);
    signin(&mut alice, &alice_id, r#"{"id":"alice"}"#);
    online_seen_by(&redis, "watch-reread", "alice", a.addr, b.addr);
    let (mut bob, bob_id) = connect(b.addr);
    proxy.cut();
    wait_ready(b.addr, 503);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice"]}"#);
    proxy.heal();
    assert_eq!(recv_text(&mut bob), watchlist("online", "alice"));
}

/// Returns once `user`'s `online` has been decided in Redis and has reached the node at
/// `observer`: a marker published through `publisher` after the decision, to a channel of the
/// user's bucket, arrives there after it (one bucket is one stream). Otherwise a test that cuts
/// the observer off next would see it find the missed `online` as a gap and close with 4200.
fn online_seen_by(
    redis: &RedisServer,
    prefix: &str,
    user: &str,
    publisher: std::net::SocketAddr,
    observer: std::net::SocketAddr,
) {
    use ringwire::cluster::bucket;

    let marker = (0..).map(|n| format!("marker-{n}")).find(|c| bucket::of_channel(c, 64) == bucket::of_user(user, 64));
    let marker = marker.unwrap();
    let (mut ws, _) = connect(observer);
    subscribe(&mut ws, &marker);
    wait_nodes_holding(redis, prefix, user, 1);
    assert_eq!(publish(publisher, &[&marker], "m", "1", None).0, 200);
    assert_eq!(recv_json(&mut ws)["channel"], marker.as_str());
}

/// Polls the app's online hash until `count` nodes hold `user`.
fn wait_nodes_holding(redis: &RedisServer, prefix: &str, user: &str, count: i64) {
    use ringwire::cluster::link::{Link, Reply};

    let (key, field) = (format!("{prefix}:a:{APP_ID}:online"), user.to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (key, field) = (key.clone(), field.clone());
        let held = crate::cluster::run(|| async move {
            let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
            link.command(&[b"HGET", key.as_bytes(), field.as_bytes()]).await.unwrap()
        });
        let held = match held {
            Reply::BulkString(n) => std::str::from_utf8(&n).unwrap().parse().unwrap(),
            _ => 0,
        };
        if held == count {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{user} is held by {held} nodes, not {count}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A node killed with SIGKILL while a user is signed in only there: once its lease ends the
/// reaper takes the user offline, so a watcher on another node hears `offline` once (the next
/// event it gets is about another user).
#[test]
fn dead_node_users_go_offline_once() {
    use crate::cluster_presence::{node_process, wait_leases};

    let redis = RedisServer::start();
    let url = format!("redis://{}", redis.addr);
    let a = TestServer::start(move |c| {
        c.cluster.redis_url = Some(url);
        c.cluster.prefix = "watch-reap".into();
        c.cluster.lease_ms = 1_000;
    });
    crate::cluster_nodes::wait_ready(a.addr, 200);
    let (mut doomed, doomed_addr) = node_process(&redis, "watch-reap", "lease_ms = 1000\n", "");
    wait_leases(&redis, "watch-reap", 2);
    let (mut bob, bob_id) = connect(a.addr);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice","zed"]}"#);
    let (mut alice, alice_id) = connect(doomed_addr);
    signin(&mut alice, &alice_id, r#"{"id":"alice"}"#);
    assert_eq!(recv_text(&mut bob), watchlist("online", "alice"));
    let _ = doomed.kill();
    let _ = doomed.wait();
    let killed = std::time::Instant::now();
    assert_eq!(recv_text(&mut bob), watchlist("offline", "alice"));
    let waited = killed.elapsed();
    assert!(waited < std::time::Duration::from_millis(1_000 + 1_500), "offline after {waited:?}");
    let (mut zed, zed_id) = connect(a.addr);
    signin(&mut zed, &zed_id, r#"{"id":"zed"}"#);
    assert_eq!(recv_text(&mut bob), watchlist("online", "zed"));
}

/// A presence join answered while the last script message of its bucket was a watchlist
/// event (kinds 8–9 share the script sender's stream with the member events) goes out at
/// once; it used to wait for the next member event of the bucket, which a quiet channel may
/// never send.
#[test]
fn presence_join_after_a_watchlist_event_of_its_bucket() {
    use ringwire::cluster::bucket;

    let redis = RedisServer::start();
    let nodes = nodes(&redis, "heldjoin", 2);
    let channel = "presence-quiet";
    let target = bucket::of_channel(channel, 64);
    let user = (0..).map(|n| format!("u{n}")).find(|u| bucket::of_user(u, 64) == target).unwrap();
    let presence = |ws: &mut Ws, id: &str| {
        let channel_data = json!({"user_id": "m", "user_info": {}}).to_string();
        let auth = sign(&format!("{id}:{channel}:{channel_data}"));
        send_json(
            ws,
            json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}),
        );
        let reply = recv_json(ws);
        assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
    };
    let (mut first, first_id) = connect(nodes[0].addr);
    presence(&mut first, &first_id);
    // A watcher on node A sees the user's online, so the script's kind 8 has reached node A.
    let (mut watcher, watcher_id) = connect(nodes[0].addr);
    signin(&mut watcher, &watcher_id, &format!(r#"{{"id":"w","watchlist":["{user}"]}}"#));
    let (mut signed, signed_id) = connect(nodes[1].addr);
    signin(&mut signed, &signed_id, &format!(r#"{{"id":"{user}"}}"#));
    assert_eq!(recv_text(&mut watcher), watchlist("online", &user));
    // A second tab of member m on node A: no member_added; its answer must not be held.
    let (mut second, second_id) = connect(nodes[0].addr);
    presence(&mut second, &second_id);
}

/// An `online` script answered with an error (here NOSCRIPT: the scripts were flushed from
/// Redis) decided nothing; it runs again at the node's next link up, which loads the scripts
/// again, and the watcher on the other node hears `online`. It used to be only logged, so the
/// user never came online cluster-wide.
#[test]
fn online_script_error_runs_again_at_link_up() {
    use crate::cluster_faults::{node_on, Proxy};
    use crate::cluster_nodes::wait_ready;
    use ringwire::cluster::link::Link;

    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr);
    let a = node_on(format!("redis://{}", proxy.addr), "watch-noscript");
    let b = node_on(format!("redis://{}", redis.addr), "watch-noscript");
    wait_ready(a.addr, 200);
    wait_ready(b.addr, 200);
    let (mut bob, bob_id) = connect(b.addr);
    signin(&mut bob, &bob_id, r#"{"id":"bob","watchlist":["alice"]}"#);
    let flushed = crate::cluster::run(|| async move {
        let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        link.command(&[b"SCRIPT", b"FLUSH"]).await.unwrap()
    });
    assert_eq!(flushed, ringwire::cluster::link::Reply::SimpleString(bytes::Bytes::from_static(b"OK")));
    let (mut alice, alice_id) = connect(a.addr);
    signin(&mut alice, &alice_id, r#"{"id":"alice"}"#);
    // Node A reconnects (and loads the scripts) after a cut of its links.
    std::thread::sleep(std::time::Duration::from_millis(200));
    proxy.cut();
    wait_ready(a.addr, 503);
    proxy.heal();
    wait_ready(a.addr, 200);
    assert_eq!(recv_text(&mut bob), watchlist("online", "alice"));
}
