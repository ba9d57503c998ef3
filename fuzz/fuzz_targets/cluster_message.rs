//! Cluster bucket messages (payloads read from a shared Redis): decoding never panics; a
//! payload that decodes re-encodes to exactly its bytes, and decoding that gives the same
//! header and frame back (encode → decode round-trips).
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ringwire::cluster::message;

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let Ok((header, frame)) = message::decode(&payload) else { return };
    let mut again = Vec::new();
    message::encode(&header, &frame, &mut again).expect("a decoded header encodes");
    assert_eq!(again, data, "a decoded message re-encodes to its bytes");
    assert_eq!(again.len(), message::encoded_len(&header, frame.len()));
    let again = Bytes::from(again);
    let (header_again, frame_again) = message::decode(&again).expect("an encoded message decodes");
    assert_eq!(header_again, header);
    assert_eq!(frame_again, frame);
});
