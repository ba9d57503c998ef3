//! Webhook receivers' responses (bytes from the network): parsing never panics, never claims
//! more bytes than it was given, a prefix of a response is "need more", never a different
//! response, and the incremental reader gives the same answer however the bytes are split
//! into reads.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringwire::webhook::client::{parse_response, ResponseReader};

/// The answer as comparable values: Err, need more, or (status, close, excerpt, used).
type Answer = Result<Option<(u16, bool, Vec<u8>, usize)>, ()>;

/// Feeds `data` to one reader in pieces of the given sizes (cycled); `eof` with the last one.
fn in_pieces(data: &[u8], sizes: &[u8], eof: bool) -> Answer {
    let mut reader = ResponseReader::new(1024);
    let mut buffer = BytesMut::new();
    let mut at = 0;
    let mut size = sizes.iter().cycle();
    loop {
        let n = (*size.next().unwrap_or(&1) as usize).max(1).min(data.len() - at);
        buffer.extend_from_slice(&data[at..at + n]);
        at += n;
        let last = at == data.len();
        match reader.read(&mut buffer, eof && last) {
            Err(_) => return Err(()),
            Ok(Some(r)) => return Ok(Some((r.status, r.close, r.excerpt.to_vec(), at - buffer.len()))),
            Ok(None) if last => return Ok(None),
            Ok(None) => {}
        }
    }
}

fuzz_target!(|input: &[u8]| {
    // The first bytes choose the read sizes; the rest is the response.
    let split = (input.first().copied().unwrap_or(0) as usize % 8).min(input.len().saturating_sub(1));
    let (sizes, data) = input.get(1..).unwrap_or(&[]).split_at(split.min(input.len().saturating_sub(1)));
    if data.is_empty() {
        return;
    }
    for eof in [false, true] {
        let whole = parse_response(data, eof, 1024);
        if let Ok(Some((response, used))) = &whole {
            assert!(*used <= data.len());
            assert!((100..600).contains(&response.status));
            assert!(response.excerpt.len() <= ringwire::webhook::client::EXCERPT_BYTES_MAX);
            if !eof {
                if let Ok(Some((again, used_again))) = parse_response(&data[..*used], false, 1024) {
                    assert_eq!((again.status, used_again), (response.status, *used));
                }
            }
        }
        let whole: Answer = whole.map(|o| o.map(|(r, used)| (r.status, r.close, r.excerpt.to_vec(), used))).map_err(|_| ());
        let sizes = if sizes.is_empty() { &[1u8][..] } else { sizes };
        assert_eq!(in_pieces(data, sizes, eof), whole, "split {sizes:?}");
    }
});
