//! The RFC 6455 opening handshake, server side, on an already parsed HTTP request head.
//!
//! Owns the upgrade checks and the `101 Switching Protocols` answer. Knows nothing of which
//! paths upgrade (that is routing) nor of sockets.

use crate::http::parse::RequestHead;

/// Why an upgrade request was refused, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    /// HTTP status code.
    pub status: u16,
    /// Human-readable reason for the JSON error body.
    pub reason: &'static str,
}

/// Whether the request asks for a WebSocket upgrade at all (`Upgrade: websocket`).
pub fn is_upgrade(head: &RequestHead) -> bool {
    head.header("upgrade").is_some_and(|v| has_token(v, "websocket"))
}

/// Validates an upgrade request and returns the full `101` response head.
pub fn accept(head: &RequestHead) -> Result<Vec<u8>, HandshakeError> {
    // RFC 6455 §4.2.1: the method MUST be GET and the version at least HTTP/1.1.
    if head.method != http::Method::GET {
        return Err(HandshakeError { status: 405, reason: "WebSocket upgrade requires GET" });
    }
    if head.version_minor < 1 {
        return Err(HandshakeError { status: 400, reason: "WebSocket upgrade requires HTTP/1.1" });
    }
    // §4.2.1 items 3–4: Upgrade contains "websocket", Connection contains "Upgrade".
    if !is_upgrade(head) {
        return Err(HandshakeError { status: 400, reason: "missing Upgrade: websocket" });
    }
    if !head.header("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return Err(HandshakeError { status: 400, reason: "missing Connection: Upgrade" });
    }
    // §4.2.1 item 6: version 13 only; §4.2.2 says answer 426 with the versions we speak.
    if head.header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError { status: 426, reason: "Sec-WebSocket-Version must be 13" });
    }
    // §4.2.1 item 5: the key is base64 of 16 bytes, i.e. 24 characters.
    let key = head.header("sec-websocket-key").map(<[u8]>::trim_ascii).unwrap_or_default();
    if key.len() != 24 || !key.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) {
        return Err(HandshakeError { status: 400, reason: "invalid Sec-WebSocket-Key" });
    }
    let accept = tungstenite::handshake::derive_accept_key(key);
    let mut response = Vec::with_capacity(160);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    response.extend_from_slice(accept.as_bytes());
    response.extend_from_slice(b"\r\n\r\n");
    Ok(response)
}

/// Case-insensitive search for `token` in a comma-separated header value.
fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse::{parse_head, HeadLimits};

    fn head(text: &str) -> RequestHead {
        parse_head(text.as_bytes(), &HeadLimits::default()).unwrap().unwrap()
    }

    fn check(request: &str, expected: Result<&str, u16>) {
        let got = accept(&head(request)).map(|r| String::from_utf8(r).unwrap()).map_err(|e| e.status);
        assert_eq!(got.as_deref().map_err(|s| *s), expected);
    }

    /// The RFC 6455 §1.3 sample key gives the sample accept value.
    #[test]
    fn rfc_sample_key() {
        check(
            "GET /app/k HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            Ok("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"),
        );
    }

    /// Each missing or wrong part is refused with its status.
    #[test]
    fn refusals() {
        let ok = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        check(&format!("POST /app/k HTTP/1.1\r\n{ok}Sec-WebSocket-Version: 13\r\n\r\n"), Err(405));
        check(&format!("GET /app/k HTTP/1.1\r\n{ok}Sec-WebSocket-Version: 8\r\n\r\n"), Err(426));
        check("GET /app/k HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", Err(400));
        check("GET /app/k HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", Err(400));
        check(&format!("GET /app/k HTTP/1.0\r\n{ok}Sec-WebSocket-Version: 13\r\n\r\n"), Err(400));
    }
}
