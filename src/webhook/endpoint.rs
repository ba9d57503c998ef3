//! One configured webhook endpoint and the transport of one attempt batch to it: how it signs,
//! the request head of each attempt, dialling a vetted address, and the pipelined exchange
//! (N requests in one writev, responses read in order).
//!
//! Owns `Endpoint`, `Signer`, `AttemptError` and `Transport`. Never touches the WAL, the
//! queues or the breaker: it is handed bodies and returns one result per request; what a
//! result means is `health`'s decision.
//!
//! Invariant: an exchange returns exactly one result per request, in request order; a
//! request after a `Connection: close` (or a broken connection) gets an error result and is
//! retried by the caller, never reported as answered.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use monoio_rustls::TlsConnector;
use ring::hmac;

use super::client::{self, Connection, Response, SendError};
use super::resolver;
use super::sign::{self, StandardSigner};
use crate::apps::{AppIndex, Apps};
use crate::config::{Config, WebhookFormat};
use crate::target::{AddressPolicy, Target};

/// How an endpoint signs.
pub enum Signer {
    /// `X-Pusher-Key` / `X-Pusher-Signature` with the app's key and secret.
    Pusher {
        /// The app's key.
        app_key: String,
        /// The app's secret.
        secret: hmac::Key,
    },
    /// Standard Webhooks (<https://www.standardwebhooks.com/>).
    Standard(StandardSigner),
}

/// An endpoint's place in its shard's tables: the id of its key in the WAL's key table, fixed
/// for the life of the process (a reload keeps it, since it names the endpoint by its key):
/// what queues, batches and attempts refer to an endpoint by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointIndex(usize);

impl EndpointIndex {
    /// The endpoint at `position` in the list.
    pub fn new(position: usize) -> EndpointIndex {
        EndpointIndex(position)
    }

    /// Its position in the list, for indexing the per-endpoint tables.
    pub fn get(self) -> usize {
        self.0
    }
}

/// One configured endpoint.
pub struct Endpoint {
    /// The app it belongs to.
    pub app: AppIndex,
    /// Its id within the app.
    pub id: String,
    /// `"{app_id}/{id}"`: its name in the WAL.
    pub key: Box<str>,
    /// Its URL, for display.
    pub url: String,
    /// Lifecycle or event subscription.
    pub format: WebhookFormat,
    /// Where it is (parsed and validated with the config).
    pub target: Target,
    /// Pusher format: the lifecycle events it selects (`None` = all).
    pub events: Option<Vec<String>>,
    /// Standard format: the channel patterns it selects (`None` = all).
    pub channels: Option<Vec<String>>,
    /// Standard format: the event name patterns it selects (`None` = all).
    pub event_types: Option<Vec<String>>,
    /// Events per delivery (1 = no batching); at least 1.
    pub batch_max: usize,
    /// How its requests are signed.
    pub signer: Signer,
}

impl Endpoint {
    /// The request line and headers of one attempt, signed for this attempt: `webhook_id` is
    /// the delivery's id, `timestamp_s` the attempt's time (Standard Webhooks signs both).
    pub fn request_head(&self, webhook_id: &str, timestamp_s: u64, body: &[u8]) -> Bytes {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringwire-webhooks/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.target.path,
            self.target.host_header,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        match &self.signer {
            Signer::Pusher { app_key, secret } => {
                head.push_str(&format!(
                    "X-Pusher-Key: {app_key}\r\nX-Pusher-Signature: {}\r\n",
                    sign::pusher_signature(secret, body)
                ));
            }
            Signer::Standard(signer) => {
                let signature = signer.sign(webhook_id, timestamp_s, body);
                head.push_str(&format!(
                    "webhook-id: {webhook_id}\r\nwebhook-timestamp: {timestamp_s}\r\nwebhook-signature: {signature}\r\n"
                ));
            }
        }
        head.push_str("\r\n");
        Bytes::from(head)
    }
}

/// The endpoints of every app, in config order (a removed app has none).
pub fn build_endpoints(apps: &Apps, batch_events_max: usize) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    for app in apps.list.iter().filter(|app| !app.removed) {
        for (j, hook) in app.config.webhooks.iter().enumerate() {
            let id = hook.endpoint_id(j);
            let signer = match hook.format {
                WebhookFormat::Pusher => {
                    Signer::Pusher { app_key: app.config.key.clone(), secret: app.secret_key.clone() }
                }
                WebhookFormat::Standard => {
                    let secrets: Vec<String> = hook.secret.iter().chain(&hook.secrets).cloned().collect();
                    Signer::Standard(StandardSigner::new(&secrets).expect("validated with the config"))
                }
            };
            let batch_max = match hook.format {
                WebhookFormat::Pusher => batch_events_max,
                WebhookFormat::Standard => hook.batch_events_max.unwrap_or(1),
            };
            debug_assert!(batch_max >= 1, "config validation keeps batch sizes positive");
            endpoints.push(Endpoint {
                app: app.index,
                key: format!("{}/{id}", app.config.id).into(),
                id,
                url: hook.url.clone(),
                format: hook.format,
                target: Target::parse(&hook.url).expect("validated with the config"),
                events: hook.events.clone(),
                channels: hook.channels.clone(),
                event_types: hook.event_types.clone(),
                batch_max,
                signer,
            });
        }
    }
    endpoints
}

/// The TLS settings for `https://` endpoints (the Mozilla roots plus `webhooks.ca_file`),
/// built once per node when some endpoint needs them: reading the CA file is blocking file
/// I/O, which belongs before the shards start, and one connector serves every shard.
pub fn tls_connector(config: &Config) -> Result<Option<TlsConnector>, String> {
    let https = config.apps.iter().flat_map(|a| &a.webhooks).any(|h| Target::parse(&h.url).is_ok_and(|t| t.tls));
    if !https {
        return Ok(None);
    }
    let connector = client::tls_connector(config.webhooks.ca_file.as_deref());
    connector.map(Some).map_err(|e| format!("webhooks.ca_file: {e}"))
}

/// Why an attempt failed before a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The SSRF guard refused every address.
    #[error("refused: {0}")]
    Refused(String),
    /// Anything else (connect, I/O, malformed response, closed before answering).
    #[error("{0}")]
    Other(String),
}

/// What the transport needs besides the endpoint: the address guard, TLS and the bounds of
/// one exchange (from `[webhooks]`).
pub struct Transport {
    /// Which resolved addresses may be dialled.
    pub addresses: AddressPolicy,
    /// TLS settings, when some endpoint is `https://`.
    pub tls: Option<TlsConnector>,
    /// `webhooks.connect_timeout_ms`.
    pub connect_timeout: Duration,
    /// `webhooks.request_timeout_ms`: for the whole exchange.
    pub request_timeout: Duration,
    /// `webhooks.response_bytes_max`.
    pub response_bytes_max: usize,
}

impl Transport {
    /// Sends `requests` (head and body of each) on `connection`, connecting first if it is
    /// `None`; returns one result per request, in order. The connection is dropped after an
    /// error or a response that says `close`, so the next exchange dials again.
    pub async fn exchange(
        &self,
        endpoint: &Endpoint,
        connection: &mut Option<Connection>,
        requests: Vec<(Bytes, Bytes)>,
    ) -> Vec<Result<Response, AttemptError>> {
        let count = requests.len();
        let deadline = monoio::time::Instant::now() + self.request_timeout;
        if connection.is_none() {
            match self.connect(endpoint).await {
                Ok(c) => *connection = Some(c),
                Err(error) => return vec![Err(error); count],
            }
        }
        let parts: Vec<Bytes> = requests.into_iter().flat_map(|(head, body)| [head, body]).collect();
        let conn = connection.as_mut().expect("connected above");
        let (responses, error) = conn.exchange(parts, count, self.response_bytes_max, deadline).await;
        if error.is_some() || responses.last().is_some_and(|r| r.close) {
            *connection = None;
        }
        debug_assert!(responses.len() <= count, "never more responses than requests");
        let error = error.map(|e| match e {
            SendError::Timeout => AttemptError::Timeout,
            other => AttemptError::Other(other.to_string()),
        });
        let unanswered = error.unwrap_or_else(|| AttemptError::Other("connection closed by the receiver".into()));
        let answered = responses.len();
        let mut results: Vec<Result<Response, AttemptError>> = responses.into_iter().map(Ok).collect();
        results.extend((answered..count).map(|_| Err(unanswered.clone())));
        results
    }

    /// Resolves, vets and dials the endpoint (exactly a vetted address).
    async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, AttemptError> {
        let addresses = resolver::resolve_target(&endpoint.target)
            .await
            .map_err(|e| AttemptError::Other(format!("cannot resolve {}: {e}", endpoint.target.host)))?;
        let vetted: Vec<SocketAddr> = addresses.into_iter().filter(|a| self.addresses.permits(a.ip())).collect();
        if vetted.is_empty() {
            return Err(AttemptError::Refused(format!(
                "{} resolves only to non-public addresses (webhooks.allow_private_targets is off)",
                endpoint.target.host
            )));
        }
        let mut last = String::new();
        for address in vetted {
            let tls = match (&self.tls, endpoint.target.tls) {
                (Some(connector), true) => Some((connector, endpoint.target.host.as_str())),
                _ => None,
            };
            match Connection::connect(address, tls, self.connect_timeout).await {
                Ok(connection) => return Ok(connection),
                Err(e) => last = e.to_string(),
            }
        }
        Err(AttemptError::Other(last))
    }
}

#[cfg(test)]
mod tests;
