//! Channel state cluster-wide: presence members, occupancy, counts and queries across 3 nodes
//! (2 shards each) on one real redis-server, as plain WebSocket and HTTP clients see them
//! (docs/cluster.md, "Presence, occupancy, users: keys and scripts", "Dead nodes",
//! "Cluster-wide queries").

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::RedisServer;
use crate::support::*;

/// A node on `redis` with keys under `prefix`; returns once its links are up.
fn node(redis: &RedisServer, prefix: &str, change: impl FnOnce(&mut ringwire::Config)) -> TestServer {
    crate::cluster_nodes::node_with(redis, prefix, |c| {
        c.cluster.lease_ms = 1_000;
        change(c);
    })
}

fn nodes(redis: &RedisServer, prefix: &str) -> Vec<TestServer> {
    (0..3).map(|_| node(redis, prefix, |_| {})).collect()
}

/// One command to `redis` from the test, as another client would send it.
fn redis_command(redis: &RedisServer, args: &[&[u8]]) -> ringwire::cluster::link::Reply {
    crate::cluster::run(|| async {
        let mut link = ringwire::cluster::link::Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        link.command(args).await.unwrap()
    })
}

/// Waits until `P:nodes` holds `count` leases (a node registers its lease just after its
/// links come up).
pub(crate) fn wait_leases(redis: &RedisServer, prefix: &str, count: i64) {
    let key = format!("{prefix}:nodes");
    let want = ringwire::cluster::link::Reply::Integer(count);
    assert!(eventually(Duration::from_secs(5), || redis_command(redis, &[b"ZCARD", key.as_bytes()]) == want));
}

/// Polls `/ready` until it answers `status`.
fn wait_ready(addr: SocketAddr, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = http(addr, "GET", "/ready", b"");
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "/ready stayed {got} {body}, not {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sign(to_sign: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    format!("{KEY}:{}", hex::encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref()))
}

fn presence_subscribe(ws: &mut Ws, socket_id: &str, channel: &str, user_id: &str) {
    let channel_data = json!({"user_id": user_id, "user_info": {"name": format!("user {user_id}")}}).to_string();
    let auth = sign(&format!("{socket_id}:{channel}:{channel_data}"));
    let data = json!({"channel": channel, "auth": auth, "channel_data": channel_data});
    send_json(ws, json!({"event": "pusher:subscribe", "data": data}));
}

/// Joins `channel` as `user_id` and returns the member ids subscription_succeeded lists.
fn join(ws: &mut Ws, socket_id: &str, channel: &str, user_id: &str) -> Vec<String> {
    presence_subscribe(ws, socket_id, channel, user_id);
    let reply = recv_json(ws);
    assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
    let data: Value = serde_json::from_str(reply["data"].as_str().unwrap()).unwrap();
    let ids: Vec<String> =
        data["presence"]["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    assert_eq!(data["presence"]["count"], ids.len(), "{data}");
    for id in &ids {
        assert_eq!(data["presence"]["hash"][id], json!({"name": format!("user {id}")}), "{data}");
    }
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn member_added(channel: &str, user_id: &str) -> String {
    format!(
        r#"{{"event":"pusher_internal:member_added","channel":"{channel}","data":"{{\"user_id\":\"{user_id}\",\"user_info\":{{\"name\":\"user {user_id}\"}}}}"}}"#
    )
}

fn member_removed(channel: &str, user_id: &str) -> String {
    format!(
        r#"{{"event":"pusher_internal:member_removed","channel":"{channel}","data":"{{\"user_id\":\"{user_id}\"}}"}}"#
    )
}

/// Publishes a marker through node `via` and expects it as the next message of every socket:
/// whatever was expected before it arrived exactly once, and nothing else came in between.
fn marker(via: SocketAddr, channel: &str, n: u32, sockets: &mut [&mut Ws]) {
    assert_eq!(publish(via, &[channel], "marker", &n.to_string(), None).0, 200);
    let expected = format!(r#"{{"event":"marker","channel":"{channel}","data":"{n}"}}"#);
    for ws in sockets.iter_mut() {
        assert_eq!(recv_text(ws), expected);
    }
}

/// Users on different nodes see each other; member_added and member_removed reach every node
/// exactly once per user: two connections of one user on two nodes make one member_added (to
/// the others, not the joiner), and one member_removed only after both left.
#[test]
fn members_across_nodes_exactly_once() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "members");
    let room = "presence-room";
    let (mut a, a_id) = connect(nodes[0].addr);
    assert_eq!(join(&mut a, &a_id, room, "1"), ["1"]);
    let (mut b, b_id) = connect(nodes[1].addr);
    assert_eq!(sorted(join(&mut b, &b_id, room, "2")), ["1", "2"]);
    assert_eq!(recv_text(&mut a), member_added(room, "2"));
    marker(nodes[2].addr, room, 1, &mut [&mut a, &mut b]);

    // User 2 again, on node C: listed with everyone, announced to nobody.
    let (mut c, c_id) = connect(nodes[2].addr);
    assert_eq!(sorted(join(&mut c, &c_id, room, "2")), ["1", "2"]);
    marker(nodes[0].addr, room, 2, &mut [&mut a, &mut b, &mut c]);

    // Its connection on B leaves: user 2 is still on C, so nothing is announced.
    drop(b);
    marker(nodes[1].addr, room, 3, &mut [&mut a, &mut c]);
    let (mut d, d_id) = connect(nodes[1].addr);
    assert_eq!(sorted(join(&mut d, &d_id, room, "3")), ["1", "2", "3"]);
    assert_eq!(recv_text(&mut a), member_added(room, "3"));
    assert_eq!(recv_text(&mut c), member_added(room, "3"));

    // Its last connection leaves: member_removed once, on every node.
    drop(c);
    assert_eq!(recv_text(&mut a), member_removed(room, "2"));
    assert_eq!(recv_text(&mut d), member_removed(room, "2"));
    marker(nodes[2].addr, room, 4, &mut [&mut a, &mut d]);
    let (status, users) = api(nodes[2].addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
    assert_eq!((status, users), (200, json!({"users": [{"id": "1"}, {"id": "3"}]})));
}

/// The member limit holds cluster-wide: with presence_members_max 2, a third user on another
/// node is refused with pusher:error, while a member's second connection is accepted.
#[test]
fn member_limit_is_cluster_wide() {
    let redis = RedisServer::start();
    let limited = |c: &mut ringwire::Config| c.apps[0].presence_members_max = 2;
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "limit", limited)).collect();
    let room = "presence-full";
    let (mut a, a_id) = connect(nodes[0].addr);
    join(&mut a, &a_id, room, "1");
    let (mut b, b_id) = connect(nodes[1].addr);
    join(&mut b, &b_id, room, "2");
    let (mut c, c_id) = connect(nodes[1].addr);
    presence_subscribe(&mut c, &c_id, room, "3");
    assert_eq!(
        recv_text(&mut c),
        format!(
            r#"{{"event":"pusher:error","channel":"{room}","data":{{"code":null,"message":"presence channel is full: at most 2 members"}}}}"#
        )
    );
    let (mut again, again_id) = connect(nodes[1].addr);
    assert_eq!(sorted(join(&mut again, &again_id, room, "1")), ["1", "2"]);
}

/// What a presence subscribe gets, before close 4200, when Redis cannot decide it.
const UNAVAILABLE_4200: &str = r#"{"event":"pusher:error","data":{"code":4200,"message":"presence unavailable while the cluster link is down, reconnect"}}"#;

/// While a node's link to Redis is down, a presence subscribe there is refused with
/// pusher:error 4200 and close 4200 (the client reconnects, to a healthy node), whichever of
/// the node's shards noticed the outage first: the connection's (which refuses at once) or the
/// channel's home shard (which refuses the join it cannot run).
#[test]
fn presence_subscribe_during_outage_is_4200() {
    let mut redis = RedisServer::start();
    let node = node(&redis, "outage", |_| {});
    let (mut ws, id) = connect(node.addr);
    redis.kill();
    // Both shards' links are down (not only the first to notice).
    let both_down = || {
        let (status, body) = http(node.addr, "GET", "/ready", b"");
        status == 503 && serde_json::from_str::<Value>(&body).unwrap()["cluster_link_down"] == json!([0, 1])
    };
    assert!(eventually(Duration::from_secs(5), both_down));
    presence_subscribe(&mut ws, &id, "presence-room", "1");
    assert_eq!(recv_text(&mut ws), UNAVAILABLE_4200);
    assert_eq!(recv_close(&mut ws), 4200);
}

/// Polls `what` until it returns true or `timeout` passes.
fn eventually(timeout: Duration, what: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    what()
}

/// `GET /channels`, `/channels/{name}` (info=subscription_count,user_count) and
/// `/channels/{name}/users` answer the same cluster-wide counts on every node.
#[test]
fn queries_are_cluster_wide_on_every_node() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, "queries");
    let room = "presence-lobby";
    let mut sockets = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (mut ws, id) = connect(node.addr);
        join(&mut ws, &id, room, &(i % 2).to_string());
        sockets.push(ws);
        let (mut ws, _) = connect(node.addr);
        subscribe(&mut ws, "news");
        sockets.push(ws);
    }
    let channel = |addr: SocketAddr, name: &str, info: &str| {
        api(addr, "GET", &format!("/apps/{APP_ID}/channels/{name}"), &[("info", info)])
    };
    for node in &nodes {
        let want = (200, json!({"occupied": true, "subscription_count": 3, "user_count": 2}));
        assert!(
            eventually(Duration::from_secs(5), || channel(node.addr, room, "subscription_count,user_count") == want),
            "{:?}",
            channel(node.addr, room, "subscription_count,user_count")
        );
        let want = (200, json!({"occupied": true, "subscription_count": 3}));
        assert!(eventually(Duration::from_secs(5), || channel(node.addr, "news", "subscription_count") == want));
        let all = api(node.addr, "GET", &format!("/apps/{APP_ID}/channels"), &[("info", "subscription_count")]);
        let want = json!({"channels": {"news": {"subscription_count": 3}, room: {"subscription_count": 3}}});
        assert_eq!(all, (200, want));
        let query = [("filter_by_prefix", "presence-"), ("info", "user_count")];
        let presence = api(node.addr, "GET", &format!("/apps/{APP_ID}/channels"), &query);
        assert_eq!(presence, (200, json!({"channels": {room: {"user_count": 2}}})));
        let (status, users) = api(node.addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
        let mut ids: Vec<&str> = users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
        ids.sort();
        assert_eq!((status, ids), (200, vec!["0", "1"]));
    }
    drop(sockets);
    for node in &nodes {
        let want = (200, json!({"occupied": false}));
        assert!(eventually(Duration::from_secs(5), || channel(node.addr, "news", "") == want));
        let all = || api(node.addr, "GET", &format!("/apps/{APP_ID}/channels"), &[]);
        assert!(eventually(Duration::from_secs(5), || all() == (200, json!({"channels": {}}))), "{:?}", all());
    }
}

/// subscription_count events count the subscribers of every node.
#[test]
fn subscription_count_events_are_cluster_wide() {
    let redis = RedisServer::start();
    let counting = |c: &mut ringwire::Config| c.apps[0].subscription_count_enabled = true;
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "counts", counting)).collect();
    let (mut a, _) = connect(nodes[0].addr);
    subscribe(&mut a, "my-channel");
    let (mut b, _) = connect(nodes[1].addr);
    subscribe(&mut b, "my-channel");
    let two =
        r#"{"event":"pusher_internal:subscription_count","channel":"my-channel","data":"{\"subscription_count\":2}"}"#;
    for ws in [&mut a, &mut b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = recv_text(ws);
            if text == two {
                break;
            }
            assert!(text.contains("subscription_count") && Instant::now() < deadline, "{text}");
        }
    }
}

/// A node as its own process (the binary) on `redis`, keys under `prefix`, with extra
/// `[cluster]` lines and lines after its app; returns once its links are up.
pub(crate) fn node_process(
    redis: &RedisServer,
    prefix: &str,
    cluster: &str,
    tail: &str,
) -> (std::process::Child, SocketAddr) {
    let dir = temp_dir(&format!("cluster-{prefix}"));
    let config_path = dir.join("ringwire.toml");
    let config = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\n\n[cluster]\nredis_url = \"redis://{}\"\nprefix = \"{prefix}\"\n\
         {cluster}\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n{tail}",
        redis.addr
    );
    std::fs::write(&config_path, config).unwrap();
    let (child, mut stdout) = spawn_node(&config_path, &dir.join("stderr.log"));
    let mut line = String::new();
    while !line.contains("listening on ") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the node printed its address");
    }
    let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
    let addr: SocketAddr = rest.split(' ').next().unwrap().parse().unwrap();
    wait_ready(addr, 200);
    (child, addr)
}

/// A node killed with SIGKILL: within lease_ms plus slack its member is removed with one
/// member_removed at the other nodes' subscribers, and the channel it alone occupied is vacated.
#[test]
fn dead_node_is_reaped_once() {
    let redis = RedisServer::start();
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "reap", |_| {})).collect();
    let (mut child, doomed) = node_process(&redis, "reap", "lease_ms = 1000\n", "");

    let room = "presence-room";
    let (mut a, a_id) = connect(nodes[0].addr);
    join(&mut a, &a_id, room, "1");
    let (mut b, b_id) = connect(nodes[1].addr);
    join(&mut b, &b_id, room, "2");
    assert_eq!(recv_text(&mut a), member_added(room, "2"));
    let (mut gone, gone_id) = connect(doomed);
    join(&mut gone, &gone_id, room, "9");
    subscribe(&mut gone, "only-there");
    assert_eq!(recv_text(&mut a), member_added(room, "9"));
    assert_eq!(recv_text(&mut b), member_added(room, "9"));
    let info = |name: &str| api(nodes[0].addr, "GET", &format!("/apps/{APP_ID}/channels/{name}"), &[]);
    assert!(eventually(Duration::from_secs(5), || info("only-there") == (200, json!({"occupied": true}))));
    wait_leases(&redis, "reap", 3);

    let _ = child.kill();
    let _ = child.wait();
    let killed = Instant::now();
    assert_eq!(recv_text(&mut a), member_removed(room, "9"));
    assert_eq!(recv_text(&mut b), member_removed(room, "9"));
    let waited = killed.elapsed();
    assert!(waited < Duration::from_millis(1_000 + 1_500), "reaped after {waited:?}");
    marker(nodes[1].addr, room, 1, &mut [&mut a, &mut b]);
    assert_eq!(info("only-there"), (200, json!({"occupied": false})));
    let (status, users) = api(nodes[1].addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
    let mut ids: Vec<&str> = users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!((status, ids), (200, vec!["1", "2"]));
}

/// Lifecycle webhooks of 3 nodes into one receiver: each cluster-wide transition makes exactly
/// one event (one member_added and one member_removed per user, however many nodes hold it;
/// one channel_occupied and one channel_vacated per channel), not one per node.
#[test]
fn lifecycle_webhooks_once_cluster_wide() {
    let redis = RedisServer::start();
    let receiver = Receiver::start();
    let url = format!("http://{}/lifecycle", receiver.addr);
    let hooked = |c: &mut ringwire::Config| {
        c.webhooks.data_dir = temp_dir("cluster-lifecycle");
        c.webhooks.allow_private_targets = true;
        c.webhooks.batch_ms = 10;
        c.apps[0].webhooks = vec![ringwire::config::WebhookConfig::pusher(url.clone())];
    };
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&redis, "hooks", hooked)).collect();
    let room = "presence-hooks";
    let mut sockets = Vec::new();
    for (node, user) in nodes.iter().zip(["1", "1", "2"]) {
        let (mut ws, id) = connect(node.addr);
        join(&mut ws, &id, room, user);
        sockets.push(ws);
    }
    // Every node's occupancy is in Redis (each node writes its count after its occupy script),
    // so the channel cannot look vacant in between while the sockets close.
    let info =
        || api(nodes[0].addr, "GET", &format!("/apps/{APP_ID}/channels/{room}"), &[("info", "subscription_count")]);
    let all_in = (200, json!({"occupied": true, "subscription_count": 3}));
    assert!(eventually(Duration::from_secs(5), || info() == all_in), "{:?}", info());
    drop(sockets);
    let event = |name: &str, channel: &str, user: &str| (name.to_string(), channel.to_string(), user.to_string());
    let mut expected = vec![
        event("channel_occupied", room, ""),
        event("channel_vacated", room, ""),
        event("member_added", room, "1"),
        event("member_added", room, "2"),
        event("member_removed", room, "1"),
        event("member_removed", room, "2"),
    ];
    let received = || {
        let mut events = receiver.lifecycle_events();
        events.sort();
        events
    };
    assert!(eventually(Duration::from_secs(10), || received().len() >= expected.len()), "{:?}", received());
    // A marker channel occupied on each node: once all three are in, so would be any
    // duplicate the nodes made of the events above.
    let mut markers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (mut ws, _) = connect(node.addr);
        let channel = format!("marker-{i}");
        subscribe(&mut ws, &channel);
        markers.push(ws);
        expected.push(event("channel_occupied", &channel, ""));
    }
    expected.sort();
    assert!(eventually(Duration::from_secs(10), || received().len() >= expected.len()), "{:?}", received());
    assert_eq!(received(), expected);
}

/// A node that finds its lease gone at renewal (it was cut off longer than lease_ms and
/// reaped) closes its subscribed connections with 4200 instead of keeping members that the
/// cluster already removed.
#[test]
fn reaped_node_closes_its_connections() {
    let redis = RedisServer::start();
    let node = node(&redis, "reaped", |_| {});
    let (mut ws, id) = connect(node.addr);
    join(&mut ws, &id, "presence-room", "1");
    // What a reaper does first: the lease is taken out of `P:nodes` (once it is there).
    wait_leases(&redis, "reaped", 1);
    redis_command(&redis, &[b"DEL", b"reaped:nodes"]);
    assert_eq!(recv_close(&mut ws), 4200);
}

/// A member list followed by its member events adds up to the members, also for connections
/// that join while members on other nodes come and go: each joiner applies the events it gets
/// after its subscription_succeeded to the list in it, and must end with the members the
/// cluster has (no event missed, none counted twice).
#[test]
fn joiners_see_consistent_members_under_churn() {
    let redis = RedisServer::start();
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "churn", |_| {})).collect();
    let room = "presence-churn";
    let (stop, done) = (std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)), std::sync::mpsc::channel());
    let churner = {
        let (addr, stop, done) = (nodes[1].addr, stop.clone(), done.0);
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (mut ws, id) = connect(addr);
                join(&mut ws, &id, room, &format!("churn-{}", round % 4));
                drop(ws);
                round += 1;
            }
            done.send(round).unwrap();
        })
    };
    let mut joiners = Vec::new();
    for i in 0..40 {
        let (mut ws, id) = connect(nodes[0].addr);
        let members: std::collections::BTreeSet<String> =
            join(&mut ws, &id, room, &format!("joiner-{i}")).into_iter().collect();
        joiners.push((ws, members, i));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churner.join().unwrap();
    let rounds = done.1.recv().unwrap();
    assert!(rounds > 10, "the churn ran ({rounds} rounds)");
    // Every churn connection is closed; wait until the cluster agrees, then drain each joiner
    // up to a marker published after that.
    let members = || {
        let (_, users) = api(nodes[0].addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
        users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(10), || members().iter().all(|m| m.starts_with("joiner-"))),
        "{:?}",
        members()
    );
    assert_eq!(publish(nodes[0].addr, &[room], "marker", "0", None).0, 200);
    let expected: std::collections::BTreeSet<String> = members().into_iter().collect();
    for (ws, view, i) in &mut joiners {
        loop {
            let message = recv_json(ws);
            let data: Value = message["data"].as_str().map(|d| serde_json::from_str(d).unwrap()).unwrap_or(Value::Null);
            match message["event"].as_str().unwrap() {
                "marker" => break,
                "pusher_internal:member_added" => {
                    let id = data["user_id"].as_str().unwrap().to_string();
                    assert!(view.insert(id.clone()), "joiner-{i}: member_added of {id}, already listed");
                }
                "pusher_internal:member_removed" => {
                    let id = data["user_id"].as_str().unwrap().to_string();
                    assert!(view.remove(&id), "joiner-{i}: member_removed of {id}, not listed");
                }
                other => panic!("joiner-{i}: {other}"),
            }
        }
        assert_eq!(view, &expected, "joiner-{i}");
    }
}

/// A member's last connection that leaves while its node's link is down is not forgotten: the
/// node runs the leave when its link is back (member_removed at a subscriber there), and every
/// node's API lists the member as gone. (A subscriber on the other node may instead be closed
/// with 4200, if its node's subscriber link is still reconnecting when the leave is published:
/// that is gap detection doing its job, so the observer sits on the leaving node.)
#[test]
fn leave_during_outage_runs_when_the_link_is_back() {
    let redis = RedisServer::start();
    // A second, not half a second, before a silent Redis counts as down, so that only the pause
    // below takes the links down (on a starved machine a shorter one also trips later, and a
    // gap then rightly closes the observer with 4200); and leases that outlast the pause (a
    // node cut off longer than lease_ms is rightly reaped, its members removed).
    let patient = |c: &mut ringwire::Config| {
        c.cluster.command_timeout_ms = 1_000;
        c.cluster.lease_ms = 10_000;
    };
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "retry", patient)).collect();
    let room = "presence-retry";
    let (mut leaving, leaving_id) = connect(nodes[0].addr);
    join(&mut leaving, &leaving_id, room, "1");
    let (mut observer, observer_id) = connect(nodes[0].addr);
    assert_eq!(sorted(join(&mut observer, &observer_id, room, "2")), ["1", "2"]);
    let (mut elsewhere, elsewhere_id) = connect(nodes[1].addr);
    assert_eq!(sorted(join(&mut elsewhere, &elsewhere_id, room, "3")), ["1", "2", "3"]);
    assert_eq!(recv_text(&mut observer), member_added(room, "3"));
    // Redis stops answering every client for 2.5 s: both nodes' heartbeats take their links down.
    redis_command(&redis, &[b"CLIENT", b"PAUSE", b"2500", b"ALL"]);
    wait_ready(nodes[0].addr, 503);
    drop(leaving);
    wait_ready(nodes[0].addr, 200);
    assert_eq!(recv_text(&mut observer), member_removed(room, "1"));
    // User 3 may be gone too: its node may have been closed with 4200 by a gap (above).
    for node in &nodes {
        wait_ready(node.addr, 200);
        let (status, users) = api(node.addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
        let ids: Vec<&str> = users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
        assert!(status == 200 && ids.contains(&"2") && !ids.contains(&"1"), "{status} {ids:?}");
    }
}

/// A node restarted with the same `node_id` reaps its previous incarnation at once, long
/// before that one's lease (60 s here) would have run out: its member is removed once.
#[test]
fn restarted_node_reaps_its_previous_incarnation() {
    let redis = RedisServer::start();
    let observer_node = node(&redis, "phoenix", |_| {});
    let room = "presence-room";
    let (mut observer, observer_id) = connect(observer_node.addr);
    join(&mut observer, &observer_id, room, "1");
    let settings = "node_id = \"phoenix-1\"\nlease_ms = 60000\n";
    let (mut first, addr) = node_process(&redis, "phoenix", settings, "");
    let (mut gone, gone_id) = connect(addr);
    join(&mut gone, &gone_id, room, "9");
    assert_eq!(recv_text(&mut observer), member_added(room, "9"));
    wait_leases(&redis, "phoenix", 2);
    let _ = first.kill();
    let _ = first.wait();
    let (mut second, _) = node_process(&redis, "phoenix", settings, "");
    let restarted = Instant::now();
    assert_eq!(recv_text(&mut observer), member_removed(room, "9"));
    assert!(restarted.elapsed() < Duration::from_secs(5), "reaped after {:?}", restarted.elapsed());
    marker(observer_node.addr, room, 1, &mut [&mut observer]);
    let _ = second.kill();
    let _ = second.wait();
}

/// The transitions a reaper decides for a killed node make their lifecycle webhooks once: one
/// member_removed for its member, one channel_vacated for the channel only it occupied.
#[test]
fn reaped_transitions_make_webhooks_once() {
    let redis = RedisServer::start();
    let receiver = Receiver::start();
    let url = format!("http://{}/lifecycle", receiver.addr);
    let hooked = |c: &mut ringwire::Config| {
        c.webhooks.data_dir = temp_dir("cluster-reaped-hooks");
        c.webhooks.allow_private_targets = true;
        c.webhooks.batch_ms = 10;
        c.apps[0].webhooks = vec![ringwire::config::WebhookConfig::pusher(url.clone())];
    };
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "reaphooks", hooked)).collect();
    let tail = format!(
        "[[apps.webhooks]]\nurl = \"{url}\"\nformat = \"pusher\"\n\n[webhooks]\ndata_dir = \"{}\"\n\
         allow_private_targets = true\nbatch_ms = 10\n",
        temp_dir("cluster-reaped-process").display()
    );
    let (mut child, doomed) = node_process(&redis, "reaphooks", "lease_ms = 1000\n", &tail);
    let room = "presence-room";
    let (mut a, a_id) = connect(nodes[0].addr);
    join(&mut a, &a_id, room, "1");
    let (mut gone, gone_id) = connect(doomed);
    join(&mut gone, &gone_id, room, "9");
    subscribe(&mut gone, "only-there");
    assert_eq!(recv_text(&mut a), member_added(room, "9"));
    let event = |name: &str, channel: &str, user: &str| (name.to_string(), channel.to_string(), user.to_string());
    let mut expected = vec![
        event("channel_occupied", room, ""),
        event("member_added", room, "1"),
        event("member_added", room, "9"),
        event("channel_occupied", "only-there", ""),
    ];
    let received = || {
        let mut events = receiver.lifecycle_events();
        events.sort();
        events
    };
    expected.sort();
    assert!(eventually(Duration::from_secs(10), || received() == expected), "{:?}", received());
    wait_leases(&redis, "reaphooks", 3);

    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(recv_text(&mut a), member_removed(room, "9"));
    expected.extend([event("member_removed", room, "9"), event("channel_vacated", "only-there", "")]);
    // Markers occupied on both live nodes: once they are in, so would be any duplicate.
    let mut markers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (mut ws, _) = connect(node.addr);
        subscribe(&mut ws, &format!("marker-{i}"));
        markers.push(ws);
        expected.push(event("channel_occupied", &format!("marker-{i}"), ""));
    }
    expected.sort();
    assert!(eventually(Duration::from_secs(10), || received().len() >= expected.len()), "{:?}", received());
    assert_eq!(received(), expected);
}

/// A node that shuts down gracefully ends its lease on the way out (its lease_ms is 60 s
/// here), so another node reaps it at its next claim: only the live node's lease is left.
#[test]
fn graceful_exit_ends_the_lease() {
    let redis = RedisServer::start();
    let staying = node(&redis, "exit", |_| {});
    let leaving = node(&redis, "exit", |c| c.cluster.lease_ms = 60_000);
    let (mut observer, observer_id) = connect(staying.addr);
    join(&mut observer, &observer_id, "presence-room", "1");
    let (mut member, member_id) = connect(leaving.addr);
    join(&mut member, &member_id, "presence-room", "2");
    assert_eq!(recv_text(&mut observer), member_added("presence-room", "2"));
    let leases = || {
        crate::cluster::run(|| async {
            let mut link =
                ringwire::cluster::link::Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
            let reply = link.command(&[b"ZRANGE", b"exit:nodes", b"0", b"-1"]).await.unwrap();
            let reaping = link.command(&[b"ZCARD", b"exit:reaping"]).await.unwrap();
            (format!("{reply:?}").matches("BulkString").count(), reaping)
        })
    };
    wait_leases(&redis, "exit", 2);
    // The member answers the server's close, as a browser does, so its leave is not cut short.
    let stopping = std::thread::spawn(move || drop(leaving));
    assert_eq!(recv_close(&mut member), 4200);
    let _ = member.flush();
    stopping.join().unwrap();
    assert_eq!(recv_text(&mut observer), member_removed("presence-room", "2"));
    let zero = ringwire::cluster::link::Reply::Integer(0);
    assert!(eventually(Duration::from_secs(5), || leases() == (1, zero.clone())), "{:?}", leases());
}

/// The reaper reads what Redis holds like input: a dead node's entries that name no valid app
/// or channel are skipped (no panic), and its valid ones are still reaped.
#[test]
fn reaper_skips_garbage_and_reaps_the_rest() {
    let redis = RedisServer::start();
    let live = node(&redis, "ghost", |_| {});
    let room = "presence-room";
    let (mut observer, observer_id) = connect(live.addr);
    join(&mut observer, &observer_id, room, "1");
    let ghost = "ghost/0000000000000001";
    let k = format!("{{ghost:c:{APP_ID}:{room}}}");
    crate::cluster::run(|| async {
        let mut link = ringwire::cluster::link::Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        let long_app = format!("{}\n{room}", "a".repeat(300));
        let long_app_users = format!("{{ghost:c:{}:{room}}}:node:{ghost}", "a".repeat(300));
        let valid = format!("{APP_ID}\n{room}");
        let entries = format!("ghost:n:{ghost}:keys");
        let (node_users, users, members) = (format!("{k}:node:{ghost}"), format!("{k}:users"), format!("{k}:members"));
        let commands: Vec<Vec<&[u8]>> = vec![
            vec![b"SADD", entries.as_bytes(), b"no newline", b"1\nnot a channel!", b"\nempty-app", long_app.as_bytes()],
            vec![b"SADD", entries.as_bytes(), valid.as_bytes()],
            vec![b"SADD", node_users.as_bytes(), b"9"],
            vec![b"SADD", long_app_users.as_bytes(), b"9"],
            vec![b"HSET", users.as_bytes(), b"9", b"1"],
            vec![b"HSET", members.as_bytes(), b"9", b"null"],
            vec![b"ZADD", b"ghost:nodes", b"0", ghost.as_bytes()],
        ];
        for command in commands {
            link.command(&command).await.unwrap();
        }
    });
    assert_eq!(recv_text(&mut observer), member_removed(room, "9"));
    let (status, users) = api(live.addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
    assert_eq!((status, users), (200, json!({"users": [{"id": "1"}]})));
    let health = http(live.addr, "GET", "/health", b"");
    assert_eq!(health.0, 200, "{health:?}");
}

/// Two connections of one user join a full channel on one node at once (both counted here
/// before Redis answers the first): both are refused, the node stays up, and the user can join
/// once there is room.
#[test]
fn full_channel_refuses_a_users_two_connections_at_once() {
    let redis = RedisServer::start();
    let limited = |c: &mut ringwire::Config| c.apps[0].presence_members_max = 2;
    let node = node(&redis, "full2", limited);
    let room = "presence-full";
    let (mut a, a_id) = connect(node.addr);
    join(&mut a, &a_id, room, "1");
    let (mut b, b_id) = connect(node.addr);
    join(&mut b, &b_id, room, "2");
    assert_eq!(recv_text(&mut a), member_added(room, "2"));
    // Writes wait in Redis for 300 ms, so both joins are counted on the node before either
    // script runs.
    crate::cluster::run(|| async {
        let mut link = ringwire::cluster::link::Link::connect(redis.addr, &crate::cluster::options()).await.unwrap();
        link.command(&[b"CLIENT", b"PAUSE", b"300", b"WRITE"]).await.unwrap();
    });
    let mut tabs: Vec<(Ws, String)> = (0..2).map(|_| connect(node.addr)).collect();
    for (ws, id) in &mut tabs {
        presence_subscribe(ws, id, room, "3");
    }
    let full = format!(
        r#"{{"event":"pusher:error","channel":"{room}","data":{{"code":null,"message":"presence channel is full: at most 2 members"}}}}"#
    );
    for (ws, _) in &mut tabs {
        assert_eq!(recv_text(ws), full);
    }
    assert_eq!(http(node.addr, "GET", "/health", b"").0, 200);
    drop(b);
    assert_eq!(recv_text(&mut a), member_removed(room, "2"));
    let (mut again, again_id) = connect(node.addr);
    assert_eq!(sorted(join(&mut again, &again_id, room, "3")), ["1", "3"]);
}

/// A join whose script Redis ran but whose answer the node never got is refused at the client
/// and taken back in Redis: the member does not stay listed forever. (The answer is lost here
/// by a member list over `cluster.reply_bytes_max`, written behind the nodes' backs; config
/// validation refuses limits that would allow one, so in production it is a link failing
/// between the script and its answer.)
#[test]
fn join_with_a_lost_answer_is_taken_back() {
    let redis = RedisServer::start();
    let small_replies = |c: &mut ringwire::Config| {
        c.cluster.reply_bytes_max = 65_536;
        c.apps[0].presence_members_max = 10_000;
    };
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis, "lost", small_replies)).collect();
    let room = "presence-lost";
    let (mut observer, observer_id) = connect(nodes[1].addr);
    join(&mut observer, &observer_id, room, "2");
    // Members written behind the nodes' backs make the list about 200 KB.
    let members = format!("{{lost:c:{APP_ID}:{room}}}:members");
    let fill = b"for i = 1, 3000 do redis.call('HSET', KEYS[1], 'filler-' .. i, '{\"pad\":\"0123456789012345678901234567890123456789\"}') end";
    redis_command(&redis, &[b"EVAL", fill, b"1", members.as_bytes()]);
    let (mut joiner, joiner_id) = connect(nodes[0].addr);
    presence_subscribe(&mut joiner, &joiner_id, room, "1");
    assert_eq!(recv_text(&mut joiner), UNAVAILABLE_4200);
    assert_eq!(recv_close(&mut joiner), 4200);
    let listed = || {
        let (status, users) = api(nodes[1].addr, "GET", &format!("/apps/{APP_ID}/channels/{room}/users"), &[]);
        let ids: Vec<String> = users["users"].as_array().map_or(Vec::new(), |list| {
            list.iter().map(|u| u["id"].as_str().unwrap().to_string()).filter(|id| !id.starts_with("filler-")).collect()
        });
        (status, ids)
    };
    assert!(eventually(Duration::from_secs(5), || listed() == (200, vec!["2".to_string()])), "{:?}", listed());
}

/// Standard Webhooks of published events are created once cluster-wide: by the node that
/// accepted the publish, in its own WAL; the nodes that only deliver the event create none.
/// Three nodes with the same endpoint, events published through each: one delivery per event.
#[test]
fn standard_webhooks_once_per_publish() {
    let redis = RedisServer::start();
    let receiver = Receiver::start();
    let url = format!("http://{}/events", receiver.addr);
    let hooked = |c: &mut ringwire::Config| {
        c.webhooks.data_dir = temp_dir("cluster-standard");
        c.webhooks.allow_private_targets = true;
        c.webhooks.batch_ms = 10;
        c.apps[0].webhooks = vec![ringwire::config::WebhookConfig {
            id: Some("events".into()),
            ..ringwire::config::WebhookConfig::standard(url.clone(), WHSEC)
        }];
    };
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&redis, "standard", hooked)).collect();
    let mut subscribers: Vec<Ws> = Vec::new();
    for node in &nodes {
        let (mut ws, _) = connect(node.addr);
        subscribe(&mut ws, "orders");
        subscribers.push(ws);
    }
    for (n, node) in nodes.iter().enumerate() {
        assert_eq!(publish(node.addr, &["orders"], "placed", &n.to_string(), None).0, 200);
    }
    for ws in &mut subscribers {
        for _ in 0..3 {
            assert_eq!(recv_json(ws)["event"], "placed");
        }
    }
    let requests = receiver.wait_for(3, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let requests = if receiver.requests().len() > requests.len() { receiver.requests() } else { requests };
    let mut ids: Vec<&str> = requests.iter().map(|r| r.header("webhook-id").expect("webhook-id")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((requests.len(), ids.len()), (3, 3), "one delivery per event, not one per node");
}

/// Pusher's presence debounce across nodes: a user whose only connection (on node A) closes
/// and who joins on node B within the window causes no member_removed/member_added at
/// subscribers on any node and no member webhooks (node A still counts the user in Redis
/// during the window); staying away afterwards makes exactly one member_removed and one
/// webhook, after about the window.
#[test]
fn reconnect_on_another_node_within_debounce_is_silent() {
    // Long enough that the rejoin below lands inside it on a loaded machine.
    const DEBOUNCE_MS: u64 = 2_000;
    let redis = RedisServer::start();
    let receiver = Receiver::start();
    let url = format!("http://{}/lifecycle", receiver.addr);
    let hooked = |c: &mut ringwire::Config| {
        c.webhooks.data_dir = temp_dir("cluster-debounce");
        c.webhooks.allow_private_targets = true;
        c.webhooks.batch_ms = 10;
        c.apps[0].webhooks = vec![ringwire::config::WebhookConfig::pusher(url.clone())];
        c.apps[0].presence_debounce_ms = DEBOUNCE_MS;
    };
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&redis, "debounce", hooked)).collect();
    let room = "presence-debounce";
    // Watchers on node A (where the user leaves) and node C (where it is in neither place).
    let (mut watcher_a, id) = connect(nodes[0].addr);
    join(&mut watcher_a, &id, room, "wa");
    let (mut watcher_c, id) = connect(nodes[2].addr);
    join(&mut watcher_c, &id, room, "wc");
    assert_eq!(recv_text(&mut watcher_a), member_added(room, "wc"));
    let (mut on_a, id) = connect(nodes[0].addr);
    join(&mut on_a, &id, room, "1");
    assert_eq!(recv_text(&mut watcher_a), member_added(room, "1"));
    assert_eq!(recv_text(&mut watcher_c), member_added(room, "1"));
    let count = |name: &str| receiver.lifecycle_events().iter().filter(|(n, _, _)| n == name).count();
    assert!(eventually(Duration::from_secs(5), || count("member_added") == 3), "{:?}", receiver.lifecycle_events());

    let left_at = Instant::now();
    drop(on_a);
    // Node A has seen the close (its leave waits in the window) before the user comes back.
    std::thread::sleep(Duration::from_millis(100));
    let (mut on_b, id) = connect(nodes[1].addr);
    assert_eq!(sorted(join(&mut on_b, &id, room, "1")), ["1", "wa", "wc"]);
    let rejoined = left_at.elapsed();
    assert!(rejoined < Duration::from_millis(DEBOUNCE_MS), "the rejoin took {rejoined:?}: not within the window");
    // Past node A's window: had anything been announced, it would come before the marker.
    std::thread::sleep(Duration::from_millis(DEBOUNCE_MS + 500));
    marker(nodes[1].addr, room, 1, &mut [&mut watcher_a, &mut watcher_c, &mut on_b]);
    assert_eq!(count("member_removed"), 0, "{:?}", receiver.lifecycle_events());
    assert_eq!(count("member_added"), 3, "{:?}", receiver.lifecycle_events());

    // Now the user stays away: one member_removed on every node, after about the window.
    let left_at = Instant::now();
    drop(on_b);
    assert_eq!(recv_text(&mut watcher_a), member_removed(room, "1"));
    assert!(left_at.elapsed() >= Duration::from_millis(DEBOUNCE_MS - 100), "{:?}", left_at.elapsed());
    assert_eq!(recv_text(&mut watcher_c), member_removed(room, "1"));
    marker(nodes[2].addr, room, 2, &mut [&mut watcher_a, &mut watcher_c]);
    assert!(eventually(Duration::from_secs(5), || count("member_removed") == 1), "{:?}", receiver.lifecycle_events());
    // A duplicate from another node would come with its next batch (10 ms): give it a few.
    std::thread::sleep(Duration::from_millis(300));
    let removed: Vec<_> = receiver.lifecycle_events().into_iter().filter(|(n, _, _)| n == "member_removed").collect();
    assert_eq!(removed, [("member_removed".to_string(), room.to_string(), "1".to_string())]);
}

/// `GET /channels` with more occupied channels than one pipeline holds: answered whole (the
/// counts go in groups), and the link stays up. One request for every channel used to be over
/// `cluster.pipeline_bytes_max`, which ended the link's session at every poll.
#[test]
fn channel_list_larger_than_a_pipeline() {
    let redis = RedisServer::start();
    let node = node(&redis, "manychannels", |c| {
        c.cluster.pipeline_bytes_max = 65_536;
        c.websocket.messages_per_second_max = 0;
    });
    let names: Vec<String> = (0..400).map(|n| format!("busy-{n:03}-{}", "x".repeat(150))).collect();
    // 100 channels per connection at most (the default limit).
    let mut sockets: Vec<Ws> = (0..4).map(|_| connect(node.addr).0).collect();
    for (n, name) in names.iter().enumerate() {
        subscribe(&mut sockets[n / 100], name);
    }
    let list = || api(node.addr, "GET", &format!("/apps/{APP_ID}/channels"), &[("filter_by_prefix", "busy-")]);
    assert!(eventually(Duration::from_secs(5), || list().1["channels"].as_object().is_some_and(|c| c.len() == 400)));
    let (status, body) = list();
    assert_eq!(status, 200);
    let listed: Vec<&String> = body["channels"].as_object().unwrap().keys().collect();
    assert_eq!(listed, names.iter().collect::<Vec<_>>());
    assert_eq!(http(node.addr, "GET", "/ready", b"").0, 200, "the link stayed up");
}
