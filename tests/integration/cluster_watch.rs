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
    use ringwire::cluster::link::Link;
    use ringwire::cluster::message::{self, Header, Kind, Sender};

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
    crate::cluster::run(|| async {
        let mut link = Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        let mut channel = String::new();
        bucket::channel_name("watch-gap", APP_ID, watched, &mut channel);
        for sequence in [1, 3] {
            let header = Header {
                kind: Kind::TerminateUser,
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
