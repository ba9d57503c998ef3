//! The webhook write-ahead log of one shard (`docs/wal.md` is the format and its reasons).
//!
//! Owns the segments on its `Storage`, the shard's one index of live deliveries and batch
//! items (`index::LiveIndex`: pending or dead, with their bodies and byte budgets) and the
//! group commit. Appends are synchronous and only buffer; `commit` waits until a position is
//! durable (or written, in `batch` mode); one flusher task (`run`) writes and fsyncs batches.
//! Only this module calls `fsync`.
//!
//! The log owns the index because every change to it is a record: the index is what recovery
//! rebuilds, and compaction must know which segment holds each live record. The dispatcher
//! keeps only what the log does not (attempt counts, ready queues, timers) and reads the index
//! through `index()`. In `memory` durability (`Wal::memory`) the same index is kept and no
//! record is written, so the dispatcher has one code path.
//!
//! Invariant: a record is acknowledged (its `commit` returns) only after it is durable in a
//! segment whose creation is durable. Segments are removed oldest first, and only when no
//! live delivery's newest copy or newest state record is in it (those are copied forward
//! first, with an explicit state record): an `Ack` in a removed segment can then only refer
//! to a delivery whose records were removed before it.

pub mod index;
pub mod record;
pub mod storage;

use std::cell::{Ref, RefCell};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

pub use index::{Kind, Live, LiveIndex};
use record::HEADER_BYTES;
pub use record::{Delivery, Outcome, Record, SegmentHeader, SequenceNumber};
pub use storage::{FileStorage, SimStorage, Storage};

/// When `commit` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the batch is fsynced.
    Fsync,
    /// After the batch is written; fsync on a timer of this period.
    Batch(Duration),
    /// At once: nothing is written (`Wal::memory`), only the index is kept.
    Memory,
}

/// Why the WAL cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// Fsynced data is damaged: the server must not start on it.
    #[error("WAL segment {segment:020}.wal is corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// The segment.
        segment: u64,
        /// Where.
        offset: u64,
        /// What was found.
        reason: String,
    },
    /// A delivery's record would pass the format's bounds (`record::RECORD_BYTES_MAX`, or an
    /// endpoint key over 65 535 bytes); config validation keeps batches below them, so this
    /// only refuses the one delivery.
    #[error("a webhook delivery of {bytes} bytes is over the WAL's record limit of {max} bytes")]
    RecordTooLarge {
        /// Bytes of the record's kind and payload.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The storage failed; nothing more is accepted until a restart (docs/wal.md, "When the
    /// storage fails").
    #[error("WAL storage failed: {reason}")]
    Failed {
        /// What failed.
        reason: String,
        /// The OS error number, when the failure was a system call's.
        os_error: Option<i32>,
    },
}

impl WalError {
    /// A failed storage call.
    fn storage(error: std::io::Error) -> WalError {
        WalError::Failed { reason: error.to_string(), os_error: error.raw_os_error() }
    }
}

/// A position in the log's byte stream (since this process opened it).
pub type Lsn = u64;

#[derive(Debug, Default, Clone, Copy)]
struct SegmentInfo {
    /// Bytes in the segment, header included.
    bytes: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WalStats {
    /// fdatasync calls on segments.
    pub fsyncs: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Batches written.
    pub batches: u64,
    /// Segments on disk.
    pub segments: u64,
    /// Segments removed by compaction.
    pub segments_removed: u64,
}

struct WalState {
    log_id: u64,
    next_seq: SequenceNumber,
    head: u64,
    head_len: u64,
    /// Bytes of the head segment known fsynced (what the next batch's mark claims).
    head_synced: u64,
    /// Whether records are written (`false` in `memory` durability: only `live` is kept).
    records: bool,
    buffer: Vec<u8>,
    /// Records of live deliveries in `buffer`: (seq, true for a `Delivery`, false for a state record).
    buffered: Vec<(SequenceNumber, bool)>,
    /// End of the records buffered so far. Invariant: appended ≥ written ≥ durable.
    appended: Lsn,
    /// End of what the storage has been handed (written, maybe not synced).
    written: Lsn,
    /// End of what is fsynced in a segment whose creation is fsynced.
    durable: Lsn,
    waiters: Vec<Waker>,
    flusher: Option<Waker>,
    failed: Option<WalError>,
    segments: BTreeMap<u64, SegmentInfo>,
    /// The live deliveries and batch items. Invariant: each changes only together with the
    /// record that says so (appended to `buffer` when `records`).
    live: LiveIndex,
    /// The oldest segment, to be removed once `durable` reaches the position (its live
    /// records were copied forward before it).
    removable: Option<(u64, Lsn)>,
    /// `Batch` durability: when the last fsync ran.
    last_sync: std::time::Instant,
    stats: WalStats,
}

/// One shard's write-ahead log.
pub struct Wal<S: Storage> {
    /// `None` in `memory` durability.
    storage: Option<S>,
    shard: u32,
    segment_bytes_max: u64,
    durability: Durability,
    state: RefCell<WalState>,
}

impl<S: Storage> Wal<S> {
    /// A log that writes nothing (`memory` durability): the index with a fresh random
    /// `log_id`; `commit` returns at once and `run` is never needed.
    pub fn memory(shard: u32, endpoint_keys: &[&str]) -> Wal<S> {
        let mut state = WalState::new(endpoint_keys);
        state.records = false;
        state.log_id = fastrand::u64(..);
        Wal {
            storage: None,
            shard,
            segment_bytes_max: u64::MAX,
            durability: Durability::Memory,
            state: RefCell::new(state),
        }
    }

    /// Opens the log on `storage` (creating it when empty), recovering every live delivery and
    /// batch item into the index (endpoint ids `0..endpoint_keys.len()` are `endpoint_keys`);
    /// returns the log and the recovered sequence numbers in order.
    pub async fn open(
        storage: S,
        shard: u32,
        segment_bytes_max: u64,
        durability: Durability,
        endpoint_keys: &[&str],
    ) -> Result<(Wal<S>, Vec<SequenceNumber>), WalError> {
        let failed = WalError::storage;
        let segments = storage.list().await.map_err(failed)?;
        let mut state = WalState::new(endpoint_keys);
        let mut log_id = None;
        for (i, &segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let bytes = storage.read(segment).await.map_err(failed)?;
            let Some(end) = state.recover_segment(segment, &bytes, last, shard, &mut log_id)? else {
                // Being created when the process died: nothing in it was acknowledged.
                tracing::warn!(shard, segment, "removing a WAL segment whose creation did not finish");
                storage.remove(segment).await.map_err(failed)?;
                storage.sync_dir().await.map_err(failed)?;
                continue;
            };
            if end < bytes.len() {
                // A torn tail: never acknowledged (recover_segment checked that no later mark
                // proves it durable). Cut, loudly.
                let cut = bytes.len() - end;
                tracing::warn!(shard, segment, offset = end, bytes = cut, "cutting the torn tail of the WAL");
                storage.truncate(segment, end as u64).await.map_err(failed)?;
            }
            if last {
                // The previous process may have written bytes it never synced; sync them before
                // the next batch's mark claims them durable.
                storage.sync(segment).await.map_err(failed)?;
            }
            state.segments.entry(segment).or_default().bytes = end as u64;
            state.head = segment;
            state.head_len = end as u64;
            state.head_synced = end as u64;
        }
        let wal = Wal { storage: Some(storage), shard, segment_bytes_max, durability, state: RefCell::new(state) };
        match log_id {
            Some(id) if !wal.state.borrow().segments.is_empty() => wal.state.borrow_mut().log_id = id,
            _ => {
                wal.state.borrow_mut().log_id = fastrand::u64(..);
                wal.create_segment(0).await?;
            }
        }
        let recovered = wal.state.borrow().live.seqs();
        Ok((wal, recovered))
    }

    /// Why the log failed, once it has (it stays failed).
    pub fn failure(&self) -> Option<WalError> {
        self.state.borrow().failed.clone()
    }

    /// The random id of this log (part of every webhook id).
    pub fn log_id(&self) -> u64 {
        self.state.borrow().log_id
    }

    /// Counters.
    pub fn stats(&self) -> WalStats {
        let state = self.state.borrow();
        WalStats { segments: state.segments.len() as u64, ..state.stats }
    }

    /// Whether this log writes records (not `memory` durability).
    pub fn writes(&self) -> bool {
        self.storage.is_some()
    }

    /// The live deliveries and batch items. Do not hold it across an `append_*` call.
    pub fn index(&self) -> Ref<'_, LiveIndex> {
        Ref::map(self.state.borrow(), |state| &state.live)
    }

    /// The id of an endpoint key (interned when new).
    pub fn endpoint_id(&self, key: &str) -> usize {
        self.state.borrow_mut().live.endpoint_id(key)
    }

    /// Buffers a new delivery or batch item for endpoint id `endpoint`; returns its sequence
    /// number and log position.
    pub fn append(
        &self,
        kind: Kind,
        endpoint: usize,
        created_ms: u64,
        body: Bytes,
    ) -> Result<(SequenceNumber, Lsn), WalError> {
        let mut state = self.state.borrow_mut();
        let key_len = state.live.key(endpoint).len();
        let bytes = record::DELIVERY_OVERHEAD_BYTES + key_len + body.len();
        if bytes > record::RECORD_BYTES_MAX || key_len > usize::from(u16::MAX) {
            return Err(WalError::RecordTooLarge { bytes, max: record::RECORD_BYTES_MAX });
        }
        state.check()?;
        let seq = state.next_seq;
        state.next_seq = seq.next();
        let live = Live { kind, endpoint, created_ms, body, dead: false, copy_at: None, state_at: None, bytes: 0 };
        let lsn = state.push_live(seq, live, None);
        self.wake_flusher(&mut state);
        Ok((seq, lsn))
    }

    /// Buffers the end of a delivery or batch item: `Delivered` and `Discarded` forget it,
    /// `Dead` keeps a delivery as a dead letter. The index follows also when the log has
    /// failed (the error is returned), so the shard's books stay right until the restart.
    pub fn append_ack(&self, seq: SequenceNumber, outcome: Outcome) -> Result<Lsn, WalError> {
        let mut state = self.state.borrow_mut();
        let checked = state.check();
        let lsn = if checked.is_ok() { state.push(&Record::Ack { seq, outcome }) } else { state.appended };
        state.apply_ack(seq, outcome);
        self.wake_flusher(&mut state);
        checked.map(|()| lsn)
    }

    /// Buffers a replay of a dead letter, which is pending again; `None` when the log holds no
    /// such dead letter.
    pub fn append_replay(&self, seq: SequenceNumber) -> Result<Option<Lsn>, WalError> {
        let mut state = self.state.borrow_mut();
        state.check()?;
        if !state.live.set_dead(seq, false) {
            return Ok(None);
        }
        let lsn = state.push(&Record::Replay { seq });
        state.buffered.push((seq, false));
        self.wake_flusher(&mut state);
        Ok(Some(lsn))
    }

    /// Waits until `lsn` is durable (`Fsync`) or written (`Batch`); at once in `Memory`.
    pub async fn commit(&self, lsn: Lsn) -> Result<(), WalError> {
        if self.durability == Durability::Memory {
            return Ok(());
        }
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            let reached = match self.durability {
                Durability::Fsync | Durability::Memory => state.durable,
                Durability::Batch(_) => state.written,
            };
            if reached >= lsn {
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = &state.failed {
                return Poll::Ready(Err(error.clone()));
            }
            state.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The flusher: writes (and syncs) what is buffered, batch after batch, until the storage
    /// fails. Run it as one task per log.
    pub async fn run(&self) {
        self.run_with(|_| {}).await
    }

    /// `run`, calling `on_progress` with the durable position after each batch. That is the
    /// position to hand deliveries to senders at: a webhook id a receiver has seen is then
    /// always in the durable log, so recovery never hands its seq out again (in `batch` mode
    /// `commit` returns earlier, at the written position).
    pub async fn run_with(&self, on_progress: impl Fn(Lsn)) {
        loop {
            self.work().await;
            if self.state.borrow().failed.is_some() {
                return;
            }
            if let Err(error) = self.flush_once().await {
                let mut state = self.state.borrow_mut();
                state.failed = Some(error.clone());
                for waker in state.waiters.drain(..) {
                    waker.wake();
                }
                tracing::error!(shard = self.shard, %error, "webhook WAL failed; new deliveries are refused");
                return;
            }
            let durable = self.state.borrow().durable;
            on_progress(durable);
        }
    }

    /// Waits for something to flush: buffered records (or a failure), or in `batch` mode
    /// written bytes whose fsync is due. An append ends the wait for a due fsync at once, so
    /// a sparse publish is written (and its `commit` returns) without waiting out the period.
    async fn work(&self) {
        let sync_due_in = match self.durability {
            Durability::Batch(period) => {
                let state = self.state.borrow();
                (state.durable < state.written).then(|| period.saturating_sub(state.last_sync.elapsed()))
            }
            Durability::Fsync | Durability::Memory => None,
        };
        match sync_due_in {
            None => self.buffered().await,
            Some(wait) => monoio::select! {
                _ = monoio::time::sleep(wait) => {}
                _ = self.buffered() => {}
            },
        }
    }

    /// Resolves once records are buffered or the log has failed.
    async fn buffered(&self) {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if !state.buffer.is_empty() || state.failed.is_some() {
                return Poll::Ready(());
            }
            state.flusher = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// One batch: rotate if the head is full, write the buffer, sync (per durability),
    /// release the waiters, then compact.
    pub async fn flush_once(&self) -> Result<(), WalError> {
        let failed = WalError::storage;
        let rotate = {
            let state = self.state.borrow();
            !state.buffer.is_empty()
                && state.head_len > HEADER_BYTES as u64
                && state.head_len + state.buffer.len() as u64 > self.segment_bytes_max
        };
        if rotate {
            self.rotate().await?;
        }
        let (head, offset, bytes, end) = {
            let mut state = self.state.borrow_mut();
            let head = state.head;
            for (seq, copy) in std::mem::take(&mut state.buffered) {
                if let Some(entry) = state.live.get_mut(seq) {
                    *(if copy { &mut entry.copy_at } else { &mut entry.state_at }) = Some(head);
                }
            }
            let mut bytes = std::mem::take(&mut state.buffer);
            if !bytes.is_empty() {
                let mark = record::mark_bytes(state.head_synced, state.next_seq);
                bytes[..record::MARK_BYTES].copy_from_slice(&mark);
            }
            state.segments.entry(head).or_default().bytes += bytes.len() as u64;
            let offset = state.head_len;
            state.head_len += bytes.len() as u64;
            (head, offset, bytes, state.appended)
        };
        let bytes_len = bytes.len() as u64;
        if !bytes.is_empty() {
            let length = bytes.len() as u64;
            self.storage().write_at(head, offset, bytes).await.map_err(failed)?;
            if self.written(end, length) {
                // Rotation fsynced every finished segment, so compaction need not wait for
                // this batch's fsync (its copies are removed only once durable).
                if rotate {
                    self.compact().await?;
                }
                return Ok(());
            }
        }
        self.storage().sync(head).await.map_err(failed)?;
        let copied = {
            let mut state = self.state.borrow_mut();
            state.head_synced = offset + bytes_len;
            state.stats.fsyncs += 1;
            state.last_sync = std::time::Instant::now();
            debug_assert!(end <= state.written && state.written <= state.appended, "appended ≥ written ≥ durable");
            state.durable = end;
            for waker in state.waiters.drain(..) {
                waker.wake();
            }
            state.removable.is_some_and(|(_, lsn)| lsn <= end)
        };
        if rotate || copied {
            self.compact().await?;
        }
        Ok(())
    }

    /// Notes a batch written up to `end`; in `batch` mode releases the commits and says
    /// whether the fsync is not due yet.
    fn written(&self, end: Lsn, length: u64) -> bool {
        let mut state = self.state.borrow_mut();
        debug_assert!(state.durable <= end && end <= state.appended, "appended ≥ written ≥ durable");
        state.written = end;
        state.stats.bytes_written += length;
        state.stats.batches += 1;
        let Durability::Batch(period) = self.durability else { return false };
        for waker in state.waiters.drain(..) {
            waker.wake();
        }
        // Under steady load the buffer is never empty when the timer ends: sync here once the
        // period has passed, so fsyncs keep their pace.
        state.last_sync.elapsed() < period
    }

    /// Starts a new head segment: sync the old one, create, write the header, sync, sync dir.
    async fn rotate(&self) -> Result<(), WalError> {
        let failed = WalError::storage;
        let (old, next) = {
            let state = self.state.borrow();
            // A segment is named (its file name, `SegmentHeader::first_seq`) by the first
            // sequence number it may hold, so names sort in log order.
            (state.head, state.next_seq.get().max(state.head + 1))
        };
        self.storage().sync(old).await.map_err(failed)?;
        self.state.borrow_mut().stats.fsyncs += 1;
        self.create_segment(next).await
    }

    async fn create_segment(&self, first_seq: u64) -> Result<(), WalError> {
        let failed = WalError::storage;
        let header = {
            let state = self.state.borrow();
            SegmentHeader { shard: self.shard, log_id: state.log_id, first_seq }
        };
        self.storage().create(first_seq).await.map_err(failed)?;
        self.storage().write_at(first_seq, 0, header.encode().to_vec()).await.map_err(failed)?;
        self.storage().sync(first_seq).await.map_err(failed)?;
        self.storage().sync_dir().await.map_err(failed)?;
        let mut state = self.state.borrow_mut();
        state.stats.fsyncs += 1;
        state.next_seq = state.next_seq.max(SequenceNumber::new(first_seq));
        state.head = first_seq;
        state.head_len = HEADER_BYTES as u64;
        state.head_synced = HEADER_BYTES as u64;
        state.segments.insert(first_seq, SegmentInfo { bytes: HEADER_BYTES as u64 });
        Ok(())
    }

    /// Removes the oldest segments while nothing live refers to them; then, if the oldest
    /// still holds live records and moving them frees enough, copies them forward (the
    /// segment goes once the copies are durable, at a later flush).
    async fn compact(&self) -> Result<(), WalError> {
        let failed = WalError::storage;
        let mut removed_any = false;
        loop {
            let removable = {
                let mut state = self.state.borrow_mut();
                let Some((&oldest, &info)) = state.segments.iter().next() else { break };
                if oldest == state.head {
                    break;
                }
                match state.removable {
                    Some((segment, lsn)) if segment == oldest => {
                        if lsn > state.durable {
                            break;
                        }
                        state.removable = None;
                        true
                    }
                    _ => state.compact_oldest(oldest, info.bytes, self.segment_bytes_max),
                }
            };
            if !removable {
                break;
            }
            let oldest = *self.state.borrow().segments.keys().next().expect("checked above");
            self.storage().remove(oldest).await.map_err(failed)?;
            let mut state = self.state.borrow_mut();
            state.segments.remove(&oldest);
            state.stats.segments_removed += 1;
            removed_any = true;
        }
        if self.state.borrow().removable.is_some() {
            let mut state = self.state.borrow_mut();
            self.wake_flusher(&mut state);
        }
        if removed_any {
            self.storage().sync_dir().await.map_err(failed)?;
        }
        Ok(())
    }

    /// The storage; only a log with storage flushes, rotates or compacts.
    fn storage(&self) -> &S {
        self.storage.as_ref().expect("a memory log never flushes")
    }

    fn wake_flusher(&self, state: &mut WalState) {
        if let Some(waker) = state.flusher.take() {
            waker.wake();
        }
    }
}

impl WalState {
    fn new(endpoint_keys: &[&str]) -> WalState {
        WalState {
            log_id: 0,
            next_seq: SequenceNumber::MIN,
            head: 0,
            head_len: 0,
            head_synced: 0,
            records: true,
            buffer: Vec::new(),
            buffered: Vec::new(),
            appended: 0,
            written: 0,
            durable: 0,
            waiters: Vec::new(),
            flusher: None,
            failed: None,
            segments: BTreeMap::new(),
            live: LiveIndex::new(endpoint_keys),
            removable: None,
            last_sync: std::time::Instant::now(),
            stats: WalStats::default(),
        }
    }

    fn check(&self) -> Result<(), WalError> {
        match &self.failed {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Starts a batch in the buffer if none is: every batch starts with a mark, filled in
    /// when the batch is written.
    fn begin_batch(&mut self) {
        if self.buffer.is_empty() {
            self.buffer.resize(record::MARK_BYTES, 0);
            self.appended += record::MARK_BYTES as u64;
        }
    }

    fn push(&mut self, record: &Record) -> Lsn {
        if self.records {
            self.begin_batch();
            record.encode(&mut self.buffer);
            self.appended += record.encoded_len() as u64;
        }
        self.appended
    }

    /// Buffers a `Delivery` or `BatchItem` record for `seq` and indexes it (replacing the
    /// entry when it is a compaction copy); a copy's `state` (`Some(dead)`) is made explicit
    /// with an `Ack dead` or `Replay` record after it.
    fn push_live(&mut self, seq: SequenceNumber, mut live: Live, state: Option<bool>) -> Lsn {
        live.bytes = record::delivery_len(self.live.key(live.endpoint), &live.body) as u64;
        if self.records {
            self.begin_batch();
            let (batch_item, key) = (live.kind == Kind::BatchItem, self.live.key(live.endpoint));
            record::encode_delivery(&mut self.buffer, batch_item, seq, live.created_ms, key, &live.body);
            self.appended += live.bytes;
            self.buffered.push((seq, true));
        }
        let mut lsn = self.appended;
        match state {
            Some(true) => lsn = self.push(&Record::Ack { seq, outcome: Outcome::Dead }),
            Some(false) => lsn = self.push(&Record::Replay { seq }),
            None => {}
        }
        if state.is_some() && self.records {
            self.buffered.push((seq, false));
        }
        live.dead = state == Some(true);
        (live.copy_at, live.state_at) = (None, None);
        self.live.insert(seq, live);
        lsn
    }

    /// Whether the oldest segment can go now; if not, maybe buffers copies of what keeps it.
    fn compact_oldest(&mut self, oldest: u64, oldest_bytes: u64, segment_bytes_max: u64) -> bool {
        let keeping = self.live.referring_to(oldest);
        if keeping.is_empty() {
            return true;
        }
        let keeping_bytes: u64 = keeping.iter().filter_map(|&seq| self.live.get(seq)).map(Live::bytes).sum();
        let total_bytes: u64 = self.segments.values().map(|i| i.bytes).sum();
        // Copy when that frees at least half the segment, or when the log holds more than
        // twice what is live (so cleaning pays for itself overall).
        let worth_it =
            keeping_bytes * 2 <= oldest_bytes || total_bytes > 2 * self.live.live_bytes() + 2 * segment_bytes_max;
        if worth_it {
            for seq in keeping {
                let entry = self.live.get(seq).expect("listed above").clone();
                // A batch item has no state record to restate (it is never dead).
                let state = (entry.kind == Kind::Delivery).then_some(entry.dead);
                self.push_live(seq, entry, state);
            }
            self.removable = Some((oldest, self.appended));
        }
        false
    }

    fn apply_ack(&mut self, seq: SequenceNumber, outcome: Outcome) {
        match outcome {
            Outcome::Delivered | Outcome::Discarded => {
                self.live.remove(seq);
            }
            Outcome::Dead => {
                if self.live.get(seq).is_some() {
                    self.live.set_dead(seq, true);
                    if self.records {
                        self.buffered.push((seq, false));
                    }
                }
            }
        }
    }

    /// Reads one segment at recovery, applying its records; returns where its valid records
    /// end (a torn tail after that is to be cut), or `None` for a last segment whose header
    /// never became durable (to be removed). Refuses damage that the log shows was fsynced.
    fn recover_segment(
        &mut self,
        segment: u64,
        bytes: &[u8],
        last: bool,
        shard: u32,
        log_id: &mut Option<u64>,
    ) -> Result<Option<usize>, WalError> {
        let corrupt = |offset: usize, reason: String| WalError::Corrupt { segment, offset: offset as u64, reason };
        let header = match SegmentHeader::decode(bytes) {
            Err(version) => {
                let reason = format!(
                    "format version {version}, this build reads version {} (drain the log with the release that wrote it)",
                    record::VERSION
                );
                return Err(corrupt(8, reason));
            }
            Ok(Some(header)) => header,
            // A header is synced before any batch is written, so a mark behind a bad header
            // proves the header was durable: that is damage, not an unfinished creation.
            Ok(None) if last && record::marks_after(bytes, HEADER_BYTES).next().is_none() => return Ok(None),
            Ok(None) => return Err(corrupt(0, "bad segment header".into())),
        };
        if header.shard != shard {
            return Err(corrupt(12, format!("written by shard {}, opened by shard {shard}", header.shard)));
        }
        if header.first_seq != segment {
            return Err(corrupt(24, format!("header says first_seq {}", header.first_seq)));
        }
        if *log_id.get_or_insert(header.log_id) != header.log_id {
            return Err(corrupt(16, "belongs to another log (log_id differs)".into()));
        }
        self.next_seq = self.next_seq.max(SequenceNumber::new(header.first_seq));
        let mut offset = HEADER_BYTES;
        let reason = loop {
            match Record::decode(&bytes[offset..]) {
                Ok(Some((Record::Mark { durable, .. }, _))) if durable > offset as u64 => {
                    break "mark claiming bytes past itself".to_string();
                }
                Ok(Some((record, used))) => {
                    self.apply_recovered(record, segment, used as u64);
                    offset += used;
                }
                Ok(None) if offset == bytes.len() => return Ok(Some(offset)),
                Ok(None) => break "truncated record".into(),
                Err(e) => break format!("{e:?} record"),
            }
        };
        if !last {
            // Every earlier segment was fsynced whole before the next one was created.
            return Err(corrupt(offset, reason));
        }
        // The last segment: the bad bytes are a torn tail unless a later batch's mark proves
        // they were fsynced. Marks in the tail also keep their seqs from being handed out again.
        let mut proven = 0;
        for (_, durable, next_seq) in record::marks_after(bytes, offset + 1) {
            proven = proven.max(durable);
            self.next_seq = self.next_seq.max(next_seq);
        }
        if proven > offset as u64 {
            return Err(corrupt(
                offset,
                format!("{reason} before byte {proven}, which a later batch's mark shows was fsynced"),
            ));
        }
        Ok(Some(offset))
    }

    /// Indexes a `Delivery` or `BatchItem` record read at recovery. A second one for a seq is a
    /// copy made by compaction: it keeps the state the earlier records gave it (an explicit
    /// state record follows it anyway).
    fn recover_copy(&mut self, kind: Kind, delivery: Delivery, segment: u64, bytes: u64) {
        let endpoint = self.live.endpoint_id(&delivery.endpoint);
        let previous = self.live.remove(delivery.seq);
        let (dead, state_at) = previous.map_or((false, None), |p| (p.dead && kind == Kind::Delivery, p.state_at));
        let (created_ms, body, copy_at) = (delivery.created_ms, delivery.body, Some(segment));
        self.live.insert(delivery.seq, Live { kind, endpoint, created_ms, body, dead, copy_at, state_at, bytes });
    }

    /// Replays one record read at recovery from `segment`.
    fn apply_recovered(&mut self, record: Record, segment: u64, bytes: u64) {
        if let Some(seq) = record.seq() {
            self.next_seq = self.next_seq.max(seq.next());
        }
        match record {
            Record::Mark { next_seq, .. } => self.next_seq = self.next_seq.max(next_seq),
            Record::Delivery(delivery) => self.recover_copy(Kind::Delivery, delivery, segment, bytes),
            Record::BatchItem(item) => self.recover_copy(Kind::BatchItem, item, segment, bytes),
            Record::Ack { seq, outcome: Outcome::Delivered | Outcome::Discarded } => {
                self.live.remove(seq);
            }
            Record::Ack { seq, outcome: Outcome::Dead } | Record::Replay { seq } => {
                let dead = matches!(record, Record::Ack { .. });
                self.live.set_dead(seq, dead);
                if let Some(entry) = self.live.get_mut(seq) {
                    entry.state_at = Some(segment);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
