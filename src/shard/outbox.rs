//! The shard's outboxes: per target shard, the mesh messages that found its ring full, in
//! order. `Shard::mesh_send` goes straight to the ring only while the target's outbox is
//! empty, so the order per target is kept; the flusher task moves the rest as space appears.
//!
//! Owns the messages and the wakers of the tasks waiting on them; never blocks and never
//! drops a message (a full ring only delays it, counted in `mesh_full_total`).

use std::collections::VecDeque;
use std::task::{Poll, Waker};

use super::mesh::{Mesh, MeshMessage};

/// Messages waiting for ring space, per target shard.
pub struct Outbox {
    /// Per target shard, in send order.
    queues: Vec<VecDeque<MeshMessage>>,
    /// Invariant: the sum of the lengths of `queues` (kept so that "empty?" is O(1)).
    len: usize,
    /// The flusher task, parked while every queue is empty.
    flusher: Option<Waker>,
    /// Tasks waiting for every queue to empty (`Shard::publish`).
    waiters: Vec<Waker>,
}

impl Outbox {
    /// Empty outboxes toward `shards` shards.
    pub fn new(shards: usize) -> Outbox {
        Outbox { queues: (0..shards).map(|_| VecDeque::new()).collect(), len: 0, flusher: None, waiters: Vec::new() }
    }

    /// Messages waiting, toward all targets.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits ahead of a new message to `target`.
    pub fn is_clear(&self, target: usize) -> bool {
        self.queues[target].is_empty()
    }

    /// Queues a message behind those already waiting for `target` and wakes the flusher.
    pub fn push(&mut self, target: usize, message: MeshMessage) {
        self.queues[target].push_back(message);
        self.len += 1;
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
    }

    /// One pass: moves what fits into the rings, in order per target; returns how many moved.
    /// Wakes the waiters once nothing is left.
    pub fn flush(&mut self, mesh: &Mesh) -> usize {
        let mut moved = 0;
        for (target, queue) in self.queues.iter_mut().enumerate() {
            while let Some(message) = queue.pop_front() {
                match mesh.try_send(target, message) {
                    Ok(()) => moved += 1,
                    Err(back) => {
                        queue.push_front(back);
                        break;
                    }
                }
            }
        }
        self.len -= moved;
        debug_assert_eq!(self.len, self.queues.iter().map(VecDeque::len).sum::<usize>(), "len counts the queues");
        if self.len == 0 {
            for waker in self.waiters.drain(..) {
                waker.wake();
            }
        }
        moved
    }

    /// Ready once every queue is empty; else registers `waker` for that.
    pub fn poll_flushed(&mut self, waker: &Waker) -> Poll<()> {
        if self.len == 0 {
            Poll::Ready(())
        } else {
            self.waiters.push(waker.clone());
            Poll::Pending
        }
    }

    /// Ready once some message waits; else parks the flusher task's `waker`.
    pub fn poll_work(&mut self, waker: &Waker) -> Poll<()> {
        if self.len > 0 {
            Poll::Ready(())
        } else {
            self.flusher = Some(waker.clone());
            Poll::Pending
        }
    }
}
