//! WAL simulation tests: a random workload on `SimStorage`, crashed at every sync point and
//! with torn tails, recovered and compared with a model of what was acknowledged.

use std::collections::HashMap;

use bytes::Bytes;

use super::*;

/// The tests' way to append a delivery: by endpoint key, as the dispatcher's ids are.
impl<S: Storage> Wal<S> {
    fn append_delivery(&self, key: &str, created_ms: u64, body: Bytes) -> Result<(SequenceNumber, Lsn), WalError> {
        self.append(Kind::Delivery, self.endpoint_id(key), created_ms, body)
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime").block_on(future)
}

/// What the workload did, as the model sees it.
#[derive(Default, Debug)]
struct Model {
    /// Every delivery and batch item appended: seq → (endpoint, body, kind).
    appended: HashMap<SequenceNumber, (String, Bytes, Kind)>,
    /// Deliveries whose append was committed (a flush after it returned Ok).
    committed: Vec<SequenceNumber>,
    /// Deliveries whose `Delivered` ack was committed.
    delivered: Vec<SequenceNumber>,
    /// Deliveries with a `Delivered` ack appended, committed or not (a real 2xx: losing
    /// them in a crash is right).
    delivered_any: Vec<SequenceNumber>,
    /// Latest committed dead/pending state, and whether a later transition is uncommitted.
    state: HashMap<SequenceNumber, (bool, bool)>,
    /// The largest seq ever handed out.
    seq_max: Option<SequenceNumber>,
}

const SEGMENT_BYTES_MAX: u64 = 600;

/// Runs a seeded workload until it ends or the disk crashes.
fn workload(storage: SimStorage, seed: u64, operations: usize) -> Model {
    block_on(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut model = Model::default();
        let Ok((wal, _)) = Wal::open(storage.clone(), 0, SEGMENT_BYTES_MAX, Durability::Fsync, &[]).await else {
            return model;
        };
        // Uncommitted operations since the last flush: (seq, kind) with kind 0 append, 1 delivered, 2 dead, 3 replay.
        let mut since_flush: Vec<(SequenceNumber, u8)> = Vec::new();
        let mut pending: Vec<SequenceNumber> = Vec::new();
        let mut dead: Vec<SequenceNumber> = Vec::new();
        // Batch items: only ever acked delivered (when their batch delivery is made).
        let mut items: Vec<SequenceNumber> = Vec::new();
        for _ in 0..operations {
            let choice = rng.u8(0..10);
            let result = match choice {
                0..=4 => {
                    let body = Bytes::from((0..rng.usize(0..120)).map(|_| rng.u8(..)).collect::<Vec<u8>>());
                    let endpoint = format!("app/{}", rng.u8(0..3));
                    let kind = if rng.u8(0..4) == 0 { Kind::BatchItem } else { Kind::Delivery };
                    let id = wal.endpoint_id(&endpoint);
                    wal.append(kind, id, 1000 + rng.u64(0..1000), body.clone()).map(|(seq, _)| {
                        model.appended.insert(seq, (endpoint, body, kind));
                        model.seq_max = model.seq_max.max(Some(seq));
                        match kind {
                            Kind::Delivery => pending.push(seq),
                            Kind::BatchItem => items.push(seq),
                        }
                        since_flush.push((seq, 0));
                    })
                }
                5 | 6 if !pending.is_empty() => {
                    let seq = pending.swap_remove(rng.usize(..pending.len()));
                    model.delivered_any.push(seq);
                    wal.append_ack(seq, Outcome::Delivered).map(|_| since_flush.push((seq, 1)))
                }
                7 if !pending.is_empty() => {
                    let seq = pending.swap_remove(rng.usize(..pending.len()));
                    dead.push(seq);
                    wal.append_ack(seq, Outcome::Dead).map(|_| since_flush.push((seq, 2)))
                }
                8 if !dead.is_empty() => {
                    let seq = dead.swap_remove(rng.usize(..dead.len()));
                    pending.push(seq);
                    let replayed = wal.append_replay(seq).expect("not failed");
                    assert!(replayed.is_some(), "seq {seq} is a dead letter");
                    since_flush.push((seq, 3));
                    Ok(())
                }
                9 if !items.is_empty() => {
                    let seq = items.swap_remove(rng.usize(..items.len()));
                    model.delivered_any.push(seq);
                    wal.append_ack(seq, Outcome::Delivered).map(|_| since_flush.push((seq, 1)))
                }
                _ => Ok(()),
            };
            if result.is_err() {
                break;
            }
            for (seq, kind) in &since_flush {
                if let Some(state) = model.state.get_mut(seq) {
                    state.1 = true;
                } else if *kind == 0 {
                    model.state.insert(*seq, (false, true));
                }
            }
            if rng.u8(0..4) == 0 {
                if wal.flush_once().await.is_err() {
                    break;
                }
                for (seq, kind) in since_flush.drain(..) {
                    match kind {
                        0 => model.committed.push(seq),
                        1 => model.delivered.push(seq),
                        _ => {}
                    }
                    model.state.insert(seq, (kind == 2, false));
                }
            }
        }
        model
    })
}

/// Recovers `image` and checks it against the model.
fn check_recovery(image: SimStorage, model: &Model, context: &str) {
    block_on(async move {
        let (wal, recovered) = Wal::open(image, 0, SEGMENT_BYTES_MAX, Durability::Fsync, &[])
            .await
            .unwrap_or_else(|e| panic!("{context}: recovery failed: {e}"));
        {
            let index = wal.index();
            for &seq in &recovered {
                let live = index.get(seq).unwrap_or_else(|| panic!("{context}: recovered seq {seq} not indexed"));
                let (endpoint, body, kind) =
                    model.appended.get(&seq).unwrap_or_else(|| panic!("{context}: invented seq {seq}"));
                assert_eq!(index.key(live.endpoint), endpoint, "{context}: seq {seq} endpoint");
                assert_eq!(&live.body, body, "{context}: seq {seq} body");
                assert_eq!(live.kind, *kind, "{context}: seq {seq} kind");
                assert!(!(live.dead && live.kind == Kind::BatchItem), "{context}: batch item {seq} dead");
                assert!(!model.delivered.contains(&seq), "{context}: seq {seq} was acked delivered durably");
            }
            assert_eq!(index.len(), recovered.len(), "{context}: recovered = indexed");
            for &seq in &model.committed {
                if model.delivered_any.contains(&seq) {
                    continue;
                }
                let live = index.get(seq).unwrap_or_else(|| panic!("{context}: committed seq {seq} lost"));
                if let Some(&(dead, uncommitted_after)) = model.state.get(&seq) {
                    if !uncommitted_after {
                        assert_eq!(live.dead, dead, "{context}: seq {seq} dead state");
                    }
                }
            }
        }
        // A new delivery never reuses a committed or recovered seq.
        let (seq, _) = wal.append_delivery("app/0", 1, Bytes::new()).expect("append after recovery");
        let committed_max = model.committed.iter().max().copied();
        let recovered_max = recovered.last().copied();
        assert!(Some(seq) > committed_max.max(recovered_max), "{context}: seq {seq} reused");
        wal.flush_once().await.unwrap_or_else(|e| panic!("{context}: flush after recovery: {e}"));
    });
}

/// Without a crash every committed, unacknowledged delivery comes back exactly, across
/// rotations and compactions.
#[test]
fn clean_restart_recovers_everything() {
    for seed in 0..20 {
        let storage = SimStorage::new();
        let model = workload(storage.clone(), seed, 300);
        assert!(!model.committed.is_empty());
        let image = storage.crash_image(&mut |_| 0, &mut || false);
        check_recovery(image, &model, &format!("seed {seed}"));
    }
}

/// A crash at every sync point of a workload, each with several torn tails (some ending in
/// garbage): recovery always matches the model.
#[test]
fn crash_at_every_sync_point() {
    for seed in 0..6 {
        let probe = SimStorage::new();
        workload(probe.clone(), seed, 200);
        let syncs = probe.syncs();
        assert!(syncs > 20, "the workload syncs often enough ({syncs})");
        for crash_at in 1..=syncs {
            let storage = SimStorage::new();
            storage.crash_at_sync(crash_at);
            let model = workload(storage.clone(), seed, 200);
            assert!(storage.crashed(), "seed {seed}: crash at sync {crash_at} happened");
            let mut tear_rng = fastrand::Rng::with_seed(seed * 1000 + crash_at);
            let mut garbage_rng = tear_rng.fork();
            for variant in 0..4 {
                let image = storage.crash_image(&mut |n| tear_rng.usize(0..=n), &mut || garbage_rng.bool());
                check_recovery(image, &model, &format!("seed {seed}, crash at sync {crash_at}, tear {variant}"));
            }
        }
    }
}

/// Compaction keeps the disk bounded: with every delivery acknowledged, old segments go.
#[test]
fn compaction_removes_finished_segments() {
    block_on(async {
        let storage = SimStorage::new();
        let (wal, _) = Wal::open(storage.clone(), 0, 1024, Durability::Fsync, &[]).await.unwrap();
        for round in 0..200u64 {
            let (seq, _) = wal.append_delivery("app/0", round, Bytes::from(vec![b'x'; 100])).unwrap();
            wal.flush_once().await.unwrap();
            wal.append_ack(seq, Outcome::Delivered).unwrap();
            wal.flush_once().await.unwrap();
        }
        let segments = storage.list().await.unwrap();
        assert!(segments.len() <= 3, "segments left: {segments:?}");
        assert!(wal.stats().segments_removed > 10);
    });
}

/// A dead letter among delivered ones is copied forward, so its old segment can go and it
/// survives a restart with its body.
#[test]
fn dead_letters_are_copied_forward() {
    block_on(async {
        let storage = SimStorage::new();
        let (wal, _) = Wal::open(storage.clone(), 0, 1024, Durability::Fsync, &[]).await.unwrap();
        let (dead_seq, _) = wal.append_delivery("app/1", 5, Bytes::from_static(b"keep me")).unwrap();
        wal.append_ack(dead_seq, Outcome::Dead).unwrap();
        for round in 0..200u64 {
            let (seq, _) = wal.append_delivery("app/0", round, Bytes::from(vec![b'x'; 100])).unwrap();
            wal.append_ack(seq, Outcome::Delivered).unwrap();
            wal.flush_once().await.unwrap();
        }
        assert!(storage.list().await.unwrap().len() <= 3);
        let image = storage.crash_image(&mut |_| 0, &mut || false);
        let (wal, recovered) = Wal::open(image, 0, 1024, Durability::Fsync, &[]).await.unwrap();
        assert_eq!(recovered, vec![dead_seq]);
        let index = wal.index();
        let live = index.get(dead_seq).unwrap();
        assert!(live.dead);
        assert_eq!(&live.body[..], b"keep me");
    });
}

/// Damage in a finished (fsynced) segment is refused with its file and offset, never skipped.
#[test]
fn corruption_in_an_earlier_segment_is_refused() {
    block_on(async {
        let storage = SimStorage::new();
        let (wal, _) = Wal::open(storage.clone(), 0, 300, Durability::Fsync, &[]).await.unwrap();
        for round in 0..20u64 {
            wal.append_delivery("app/0", round, Bytes::from(vec![b'y'; 50])).unwrap();
            wal.flush_once().await.unwrap();
        }
        let first = storage.list().await.unwrap()[0];
        let mut bytes = storage.read(first).await.unwrap();
        bytes[40] ^= 1;
        storage.write_at(first, 0, bytes).await.unwrap();
        storage.sync(first).await.unwrap();
        let image = storage.crash_image(&mut |_| 0, &mut || false);
        let error = Wal::open(image, 0, 300, Durability::Fsync, &[]).await.err().expect("refused");
        assert!(matches!(error, WalError::Corrupt { segment, .. } if segment == first), "{error}");
    });
}

/// A log opened by another shard number is refused.
#[test]
fn another_shards_log_is_refused() {
    block_on(async {
        let storage = SimStorage::new();
        let (wal, _) = Wal::open(storage.clone(), 1, 300, Durability::Fsync, &[]).await.unwrap();
        wal.append_delivery("app/0", 1, Bytes::new()).unwrap();
        wal.flush_once().await.unwrap();
        let error = Wal::open(storage, 0, 300, Durability::Fsync, &[]).await.err().expect("refused");
        assert!(error.to_string().contains("shard 1"), "{error}");
    });
}

/// `batch` durability: commits return once written; fsyncs keep their pace under steady load.
#[test]
fn batch_mode_syncs_under_steady_load() {
    block_on(async {
        let storage = SimStorage::new();
        let period = std::time::Duration::from_millis(20);
        let (wal, _) = Wal::open(storage.clone(), 0, 1 << 20, Durability::Batch(period), &[]).await.unwrap();
        let syncs_before = storage.syncs();
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(200) {
            let (_, lsn) = wal.append_delivery("app/0", 1, Bytes::from_static(b"x")).unwrap();
            wal.flush_once().await.unwrap();
            wal.commit(lsn).await.unwrap();
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let syncs = storage.syncs() - syncs_before;
        assert!((3..=30).contains(&syncs), "about one fsync per period, got {syncs}");
    });
}

/// Endpoints are known to the log by key, not by place: after a reload that reorders,
/// removes and adds endpoints (the dispatcher interns the new keys) and a crash, a restart on
/// the new config maps every recovered delivery to its own endpoint's key, whatever ids the
/// new config gives them, and a removed endpoint's deliveries to its key as an orphan.
#[test]
fn recovery_maps_deliveries_by_endpoint_key_across_a_reload() {
    block_on(async {
        let storage = SimStorage::new();
        let started_with = ["app/orders", "app/audit"];
        let (wal, _) = Wal::open(storage.clone(), 0, 1 << 20, Durability::Fsync, &started_with).await.unwrap();
        let (orders, _) = wal.append(Kind::Delivery, 0, 1, Bytes::from_static(b"to orders")).unwrap();
        // A reload adds `app/new`: the next free id.
        let new_id = wal.endpoint_id("app/new");
        let (fresh, _) = wal.append(Kind::Delivery, new_id, 2, Bytes::from_static(b"to new")).unwrap();
        let (audit, lsn) = wal.append(Kind::Delivery, 1, 3, Bytes::from_static(b"to audit")).unwrap();
        wal.flush_once().await.unwrap();
        wal.commit(lsn).await.unwrap();
        let image = storage.crash_image(&mut |_| 0, &mut || false);
        // The reloaded config: `new` first, `audit`, `orders` removed.
        let (wal, recovered) =
            Wal::open(image, 0, 1 << 20, Durability::Fsync, &["app/new", "app/audit"]).await.unwrap();
        assert_eq!(recovered, [orders, fresh, audit]);
        let index = wal.index();
        let key_of = |seq| index.key(index.get(seq).unwrap().endpoint).to_string();
        assert_eq!(
            (key_of(fresh), key_of(audit), key_of(orders)),
            ("app/new".into(), "app/audit".into(), "app/orders".into())
        );
        assert_eq!((index.get(fresh).unwrap().endpoint, index.get(audit).unwrap().endpoint), (0, 1));
        assert_eq!(index.get(orders).unwrap().endpoint, 2, "an orphan: past the configured ids");
    });
}

/// A delivery over the record limit is refused with an error value (no panic), and the log
/// goes on accepting and committing normal deliveries.
#[test]
fn oversized_delivery_is_refused_without_panic() {
    block_on(async {
        let storage = SimStorage::new();
        let (wal, _) = Wal::open(storage.clone(), 0, 1 << 20, Durability::Fsync, &[]).await.unwrap();
        let body = Bytes::from(vec![b'z'; record::RECORD_BYTES_MAX]);
        let error = wal.append_delivery("app/0", 1, body).expect_err("refused");
        assert!(matches!(error, WalError::RecordTooLarge { .. }), "{error}");
        let long_key = "k".repeat(usize::from(u16::MAX) + 1);
        assert!(matches!(wal.append_delivery(&long_key, 1, Bytes::new()), Err(WalError::RecordTooLarge { .. })));
        let (seq, lsn) = wal.append_delivery("app/0", 2, Bytes::from_static(b"ok")).unwrap();
        wal.flush_once().await.unwrap();
        wal.commit(lsn).await.unwrap();
        assert_eq!(wal.index().get(seq).map(|l| l.body.clone()), Some(Bytes::from_static(b"ok")));
    });
}

/// Bit rot at random offsets of crash images: a flip in bytes a durable batch mark proves
/// fsynced (any byte of an earlier segment; the last segment below its newest durable mark's
/// claim) refuses to start, naming that segment and an offset at or before the flip; a flip
/// past that is cut as a torn tail, and recovery then invents nothing.
#[test]
fn bit_flips_before_the_durable_end_are_refused() {
    let (mut refused, mut recovered_after_flip) = (0, 0);
    for seed in 0..6 {
        let probe = SimStorage::new();
        workload(probe.clone(), seed, 200);
        for crash_at in 1..=probe.syncs() {
            let storage = SimStorage::new();
            storage.crash_at_sync(crash_at);
            let model = workload(storage.clone(), seed, 200);
            let mut rng = fastrand::Rng::with_seed(seed * 7919 + crash_at);
            for variant in 0..4 {
                let (mut tear_rng, mut garbage_rng) = (rng.fork(), rng.fork());
                let image = storage.crash_image(&mut |n| tear_rng.usize(0..=n), &mut || garbage_rng.bool());
                let segments = block_on(image.list()).expect("image lists");
                if segments.is_empty() {
                    continue;
                }
                let segment = segments[rng.usize(..segments.len())];
                let length = image.len_of(segment);
                if length == 0 {
                    continue;
                }
                let (offset, bit) = (rng.usize(..length), rng.u8(0..8));
                image.flip_bit(segment, offset, bit);
                let last = Some(&segment) == segments.last();
                let must_refuse = !last || offset < storage.proven_bytes(segment);
                let context = format!(
                    "seed {seed}, crash at sync {crash_at}, variant {variant}: bit {bit} of byte {offset} of segment \
                     {segment} (last: {last}, proven: {})",
                    storage.proven_bytes(segment)
                );
                match block_on(Wal::open(image, 0, SEGMENT_BYTES_MAX, Durability::Fsync, &[])) {
                    Err(WalError::Corrupt { segment: named, offset: at, .. }) => {
                        assert_eq!(named, segment, "{context}");
                        assert!(at as usize <= offset, "{context}: named byte {at}");
                        refused += 1;
                    }
                    Err(error) => panic!("{context}: {error}"),
                    Ok((wal, recovered)) => {
                        assert!(!must_refuse, "{context}: fsynced damage was cut instead of refused");
                        for &seq in &recovered {
                            let (_, body, kind) =
                                model.appended.get(&seq).unwrap_or_else(|| panic!("{context}: invented {seq}"));
                            let index = wal.index();
                            let live = index.get(seq).expect("recovered is indexed");
                            assert_eq!((&live.body, live.kind), (body, *kind), "{context}: seq {seq}");
                        }
                        recovered_after_flip += 1;
                    }
                }
            }
        }
    }
    assert!(
        refused > 100 && recovered_after_flip > 20,
        "both cases ran: {refused} refused, {recovered_after_flip} cut"
    );
}

/// A segment of format 1 or 2 (before batch items were a record kind) is refused with its
/// version named, never taken for a torn header and deleted.
#[test]
fn another_format_version_is_refused_not_deleted() {
    block_on(async {
        for version in [1u8, 2] {
            let storage = SimStorage::new();
            storage.create(0).await.unwrap();
            let mut old = b"RWWAL\0\0\0".to_vec();
            old[7] = version;
            old.extend_from_slice(&u32::from(version).to_le_bytes());
            old.resize(40 + 30, 7);
            storage.write_at(0, 0, old).await.unwrap();
            let error = Wal::open(storage.clone(), 0, 300, Durability::Fsync, &[]).await.err().expect("refused");
            assert!(
                error.to_string().contains(&format!("format version {version}, this build reads version 3")),
                "{error}"
            );
            assert_eq!(storage.list().await.unwrap(), vec![0]);
        }
    });
}

/// `memory` durability keeps the same index (deliveries, batch items, dead letters, budgets)
/// without storage: commits return at once and nothing needs a flusher.
#[test]
fn memory_log_keeps_the_index_without_storage() {
    block_on(async {
        let wal = Wal::<SimStorage>::memory(0, &["app/0"]);
        assert!(!wal.writes());
        let (item, _) = wal.append(Kind::BatchItem, 0, 1, Bytes::from_static(b"{}")).unwrap();
        let (seq, lsn) = wal.append(Kind::Delivery, 0, 2, Bytes::from_static(b"body")).unwrap();
        wal.commit(lsn).await.unwrap();
        assert_eq!((wal.index().len(), wal.index().counts(0)), (2, (1, 0)));
        let bytes = wal.index().endpoint_bytes(0);
        wal.append_ack(item, Outcome::Delivered).unwrap();
        assert!(wal.index().endpoint_bytes(0) < bytes, "the batch item's bytes are given back");
        wal.append_ack(seq, Outcome::Dead).unwrap();
        assert_eq!(wal.index().dead_before(u64::MAX), vec![seq]);
        assert!(wal.append_replay(seq).unwrap().is_some() && wal.append_replay(seq).unwrap().is_none());
        wal.append_ack(seq, Outcome::Delivered).unwrap();
        assert_eq!((wal.index().len(), wal.index().live_bytes(), wal.stats().bytes_written), (0, 0, 0));
    });
}

/// `batch` durability: a sparse append is written (its commit returns) without waiting out
/// the fsync period, even while an earlier batch's fsync is pending.
#[test]
fn batch_mode_flusher_wakes_for_new_appends() {
    block_on(async {
        let storage = SimStorage::new();
        let period = std::time::Duration::from_secs(30);
        let (wal, _) = Wal::open(storage.clone(), 0, 1 << 20, Durability::Batch(period), &[]).await.unwrap();
        let wal = std::rc::Rc::new(wal);
        monoio::spawn({
            let wal = wal.clone();
            async move { wal.run().await }
        });
        for round in 0..3u64 {
            let (_, lsn) = wal.append_delivery("app/0", round, Bytes::from_static(b"sparse")).unwrap();
            let started = std::time::Instant::now();
            let committed = monoio::time::timeout(std::time::Duration::from_secs(5), wal.commit(lsn)).await;
            assert!(matches!(committed, Ok(Ok(()))), "round {round}: commit waited {:?}", started.elapsed());
        }
    });
}

/// `batch` durability: compaction keeps up although batches are rarely fsynced (the period
/// never ends during the test).
#[test]
fn batch_mode_compacts_without_waiting_for_the_period() {
    block_on(async {
        let storage = SimStorage::new();
        let period = std::time::Duration::from_secs(3600);
        let (wal, _) = Wal::open(storage.clone(), 0, 1024, Durability::Batch(period), &[]).await.unwrap();
        for round in 0..200u64 {
            let (seq, _) = wal.append_delivery("app/0", round, Bytes::from(vec![b'x'; 100])).unwrap();
            wal.flush_once().await.unwrap();
            wal.append_ack(seq, Outcome::Delivered).unwrap();
            wal.flush_once().await.unwrap();
        }
        let segments = storage.list().await.unwrap();
        assert!(segments.len() <= 3, "segments left: {segments:?}");
    });
}

/// `batch` durability: the flusher hands deliveries to senders only once durable, so after a
/// power loss at any moment no new delivery reuses the seq (the webhook id) of one a receiver
/// may have seen.
#[test]
fn batch_mode_never_reuses_a_released_seq() {
    let mut sent_total = 0;
    for seed in 0..20u64 {
        sent_total += block_on(async move {
            let storage = SimStorage::new();
            let durability = Durability::Batch(std::time::Duration::from_millis(3));
            let (wal, _) = Wal::open(storage.clone(), 0, 2048, durability, &[]).await.unwrap();
            let wal = std::rc::Rc::new(wal);
            let released = std::rc::Rc::new(std::cell::Cell::new(0));
            monoio::spawn({
                let (wal, released) = (wal.clone(), released.clone());
                async move { wal.run_with(|lsn| released.set(lsn)).await }
            });
            let mut rng = fastrand::Rng::with_seed(seed);
            let (mut waiting, mut sent) = (Vec::new(), Vec::new());
            for round in 0..rng.u64(20..120) {
                let (seq, lsn) = wal.append_delivery("app/0", round, Bytes::from_static(b"event")).unwrap();
                wal.commit(lsn).await.unwrap();
                waiting.push((lsn, seq));
                let now = released.get();
                sent.extend(waiting.iter().filter(|&&(lsn, _)| lsn <= now).map(|&(_, seq)| seq));
                waiting.retain(|&(lsn, _)| lsn > now);
                if rng.bool() {
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            // A power loss: only durable bytes survive.
            storage.crash();
            let image = storage.crash_image(&mut |_| 0, &mut || false);
            let (wal, _) = Wal::open(image, 0, 2048, durability, &[]).await.unwrap();
            let (next, _) = wal.append_delivery("app/0", 0, Bytes::new()).unwrap();
            assert!(sent.iter().all(|&seq| seq < next), "seed {seed}: seq {next} was already sent: {sent:?}");
            sent.len()
        });
    }
    assert!(sent_total > 100, "deliveries were released ({sent_total})");
}

/// A blocking pool that counts its tasks and runs each on a thread of its own.
#[derive(Clone, Default)]
struct CountingPool(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl monoio::blocking::ThreadPool for CountingPool {
    fn schedule_task(&self, task: monoio::blocking::BlockingTask) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::spawn(move || task.run());
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringwire-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `FileStorage` makes every blocking file-system call (directory creation, opening,
/// listing, reading, creating, truncating, removing, directory fsync) on the runtime's
/// blocking pool, never on the shard thread, and its segments still round-trip.
#[test]
fn file_storage_blocks_only_the_pool() {
    let pool = CountingPool::default();
    let base = temp_dir("wal-pool");
    let directory = base.join("data").join("shard-0");
    let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .attach_thread_pool(Box::new(pool.clone()))
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let tasks = || pool.0.load(std::sync::atomic::Ordering::SeqCst);
        let storage = FileStorage::open(&directory).await.unwrap();
        assert_eq!(tasks(), 1, "open");
        storage.create(5).await.unwrap();
        assert_eq!(tasks(), 2, "create");
        storage.write_at(5, 0, b"hello".to_vec()).await.unwrap();
        assert_eq!(tasks(), 3, "the first write opens the file");
        storage.sync(5).await.unwrap();
        storage.write_at(5, 5, b"!".to_vec()).await.unwrap();
        assert_eq!(tasks(), 3, "an open file is written and synced by the driver");
        storage.sync_dir().await.unwrap();
        assert_eq!(tasks(), 4, "sync_dir");
        assert_eq!(storage.list().await.unwrap(), vec![5]);
        assert_eq!(storage.read(5).await.unwrap(), b"hello!");
        storage.truncate(5, 2).await.unwrap();
        assert_eq!(storage.read(5).await.unwrap(), b"he");
        storage.remove(5).await.unwrap();
        assert!(storage.list().await.unwrap().is_empty());
        assert_eq!(tasks(), 10, "list, read, truncate, read, remove, list");
    });
    let _ = std::fs::remove_dir_all(&base);
}

/// Creating a shard's WAL directory fsyncs the parent of every directory it creates, and the
/// directory's own parent even when it already existed.
#[test]
fn wal_directory_creation_is_durable() {
    let base = temp_dir("wal-dirs");
    std::fs::create_dir_all(&base).unwrap();
    let directory = base.join("data").join("shard-0");
    let mut synced = Vec::new();
    storage::create_dir_durably(&directory, &mut |p: &std::path::Path| {
        synced.push(p.to_path_buf());
        Ok(())
    })
    .unwrap();
    assert!(directory.is_dir());
    assert_eq!(synced, vec![base.clone(), base.join("data")]);
    synced.clear();
    storage::create_dir_durably(&directory, &mut |p: &std::path::Path| {
        synced.push(p.to_path_buf());
        Ok(())
    })
    .unwrap();
    assert_eq!(synced, vec![base.join("data")]);
    let _ = std::fs::remove_dir_all(&base);
}
