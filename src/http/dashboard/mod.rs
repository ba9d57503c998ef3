//! The operator dashboard at `/dashboard` (docs/dashboard.md): one self-contained page (HTML,
//! CSS and JS embedded in the binary, nothing fetched from elsewhere) that polls a JSON
//! snapshot once a second, and the few endpoints behind its buttons.
//!
//! Owns the routes under `/dashboard`, their credential check (`auth`) and the snapshot
//! (`snapshot`). Never touches sockets or shard state directly: data comes from one
//! `Query::Dashboard` scatter-gather per snapshot and the counters in `metrics` (in cluster
//! mode also one Redis pipeline for the cluster view, `cluster::dashboard`); the webhook
//! buttons go through the same admin code path as the signed API (`http::api::webhooks_admin`),
//! so no app secret ever reaches the browser.
//!
//! Invariant: without a valid credential only the login page and its stylesheet are served;
//! every other route answers 401 (and a wrong token is counted).

pub mod auth;
pub mod snapshot;

use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};

use crate::http::api::{self, Response};
use crate::http::parse::RequestHead;
use crate::metrics::ShardMetrics;
use crate::shard::mesh::{Query, QueryReply};
use crate::shard::Shard;
use crate::webhook::admin::AdminRequest;

use auth::Credential;

const PAGE_HTML: &str = include_str!("page.html");
const LOGIN_HTML: &str = include_str!("login.html");
const STYLE_CSS: &str = include_str!("dashboard.css");
const SCRIPT_JS: &str = include_str!("dashboard.js");

/// Headers of every dashboard answer: never cached, never framed, nothing loaded from
/// elsewhere (the page's Content Security Policy allows only its own origin).
const PAGE_HEADERS: &str = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
    X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n\
    Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'\r\n";

/// Routes and answers one request under `/dashboard`.
pub async fn handle(shard: &Shard, head: &RequestHead, body: &[u8]) -> Response {
    let running = shard.config();
    let config = &running.dashboard;
    if !config.enabled {
        return Response::error(StatusCode::NOT_FOUND, "no such endpoint");
    }
    let segments: Vec<&str> = head.path.split('/').skip(2).collect();
    let route = match segments.as_slice() {
        [] | [""] => Route::Page,
        ["dashboard.css"] => return text(StatusCode::OK, "text/css; charset=utf-8", STYLE_CSS),
        ["login"] => return login(shard, head, body),
        ["logout"] => return logout(head),
        ["dashboard.js"] => Route::Script,
        ["api", rest @ ..] => Route::Api(rest),
        _ => return Response::error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    let credential = auth::check(head, &config.token);
    if credential == Credential::Wrong {
        ShardMetrics::add(&shard.metrics().dashboard_auth_failures_total, 1);
    }
    match (route, credential) {
        (Route::Page, Credential::Valid) if head.method == Method::GET => page(PAGE_HTML),
        (Route::Page, Credential::Missing | Credential::Stale) if head.method == Method::GET => login_page(""),
        (Route::Page, Credential::Wrong) => unauthorized("wrong dashboard token"),
        (Route::Page | Route::Script, _) if head.method != Method::GET => {
            Response::error(StatusCode::METHOD_NOT_ALLOWED, "use GET on this endpoint")
        }
        (Route::Script, Credential::Valid) => text(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT_JS),
        (Route::Api(rest), Credential::Valid) => api_request(shard, head, rest).await,
        (_, Credential::Wrong) => unauthorized("wrong dashboard token"),
        (_, _) => unauthorized("log in to the dashboard first (Authorization: Bearer or the login form)"),
    }
}

enum Route<'a> {
    Page,
    Script,
    Api(&'a [&'a str]),
}

fn text(status: StatusCode, content_type: &'static str, body: &str) -> Response {
    Response { status, content_type, body: body.as_bytes().to_vec(), extra_headers: PAGE_HEADERS.into() }
}

fn page(html: &str) -> Response {
    text(StatusCode::OK, "text/html; charset=utf-8", html)
}

/// The login page, with a fixed message (never request text, so nothing can be injected).
fn login_page(message: &str) -> Response {
    page(&LOGIN_HTML.replace("<!--MESSAGE-->", message))
}

fn unauthorized(reason: &str) -> Response {
    let mut response = Response::error(StatusCode::UNAUTHORIZED, reason);
    response.extra_headers = format!("WWW-Authenticate: Bearer realm=\"ringwire dashboard\"\r\n{PAGE_HEADERS}");
    response
}

/// `POST /dashboard/login` with the form's `token`: sets the session cookie and goes to the
/// page (303), or shows the form again with 401 and counts the failure.
fn login(shard: &Shard, head: &RequestHead, body: &[u8]) -> Response {
    if head.method != Method::POST {
        return Response::error(StatusCode::METHOD_NOT_ALLOWED, "use POST on this endpoint");
    }
    let token = &shard.config().dashboard.token;
    match auth::form_token(body) {
        Some(presented) if auth::token_matches(presented.as_bytes(), token) => {
            let mut response = text(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "logged in\n");
            // HttpOnly: page scripts cannot read it; SameSite=Strict: other sites' pages cannot
            // make the browser send it (RFC 6265bis §8.8), which is what guards the POST routes.
            let cookie = auth::session_value(token);
            response.extra_headers = format!(
                "Location: /dashboard\r\nSet-Cookie: {}={cookie}; HttpOnly; SameSite=Strict; Path=/dashboard\r\n{PAGE_HEADERS}",
                auth::COOKIE_NAME
            );
            response
        }
        _ => {
            ShardMetrics::add(&shard.metrics().dashboard_auth_failures_total, 1);
            let mut response = login_page("<p class=\"error\" role=\"alert\">Wrong token.</p>");
            response.status = StatusCode::UNAUTHORIZED;
            response
        }
    }
}

/// `POST /dashboard/logout`: expires the cookie and goes back to the login form.
fn logout(head: &RequestHead) -> Response {
    if head.method != Method::POST {
        return Response::error(StatusCode::METHOD_NOT_ALLOWED, "use POST on this endpoint");
    }
    let mut response = text(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "logged out\n");
    response.extra_headers = format!(
        "Location: /dashboard\r\nSet-Cookie: {}=; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age=0\r\n{PAGE_HEADERS}",
        auth::COOKIE_NAME
    );
    response
}

/// The data routes, for a request with a valid credential.
async fn api_request(shard: &Shard, head: &RequestHead, rest: &[&str]) -> Response {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (method, app_id, request) = match rest {
        ["snapshot"] if head.method == Method::GET => return snapshot_response(shard).await,
        ["snapshot"] => return Response::error(StatusCode::METHOD_NOT_ALLOWED, "use GET on this endpoint"),
        ["apps", app, "endpoints", endpoint, "dead_letters"] => {
            (Method::GET, app, AdminRequest::DeadLetters { endpoint: decode(endpoint) })
        }
        ["apps", app, "endpoints", endpoint, "replay"] => {
            let endpoint = decode(endpoint);
            (Method::POST, app, AdminRequest::ReplayRange { endpoint, from_ms: 0, to_ms: u64::MAX })
        }
        ["apps", app, "endpoints", endpoint, "enable"] => {
            (Method::POST, app, AdminRequest::Enable { endpoint: decode(endpoint) })
        }
        ["apps", app, "deliveries", id, "attempts"] => {
            (Method::GET, app, AdminRequest::Attempts { webhook_id: decode(id) })
        }
        ["apps", app, "deliveries", id, "replay"] => {
            (Method::POST, app, AdminRequest::Replay { webhook_id: decode(id) })
        }
        _ => return Response::error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    if head.method != method {
        return Response::error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {method} on this endpoint"));
    }
    let apps = shard.apps();
    let Some(app) = apps.by_id(&decode(app_id)) else {
        return Response::error(StatusCode::NOT_FOUND, "unknown app id");
    };
    // The signed API's own code path: the same checks, the same scatter-gather, the same JSON.
    let answer = api::webhooks_admin(shard, app, request, &Vec::new()).await;
    let mut response = answer.unwrap_or_else(|error| error);
    response.extra_headers = PAGE_HEADERS.into();
    response
}

/// `GET /dashboard/api/snapshot`: one `Query::Dashboard` scatter-gather.
async fn snapshot_response(shard: &Shard) -> Response {
    let Some(QueryReply::Dashboard(parts)) = shard.query_all(Query::Dashboard).await else {
        return Response::error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer in time; retry");
    };
    let ring_depths: Vec<usize> = (0..shard.mesh.shards()).map(|i| shard.mesh.depth(i)).collect();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let inputs = snapshot::Inputs {
        metrics: &shard.all_metrics,
        ring_depths: &ring_depths,
        apps: &shard.apps(),
        channels_shown_max: shard.config().dashboard.channels_shown_max,
        now_ms,
    };
    let mut body = snapshot::render(&inputs, parts);
    if shard.cluster().is_some() {
        body["cluster"] = cluster_view(shard).await;
    }
    let mut response = Response::json(StatusCode::OK, &body);
    response.extra_headers = PAGE_HEADERS.into();
    response
}

/// Cluster mode: the snapshot's `cluster` section (docs/dashboard.md, "Cluster"), read with one
/// pipeline on this shard's command link. While the link is down, or Redis answers something
/// unexpected, it says the view is unavailable and why; the rest of the snapshot is unchanged.
async fn cluster_view(shard: &Shard) -> serde_json::Value {
    use std::sync::atomic::Ordering;
    let Some(cluster) = shard.cluster() else { return serde_json::Value::Null };
    let links: Vec<serde_json::Value> = shard
        .all_metrics
        .iter()
        .enumerate()
        .map(|(i, m)| serde_json::json!({"shard": i, "up": m.cluster_link_down.load(Ordering::Relaxed) == 0}))
        .collect();
    let this_node = crate::cluster::scripts::node_name(&cluster.node);
    let apps = shard.apps();
    let app_ids: Vec<&str> = apps.list.iter().filter(|a| !a.removed).map(|a| a.config.id.as_str()).collect();
    let read = crate::cluster::dashboard::read(&cluster.prefix, &app_ids);
    let replies = match cluster.commands.request(read) {
        Ok(pending) => pending.replies().await.map_err(|_| "the Redis link is down".to_string()),
        Err(_) => Err("the Redis link is down".to_string()),
    };
    let mut view = match replies.and_then(|r| crate::cluster::dashboard::parse(&r, app_ids.len())) {
        Ok(nodes) => crate::cluster::dashboard::render(&this_node, &nodes, &app_ids),
        Err(reason) => serde_json::json!({"available": false, "node": this_node, "reason": reason}),
    };
    view["links"] = links.into();
    view
}
