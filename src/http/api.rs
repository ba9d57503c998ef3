//! The Pusher-compatible HTTP API and the operational endpoints.
//!
//! Routes: `POST /apps/{id}/events`, `POST /apps/{id}/batch_events`, `GET /apps/{id}/channels`,
//! `GET /apps/{id}/channels/{name}`, `GET /apps/{id}/channels/{name}/users`,
//! `POST /apps/{id}/users/{user}/terminate_connections`, the webhook admin routes under
//! `/apps/{id}/webhooks` (docs/webhooks.md), and unsigned `GET /health`, `/ready`, `/metrics`.
//! Every `/apps/` request is signed (`pusher::auth`). Errors are JSON bodies with a reason.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::apps::App;
use crate::cluster::message::Kind;
use crate::cluster::outbound::Unavailable;
use crate::http::parse::{error_body, RequestHead};
use crate::metrics::{self, ShardMetrics};
use crate::pusher::auth::{self, param, parse_query, Params, SignedRequest};
use crate::pusher::channel::{self, ChannelKind};
use crate::pusher::message::{self, SocketId};
use crate::shard::accept::{Acknowledged, NotAccepted};
use crate::shard::cluster_link::ClusterHandle;
use crate::shard::mesh::{Query, QueryReply};
use crate::shard::Shard;
use crate::wal::Lsn;
use crate::webhook::admin::{self, AdminAnswer, AdminRequest};
use crate::webhook::dispatch::Refused;

pub use crate::pusher::message::EVENT_NAME_BYTES_MAX;

/// An HTTP response before framing.
#[derive(Debug)]
pub struct Response {
    /// Status.
    pub status: StatusCode,
    /// Content-Type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// More header lines, each ending in CRLF (the dashboard's cookie and page headers).
    pub extra_headers: String,
}

impl Response {
    pub(crate) fn json(status: StatusCode, value: &Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(value).expect("JSON values serialize"),
            extra_headers: String::new(),
        }
    }

    pub(crate) fn error(status: StatusCode, reason: &str) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: error_body(status, reason),
            extra_headers: String::new(),
        }
    }
}

type ApiResult = Result<Response, Response>;

fn bad_request(reason: impl AsRef<str>) -> Response {
    Response::error(StatusCode::BAD_REQUEST, reason.as_ref())
}

/// Routes and answers one request.
pub async fn handle(shard: &Shard, head: &RequestHead, body: &[u8]) -> Response {
    let segments: Vec<&str> = head.path.split('/').skip(1).collect();
    let result = match segments.as_slice() {
        ["health"] => only_get(head).map(|()| health(shard)),
        ["ready"] => only_get(head).map(|()| ready(shard)),
        ["metrics"] => only_get(head).map(|()| metrics_text(shard)),
        ["dashboard", ..] => Ok(crate::http::dashboard::handle(shard, head, body).await),
        ["apps", app_id, rest @ ..] => app_request(shard, head, body, app_id, rest).await,
        _ => Err(Response::error(StatusCode::NOT_FOUND, "no such endpoint")),
    };
    result.unwrap_or_else(|error| error)
}

fn only(head: &RequestHead, method: Method) -> Result<(), Response> {
    if head.method == method {
        Ok(())
    } else {
        Err(Response::error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {method} on this endpoint")))
    }
}

fn only_get(head: &RequestHead) -> Result<(), Response> {
    only(head, Method::GET)
}

/// The shards whose threads died (the node is stopping).
fn shards_down(shard: &Shard) -> Vec<usize> {
    let down = |m: &ShardMetrics| m.shard_down.load(std::sync::atomic::Ordering::Relaxed) != 0;
    shard.all_metrics.iter().enumerate().filter(|(_, m)| down(m)).map(|(i, _)| i).collect()
}

/// 200 while every shard runs; 503 naming the shards whose threads died.
fn health(shard: &Shard) -> Response {
    let down = shards_down(shard);
    if down.is_empty() {
        Response::json(StatusCode::OK, &json!({"ok": true}))
    } else {
        Response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"ok": false, "shards_down": down}))
    }
}

fn ready(shard: &Shard) -> Response {
    let down = shards_down(shard);
    if !down.is_empty() {
        let body = json!({"ready": false, "reason": "a shard died", "shards_down": down});
        return Response::json(StatusCode::SERVICE_UNAVAILABLE, &body);
    }
    if shard.is_shutting_down() {
        return Response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false, "reason": "shutting down"}));
    }
    // Cluster mode: a shard whose Redis link is down cannot publish or receive cluster-wide
    // (docs/cluster.md, "When Redis is unreachable"); single-node shards keep the gauge at 0.
    let link_down: Vec<usize> = (shard.all_metrics.iter().enumerate())
        .filter(|(_, m)| m.cluster_link_down.load(std::sync::atomic::Ordering::Relaxed) != 0)
        .map(|(index, _)| index)
        .collect();
    if !link_down.is_empty() {
        let body = json!({"ready": false, "reason": "redis link down", "cluster_link_down": link_down});
        return Response::json(StatusCode::SERVICE_UNAVAILABLE, &body);
    }
    // A failed webhook WAL stays failed until a restart (docs/wal.md): not ready, naming each
    // failed shard and its error, so an orchestrator stops routing here and restarts it.
    let failed: Vec<serde_json::Value> = (shard.all_metrics.iter().enumerate())
        .filter(|(_, m)| m.wal_failed.load(std::sync::atomic::Ordering::Acquire) != 0)
        .map(|(index, m)| {
            let code = m.wal_failed_os_error.load(std::sync::atomic::Ordering::Relaxed);
            let error = match i32::try_from(code) {
                Ok(code) if code != 0 => std::io::Error::from_raw_os_error(code).to_string(),
                _ => "storage error (see the log)".to_string(),
            };
            json!({"shard": index, "error": error})
        })
        .collect();
    if failed.is_empty() {
        Response::json(StatusCode::OK, &json!({"ready": true}))
    } else {
        let body = json!({"ready": false, "reason": "webhook WAL failed", "wal_failed": failed});
        Response::json(StatusCode::SERVICE_UNAVAILABLE, &body)
    }
}

fn metrics_text(shard: &Shard) -> Response {
    let depths: Vec<usize> = (0..shard.mesh.shards()).map(|i| shard.mesh.depth(i)).collect();
    let text = metrics::render(&shard.all_metrics, &depths, !shard.is_shutting_down());
    let content_type = "text/plain; version=0.0.4";
    Response { status: StatusCode::OK, content_type, body: text.into_bytes(), extra_headers: String::new() }
}

async fn app_request(shard: &Shard, head: &RequestHead, body: &[u8], app_id: &str, rest: &[&str]) -> ApiResult {
    let apps = shard.apps();
    let app = apps
        .by_id(app_id)
        .ok_or_else(|| Response::error(StatusCode::NOT_FOUND, &format!("unknown app id {app_id}")))?;
    // Check the route and method before the signature so a wrong URL says so.
    let route = match rest {
        ["events"] => (Method::POST, Route::Events),
        ["batch_events"] => (Method::POST, Route::BatchEvents),
        ["channels"] => (Method::GET, Route::Channels),
        ["channels", name] => (Method::GET, Route::Channel(name)),
        ["channels", name, "users"] => (Method::GET, Route::Users(name)),
        ["users", user_id, "terminate_connections"] => (Method::POST, Route::Terminate(user_id)),
        ["webhooks"] => (Method::GET, Route::Webhooks(AdminRequest::Health)),
        ["webhooks", "deliveries", id, "attempts"] => {
            (Method::GET, Route::Webhooks(AdminRequest::Attempts { webhook_id: id.to_string() }))
        }
        ["webhooks", "deliveries", id] => {
            (Method::DELETE, Route::Webhooks(AdminRequest::Delete { webhook_id: id.to_string() }))
        }
        ["webhooks", "deliveries", id, "replay"] => {
            (Method::POST, Route::Webhooks(AdminRequest::Replay { webhook_id: id.to_string() }))
        }
        ["webhooks", endpoint, "dead_letters"] if head.method == Method::DELETE => {
            let range = AdminRequest::DeleteRange { endpoint: endpoint.to_string(), from_ms: 0, to_ms: u64::MAX };
            (Method::DELETE, Route::Webhooks(range))
        }
        ["webhooks", endpoint, "dead_letters"] => {
            (Method::GET, Route::Webhooks(AdminRequest::DeadLetters { endpoint: endpoint.to_string() }))
        }
        ["webhooks", endpoint, "enable"] => {
            (Method::POST, Route::Webhooks(AdminRequest::Enable { endpoint: endpoint.to_string() }))
        }
        ["webhooks", endpoint, "replay"] => {
            let range = AdminRequest::ReplayRange { endpoint: endpoint.to_string(), from_ms: 0, to_ms: u64::MAX };
            (Method::POST, Route::Webhooks(range))
        }
        _ => return Err(Response::error(StatusCode::NOT_FOUND, "no such endpoint")),
    };
    only(head, route.0)?;
    let params = parse_query(&head.query);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let request = SignedRequest { method: head.method.as_str(), path: &head.path, params: &params, body };
    auth::verify(&request, &app.config.key, &app.secret_key, now)
        .map_err(|e| Response::error(StatusCode::UNAUTHORIZED, &e.0))?;
    match route.1 {
        Route::Events => events(shard, app, body).await,
        Route::BatchEvents => batch_events(shard, app, body).await,
        Route::Channels => channels(shard, app, &params).await,
        Route::Channel(name) => channel_info(shard, app, name, &params).await,
        Route::Users(name) => users(shard, app, name).await,
        Route::Terminate(user_id) => {
            let user_id = percent_encoding::percent_decode_str(user_id).decode_utf8_lossy();
            match shard.cluster() {
                // Through Redis to every node (this one too), answered after Redis executed it.
                Some(cluster) => cluster.terminate_user(app.index, &user_id).await.map_err(cluster_unavailable)?,
                None => shard.terminate_user(app.index, &user_id),
            }
            Ok(Response::json(StatusCode::OK, &json!({})))
        }
        Route::Webhooks(request) => webhooks_admin(shard, app, request, &params).await,
    }
}

enum Route<'a> {
    Events,
    BatchEvents,
    Channels,
    Channel(&'a str),
    Users(&'a str),
    Terminate(&'a str),
    Webhooks(AdminRequest),
}

/// One event as the SDKs send it. Unknown fields are ignored, as other servers do.
#[derive(Deserialize)]
struct EventRequest<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channels: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    socket_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    info: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    batch: Vec<EventRequest<'a>>,
}

/// A validated event, ready to publish.
struct Event<'a> {
    name: &'a str,
    data: &'a RawValue,
    channels: Vec<&'a str>,
    exclude: Option<SocketId>,
    info: Info,
}

/// Which `info` attributes were asked for.
#[derive(Default, Clone, Copy)]
struct Info {
    subscription_count: bool,
    user_count: bool,
    cache: bool,
}

fn parse_info(info: Option<&str>) -> Result<Info, Response> {
    let mut parsed = Info::default();
    for attribute in info.unwrap_or("").split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match attribute {
            "subscription_count" => parsed.subscription_count = true,
            "user_count" => parsed.user_count = true,
            "cache" => parsed.cache = true,
            other => return Err(bad_request(format!("unknown info attribute {other}"))),
        }
    }
    Ok(parsed)
}

fn validate_event<'a>(app: &App, request: &'a EventRequest<'a>, single_channel: bool) -> Result<Event<'a>, Response> {
    let name = request.name.as_deref().ok_or_else(|| bad_request("missing event name"))?;
    if name.is_empty() || name.len() > EVENT_NAME_BYTES_MAX {
        return Err(bad_request(format!("event name must be 1 to {EVENT_NAME_BYTES_MAX} characters")));
    }
    let data = request.data.ok_or_else(|| bad_request("missing data"))?;
    // Pusher measures the data "in bytes within the HTTP POST body": the string's raw bytes.
    let raw = data.get();
    let data_len = if raw.starts_with('"') { raw.len() - 2 } else { raw.len() };
    if data_len > app.config.event_data_bytes_max {
        return Err(Response::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("event data of {data_len} bytes exceeds the limit of {} bytes", app.config.event_data_bytes_max),
        ));
    }
    let channels: Vec<&str> = match (&request.channel, &request.channels) {
        (Some(channel), None) => vec![channel.as_ref()],
        (None, Some(channels)) if !single_channel => channels.iter().map(|c| c.as_ref()).collect(),
        (None, Some(_)) => return Err(bad_request("batch events name one `channel`")),
        (Some(_), Some(_)) => return Err(bad_request("give either `channel` or `channels`, not both")),
        (None, None) => return Err(bad_request("missing channel or channels")),
    };
    if channels.is_empty() || channels.len() > app.config.event_channels_max {
        return Err(bad_request(format!("an event names 1 to {} channels", app.config.event_channels_max)));
    }
    for channel in &channels {
        channel::validate(channel).map_err(|e| bad_request(format!("invalid channel {channel:?}: {e}")))?;
    }
    let exclude = match request.socket_id.as_deref() {
        None => None,
        Some(text) => Some(SocketId::parse(text).ok_or_else(|| bad_request(format!("invalid socket_id {text:?}")))?),
    };
    let info = parse_info(request.info.as_deref())?;
    if info.user_count && channels.iter().any(|c| ChannelKind::of(c) != ChannelKind::Presence) {
        return Err(bad_request("info=user_count applies only to presence channels"));
    }
    if info.cache {
        return Err(bad_request("info=cache applies to channel queries, not to publishing"));
    }
    Ok(Event { name, data, channels, exclude, info })
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

async fn publish(shard: &Shard, app: &App, event: &Event<'_>) -> Result<Option<Value>, Response> {
    if let Some(cluster) = shard.cluster() {
        publish_cluster(cluster, app, event).await?;
    } else {
        for channel in &event.channels {
            let frame = message::channel_event(event.name, channel, event.data);
            if channel::is_cache(channel) {
                shard.cache_store(app.index, channel, frame.clone(), event.data.get());
            }
            shard.publish(app.index, channel, frame, event.exclude).await;
        }
    }
    ShardMetrics::add(&shard.metrics().published_total, event.channels.len() as u64);
    if !(event.info.subscription_count || event.info.user_count) {
        return Ok(None);
    }
    let mut channels = serde_json::Map::new();
    for channel in &event.channels {
        let mut attributes = serde_json::Map::new();
        if event.info.subscription_count {
            let count = subscription_count(shard, app, channel).await.unwrap_or(0);
            attributes.insert("subscription_count".into(), count.into());
        }
        if event.info.user_count {
            let count = user_ids(shard, app, channel).await.map(|u| u.len()).unwrap_or(0);
            attributes.insert("user_count".into(), count.into());
        }
        channels.insert((*channel).to_string(), Value::Object(attributes));
    }
    Ok(Some(json!({ "channels": channels })))
}

/// Cluster mode: every channel's message goes to Redis in order (one queue per shard, so one
/// pipeline can carry them all), and the event counts as published once Redis executed them
/// all (docs/cluster.md: 200 only after Redis replied). A cache channel's event is also kept in
/// Redis, in the same transaction; every node (this one too) keeps it when it arrives.
async fn publish_cluster(cluster: &ClusterHandle, app: &App, event: &Event<'_>) -> Result<(), Response> {
    let mut sent = Vec::with_capacity(event.channels.len());
    let ttl = std::time::Duration::from_secs(app.config.cache_ttl_s);
    for channel in &event.channels {
        let frame = message::channel_event(event.name, channel, event.data);
        let queued = if channel::is_cache(channel) {
            cluster.outbound.send_cached(app.index, channel, frame, event.exclude, ttl)
        } else {
            cluster.outbound.send(Kind::Publication, app.index, channel, frame, event.exclude)
        };
        sent.push(queued.map_err(cluster_unavailable)?);
    }
    for sent in sent {
        sent.outcome().await.map_err(cluster_unavailable)?;
    }
    Ok(())
}

/// 503 with a JSON reason: the publisher should retry (perhaps on another node).
fn cluster_unavailable(error: Unavailable) -> Response {
    Response::error(StatusCode::SERVICE_UNAVAILABLE, &error.to_string())
}

/// Refuses a publish before anything is created for it while this shard cannot reach Redis.
fn cluster_ready(shard: &Shard) -> Result<(), Response> {
    if shard.cluster_down() {
        return Err(cluster_unavailable(Unavailable));
    }
    Ok(())
}

/// Applies `backend_events_per_second_max` to `events` events (429 over it); in cluster mode
/// over every node, in Redis (503 when Redis cannot say).
async fn admit(shard: &Shard, app: &App, events: usize) -> Result<(), Response> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let admitted = match shard.cluster() {
        Some(_) => shard.cluster_admit_events(app, events as u32).await.map_err(cluster_unavailable)?,
        None => app.try_publish(events as u32, now),
    };
    if admitted {
        Ok(())
    } else {
        let limit = app.config.backend_events_per_second_max;
        Err(Response::error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("over this app's limit of {limit} events per second"),
        ))
    }
}

/// Creates the webhook deliveries of accepted events (before they are published); returns the
/// WAL position to commit before answering. 503 when the webhook queue is full or failed.
fn create_deliveries(shard: &Shard, app: &App, events: &[Event<'_>]) -> Result<Option<Lsn>, Response> {
    let Some(webhooks) = shard.webhooks().filter(|w| w.has_standard(app.index)) else {
        return Ok(None);
    };
    let refused = |e: Refused| {
        ShardMetrics::add(&shard.metrics().webhook_publishes_refused_total, 1);
        Response::error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
    };
    let mut last = None;
    for event in events {
        let raw = event.data.get();
        let data: Cow<str> = serde_json::from_str(raw).unwrap_or(Cow::Borrowed(raw));
        if let Some(lsn) = webhooks.published(app.index, event.name, &event.channels, &data).map_err(refused)? {
            last = Some(lsn);
        }
    }
    Ok(last)
}

/// The accept rule (`Shard::accept`) for API publishes: deliveries are created before the
/// event is published, and it is answered only once they are durable (`webhooks.durability`).
fn not_accepted(shard: &Shard, error: NotAccepted<Response>) -> Response {
    match error {
        NotAccepted::Refused(response) => response,
        NotAccepted::NotDurable(e) => {
            ShardMetrics::add(&shard.metrics().webhook_publishes_refused_total, 1);
            Response::error(StatusCode::SERVICE_UNAVAILABLE, &format!("webhook queue unavailable: {e}"))
        }
    }
}

async fn events(shard: &Shard, app: &App, body: &[u8]) -> ApiResult {
    let request: EventRequest = parse_json(body)?;
    let event = validate_event(app, &request, false)?;
    admit(shard, app, event.channels.len()).await?;
    cluster_ready(shard)?;
    let create = || create_deliveries(shard, app, std::slice::from_ref(&event));
    let accepted = shard.accept(Acknowledged::ByAnswer, create, publish(shard, app, &event)).await;
    let info = accepted.map_err(|e| not_accepted(shard, e))??;
    Ok(Response::json(StatusCode::OK, &info.unwrap_or_else(|| json!({}))))
}

async fn batch_events(shard: &Shard, app: &App, body: &[u8]) -> ApiResult {
    let request: BatchRequest = parse_json(body)?;
    if request.batch.len() > app.config.batch_events_max {
        return Err(bad_request(format!("a batch holds at most {} events", app.config.batch_events_max)));
    }
    // Validate every event before publishing any: a batch is accepted whole or not at all.
    let events = request.batch.iter().map(|e| validate_event(app, e, true)).collect::<Result<Vec<_>, _>>()?;
    admit(shard, app, events.len()).await?;
    cluster_ready(shard)?;
    let publish_all = async {
        let mut infos = Vec::with_capacity(events.len());
        for event in &events {
            let info = publish(shard, app, event).await?;
            infos.push(info.map(|i| i["channels"][event.channels[0]].clone()).unwrap_or_else(|| json!({})));
        }
        Ok(infos)
    };
    let create = || create_deliveries(shard, app, &events);
    let accepted = shard.accept(Acknowledged::ByAnswer, create, publish_all).await;
    let infos = accepted.map_err(|e| not_accepted(shard, e))??;
    if events.iter().any(|e| e.info.subscription_count || e.info.user_count) {
        Ok(Response::json(StatusCode::OK, &json!({ "batch": infos })))
    } else {
        Ok(Response::json(StatusCode::OK, &json!({})))
    }
}

/// The webhook admin API: every shard answers for its own deliveries; health is summed.
pub(crate) async fn webhooks_admin(shard: &Shard, app: &App, mut request: AdminRequest, params: &Params) -> ApiResult {
    if app.config.webhooks.is_empty() {
        return Err(Response::error(StatusCode::NOT_FOUND, "this app has no webhooks"));
    }
    let endpoint_known = |id: &str| app.config.webhooks.iter().enumerate().any(|(j, w)| w.endpoint_id(j) == id);
    match &mut request {
        AdminRequest::DeadLetters { endpoint } | AdminRequest::Enable { endpoint } if !endpoint_known(endpoint) => {
            return Err(Response::error(StatusCode::NOT_FOUND, &format!("no webhook endpoint {endpoint:?}")));
        }
        AdminRequest::ReplayRange { endpoint, from_ms, to_ms }
        | AdminRequest::DeleteRange { endpoint, from_ms, to_ms } => {
            if !endpoint_known(endpoint) {
                return Err(Response::error(StatusCode::NOT_FOUND, &format!("no webhook endpoint {endpoint:?}")));
            }
            let number = |name: &str, default: u64| match param(params, name) {
                None => Ok(default),
                Some(text) => text.parse::<u64>().map_err(|_| bad_request(format!("{name} must be unix milliseconds"))),
            };
            *from_ms = number("from_ms", 0)?;
            *to_ms = number("to_ms", u64::MAX)?;
        }
        _ => {}
    }
    let reply =
        shard.query_all(Query::Webhooks { app: app.index, request: request.clone() }).await.ok_or_else(unavailable)?;
    let QueryReply::Webhooks(answer) = reply else { unreachable!("a webhook query has webhook replies") };
    let body = match (request, answer) {
        (AdminRequest::Health, AdminAnswer::Health(list)) => {
            json!({ "endpoints": list.iter().map(health_json).collect::<Vec<_>>() })
        }
        (_, AdminAnswer::DeadLetters(list)) => {
            let letters: Vec<Value> = list
                .into_iter()
                .map(|d| json!({"webhook_id": d.webhook_id, "created_ms": d.created_ms, "body": d.body}))
                .collect();
            json!({ "dead_letters": letters })
        }
        (AdminRequest::Attempts { webhook_id }, AdminAnswer::Attempts(list)) if list.is_empty() => {
            return Err(Response::error(StatusCode::NOT_FOUND, &format!("no attempts recorded for {webhook_id}")));
        }
        (_, AdminAnswer::Attempts(list)) => {
            let attempts: Vec<Value> = list
                .into_iter()
                .map(|a| {
                    json!({"webhook_id": a.webhook_id, "endpoint": a.endpoint, "at_ms": a.at_ms,
                           "status": a.status, "error": a.error, "duration_ms": a.duration_ms,
                           "next_attempt_in_ms": a.next_attempt_in_ms})
                })
                .collect();
            json!({ "attempts": attempts })
        }
        (AdminRequest::Replay { webhook_id }, AdminAnswer::Replayed(ids))
        | (AdminRequest::Delete { webhook_id }, AdminAnswer::Deleted(ids))
            if ids.is_empty() =>
        {
            return Err(Response::error(StatusCode::NOT_FOUND, &format!("{webhook_id} is not a dead letter")));
        }
        (_, AdminAnswer::Replayed(ids)) => json!({ "replayed": ids }),
        (_, AdminAnswer::Deleted(ids)) => json!({ "deleted": ids }),
        (AdminRequest::Enable { endpoint }, _) => json!({ "enabled": endpoint }),
        (request, answer) => unreachable!("{answer:?} does not answer {request:?}"),
    };
    Ok(Response::json(StatusCode::OK, &body))
}

/// One endpoint's health, summed over the shards, as the admin API shows it.
pub(crate) fn health_json(health: &admin::Health) -> Value {
    json!({
        "id": health.id, "url": health.url, "format": health.format,
        "state": health.state.as_str(), "disabled_reason": health.disabled_reason,
        "last_status": health.last_status, "last_error": health.last_error,
        "consecutive_failures": health.consecutive_failures,
        "pending": health.pending, "dead_letters": health.dead_letters, "queued_bytes": health.queued_bytes,
        "delivered": health.delivered, "failed_attempts": health.failed_attempts,
        "success_rate": health.success_rate(),
    })
}

/// Subscribers of one channel across every shard.
async fn subscription_count(shard: &Shard, app: &App, name: &str) -> Option<u64> {
    let reply = shard.query_all(Query::Channel { app: app.index, name: name.to_string() }).await?;
    Some(reply.into_counts().iter().map(|(_, n)| u64::from(*n)).sum())
}

fn unavailable() -> Response {
    Response::error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer in time; retry")
}

async fn channels(shard: &Shard, app: &App, params: &Params) -> ApiResult {
    let prefix = param(params, "filter_by_prefix").unwrap_or("").to_string();
    let info = parse_info(param(params, "info"))?;
    if info.user_count && !prefix.starts_with("presence-") {
        return Err(bad_request("info=user_count requires filter_by_prefix=presence-"));
    }
    if info.cache {
        return Err(bad_request("info=cache applies to one channel: GET /apps/{id}/channels/{name}"));
    }
    if shard.cluster().is_some() {
        return cluster_channels(shard, app, &prefix, info.subscription_count, info.user_count).await;
    }
    let user_counts: BTreeMap<Box<str>, u32> = if info.user_count {
        let query = Query::PresenceCounts { app: app.index, prefix: prefix.clone() };
        shard.query_all(query).await.ok_or_else(unavailable)?.into_counts().into_iter().collect()
    } else {
        BTreeMap::new()
    };
    let reply = shard.query_all(Query::Channels { app: app.index, prefix }).await.ok_or_else(unavailable)?;
    let mut totals: BTreeMap<Box<str>, u64> = BTreeMap::new();
    for (name, count) in reply.into_counts() {
        *totals.entry(name).or_default() += u64::from(count);
    }
    let mut channels = serde_json::Map::new();
    for (name, count) in totals {
        let mut attributes = serde_json::Map::new();
        if info.subscription_count {
            attributes.insert("subscription_count".into(), count.into());
        }
        if info.user_count {
            let count = user_counts.get(&name).copied().unwrap_or(0);
            attributes.insert("user_count".into(), count.into());
        }
        channels.insert(name.into(), Value::Object(attributes));
    }
    Ok(Response::json(StatusCode::OK, &json!({ "channels": channels })))
}

async fn channel_info(shard: &Shard, app: &App, name: &str, params: &Params) -> ApiResult {
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    channel::validate(&name).map_err(|e| bad_request(format!("invalid channel {name:?}: {e}")))?;
    let info = parse_info(param(params, "info"))?;
    if info.user_count && ChannelKind::of(&name) != ChannelKind::Presence {
        return Err(bad_request("info=user_count applies only to presence channels"));
    }
    if info.cache && !channel::is_cache(&name) {
        return Err(bad_request("info=cache applies only to cache channels"));
    }
    // Cluster mode: counted in Redis (docs/cluster.md, "Cluster-wide queries").
    let cluster = match shard.cluster() {
        Some(_) => Some(shard.cluster_channel(&app.config.id, &name).await.map_err(cluster_unavailable)?),
        None => None,
    };
    let count = match cluster {
        Some(counts) => counts.subscription_count,
        None => subscription_count(shard, app, &name).await.ok_or_else(unavailable)?,
    };
    let mut body = serde_json::Map::new();
    body.insert("occupied".into(), cluster.map_or(count > 0, |c| c.occupied).into());
    if info.subscription_count {
        body.insert("subscription_count".into(), count.into());
    }
    if info.user_count {
        let count = match cluster {
            Some(counts) => counts.user_count as usize,
            None => user_ids(shard, app, &name).await?.len(),
        };
        body.insert("user_count".into(), count.into());
    }
    if info.cache {
        // Pusher's HTTP API reference (`GET /channels/{name}` with `info=cache`): the answer
        // holds "cache":{"data":"...","ttl":N}, from the channel's home shard (docs/protocol.md).
        let query = Query::Cache { app: app.index, name: name.to_string() };
        let reply = shard.query_all(query).await.ok_or_else(unavailable)?;
        if let Some((data, ttl)) = reply.into_cache() {
            let data: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            body.insert("cache".into(), json!({ "data": data, "ttl": ttl }));
        }
    }
    Ok(Response::json(StatusCode::OK, &Value::Object(body)))
}

/// Members of a presence channel, from its home shard (from Redis in cluster mode).
async fn user_ids(shard: &Shard, app: &App, name: &str) -> Result<Vec<Box<str>>, Response> {
    if shard.cluster().is_some() {
        return shard.cluster_users(&app.config.id, name).await.map_err(cluster_unavailable);
    }
    let query = Query::PresenceUsers { app: app.index, name: name.to_string() };
    let reply = shard.query_all(query).await.ok_or_else(unavailable)?;
    Ok(reply.into_users())
}

/// `GET /channels` in cluster mode: the occupied channels and their counts, from Redis.
async fn cluster_channels(shard: &Shard, app: &App, prefix: &str, subscriptions: bool, users: bool) -> ApiResult {
    let listed = shard.cluster_channels(&app.config.id, prefix).await.map_err(cluster_unavailable)?;
    let mut channels = serde_json::Map::new();
    for (name, counts) in listed {
        let mut attributes = serde_json::Map::new();
        if subscriptions {
            attributes.insert("subscription_count".into(), counts.subscription_count.into());
        }
        if users {
            attributes.insert("user_count".into(), counts.user_count.into());
        }
        channels.insert(name, Value::Object(attributes));
    }
    Ok(Response::json(StatusCode::OK, &json!({ "channels": channels })))
}

async fn users(shard: &Shard, app: &App, name: &str) -> ApiResult {
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    channel::validate(&name).map_err(|e| bad_request(format!("invalid channel {name:?}: {e}")))?;
    if ChannelKind::of(&name) != ChannelKind::Presence {
        return Err(bad_request("users are only listed for presence channels"));
    }
    let ids = user_ids(shard, app, &name).await?;
    let users: Vec<Value> = ids.iter().map(|id| json!({ "id": id.as_ref() })).collect();
    Ok(Response::json(StatusCode::OK, &json!({ "users": users })))
}
