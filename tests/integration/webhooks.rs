//! Webhooks end to end: a real receiver on 127.0.0.1, real deliveries, signatures checked
//! byte for byte, retries, dead letters, replay, endpoint health and the SSRF guard.

use std::time::Duration;

use base64::Engine;
use ring::hmac;
use ringwire::config::{Config, DurabilityMode, WebhookConfig};
use serde_json::{json, Value};

use crate::support::*;

fn standard(url: String) -> WebhookConfig {
    WebhookConfig { id: Some("events".into()), ..WebhookConfig::standard(url, WHSEC) }
}

fn pusher(url: String) -> WebhookConfig {
    WebhookConfig { id: Some("lifecycle".into()), ..WebhookConfig::pusher(url) }
}

/// Test settings: private targets allowed, a short retry schedule, a fresh data dir.
fn setup(config: &mut Config, name: &str, hooks: Vec<WebhookConfig>) {
    config.webhooks.data_dir = temp_dir(name);
    config.webhooks.allow_private_targets = true;
    config.webhooks.retry_schedule_ms = vec![0, 100, 200, 300];
    config.webhooks.retry_jitter_percent = 0;
    config.webhooks.retry_overload_floor_ms = 400;
    config.webhooks.batch_ms = 50;
    config.webhooks.request_timeout_ms = 1000;
    config.apps[0].webhooks = hooks;
}

/// Checks a Standard Webhooks signature independently of the server's signer.
fn verify_standard(request: &Received) {
    let id = request.header("webhook-id").expect("webhook-id");
    let timestamp = request.header("webhook-timestamp").expect("webhook-timestamp");
    let key_bytes = base64::engine::general_purpose::STANDARD.decode(&WHSEC[6..]).unwrap();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key_bytes);
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(&request.body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, &content)));
    assert_eq!(request.header("webhook-signature"), Some(expected.as_str()));
    let age = now() as i64 - timestamp.parse::<i64>().unwrap();
    assert!(age.abs() <= 5, "timestamp is the attempt's");
    assert!(id.starts_with("msg_") && !id.contains('.'), "{id}");
}

/// Published events reach the Standard Webhooks endpoint whose globs match them, once per
/// matching channel, signed, with the documented payload; nothing else is sent.
#[test]
fn standard_deliveries_are_filtered_and_signed() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| {
        let mut hook = standard(format!("http://{}/events", receiver.addr));
        hook.channels = Some(vec!["orders-*".into()]);
        hook.event_types = Some(vec!["order.*".into()]);
        setup(c, "standard", vec![hook]);
    });
    assert_eq!(publish(server.addr, &["orders-1", "news"], "order.created", r#"{"id":1}"#, None).0, 200);
    assert_eq!(publish(server.addr, &["orders-2"], "other.event", r#"{"id":2}"#, None).0, 200);
    assert_eq!(publish(server.addr, &["news"], "order.created", r#"{"id":3}"#, None).0, 200);
    assert_eq!(publish(server.addr, &["orders-3"], "order.paid", "plain", None).0, 200);
    let requests = receiver.wait_for(2, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let requests = if requests.len() == 2 { receiver.requests() } else { requests };
    assert_eq!(requests.len(), 2, "{requests:?}");
    let mut bodies: Vec<Value> = requests.iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect();
    bodies.sort_by_key(|b| b["channel"].as_str().unwrap().to_string());
    assert_eq!(bodies[0]["type"], "order.created");
    assert_eq!(bodies[0]["channel"], "orders-1");
    assert_eq!(bodies[0]["data"], json!({"id": 1}));
    assert!(bodies[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(bodies[1]["channel"], "orders-3");
    assert_eq!(bodies[1]["data"], "plain");
    for request in &requests {
        assert_eq!(request.path, "/events");
        assert_eq!(request.header("content-type"), Some("application/json"));
        verify_standard(request);
    }
    assert_eq!(metric(server.addr, "webhook_delivered_total").iter().sum::<u64>(), 2);
}

/// Lifecycle events in Pusher's format from the authoritative home shard: occupied, member
/// added and removed, client event, vacated; signed with the app secret over the exact body.
#[test]
fn pusher_lifecycle_webhooks() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| setup(c, "lifecycle", vec![pusher(format!("http://{}/pusher", receiver.addr))]));
    let (mut ws, socket_id) = connect(server.addr);
    let channel = "presence-room";
    let channel_data = r#"{"user_id":"u1","user_info":{}}"#;
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let signature = hex::encode(hmac::sign(&key, format!("{socket_id}:{channel}:{channel_data}").as_bytes()));
    let auth = format!("{KEY}:{signature}");
    send_json(
        &mut ws,
        json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}),
    );
    assert_eq!(recv_json(&mut ws)["event"], "pusher_internal:subscription_succeeded");
    send_json(&mut ws, json!({"event": "client-typing", "channel": channel, "data": {"on": true}}));
    std::thread::sleep(Duration::from_millis(300));
    drop(ws);
    let mut names = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while names.len() < 5 && std::time::Instant::now() < deadline {
        names = receiver.lifecycle_events().into_iter().map(|(name, _, _)| name).collect();
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client event is sent by the connection's shard, the others by the channel's home
    // shard, in separate deliveries; and the first member's member_added comes from the join
    // while the occupancy comes from the count that follows it. Deliveries are not ordered
    // (as with Svix), so check what came and that the leave follows the join.
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["channel_occupied", "channel_vacated", "client_event", "member_added", "member_removed"]);
    let home: Vec<&String> = names.iter().filter(|n| *n != "client_event").collect();
    assert_eq!(home[2..], ["member_removed", "channel_vacated"], "{names:?}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    for request in receiver.requests() {
        assert_eq!(request.header("x-pusher-key"), Some(KEY));
        assert_eq!(request.header("content-type"), Some("application/json"));
        let expected = hex::encode(hmac::sign(&key, &request.body));
        assert_eq!(request.header("x-pusher-signature"), Some(expected.as_str()));
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert!(body["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
        for event in body["events"].as_array().unwrap() {
            assert_eq!(event["channel"], channel);
            if event["name"] == "client_event" {
                assert_eq!(event["event"], "client-typing");
                assert_eq!(event["user_id"], "u1");
                assert_eq!(event["socket_id"], socket_id.as_str());
                assert_eq!(event["data"], r#"{"on":true}"#);
            }
        }
    }
}

/// A flaky receiver: 500, then 429 with Retry-After, then a timeout, then 200. The attempts
/// follow the schedule (the 429 and the timeout wait at least the overload floor), the
/// webhook id stays the same while the timestamp is re-signed, and the admin API shows it.
#[test]
fn retries_follow_the_schedule() {
    let receiver = Receiver::start();
    receiver.script(&["HTTP/1.1 500 Oops", "HTTP/1.1 429 Slow down\r\nRetry-After: 1", "TIMEOUT"]);
    let server = TestServer::start(|c| {
        setup(c, "flaky", vec![standard(format!("http://{}/", receiver.addr))]);
        // Far above schedule[3] = 300 ms, so that the floor shows plainly in the gap after the
        // timeout (the receiver sees each request a few ms after the server starts its timer).
        c.webhooks.retry_overload_floor_ms = 800;
    });
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200);
    let requests = receiver.wait_for(4, Duration::from_secs(10));
    assert_eq!(requests.len(), 4, "{requests:?}");
    let id = requests[0].header("webhook-id").unwrap().to_string();
    assert!(requests.iter().all(|r| r.header("webhook-id") == Some(id.as_str())));
    requests.iter().for_each(verify_standard);
    let gaps: Vec<u128> = requests.windows(2).map(|w| (w[1].at - w[0].at).as_millis()).collect();
    assert!((90..900).contains(&gaps[0]), "after a 500: schedule[1] = 100 ms, got {gaps:?}");
    assert!(gaps[1] >= 990, "after 429 + Retry-After: 1 s, got {gaps:?}");
    assert!(gaps[2] >= 1000 + 700, "after a timeout (1 s): the 800 ms floor, not 300 ms, got {gaps:?}");
    std::thread::sleep(Duration::from_millis(200));
    let (status, attempts) = api(server.addr, "GET", &format!("/apps/1/webhooks/deliveries/{id}/attempts"), &[]);
    assert_eq!(status, 200, "{attempts}");
    let statuses: Vec<Value> = attempts["attempts"].as_array().unwrap().iter().map(|a| a["status"].clone()).collect();
    assert_eq!(statuses, [json!(500), json!(429), Value::Null, json!(200)]);
    assert_eq!(attempts["attempts"][2]["error"], "timed out");
    let (_, health) = api(server.addr, "GET", "/apps/1/webhooks", &[]);
    let endpoint = &health["endpoints"][0];
    assert_eq!(
        (endpoint["state"].clone(), endpoint["delivered"].clone(), endpoint["failed_attempts"].clone()),
        (json!("healthy"), json!(1), json!(3))
    );
}

/// Exhausted retries make a dead letter, kept and listed; a replay delivers it with the same
/// id. 410 Gone disables the endpoint (visible in health) until it is re-enabled.
#[test]
fn dead_letters_replay_and_410() {
    let receiver = Receiver::start();
    receiver.script(&["HTTP/1.1 503 Down"; 4]);
    let server = TestServer::start(|c| setup(c, "dead", vec![standard(format!("http://{}/", receiver.addr))]));
    assert_eq!(publish(server.addr, &["c"], "e", r#"{"n":1}"#, None).0, 200);
    receiver.wait_for(4, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.requests().len(), 4, "4 attempts in the schedule, then dead");
    let (_, dead) = api(server.addr, "GET", "/apps/1/webhooks/events/dead_letters", &[]);
    let letters = dead["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dead}");
    assert_eq!(metric(server.addr, "webhook_dead_letters").iter().sum::<u64>(), 1);
    let id = letters[0]["webhook_id"].as_str().unwrap().to_string();
    let (status, replayed) = api(server.addr, "POST", &format!("/apps/1/webhooks/deliveries/{id}/replay"), &[]);
    assert_eq!((status, replayed["replayed"][0].as_str()), (200, Some(id.as_str())));
    let requests = receiver.wait_for(5, Duration::from_secs(5));
    assert_eq!(requests[4].header("webhook-id"), Some(id.as_str()));
    std::thread::sleep(Duration::from_millis(200));
    let (_, dead) = api(server.addr, "GET", "/apps/1/webhooks/events/dead_letters", &[]);
    assert_eq!(dead["dead_letters"], json!([]));
    // 410: disabled, the delivery is a dead letter, health says why; enable turns it back on.
    receiver.script(&["HTTP/1.1 410 Gone"]);
    assert_eq!(publish(server.addr, &["c"], "e", r#"{"n":2}"#, None).0, 200);
    receiver.wait_for(6, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let (_, health) = api(server.addr, "GET", "/apps/1/webhooks", &[]);
    assert_eq!(health["endpoints"][0]["state"], "disabled", "{health}");
    assert_eq!(health["endpoints"][0]["last_status"], 410);
    let (status, _) = api(server.addr, "POST", "/apps/1/webhooks/events/enable", &[]);
    assert_eq!(status, 200);
    let (status, replayed) = api(server.addr, "POST", "/apps/1/webhooks/events/replay", &[]);
    assert_eq!((status, replayed["replayed"].as_array().map(Vec::len)), (200, Some(1)), "{replayed}");
    assert_eq!(receiver.wait_for(7, Duration::from_secs(5)).len(), 7);
    let (status, _) = api(server.addr, "GET", "/apps/1/webhooks/nope/dead_letters", &[]);
    assert_eq!(status, 404);
}

/// The SSRF guard: a loopback target is refused by default (visible in metrics and health),
/// and allowed by an allowed_cidrs entry.
#[test]
fn ssrf_guard() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| {
        setup(c, "ssrf", vec![standard(format!("http://{}/", receiver.addr))]);
        c.webhooks.allow_private_targets = false;
    });
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200);
    std::thread::sleep(Duration::from_millis(800));
    assert!(receiver.requests().is_empty());
    assert!(metric(server.addr, "webhook_ssrf_refused_total").iter().sum::<u64>() >= 1);
    let (_, health) = api(server.addr, "GET", "/apps/1/webhooks", &[]);
    assert!(health["endpoints"][0]["last_error"].as_str().unwrap().contains("non-public"), "{health}");
    drop(server);
    let server = TestServer::start(|c| {
        setup(c, "ssrf-allowed", vec![standard(format!("http://{}/", receiver.addr))]);
        c.webhooks.allow_private_targets = false;
        c.webhooks.allowed_cidrs = vec!["127.0.0.0/8".into()];
    });
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200);
    assert_eq!(receiver.wait_for(1, Duration::from_secs(5)).len(), 1);
}

/// `memory` durability delivers too (no disk).
#[test]
fn memory_durability_delivers() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| {
        setup(c, "memory", vec![standard(format!("http://{}/", receiver.addr))]);
        c.webhooks.durability = DurabilityMode::Memory;
    });
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200);
    let requests = receiver.wait_for(1, Duration::from_secs(5));
    assert_eq!(requests.len(), 1);
    verify_standard(&requests[0]);
}

/// `https://` endpoints: the certificate is verified against `ca_file` (a private CA here),
/// the host name is resolved and vetted, and the delivery arrives signed; a receiver whose
/// certificate the client does not trust gets nothing, and the attempt says why.
#[test]
fn https_endpoint_with_a_private_ca() {
    let pki = test_pki();
    let receiver = Receiver::start_tls(vec![pki.leaf_der.clone(), pki.ca_der.clone()], pki.key_der.clone());
    let directory = temp_dir("https-ca");
    let ca_file = directory.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}/secure", receiver.addr.port());
    let server = TestServer::start(|c| {
        setup(c, "https", vec![standard(url.clone())]);
        c.webhooks.ca_file = Some(ca_file.clone());
    });
    assert_eq!(publish(server.addr, &["c"], "e", r#"{"secure":true}"#, None).0, 200);
    let requests = receiver.wait_for(1, Duration::from_secs(5));
    assert_eq!(requests.len(), 1, "delivered over TLS");
    assert_eq!(requests[0].path, "/secure");
    verify_standard(&requests[0]);
    drop(server);

    // Without the CA the certificate is refused: no request arrives, the error is visible.
    let untrusted = Receiver::start_tls(vec![pki.leaf_der.clone()], pki.key_der.clone());
    let url = format!("https://localhost:{}/secure", untrusted.addr.port());
    let server = TestServer::start(|c| setup(c, "https-untrusted", vec![standard(url.clone())]));
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert!(untrusted.requests().is_empty());
    let (_, health) = api(server.addr, "GET", "/apps/1/webhooks", &[]);
    let error = health["endpoints"][0]["last_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("TLS handshake failed"), "{health}");
}

/// A Standard Webhooks endpoint with batching: events arrive in `ringwire.batch` payloads of
/// at most `batch_events_max`, each signed; together they hold every event once.
#[test]
fn standard_batching() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| {
        let mut hook = standard(format!("http://{}/", receiver.addr));
        hook.batch_events_max = Some(5);
        setup(c, "standard-batch", vec![hook]);
    });
    for n in 0..12 {
        assert_eq!(publish(server.addr, &["orders"], "order.created", &format!("{{\"n\":{n}}}"), None).0, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut numbers: Vec<u64> = Vec::new();
    while numbers.len() < 12 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        numbers = receiver
            .requests()
            .iter()
            .flat_map(|r| {
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(body["type"], "ringwire.batch");
                let events = body["data"].as_array().unwrap().clone();
                assert!((1..=5).contains(&events.len()), "{body}");
                events.into_iter().map(|e| e["data"]["n"].as_u64().unwrap())
            })
            .collect();
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (0..12).collect::<Vec<u64>>());
    assert!(receiver.requests().len() >= 3);
    receiver.requests().iter().for_each(verify_standard);
}

/// Receivers written the ways real servers write: head and body in separate writes 50 ms
/// apart, a chunked body in pieces (with an extension and a trailer), a 20 KB body, and a
/// `100 Continue` first. Each delivery is acknowledged by its first attempt: no retry, no
/// failed attempt, nothing dead.
#[test]
fn receivers_that_write_in_pieces() {
    let receiver = Receiver::start();
    let server = TestServer::start(|c| setup(c, "shapes", vec![standard(format!("http://{}/events", receiver.addr))]));
    let shapes = [Shape::HeadThenBody, Shape::Chunked, Shape::LargeBody, Shape::Continue, Shape::Whole];
    let mut expected = 0;
    for shape in shapes {
        receiver.set_shape(shape);
        for i in 0..3 {
            assert_eq!(publish(server.addr, &["orders"], "order.created", &format!(r#"{{"i":{i}}}"#), None).0, 200);
        }
        expected += 3;
        let delivered = || metric(server.addr, "webhook_delivered_total").iter().sum::<u64>();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while delivered() < expected && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(delivered(), expected, "{shape:?}: deliveries acknowledged");
        let failed = metric(server.addr, "webhook_attempts_failed_total").iter().sum::<u64>();
        assert_eq!(failed, 0, "{shape:?}: failed attempts {:?}", api_health(server.addr));
    }
    let requests = receiver.requests();
    let mut ids: Vec<&str> = requests.iter().map(|r| r.header("webhook-id").unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((requests.len(), ids.len()), (expected as usize, expected as usize), "each id sent once");
    requests.iter().for_each(verify_standard);
    assert_eq!(metric(server.addr, "webhook_dead_letters").iter().sum::<u64>(), 0);
}

fn api_health(addr: std::net::SocketAddr) -> Value {
    api(addr, "GET", "/apps/1/webhooks", &[]).1
}

/// A shard whose webhook WAL has failed (its directory vanished, so rotation cannot create the
/// next segment) makes /ready answer 503 with a JSON body naming the shard and the OS error,
/// and it stays failed: publishes are refused rather than accepted without a log.
#[test]
fn failed_wal_makes_ready_503() {
    let receiver = Receiver::start();
    let data_dir = std::sync::Mutex::new(None);
    let server = TestServer::start(|c| {
        setup(c, "wal-failed", vec![standard(format!("http://{}/events", receiver.addr))]);
        c.webhooks.segment_bytes_max = 1024;
        *data_dir.lock().unwrap() = Some(c.webhooks.data_dir.clone());
    });
    let data_dir = data_dir.into_inner().unwrap().unwrap();
    assert_eq!(http(server.addr, "GET", "/ready", b""), (200, r#"{"ready":true}"#.into()));
    std::fs::remove_dir_all(&data_dir).unwrap();
    let data = format!("\"{}\"", "x".repeat(600));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        publish(server.addr, &["orders"], "order.created", &data, None);
        let (status, body) = http(server.addr, "GET", "/ready", b"");
        if status != 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
    };
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["reason"], "webhook WAL failed", "{body}");
    let failed = body["wal_failed"].as_array().expect("a list of failed shards");
    assert!(failed.iter().all(|f| f["shard"].as_u64().is_some_and(|s| s < 2)), "{body}");
    assert!(failed.iter().all(|f| f["error"].as_str().unwrap().contains("os error 2")), "{body}");
    let failed_shards: Vec<u64> = metric(server.addr, "wal_failed");
    assert_eq!(failed_shards.iter().sum::<u64>(), failed.len() as u64, "{failed_shards:?}");
    assert_eq!(http(server.addr, "GET", "/ready", b"").0, 503, "a failed WAL stays failed");
}

/// One endpoint whose receiver is gone fills only its own queue budget: publishes for it
/// get 503 naming the endpoint, while the same app's other endpoint keeps accepting and
/// delivering (before, one shard-wide budget refused every publish once it filled).
#[test]
fn one_full_endpoint_does_not_block_the_others() {
    let receiver = Receiver::start();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = TestServer::start(|c| {
        let mut bad = standard(format!("http://{closed}/gone"));
        bad.id = Some("bad".into());
        bad.channels = Some(vec!["bad-*".into()]);
        let mut good = standard(format!("http://{}/events", receiver.addr));
        good.channels = Some(vec!["good-*".into()]);
        setup(c, "budgets", vec![bad, good]);
        c.server.shards = 1;
        c.webhooks.endpoint_queue_bytes_max = 2_000;
        c.webhooks.queue_bytes_max = 3_000;
    });
    let mut refused = None;
    for i in 0..100 {
        let (status, body) = publish(server.addr, &["bad-1"], "e", &format!("{{\"i\":{i}}}"), None);
        if status == 503 {
            refused = Some(body);
            break;
        }
    }
    let refused = refused.expect("the bad endpoint's budget fills");
    assert!(refused.contains("endpoint 1/bad") && refused.contains("endpoint_queue_bytes_max"), "{refused}");
    for i in 0..5 {
        assert_eq!(publish(server.addr, &["good-1"], "e", &format!("{{\"i\":{i}}}"), None).0, 200);
    }
    assert_eq!(receiver.wait_for(5, Duration::from_secs(5)).len(), 5);
}

/// Dead letters can be deleted one by one or by endpoint (freeing the budget they held), a
/// deletion survives a restart, and nothing else is deleted with them.
#[test]
fn dead_letters_are_deleted_for_good() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let data_dir = temp_dir("delete-dead");
    let config = |c: &mut Config| {
        setup(c, "delete-dead", vec![standard(format!("http://{closed}/gone"))]);
        c.webhooks.data_dir = data_dir.clone();
        c.webhooks.retry_schedule_ms = vec![0];
        c.server.shards = 1;
        c.webhooks.endpoint_queue_bytes_max = 600;
    };
    let server = TestServer::start(config);
    let mut published = 0;
    while publish(server.addr, &["c"], "e", "{}", None).0 == 200 {
        published += 1;
        assert!(published < 50, "the budget fills");
    }
    let dead = |server: &TestServer| metric(server.addr, "webhook_dead_letters").iter().sum::<u64>();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dead(&server) < published && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dead(&server), published);
    let list = |server: &TestServer| -> Vec<String> {
        let (_, body) = api(server.addr, "GET", "/apps/1/webhooks/events/dead_letters", &[]);
        body["dead_letters"].as_array().unwrap().iter().map(|d| d["webhook_id"].as_str().unwrap().to_string()).collect()
    };
    let ids = list(&server);
    assert_eq!(ids.len() as u64, published);

    let one = format!("/apps/1/webhooks/deliveries/{}", ids[0]);
    let (status, body) = api(server.addr, "DELETE", &one, &[]);
    assert_eq!((status, body["deleted"].clone()), (200, json!([ids[0]])));
    assert_eq!(api(server.addr, "DELETE", &one, &[]).0, 404, "deleted once");
    assert_eq!(list(&server), ids[1..]);
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200, "the budget it held is free");
    let wait_dead = |server: &TestServer, n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while dead(server) != n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(dead(server), n);
    };
    wait_dead(&server, published);

    let (status, body) = api(server.addr, "DELETE", "/apps/1/webhooks/events/dead_letters", &[]);
    assert_eq!((status, body["deleted"].as_array().unwrap().len() as u64), (200, published), "{body}");
    assert_eq!((dead(&server), list(&server).len()), (0, 0));
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200);
    wait_dead(&server, 1);
    let kept = list(&server);
    drop(server);

    let server = TestServer::start(config);
    assert_eq!(list(&server), kept, "deleted dead letters stay deleted after a restart");
}

/// Dead letters older than `dead_letter_retention_s` are discarded by the shard's sweep,
/// and the budget they held is free again.
#[test]
fn dead_letters_expire() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = TestServer::start(|c| {
        setup(c, "expire-dead", vec![standard(format!("http://{closed}/gone"))]);
        c.webhooks.retry_schedule_ms = vec![0];
        c.webhooks.dead_letter_retention_s = 1;
        c.server.shards = 1;
        c.webhooks.endpoint_queue_bytes_max = 600;
    });
    let mut published = 0;
    while publish(server.addr, &["c"], "e", "{}", None).0 == 200 {
        published += 1;
        assert!(published < 50, "the budget fills");
    }
    let total = |name: &str| metric(server.addr, name).iter().sum::<u64>();
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while !(total("webhook_dead_letters_total") == published && total("webhook_dead_letters") == 0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!((total("webhook_dead_letters_total"), total("webhook_dead_letters")), (published, 0));
    assert_eq!(publish(server.addr, &["c"], "e", "{}", None).0, 200, "the budget is free again");
}
