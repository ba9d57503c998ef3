//! The admin API's operations on a shard's dispatcher (`webhook::admin` has the typed requests
//! and answers and how shards' answers merge): health, dead letters, attempts, replay, delete
//! and enable, for the deliveries this shard created and the endpoints configured now. A child
//! of `dispatch` because replay and delete change the dispatcher's own books.

use super::Webhooks;
use crate::apps::AppIndex;
use crate::wal::SequenceNumber;
use crate::webhook::admin::{AdminAnswer, AdminRequest, AttemptReport, DeadLetter};
use crate::webhook::endpoint::EndpointIndex;

impl Webhooks {
    fn endpoint_index(&self, app: AppIndex, id: &str) -> Option<EndpointIndex> {
        let setup = self.setup_cell.borrow();
        setup.endpoints_of(app).iter().copied().find(|&i| setup.configured(i).id == id)
    }

    /// This shard's answer to an admin request, for its own deliveries (of the endpoints
    /// configured now).
    pub fn admin(&self, app: AppIndex, request: &AdminRequest) -> AdminAnswer {
        let setup = self.setup();
        let of_app = |endpoint: usize| setup.endpoint(EndpointIndex::new(endpoint)).filter(|e| e.app == app);
        let owned_by_app = |seq: SequenceNumber| {
            let index = self.wal.index();
            index.get(seq).and_then(|d| of_app(d.endpoint)).is_some()
        };
        match request {
            AdminRequest::Health => {
                let (state, index) = (self.state.borrow(), self.wal.index());
                AdminAnswer::Health(
                    setup.endpoints_of(app).iter().map(|&i| state.health(i, setup.configured(i), &index)).collect(),
                )
            }
            AdminRequest::DeadLetters { endpoint } => {
                let Some(index) = self.endpoint_index(app, endpoint) else { return AdminAnswer::empty(request) };
                let live = self.wal.index();
                let letters = live.dead_of(index.get()).into_iter().map(|(seq, d)| DeadLetter {
                    webhook_id: self.webhook_id(seq),
                    created_ms: d.created_ms,
                    body: String::from_utf8_lossy(&d.body).into_owned(),
                });
                AdminAnswer::DeadLetters(letters.collect())
            }
            AdminRequest::Attempts { webhook_id } => {
                let Some(seq) = self.parse_webhook_id(webhook_id) else { return AdminAnswer::empty(request) };
                let state = self.state.borrow();
                let attempts = state.attempts.iter().filter(|a| a.seq == seq);
                let attempts = attempts.filter_map(|a| of_app(a.endpoint.get()).map(|endpoint| (a, endpoint)));
                AdminAnswer::Attempts(
                    attempts
                        .map(|(a, endpoint)| AttemptReport {
                            webhook_id: webhook_id.clone(),
                            endpoint: endpoint.id.clone(),
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
                let seqs = self.wal.index().dead_between(index.get(), *from_ms, *to_ms);
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
                let seqs = self.wal.index().dead_between(index.get(), *from_ms, *to_ms);
                AdminAnswer::Deleted(
                    seqs.into_iter().filter(|&s| self.discard(s)).map(|s| self.webhook_id(s)).collect(),
                )
            }
            AdminRequest::Enable { endpoint } => {
                let Some(index) = self.endpoint_index(app, endpoint) else { return AdminAnswer::empty(request) };
                let mut state = self.state.borrow_mut();
                let queue = &mut state.queues[index.get()];
                queue.health.enable();
                for waker in queue.idle_workers.drain(..) {
                    waker.wake();
                }
                AdminAnswer::Enabled
            }
        }
    }
}
