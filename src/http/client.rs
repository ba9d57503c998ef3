//! Outbound HTTP/1.1 for webhooks: a sans-IO response parser and one keep-alive connection
//! that sends a batch of requests with one `writev` and reads their responses in order.
//!
//! Owns no policy: the caller vets the address (`webhook::target`), builds the request heads
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

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::net::batch::FrameBatch;

/// Response headers parsed at most.
const RESPONSE_HEADERS_MAX: usize = 64;
/// Bytes of a response head at most.
const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;
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
    /// The head passed its limit.
    #[error("response head over {RESPONSE_HEAD_BYTES_MAX} bytes")]
    HeadTooLarge,
}

/// Parses the response at the start of `buf`. `Ok(None)`: need more bytes. `eof`: the peer
/// closed (ends a body delimited by the close). Returns the response and the bytes it used.
pub fn parse_response(buf: &[u8], eof: bool, body_max: usize) -> Result<Option<(Response, usize)>, ResponseError> {
    let mut offset = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&buf[offset..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() - offset > RESPONSE_HEAD_BYTES_MAX => {
                return Err(ResponseError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(ResponseError::Malformed(e.to_string())),
        };
        let status = response.code.expect("complete response has a code");
        // RFC 9110 §15: a status code is three digits, 100..=599 in use; httparse takes "000".
        if !(100..600).contains(&status) {
            return Err(ResponseError::Malformed(format!("status code {status}")));
        }
        if (100..200).contains(&status) && status != 101 {
            // RFC 9110 §15.2: interim responses precede the final one.
            offset += head_len;
            continue;
        }
        let mut close = response.version == Some(0);
        let mut length = None;
        let mut chunked = false;
        let mut retry_after = None;
        for header in response.headers.iter() {
            let value = std::str::from_utf8(header.value).unwrap_or("").trim();
            if header.name.eq_ignore_ascii_case("content-length") {
                let parsed =
                    value.parse::<usize>().map_err(|_| ResponseError::Malformed("bad content-length".into()))?;
                if length.is_some_and(|l| l != parsed) {
                    return Err(ResponseError::Malformed("conflicting content-length".into()));
                }
                length = Some(parsed);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().split(',').any(|c| c.trim() == "chunked");
            } else if header.name.eq_ignore_ascii_case("connection") {
                close |= value.to_ascii_lowercase().split(',').any(|c| c.trim() == "close");
            } else if header.name.eq_ignore_ascii_case("retry-after") {
                retry_after = parse_retry_after(value);
            }
        }
        let body_start = offset + head_len;
        let rest = &buf[body_start..];
        let no_body = status == 204 || status == 304;
        let (body, used, truncated) = if no_body {
            (&rest[..0], 0, false)
        } else if chunked {
            match read_chunked(rest, body_max)? {
                Some(found) => found,
                None => return Ok(None),
            }
        } else if let Some(length) = length {
            if length > body_max {
                // Not worth reading: answer now and drop the connection.
                (&rest[..0], 0, true)
            } else if rest.len() < length {
                return Ok(None);
            } else {
                (&rest[..length], length, false)
            }
        } else if eof || rest.len() > body_max {
            // Delimited by the close (RFC 9112 §6.3 rule 8).
            let end = rest.len().min(body_max);
            (&rest[..end], rest.len(), true)
        } else {
            return Ok(None);
        };
        close |= truncated;
        let excerpt = Bytes::copy_from_slice(&body[..body.len().min(EXCERPT_BYTES_MAX)]);
        return Ok(Some((Response { status, retry_after, close, excerpt }, body_start + used)));
    }
}

/// A chunked body: (body prefix, bytes used, truncated) or need more.
#[allow(clippy::type_complexity)]
fn read_chunked(buf: &[u8], body_max: usize) -> Result<Option<(&[u8], usize, bool)>, ResponseError> {
    let mut at = 0;
    let mut total: usize = 0;
    let mut first: &[u8] = &[];
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&buf[at..]) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ResponseError::Malformed("bad chunk size".into())),
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        total = total.saturating_add(size);
        if total > body_max {
            return Ok(Some((first, at, true)));
        }
        at += size_len;
        if size == 0 {
            // Trailers (if any) end with an empty line; accept only the common empty case.
            return match buf.get(at..at + 2) {
                Some(b"\r\n") => Ok(Some((first, at + 2, false))),
                Some(_) => Err(ResponseError::Malformed("chunk trailers are not supported".into())),
                None => Ok(None),
            };
        }
        let Some(data) = buf.get(at..at + size) else { return Ok(None) };
        if first.is_empty() {
            first = data;
        }
        match buf.get(at + size..at + size + 2) {
            Some(b"\r\n") => at += size + 2,
            Some(_) => return Err(ResponseError::Malformed("chunk without CRLF".into())),
            None => return Ok(None),
        }
    }
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
        let mut eof = false;
        while responses.len() < count {
            match parse_response(&self.buffer, eof, body_max) {
                Ok(Some((response, used))) => {
                    let _ = self.buffer.split_to(used.min(self.buffer.len()));
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
            self.buffer.reserve(4096);
            let buffer = std::mem::take(&mut self.buffer);
            let read = async {
                match &mut self.stream {
                    Stream::Plain(stream) => stream.read(buffer).await,
                    Stream::Tls(stream) => stream.read(buffer).await,
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

    fn check(input: &str, eof: bool, expected: Option<(u16, bool, &str, usize)>) {
        let got = parse_response(input.as_bytes(), eof, 64).expect("parses");
        let got = got.map(|(r, used)| (r.status, r.close, String::from_utf8(r.excerpt.to_vec()).unwrap(), used));
        assert_eq!(got, expected.map(|(s, c, b, u)| (s, c, b.to_string(), u)), "{input:?}");
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
}
