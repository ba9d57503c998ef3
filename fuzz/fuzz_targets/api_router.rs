//! The whole HTTP API surface behind the head parser — routing, signature checking, the
//! Pusher endpoints and the webhook admin routes — driven with *validly signed* requests
//! (so the fuzzer gets past the signature check) on a one-shard node in this process: no
//! input may panic, and every answer is a known status with a JSON body.
//!
//! The dashboard is on, and every request carries its Bearer token.
//!
//! Input: one byte choosing the method, then lines: the path (relative ones are put under
//! `/apps/1/`), extra query parameters `k=v&k=v`, and the body (the rest).
#![no_main]
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringwire::apps::Apps;
use ringwire::config::{Config, DurabilityMode, WebhookConfig};
use ringwire::http::api;
use ringwire::http::parse::{parse_head, HeadLimits};
use ringwire::metrics::ShardMetrics;
use ringwire::shard::mesh::Mesh;
use ringwire::shard::Shard;
use ringwire::webhook::dispatch::Webhooks;

/// Every request carries it, so the dashboard's routes are reached past their login check.
const DASHBOARD_TOKEN: &str = "fuzz-dashboard-token-0123456789";

type Runtime = monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>;

/// The demo app with a Standard and a Pusher webhook endpoint (in memory; its private
/// address is refused by the SSRF guard, so nothing leaves the process).
fn config() -> Config {
    let mut config = Config::default();
    config.server.shards = 1;
    config.webhooks.durability = DurabilityMode::Memory;
    let url = "http://127.0.0.1:9/hook";
    let standard =
        WebhookConfig { id: Some("events".into()), ..WebhookConfig::standard(url, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD") };
    let pusher = WebhookConfig { id: Some("lifecycle".into()), ..WebhookConfig::pusher(url) };
    config.apps[0].webhooks = vec![standard, pusher];
    config.dashboard.enabled = true;
    config.dashboard.token = DASHBOARD_TOKEN.into();
    config
}

fn start() -> (Runtime, Rc<Shard>) {
    let config = Arc::new(config());
    let apps = Arc::new(Apps::new(&config.apps));
    let mesh = Arc::new(Mesh::new(1, config.mesh.ring_capacity));
    let metrics: Arc<[ShardMetrics]> = vec![ShardMetrics::default()].into();
    let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
    let shard = runtime.block_on(async move {
        let shard = Rc::new(Shard::new(0, config.clone(), apps.clone(), mesh, metrics.clone()));
        let tls = ringwire::webhook::endpoint::tls_connector(&config).unwrap();
        let webhooks = Webhooks::open(0, config, &apps, metrics, tls).await.unwrap().expect("the app has webhooks");
        webhooks.spawn();
        let _ = shard.webhooks_cell.set(webhooks);
        shard.spawn_background();
        shard
    });
    (runtime, shard)
}

thread_local! {
    static NODE: RefCell<(Runtime, Rc<Shard>)> = RefCell::new(start());
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let method = ["GET", "POST", "PUT", "DELETE"][selector as usize % 4];
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.splitn(3, '\n');
    let path = lines.next().unwrap_or("");
    let path = if path.starts_with('/') { path.to_string() } else { format!("/apps/1/{path}") };
    let extra: Vec<(&str, &str)> =
        lines.next().unwrap_or("").split('&').filter_map(|pair| pair.split_once('=')).collect();
    let body = lines.next().unwrap_or("").as_bytes();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let query = ringwire::pusher::auth::signed_query(
        method,
        &path,
        "ringwire-demo-key",
        "ringwire-demo-secret",
        body,
        now,
        &extra,
    );
    let mut request = format!(
        "{method} {path}?{query} HTTP/1.1\r\nAuthorization: Bearer {DASHBOARD_TOKEN}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    // What the server's own head parser refuses never reaches the API.
    let Ok(Some(head)) = parse_head(&request, &HeadLimits::default()) else { return };
    let body = &request[head.head_len..];
    NODE.with(|node| {
        let (runtime, shard) = &mut *node.borrow_mut();
        let response = runtime.block_on(api::handle(shard, &head, body));
        let status = response.status.as_u16();
        assert!(matches!(status, 200 | 400 | 401 | 404 | 405 | 413 | 429 | 503), "{status} for {method} {path}");
        if response.content_type == "application/json" {
            serde_json::from_slice::<serde_json::Value>(&response.body).expect("JSON bodies are JSON");
        }
    });
});
