//! The operator dashboard over real sockets: off by default, its credential (Bearer header,
//! login form and cookie, wrong tokens refused and counted), the snapshot's contents, and its
//! webhook buttons reaching the admin code path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ringwire::config::{Config, WebhookConfig};
use serde_json::{json, Value};

use crate::support::*;

const TOKEN: &str = "test-dashboard-token-0123456789";

fn enable(config: &mut Config) {
    config.dashboard.enabled = true;
    config.dashboard.token = TOKEN.into();
}

/// A whole answer: status, head (header lines) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head.lines().find(|l| l.to_ascii_lowercase().starts_with(&prefix)).map(|l| l[prefix.len()..].trim())
    }
}

/// One request with extra header lines, on its own connection.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[String], body: &[u8]) -> Answer {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for header in headers {
        text.push_str(&format!("{header}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(text.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer { status, head: head.to_string(), body: body.to_string() }
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

fn snapshot(addr: SocketAddr) -> Value {
    let answer = request(addr, "GET", "/dashboard/api/snapshot", &bearer(TOKEN), b"");
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

fn failures(addr: SocketAddr) -> u64 {
    metric(addr, "dashboard_auth_failures_total").iter().sum()
}

/// Polls the snapshot until `ready` holds of it (or fails after five seconds).
fn snapshot_until(addr: SocketAddr, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = snapshot(addr);
        if ready(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Off by default: every dashboard path is an unknown endpoint, even with the right token.
#[test]
fn disabled_dashboard_is_not_found() {
    let server = TestServer::start(|c| c.dashboard.token = TOKEN.into());
    for path in ["/dashboard", "/dashboard/", "/dashboard/api/snapshot", "/dashboard/dashboard.js"] {
        assert_eq!(request(server.addr, "GET", path, &bearer(TOKEN), b"").status, 404, "{path}");
    }
    assert_eq!(request(server.addr, "POST", "/dashboard/login", &[], b"token=x").status, 404);
}

/// Without a credential only the login page (and its stylesheet) is served; the script and
/// every data and action endpoint answer 401 with a JSON reason, and nothing is counted.
#[test]
fn without_credential_only_the_login_page() {
    let server = TestServer::start(enable);
    let page = request(server.addr, "GET", "/dashboard", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("action=\"/dashboard/login\""), "{}", page.body);
    assert!(!page.body.contains("dashboard.js"), "the login page loads no script");
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'none'"));
    assert_eq!(request(server.addr, "GET", "/dashboard/dashboard.css", &[], b"").status, 200);
    for (method, path) in [
        ("GET", "/dashboard/dashboard.js"),
        ("GET", "/dashboard/api/snapshot"),
        ("GET", "/dashboard/api/apps/1/endpoints/events/dead_letters"),
        ("POST", "/dashboard/api/apps/1/endpoints/events/replay"),
        ("POST", "/dashboard/api/apps/1/endpoints/events/enable"),
        ("POST", "/dashboard/api/apps/1/deliveries/msg_x/replay"),
    ] {
        let answer = request(server.addr, method, path, &[], b"");
        assert_eq!(answer.status, 401, "{method} {path}");
        assert_eq!(answer.json()["status"], 401);
    }
    // A cookie that is not this process's session (e.g. the token itself) is refused too.
    let forged = vec![format!("Cookie: ringwire_dashboard={TOKEN}")];
    assert_eq!(request(server.addr, "GET", "/dashboard/api/snapshot", &forged, b"").status, 401);
    assert_eq!(failures(server.addr), 0);
}

/// A wrong token, as a Bearer header or through the form, is refused with 401 and counted;
/// a prefix of the right one is wrong too.
#[test]
fn wrong_token_is_refused_and_counted() {
    let server = TestServer::start(enable);
    let short = &TOKEN[..TOKEN.len() - 1];
    for token in ["nope", short, "test-dashboard-token-0123456780"] {
        let answer = request(server.addr, "GET", "/dashboard/api/snapshot", &bearer(token), b"");
        assert_eq!(answer.status, 401, "{token}");
        assert_eq!(answer.json()["error"], "wrong dashboard token");
    }
    assert_eq!(request(server.addr, "GET", "/dashboard", &bearer("nope"), b"").status, 401);
    let form = request(server.addr, "POST", "/dashboard/login", &[], b"token=nope");
    assert_eq!(form.status, 401);
    assert!(form.body.contains("Wrong token."), "{}", form.body);
    assert_eq!(form.header("set-cookie"), None);
    assert_eq!(failures(server.addr), 5);
}

/// The right token as a Bearer header opens the page, its script and the data.
#[test]
fn bearer_token_works() {
    let server = TestServer::start(enable);
    let page = request(server.addr, "GET", "/dashboard", &bearer(TOKEN), b"");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/dashboard/dashboard.js"), "{}", page.body);
    let script = request(server.addr, "GET", "/dashboard/dashboard.js", &bearer(TOKEN), b"");
    assert_eq!((script.status, script.header("content-type")), (200, Some("text/javascript; charset=utf-8")));
    assert_eq!(snapshot(server.addr)["shards"].as_array().unwrap().len(), 2);
    assert_eq!(failures(server.addr), 0);
}

/// The login form sets an HttpOnly, SameSite=Strict cookie scoped to /dashboard that opens
/// the data; it is not the token itself; logging out expires it.
#[test]
fn login_form_sets_a_session_cookie() {
    let server = TestServer::start(enable);
    let login = request(server.addr, "POST", "/dashboard/login", &[], format!("token={TOKEN}").as_bytes());
    assert_eq!((login.status, login.header("location")), (303, Some("/dashboard")));
    let set_cookie = login.header("set-cookie").expect("a session cookie");
    assert!(set_cookie.ends_with("; HttpOnly; SameSite=Strict; Path=/dashboard"), "{set_cookie}");
    assert!(!set_cookie.contains(TOKEN), "the cookie holds a derived value, not the token");
    let cookie = vec![format!("Cookie: {}", set_cookie.split(';').next().unwrap())];
    let data = request(server.addr, "GET", "/dashboard/api/snapshot", &cookie, b"");
    assert_eq!(data.status, 200, "{}", data.body);
    assert!(request(server.addr, "GET", "/dashboard", &cookie, b"").body.contains("dashboard.js"));
    let logout = request(server.addr, "POST", "/dashboard/logout", &cookie, b"");
    assert_eq!(logout.status, 303);
    assert!(logout.header("set-cookie").unwrap().contains("Max-Age=0"));
}

/// The snapshot sums channels over both shards, ranks the hottest, counts presence members
/// from their home shard, and its message counters move with a publish.
#[test]
fn snapshot_contents() {
    let server = TestServer::start(enable);
    let mut clients: Vec<_> = (0..3).map(|_| connect(server.addr)).collect();
    for (ws, _) in clients.iter_mut().take(2) {
        subscribe(ws, "hot");
    }
    subscribe(&mut clients[2].0, "cold");
    let channel_data = json!({"user_id": "alice"}).to_string();
    let (ws, socket_id) = &mut clients[2];
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let to_sign = format!("{socket_id}:presence-room:{channel_data}");
    let auth = format!("{KEY}:{}", hex::encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref()));
    let subscribe = json!({"channel": "presence-room", "auth": auth, "channel_data": channel_data});
    send_json(ws, json!({"event": "pusher:subscribe", "data": subscribe}));
    assert_eq!(recv_json(ws)["event"], "pusher_internal:subscription_succeeded");

    let before = snapshot(server.addr);
    let app = &before["apps"][0];
    assert_eq!(app["id"], "1");
    assert_eq!(app["connections"], 3);
    assert_eq!(app["channels"], 3);
    assert_eq!(app["subscriptions"], 4);
    assert_eq!(app["hot_channels"][0], json!({"name": "hot", "subscribers": 2}));
    assert_eq!(app["presence"], json!([{"name": "presence-room", "members": 1}]));
    assert_eq!(app["webhooks"], json!([]));
    assert_eq!(before["totals"]["connections"], 3);
    let shards = before["shards"].as_array().unwrap();
    assert_eq!(shards.iter().map(|s| s["connections"].as_u64().unwrap()).sum::<u64>(), 3);
    assert!(shards.iter().all(|s| s["write_queue_bytes"].is_u64() && s["ring_depth"].is_u64()));

    assert_eq!(publish(server.addr, &["hot"], "tick", "\"1\"", None).0, 200);
    let out = |s: &Value| s["totals"]["messages_out_total"].as_u64().unwrap();
    let published = |s: &Value| s["totals"]["published_total"].as_u64().unwrap();
    let after = snapshot_until(server.addr, "two frames out", |s| out(s) >= out(&before) + 2);
    assert_eq!(published(&after), published(&before) + 1);
    assert!(after["time_ms"].as_u64() >= before["time_ms"].as_u64());
}

/// Messages in and out are counted per app: a publish to one app and pings on another move
/// only their own app's counters, by exactly what each sent and received.
#[test]
fn messages_are_counted_per_app() {
    let server = TestServer::start(|config| {
        enable(config);
        let mut second = ringwire::config::AppConfig::demo();
        second.id = "2".into();
        second.key = "second-app-key".into();
        second.secret = "second-app-secret".into();
        config.apps.push(second);
    });
    let (mut first, _) = connect(server.addr);
    subscribe(&mut first, "hot");
    let mut second = ws_connect(server.addr, "/app/second-app-key?protocol=7");
    assert_eq!(recv_json(&mut second)["event"], "pusher:connection_established");
    subscribe(&mut second, "hot");
    let count = |s: &Value, app: usize, field: &str| {
        s["apps"][app][field].as_u64().unwrap_or_else(|| panic!("apps[{app}].{field} in {s}"))
    };
    // Both subscription_succeeded frames must be counted before the baseline is taken.
    let before = snapshot_until(server.addr, "both subscriptions answered", |s| {
        s["apps"][0]["messages_out_total"].as_u64() >= Some(1) && s["apps"][1]["messages_out_total"].as_u64() >= Some(1)
    });

    assert_eq!(publish(server.addr, &["hot"], "tick", "\"1\"", None).0, 200);
    assert_eq!(recv_json(&mut first)["event"], "tick");
    for _ in 0..3 {
        send_json(&mut second, json!({"event": "pusher:ping", "data": {}}));
        assert_eq!(recv_json(&mut second)["event"], "pusher:pong");
    }

    let after = snapshot_until(server.addr, "the pongs and the tick counted", |s| {
        count(s, 0, "messages_out_total") > count(&before, 0, "messages_out_total")
            && count(s, 1, "messages_out_total") >= count(&before, 1, "messages_out_total") + 3
    });
    assert_eq!(count(&after, 0, "messages_out_total"), count(&before, 0, "messages_out_total") + 1);
    assert_eq!(count(&after, 0, "messages_in_total"), count(&before, 0, "messages_in_total"));
    assert_eq!(count(&after, 1, "messages_out_total"), count(&before, 1, "messages_out_total") + 3);
    assert_eq!(count(&after, 1, "messages_in_total"), count(&before, 1, "messages_in_total") + 3);
}

/// The dashboard's webhook buttons reach the admin code path: a dead letter is listed, its
/// attempts shown, and replaying it delivers it to the receiver; unknown endpoints are 404.
#[test]
fn webhook_actions_go_through_the_admin_path() {
    let receiver = Receiver::start();
    receiver.script(&["HTTP/1.1 500 Broken"]);
    let server = TestServer::start(|c| {
        enable(c);
        c.webhooks.data_dir = temp_dir("dashboard-webhooks");
        c.webhooks.allow_private_targets = true;
        c.webhooks.retry_schedule_ms = vec![0];
        let url = format!("http://{}/events", receiver.addr);
        c.apps[0].webhooks = vec![WebhookConfig { id: Some("events".into()), ..WebhookConfig::standard(url, WHSEC) }];
    });
    assert_eq!(publish(server.addr, &["orders"], "order.created", "\"1\"", None).0, 200);
    let dead = |s: &Value| s["apps"][0]["webhooks"][0]["dead_letters"].as_u64() == Some(1);
    let failing = snapshot_until(server.addr, "a dead letter", dead);
    let endpoint = &failing["apps"][0]["webhooks"][0];
    assert_eq!((endpoint["id"].as_str(), endpoint["last_status"].as_u64()), (Some("events"), Some(500)));
    assert_ne!(endpoint["state"], "healthy");

    let letters =
        request(server.addr, "GET", "/dashboard/api/apps/1/endpoints/events/dead_letters", &bearer(TOKEN), b"");
    assert_eq!(letters.status, 200, "{}", letters.body);
    let id = letters.json()["dead_letters"][0]["webhook_id"].as_str().unwrap().to_string();
    let attempts_path = format!("/dashboard/api/apps/1/deliveries/{id}/attempts");
    let attempts = request(server.addr, "GET", &attempts_path, &bearer(TOKEN), b"").json();
    assert_eq!(attempts["attempts"][0]["status"], 500);

    let replay_path = format!("/dashboard/api/apps/1/deliveries/{id}/replay");
    assert_eq!(request(server.addr, "GET", &replay_path, &bearer(TOKEN), b"").status, 405);
    let replayed = request(server.addr, "POST", &replay_path, &bearer(TOKEN), b"");
    assert_eq!((replayed.status, replayed.json()), (200, json!({"replayed": [id.clone()]})));
    let requests = receiver.wait_for(2, Duration::from_secs(5));
    assert_eq!(requests.len(), 2, "the replay was delivered");
    assert_eq!(requests[1].header("webhook-id"), Some(id.as_str()));

    let enable_path = "/dashboard/api/apps/1/endpoints/events/enable";
    assert_eq!(request(server.addr, "POST", enable_path, &bearer(TOKEN), b"").json(), json!({"enabled": "events"}));
    let unknown = request(server.addr, "POST", "/dashboard/api/apps/1/endpoints/nope/replay", &bearer(TOKEN), b"");
    assert_eq!(unknown.status, 404);
    assert_eq!(
        request(server.addr, "GET", "/dashboard/api/apps/9/endpoints/events/dead_letters", &bearer(TOKEN), b"").status,
        404
    );
}

/// Hostile requests get a status and a JSON reason, never a panic or a page: malformed
/// cookies and Authorization values, bytes that are not UTF-8, odd paths and methods.
#[test]
fn hostile_requests_are_refused_cleanly() {
    let server = TestServer::start(enable);
    let cases: [(&str, &str, Vec<String>, u16); 10] = [
        ("GET", "/dashboard/api/snapshot", vec!["Cookie: ringwire_dashboard".into()], 401),
        ("GET", "/dashboard/api/snapshot", vec!["Cookie: ;;=;ringwire_dashboard=;".into()], 401),
        ("GET", "/dashboard/api/snapshot", vec![format!("Cookie: ringwire_dashboard={}", "a".repeat(4000))], 401),
        ("GET", "/dashboard/api/snapshot", vec!["Authorization: Bearer".into()], 401),
        ("GET", "/dashboard/api/snapshot", vec!["Authorization:".into()], 401),
        ("GET", "/dashboard/api/../../apps/1/channels", bearer(TOKEN), 404),
        ("GET", "/dashboard/api/apps/%ff%00/endpoints/%2e%2e/dead_letters", bearer(TOKEN), 404),
        ("DELETE", "/dashboard/api/snapshot", bearer(TOKEN), 405),
        ("POST", "/dashboard", bearer(TOKEN), 405),
        ("GET", "/dashboard/login", vec![], 405),
    ];
    for (method, path, headers, status) in cases {
        let answer = request(server.addr, method, path, &headers, b"");
        assert_eq!(answer.status, status, "{method} {path} {headers:?}: {}", answer.body);
        assert_eq!(answer.json()["status"], status, "{method} {path}");
    }
    // Raw bytes that are not UTF-8 in the Authorization value and the form body.
    let mut raw = b"GET /dashboard/api/snapshot HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\r\n\r\n".to_vec();
    assert_eq!(raw_http(server.addr, &raw).0, 401);
    raw = b"POST /dashboard/login HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 8\r\n\r\ntoken=\xff\xfe"
        .to_vec();
    assert_eq!(raw_http(server.addr, &raw).0, 401);
    assert_eq!(request(server.addr, "GET", "/health", &[], b"").status, 200, "the node still serves");
}

/// A node of a cluster on `redis` with the dashboard on, named `node_id`, sharing its counts
/// every 100 ms; returns once its links are up.
fn cluster_node(redis: &crate::cluster::RedisServer, node_id: &str) -> TestServer {
    let (url, node_id) = (format!("redis://{}", redis.addr), node_id.to_string());
    let server = TestServer::start(move |c| {
        enable(c);
        c.cluster.redis_url = Some(url);
        c.cluster.prefix = "dash".into();
        c.cluster.node_id = Some(node_id);
        c.cluster.connections_refresh_ms = 100;
        c.cluster.command_timeout_ms = 2000;
        c.cluster.connect_timeout_ms = 500;
    });
    crate::cluster_nodes::wait_ready(server.addr, 200);
    server
}

/// In cluster mode node A's snapshot lists every live node with its lease, its connections
/// (in total and per app) and the sums, exactly; with Redis gone it still answers 200 with A's
/// own numbers and says the cluster view is unavailable, with A's links down.
#[test]
fn cluster_view_lists_every_node_and_the_sums() {
    let mut redis = crate::cluster::RedisServer::start();
    let names = ["node-a", "node-b", "node-c"];
    let nodes: Vec<TestServer> = names.iter().map(|n| cluster_node(&redis, n)).collect();
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for _ in 0..=i {
            clients.push(connect(node.addr).0);
        }
    }
    let connections = |s: &Value| s["cluster"]["sums"]["connections"].as_u64();
    let view = snapshot_until(nodes[0].addr, "every node's connections shared", |s| connections(s) == Some(6));
    let cluster = &view["cluster"];
    assert_eq!(cluster["available"], json!(true), "{cluster}");
    let listed: Vec<(String, u64, Value, bool)> = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n["node"].as_str().unwrap();
            let id = name.split_once('/').unwrap().0.to_string();
            (id, n["connections"].as_u64().unwrap(), n["apps"].clone(), n["this"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("node-a".to_string(), 1, json!({APP_ID: 1}), true),
            ("node-b".to_string(), 2, json!({APP_ID: 2}), false),
            ("node-c".to_string(), 3, json!({APP_ID: 3}), false),
        ]
    );
    for node in cluster["nodes"].as_array().unwrap() {
        let remaining = node["lease_remaining_ms"].as_u64().unwrap();
        assert!(remaining > 0 && remaining <= 30_000, "{node}");
    }
    assert_eq!(cluster["sums"]["nodes"], json!(3));
    assert_eq!(cluster["sums"]["apps"], json!({APP_ID: 6}));
    assert_eq!(cluster["links"], json!([{"shard": 0, "up": true}, {"shard": 1, "up": true}]));

    redis.kill();
    let down = snapshot_until(nodes[0].addr, "the cluster view unavailable", |s| {
        s["cluster"]["available"] == json!(false)
            && s["cluster"]["links"].as_array().unwrap().iter().all(|l| l["up"] == json!(false))
    });
    assert_eq!(down["totals"]["connections"], json!(1), "this node's own numbers stay");
    assert_eq!(down["cluster"]["reason"], json!("the Redis link is down"));
    assert!(down["cluster"]["node"].as_str().unwrap().starts_with("node-a/"));
}
