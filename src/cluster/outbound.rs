//! The outbound queue: bucket messages a shard wants published through Redis, waiting for
//! the shard's link supervisor, which owns the command link (docs/cluster.md, "Fan-out" and
//! "When Redis is unreachable").
//!
//! API publishes and client events on a shard `send` here and wait for their `Sent`; the
//! supervisor takes them in batches (`take_batch`), numbers and encodes them, writes one
//! `MULTI`/`SPUBLISH…`/`HSET…`/`EXEC` pipeline and completes each `Sent` with the outcome.
//! Single-threaded (one shard's runtime): a `RefCell` borrowed only inside these methods.
//!
//! Bound: every sender waits for its own message (an HTTP request for its answer, a WebSocket
//! reader for its client event), so the queue holds at most one entry per open socket and
//! event channel, which `connections_per_shard_max` and the event limits already bound.
//!
//! Invariant: while the link is down nothing is accepted (`send` answers `Unavailable`), and
//! when it goes down every queued message is completed with `Unavailable`, so no sender waits
//! on a link that is gone.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use crate::apps::AppIndex;
use crate::pusher::message::SocketId;

use super::message::Kind;

/// Why a message was not published cluster-wide: the link is down, or failed with it in flight
/// (then Redis may still have published it: a retry can duplicate, never lose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cluster unavailable, retry")]
pub struct Unavailable;

/// A message waiting for the supervisor.
#[derive(Debug)]
pub struct Outgoing {
    /// `Publication`, `ClientEvent` (to a channel) or `TerminateUser` (to a user).
    pub kind: Kind,
    /// The app, by this node's index.
    pub app: AppIndex,
    /// The channel; empty for a kind addressed to a user.
    pub channel: Box<str>,
    /// The user; empty for a kind addressed to a channel. Picks the bucket when set.
    pub user_id: Box<str>,
    /// A connection that must not receive it.
    pub exclude: Option<SocketId>,
    /// The WebSocket frame, encoded once by this node.
    pub frame: Bytes,
    /// For a cache channel's publication: how long Redis keeps it as the channel's last event
    /// (written in the same transaction as its `SPUBLISH`).
    pub cache_ttl: Option<Duration>,
    done: Rc<Done>,
}

impl Outgoing {
    /// The bytes it adds to a pipeline, with `overhead` per command that carries it: its
    /// `SPUBLISH`, and for a cache channel also its `SET`.
    pub fn pipeline_bytes(&self, overhead: usize) -> usize {
        let copies = if self.cache_ttl.is_some() { 2 } else { 1 };
        copies * (self.frame.len() + overhead)
    }

    /// Tells the sender the outcome.
    pub fn complete(self, result: Result<(), Unavailable>) {
        self.done.result.set(Some(result));
        if let Some(waker) = self.done.waker.take() {
            waker.wake();
        }
    }
}

#[derive(Default)]
struct Done {
    result: Cell<Option<Result<(), Unavailable>>>,
    waker: Cell<Option<Waker>>,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").field("result", &self.result.get()).finish_non_exhaustive()
    }
}

/// A sender's handle on its queued message.
#[derive(Debug)]
#[must_use = "a message is only known to be published when its Sent resolves to Ok"]
pub struct Sent(Rc<Done>);

impl Sent {
    /// Resolves once Redis executed the message's transaction (`Ok`) or the link failed.
    pub async fn outcome(self) -> Result<(), Unavailable> {
        poll_fn(|cx| match self.0.result.get() {
            Some(result) => Poll::Ready(result),
            None => {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Apps a reload adds, whose buckets the supervisor subscribes (and baselines) before the
/// shard serves them; `done` learns when, or that the link failed first.
pub struct NewApps {
    /// Index on this node and configured id of each app.
    pub apps: Vec<(AppIndex, String)>,
    /// Called once: `Ok` when every bucket is subscribed and its barrier passed.
    pub done: Box<dyn FnOnce(Result<(), Unavailable>)>,
}

impl std::fmt::Debug for NewApps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApps").field("apps", &self.apps).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
    /// Apps added by reloads, waiting for their subscriptions (at most one entry per reload).
    new_apps: Vec<NewApps>,
    /// The supervisor, waiting for work.
    waker: Option<Waker>,
    up: bool,
}

/// One shard's queue toward its supervisor.
#[derive(Debug, Default)]
pub struct Outbound {
    state: RefCell<State>,
}

impl Outbound {
    /// Queues a message; `Unavailable` at once while the link is down.
    pub fn send(
        &self,
        kind: Kind,
        app: AppIndex,
        channel: &str,
        frame: Bytes,
        exclude: Option<SocketId>,
    ) -> Result<Sent, Unavailable> {
        self.push(Outgoing {
            kind,
            app,
            channel: channel.into(),
            user_id: "".into(),
            exclude,
            frame,
            cache_ttl: None,
            done: Rc::default(),
        })
    }

    /// Queues a cache channel's publication, kept in Redis as the channel's last event for
    /// `ttl`; `Unavailable` at once while the link is down.
    pub fn send_cached(
        &self,
        app: AppIndex,
        channel: &str,
        frame: Bytes,
        exclude: Option<SocketId>,
        ttl: Duration,
    ) -> Result<Sent, Unavailable> {
        let (kind, channel, user_id, cache_ttl) = (Kind::Publication, channel.into(), "".into(), Some(ttl));
        self.push(Outgoing { kind, app, channel, user_id, exclude, frame, cache_ttl, done: Rc::default() })
    }

    /// Queues a message addressed to a user (it goes to the bucket of the user's
    /// `#server-to-user-` channel); `Unavailable` at once while the link is down.
    pub fn send_to_user(&self, kind: Kind, app: AppIndex, user_id: &str, frame: Bytes) -> Result<Sent, Unavailable> {
        self.push(Outgoing {
            kind,
            app,
            channel: "".into(),
            user_id: user_id.into(),
            exclude: None,
            frame,
            cache_ttl: None,
            done: Rc::default(),
        })
    }

    fn push(&self, outgoing: Outgoing) -> Result<Sent, Unavailable> {
        let mut state = self.state.borrow_mut();
        if !state.up {
            return Err(Unavailable);
        }
        let done = outgoing.done.clone();
        state.queue.push_back(outgoing);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        Ok(Sent(done))
    }

    /// Asks the supervisor to subscribe the buckets of apps a reload adds; `done` is told at
    /// once (`Unavailable`) while the link is down.
    pub fn add_apps(&self, new: NewApps) {
        let mut state = self.state.borrow_mut();
        if !state.up {
            drop(state);
            return (new.done)(Err(Unavailable));
        }
        state.new_apps.push(new);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// Supervisor: takes every waiting `add_apps`.
    pub fn take_new_apps(&self) -> Vec<NewApps> {
        std::mem::take(&mut self.state.borrow_mut().new_apps)
    }

    /// Whether messages are accepted now (the shard's link is up).
    pub fn is_up(&self) -> bool {
        self.state.borrow().up
    }

    /// Supervisor: the link came up, or went down (then every queued message fails).
    pub fn set_up(&self, up: bool) {
        let (failed, unsubscribed) = {
            let mut state = self.state.borrow_mut();
            state.up = up;
            if up {
                return;
            }
            (std::mem::take(&mut state.queue), std::mem::take(&mut state.new_apps))
        };
        for new in unsubscribed {
            (new.done)(Err(Unavailable));
        }
        for outgoing in failed {
            outgoing.complete(Err(Unavailable));
        }
    }

    /// Supervisor: resolves when a message or an app to add waits.
    pub async fn work(&self) {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.queue.is_empty() && state.new_apps.is_empty() {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Supervisor: takes queued messages in order while their `pipeline_bytes(overhead)` fit
    /// in `bytes_max` (always at least one, if any waits).
    pub fn take_batch(&self, bytes_max: usize, overhead: usize, batch: &mut Vec<Outgoing>) {
        take_fitting(&mut self.state.borrow_mut().queue, bytes_max, |o| o.pipeline_bytes(overhead), batch);
    }
}

/// Moves items from the front of `queue` to `batch` while their `bytes` add up to at most
/// `bytes_max` — always at least one, if any waits (one too large goes alone, and its sender
/// refuses it). The supervisor's batching rule for messages and for command requests.
pub(super) fn take_fitting<T>(
    queue: &mut VecDeque<T>,
    bytes_max: usize,
    bytes: impl Fn(&T) -> usize,
    batch: &mut Vec<T>,
) {
    let mut total = 0;
    while let Some(next) = queue.front() {
        total += bytes(next);
        if total > bytes_max && !batch.is_empty() {
            break;
        }
        batch.push(queue.pop_front().expect("front exists"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(future: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap().block_on(future)
    }

    fn send(outbound: &Outbound, frame: &'static [u8]) -> Result<Sent, Unavailable> {
        outbound.send(Kind::Publication, 0, "c", Bytes::from_static(frame), None)
    }

    /// Down refuses at once; up queues in order, batches by size (never empty), and the
    /// supervisor's outcome reaches the sender.
    #[test]
    fn queue_batches_and_completes() {
        run(async {
            let outbound = Outbound::default();
            assert_eq!(send(&outbound, b"x").err(), Some(Unavailable));
            outbound.set_up(true);
            let sent: Vec<Sent> = [&b"aaaa"[..], b"bbbb", b"cccc"]
                .into_iter()
                .map(|f| outbound.send(Kind::Publication, 0, "c", Bytes::from_static(f), None).unwrap())
                .collect();
            outbound.work().await;
            let mut batch = Vec::new();
            outbound.take_batch(12, 2, &mut batch);
            assert_eq!(batch.iter().map(|o| &o.frame[..]).collect::<Vec<_>>(), [&b"aaaa"[..], b"bbbb"]);
            let mut rest = Vec::new();
            outbound.take_batch(1, 0, &mut rest);
            assert_eq!(rest.len(), 1, "one message over the budget still goes alone");
            for outgoing in batch {
                outgoing.complete(Ok(()));
            }
            rest.pop().unwrap().complete(Err(Unavailable));
            let outcomes: Vec<_> = futures_outcomes(sent).await;
            assert_eq!(outcomes, [Ok(()), Ok(()), Err(Unavailable)]);
        });
    }

    /// A link that goes down fails every queued message, so no sender waits forever.
    #[test]
    fn down_fails_the_queue() {
        run(async {
            let outbound = Outbound::default();
            outbound.set_up(true);
            let sent = send(&outbound, b"x").unwrap();
            outbound.set_up(false);
            assert_eq!(sent.outcome().await, Err(Unavailable));
            assert!(!outbound.is_up());
        });
    }

    async fn futures_outcomes(sent: Vec<Sent>) -> Vec<Result<(), Unavailable>> {
        let mut outcomes = Vec::new();
        for s in sent {
            outcomes.push(s.outcome().await);
        }
        outcomes
    }
}
