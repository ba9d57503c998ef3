//! A shard's webhook deliveries: creating them (into its WAL), queueing them per endpoint,
//! the worker tasks that send them, retries, the circuit breaker, dead letters and the
//! numbers the admin API and `/metrics` show.
//!
//! Every shard runs its own dispatcher for the deliveries it created (published events are
//! matched on the shard that accepted them; lifecycle events on the channel's home shard), so
//! nothing here crosses threads. Endpoint state (health, breaker, disabled) is per shard; the
//! admin API sums it over the shards.
//!
//! Invariant: a delivery is sent only after its WAL record is committed (durable in `fsync`
//! mode), so a webhook id a receiver has seen is never reused after a crash.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ring::hmac;

use super::admin::{self, AdminAnswer, AdminRequest, AttemptReport, DeadLetter, EndpointState};
use super::client::{self, Connection, Response, SendError};
use super::event::{self, LifecycleEvent};
use super::retry::{self, Failure, RetryPolicy};
use super::sign::{self, StandardSigner};
use super::target::{self, AddressPolicy, Cidr, Target};
use crate::apps::{AppIndex, Apps};
use crate::config::{Config, DurabilityMode, WebhookFormat};
use crate::metrics::ShardMetrics;
use crate::wal::{Durability, FileStorage, Lsn, Outcome, Wal, WalError};
use monoio_rustls::TlsConnector;

/// How an endpoint signs.
enum Signer {
    /// `X-Pusher-Key` / `X-Pusher-Signature` with the app's key and secret.
    Pusher { app_key: String, secret: hmac::Key },
    /// Standard Webhooks.
    Standard(StandardSigner),
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
    target: Target,
    events: Option<Vec<String>>,
    channels: Option<Vec<String>>,
    event_types: Option<Vec<String>>,
    /// Events per delivery (1 = no batching).
    batch_max: usize,
    signer: Signer,
}

/// A live delivery.
struct Delivery {
    endpoint: usize,
    body: Bytes,
    created_ms: u64,
    attempts: u32,
    dead: bool,
}

/// An event (lifecycle, or published for a batching Standard endpoint) waiting in its
/// endpoint's batch.
struct BatchItem {
    /// Its own WAL record (acked once the batch delivery holding it is written); `None` in
    /// `memory` mode.
    seq: Option<u64>,
    /// The event's JSON object.
    json: Box<str>,
}

/// WAL endpoint key of an endpoint's events that are not in a batch delivery yet.
fn batch_item_key(endpoint_key: &str) -> String {
    format!("{endpoint_key}#batching")
}

/// One attempt, for the admin API.
#[derive(Debug, Clone)]
struct Attempt {
    seq: u64,
    endpoint: usize,
    at_ms: u64,
    status: Option<u16>,
    error: Option<String>,
    duration_ms: u64,
    next_attempt_in_ms: Option<u64>,
}

/// An endpoint's health on this shard.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    last_status: Option<u16>,
    last_error: Option<String>,
    delivered: u64,
    failed: u64,
    /// While open, no attempts until then (then one probe).
    open_until: Option<Instant>,
    /// A probe is in flight after the breaker's cooldown.
    probing: bool,
    /// Why the endpoint is disabled (410 Gone), if it is.
    disabled: Option<String>,
}

#[derive(Default)]
struct EndpointQueue {
    /// Bytes of this endpoint's live deliveries and batch items (pending and dead), for
    /// `endpoint_queue_bytes_max`; its share of `DispatchState::live_bytes`.
    live_bytes: u64,
    ready: VecDeque<u64>,
    idle_workers: Vec<Waker>,
    in_flight: usize,
    health: Health,
    /// Events waiting to be batched (each with its WAL item, so a crash before the batch is
    /// formed loses none), and since when.
    batch: Vec<BatchItem>,
    batch_since: Option<Instant>,
}

#[derive(Default)]
struct DispatchState {
    deliveries: HashMap<u64, Delivery>,
    /// Created, waiting for their WAL records to be committed before the first attempt.
    awaiting: VecDeque<(Lsn, u64)>,
    /// Retries by due time.
    timers: BTreeSet<(Instant, u64)>,
    queues: Vec<EndpointQueue>,
    attempts: VecDeque<Attempt>,
    /// Bytes of live deliveries and batch items (pending and dead), for `queue_bytes_max`:
    /// the sum of every queue's `live_bytes` (changed only through `charge` and `refund`).
    live_bytes: u64,
    /// Dead letters by (created_ms, seq), for `dead_letter_retention_s`.
    dead: BTreeSet<(u64, u64)>,
    /// `memory` durability: the next sequence number.
    next_seq: u64,
    timer_task: Option<Waker>,
    batch_task: Option<Waker>,
}

impl DispatchState {
    /// Counts `bytes` of `endpoint`'s live deliveries against both budgets.
    fn charge(&mut self, endpoint: usize, bytes: u64) {
        self.live_bytes += bytes;
        self.queues[endpoint].live_bytes += bytes;
    }

    /// Gives back what `charge` counted.
    fn refund(&mut self, endpoint: usize, bytes: u64) {
        debug_assert!(self.queues[endpoint].live_bytes >= bytes && self.live_bytes >= bytes);
        self.live_bytes -= bytes;
        self.queues[endpoint].live_bytes -= bytes;
    }
}

/// Why a delivery could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The shard's queue is at `queue_bytes_max`.
    #[error("the webhook queue is full (webhooks.queue_bytes_max); retry later")]
    QueueFull,
    /// One endpoint's queue is at `endpoint_queue_bytes_max`: its receiver is slow or failing.
    #[error(
        "the webhook queue of endpoint {0} is full (webhooks.endpoint_queue_bytes_max): its receiver is slow or \
         failing; retry later"
    )]
    EndpointFull(String),
    /// The WAL failed.
    #[error("{0}")]
    Wal(#[from] WalError),
}

/// One shard's webhook dispatcher.
pub struct Webhooks {
    shard: usize,
    config: Arc<Config>,
    policy: RetryPolicy,
    addresses: AddressPolicy,
    endpoints: Vec<Endpoint>,
    by_app: Vec<Vec<usize>>,
    wal: Option<Wal<FileStorage>>,
    /// TLS settings, when some endpoint is `https://`.
    tls: Option<TlsConnector>,
    log_id: u64,
    metrics: Arc<[ShardMetrics]>,
    state: RefCell<DispatchState>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Webhooks {
    /// The TLS settings for `https://` endpoints (the Mozilla roots plus `webhooks.ca_file`),
    /// built once per node when some endpoint needs them: reading the CA file is blocking
    /// file I/O, which belongs before the shards start.
    pub fn tls_connector(config: &Config) -> Result<Option<TlsConnector>, String> {
        let https = config.apps.iter().flat_map(|a| &a.webhooks).any(|h| Target::parse(&h.url).is_ok_and(|t| t.tls));
        if !https {
            return Ok(None);
        }
        let connector = client::tls_connector(config.webhooks.ca_file.as_deref());
        connector.map(Some).map_err(|e| format!("webhooks.ca_file: {e}"))
    }

    /// The dispatcher of shard `shard`, with its WAL opened and recovered; `None` when no
    /// app has webhooks. `tls` is `tls_connector`'s, shared by every shard.
    pub async fn open(
        shard: usize,
        config: Arc<Config>,
        apps: &Apps,
        metrics: Arc<[ShardMetrics]>,
        tls: Option<TlsConnector>,
    ) -> Result<Option<Rc<Webhooks>>, String> {
        let endpoints = build_endpoints(apps, config.webhooks.batch_events_max);
        if endpoints.is_empty() {
            return Ok(None);
        }
        let settings = &config.webhooks;
        let mut by_app = vec![Vec::new(); apps.list.len()];
        for (i, endpoint) in endpoints.iter().enumerate() {
            by_app[endpoint.app as usize].push(i);
        }
        let policy = RetryPolicy {
            schedule_ms: settings.retry_schedule_ms.clone(),
            jitter_percent: settings.retry_jitter_percent,
            overload_floor_ms: settings.retry_overload_floor_ms,
            retry_after_max_ms: settings.retry_after_max_ms,
        };
        let addresses = AddressPolicy {
            allow_private: settings.allow_private_targets,
            allowed: settings.allowed_cidrs.iter().filter_map(|c| Cidr::parse(c).ok()).collect(),
        };
        let state = DispatchState {
            queues: (0..endpoints.len()).map(|_| EndpointQueue::default()).collect(),
            ..DispatchState::default()
        };
        let (wal, recovered, log_id) = match settings.durability {
            DurabilityMode::Memory => (None, Vec::new(), fastrand::u64(..)),
            mode => {
                let directory = settings.data_dir.join(format!("shard-{shard}"));
                let storage = FileStorage::open(&directory)
                    .await
                    .map_err(|e| format!("webhooks.data_dir: cannot open {}: {e}", directory.display()))?;
                let durability = match mode {
                    DurabilityMode::Batch => Durability::Batch(Duration::from_millis(settings.batch_sync_ms)),
                    _ => Durability::Fsync,
                };
                let (wal, recovered) = Wal::open(storage, shard as u32, settings.segment_bytes_max, durability)
                    .await
                    .map_err(|e| format!("webhooks: {} (in {})", e, directory.display()))?;
                let log_id = wal.log_id();
                (Some(wal), recovered, log_id)
            }
        };
        if tls.is_none() && endpoints.iter().any(|e| e.target.tls) {
            return Err("an https:// webhook endpoint needs the TLS connector (`tls_connector`)".into());
        }
        let webhooks = Rc::new(Webhooks {
            shard,
            tls,
            config: config.clone(),
            policy,
            addresses,
            endpoints,
            by_app,
            wal,
            log_id,
            metrics,
            state: RefCell::new(state),
        });
        webhooks.recover(recovered);
        Ok(Some(webhooks))
    }

    fn metrics(&self) -> &ShardMetrics {
        &self.metrics[self.shard]
    }

    /// Queues what the WAL held: pending deliveries get an attempt now, dead letters are kept.
    fn recover(&self, recovered: Vec<crate::wal::LiveDelivery>) {
        let by_key: HashMap<&str, usize> = self.endpoints.iter().enumerate().map(|(i, e)| (&*e.key, i)).collect();
        let (mut pending, mut dead, mut orphans) = (0u64, 0u64, 0u64);
        for live in recovered {
            let seq = live.delivery.seq;
            if let Some(endpoint) = live.delivery.endpoint.strip_suffix("#batching").and_then(|k| by_key.get(k)) {
                // An event that was not yet in a batch delivery: batch it again.
                let json = String::from_utf8_lossy(&live.delivery.body).into();
                let mut state = self.state.borrow_mut();
                state.charge(*endpoint, live.delivery.body.len() as u64);
                let queue = &mut state.queues[*endpoint];
                queue.batch.push(BatchItem { seq: Some(seq), json });
                queue.batch_since.get_or_insert_with(Instant::now);
                pending += 1;
                continue;
            }
            let Some(&endpoint) = by_key.get(&*live.delivery.endpoint) else {
                // Its endpoint left the config: kept in the log, reported, never sent.
                orphans += 1;
                continue;
            };
            let mut state = self.state.borrow_mut();
            state.charge(endpoint, live.delivery.body.len() as u64);
            if live.dead {
                state.dead.insert((live.delivery.created_ms, seq));
            }
            let delivery = Delivery {
                endpoint,
                body: live.delivery.body,
                created_ms: live.delivery.created_ms,
                attempts: 0,
                dead: live.dead,
            };
            state.deliveries.insert(seq, delivery);
            if live.dead {
                dead += 1;
            } else {
                pending += 1;
                state.queues[endpoint].ready.push_back(seq);
            }
        }
        ShardMetrics::add(&self.metrics().webhook_pending, pending);
        ShardMetrics::add(&self.metrics().webhook_dead_letters, dead);
        if pending + dead + orphans > 0 {
            tracing::info!(shard = self.shard, pending, dead, orphans, "webhook queue recovered");
        }
        if orphans > 0 {
            tracing::warn!(shard = self.shard, orphans, "recovered deliveries whose endpoint is no longer configured");
        }
    }

    /// Starts the WAL flusher, the retry timer, the batcher and the endpoint workers.
    pub fn spawn(self: &Rc<Self>) {
        if self.wal.is_some() {
            monoio::spawn(self.clone().flusher());
        }
        monoio::spawn(self.clone().timer_task());
        monoio::spawn(self.clone().batch_task());
        for endpoint in 0..self.endpoints.len() {
            for _ in 0..self.config.webhooks.connections_per_endpoint_max {
                monoio::spawn(self.clone().worker(endpoint));
            }
        }
        for endpoint in &self.endpoints {
            if let Some(ip) = endpoint.target.literal_ip() {
                if !self.addresses.permits(ip) && self.shard == 0 {
                    tracing::warn!(
                        endpoint = %endpoint.key,
                        url = %endpoint.url,
                        "webhook endpoint is a non-public address: deliveries will be refused \
                         (set webhooks.allow_private_targets or webhooks.allowed_cidrs)"
                    );
                }
            }
        }
    }

    /// The webhook id a receiver sees for a delivery (stable across attempts and restarts).
    pub fn webhook_id(&self, seq: u64) -> String {
        format!("msg_{:016x}{:016x}", self.log_id, seq)
    }

    /// The sequence number in one of this shard's webhook ids; `None` for anything else. The
    /// id comes from a request path: it is checked to be ASCII hex before it is sliced.
    fn parse_webhook_id(&self, id: &str) -> Option<u64> {
        let hex = id.strip_prefix("msg_")?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let (log_id, seq) = hex.split_at(16);
        if u64::from_str_radix(log_id, 16).ok()? != self.log_id {
            return None;
        }
        u64::from_str_radix(seq, 16).ok()
    }

    // ---- sources -----------------------------------------------------------------------

    /// Whether an app has Standard Webhooks endpoints (a publish must then be durable first).
    pub fn has_standard(&self, app: AppIndex) -> bool {
        self.by_app[app as usize].iter().any(|&e| self.endpoints[e].format == WebhookFormat::Standard)
    }

    /// Creates the deliveries of a published event for every matching Standard Webhooks
    /// endpoint; returns the log position to `commit` before answering the publisher.
    pub fn published(&self, app: AppIndex, event: &str, channels: &[&str], data: &str) -> Result<Option<Lsn>, Refused> {
        // Two passes: every budget is checked before anything is created, so a refused publish
        // leaves no delivery behind (its retry creates them all once).
        let mut matches: Vec<(usize, &str)> = Vec::new();
        for &index in &self.by_app[app as usize] {
            let endpoint = &self.endpoints[index];
            if endpoint.format != WebhookFormat::Standard || !event::any_match(endpoint.event_types.as_deref(), event) {
                continue;
            }
            let channels = channels.iter().filter(|c| event::any_match(endpoint.channels.as_deref(), c));
            matches.extend(channels.map(|&channel| (index, channel)));
        }
        for &(index, _) in &matches {
            self.check_capacity(index)?;
        }
        let mut last = None;
        let time_ms = now_ms();
        for (index, channel) in matches {
            let body = event::standard_body(event, channel, data, time_ms);
            if self.endpoints[index].batch_max > 1 {
                last = last.max(self.add_to_batch(index, body.into())?);
            } else {
                last = Some(self.create(index, body.into(), time_ms)?);
            }
        }
        Ok(last)
    }

    /// Refuses new deliveries for `endpoint` while its queue is at `endpoint_queue_bytes_max`
    /// or the shard's is at `queue_bytes_max`.
    fn check_capacity(&self, endpoint: usize) -> Result<(), Refused> {
        let state = self.state.borrow();
        let settings = &self.config.webhooks;
        if state.queues[endpoint].live_bytes >= settings.endpoint_queue_bytes_max {
            return Err(Refused::EndpointFull(self.endpoints[endpoint].key.to_string()));
        }
        if state.live_bytes >= settings.queue_bytes_max {
            return Err(Refused::QueueFull);
        }
        Ok(())
    }

    /// Waits until `lsn` is committed (at once in `memory` mode).
    pub async fn commit(&self, lsn: Lsn) -> Result<(), Refused> {
        match &self.wal {
            Some(wal) => wal.commit(lsn).await.map_err(Refused::from),
            None => Ok(()),
        }
    }

    /// A lifecycle event for an app's Pusher-format endpoints that select it; batched per
    /// endpoint. Each is written to the WAL at once as its own record; returns the position to
    /// commit for it to be durable.
    pub fn lifecycle(&self, app: AppIndex, event: LifecycleEvent) -> Option<Lsn> {
        let mut last = None;
        for &index in &self.by_app[app as usize] {
            let endpoint = &self.endpoints[index];
            if endpoint.format != WebhookFormat::Pusher
                || endpoint.events.as_ref().is_some_and(|list| !list.iter().any(|e| e == event.name))
            {
                continue;
            }
            match self.check_capacity(index).and_then(|()| self.add_to_batch(index, event.json.clone())) {
                Ok(lsn) => last = last.max(lsn),
                Err(error) => {
                    // Not accepted by anyone yet: counted and logged, not queued.
                    ShardMetrics::add(&self.metrics().webhook_events_dropped_total, 1);
                    tracing::warn!(endpoint = %endpoint.key, %error, "lifecycle webhook event dropped");
                }
            }
        }
        last
    }

    /// Adds one event (a JSON object) to an endpoint's batch: written to the WAL at once as
    /// its own record; the batch becomes one delivery at `batch_max` events or after
    /// `batch_ms`. Returns the event's log position (`None` in `memory` mode).
    fn add_to_batch(&self, endpoint: usize, json: Box<str>) -> Result<Option<Lsn>, Refused> {
        let (seq, lsn) = match &self.wal {
            Some(wal) => {
                let key = batch_item_key(&self.endpoints[endpoint].key);
                let (seq, lsn) = wal.append_delivery(&key, now_ms(), Bytes::copy_from_slice(json.as_bytes()))?;
                (Some(seq), Some(lsn))
            }
            None => (None, None),
        };
        let full = {
            let mut state = self.state.borrow_mut();
            state.charge(endpoint, json.len() as u64);
            let queue = &mut state.queues[endpoint];
            queue.batch.push(BatchItem { seq, json });
            queue.batch_since.get_or_insert_with(Instant::now);
            let full = queue.batch.len() >= self.endpoints[endpoint].batch_max;
            if let Some(waker) = state.batch_task.take() {
                waker.wake();
            }
            full
        };
        if full {
            self.flush_batch(endpoint);
        }
        Ok(lsn)
    }

    /// Turns an endpoint's batched events into one delivery, then retires their WAL items (the
    /// acks follow the batch's record in the log, so a crash keeps one or the other: at least
    /// once).
    fn flush_batch(&self, endpoint: usize) {
        let items = {
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint];
            queue.batch_since = None;
            std::mem::take(&mut queue.batch)
        };
        if items.is_empty() {
            return;
        }
        let time_ms = now_ms();
        let events = items.iter().map(|i| &*i.json);
        let body = match self.endpoints[endpoint].format {
            WebhookFormat::Pusher => event::pusher_body(time_ms, events),
            WebhookFormat::Standard => event::standard_batch_body(time_ms, events),
        };
        // The items already count against the queue limit, so the batch is not refused for it;
        // their bytes now belong to the batch delivery.
        self.state.borrow_mut().refund(endpoint, items.iter().map(|i| i.json.len() as u64).sum::<u64>());
        if let Err(error) = self.create(endpoint, body, time_ms) {
            // Only a failed WAL gets here: the items stay in the log and are batched again
            // after a restart.
            tracing::error!(endpoint = %self.endpoints[endpoint].key, %error, "webhook batch not queued");
            return;
        }
        if let Some(wal) = &self.wal {
            for seq in items.iter().filter_map(|i| i.seq) {
                let _ = wal.append_ack(seq, Outcome::Delivered);
            }
        }
    }

    /// Creates one delivery: into the WAL (or memory), then queued once committed.
    fn create(&self, endpoint: usize, body: Bytes, created_ms: u64) -> Result<Lsn, Refused> {
        let bytes = body.len() as u64;
        let (seq, lsn) = match &self.wal {
            Some(wal) => wal.append_delivery(&self.endpoints[endpoint].key, created_ms, body.clone())?,
            None => {
                let mut state = self.state.borrow_mut();
                state.next_seq += 1;
                (state.next_seq, 0)
            }
        };
        let mut state = self.state.borrow_mut();
        state.charge(endpoint, bytes);
        state.deliveries.insert(seq, Delivery { endpoint, body, created_ms, attempts: 0, dead: false });
        ShardMetrics::add(&self.metrics().webhook_deliveries_total, 1);
        ShardMetrics::add(&self.metrics().webhook_pending, 1);
        if self.wal.is_some() {
            state.awaiting.push_back((lsn, seq));
        } else {
            drop(state);
            self.make_ready(seq);
        }
        Ok(lsn)
    }

    // ---- tasks -------------------------------------------------------------------------

    /// Writes and syncs the WAL batch after batch; releases deliveries to their endpoints'
    /// queues once durable (in `batch` mode the publisher was answered earlier), so a webhook
    /// id that reached a receiver survives a power loss and is never handed out again.
    async fn flusher(self: Rc<Self>) {
        let wal = self.wal.as_ref().expect("spawned only with a WAL");
        wal.run_with(|reached| self.release(reached)).await;
        // The flusher ends only when the log failed: say so where /ready on any shard sees it
        // (the error number first, so a reader that sees the flag also sees its cause).
        if let Some(WalError::Failed { os_error, .. }) = wal.failure() {
            let metrics = self.metrics();
            metrics.wal_failed_os_error.store(os_error.unwrap_or(0) as u64, std::sync::atomic::Ordering::Relaxed);
            metrics.wal_failed.store(1, std::sync::atomic::Ordering::Release);
        }
    }

    fn release(&self, reached: Lsn) {
        let stats = self.wal.as_ref().map(Wal::stats).unwrap_or_default();
        let metrics = self.metrics();
        metrics.wal_fsyncs_total.store(stats.fsyncs, std::sync::atomic::Ordering::Relaxed);
        metrics.wal_bytes_written_total.store(stats.bytes_written, std::sync::atomic::Ordering::Relaxed);
        loop {
            let seq = {
                let mut state = self.state.borrow_mut();
                match state.awaiting.front() {
                    Some(&(lsn, seq)) if lsn <= reached => {
                        state.awaiting.pop_front();
                        seq
                    }
                    _ => return,
                }
            };
            self.make_ready(seq);
        }
    }

    /// Queues a delivery for its endpoint's workers (or dead-letters it if the endpoint is
    /// disabled).
    fn make_ready(&self, seq: u64) {
        let mut state = self.state.borrow_mut();
        let Some(endpoint) = state.deliveries.get(&seq).filter(|d| !d.dead).map(|d| d.endpoint) else { return };
        if state.queues[endpoint].health.disabled.is_some() {
            drop(state);
            return self.dead_letter(seq);
        }
        let queue = &mut state.queues[endpoint];
        queue.ready.push_back(seq);
        if let Some(waker) = queue.idle_workers.pop() {
            waker.wake();
        }
    }

    /// Moves due retries to their queues; wakes workers of endpoints whose breaker cooled.
    async fn timer_task(self: Rc<Self>) {
        let mut next_sweep = Instant::now();
        loop {
            let next = self.state.borrow().timers.first().map(|&(at, _)| at);
            // At least once a second, for breakers that cooled down.
            let soon = Instant::now() + Duration::from_secs(1);
            let wake_at = next.map_or(soon, |at| at.min(soon));
            let mut sleep = std::pin::pin!(monoio::time::sleep_until(monoio::time::Instant::from_std(wake_at)));
            let mut first = true;
            poll_fn(|cx| {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                let mut state = self.state.borrow_mut();
                // `schedule` takes the waker when it adds a timer: plan again.
                if !first && state.timer_task.is_none() {
                    return Poll::Ready(());
                }
                first = false;
                state.timer_task = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            let now = Instant::now();
            let due: Vec<u64> = {
                let mut state = self.state.borrow_mut();
                let later = state.timers.split_off(&(now, u64::MAX));
                let due = std::mem::replace(&mut state.timers, later);
                due.into_iter().map(|(_, seq)| seq).collect()
            };
            for seq in due {
                self.make_ready(seq);
            }
            if now >= next_sweep {
                // Once a second: the dead-letter index is ordered, so a sweep costs only what
                // it removes.
                self.expire_dead_letters(now_ms());
                next_sweep = now + Duration::from_secs(1);
            }
            let mut state = self.state.borrow_mut();
            for queue in &mut state.queues {
                if queue.health.open_until.is_some_and(|until| until <= now) && !queue.ready.is_empty() {
                    if let Some(waker) = queue.idle_workers.pop() {
                        waker.wake();
                    }
                }
            }
        }
    }

    fn schedule(&self, seq: u64, delay: Duration) {
        let mut state = self.state.borrow_mut();
        state.timers.insert((Instant::now() + delay, seq));
        if let Some(waker) = state.timer_task.take() {
            waker.wake();
        }
    }

    /// Flushes endpoints' batches `batch_ms` after their first event.
    async fn batch_task(self: Rc<Self>) {
        let period = Duration::from_millis(self.config.webhooks.batch_ms);
        loop {
            let oldest = poll_fn(|cx| {
                let mut state = self.state.borrow_mut();
                match state.queues.iter().filter_map(|q| q.batch_since).min() {
                    Some(since) => Poll::Ready(since),
                    None => {
                        state.batch_task = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            monoio::time::sleep_until(monoio::time::Instant::from_std(oldest + period)).await;
            let now = Instant::now();
            let due: Vec<usize> = {
                let state = self.state.borrow();
                (0..state.queues.len())
                    .filter(|&i| state.queues[i].batch_since.is_some_and(|since| since + period <= now))
                    .collect()
            };
            for endpoint in due {
                self.flush_batch(endpoint);
            }
        }
    }

    /// One of an endpoint's workers: owns one keep-alive connection, takes batches of ready
    /// deliveries (at most `pipeline_max`), sends them, and settles each.
    async fn worker(self: Rc<Self>, endpoint: usize) {
        let mut connection: Option<Connection> = None;
        loop {
            let batch = self.take_batch(endpoint).await;
            let started = Instant::now();
            let results = self.send(endpoint, &mut connection, &batch).await;
            let duration_ms = started.elapsed().as_millis() as u64;
            for (seq, result) in batch.into_iter().zip(results) {
                self.settle(endpoint, seq, result, duration_ms);
            }
        }
    }

    /// Waits for deliveries this endpoint may send now (breaker closed or probing).
    async fn take_batch(&self, endpoint: usize) -> Vec<u64> {
        let pipeline_max = self.config.webhooks.pipeline_max;
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint];
            let now = Instant::now();
            let mut limit = pipeline_max;
            if let Some(until) = queue.health.open_until {
                if until > now || queue.health.probing || queue.in_flight > 0 {
                    queue.idle_workers.push(cx.waker().clone());
                    return Poll::Pending;
                }
                // Cooled down: one probe decides.
                queue.health.probing = true;
                limit = 1;
            }
            if queue.ready.is_empty() || queue.health.disabled.is_some() {
                queue.health.probing &= queue.in_flight > 0;
                queue.idle_workers.push(cx.waker().clone());
                return Poll::Pending;
            }
            let n = queue.ready.len().min(limit);
            let batch: Vec<u64> = queue.ready.drain(..n).collect();
            queue.in_flight += n;
            Poll::Ready(batch)
        })
        .await
    }

    /// Sends a batch on the worker's connection (connecting if needed); one result per
    /// delivery, in order.
    async fn send(
        &self,
        endpoint_index: usize,
        connection: &mut Option<Connection>,
        batch: &[u64],
    ) -> Vec<Result<Response, AttemptError>> {
        let settings = &self.config.webhooks;
        let endpoint = &self.endpoints[endpoint_index];
        let deadline = monoio::time::Instant::now() + Duration::from_millis(settings.request_timeout_ms);
        if connection.is_none() {
            match self.connect(endpoint).await {
                Ok(c) => *connection = Some(c),
                Err(error) => return batch.iter().map(|_| Err(error.clone())).collect(),
            }
        }
        let mut parts = Vec::with_capacity(batch.len() * 2);
        {
            let state = self.state.borrow();
            for &seq in batch {
                let body = state.deliveries[&seq].body.clone();
                parts.push(self.request_head(endpoint, seq, &body));
                parts.push(body);
            }
        }
        let conn = connection.as_mut().expect("connected above");
        let (responses, error) = conn.exchange(parts, batch.len(), settings.response_bytes_max, deadline).await;
        if error.is_some() || responses.last().is_some_and(|r| r.close) {
            *connection = None;
        }
        let error = error.map(|e| match e {
            SendError::Timeout => AttemptError::Timeout,
            other => AttemptError::Other(other.to_string()),
        });
        let answered = responses.len();
        let mut results: Vec<Result<Response, AttemptError>> = responses.into_iter().map(Ok).collect();
        for _ in answered..batch.len() {
            results.push(Err(error.clone().unwrap_or(AttemptError::Other("connection closed by the receiver".into()))));
        }
        results
    }

    /// Resolves, vets and dials the endpoint (exactly a vetted address).
    async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, AttemptError> {
        let addresses = target::resolve(&endpoint.target)
            .await
            .map_err(|e| AttemptError::Other(format!("cannot resolve {}: {e}", endpoint.target.host)))?;
        let vetted: Vec<SocketAddr> = addresses.into_iter().filter(|a| self.addresses.permits(a.ip())).collect();
        if vetted.is_empty() {
            ShardMetrics::add(&self.metrics().webhook_ssrf_refused_total, 1);
            return Err(AttemptError::Refused(format!(
                "{} resolves only to non-public addresses (webhooks.allow_private_targets is off)",
                endpoint.target.host
            )));
        }
        let timeout = Duration::from_millis(self.config.webhooks.connect_timeout_ms);
        let mut last = String::new();
        for address in vetted {
            let tls = match (&self.tls, endpoint.target.tls) {
                (Some(connector), true) => Some((connector, endpoint.target.host.as_str())),
                _ => None,
            };
            match Connection::connect(address, tls, timeout).await {
                Ok(connection) => return Ok(connection),
                Err(e) => last = e.to_string(),
            }
        }
        Err(AttemptError::Other(last))
    }

    /// The request line and headers of one attempt, signed for this attempt.
    fn request_head(&self, endpoint: &Endpoint, seq: u64, body: &[u8]) -> Bytes {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringwire-webhooks/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            endpoint.target.path,
            endpoint.target.host_header,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        match &endpoint.signer {
            Signer::Pusher { app_key, secret } => {
                head.push_str(&format!(
                    "X-Pusher-Key: {app_key}\r\nX-Pusher-Signature: {}\r\n",
                    sign::pusher_signature(secret, body)
                ));
            }
            Signer::Standard(signer) => {
                let id = self.webhook_id(seq);
                let timestamp = now_ms() / 1000;
                let signature = signer.sign(&id, timestamp, body);
                head.push_str(&format!(
                    "webhook-id: {id}\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\n"
                ));
            }
        }
        head.push_str("\r\n");
        Bytes::from(head)
    }

    /// Records an attempt's result: delivered, retried later, or dead.
    fn settle(&self, endpoint: usize, seq: u64, result: Result<Response, AttemptError>, duration_ms: u64) {
        let mut attempt = Attempt {
            seq,
            endpoint,
            at_ms: now_ms(),
            status: None,
            error: None,
            duration_ms,
            next_attempt_in_ms: None,
        };
        let success = matches!(&result, Ok(r) if (200..300).contains(&r.status));
        let (failure, retry_after, gone) = match &result {
            Ok(r) => {
                attempt.status = Some(r.status);
                if !success {
                    let excerpt = String::from_utf8_lossy(&r.excerpt).into_owned();
                    attempt.error =
                        Some(if r.status / 100 == 3 { format!("redirect not followed: {excerpt}") } else { excerpt });
                }
                let failure = if r.status == 429 { Failure::Overloaded } else { Failure::Other };
                (failure, r.retry_after, r.status == 410)
            }
            Err(e) => {
                attempt.error = Some(e.to_string());
                let failure = if matches!(e, AttemptError::Timeout) { Failure::Overloaded } else { Failure::Other };
                (failure, None, false)
            }
        };
        let (attempts, schedule) = {
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint];
            queue.in_flight -= 1;
            let health = &mut queue.health;
            health.last_status = attempt.status;
            health.last_error = attempt.error.clone();
            health.probing = false;
            if success {
                health.delivered += 1;
                health.consecutive_failures = 0;
                health.open_until = None;
                // A recovered endpoint: every worker may go on.
                for waker in queue.idle_workers.drain(..) {
                    waker.wake();
                }
            } else {
                health.failed += 1;
                health.consecutive_failures += 1;
                if health.consecutive_failures >= self.config.webhooks.breaker_failures {
                    health.open_until =
                        Some(Instant::now() + Duration::from_millis(self.config.webhooks.breaker_cooldown_ms));
                }
            }
            let delivery = state.deliveries.get_mut(&seq).expect("in flight deliveries are live");
            delivery.attempts += 1;
            (delivery.attempts, !success && !gone)
        };
        let mut next = None;
        if success {
            self.forget(seq);
            ShardMetrics::add(&self.metrics().webhook_delivered_total, 1);
        } else {
            ShardMetrics::add(&self.metrics().webhook_attempts_failed_total, 1);
            if gone {
                self.disable(endpoint, "the receiver answered 410 Gone");
                self.dead_letter(seq);
            } else if schedule {
                next = retry::next_attempt(&self.policy, attempts, failure, retry_after, &mut fastrand::Rng::new());
                match next {
                    Some(delay) => self.schedule(seq, delay),
                    None => self.dead_letter(seq),
                }
            }
        }
        attempt.next_attempt_in_ms = next.map(|d| d.as_millis() as u64);
        let mut state = self.state.borrow_mut();
        if state.attempts.len() >= self.config.webhooks.attempt_log_max {
            state.attempts.pop_front();
        }
        state.attempts.push_back(attempt);
    }

    /// A 2xx: the delivery is done.
    fn forget(&self, seq: u64) {
        if let Some(wal) = &self.wal {
            // No one waits for this ack: if it is lost in a crash, the delivery is sent again
            // (at least once; receivers deduplicate on the webhook id).
            let _ = wal.append_ack(seq, Outcome::Delivered);
        }
        let mut state = self.state.borrow_mut();
        if let Some(delivery) = state.deliveries.remove(&seq) {
            state.refund(delivery.endpoint, delivery.body.len() as u64);
            ShardMetrics::sub(&self.metrics().webhook_pending, 1);
        }
    }

    /// Retries exhausted or endpoint disabled: kept, replayable.
    fn dead_letter(&self, seq: u64) {
        if let Some(wal) = &self.wal {
            let _ = wal.append_ack(seq, Outcome::Dead);
        }
        let mut state = self.state.borrow_mut();
        if let Some(delivery) = state.deliveries.get_mut(&seq).filter(|d| !d.dead) {
            delivery.dead = true;
            let created_ms = delivery.created_ms;
            state.dead.insert((created_ms, seq));
            ShardMetrics::sub(&self.metrics().webhook_pending, 1);
            ShardMetrics::add(&self.metrics().webhook_dead_letters, 1);
            ShardMetrics::add(&self.metrics().webhook_dead_letters_total, 1);
        }
    }

    /// 410 Gone: stop sending to the endpoint; its queued deliveries become dead letters.
    fn disable(&self, endpoint: usize, reason: &str) {
        let queued: Vec<u64> = {
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint];
            queue.health.disabled = Some(reason.into());
            queue.ready.drain(..).collect()
        };
        tracing::warn!(endpoint = %self.endpoints[endpoint].key, reason, "webhook endpoint disabled");
        for seq in queued {
            self.dead_letter(seq);
        }
    }

    /// Makes a dead letter pending again and queues it.
    fn replay(&self, seq: u64) -> bool {
        let is_dead = self.state.borrow().deliveries.get(&seq).is_some_and(|d| d.dead);
        if !is_dead {
            return false;
        }
        if let Some(wal) = &self.wal {
            if !matches!(wal.append_replay(seq), Ok(Some(_))) {
                return false;
            }
        }
        {
            let mut state = self.state.borrow_mut();
            let delivery = state.deliveries.get_mut(&seq).expect("checked above");
            delivery.dead = false;
            delivery.attempts = 0;
            let created_ms = delivery.created_ms;
            state.dead.remove(&(created_ms, seq));
            ShardMetrics::add(&self.metrics().webhook_pending, 1);
            ShardMetrics::sub(&self.metrics().webhook_dead_letters, 1);
        }
        self.make_ready(seq);
        true
    }

    /// Forgets a dead letter for good (deleted through the admin API, or expired): its budget
    /// is freed and the log says so, so a restart does not bring it back.
    fn discard(&self, seq: u64) -> bool {
        let mut state = self.state.borrow_mut();
        let Some(delivery) = state.deliveries.remove(&seq) else { return false };
        if !delivery.dead {
            state.deliveries.insert(seq, delivery);
            return false;
        }
        if let Some(wal) = &self.wal {
            // Not waited for: if the ack is lost in a crash the dead letter comes back, and is
            // discarded again by the next sweep or request.
            let _ = wal.append_ack(seq, Outcome::Discarded);
        }
        state.dead.remove(&(delivery.created_ms, seq));
        state.refund(delivery.endpoint, delivery.body.len() as u64);
        ShardMetrics::sub(&self.metrics().webhook_dead_letters, 1);
        true
    }

    /// Discards the dead letters created more than `dead_letter_retention_s` before `now_ms`.
    fn expire_dead_letters(&self, now_ms: u64) {
        let retention_ms = self.config.webhooks.dead_letter_retention_s.saturating_mul(1000);
        if retention_ms == 0 {
            return;
        }
        let cutoff = now_ms.saturating_sub(retention_ms);
        let expired: Vec<u64> = self.state.borrow().dead.range(..(cutoff, 0)).map(|&(_, seq)| seq).collect();
        let count = expired.into_iter().filter(|&seq| self.discard(seq)).count();
        if count > 0 {
            tracing::info!(
                shard = self.shard,
                count,
                "expired dead letters discarded (webhooks.dead_letter_retention_s)"
            );
        }
    }

    /// This shard's dead letters of `endpoint` created in `[from_ms, to_ms]`, oldest first.
    fn dead_letters_between(&self, endpoint: usize, from_ms: u64, to_ms: u64) -> Vec<u64> {
        let state = self.state.borrow();
        let range = state.dead.range((from_ms, 0)..=(to_ms, u64::MAX));
        range.map(|&(_, seq)| seq).filter(|seq| state.deliveries[seq].endpoint == endpoint).collect()
    }

    // ---- admin -------------------------------------------------------------------------

    fn endpoint_index(&self, app: AppIndex, id: &str) -> Option<usize> {
        self.by_app[app as usize].iter().copied().find(|&i| self.endpoints[i].id == id)
    }

    /// This shard's answer to an admin request, for its own deliveries.
    pub fn admin(&self, app: AppIndex, request: &AdminRequest) -> AdminAnswer {
        let owned_by_app =
            |seq: u64| self.state.borrow().deliveries.get(&seq).is_some_and(|d| self.endpoints[d.endpoint].app == app);
        match request {
            AdminRequest::Health => {
                AdminAnswer::Health(self.by_app[app as usize].iter().map(|&i| self.health(i)).collect())
            }
            AdminRequest::DeadLetters { endpoint } => {
                let Some(index) = self.endpoint_index(app, endpoint) else { return AdminAnswer::empty(request) };
                let state = self.state.borrow();
                let mut list: Vec<(u64, &Delivery)> = state
                    .deliveries
                    .iter()
                    .filter(|(_, d)| d.dead && d.endpoint == index)
                    .map(|(&s, d)| (s, d))
                    .collect();
                list.sort_by_key(|&(seq, _)| seq);
                let letters = list.into_iter().map(|(seq, d)| DeadLetter {
                    webhook_id: self.webhook_id(seq),
                    created_ms: d.created_ms,
                    body: String::from_utf8_lossy(&d.body).into_owned(),
                });
                AdminAnswer::DeadLetters(letters.collect())
            }
            AdminRequest::Attempts { webhook_id } => {
                let Some(seq) = self.parse_webhook_id(webhook_id) else { return AdminAnswer::empty(request) };
                let state = self.state.borrow();
                let attempts = state.attempts.iter().filter(|a| a.seq == seq && self.endpoints[a.endpoint].app == app);
                AdminAnswer::Attempts(
                    attempts
                        .map(|a| AttemptReport {
                            webhook_id: webhook_id.clone(),
                            endpoint: self.endpoints[a.endpoint].id.clone(),
                            at_ms: a.at_ms,
                            status: a.status,
                            error: a.error.clone(),
                            duration_ms: a.duration_ms,
                            next_attempt_in_ms: a.next_attempt_in_ms,
                        })
                        .collect(),
                )
            }
            AdminRequest::Replay { webhook_id } => {
                let seq = self.parse_webhook_id(webhook_id).filter(|&s| owned_by_app(s));
                AdminAnswer::Replayed(seq.filter(|&s| self.replay(s)).map(|_| webhook_id.clone()).into_iter().collect())
            }
            AdminRequest::ReplayRange { endpoint, from_ms, to_ms } => {
                let Some(index) = self.endpoint_index(app, endpoint) else { return AdminAnswer::empty(request) };
                let seqs = self.dead_letters_between(index, *from_ms, *to_ms);
                AdminAnswer::Replayed(
                    seqs.into_iter().filter(|&s| self.replay(s)).map(|s| self.webhook_id(s)).collect(),
                )
            }
            AdminRequest::Delete { webhook_id } => {
                let seq = self.parse_webhook_id(webhook_id).filter(|&s| owned_by_app(s));
                AdminAnswer::Deleted(seq.filter(|&s| self.discard(s)).map(|_| webhook_id.clone()).into_iter().collect())
            }
            AdminRequest::DeleteRange { endpoint, from_ms, to_ms } => {
                let Some(index) = self.endpoint_index(app, endpoint) else { return AdminAnswer::empty(request) };
                let seqs = self.dead_letters_between(index, *from_ms, *to_ms);
                AdminAnswer::Deleted(
                    seqs.into_iter().filter(|&s| self.discard(s)).map(|s| self.webhook_id(s)).collect(),
                )
            }
            AdminRequest::Enable { endpoint } => {
                let Some(index) = self.endpoint_index(app, endpoint) else { return AdminAnswer::empty(request) };
                let mut state = self.state.borrow_mut();
                let queue = &mut state.queues[index];
                queue.health.disabled = None;
                queue.health.open_until = None;
                queue.health.consecutive_failures = 0;
                for waker in queue.idle_workers.drain(..) {
                    waker.wake();
                }
                AdminAnswer::Enabled
            }
        }
    }

    /// One endpoint's health on this shard.
    fn health(&self, index: usize) -> admin::Health {
        let endpoint = &self.endpoints[index];
        let state = self.state.borrow();
        let queue = &state.queues[index];
        let (pending, dead) =
            state.deliveries.values().filter(|d| d.endpoint == index).fold((0u64, 0u64), |(p, d), x| {
                if x.dead {
                    (p, d + 1)
                } else {
                    (p + 1, d)
                }
            });
        let health = &queue.health;
        let status = if health.disabled.is_some() {
            EndpointState::Disabled
        } else if health.open_until.is_some() {
            EndpointState::BreakerOpen
        } else if health.consecutive_failures > 0 {
            EndpointState::Failing
        } else {
            EndpointState::Healthy
        };
        admin::Health {
            id: endpoint.id.clone(),
            url: endpoint.url.clone(),
            format: match endpoint.format {
                WebhookFormat::Pusher => "pusher",
                WebhookFormat::Standard => "standard",
            },
            state: status,
            disabled_reason: health.disabled.clone(),
            last_status: health.last_status,
            last_error: health.last_error.clone(),
            consecutive_failures: health.consecutive_failures,
            pending,
            dead_letters: dead,
            queued_bytes: queue.live_bytes,
            delivered: health.delivered,
            failed_attempts: health.failed,
        }
    }
}

/// Why an attempt failed before a response.
#[derive(Debug, Clone, thiserror::Error)]
enum AttemptError {
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The SSRF guard refused every address.
    #[error("refused: {0}")]
    Refused(String),
    /// Anything else (connect, I/O, malformed response).
    #[error("{0}")]
    Other(String),
}

/// The endpoints of every app, in config order.
fn build_endpoints(apps: &Apps, batch_events_max: usize) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    for app in &apps.list {
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
                batch_max: match hook.format {
                    WebhookFormat::Pusher => batch_events_max,
                    WebhookFormat::Standard => hook.batch_events_max.unwrap_or(1),
                },
                signer,
            });
        }
    }
    endpoints
}
