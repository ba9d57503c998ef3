//! Webhook receivers' responses (bytes from the network): parsing never panics, never claims
//! more bytes than it was given, and a prefix of a response is "need more", never a
//! different response.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::http::client::parse_response;

fuzz_target!(|data: &[u8]| {
    for eof in [false, true] {
        if let Ok(Some((response, used))) = parse_response(data, eof, 1024) {
            assert!(used <= data.len());
            assert!((100..1000).contains(&response.status));
            assert!(response.excerpt.len() <= ringwire::http::client::EXCERPT_BYTES_MAX);
            if !eof {
                if let Ok(Some((again, used_again))) = parse_response(&data[..used], false, 1024) {
                    assert_eq!((again.status, used_again), (response.status, used));
                }
            }
        }
    }
});
