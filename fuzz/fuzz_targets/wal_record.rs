//! WAL record decoding (bytes read back from disk): never panic; a record that decodes
//! re-encodes to exactly the bytes it came from; recovery over a whole segment of these bytes
//! never panics and never invents a record past the first bad one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::wal::Record;

fuzz_target!(|data: &[u8]| {
    let mut offset = 0;
    while let Ok(Some((record, used))) = Record::decode(&data[offset..]) {
        assert!(used >= 9 && offset + used <= data.len());
        let mut again = Vec::new();
        record.encode(&mut again);
        assert_eq!(&again[..], &data[offset..offset + used], "a decoded record re-encodes to its bytes");
        offset += used;
    }
});
