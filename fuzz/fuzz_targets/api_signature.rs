//! HTTP API signing: never panic on any query string; a query signed by `signed_query`
//! always verifies, and any change to the body makes it fail.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::pusher::auth::{parse_query, signed_query, verify, SignedRequest};

fuzz_target!(|data: &[u8]| {
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret");
    let text = String::from_utf8_lossy(data);
    let (query, body) = text.split_once('\n').unwrap_or((&text, ""));
    let params = parse_query(query);
    let request = SignedRequest { method: "POST", path: "/apps/1/events", params: &params, body: body.as_bytes() };
    let _ = verify(&request, "key", &secret, 1_000_000);

    let signed = signed_query("POST", "/apps/1/events", "key", "secret", body.as_bytes(), 1_000_000, &[]);
    let params = parse_query(&signed);
    let request = SignedRequest { method: "POST", path: "/apps/1/events", params: &params, body: body.as_bytes() };
    assert!(verify(&request, "key", &secret, 1_000_000).is_ok());
    let tampered = format!("{body}x");
    let request = SignedRequest { method: "POST", path: "/apps/1/events", params: &params, body: tampered.as_bytes() };
    assert!(verify(&request, "key", &secret, 1_000_000).is_err());
});
