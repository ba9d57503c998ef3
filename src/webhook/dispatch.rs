//! A shard's webhook dispatcher: creating deliveries (into its WAL), releasing them once
//! committed, the worker tasks that send them, the retry timer, the batcher and dead letters;
//! its children apply a reload (`reload`) and answer the admin API (`admin`).
//!
//! Owns `Webhooks` and the control flow between the stages; the data they hand each other
//! live in their own modules (`endpoint`: endpoints and the transport; `setup`: the endpoints
//! and settings a reload swaps; `health`: the breaker and the settle decision; `batch`;
//! `delivery`: the live index and budgets; `queue`: the work in progress; `admin`: typed
//! answers). Never renders JSON, never crosses threads:
//! every shard runs its own dispatcher for the deliveries it created (published events on the
//! shard that accepted them, lifecycle events on the channel's home shard); the admin API
//! merges the shards' answers.
//!
//! Invariant: a delivery is sent only after its WAL record is committed (durable in `fsync`
//! mode), so a webhook id a receiver has seen is never reused after a crash.

mod admin;
mod reload;

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::batch;
use super::client::{Connection, Response};
use super::delivery;
pub use super::delivery::Refused;
use super::endpoint::{build_endpoints, AttemptError, EndpointIndex};
use super::event::{self, LifecycleEvent};
use super::health::Verdict;
use super::queue::{Attempt, DispatchState, EndpointQueue};
use super::setup::Setup;
use crate::apps::{AppIndex, Apps};
use crate::config::{Config, DurabilityMode, WebhookFormat};
use crate::metrics::ShardMetrics;
use crate::wal::{Durability, FileStorage, Kind, Lsn, Outcome, SequenceNumber, Wal, WalError};
use monoio_rustls::TlsConnector;

/// One shard's webhook dispatcher.
pub struct Webhooks {
    /// This shard's index.
    shard: usize,
    /// The endpoints and `[webhooks]` settings, swapped whole by a reload (`reload`); a task
    /// that awaits holds its own snapshot (`setup()`), never a borrow.
    setup_cell: RefCell<Rc<Setup>>,
    /// The log and the one index of live deliveries and batch items (its endpoint ids are the
    /// endpoints' indexes); it writes nothing in `memory` durability.
    wal: Wal<FileStorage>,
    /// The WAL's id (random in `memory` mode): the first half of every webhook id.
    log_id: u64,
    metrics: Arc<[ShardMetrics]>,
    state: RefCell<DispatchState>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Webhooks {
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
        let keys: Vec<&str> = endpoints.iter().map(|e| &*e.key).collect();
        let (wal, recovered) = match settings.durability {
            DurabilityMode::Memory => (Wal::memory(shard as u32, &keys), Vec::new()),
            mode => {
                let directory = super::wal_directory(&settings.data_dir, shard);
                let storage = FileStorage::open(&directory)
                    .await
                    .map_err(|e| format!("webhooks.data_dir: cannot open {}: {e}", directory.display()))?;
                let durability = match mode {
                    DurabilityMode::Batch => Durability::Batch(Duration::from_millis(settings.batch_sync_ms)),
                    _ => Durability::Fsync,
                };
                Wal::open(storage, shard as u32, settings.segment_bytes_max, durability, &keys)
                    .await
                    .map_err(|e| format!("webhooks: {} (in {})", e, directory.display()))?
            }
        };
        let log_id = wal.log_id();
        if tls.is_none() && endpoints.iter().any(|e| e.target.tls) {
            return Err("an https:// webhook endpoint needs the TLS connector (`tls_connector`)".into());
        }
        // The keys given to the log are its ids 0..n, so this interns nothing new.
        let setup = Setup::new(config.clone(), apps, tls, |key| wal.endpoint_id(key));
        let state = DispatchState {
            queues: (0..wal.index().endpoint_count()).map(|_| EndpointQueue::default()).collect(),
            ..DispatchState::default()
        };
        let webhooks = Rc::new(Webhooks {
            shard,
            setup_cell: RefCell::new(Rc::new(setup)),
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

    /// The endpoints and settings as of now.
    fn setup(&self) -> Rc<Setup> {
        self.setup_cell.borrow().clone()
    }

    /// Whether the endpoint at `index` is configured now.
    fn configured(&self, index: EndpointIndex) -> bool {
        self.setup_cell.borrow().endpoint(index).is_some()
    }

    /// An endpoint's key (`"{app_id}/{endpoint_id}"`), also after it left the config.
    fn key_of(&self, index: EndpointIndex) -> String {
        self.wal.index().key(index.get()).to_string()
    }

    /// Queues what the WAL held: pending deliveries get an attempt now, batch items are
    /// batched again, dead letters are kept.
    fn recover(&self, recovered: Vec<SequenceNumber>) {
        let (mut pending, mut dead, mut orphans) = (0u64, 0u64, 0u64);
        let now = Instant::now();
        for seq in recovered {
            let (kind, endpoint, is_dead) = {
                let index = self.wal.index();
                let live = index.get(seq).expect("recovered records are live");
                (live.kind, live.endpoint, live.dead)
            };
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint];
            if !self.configured(EndpointIndex::new(endpoint)) {
                // Its endpoint left the config: kept in the log, reported, and sent if a reload
                // configures the endpoint again (`reload::unpark`).
                queue.parked.push(seq);
                orphans += 1;
                continue;
            }
            match kind {
                Kind::BatchItem => {
                    queue.batch.push(seq, now);
                    pending += 1;
                }
                Kind::Delivery if is_dead => dead += 1,
                Kind::Delivery => {
                    queue.ready.push_back(seq);
                    pending += 1;
                }
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
        if self.wal.writes() {
            monoio::spawn(self.clone().flusher());
        }
        monoio::spawn(self.clone().timer_task());
        monoio::spawn(self.clone().batch_task());
        self.spawn_workers();
    }

    /// Tops every configured endpoint up to `connections_per_endpoint_max` workers (all of
    /// them at start; an endpoint a reload added, or whose workers ended when a reload removed
    /// it); warns about endpoints the address guard will refuse.
    fn spawn_workers(self: &Rc<Self>) {
        let setup = self.setup();
        let workers_max = setup.config.webhooks.connections_per_endpoint_max;
        for (index, endpoint) in setup.configured_endpoints() {
            let missing = {
                let mut state = self.state.borrow_mut();
                let queue = &mut state.queues[index.get()];
                let missing = workers_max.saturating_sub(queue.workers);
                queue.workers += missing;
                missing
            };
            for _ in 0..missing {
                monoio::spawn(self.clone().worker(index));
            }
            if missing == 0 {
                continue;
            }
            if let Some(ip) = endpoint.target.literal_ip() {
                if !setup.transport.addresses.permits(ip) && self.shard == 0 {
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
    pub fn webhook_id(&self, seq: SequenceNumber) -> String {
        delivery::webhook_id(self.log_id, seq)
    }

    /// The sequence number in one of this shard's webhook ids; `None` for anything else.
    fn parse_webhook_id(&self, id: &str) -> Option<SequenceNumber> {
        delivery::parse_webhook_id(self.log_id, id)
    }

    // ---- sources -----------------------------------------------------------------------

    /// Whether an app has Standard Webhooks endpoints (a publish must then be durable first).
    pub fn has_standard(&self, app: AppIndex) -> bool {
        let setup = self.setup_cell.borrow();
        setup.endpoints_of(app).iter().any(|&e| setup.configured(e).format == WebhookFormat::Standard)
    }

    /// Creates the deliveries of a published event for every matching Standard Webhooks
    /// endpoint; returns the log position to `commit` before answering the publisher.
    pub fn published(&self, app: AppIndex, event: &str, channels: &[&str], data: &str) -> Result<Option<Lsn>, Refused> {
        // Two passes: every budget is checked before anything is created, so a refused publish
        // leaves no delivery behind (its retry creates them all once).
        let setup = self.setup();
        let mut matches: Vec<(EndpointIndex, &str)> = Vec::new();
        for &index in setup.endpoints_of(app) {
            let endpoint = setup.configured(index);
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
            if setup.configured(index).batch_max > 1 {
                last = last.max(self.add_to_batch(index, body.into())?);
            } else {
                last = Some(self.create(index, body.into(), time_ms)?);
            }
        }
        Ok(last)
    }

    /// Refuses new deliveries for `endpoint` while its queue is at `endpoint_queue_bytes_max`
    /// or the shard's is at `queue_bytes_max`.
    fn check_capacity(&self, endpoint: EndpointIndex) -> Result<(), Refused> {
        let index = self.wal.index();
        let setup = self.setup_cell.borrow();
        let settings = &setup.config.webhooks;
        if index.endpoint_bytes(endpoint.get()) >= settings.endpoint_queue_bytes_max {
            return Err(Refused::EndpointFull(index.key(endpoint.get()).to_string()));
        }
        if index.live_bytes() >= settings.queue_bytes_max {
            return Err(Refused::QueueFull);
        }
        Ok(())
    }

    /// Waits until `lsn` is committed (at once in `memory` mode).
    pub async fn commit(&self, lsn: Lsn) -> Result<(), Refused> {
        self.wal.commit(lsn).await.map_err(Refused::from)
    }

    /// A lifecycle event for an app's Pusher-format endpoints that select it; batched per
    /// endpoint. Each is written to the WAL at once as its own record; returns the position to
    /// commit for it to be durable.
    pub fn lifecycle(&self, app: AppIndex, event: LifecycleEvent) -> Option<Lsn> {
        let mut last = None;
        let setup = self.setup();
        for &index in setup.endpoints_of(app) {
            let endpoint = setup.configured(index);
            if endpoint.format != WebhookFormat::Pusher
                || endpoint.events.as_ref().is_some_and(|list| !list.iter().any(|e| e == event.name))
            {
                continue;
            }
            match self
                .check_capacity(index)
                .and_then(|()| self.add_to_batch(index, Bytes::copy_from_slice(event.json.as_bytes())))
            {
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
    /// `batch_ms`. Returns the event's log position.
    fn add_to_batch(&self, endpoint: EndpointIndex, json: Bytes) -> Result<Option<Lsn>, Refused> {
        let (seq, lsn) = self.wal.append(Kind::BatchItem, endpoint.get(), now_ms(), json)?;
        let batch_max = self.setup_cell.borrow().configured(endpoint).batch_max;
        let full = {
            let mut state = self.state.borrow_mut();
            let full = state.queues[endpoint.get()].batch.push(seq, Instant::now()) >= batch_max;
            if let Some(waker) = state.batch_task.take() {
                waker.wake();
            }
            full
        };
        if full {
            self.flush_batch(endpoint);
        }
        Ok(Some(lsn))
    }

    /// Turns an endpoint's batched events into one delivery, then retires their WAL items (the
    /// acks follow the batch's record in the log, so a crash keeps one or the other: at least
    /// once).
    fn flush_batch(&self, endpoint: EndpointIndex) {
        let items = self.state.borrow_mut().queues[endpoint.get()].batch.take();
        if items.is_empty() {
            return;
        }
        let time_ms = now_ms();
        // A batch of an endpoint a reload removed is flushed before the reload swaps it out.
        let format = self.setup_cell.borrow().configured(endpoint).format;
        let body = {
            let index = self.wal.index();
            let events: Vec<_> = items
                .iter()
                .map(|&seq| String::from_utf8_lossy(&index.get(seq).expect("batched items are live").body))
                .collect();
            batch::body(format, time_ms, events.iter().map(|e| &**e))
        };
        // The items already count against the queue limit, so the batch is not refused for it;
        // their bytes are given back when they are acked below.
        if let Err(error) = self.create(endpoint, body, time_ms) {
            // Only a failed WAL gets here: the items stay in the log and are batched again
            // after a restart.
            tracing::error!(endpoint = %self.key_of(endpoint), %error, "webhook batch not queued");
            return;
        }
        for seq in items {
            let _ = self.wal.append_ack(seq, Outcome::Delivered);
        }
    }

    /// Creates one delivery: into the WAL (or memory), then queued once committed.
    fn create(&self, endpoint: EndpointIndex, body: Bytes, created_ms: u64) -> Result<Lsn, Refused> {
        let (seq, lsn) = self.wal.append(Kind::Delivery, endpoint.get(), created_ms, body)?;
        ShardMetrics::add(&self.metrics().webhook_deliveries_total, 1);
        ShardMetrics::add(&self.metrics().webhook_pending, 1);
        if self.wal.writes() {
            self.state.borrow_mut().awaiting.push_back((lsn, seq));
        } else {
            self.make_ready(seq);
        }
        Ok(lsn)
    }

    // ---- tasks -------------------------------------------------------------------------

    /// Writes and syncs the WAL batch after batch; releases deliveries to their endpoints'
    /// queues once durable (in `batch` mode the publisher was answered earlier), so a webhook
    /// id that reached a receiver survives a power loss and is never handed out again.
    async fn flusher(self: Rc<Self>) {
        let wal = &self.wal;
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
        let stats = self.wal.stats();
        let metrics = self.metrics();
        metrics.wal_fsyncs_total.store(stats.fsyncs, std::sync::atomic::Ordering::Relaxed);
        metrics.wal_bytes_written_total.store(stats.bytes_written, std::sync::atomic::Ordering::Relaxed);
        loop {
            let Some(seq) = self.state.borrow_mut().pop_released(reached) else { return };
            self.make_ready(seq);
        }
    }

    /// Queues a delivery for its endpoint's workers (or dead-letters it if the endpoint is
    /// disabled, or was removed by a reload).
    fn make_ready(&self, seq: SequenceNumber) {
        let endpoint = self.wal.index().get(seq).filter(|d| !d.dead && d.kind == Kind::Delivery).map(|d| d.endpoint);
        let Some(endpoint) = endpoint.map(EndpointIndex::new) else { return };
        if !self.configured(endpoint) {
            return self.dead_letter(seq);
        }
        let mut state = self.state.borrow_mut();
        if state.queues[endpoint.get()].health.disabled.is_some() {
            drop(state);
            return self.dead_letter(seq);
        }
        let queue = &mut state.queues[endpoint.get()];
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
            let due = self.state.borrow_mut().take_due(now);
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
                if queue.health.cooled(now) && !queue.ready.is_empty() {
                    if let Some(waker) = queue.idle_workers.pop() {
                        waker.wake();
                    }
                }
            }
        }
    }

    fn schedule(&self, seq: SequenceNumber, delay: Duration) {
        let mut state = self.state.borrow_mut();
        state.timers.insert((Instant::now() + delay, seq));
        if let Some(waker) = state.timer_task.take() {
            waker.wake();
        }
    }

    /// Flushes endpoints' batches `batch_ms` after their first event.
    async fn batch_task(self: Rc<Self>) {
        loop {
            let oldest = poll_fn(|cx| {
                let mut state = self.state.borrow_mut();
                match state.queues.iter().filter_map(|q| q.batch.since()).min() {
                    Some(since) => Poll::Ready(since),
                    None => {
                        state.batch_task = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            // Read for each batch: a reload may change it.
            let period = Duration::from_millis(self.setup_cell.borrow().config.webhooks.batch_ms);
            monoio::time::sleep_until(monoio::time::Instant::from_std(oldest + period)).await;
            let now = Instant::now();
            let due: Vec<EndpointIndex> = {
                let state = self.state.borrow();
                let due = |i: &EndpointIndex| state.queues[i.get()].batch.is_due(now, period);
                (0..state.queues.len()).map(EndpointIndex::new).filter(due).collect()
            };
            for endpoint in due {
                self.flush_batch(endpoint);
            }
        }
    }

    /// One of an endpoint's workers: owns one keep-alive connection, takes batches of ready
    /// deliveries (at most `pipeline_max`), sends them pipelined, and settles each. Each batch
    /// is sent to the endpoint as configured when it is taken (a reload may change its URL or
    /// secret: the connection to the old URL is dropped); the worker ends once a reload has
    /// removed its endpoint.
    async fn worker(self: Rc<Self>, endpoint: EndpointIndex) {
        let mut connection: Option<Connection> = None;
        let mut connected_to = String::new();
        while let Some(batch) = self.take_batch(endpoint).await {
            let setup = self.setup();
            let target = setup.configured(endpoint);
            if target.url != connected_to {
                connection = None;
                connected_to.clone_from(&target.url);
            }
            let requests = {
                let index = self.wal.index();
                let timestamp_s = now_ms() / 1000;
                let heads = batch.iter().map(|&seq| {
                    let body = index.get(seq).expect("taken deliveries are live").body.clone();
                    (target.request_head(&self.webhook_id(seq), timestamp_s, &body), body)
                });
                heads.collect()
            };
            let started = Instant::now();
            let results = setup.transport.exchange(target, &mut connection, requests).await;
            let duration_ms = started.elapsed().as_millis() as u64;
            if matches!(results.first(), Some(Err(AttemptError::Refused(_)))) {
                ShardMetrics::add(&self.metrics().webhook_ssrf_refused_total, 1);
            }
            for (seq, result) in batch.into_iter().zip(results) {
                self.settle(endpoint, seq, result, duration_ms);
            }
        }
        self.state.borrow_mut().queues[endpoint.get()].workers -= 1;
    }

    /// Waits for deliveries this endpoint may send now (breaker closed or probing); `None`
    /// once a reload has removed the endpoint.
    async fn take_batch(&self, endpoint: EndpointIndex) -> Option<Vec<SequenceNumber>> {
        poll_fn(|cx| {
            if !self.configured(endpoint) {
                return Poll::Ready(None);
            }
            let pipeline_max = self.setup_cell.borrow().config.webhooks.pipeline_max;
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint.get()];
            match queue.health.admit(Instant::now(), queue.in_flight, queue.ready.len(), pipeline_max) {
                Some(n) => {
                    queue.in_flight += n;
                    Poll::Ready(Some(queue.ready.drain(..n).collect()))
                }
                None => {
                    queue.idle_workers.push(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Applies an attempt's result (`health::Breaker::settle` decides): delivered, retried
    /// later, or dead; and logs the attempt for the admin API.
    fn settle(
        &self,
        endpoint: EndpointIndex,
        seq: SequenceNumber,
        result: Result<Response, AttemptError>,
        duration_ms: u64,
    ) {
        let decision = {
            let mut state = self.state.borrow_mut();
            let attempts = state.attempt_counts.entry(seq).or_insert(0);
            *attempts += 1;
            let attempts = *attempts;
            let queue = &mut state.queues[endpoint.get()];
            debug_assert!(queue.in_flight > 0, "settling a delivery no worker took");
            queue.in_flight -= 1;
            let mut rng = fastrand::Rng::new();
            let setup = self.setup_cell.borrow();
            let decision =
                queue.health.settle(&result, attempts, Instant::now(), &setup.policy, setup.breaker, &mut rng);
            if decision.verdict == Verdict::Delivered {
                // A recovered endpoint: every worker may go on.
                for waker in queue.idle_workers.drain(..) {
                    waker.wake();
                }
            }
            decision
        };
        let mut next_attempt_in_ms = None;
        match decision.verdict {
            Verdict::Delivered => {
                self.forget(seq);
                ShardMetrics::add(&self.metrics().webhook_delivered_total, 1);
            }
            Verdict::Gone => {
                ShardMetrics::add(&self.metrics().webhook_attempts_failed_total, 1);
                self.disable(endpoint, "the receiver answered 410 Gone");
                self.dead_letter(seq);
            }
            Verdict::Retry(_) if !self.configured(endpoint) => {
                // A reload removed the endpoint while this attempt was in flight.
                ShardMetrics::add(&self.metrics().webhook_attempts_failed_total, 1);
                self.dead_letter(seq);
            }
            Verdict::Retry(delay) => {
                ShardMetrics::add(&self.metrics().webhook_attempts_failed_total, 1);
                next_attempt_in_ms = Some(delay.as_millis() as u64);
                self.schedule(seq, delay);
            }
            Verdict::Dead => {
                ShardMetrics::add(&self.metrics().webhook_attempts_failed_total, 1);
                self.dead_letter(seq);
            }
        }
        let attempt = Attempt {
            seq,
            endpoint,
            at_ms: now_ms(),
            status: decision.status,
            error: decision.error,
            duration_ms,
            next_attempt_in_ms,
        };
        let attempt_log_max = self.setup_cell.borrow().config.webhooks.attempt_log_max;
        self.state.borrow_mut().log_attempt(attempt, attempt_log_max);
    }

    /// A 2xx: the delivery is done.
    fn forget(&self, seq: SequenceNumber) {
        let live = self.wal.index().get(seq).is_some();
        // No one waits for this ack: if it is lost in a crash, the delivery is sent again (at
        // least once; receivers deduplicate on the webhook id).
        let _ = self.wal.append_ack(seq, Outcome::Delivered);
        self.state.borrow_mut().attempt_counts.remove(&seq);
        if live {
            ShardMetrics::sub(&self.metrics().webhook_pending, 1);
        }
    }

    /// Retries exhausted or endpoint disabled: kept, replayable.
    fn dead_letter(&self, seq: SequenceNumber) {
        let pending = self.wal.index().get(seq).is_some_and(|d| !d.dead && d.kind == Kind::Delivery);
        if !pending {
            return;
        }
        let _ = self.wal.append_ack(seq, Outcome::Dead);
        self.state.borrow_mut().attempt_counts.remove(&seq);
        ShardMetrics::sub(&self.metrics().webhook_pending, 1);
        ShardMetrics::add(&self.metrics().webhook_dead_letters, 1);
        ShardMetrics::add(&self.metrics().webhook_dead_letters_total, 1);
    }

    /// 410 Gone: stop sending to the endpoint; its queued deliveries become dead letters.
    fn disable(&self, endpoint: EndpointIndex, reason: &str) {
        let queued: Vec<SequenceNumber> = {
            let mut state = self.state.borrow_mut();
            let queue = &mut state.queues[endpoint.get()];
            queue.health.disabled = Some(reason.into());
            queue.ready.drain(..).collect()
        };
        tracing::warn!(endpoint = %self.key_of(endpoint), reason, "webhook endpoint disabled");
        for seq in queued {
            self.dead_letter(seq);
        }
    }

    /// Makes a dead letter pending again and queues it.
    fn replay(&self, seq: SequenceNumber) -> bool {
        if !matches!(self.wal.append_replay(seq), Ok(Some(_))) {
            return false;
        }
        // A fresh schedule.
        self.state.borrow_mut().attempt_counts.remove(&seq);
        ShardMetrics::add(&self.metrics().webhook_pending, 1);
        ShardMetrics::sub(&self.metrics().webhook_dead_letters, 1);
        self.make_ready(seq);
        true
    }

    /// Forgets a dead letter for good (deleted through the admin API, or expired): its budget
    /// is freed and the log says so, so a restart does not bring it back.
    fn discard(&self, seq: SequenceNumber) -> bool {
        // A dead letter of an endpoint that left the config is kept, as it was recovered.
        let dead_of = self.wal.index().get(seq).filter(|d| d.dead).map(|d| EndpointIndex::new(d.endpoint));
        let configured_dead = dead_of.is_some_and(|endpoint| self.configured(endpoint));
        if !configured_dead {
            return false;
        }
        // Not waited for: if the ack is lost in a crash the dead letter comes back, and is
        // discarded again by the next sweep or request.
        let _ = self.wal.append_ack(seq, Outcome::Discarded);
        ShardMetrics::sub(&self.metrics().webhook_dead_letters, 1);
        true
    }

    /// Discards the dead letters created more than `dead_letter_retention_s` before `now_ms`.
    fn expire_dead_letters(&self, now_ms: u64) {
        let retention_ms = self.setup_cell.borrow().config.webhooks.dead_letter_retention_s.saturating_mul(1000);
        if retention_ms == 0 {
            return;
        }
        let cutoff = now_ms.saturating_sub(retention_ms);
        let expired = self.wal.index().dead_before(cutoff);
        let count = expired.into_iter().filter(|&seq| self.discard(seq)).count();
        if count > 0 {
            tracing::info!(
                shard = self.shard,
                count,
                "expired dead letters discarded (webhooks.dead_letter_retention_s)"
            );
        }
    }
}
