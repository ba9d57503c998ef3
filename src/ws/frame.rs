//! RFC 6455 frames: a sans-IO decoder for client frames and encoders for server frames.
//!
//! Owns framing rules only: masking, control-frame limits, fragmentation, UTF-8 of text
//! messages, close payloads and the frame/message size limits. Knows nothing of sockets or of
//! Pusher. The header codec is tungstenite's (`FrameHeader::parse` / `format`); the buffering,
//! unmasking and message assembly are ours so that one encoded server frame can be shared by
//! every recipient.
//!
//! Invariant: `Decoder::decode` either consumes exactly one whole frame from the buffer or
//! consumes nothing (need more bytes, or an error after which the connection is closed).

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// WebSocket close codes ringwire sends for protocol violations (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept (binary for Pusher).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Invalid frame payload data (bad UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Message too big.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

/// Size limits the decoder enforces.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest declared payload of one frame.
    pub frame_bytes_max: usize,
    /// Largest message after reassembly.
    pub message_bytes_max: usize,
}

/// One complete thing a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A whole text message, valid UTF-8.
    Text(Bytes),
    /// A whole binary message.
    Binary(Bytes),
    /// A ping with its payload (to be echoed in a pong).
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame: code and reason if present.
    Close(Option<(u16, String)>),
}

/// A violation that closes the connection with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The close code to send.
    pub code: u16,
    /// A short reason, sent in the close frame.
    pub reason: &'static str,
}

fn violation(code: u16, reason: &'static str) -> FrameError {
    FrameError { code, reason }
}

/// Reassembles client frames into messages. One per connection; holds only the
/// partial message of a fragmented send (empty otherwise).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Opcode and bytes of a fragmented message in progress.
    fragments: Option<(Data, BytesMut)>,
}

impl Decoder {
    /// Decodes at most one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed (nothing consumed) or when a frame was
    /// consumed that did not complete a message (a non-final fragment): call again until it
    /// returns `Ok(None)` with nothing consumed, i.e. check `buf.len()` before and after.
    pub fn decode(&mut self, buf: &mut BytesMut, limits: FrameLimits) -> Result<Option<Incoming>, FrameError> {
        let mut cursor = Cursor::new(&buf[..]);
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            Err(_) => return Err(violation(close_code::PROTOCOL_ERROR, "malformed frame header")),
        };
        let header_len = cursor.position() as usize;
        check_header(&header, length, limits)?;
        let length = length as usize;
        if buf.len() < header_len + length {
            buf.reserve(header_len + length - buf.len());
            return Ok(None);
        }
        buf.advance(header_len);
        let mut payload = buf.split_to(length);
        // RFC 6455 §5.3: the payload is XORed with the 4-byte masking key.
        if let Some(mask) = header.mask {
            unmask(&mut payload, mask);
        }
        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(Some(Incoming::Ping(payload.freeze()))),
            OpCode::Control(Control::Pong) => Ok(Some(Incoming::Pong)),
            OpCode::Control(Control::Close) => parse_close(&payload).map(|c| Some(Incoming::Close(c))),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(violation(close_code::PROTOCOL_ERROR, "reserved opcode"))
            }
            OpCode::Data(Data::Continue) => self.continuation(payload, header.is_final, limits),
            OpCode::Data(kind) => self.data(kind, payload, header.is_final),
        }
    }

    /// Whether a fragmented message is in progress.
    pub fn in_message(&self) -> bool {
        self.fragments.is_some()
    }

    fn data(&mut self, kind: Data, payload: BytesMut, is_final: bool) -> Result<Option<Incoming>, FrameError> {
        // RFC 6455 §5.4: fragments of one message must not be interleaved with another message.
        if self.fragments.is_some() {
            return Err(violation(close_code::PROTOCOL_ERROR, "new message inside a fragmented message"));
        }
        if is_final {
            return complete(kind, payload).map(Some);
        }
        self.fragments = Some((kind, payload));
        Ok(None)
    }

    fn continuation(
        &mut self,
        payload: BytesMut,
        is_final: bool,
        limits: FrameLimits,
    ) -> Result<Option<Incoming>, FrameError> {
        let Some((kind, mut message)) = self.fragments.take() else {
            return Err(violation(close_code::PROTOCOL_ERROR, "continuation without a message"));
        };
        if message.len() + payload.len() > limits.message_bytes_max {
            return Err(violation(close_code::MESSAGE_TOO_BIG, "message too big"));
        }
        message.extend_from_slice(&payload);
        if is_final {
            return complete(kind, message).map(Some);
        }
        self.fragments = Some((kind, message));
        Ok(None)
    }
}

/// Header rules that do not need the payload.
fn check_header(header: &FrameHeader, length: u64, limits: FrameLimits) -> Result<(), FrameError> {
    // RFC 6455 §5.2: RSV bits must be 0 unless an extension was negotiated (none is).
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(violation(close_code::PROTOCOL_ERROR, "reserved bits set"));
    }
    // RFC 6455 §5.1: a client MUST mask every frame; the server MUST close if it does not.
    if header.mask.is_none() {
        return Err(violation(close_code::PROTOCOL_ERROR, "client frames must be masked"));
    }
    if let OpCode::Control(_) = header.opcode {
        // RFC 6455 §5.5: control frames are never fragmented and carry at most 125 bytes.
        if !header.is_final {
            return Err(violation(close_code::PROTOCOL_ERROR, "fragmented control frame"));
        }
        if length > 125 {
            return Err(violation(close_code::PROTOCOL_ERROR, "control frame too long"));
        }
    }
    if length > limits.frame_bytes_max as u64 || length > limits.message_bytes_max as u64 {
        return Err(violation(close_code::MESSAGE_TOO_BIG, "frame too big"));
    }
    Ok(())
}

fn complete(kind: Data, payload: BytesMut) -> Result<Incoming, FrameError> {
    match kind {
        Data::Text => {
            // RFC 6455 §8.1: text messages must be valid UTF-8 once reassembled.
            if std::str::from_utf8(&payload).is_err() {
                return Err(violation(close_code::INVALID_PAYLOAD, "invalid UTF-8 in text message"));
            }
            Ok(Incoming::Text(payload.freeze()))
        }
        _ => Ok(Incoming::Binary(payload.freeze())),
    }
}

/// RFC 6455 §5.5.1: an optional 2-byte code followed by a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, FrameError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(violation(close_code::PROTOCOL_ERROR, "close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            // RFC 6455 §7.4: only codes a peer may send on the wire.
            if !CloseCode::from(code).is_allowed() {
                return Err(violation(close_code::PROTOCOL_ERROR, "invalid close code"));
            }
            match std::str::from_utf8(&payload[2..]) {
                Ok(reason) => Ok(Some((code, reason.to_string()))),
                Err(_) => Err(violation(close_code::INVALID_PAYLOAD, "invalid UTF-8 in close reason")),
            }
        }
    }
}

/// XORs `payload` with the masking key, a word at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

/// Encodes one unmasked, final server frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader { is_final: true, opcode, ..FrameHeader::default() };
    let length = payload.len() as u64;
    let mut out = Vec::with_capacity(header.len(length) + payload.len());
    header.format(length, &mut out).expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Encodes a text frame.
pub fn encode_text(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Text), payload)
}

/// Encodes a close frame with a code and a reason (truncated to fit 125 bytes on a char boundary).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// Encodes a pong echoing a ping's payload.
pub fn encode_pong(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), payload)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits { frame_bytes_max: 1024, message_bytes_max: 2048 };

    /// Builds a masked client frame, as a browser would send it.
    pub(crate) fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first_byte];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn check(input: &[u8], expected: Result<Vec<Incoming>, FrameError>) {
        let mut buf = BytesMut::from(input);
        let mut decoder = Decoder::default();
        let mut got = Vec::new();
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf, LIMITS) {
                Ok(Some(message)) => got.push(message),
                Ok(None) if buf.len() == before => break,
                Ok(None) => {}
                Err(e) => {
                    assert_eq!(Err(e), expected);
                    return;
                }
            }
        }
        assert_eq!(Ok(got), expected);
    }

    /// A masked text frame decodes to its text; RFC 6455 §5.7 "Hello" example.
    #[test]
    fn masked_hello() {
        let rfc = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        check(&rfc, Ok(vec![Incoming::Text(Bytes::from_static(b"Hello"))]));
    }

    /// Fragments reassemble, with a ping allowed in between (RFC 6455 §5.4).
    #[test]
    fn fragments_and_interleaved_ping() {
        let mut input = client_frame(0x01, b"Hel");
        input.extend(client_frame(0x89, b"p"));
        input.extend(client_frame(0x80, b"lo"));
        check(&input, Ok(vec![Incoming::Ping(Bytes::from_static(b"p")), Incoming::Text(Bytes::from_static(b"Hello"))]));
    }

    /// Partial input is not consumed.
    #[test]
    fn partial_frame_needs_more() {
        let frame = client_frame(0x81, b"Hello");
        for cut in 0..frame.len() {
            check(&frame[..cut], Ok(vec![]));
        }
    }

    /// Every violation maps to its close code.
    #[test]
    fn violations() {
        let unmasked = [0x81, 0x01, b'a'];
        check(&unmasked, Err(violation(1002, "client frames must be masked")));
        check(&client_frame(0xC1, b"a"), Err(violation(1002, "reserved bits set")));
        check(&client_frame(0x83, b"a"), Err(violation(1002, "malformed frame header")));
        check(&client_frame(0x09, b"a"), Err(violation(1002, "fragmented control frame")));
        check(&client_frame(0x89, &[0; 126]), Err(violation(1002, "control frame too long")));
        check(&client_frame(0x80, b"a"), Err(violation(1002, "continuation without a message")));
        check(&client_frame(0x81, &[0xff, 0xfe]), Err(violation(1007, "invalid UTF-8 in text message")));
        check(&client_frame(0x81, &[b'a'; 1025]), Err(violation(1009, "frame too big")));
        check(&client_frame(0x88, &[3]), Err(violation(1002, "close payload of one byte")));
        check(&client_frame(0x88, &[0x03, 0xed]), Err(violation(1002, "invalid close code")));
        let mut two = client_frame(0x01, b"a");
        two.extend(client_frame(0x81, b"b"));
        check(&two, Err(violation(1002, "new message inside a fragmented message")));
        let mut big = Vec::new();
        big.extend(client_frame(0x01, &[b'a'; 1000]));
        big.extend(client_frame(0x00, &[b'a'; 1000]));
        big.extend(client_frame(0x80, &[b'a'; 100]));
        check(&big, Err(violation(1009, "message too big")));
    }

    /// A declared 2^63-byte frame is refused from its header alone, before any allocation.
    #[test]
    fn frame_bomb_refused_from_header() {
        let mut bomb = vec![0x82, 0x80 | 127];
        bomb.extend_from_slice(&(1u64 << 62).to_be_bytes());
        bomb.extend_from_slice(&[1, 2, 3, 4]);
        check(&bomb, Err(violation(1009, "frame too big")));
    }

    /// Close frames carry code and reason.
    #[test]
    fn close_payload() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        check(&client_frame(0x88, &payload), Ok(vec![Incoming::Close(Some((1000, "bye".into())))]));
        check(&client_frame(0x88, b""), Ok(vec![Incoming::Close(None)]));
    }

    /// Server frames are unmasked with the right length encoding.
    #[test]
    fn encoders() {
        assert_eq!(&encode_text(b"hi")[..], &[0x81, 0x02, b'h', b'i']);
        let long = encode_text(&[b'x'; 300]);
        assert_eq!(&long[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(&encode_close(4100, "slow")[..], &[0x88, 0x06, 0x10, 0x04, b's', b'l', b'o', b'w']);
        assert_eq!(encode_close(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
    }

    /// Unmasking is an involution and matches the byte-wise definition.
    #[test]
    fn unmask_matches_definition() {
        let mask = [1, 2, 3, 4];
        let original: Vec<u8> = (0..=255).collect();
        let mut data = original.clone();
        unmask(&mut data, mask);
        let expected: Vec<u8> = original.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        assert_eq!(data, expected);
    }
}
