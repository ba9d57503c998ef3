//! WAL record decoding (bytes read back from disk): never panic; a record that decodes
//! re-encodes to exactly the bytes it came from; recovery of a segment holding these bytes
//! never panics and never invents a live delivery or batch item that no record before the
//! first bad one created.
#![no_main]
use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use ringwire::wal::{Durability, Record, SegmentHeader, SimStorage, Storage, Wal};

fuzz_target!(|data: &[u8]| {
    let mut offset = 0;
    let mut created = HashSet::new();
    while let Ok(Some((record, used))) = Record::decode(&data[offset..]) {
        assert!(used >= 9 && offset + used <= data.len());
        let mut again = Vec::new();
        record.encode(&mut again);
        assert_eq!(&again[..], &data[offset..offset + used], "a decoded record re-encodes to its bytes");
        if let Record::Delivery(d) | Record::BatchItem(d) = &record {
            created.insert(d.seq);
        }
        offset += used;
    }
    let mut segment = SegmentHeader { shard: 0, log_id: 7, first_seq: 0 }.encode().to_vec();
    segment.extend_from_slice(data);
    let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build();
    runtime.expect("runtime").block_on(async {
        let storage = SimStorage::new();
        storage.create(0).await.unwrap();
        storage.write_at(0, 0, segment).await.unwrap();
        if let Ok((wal, recovered)) = Wal::open(storage, 0, 1 << 20, Durability::Fsync, &["app/0"]).await {
            for seq in recovered {
                assert!(created.contains(&seq), "recovery invented seq {seq}");
                assert!(wal.index().get(seq).is_some(), "a recovered seq is indexed");
            }
        }
    });
});
