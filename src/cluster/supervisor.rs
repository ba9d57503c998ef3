//! The link supervisor: one per shard, owning that shard's command link and subscriber link
//! to Redis (docs/cluster.md, "When Redis is unreachable").
//!
//! It connects both links, subscribes the shard's buckets, runs the barrier (a baseline the
//! first time, a gap check after every reconnect), then reads bucket messages, checks their
//! sequences and hands them to the shard through `Events`. It pings both links so a silent
//! Redis is noticed within about `command_timeout`, and on any link error it marks the shard's
//! link down (`cluster_link_down`, which `/ready` on any shard can read), waits with
//! exponential backoff and jitter, and starts again.
//!
//! It is also the shard's only sender to Redis: the shard's API publishes and client events wait
//! in its `Outbound` queue, and it writes them in batches, one `MULTI`, an `SPUBLISH` per
//! message (numbered per bucket), one `HSET` of the bucket's latest number, `EXEC`; each sender
//! learns the outcome after `EXEC` (docs/cluster.md, "Gap detection"). The shard's scripts and
//! queries wait in its `Commands` queue; the supervisor loads the scripts at every connect and
//! runs queued commands in one pipeline per batch, handing each group its replies before it
//! reads anything further from Redis (what `Commands::request_then` relies on).
//!
//! Owns no shard state: what a message or a gap does to connections is the `Events`
//! implementation's. Invariant: the link is reported up only after every bucket of the shard is
//! subscribed and its barrier has passed, and down from the first error on; the outbound and
//! command queues accept work exactly while it is up.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::apps::AppIndex;
use crate::metrics::ShardMetrics;

use super::bucket;
use super::commands::{Commands, Request};
use super::link::{Link, LinkError, LinkOptions, Push, Pushes, Reply, Subscriptions};
use super::message::{self, Header, MessageError, Sender};
use super::outbound::{Outbound, Outgoing, Unavailable};
use super::sequence::{Barrier, BucketId, GapDetector, GapReason, Verdict};
use super::NodeIdentity;

/// First reconnect delay.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Channels per `SSUBSCRIBE` command, so one command stays far below `pipeline_bytes_max`.
const SUBSCRIBE_BATCH: usize = 128;

/// The delay before reconnect attempt `attempt` (0 = the first after a failure): 100 ms
/// doubling to 5 s, times a factor in ±20 % taken from `unit` (uniform in `0..1`), so nodes that
/// lost Redis together do not come back in step.
pub fn reconnect_delay(attempt: u32, unit: f64) -> Duration {
    let base = BACKOFF_FIRST.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
    base.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// What the supervisor tells its shard.
pub trait Events {
    /// A bucket message to deliver (in order, or the first after a gap).
    fn message(&mut self, bucket: BucketId, header: &Header<'_>, frame: Bytes);
    /// The bucket's local connections may have missed messages: close them with 4200.
    fn gap(&mut self, bucket: BucketId, gap: Gap);
    /// Both links are connected, every bucket is subscribed and its barrier passed.
    fn link_up(&mut self);
    /// A link failed; messages may be missed until the next `link_up`.
    fn link_down(&mut self, error: &LinkError);
    /// A barrier found `sender`'s last number in `bucket` to be `last` (what the detector
    /// goes on from: numbers up to it count as seen).
    fn resynced(&mut self, _bucket: BucketId, _sender: Sender, _last: u64) {}
}

/// Why a bucket counts as gapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gap {
    /// A message's sequence was not the next one (or its sender could not be tracked).
    Message(Verdict),
    /// The barrier after a (re)connect found the hash disagreeing with what was seen.
    Barrier(GapReason),
    /// A payload in the bucket was not a message: its sender and number are unknown.
    Malformed(MessageError),
}

/// Writes this node's `cluster.buckets` to Redis for the nodes that come later (`HSETNX
/// {prefix}:config buckets N`) and reads back the value there (docs/cluster.md, "Fan-out"):
/// `Ok(Err(reason))` when it is another one, which this node must not run with (it would
/// publish to buckets where the other nodes' subscribers never look).
pub async fn check_buckets(command: &mut Link, prefix: &str, buckets: u16) -> Result<Result<(), String>, LinkError> {
    let key = format!("{prefix}:config");
    let mine = buckets.to_string();
    command.queue(&[b"HSETNX", key.as_bytes(), b"buckets", mine.as_bytes()])?;
    command.queue(&[b"HGET", key.as_bytes(), b"buckets"])?;
    let mut replies = Vec::with_capacity(2);
    command.flush(&mut replies).await?;
    match replies.get(1) {
        Some(Reply::BulkString(held)) if held[..] == *mine.as_bytes() => Ok(Ok(())),
        Some(Reply::BulkString(held)) => Ok(Err(format!(
            "cluster.buckets is {buckets} here, but the nodes sharing this redis and cluster.prefix use {} \
             (the buckets field of {key}): every node needs the same cluster.buckets",
            String::from_utf8_lossy(held)
        ))),
        other => Err(LinkError::Protocol(format!("HGET {key} buckets answered {other:?}"))),
    }
}

/// Where the supervisor connects and which buckets it serves.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// Redis, resolved before the shard starts (resolution blocks).
    pub address: SocketAddr,
    /// Timeouts, limits and credentials of both links.
    pub link: LinkOptions,
    /// `cluster.prefix`.
    pub prefix: String,
    /// The apps served: index on this node and configured id (the id is what other nodes use).
    pub apps: Vec<(AppIndex, String)>,
    /// `cluster.buckets`.
    pub buckets: u16,
    /// Shards of this node.
    pub shards: usize,
    /// This shard.
    pub shard: usize,
    /// `cluster.senders_max`.
    pub senders_max: usize,
    /// This node's id and incarnation, for the messages it sends.
    pub node: NodeIdentity,
}

/// Room kept in a pipeline for a batch's `MULTI` and `EXEC`.
const PIPELINE_OVERHEAD_BYTES: usize = 1024;
/// Bytes a message may add to a pipeline beyond its frame: its header (at most 684 bytes by
/// the format's field limits), the bucket's channel name, RESP framing, and one `HSET`.
const MESSAGE_OVERHEAD_BYTES: usize = 4096;

/// A bucket this shard sends to: its Redis names and the last number it gave a message there.
struct Sending {
    channel: Bytes,
    sequence_key: String,
    last: u64,
}

/// A shard's bucket: its pub/sub channel and `:seq` hash.
struct Subscribed {
    id: BucketId,
    channel: Bytes,
    sequence_key: String,
    app_id: String,
}

/// One shard's links to Redis and what it learned from them.
pub struct Supervisor<E: Events> {
    options: SupervisorOptions,
    buckets: Vec<Subscribed>,
    by_channel: HashMap<Bytes, usize>,
    detector: GapDetector,
    events: E,
    metrics: Arc<[ShardMetrics]>,
    rng: fastrand::Rng,
    /// Whether a barrier passed once (later ones check for gaps instead of learning).
    baseline_done: bool,
    /// Messages this shard wants published.
    outbound: Rc<Outbound>,
    /// Commands (scripts, queries) whose replies this shard awaits.
    commands: Rc<Commands>,
    /// Per (app, bucket) this shard has sent to: names and last number. Numbers are never
    /// taken back, also when a batch fails (receivers then see a gap, never a reuse).
    sending: HashMap<(AppIndex, u16), Sending>,
    /// This shard's field in every bucket's `:seq` hash.
    sequence_field: String,
    /// Apps a reload added, whose buckets are being subscribed, oldest first.
    adding: VecDeque<Adding>,
}

/// Buckets a reload added: subscribed (`unconfirmed` confirmations still due), then baselined
/// (their `HGETALL`s, compared at the pong of a `PING` sent after them), then `done`.
struct Adding {
    /// Their place in `Supervisor::buckets`.
    range: std::ops::Range<usize>,
    unconfirmed: usize,
    /// Whether its `SSUBSCRIBE`s were written.
    requested: bool,
    /// The `HGETALL` replies, once the barrier is under way.
    hashes: Option<Vec<Reply>>,
    done: Box<dyn FnOnce(Result<(), Unavailable>)>,
}

/// What a pong on the subscriber link answers.
enum PingFor {
    Heartbeat,
    /// The barrier of the oldest `Adding`.
    Barrier,
}

impl<E: Events> Supervisor<E> {
    /// A supervisor for `options.shard`; `rng` draws the reconnect jitter.
    pub fn new(options: SupervisorOptions, events: E, metrics: Arc<[ShardMetrics]>, rng: fastrand::Rng) -> Self {
        assert!(options.buckets > 0 && options.shard < metrics.len());
        let mut buckets = Vec::new();
        let mut name = String::new();
        for (app, app_id) in &options.apps {
            for number in bucket::of_shard(options.buckets, options.shards, options.shard) {
                bucket::channel_name(&options.prefix, app_id, number, &mut name);
                let channel = Bytes::from(name.clone().into_bytes());
                bucket::sequence_key(&options.prefix, app_id, number, &mut name);
                let id = BucketId { app: *app, number };
                buckets.push(Subscribed { id, channel, sequence_key: name.clone(), app_id: app_id.clone() });
            }
        }
        let by_channel = buckets.iter().enumerate().map(|(i, b)| (b.channel.clone(), i)).collect();
        let detector = GapDetector::new(options.senders_max);
        let mut sequence_field = String::new();
        let sender = Sender { incarnation: options.node.incarnation, shard: options.shard as u16 };
        bucket::sequence_field(sender, &mut sequence_field);
        let supervisor = Supervisor {
            options,
            buckets,
            by_channel,
            detector,
            events,
            metrics,
            rng,
            baseline_done: false,
            outbound: Rc::new(Outbound::default()),
            commands: Rc::new(Commands::default()),
            sending: HashMap::new(),
            sequence_field,
            adding: VecDeque::new(),
        };
        supervisor.set_down(true);
        supervisor
    }

    /// Runs until the shard drops it: connect, serve, and after a failure back off and again.
    pub async fn run(mut self) {
        let mut attempt = 0;
        loop {
            let mut was_up = false;
            let error = self.session(&mut was_up).await;
            self.set_down(true);
            // Their buckets stay in the list: the next session subscribes them with the rest.
            for adding in self.adding.drain(..) {
                (adding.done)(Err(Unavailable));
            }
            self.events.link_down(&error);
            if was_up {
                attempt = 0;
            }
            let delay = reconnect_delay(attempt, self.rng.f64());
            attempt = attempt.saturating_add(1);
            monoio::time::sleep(delay).await;
        }
    }

    /// The queue through which the shard sends; hand it to the shard before `run`.
    pub fn outbound(&self) -> Rc<Outbound> {
        self.outbound.clone()
    }

    /// The queue through which the shard runs scripts and queries; hand it over before `run`.
    pub fn commands(&self) -> Rc<Commands> {
        self.commands.clone()
    }

    fn set_down(&self, down: bool) {
        self.metrics[self.options.shard].cluster_link_down.store(u64::from(down), Ordering::Relaxed);
        self.outbound.set_up(!down);
        self.commands.set_up(!down);
    }

    /// One connection of both links, until it fails.
    async fn session(&mut self, was_up: &mut bool) -> LinkError {
        let (mut command, mut subscriptions, mut pushes) = match self.connect().await {
            Ok(links) => links,
            Err(error) => return error,
        };
        if let Err(error) = self.restore_sequences(&mut command).await {
            return error;
        }
        // Checked at every connect: Redis may have restarted empty, and the first node to come
        // back writes the value (start-up refuses a mismatch; here the link just stays down).
        match check_buckets(&mut command, &self.options.prefix, self.options.buckets).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return LinkError::Handshake(reason),
            Err(error) => return error,
        }
        if let Err(error) = self.subscribe_and_sync(&mut command, &mut subscriptions, &mut pushes).await {
            return error;
        }
        if let Err(error) = super::scripts::load(&mut command).await {
            return error;
        }
        self.set_down(false);
        self.events.link_up();
        *was_up = true;
        self.serve(&mut command, &mut subscriptions, &mut pushes).await
    }

    async fn connect(&self) -> Result<(Link, Subscriptions, Pushes), LinkError> {
        let command = Link::connect(self.options.address, &self.options.link).await?;
        let (subscriptions, pushes) =
            Link::connect(self.options.address, &self.options.link).await?.into_subscriber()?;
        Ok((command, subscriptions, pushes))
    }

    /// Writes this shard's last number in every bucket it has sent to again (`HSET`, one
    /// pipeline), before the link counts as up. Redis may have restarted empty meanwhile: a
    /// node whose first barrier comes after that would otherwise not know this sender and take
    /// its next number (above 1) for a gap. A number only ever grows, and it counts the
    /// messages of a batch that failed in flight, so receivers that missed them still see the
    /// difference at their barrier.
    async fn restore_sequences(&mut self, command: &mut Link) -> Result<(), LinkError> {
        let sendings: Vec<&Sending> = self.sending.values().collect();
        let mut replies = Vec::new();
        // In pipelines of SUBSCRIBE_BATCH commands (a few KiB), far below pipeline_bytes_max.
        for chunk in sendings.chunks(SUBSCRIBE_BATCH) {
            for sending in chunk {
                let (key, field, last) = (&sending.sequence_key, &self.sequence_field, sending.last.to_string());
                command.queue(&[b"HSET", key.as_bytes(), field.as_bytes(), last.as_bytes()])?;
            }
            replies.clear();
            command.flush(&mut replies).await?;
        }
        Ok(())
    }

    /// Subscribes every bucket, then runs the barrier: `HGETALL` of each bucket's `:seq` hash
    /// on the command link, `PING` on the subscriber, and at its pong the comparison.
    async fn subscribe_and_sync(
        &mut self,
        command: &mut Link,
        subscriptions: &mut Subscriptions,
        pushes: &mut Pushes,
    ) -> Result<(), LinkError> {
        let timeout = self.options.link.command_timeout;
        for batch in self.buckets.chunks(SUBSCRIBE_BATCH) {
            let channels: Vec<&[u8]> = batch.iter().map(|b| &b.channel[..]).collect();
            subscriptions.ssubscribe(&channels).await?;
        }
        let mut confirmed = 0;
        while confirmed < self.buckets.len() {
            match self.next_push(pushes, timeout).await? {
                Push::Subscribed { .. } => confirmed += 1,
                other => self.on_push(other)?,
            }
        }
        for subscribed in &self.buckets {
            command.queue(&[b"HGETALL", subscribed.sequence_key.as_bytes()])?;
        }
        let mut hashes = Vec::with_capacity(self.buckets.len());
        command.flush(&mut hashes).await?;
        subscriptions.ping().await?;
        loop {
            match self.next_push(pushes, timeout).await? {
                Push::Pong => break,
                other => self.on_push(other)?,
            }
        }
        let barrier = if self.baseline_done { Barrier::Reconnect } else { Barrier::Baseline };
        for (index, hash) in hashes.iter().enumerate() {
            self.resync(index, barrier, hash)?;
        }
        self.baseline_done = true;
        Ok(())
    }

    /// Compares bucket `index`'s `HGETALL …:seq` reply with what was seen (`barrier`).
    fn resync(&mut self, index: usize, barrier: Barrier, hash: &Reply) -> Result<(), LinkError> {
        let Reply::Array(items) = hash else {
            return Err(LinkError::Protocol(format!("HGETALL answered {hash:?}")));
        };
        let pairs = items.chunks_exact(2).filter_map(|pair| match pair {
            [Reply::BulkString(field), Reply::BulkString(value)] => Some((&field[..], &value[..])),
            _ => None,
        });
        let id = self.buckets[index].id;
        // A pair that is not two bulk strings is left out, so the count tells.
        let unreadable = pairs.clone().count() * 2 != items.len();
        for (field, value) in pairs.clone() {
            let last = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            if let (Some(sender), Some(last)) = (bucket::parse_sequence_field(field), last) {
                self.events.resynced(id, sender, last);
            }
        }
        let found = self.detector.resync(id, barrier, pairs);
        if let Some(reason) = found.or(unreadable.then_some(GapReason::Unreadable)) {
            self.events.gap(id, Gap::Barrier(reason));
        }
        Ok(())
    }

    /// Takes the apps reloads added: their buckets of this shard join the list and are
    /// subscribed; confirmations and the barrier follow in `serve`.
    async fn start_adding(&mut self, subscriptions: &mut Subscriptions) -> Result<(), LinkError> {
        for new in self.outbound.take_new_apps() {
            // An index this shard subscribed for another app (a reload that failed on another
            // shard, then a different app added): its buckets carry the other app's names.
            let taken = |(app, app_id): &(AppIndex, String)| {
                self.options.apps.iter().any(|(known, known_id)| known == app && known_id != app_id)
            };
            if new.apps.iter().any(taken) {
                tracing::error!("an app index is subscribed for another app after a failed reload: restart the node");
                (new.done)(Err(Unavailable));
                continue;
            }
            let first = self.buckets.len();
            let mut name = String::new();
            for (app, app_id) in new.apps {
                // An app revived by a reload keeps its index, and its buckets stayed subscribed.
                if self.options.apps.iter().any(|(known, _)| *known == app) {
                    continue;
                }
                for number in bucket::of_shard(self.options.buckets, self.options.shards, self.options.shard) {
                    bucket::channel_name(&self.options.prefix, &app_id, number, &mut name);
                    let channel = Bytes::from(name.clone().into_bytes());
                    bucket::sequence_key(&self.options.prefix, &app_id, number, &mut name);
                    self.by_channel.insert(channel.clone(), self.buckets.len());
                    let id = BucketId { app, number };
                    self.buckets.push(Subscribed { id, channel, sequence_key: name.clone(), app_id: app_id.clone() });
                }
                self.options.apps.push((app, app_id));
            }
            let range = first..self.buckets.len();
            if range.is_empty() {
                (new.done)(Ok(()));
                continue;
            }
            // Queued before subscribing: if the link fails now, `run` tells every waiter.
            let unconfirmed = range.len();
            self.adding.push_back(Adding { range, unconfirmed, requested: false, hashes: None, done: new.done });
        }
        let fresh = self.adding.iter_mut().filter(|a| !a.requested);
        let ranges: Vec<std::ops::Range<usize>> = fresh.map(|a| (a.requested = true, a.range.clone()).1).collect();
        for range in ranges {
            for batch in self.buckets[range].chunks(SUBSCRIBE_BATCH) {
                let channels: Vec<&[u8]> = batch.iter().map(|b| &b.channel[..]).collect();
                subscriptions.ssubscribe(&channels).await?;
            }
        }
        Ok(())
    }

    /// A subscription confirmed for an `Adding`; its last one starts its barrier.
    async fn confirm_adding(
        &mut self,
        command: &mut Link,
        subscriptions: &mut Subscriptions,
        pongs: &mut VecDeque<PingFor>,
    ) -> Result<(), LinkError> {
        let adding = self.adding.iter_mut().find(|a| a.unconfirmed > 0).expect("the caller checked");
        adding.unconfirmed -= 1;
        if adding.unconfirmed > 0 {
            return Ok(());
        }
        for subscribed in &self.buckets[adding.range.clone()] {
            command.queue(&[b"HGETALL", subscribed.sequence_key.as_bytes()])?;
        }
        let mut hashes = Vec::with_capacity(adding.range.len());
        command.flush(&mut hashes).await?;
        adding.hashes = Some(hashes);
        subscriptions.ping().await?;
        pongs.push_back(PingFor::Barrier);
        Ok(())
    }

    /// The barrier pong of the oldest `Adding`: its buckets learn their baseline (this node
    /// had no clients of these apps, as at a first connect), and the reload may go on.
    fn finish_adding(&mut self) -> Result<(), LinkError> {
        let adding = self.adding.pop_front().expect("a barrier ping was sent for it");
        let hashes = adding.hashes.expect("its barrier was under way");
        for (index, hash) in adding.range.zip(hashes.iter()) {
            self.resync(index, Barrier::Baseline, hash)?;
        }
        (adding.done)(Ok(()));
        Ok(())
    }

    /// Reads pushes and pings both links until one fails.
    async fn serve(&mut self, command: &mut Link, subscriptions: &mut Subscriptions, pushes: &mut Pushes) -> LinkError {
        let timeout = self.options.link.command_timeout;
        let tick = (timeout / 4).max(Duration::from_millis(1));
        let mut ping_sent: Option<Instant> = None;
        let mut pongs: VecDeque<PingFor> = VecDeque::new();
        let outbound = self.outbound.clone();
        let commands = self.commands.clone();
        let mut batch = Vec::new();
        let mut requests = Vec::new();
        let mut next_tick = Instant::now() + tick;
        loop {
            // Kept across ticks and batches: dropping a read in flight would lose what it read.
            let next = pushes.next();
            let mut next = std::pin::pin!(next);
            let push = loop {
                // A deadline, not a fresh sleep per turn, so a steady stream of batches cannot
                // starve the heartbeat.
                let until_tick = next_tick.saturating_duration_since(Instant::now());
                monoio::select! {
                    push = &mut next => break push,
                    _ = monoio::time::sleep(until_tick) => {
                        next_tick = Instant::now() + tick;
                        let idle = ping_sent.is_none();
                        if let Err(error) = heartbeat(command, subscriptions, &mut ping_sent, timeout).await {
                            return error;
                        }
                        if idle && ping_sent.is_some() {
                            pongs.push_back(PingFor::Heartbeat);
                        }
                    }
                    _ = outbound.work() => {
                        if let Err(error) = self.send_batch(command, &mut batch).await {
                            return error;
                        }
                        if let Err(error) = self.start_adding(subscriptions).await {
                            return error;
                        }
                    }
                    _ = commands.work() => {
                        if let Err(error) = self.run_requests(command, &mut requests).await {
                            return error;
                        }
                    }
                }
            };
            let result = match push {
                Ok(Push::Pong) => match pongs.pop_front() {
                    Some(PingFor::Barrier) => self.finish_adding(),
                    Some(PingFor::Heartbeat) | None => {
                        ping_sent = None;
                        Ok(())
                    }
                },
                Ok(Push::Subscribed { .. }) if self.adding.iter().any(|a| a.unconfirmed > 0) => {
                    self.confirm_adding(command, subscriptions, &mut pongs).await
                }
                Ok(other) => self.on_push(other),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                return error;
            }
        }
    }

    /// The next push, within `timeout` (used while subscribing and at the barrier, where a
    /// timeout ends the session anyway, so the read's buffer is not needed afterwards).
    async fn next_push(&self, pushes: &mut Pushes, timeout: Duration) -> Result<Push, LinkError> {
        match monoio::time::timeout(timeout, pushes.next()).await {
            Ok(push) => push,
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    /// Handles a push other than the confirmations and pongs the caller waits for.
    fn on_push(&mut self, push: Push) -> Result<(), LinkError> {
        match push {
            Push::Message { channel, payload } => {
                let Some(&index) = self.by_channel.get(&channel) else {
                    return Err(LinkError::Protocol(format!("a message on {channel:?}, which is not subscribed")));
                };
                self.on_message(index, payload);
                Ok(())
            }
            // Redis dropped a subscription (a slot moved) or refused one: start again.
            other => Err(LinkError::Protocol(format!("unexpected push {other:?}"))),
        }
    }

    fn on_message(&mut self, index: usize, payload: Bytes) {
        let subscribed = &self.buckets[index];
        let id = subscribed.id;
        let (header, frame) = match message::decode(&payload) {
            Ok((header, _)) if header.app_id != subscribed.app_id => {
                let error = MessageError::Invalid { field: "app_id", reason: "not the bucket's app" };
                return self.events.gap(id, Gap::Malformed(error));
            }
            Ok(decoded) => decoded,
            Err(error) => return self.events.gap(id, Gap::Malformed(error)),
        };
        let verdict = self.detector.observe(id, header.sender, header.sequence);
        if verdict.is_gap() {
            self.events.gap(id, Gap::Message(verdict));
        }
        if verdict.deliver() {
            self.events.message(id, &header, frame);
        }
    }
}

impl<E: Events> Supervisor<E> {
    /// Publishes one batch of the outbound queue in one `MULTI`…`EXEC` round trip and tells
    /// each sender the outcome. An error ends the session (the senders in the batch get
    /// `Unavailable`; the numbers they took stay taken).
    async fn send_batch(&mut self, command: &mut Link, batch: &mut Vec<Outgoing>) -> Result<(), LinkError> {
        let budget = self.options.link.pipeline_bytes_max.saturating_sub(PIPELINE_OVERHEAD_BYTES);
        self.outbound.take_batch(budget, MESSAGE_OVERHEAD_BYTES, batch);
        // A message that alone overflows a pipeline is refused without taking a number (the
        // link would refuse it and end the session for everyone).
        let (fit, oversize): (Vec<_>, Vec<_>) =
            batch.drain(..).partition(|o| o.pipeline_bytes(MESSAGE_OVERHEAD_BYTES) <= budget);
        for outgoing in oversize {
            tracing::error!(bytes = outgoing.frame.len(), "an event frame is over cluster.pipeline_bytes_max");
            outgoing.complete(Err(Unavailable));
        }
        *batch = fit;
        if batch.is_empty() {
            return Ok(());
        }
        let result = self.write_batch(command, batch).await;
        let outcome = result.as_ref().map(|_| ()).map_err(|_| Unavailable);
        for outgoing in batch.drain(..) {
            outgoing.complete(outcome);
        }
        result
    }

    /// Runs one batch of the command queue in one pipeline and hands each request its
    /// replies. An error ends the session (the requests in the batch get `Unavailable`).
    async fn run_requests(&mut self, command: &mut Link, batch: &mut Vec<Request>) -> Result<(), LinkError> {
        let budget = self.options.link.pipeline_bytes_max.saturating_sub(PIPELINE_OVERHEAD_BYTES);
        self.commands.take_batch(budget, batch);
        // A request that alone overflows a pipeline is refused by itself: queueing it would end
        // the session (and every other shard's work on this link) for one asker's sake.
        let (fit, oversize): (Vec<Request>, Vec<Request>) = batch.drain(..).partition(|r| r.bytes() <= budget);
        *batch = fit;
        for request in oversize {
            tracing::error!(bytes = request.bytes(), "a Redis request is over cluster.pipeline_bytes_max; refused");
            request.complete(Err(Unavailable));
        }
        let mut result = Ok(());
        for request in batch.iter() {
            for args in &request.commands {
                let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
                if let Err(error) = command.queue(&args) {
                    result = Err(error);
                }
            }
        }
        let mut replies = Vec::with_capacity(command.queued());
        if result.is_ok() {
            result = command.flush(&mut replies).await;
        }
        if let Err(error) = result {
            for request in batch.drain(..) {
                request.complete(Err(Unavailable));
            }
            // The link failed, or (despite the check above) the batch overflowed the pipeline:
            // its queued commands were not sent, so it starts again clean.
            return Err(error);
        }
        let mut replies = replies.into_iter();
        for request in batch.drain(..) {
            let own: Vec<Reply> = replies.by_ref().take(request.commands.len()).collect();
            request.complete(Ok(own));
        }
        Ok(())
    }

    async fn write_batch(&mut self, command: &mut Link, batch: &[Outgoing]) -> Result<(), LinkError> {
        let buckets = self.options.buckets;
        let sender = Sender { incarnation: self.options.node.incarnation, shard: self.options.shard as u16 };
        let mut touched: Vec<(AppIndex, u16)> = Vec::new();
        let mut payload = Vec::new();
        let (mut key, mut cached) = (String::new(), 0);
        command.queue(&[b"MULTI"])?;
        for outgoing in batch {
            let Some(app_id) = self.options.apps.iter().find(|(index, _)| *index == outgoing.app).map(|(_, id)| id)
            else {
                return Err(LinkError::Protocol(format!("app index {} is not served", outgoing.app)));
            };
            let number = if outgoing.user_id.is_empty() {
                bucket::of_channel(&outgoing.channel, buckets)
            } else {
                bucket::of_user(&outgoing.user_id, buckets)
            };
            let prefix = &self.options.prefix;
            let sending = self.sending.entry((outgoing.app, number)).or_insert_with(|| {
                let mut name = String::new();
                bucket::channel_name(prefix, app_id, number, &mut name);
                let channel = Bytes::from(name.clone().into_bytes());
                bucket::sequence_key(prefix, app_id, number, &mut name);
                Sending { channel, sequence_key: name, last: 0 }
            });
            let header = Header {
                kind: outgoing.kind,
                sender,
                sequence: sending.last + 1,
                node_id: &self.options.node.node_id,
                app_id,
                channel: &outgoing.channel,
                user_id: &outgoing.user_id,
                exclude: outgoing.exclude,
            };
            payload.clear();
            // The shard validated channel and exclusion before queuing, so this is a bug.
            message::encode(&header, &outgoing.frame, &mut payload)
                .unwrap_or_else(|error| panic!("an outbound message breaks the format: {error}"));
            sending.last += 1;
            command.queue(&[b"SPUBLISH", &sending.channel, &payload])?;
            if let Some(ttl) = outgoing.cache_ttl {
                // The whole message, so a reader gets the frame and who numbered it.
                bucket::channel_key(prefix, app_id, &outgoing.channel, "cache", &mut key);
                let ttl_ms = ttl.as_millis().max(1).to_string();
                command.queue(&[b"SET", key.as_bytes(), &payload, b"PX", ttl_ms.as_bytes()])?;
                cached += 1;
            }
            if !touched.contains(&(outgoing.app, number)) {
                touched.push((outgoing.app, number));
            }
        }
        for key in &touched {
            let sending = &self.sending[key];
            let last = sending.last.to_string();
            command.queue(&[
                b"HSET",
                sending.sequence_key.as_bytes(),
                self.sequence_field.as_bytes(),
                last.as_bytes(),
            ])?;
        }
        command.queue(&[b"EXEC"])?;
        let mut replies = Vec::with_capacity(command.queued());
        command.flush(&mut replies).await?;
        // MULTI answers OK, each command QUEUED, EXEC the array of results; a command Redis
        // refused to queue makes EXEC an error (EXECABORT) and nothing was published.
        match replies.last() {
            Some(Reply::Array(results)) if results.len() == batch.len() + cached + touched.len() => Ok(()),
            other => Err(LinkError::Protocol(format!("EXEC answered {other:?}"))),
        }
    }
}

/// Pings both links: the subscriber's pong is awaited by `serve`, overdue after `timeout`; the
/// command link answers within `timeout` or fails.
async fn heartbeat(
    command: &mut Link,
    subscriptions: &mut Subscriptions,
    ping_sent: &mut Option<Instant>,
    timeout: Duration,
) -> Result<(), LinkError> {
    match ping_sent {
        Some(sent) if sent.elapsed() > timeout => Err(LinkError::Timeout(timeout)),
        Some(_) => Ok(()),
        None => {
            subscriptions.ping().await?;
            *ping_sent = Some(Instant::now());
            command.command(&[b"PING"]).await.map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: (u32, f64), expected: Duration) {
        assert_eq!(reconnect_delay(input.0, input.1), expected, "{input:?}");
    }

    /// Backoff: 100 ms doubling to 5 s, ±20 % by the random unit, never past the bounds.
    #[test]
    fn backoff_doubles_with_jitter() {
        check((0, 0.5), Duration::from_millis(100));
        check((1, 0.5), Duration::from_millis(200));
        check((5, 0.5), Duration::from_millis(3200));
        check((6, 0.5), Duration::from_secs(5));
        check((u32::MAX, 0.5), Duration::from_secs(5));
        check((0, 0.0), Duration::from_millis(80));
        check((0, 1.0), Duration::from_millis(120));
        check((6, 1.0), Duration::from_secs(6));
        check((6, 7.0), Duration::from_secs(6));
        check((0, -1.0), Duration::from_millis(80));
    }
}
