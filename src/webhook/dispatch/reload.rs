//! Applying a reload to a shard's dispatcher: the new endpoints and `[webhooks]` settings
//! (`setup::Setup`) replace the running ones, matched by key, without losing or repeating a
//! queued delivery. A child of `dispatch` because it changes the dispatcher's own books (the
//! queues, the timers, the workers), which nothing outside it may touch.

use std::rc::Rc;
use std::sync::Arc;

use monoio_rustls::TlsConnector;

use super::Webhooks;
use crate::apps::Apps;
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::wal::{Kind, SequenceNumber};
use crate::webhook::endpoint::EndpointIndex;
use crate::webhook::queue::EndpointQueue;
use crate::webhook::setup::Setup;

impl Webhooks {
    /// Applies a reload (`shard::reload`): the apps' endpoints and the `[webhooks]` settings of
    /// `config` from now on, matched to the running ones by key (`"{app_id}/{endpoint_id}"`).
    /// An endpoint that stays keeps its queue, in order, and sends it to its new URL with its
    /// new secret; an added one gets its workers; a removed one's batch is flushed into a
    /// delivery and everything it had queued becomes a dead letter (as `disable` does), and its
    /// workers end. `tls` replaces the connector for `https://` endpoints when given.
    pub fn reload(self: &Rc<Self>, config: Arc<Config>, apps: &Apps, tls: Option<TlsConnector>) {
        let old = self.setup();
        let tls = tls.or_else(|| old.transport.tls.clone());
        let next = Setup::new(config, apps, tls, |key| self.wal.endpoint_id(key));
        let removed: Vec<EndpointIndex> = old
            .configured_endpoints()
            .map(|(index, _)| index)
            .filter(|&index| next.endpoint(index).is_none())
            .collect();
        // Under the old setup, which knows the endpoint's batch format.
        for &index in &removed {
            self.flush_batch(index);
        }
        {
            let mut state = self.state.borrow_mut();
            let endpoints = self.wal.index().endpoint_count();
            state.queues.resize_with(endpoints, EndpointQueue::default);
            for (index, endpoint) in next.configured_endpoints() {
                // A new URL (or a re-added endpoint) starts with a closed breaker, not disabled.
                if old.endpoint(index).is_none_or(|before| before.url != endpoint.url) {
                    state.queues[index.get()].health.enable();
                }
            }
        }
        let added: Vec<EndpointIndex> = next
            .configured_endpoints()
            .map(|(index, _)| index)
            .filter(|&index| old.endpoint(index).is_none())
            .collect();
        *self.setup_cell.borrow_mut() = Rc::new(next);
        for index in removed {
            self.retire(index);
        }
        for index in added {
            self.unpark(index);
        }
        self.spawn_workers();
        // Workers waiting for work look again: their endpoint may be gone or changed.
        for queue in &mut self.state.borrow_mut().queues {
            for waker in queue.idle_workers.drain(..) {
                waker.wake();
            }
        }
    }

    /// Queues what recovery kept aside for an endpoint that was not configured at start and
    /// now is: its pending deliveries get an attempt, its batch items are batched again, its
    /// dead letters are counted (and replayable).
    fn unpark(&self, endpoint: EndpointIndex) {
        let parked = std::mem::take(&mut self.state.borrow_mut().queues[endpoint.get()].parked);
        let (mut pending, mut dead, mut ready) = (0, 0, Vec::new());
        for seq in parked {
            let Some((kind, is_dead)) = self.wal.index().get(seq).map(|live| (live.kind, live.dead)) else { continue };
            match kind {
                Kind::Delivery if is_dead => dead += 1,
                Kind::Delivery => ready.push(seq),
                Kind::BatchItem => {
                    let mut state = self.state.borrow_mut();
                    state.queues[endpoint.get()].batch.push(seq, std::time::Instant::now());
                    if let Some(waker) = state.batch_task.take() {
                        waker.wake();
                    }
                }
            }
            pending += u64::from(!is_dead);
        }
        ShardMetrics::add(&self.metrics().webhook_pending, pending);
        ShardMetrics::add(&self.metrics().webhook_dead_letters, dead);
        for seq in ready {
            self.make_ready(seq);
        }
        if pending + dead > 0 {
            tracing::info!(shard = self.shard, endpoint = %self.key_of(endpoint), pending, dead,
                "recovered deliveries of an endpoint configured again by a reload");
        }
    }

    /// Dead-letters what a removed endpoint had queued: its ready deliveries and those waiting
    /// for a retry. Deliveries still waiting for their commit, and those in flight, follow
    /// when they reach `make_ready` or `settle`.
    fn retire(&self, endpoint: EndpointIndex) {
        let queued: Vec<SequenceNumber> = {
            let mut state = self.state.borrow_mut();
            let mut queued: Vec<SequenceNumber> = state.queues[endpoint.get()].ready.drain(..).collect();
            let index = self.wal.index();
            let of_endpoint = |seq: &SequenceNumber| index.get(*seq).is_some_and(|d| d.endpoint == endpoint.get());
            let timed: Vec<_> = state.timers.iter().filter(|(_, seq)| of_endpoint(seq)).copied().collect();
            for entry in timed {
                state.timers.remove(&entry);
                queued.push(entry.1);
            }
            queued
        };
        let count = queued.len();
        for seq in queued {
            self.dead_letter(seq);
        }
        if self.shard == 0 || count > 0 {
            tracing::info!(shard = self.shard, endpoint = %self.key_of(endpoint), dead_letters = count,
                "webhook endpoint removed by a reload");
        }
    }
}
