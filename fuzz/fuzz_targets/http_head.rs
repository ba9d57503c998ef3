//! HTTP request heads: never panic; a parsed head never claims more bytes than it was given,
//! and re-parsing the same prefix gives the same head.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::http::parse::{parse_head, HeadLimits};

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits { request_line_bytes_max: 256, header_bytes_max: 1024, headers_count_max: 16, body_bytes_max: 4096 };
    if let Ok(Some(head)) = parse_head(data, &limits) {
        assert!(head.head_len <= data.len());
        assert!(head.content_length <= limits.body_bytes_max);
        let again = parse_head(&data[..head.head_len], &limits).unwrap().unwrap();
        assert_eq!(again, head);
    }
});
