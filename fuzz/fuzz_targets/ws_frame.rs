//! WebSocket frame decoding: never panic; a decode consumes a whole frame or nothing; the same
//! bytes split at any point decode to the same messages (the decoder is resumable).
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringwire::ws::frame::{Decoder, FrameLimits, Incoming};

fn decode_all(chunks: &[&[u8]]) -> (Vec<Incoming>, Option<u16>) {
    let limits = FrameLimits { frame_bytes_max: 4096, message_bytes_max: 8192 };
    let mut decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf, limits) {
                Ok(Some(message)) => out.push(message),
                Ok(None) if buf.len() == before => break,
                Ok(None) => {}
                Err(e) => return (out, Some(e.code)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len();
    let whole = decode_all(&[&data[1..]]);
    let (a, b) = data[1..].split_at(split.min(data.len() - 1));
    let parts = decode_all(&[a, b]);
    assert_eq!(whole, parts);
});
