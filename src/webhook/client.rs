//! Outbound HTTP/1.1 for webhooks: a sans-IO response parser and one keep-alive connection
//! that sends a batch of requests with one `writev` and reads their responses in order.
//!
//! Owns no policy: the caller vets the address (`super::target`), builds the request heads
//! and decides what a response means. Redirects are never followed (a 3xx is just a status);
//! response bodies are read up to a cap and only kept as a short excerpt.
//!
//! `https://` goes through rustls (ring provider, TLS 1.2+, certificates verified against the
//! Mozilla roots of `webpki-roots` plus an optional CA file). monoio-rustls's writev writes only
//! its first buffer, so a TLS batch is copied into one buffer first (TLS encrypts per
//! connection anyway; the shared-bytes saving is a plaintext one).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::buf::{read_more, FrameBatch};

/// Response headers parsed at most.
const RESPONSE_HEADERS_MAX: usize = 64;
/// Bytes of a response's heads at most: its interim (1xx) heads, its final head and its chunk
/// trailers all count against this one budget.
const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Interim (1xx) responses before the final one at most.
const INTERIM_RESPONSES_MAX: usize = 8;
/// Bytes of one chunk-size line (the size in hex and any extensions) at most.
const CHUNK_LINE_BYTES_MAX: usize = 1024;
/// Spare room offered to each read of a response.
const READ_BYTES: usize = 4096;
/// Bytes of a response body kept for the attempt log.
pub const EXCERPT_BYTES_MAX: usize = 256;

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Retry-After`, in seconds or as an HTTP date (already turned into a delay).
    pub retry_after: Option<Duration>,
    /// The connection cannot carry another request (`Connection: close`, HTTP/1.0, or a
    /// body that was not read to its end because it passed the cap).
    pub close: bool,
    /// The first bytes of the body.
    pub excerpt: Bytes,
}

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not HTTP/1.x, or a malformed head or chunk.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The heads (interim heads and trailers included) passed their limit.
    #[error("response head over {RESPONSE_HEAD_BYTES_MAX} bytes")]
    HeadTooLarge,
}

/// Reads responses from a connection's bytes as they arrive, consuming what it has understood
/// from the front of the buffer, so that every byte is examined a bounded number of times
/// whatever the read sizes and the buffer holds at most one head: body bytes are counted and
/// dropped (all but an excerpt) as they come.
///
/// Invariant: between calls, the buffer starts where the parse state says (at a head, or
/// inside the body at the position `state` describes).
#[derive(Debug)]
pub struct ResponseReader {
    /// Body bytes read at most; a longer body ends the response early (and the connection).
    body_max: usize,
    state: ReadState,
    /// Head bytes this response has used so far (interim heads, the final head, trailers).
    head_bytes: usize,
    /// Interim responses skipped so far.
    interim: usize,
    /// Where the search for the end of the current head resumes (bytes already searched).
    head_scanned: usize,
    /// The final response's fields, once its head is parsed.
    response: Option<PartialResponse>,
}

#[derive(Debug)]
struct PartialResponse {
    status: u16,
    retry_after: Option<Duration>,
    close: bool,
    excerpt: BytesMut,
    /// Body bytes seen so far.
    body_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Waiting for a complete head.
    Head,
    /// `Content-Length` body: bytes still to come.
    Length { remaining: usize },
    /// Reading a chunk-size line.
    ChunkSize,
    /// Inside a chunk: its bytes still to come.
    ChunkData { remaining: usize },
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk.
    Trailers,
    /// A body delimited by the connection's close (RFC 9112 §6.3 rule 8).
    UntilClose,
}

impl ResponseReader {
    /// A reader for responses whose bodies are read up to `body_max` bytes.
    pub fn new(body_max: usize) -> ResponseReader {
        ResponseReader { body_max, state: ReadState::Head, head_bytes: 0, interim: 0, head_scanned: 0, response: None }
    }

    /// Consumes what it can of `buffer`. `Ok(None)`: need more bytes (or, with `eof`, the
    /// peer closed before the response was complete). `Some`: one complete response; the
    /// bytes after it are left in `buffer` and the reader is ready for the next one.
    pub fn read(&mut self, buffer: &mut BytesMut, eof: bool) -> Result<Option<Response>, ResponseError> {
        loop {
            let progressed = match self.state {
                ReadState::Head => self.read_head(buffer)?,
                ReadState::Length { remaining } => {
                    let n = remaining.min(buffer.len());
                    self.take_body(buffer, n);
                    self.state = ReadState::Length { remaining: remaining - n };
                    if remaining == n {
                        return Ok(Some(self.finish(false)));
                    }
                    false
                }
                ReadState::ChunkSize => self.read_chunk_size(buffer)?,
                ReadState::ChunkData { remaining } => {
                    let n = remaining.min(buffer.len());
                    self.take_body(buffer, n);
                    self.state = if remaining == n {
                        ReadState::ChunkEnd
                    } else {
                        ReadState::ChunkData { remaining: remaining - n }
                    };
                    n > 0
                }
                ReadState::ChunkEnd => match buffer.get(..2) {
                    Some(b"\r\n") => {
                        buffer.advance(2);
                        self.state = ReadState::ChunkSize;
                        true
                    }
                    Some(_) => return Err(ResponseError::Malformed("chunk without CRLF".into())),
                    None => false,
                },
                ReadState::Trailers => match self.read_trailer_line(buffer)? {
                    Some(true) => return Ok(Some(self.finish(false))),
                    Some(false) => true,
                    None => false,
                },
                ReadState::UntilClose => {
                    let n = buffer.len();
                    self.take_body(buffer, n);
                    if eof {
                        return Ok(Some(self.finish(true)));
                    }
                    false
                }
            };
            if self.response.as_ref().is_some_and(|r| r.body_bytes > self.body_max) {
                // Not worth reading further: answer now and drop the connection.
                return Ok(Some(self.finish(true)));
            }
            if !progressed {
                return Ok(None);
            }
        }
    }

    /// Parses a head once its end has arrived; skips interim responses. Returns whether it
    /// consumed anything.
    fn read_head(&mut self, buffer: &mut BytesMut) -> Result<bool, ResponseError> {
        // Garbage is refused at once rather than after a timeout.
        let version = &buffer[..buffer.len().min(7)];
        if version != &b"HTTP/1."[..version.len()] {
            return Err(ResponseError::Malformed("invalid HTTP version".into()));
        }
        let Some(end) = self.find_head_end(buffer) else {
            if self.head_bytes + buffer.len() > RESPONSE_HEAD_BYTES_MAX {
                return Err(ResponseError::HeadTooLarge);
            }
            return Ok(false);
        };
        self.head_scanned = 0;
        self.head_bytes += end;
        if self.head_bytes > RESPONSE_HEAD_BYTES_MAX {
            return Err(ResponseError::HeadTooLarge);
        }
        let head = parse_head(&buffer[..end])?;
        buffer.advance(end);
        if (100..200).contains(&head.status) && head.status != 101 {
            // RFC 9110 §15.2: interim responses precede the final one; they are consumed
            // and counted, never kept.
            self.interim += 1;
            if self.interim > INTERIM_RESPONSES_MAX {
                return Err(ResponseError::Malformed(format!("more than {INTERIM_RESPONSES_MAX} interim responses")));
            }
            return Ok(true);
        }
        let mut response = PartialResponse {
            status: head.status,
            retry_after: head.retry_after,
            close: head.close,
            excerpt: BytesMut::new(),
            body_bytes: 0,
        };
        self.state = match head.body {
            // RFC 9110 §6.4.1: 1xx, 204 and 304 responses have no content; a 101 would
            // switch protocols, which no webhook request asked for: the connection ends.
            _ if head.status == 204 || head.status == 304 => ReadState::Length { remaining: 0 },
            _ if head.status == 101 => {
                response.close = true;
                ReadState::Length { remaining: 0 }
            }
            BodyFraming::Chunked => ReadState::ChunkSize,
            BodyFraming::Length(length) if length > self.body_max => {
                // Announced over the cap: answer without reading it.
                response.close = true;
                response.body_bytes = length;
                ReadState::Length { remaining: 0 }
            }
            BodyFraming::Length(length) => ReadState::Length { remaining: length },
            BodyFraming::UntilClose => {
                response.close = true;
                ReadState::UntilClose
            }
        };
        self.response = Some(response);
        Ok(true)
    }

    /// The length of the head at the front of `buffer` (through its empty line), searching
    /// only bytes not searched before.
    fn find_head_end(&mut self, buffer: &[u8]) -> Option<usize> {
        let mut from = self.head_scanned;
        while let Some(offset) = buffer[from..].iter().position(|&b| b == b'\n') {
            let at = from + offset;
            match (buffer.get(at + 1), buffer.get(at + 2)) {
                (Some(b'\n'), _) => return Some(at + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(at + 3),
                // The line ending may continue in the next read: look here again then.
                (None, _) | (Some(b'\r'), None) => {
                    self.head_scanned = at;
                    return None;
                }
                _ => from = at + 1,
            }
        }
        self.head_scanned = buffer.len();
        None
    }

    /// A chunk-size line (RFC 9112 §7.1: `size [; extensions] CRLF`), bounded in length.
    fn read_chunk_size(&mut self, buffer: &mut BytesMut) -> Result<bool, ResponseError> {
        let window = &buffer[..buffer.len().min(CHUNK_LINE_BYTES_MAX)];
        let Some(newline) = window.iter().position(|&b| b == b'\n') else {
            if buffer.len() >= CHUNK_LINE_BYTES_MAX {
                return Err(ResponseError::Malformed(format!("chunk-size line over {CHUNK_LINE_BYTES_MAX} bytes")));
            }
            return Ok(false);
        };
        let (used, size) = match httparse::parse_chunk_size(&buffer[..=newline]) {
            Ok(httparse::Status::Complete(found)) => found,
            _ => return Err(ResponseError::Malformed("bad chunk size".into())),
        };
        buffer.advance(used);
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        self.state = if size == 0 { ReadState::Trailers } else { ReadState::ChunkData { remaining: size } };
        if let Some(response) = &mut self.response {
            // A chunk announced past the cap ends the response now.
            if size > self.body_max - response.body_bytes.min(self.body_max) {
                response.body_bytes = response.body_bytes.saturating_add(size);
            }
        }
        Ok(true)
    }

    /// One trailer line (RFC 9112 §7.1.2), counted against the head budget and dropped.
    /// `Some(true)`: the empty line that ends the message.
    fn read_trailer_line(&mut self, buffer: &mut BytesMut) -> Result<Option<bool>, ResponseError> {
        let budget = RESPONSE_HEAD_BYTES_MAX.saturating_sub(self.head_bytes);
        let window = &buffer[..buffer.len().min(budget)];
        let Some(newline) = window.iter().position(|&b| b == b'\n') else {
            if buffer.len() >= budget {
                return Err(ResponseError::HeadTooLarge);
            }
            return Ok(None);
        };
        let line = &buffer[..newline];
        let last = line.is_empty() || line == b"\r";
        self.head_bytes += newline + 1;
        buffer.advance(newline + 1);
        Ok(Some(last))
    }

    /// Counts `n` body bytes from the front of `buffer`, keeping the excerpt's share.
    fn take_body(&mut self, buffer: &mut BytesMut, n: usize) {
        let response = self.response.as_mut().expect("a body follows a final head");
        let keep = n.min(EXCERPT_BYTES_MAX - response.excerpt.len());
        response.excerpt.extend_from_slice(&buffer[..keep]);
        response.body_bytes = response.body_bytes.saturating_add(n);
        buffer.advance(n);
    }

    /// The finished response; the reader starts over.
    fn finish(&mut self, close: bool) -> Response {
        let response = self.response.take().expect("finished after a final head");
        *self = ResponseReader::new(self.body_max);
        Response {
            status: response.status,
            retry_after: response.retry_after,
            close: response.close || close,
            excerpt: response.excerpt.freeze(),
        }
    }
}

/// How a response's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    Chunked,
    Length(usize),
    UntilClose,
}

/// What a final or interim head says.
struct Head {
    status: u16,
    retry_after: Option<Duration>,
    close: bool,
    body: BodyFraming,
}

/// Parses one complete head (through its empty line).
fn parse_head(bytes: &[u8]) -> Result<Head, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(ResponseError::Malformed("incomplete head".into())),
        Err(e) => return Err(ResponseError::Malformed(e.to_string())),
    }
    let status = response.code.expect("complete response has a code");
    // RFC 9110 §15: a status code is three digits, 100..=599 in use; httparse takes "000".
    if !(100..600).contains(&status) {
        return Err(ResponseError::Malformed(format!("status code {status}")));
    }
    let mut close = response.version == Some(0);
    let mut length = None;
    let mut transfer_coding = None;
    let mut retry_after = None;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = value.parse::<usize>().map_err(|_| ResponseError::Malformed("bad content-length".into()))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(ResponseError::Malformed("conflicting content-length".into()));
            }
            length = Some(parsed);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // RFC 9112 §6.3 rule 4: chunked counts only as the final coding.
            let last = value.rsplit(',').next().unwrap_or("").trim();
            transfer_coding = Some(last.eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|c| c.trim().eq_ignore_ascii_case("close"));
        } else if header.name.eq_ignore_ascii_case("retry-after") {
            retry_after = parse_retry_after(value);
        }
    }
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; a coding other than chunked
    // last is delimited by the close.
    let body = match (transfer_coding, length) {
        (Some(true), _) => BodyFraming::Chunked,
        (Some(false), _) => BodyFraming::UntilClose,
        (None, Some(length)) => BodyFraming::Length(length),
        (None, None) => BodyFraming::UntilClose,
    };
    Ok(Head { status, retry_after, close, body })
}

/// Parses the response at the start of `buf` in one go (the reader over a copy). `Ok(None)`:
/// need more bytes. `eof`: the peer closed (ends a body delimited by the close). Returns the
/// response and the bytes it used.
pub fn parse_response(buf: &[u8], eof: bool, body_max: usize) -> Result<Option<(Response, usize)>, ResponseError> {
    let mut buffer = BytesMut::from(buf);
    let response = ResponseReader::new(body_max).read(&mut buffer, eof)?;
    Ok(response.map(|r| (r, buf.len() - buffer.len())))
}

/// `Retry-After: <seconds>` or `Retry-After: <HTTP-date>` as a delay from now.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Why a request on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Connecting failed or timed out.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The request or response did not complete in time.
    #[error("timed out")]
    Timeout,
    /// The connection broke.
    #[error("connection error: {0}")]
    Io(String),
    /// The response was not valid HTTP.
    #[error("{0}")]
    Response(#[from] ResponseError),
}

/// The TLS client settings every `https://` endpoint uses: the `webpki-roots` CA set plus the
/// certificates of `ca_file` (PEM), if given.
pub fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        for certificate in certificates {
            roots.add(certificate).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connection's byte stream.
enum Stream {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

/// One keep-alive connection to an endpoint.
pub struct Connection {
    stream: Stream,
    buffer: BytesMut,
}

impl Connection {
    /// Connects to a vetted address within `timeout`; with `tls`, then completes a TLS
    /// handshake for `host` (certificate verified) within the same timeout.
    pub async fn connect(
        address: SocketAddr,
        tls: Option<(&TlsConnector, &str)>,
        timeout: Duration,
    ) -> Result<Connection, SendError> {
        let stream = match monoio::time::timeout(timeout, TcpStream::connect_addr(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
            Err(_) => return Err(SendError::Connect(format!("no connection within {} ms", timeout.as_millis()))),
        };
        // Without it small TLS flights meet delayed ACKs (runtime notes §4).
        let _ = stream.set_nodelay(true);
        let stream = match tls {
            None => Stream::Plain(stream),
            Some((connector, host)) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| SendError::Connect(format!("{host} is not a valid TLS server name: {e}")))?;
                match monoio::time::timeout(timeout, connector.connect(name, stream)).await {
                    Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                    Ok(Err(e)) => return Err(SendError::Connect(format!("TLS handshake failed: {e}"))),
                    Err(_) => return Err(SendError::Connect("TLS handshake timed out".into())),
                }
            }
        };
        Ok(Connection { stream, buffer: BytesMut::with_capacity(4096) })
    }

    /// Writes `parts` (heads and bodies of one or more requests) with one writev, then reads
    /// `count` responses in order. A response saying `close` ends the batch early: the
    /// requests after it were not answered (the caller retries them).
    pub async fn exchange(
        &mut self,
        parts: Vec<Bytes>,
        count: usize,
        body_max: usize,
        deadline: monoio::time::Instant,
    ) -> (Vec<Response>, Option<SendError>) {
        let mut responses = Vec::with_capacity(count);
        if let Err(error) = self.write_all(parts, deadline).await {
            return (responses, Some(error));
        }
        let mut reader = ResponseReader::new(body_max);
        let mut eof = false;
        while responses.len() < count {
            match reader.read(&mut self.buffer, eof) {
                Ok(Some(response)) => {
                    let close = response.close;
                    responses.push(response);
                    if close {
                        break;
                    }
                    continue;
                }
                Ok(None) if eof => {
                    return (responses, Some(SendError::Io("connection closed before the response".into())))
                }
                Ok(None) => {}
                Err(e) => return (responses, Some(e.into())),
            }
            // Appending (a head can arrive in several reads).
            let buffer = std::mem::take(&mut self.buffer);
            let read = async {
                match &mut self.stream {
                    Stream::Plain(stream) => read_more(stream, buffer, READ_BYTES).await,
                    Stream::Tls(stream) => read_more(stream.as_mut(), buffer, READ_BYTES).await,
                }
            };
            match monoio::time::timeout_at(deadline, read).await {
                Ok((Ok(n), buffer)) => {
                    self.buffer = buffer;
                    eof = n == 0;
                }
                Ok((Err(e), _)) => return (responses, Some(SendError::Io(e.to_string()))),
                Err(_) => return (responses, Some(SendError::Timeout)),
            }
        }
        (responses, None)
    }
}

impl Connection {
    /// Writes every part, with as few writev calls as the socket allows.
    async fn write_all(&mut self, parts: Vec<Bytes>, deadline: monoio::time::Instant) -> Result<(), SendError> {
        let stream = match &mut self.stream {
            Stream::Plain(stream) => stream,
            Stream::Tls(stream) => {
                let joined: Vec<u8> = parts.concat();
                return match monoio::time::timeout_at(deadline, stream.write_all(joined)).await {
                    Ok((Ok(_), _)) => Ok(()),
                    Ok((Err(e), _)) => Err(SendError::Io(e.to_string())),
                    Err(_) => Err(SendError::Timeout),
                };
            }
        };
        let mut batch = FrameBatch::new(parts);
        while !batch.is_done() {
            // The batch owns its buffers, so dropping the write at the deadline is sound.
            let (result, returned) = match monoio::time::timeout_at(deadline, stream.writev(batch)).await {
                Ok(done) => done,
                Err(_) => return Err(SendError::Timeout),
            };
            batch = returned;
            match result {
                Ok(0) => return Err(SendError::Io("connection closed while writing".into())),
                Ok(n) => batch.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SendError::Io(e.to_string())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` whole, then again fed one byte at a time to one reader (as if every
    /// byte came in its own read): both must give `expected` (status, close, excerpt, bytes
    /// used).
    fn check(input: &str, eof: bool, expected: Option<(u16, bool, &str, usize)>) {
        let expected = expected.map(|(s, c, b, u)| (s, c, b.to_string(), u));
        let got = parse_response(input.as_bytes(), eof, 64).expect("parses");
        let got = got.map(|(r, used)| (r.status, r.close, String::from_utf8(r.excerpt.to_vec()).unwrap(), used));
        assert_eq!(got, expected, "{input:?}");
        let mut reader = ResponseReader::new(64);
        let mut buffer = BytesMut::new();
        let mut found = None;
        for (i, &byte) in input.as_bytes().iter().enumerate() {
            buffer.extend_from_slice(&[byte]);
            let last = i + 1 == input.len();
            if let Some(r) = reader.read(&mut buffer, eof && last).expect("parses in pieces") {
                let used = i + 1 - buffer.len();
                found = Some((r.status, r.close, String::from_utf8(r.excerpt.to_vec()).unwrap(), used));
                break;
            }
        }
        assert_eq!(found, expected, "{input:?} byte by byte");
    }

    /// Lengths, chunks, close-delimited bodies, interim responses, "need more".
    #[test]
    fn responses_parse() {
        check("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", false, Some((200, false, "ok", 40)));
        check("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no", false, None);
        check("HTTP/1.1 204 No Content\r\n\r\n", false, Some((204, false, "", 27)));
        check(
            "HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
            Some((500, false, "abc", 62)),
        );
        check("HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", false, None);
        check("HTTP/1.0 200 OK\r\n\r\nbody", false, None);
        check("HTTP/1.0 200 OK\r\n\r\nbody", true, Some((200, true, "body", 23)));
        check(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 410 Gone\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
            Some((410, true, "", 84)),
        );
        // Over the cap: answered at once, connection dropped.
        check("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false, Some((200, true, "", 41)));
    }

    /// Retry-After in seconds or as a date; garbage is refused.
    #[test]
    fn retry_after_and_errors() {
        let (r, _) = parse_response(b"HTTP/1.1 429 Slow\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n", false, 64)
            .unwrap()
            .unwrap();
        assert_eq!(r.retry_after, Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(100));
        let text = format!("HTTP/1.1 503 Busy\r\nRetry-After: {date}\r\nContent-Length: 0\r\n\r\n");
        let (r, _) = parse_response(text.as_bytes(), false, 64).unwrap().unwrap();
        assert!(r.retry_after.unwrap() > Duration::from_secs(95));
        assert!(parse_response(b"SMTP 220 hello\r\n\r\n", false, 64).is_err());
        // Found by the http_response fuzz target: httparse accepts a status of 000.
        assert!(parse_response(b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nok", false, 64).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false, 64).is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", false, 64).is_err()
        );
        assert_eq!(
            parse_response(&[b'a'; 100], false, 64).unwrap_err(),
            ResponseError::Malformed("invalid HTTP version".into())
        );
    }

    /// Interim responses are consumed as they come and bounded in number and in head bytes;
    /// chunk-size lines (extensions included) are bounded; bodies never accumulate in the
    /// buffer, however they are split.
    #[test]
    fn hostile_responses_are_bounded() {
        let continues = "HTTP/1.1 100 Continue\r\n\r\n".repeat(INTERIM_RESPONSES_MAX + 1);
        let mut reader = ResponseReader::new(64);
        let mut buffer = BytesMut::from(continues.as_bytes());
        assert!(matches!(reader.read(&mut buffer, false), Err(ResponseError::Malformed(_))));

        // Interim heads share the final head's budget.
        let fat = format!("HTTP/1.1 103 Early Hints\r\nLink: {}\r\n\r\n", "a".repeat(RESPONSE_HEAD_BYTES_MAX / 3));
        let mut reader = ResponseReader::new(64);
        let mut buffer = BytesMut::new();
        let mut outcome = Ok(None);
        for _ in 0..4 {
            buffer.extend_from_slice(fat.as_bytes());
            outcome = reader.read(&mut buffer, false);
            if outcome.is_err() {
                break;
            }
            assert!(buffer.is_empty(), "an interim head is consumed at once");
        }
        assert_eq!(outcome, Err(ResponseError::HeadTooLarge));

        // A chunk extension that never ends is refused once it passes the line limit.
        let mut reader = ResponseReader::new(64);
        let mut buffer = BytesMut::from(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;"[..]);
        let mut outcome = Ok(None);
        for _ in 0..CHUNK_LINE_BYTES_MAX {
            buffer.extend_from_slice(b"a");
            outcome = reader.read(&mut buffer, false);
            if outcome.is_err() {
                break;
            }
        }
        assert!(matches!(outcome, Err(ResponseError::Malformed(m)) if m.contains("chunk-size line")));
        assert!(buffer.len() <= CHUNK_LINE_BYTES_MAX);

        // Endless trailers are bounded by the head budget.
        let mut reader = ResponseReader::new(64);
        let mut buffer = BytesMut::from(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"[..]);
        let mut outcome = Ok(None);
        for _ in 0..RESPONSE_HEAD_BYTES_MAX {
            buffer.extend_from_slice(b"X-T: y\r\n");
            outcome = reader.read(&mut buffer, false);
            if outcome.is_err() {
                break;
            }
        }
        assert_eq!(outcome, Err(ResponseError::HeadTooLarge));
    }

    /// A body within the cap, in small reads, leaves nothing behind in the buffer; a body
    /// past the cap ends the response (and the connection) as soon as the cap is passed.
    #[test]
    fn bodies_are_consumed_as_they_arrive() {
        for head in ["HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n", "HTTP/1.1 200 OK\r\n\r\n"] {
            let mut reader = ResponseReader::new(65_536);
            let mut buffer = BytesMut::from(head.as_bytes());
            assert_eq!(reader.read(&mut buffer, false), Ok(None));
            for _ in 0..(60_000 / 100) {
                buffer.extend_from_slice(&[b'x'; 100]);
                let outcome = reader.read(&mut buffer, false).unwrap();
                assert!(buffer.is_empty());
                if outcome.is_some() {
                    break;
                }
            }
        }
        let mut reader = ResponseReader::new(1_000);
        let mut buffer = BytesMut::from(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..]);
        let mut outcome = None;
        for _ in 0..100 {
            buffer.extend_from_slice(b"64\r\n");
            buffer.extend_from_slice(&[b'y'; 100]);
            buffer.extend_from_slice(b"\r\n");
            outcome = reader.read(&mut buffer, false).unwrap();
            if outcome.is_some() {
                break;
            }
        }
        let response = outcome.expect("answered once past the cap");
        assert!(response.close && response.excerpt.len() == EXCERPT_BYTES_MAX);
    }
}
