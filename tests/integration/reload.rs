//! Live reload (`Server::reload`, SIGHUP): apps are added, rotated and removed while the other
//! apps' connections stay up and keep receiving (a removed app's connections are closed with
//! 4001); webhook endpoints change without losing or duplicating a queued delivery; limits
//! apply to new connections; a config file that fails validation changes nothing.

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringwire::config::AppConfig;
use ringwire::Config;
use serde_json::{json, Value};

use crate::support::*;

fn app(id: &str, key: &str, secret: &str) -> AppConfig {
    AppConfig { id: id.into(), key: key.into(), secret: secret.into(), ..AppConfig::demo() }
}

/// Connects with an app key and returns the socket and its socket_id.
fn connect_key(addr: SocketAddr, key: &str) -> (Ws, String) {
    let mut ws = ws_connect(addr, &format!("/app/{key}?protocol=7"));
    let established = recv_json(&mut ws);
    assert_eq!(established["event"], "pusher:connection_established", "{established}");
    let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    (ws, data["socket_id"].as_str().unwrap().to_string())
}

/// Publishes on an app, signed with the given key and secret.
fn publish_as(addr: SocketAddr, id: &str, key: &str, secret: &str, channel: &str, event: &str) -> u16 {
    let body = json!({"name": event, "channels": [channel], "data": "{}"}).to_string();
    let path = format!("/apps/{id}/events");
    let query = ringwire::pusher::auth::signed_query("POST", &path, key, secret, body.as_bytes(), now(), &[]);
    http(addr, "POST", &format!("{path}?{query}"), body.as_bytes()).0
}

/// The next event on a socket is `event` (pings skipped).
fn expect_event(ws: &mut Ws, event: &str) {
    let message = recv_json(ws);
    assert_eq!(message["event"], event, "{message}");
}

/// Under connected, subscribed clients of app A: adding app B lets B's key connect, rotating
/// A's secret makes the new secret sign API requests and private-channel auth (the old one gets
/// 401), removing B closes B's clients with 4001 and refuses its key; A's first connection
/// stays open and receives throughout.
#[test]
fn apps_are_added_rotated_and_removed_live() {
    let a = app(APP_ID, KEY, SECRET);
    let mut config = Config::default();
    let server = TestServer::start(|c| {
        c.apps = vec![a.clone()];
        config = c.clone();
    });
    let addr = server.addr;
    let (mut stay, _) = connect_key(addr, KEY);
    subscribe(&mut stay, "stay");

    // Add B.
    let b = app("b", "key-b", "secret-b");
    config.apps = vec![a.clone(), b.clone()];
    let reloaded = server.server().reload(&config).expect("reloaded");
    assert!(reloaded.apps && reloaded.apps_removed.is_empty() && reloaded.needs_restart.is_empty(), "{reloaded:?}");
    let (mut b_client, _) = connect_key(addr, "key-b");
    subscribe(&mut b_client, "b-news");
    assert_eq!(publish_as(addr, "b", "key-b", "secret-b", "b-news", "to-b"), 200);
    expect_event(&mut b_client, "to-b");
    assert_eq!(publish_as(addr, APP_ID, KEY, SECRET, "stay", "after-add"), 200);
    expect_event(&mut stay, "after-add");

    // Rotate A's secret (and a limit).
    let rotated = AppConfig { secret: "rotated-secret".into(), client_events_per_second_max: 3, ..a.clone() };
    config.apps = vec![rotated.clone(), b.clone()];
    assert!(server.server().reload(&config).expect("reloaded").apps);
    assert_eq!(publish_as(addr, APP_ID, KEY, SECRET, "stay", "old-secret"), 401, "the old secret no longer signs");
    assert_eq!(publish_as(addr, APP_ID, KEY, "rotated-secret", "stay", "new-secret"), 200);
    expect_event(&mut stay, "new-secret");
    let (mut private, socket_id) = connect_key(addr, KEY);
    let sign = |secret: &str| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let signature = ring::hmac::sign(&key, format!("{socket_id}:private-a").as_bytes());
        format!("{KEY}:{}", hex::encode(signature.as_ref()))
    };
    send_json(
        &mut private,
        json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": sign(SECRET)}}),
    );
    let refused = recv_json(&mut private);
    let reason = refused["data"]["message"].as_str().unwrap_or_default();
    assert!(reason.starts_with("Invalid signature"), "the old secret's auth is refused: {refused}");
    send_json(
        &mut private,
        json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": sign("rotated-secret")}}),
    );
    expect_event(&mut private, "pusher_internal:subscription_succeeded");

    // Remove B.
    config.apps = vec![rotated.clone()];
    let reloaded = server.server().reload(&config).expect("reloaded");
    assert_eq!(reloaded.apps_removed, ["b"]);
    let error = recv_json(&mut b_client);
    assert_eq!((error["event"].as_str(), error["data"]["code"].as_u64()), (Some("pusher:error"), Some(4001)));
    assert_eq!(recv_close(&mut b_client), 4001);
    let mut refused = ws_connect(addr, "/app/key-b?protocol=7");
    assert_eq!(recv_json(&mut refused)["data"]["code"], 4001, "the removed key is unknown");
    assert_eq!(publish_as(addr, "b", "key-b", "secret-b", "b-news", "gone"), 404);
    assert_eq!(publish_as(addr, APP_ID, KEY, "rotated-secret", "stay", "after-remove"), 200);
    expect_event(&mut stay, "after-remove");
    let total = |name: &str| metric(addr, name).iter().sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(5);
    while total("connections") != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(total("connections"), 2, "A's two connections stay, B's is gone");
    assert_eq!((total("config_reloads_total"), total("config_reload_failures_total")), (3, 0));
}

/// Starts the binary on a config file, its stderr to a file; returns it and its address.
fn start_node(config: &std::path::Path, stderr: &std::path::Path) -> (std::process::Child, SocketAddr) {
    let (child, mut stdout) = spawn_node(config, stderr);
    let mut line = String::new();
    while !line.contains("listening on ") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the node printed its address");
    }
    let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
    (child, rest.split(' ').next().unwrap().parse().unwrap())
}

/// Connecting with a key answers connection_established (true) or a 4001 error (false).
fn key_connects(addr: SocketAddr, key: &str) -> bool {
    let mut ws = ws_connect(addr, &format!("/app/{key}?protocol=7"));
    let message = recv_json(&mut ws);
    message["event"] == "pusher:connection_established"
}

/// The binary applies `[[apps]]` on SIGHUP while a client of another app stays connected, and
/// refuses a config file that fails validation whole: the apps it adds or removes and the
/// limits it changes stay as they were and the error names the line.
#[test]
fn sighup_reloads_apps_and_refuses_a_broken_file_whole() {
    let dir = temp_dir("reload-apps-hup");
    let config_path = dir.join("ringwire.toml");
    let head = "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\n";
    let app_a = format!("[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n");
    let app_b = "[[apps]]\nid = \"b\"\nkey = \"key-b\"\nsecret = \"secret-b\"\n";
    std::fs::write(&config_path, format!("{head}{app_a}")).unwrap();
    let stderr_path = dir.join("stderr.log");
    let (mut child, addr) = start_node(&config_path, &stderr_path);
    let (mut stay, _) = connect_key(addr, KEY);
    subscribe(&mut stay, "stay");
    let hup = || std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    let poll = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !what() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        what()
    };

    std::fs::write(&config_path, format!("{head}{app_a}{app_b}")).unwrap();
    assert!(hup().success());
    assert!(poll(&|| key_connects(addr, "key-b")), "app b is served after SIGHUP");

    // Removes b, adds c, lowers the message size, and has an unknown key on line 14: refused
    // whole.
    let app_c = "[[apps]]\nid = \"c\"\nkey = \"key-c\"\nsecret = \"secret-c\"\nsekret = \"typo\"\n";
    let limit = "[websocket]\nmessage_bytes_max = 1000\n";
    std::fs::write(&config_path, format!("{head}{limit}{app_a}{app_c}")).unwrap();
    assert!(hup().success());
    let refused = poll(&|| std::fs::read_to_string(&stderr_path).unwrap().contains("config reload refused"));
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(refused && log.contains("line 14"), "{log}");
    assert!(key_connects(addr, "key-b") && !key_connects(addr, "key-c"), "nothing changed");
    let (mut fresh, _) = connect_key(addr, KEY);
    send_json(&mut fresh, big_ping(2000));
    assert_eq!(recv_json(&mut fresh)["event"], "pusher:pong", "the message size did not change");
    assert_eq!(publish(addr, &["stay"], "still-here", "{}", None).0, 200);
    expect_event(&mut stay, "still-here");
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `what` until it holds or 10 s pass; returns whether it held.
fn eventually(what: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !what() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    what()
}

/// An http URL on a port nobody listens on (connections are refused).
fn closed_url() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/gone", closed.local_addr().unwrap())
}

/// A Standard Webhooks endpoint of the test app, with an explicit id (its identity across
/// reloads).
fn endpoint(id: &str, url: String) -> ringwire::config::WebhookConfig {
    ringwire::config::WebhookConfig { id: Some(id.into()), ..ringwire::config::WebhookConfig::standard(url, WHSEC) }
}

/// The webhook ids a receiver got, each once (asserted), and their event names.
fn delivered(receiver: &Receiver) -> Vec<String> {
    let requests = receiver.requests();
    let mut ids: Vec<&str> = requests.iter().map(|r| r.header("webhook-id").unwrap()).collect();
    ids.sort_unstable();
    let count = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), count, "a delivery arrived twice");
    let body = |r: &Received| serde_json::from_slice::<Value>(&r.body).unwrap()["type"].to_string();
    requests.iter().map(body).collect()
}

/// Under a connected, subscribed crowd, with deliveries queued for retry to a dead address:
/// changing the endpoint's URL sends every queued delivery to the new URL exactly once; an
/// added endpoint gets the events published after the reload only; a removed endpoint's
/// queued deliveries become dead letters. The crowd stays connected and receives throughout.
#[test]
fn webhook_endpoints_change_live_without_losing_a_delivery() {
    let dead_url = closed_url();
    let (moved, added) = (Receiver::start(), Receiver::start());
    let mut config = Config::default();
    let server = TestServer::start(|c| {
        c.server.shards = 2;
        c.webhooks.data_dir = temp_dir("reload-webhooks");
        c.webhooks.allow_private_targets = true;
        // Attempts every 100 ms for 20 s: queued deliveries wait in their retry timers.
        c.webhooks.retry_schedule_ms = std::iter::once(0).chain(std::iter::repeat_n(100, 200)).collect();
        c.webhooks.retry_jitter_percent = 0;
        c.webhooks.breaker_failures = 1000;
        c.apps[0].webhooks = vec![endpoint("orders", dead_url.clone())];
        config = c.clone();
    });
    let addr = server.addr;
    let mut crowd: Vec<Ws> = (0..10).map(|_| connect(addr).0).collect();
    for ws in &mut crowd {
        subscribe(ws, "crowd");
    }
    let everyone_gets = |crowd: &mut Vec<Ws>, event: &str| {
        assert_eq!(publish(addr, &["crowd"], event, "{}", None).0, 200);
        for ws in crowd.iter_mut() {
            let message = recv_json(ws);
            assert_eq!(message["event"], event, "{message}");
        }
    };
    let total = |name: &str| metric(addr, name).iter().sum::<u64>();
    for n in 0..8 {
        everyone_gets(&mut crowd, &format!("queued-{n}"));
    }
    assert!(eventually(|| total("webhook_attempts_failed_total") >= 16), "every delivery failed at least twice");

    // Change the URL of `orders` and add `audit`.
    config.apps[0].webhooks = vec![
        endpoint("orders", format!("http://{}/orders", moved.addr)),
        endpoint("audit", format!("http://{}/audit", added.addr)),
    ];
    let reloaded = server.server().reload(&config).expect("reloaded");
    assert!(reloaded.apps && reloaded.needs_restart.is_empty(), "{reloaded:?}");
    assert!(eventually(|| moved.requests().len() >= 8), "the queued deliveries reach the new URL");
    everyone_gets(&mut crowd, "after-add");
    assert!(eventually(|| added.requests().len() == 1 && moved.requests().len() == 9));
    assert!(eventually(|| total("webhook_pending") == 0));
    let mut events = delivered(&moved);
    events.sort();
    let mut expected: Vec<String> = (0..8).map(|n| format!("\"queued-{n}\"")).collect();
    expected.push("\"after-add\"".into());
    expected.sort();
    assert_eq!(events, expected, "each queued delivery once, none lost");
    assert_eq!(delivered(&added), ["\"after-add\""], "an added endpoint gets only later events");

    // Point `orders` at the dead address again, queue three, then remove it.
    config.apps[0].webhooks[0].url = dead_url.clone();
    server.server().reload(&config).expect("reloaded");
    for n in 0..3 {
        everyone_gets(&mut crowd, &format!("doomed-{n}"));
    }
    assert!(eventually(|| added.requests().len() == 4), "audit gets them");
    assert!(eventually(|| total("webhook_pending") == 3), "orders keeps its three queued");
    config.apps[0].webhooks.remove(0);
    server.server().reload(&config).expect("reloaded");
    assert!(eventually(|| total("webhook_dead_letters") == 3), "the removed endpoint's queue is dead-lettered");
    assert_eq!(total("webhook_pending"), 0);
    everyone_gets(&mut crowd, "after-remove");
    assert!(eventually(|| added.requests().len() == 5));
    assert_eq!(moved.requests().len(), 9, "nothing more for the removed endpoint");
    assert_eq!(total("connections"), 10, "the crowd stayed");
}

/// A `pusher:ping` of about `bytes` bytes.
fn big_ping(bytes: usize) -> Value {
    json!({"event": "pusher:ping", "data": "x".repeat(bytes)})
}

/// Lowering `websocket.message_bytes_max` and `http.body_bytes_max` live: a new connection's
/// oversized message is closed with 1009 and an oversized API body gets 413, while a
/// connection from before keeps its limit and the crowd stays; a restart-only key in the same
/// file is named and not applied.
#[test]
fn limits_change_live_for_new_connections() {
    let mut config = Config::default();
    let server = TestServer::start(|c| {
        c.server.shards = 2;
        config = c.clone();
    });
    let addr = server.addr;
    let mut crowd: Vec<Ws> = (0..10).map(|_| connect(addr).0).collect();
    for ws in &mut crowd {
        subscribe(ws, "crowd");
    }
    config.websocket.message_bytes_max = 1000;
    config.http.body_bytes_max = 500;
    config.server.backlog += 1;
    let reloaded = server.server().reload(&config).expect("reloaded");
    assert!(reloaded.settings && !reloaded.apps, "{reloaded:?}");
    assert_eq!(reloaded.needs_restart, ["server.backlog"]);
    let (mut fresh, _) = connect(addr);
    send_json(&mut fresh, big_ping(2000));
    assert_eq!(recv_close(&mut fresh), 1009, "over the new limit: message too big");
    send_json(&mut crowd[0], big_ping(2000));
    assert_eq!(recv_json(&mut crowd[0])["event"], "pusher:pong", "an older connection keeps its limit");
    let (status, body) = publish(addr, &["crowd"], "too-big", &"x".repeat(600), None);
    assert_eq!(status, 413, "{body}");
    assert_eq!(publish(addr, &["crowd"], "small", "{}", None).0, 200);
    for ws in &mut crowd {
        assert_eq!(recv_json(ws)["event"], "small");
    }
    let total = |name: &str| metric(addr, name).iter().sum::<u64>();
    assert!(eventually(|| total("connections") == 10), "the crowd stayed, the refused one is gone");
}

/// A config file with the test app and these `(id, url)` Standard Webhooks endpoints, in order.
fn webhook_config(data_dir: &std::path::Path, endpoints: &[(&str, String)]) -> String {
    let mut text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\n[webhooks]\ndata_dir = {:?}\nallow_private_targets = true\n\
         retry_schedule_ms = [0, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]\n\
         [[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n",
        data_dir.to_str().unwrap()
    );
    for (id, url) in endpoints {
        text += &format!(
            "[[apps.webhooks]]\nid = \"{id}\"\nurl = \"{url}\"\nformat = \"standard\"\nsecret = \"{WHSEC}\"\n"
        );
    }
    text
}

/// The WAL names endpoints by key: deliveries queued before and after a SIGHUP that inserts an
/// endpoint ahead of another survive `kill -9`, and the restart on a config that lists them
/// in that new order sends each endpoint its own deliveries, once.
#[test]
fn kill_9_after_a_reload_keeps_each_endpoint_its_own_deliveries() {
    let dir = temp_dir("reload-kill-9");
    let (config_path, stderr_path) = (dir.join("ringwire.toml"), dir.join("stderr.log"));
    let data_dir = dir.join("data");
    std::fs::write(&config_path, webhook_config(&data_dir, &[("orders", closed_url())])).unwrap();
    let (mut child, addr) = start_node(&config_path, &stderr_path);
    for n in 0..5 {
        assert_eq!(publish(addr, &["a"], &format!("a-{n}"), "{}", None).0, 200);
    }
    let reordered = [("audit", closed_url()), ("orders", closed_url())];
    std::fs::write(&config_path, webhook_config(&data_dir, &reordered)).unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    let reloaded = || std::fs::read_to_string(&stderr_path).unwrap().contains("config reloaded");
    assert!(eventually(reloaded), "{}", std::fs::read_to_string(&stderr_path).unwrap());
    for n in 0..3 {
        assert_eq!(publish(addr, &["b"], &format!("b-{n}"), "{}", None).0, 200);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (orders, audit) = (Receiver::start(), Receiver::start());
    let urls = [("audit", format!("http://{}/", audit.addr)), ("orders", format!("http://{}/", orders.addr))];
    std::fs::write(&config_path, webhook_config(&data_dir, &urls)).unwrap();
    let (mut child, addr) = start_node(&config_path, &stderr_path);
    let events = |receiver: &Receiver| {
        let mut events = delivered(receiver);
        events.sort();
        events
    };
    let quote = |names: &[&str]| names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>();
    // Nothing pending on any shard: everything recovered was delivered (and no more will be).
    let pending = || metric(addr, "webhook_pending").iter().sum::<u64>();
    assert!(eventually(|| orders.requests().len() >= 8 && audit.requests().len() >= 3 && pending() == 0));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(events(&orders), quote(&["a-0", "a-1", "a-2", "a-3", "a-4", "b-0", "b-1", "b-2"]));
    assert_eq!(events(&audit), quote(&["b-0", "b-1", "b-2"]), "audit existed only after the reload");
}

/// Deliveries the log holds for an endpoint the config left out at start (kept aside, not
/// sent) go out once a reload configures that endpoint again, each once.
#[test]
fn a_reload_that_brings_an_endpoint_back_sends_what_it_left_in_the_log() {
    let data_dir = temp_dir("reload-orphans");
    let settings = |c: &mut Config| {
        c.webhooks.data_dir = data_dir.clone();
        c.webhooks.allow_private_targets = true;
        c.webhooks.retry_schedule_ms = std::iter::once(0).chain(std::iter::repeat_n(200, 100)).collect();
        c.webhooks.breaker_failures = 1000;
    };
    {
        let server = TestServer::start(|c| {
            settings(c);
            c.apps[0].webhooks = vec![endpoint("orders", closed_url()), endpoint("audit", closed_url())];
        });
        for n in 0..3 {
            assert_eq!(publish(server.addr, &["a"], &format!("left-{n}"), "{}", None).0, 200);
        }
    }
    let receiver = Receiver::start();
    let mut config = Config::default();
    let server = TestServer::start(|c| {
        settings(c);
        c.apps[0].webhooks = vec![endpoint("audit", closed_url())];
        config = c.clone();
    });
    let pending = || metric(server.addr, "webhook_pending").iter().sum::<u64>();
    assert_eq!(pending(), 3, "only audit's three are queued; orders' are kept aside");
    config.apps[0].webhooks.push(endpoint("orders", format!("http://{}/", receiver.addr)));
    assert!(server.server().reload(&config).expect("reloaded").needs_restart.is_empty());
    assert!(eventually(|| receiver.requests().len() >= 3 && pending() == 3), "orders' three delivered");
    let mut events = delivered(&receiver);
    events.sort();
    assert_eq!(events, ["\"left-0\"", "\"left-1\"", "\"left-2\""]);
}

/// Whether the node closes a new connection at once (over `connections_per_shard_max`) rather
/// than answering a request on it.
fn refused_at_accept(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.is_empty()
}

/// Lowering `server.connections_per_shard_max` live refuses the next connection over it while
/// the open ones stay; raising it admits again.
#[test]
fn connection_limit_changes_live() {
    let mut config = Config::default();
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        config = c.clone();
    });
    let addr = server.addr;
    let mut open: Vec<Ws> = (0..3).map(|_| connect(addr).0).collect();
    assert!(!refused_at_accept(addr));
    config.server.connections_per_shard_max = 3;
    assert!(server.server().reload(&config).expect("reloaded").settings);
    assert!(refused_at_accept(addr), "a fourth socket is over the new limit");
    for ws in &mut open {
        send_json(ws, json!({"event": "pusher:ping", "data": {}}));
        assert_eq!(recv_json(ws)["event"], "pusher:pong", "the open ones stay");
    }
    config.server.connections_per_shard_max = 100;
    server.server().reload(&config).expect("reloaded");
    assert!(!refused_at_accept(addr));
}
