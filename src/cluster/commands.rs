//! The command queue: Redis commands a shard wants run on its command link and whose replies
//! it needs (presence and occupancy scripts, the lease, channel queries), waiting for the
//! shard's link supervisor (docs/cluster.md, "Presence, occupancy, users: keys and scripts").
//!
//! A request is a group of commands sent together in one pipeline; its sender awaits the
//! group's replies. Requests run in the order they were queued, so a home shard that queues a
//! join's script before a leave's gets them executed by Redis in that order, without waiting.
//! Single-threaded (one shard's runtime), like `outbound`.
//!
//! Bound: each request has one waiting sender (a home-shard transition, an HTTP request, the
//! lease task), so the queue is bounded by what bounds those: connections and channels per
//! shard, and the API's sockets.
//!
//! Invariant: while the link is down nothing is accepted, and when it goes down every queued
//! request fails with `Unavailable`, so no sender waits on a link that is gone.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use super::link::Reply;
use super::outbound::Unavailable;

/// One command: its arguments, the name first.
pub type Command = Vec<Vec<u8>>;

/// What a request's outcome is handed to when it must be handled before the supervisor reads
/// anything more from Redis (`Commands::request_then`).
pub type OnReplies = Box<dyn FnOnce(Result<Vec<Reply>, Unavailable>)>;

/// A group of commands waiting for the supervisor.
#[derive(Debug)]
pub struct Request {
    /// The commands, sent together and in order.
    pub commands: Vec<Command>,
    done: Rc<Done>,
}

impl Request {
    /// Tells the sender the replies (one per command, in order) or that the link failed.
    pub fn complete(self, result: Result<Vec<Reply>, Unavailable>) {
        if let Some(on_replies) = self.done.on_replies.take() {
            return on_replies(result);
        }
        *self.done.result.borrow_mut() = Some(result);
        if let Some(waker) = self.done.waker.take() {
            waker.wake();
        }
    }

    /// Bytes the group adds to a pipeline, at least (arguments plus RESP framing: at most 16
    /// bytes per argument and per command for any length a pipeline can hold).
    pub fn bytes(&self) -> usize {
        self.commands.iter().flatten().map(|arg| arg.len() + 16).sum::<usize>() + 16 * self.commands.len()
    }
}

#[derive(Default)]
struct Done {
    result: RefCell<Option<Result<Vec<Reply>, Unavailable>>>,
    waker: Cell<Option<Waker>>,
    /// Called instead of storing the result, for `request_then`.
    on_replies: Cell<Option<OnReplies>>,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").finish_non_exhaustive()
    }
}

/// A sender's handle on its queued request.
#[derive(Debug)]
#[must_use = "the replies arrive only through Pending::replies"]
pub struct Pending(Rc<Done>);

impl Pending {
    /// The replies, one per command, once Redis answered; `Unavailable` if the link failed.
    pub async fn replies(self) -> Result<Vec<Reply>, Unavailable> {
        poll_fn(|cx| match self.0.result.borrow_mut().take() {
            Some(result) => Poll::Ready(result),
            None => {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Request>,
    waker: Option<Waker>,
    up: bool,
}

/// One shard's command queue toward its supervisor.
#[derive(Debug, Default)]
pub struct Commands {
    state: RefCell<State>,
}

impl Commands {
    /// Queues a group of commands whose outcome is handed to `on_replies` by the supervisor
    /// itself, right after Redis answered and before it reads any further push or reply: what
    /// `on_replies` sees of this shard's bucket messages is exactly what Redis had published
    /// before it ran these commands, or less (never more). While the link is down,
    /// `on_replies` gets `Unavailable` at once.
    pub fn request_then(&self, commands: Vec<Command>, on_replies: OnReplies) {
        match self.request(commands) {
            Ok(Pending(done)) => done.on_replies.set(Some(on_replies)),
            Err(unavailable) => on_replies(Err(unavailable)),
        }
    }

    /// Queues a group of commands; `Unavailable` at once while the link is down.
    pub fn request(&self, commands: Vec<Command>) -> Result<Pending, Unavailable> {
        assert!(!commands.is_empty() && commands.iter().all(|c| !c.is_empty()), "a request has named commands");
        let mut state = self.state.borrow_mut();
        if !state.up {
            return Err(Unavailable);
        }
        let done = Rc::new(Done::default());
        state.queue.push_back(Request { commands, done: done.clone() });
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        Ok(Pending(done))
    }

    /// Whether requests are accepted now.
    pub fn is_up(&self) -> bool {
        self.state.borrow().up
    }

    /// Supervisor: the link came up, or went down (then every queued request fails).
    pub fn set_up(&self, up: bool) {
        let failed = {
            let mut state = self.state.borrow_mut();
            state.up = up;
            if up {
                return;
            }
            std::mem::take(&mut state.queue)
        };
        for request in failed {
            request.complete(Err(Unavailable));
        }
    }

    /// Supervisor: resolves when a request waits.
    pub async fn work(&self) {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.queue.is_empty() {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Supervisor: takes queued requests in order while they fit in `bytes_max` (always at
    /// least one, if any waits).
    pub fn take_batch(&self, bytes_max: usize, batch: &mut Vec<Request>) {
        super::outbound::take_fitting(&mut self.state.borrow_mut().queue, bytes_max, Request::bytes, batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(future: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap().block_on(future)
    }

    fn ping() -> Vec<Command> {
        vec![vec![b"PING".to_vec()]]
    }

    /// Down refuses at once; up queues in order, batches by size (never empty), the replies
    /// reach their sender, and a link that goes down fails what is still queued.
    #[test]
    fn queue_batches_completes_and_fails() {
        run(async {
            let commands = Commands::default();
            assert_eq!(commands.request(ping()).err(), Some(Unavailable));
            commands.set_up(true);
            let first = commands.request(ping()).unwrap();
            let second = commands.request(ping()).unwrap();
            let third = commands.request(ping()).unwrap();
            commands.work().await;
            let mut batch = Vec::new();
            commands.take_batch(72, &mut batch);
            assert_eq!(batch.len(), 2, "two 36-byte groups (PING: 4 + 16 + 16) fit in 72 bytes");
            let pong = Reply::SimpleString(bytes::Bytes::from_static(b"PONG"));
            for request in batch {
                request.complete(Ok(vec![pong.clone()]));
            }
            assert_eq!(first.replies().await, Ok(vec![pong.clone()]));
            assert_eq!(second.replies().await, Ok(vec![pong]));
            commands.set_up(false);
            assert_eq!(third.replies().await, Err(Unavailable));
            assert!(!commands.is_up());
            // request_then: the outcome goes to the callback when the supervisor completes it.
            commands.set_up(true);
            let outcome = Rc::new(RefCell::new(None));
            let seen = outcome.clone();
            commands.request_then(ping(), Box::new(move |result| *seen.borrow_mut() = Some(result)));
            let mut batch = Vec::new();
            commands.take_batch(1024, &mut batch);
            assert!(outcome.borrow().is_none());
            batch.pop().unwrap().complete(Err(Unavailable));
            assert_eq!(outcome.borrow_mut().take(), Some(Err(Unavailable)));
        });
    }
}
