//! Sans-IO HTTP/1.1 request heads (httparse) and response heads.
//!
//! Owns request-head limits and framing: request-line length (414), header bytes and count
//! (431), Content-Length (413 over the body limit, 400 when malformed); no chunked request
//! bodies (400 with a reason: every Pusher SDK sends Content-Length). Knows nothing of routes.
//!
//! Invariant: `parse_head` and `HeadReader` never consume input; they return the head length
//! so the caller splits it off. `HeadReader` examines each byte of a head once however it is
//! split across reads, and gives the answer `parse_head` gives for the whole buffer.

use http::{Method, StatusCode};

/// Limits on one request head and body.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Longest request line.
    pub request_line_bytes_max: usize,
    /// All header bytes, request line included.
    pub header_bytes_max: usize,
    /// Number of headers.
    pub headers_count_max: usize,
    /// Body bytes.
    pub body_bytes_max: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        let http = crate::config::HttpConfig::default();
        HeadLimits::from(&http)
    }
}

impl From<&crate::config::HttpConfig> for HeadLimits {
    fn from(http: &crate::config::HttpConfig) -> Self {
        HeadLimits {
            request_line_bytes_max: http.request_line_bytes_max,
            header_bytes_max: http.header_bytes_max,
            headers_count_max: http.headers_count_max,
            body_bytes_max: http.body_bytes_max,
        }
    }
}

/// A parsed request head, owning its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The path, as sent (not percent-decoded): signatures are computed over it.
    pub path: String,
    /// The raw query string after `?`, empty when absent.
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body length from Content-Length (0 when absent).
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
}

impl RequestHead {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// A request that is answered with an error status and then closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// Status code.
    pub status: StatusCode,
    /// Reason for the JSON body.
    pub reason: String,
}

impl HttpError {
    /// An error with a status and reason.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> HttpError {
        HttpError { status, reason: reason.into() }
    }
}

/// Parses a request head from the front of `buf`. `Ok(None)`: need more bytes.
pub fn parse_head(buf: &[u8], limits: &HeadLimits) -> Result<Option<RequestHead>, HttpError> {
    HeadReader::default().poll(buf, limits)
}

/// Reads one request head as its bytes arrive: each byte is examined once, the request-line
/// and header-size limits are enforced before the head is complete, and the full parser runs
/// only once the blank line that ends the head has arrived. A head that trickles in one byte
/// per read (slowloris) so costs linear time, not a re-parse from byte 0 per read.
///
/// The caller keeps one reader per request and passes the same buffer, grown, to each `poll`.
#[derive(Debug, Default, Clone)]
pub struct HeadReader {
    /// Bytes of the buffer examined so far.
    scanned: usize,
    /// Where the request line starts: after the empty lines a server should ignore before it
    /// (RFC 9112 §2.2), once a byte of it has arrived.
    line_start: Option<usize>,
    /// The `\n` that ends the request line, once it has arrived.
    line_end: Option<usize>,
    /// Times httparse ran: the request line once, the whole head once.
    parses: usize,
}

impl HeadReader {
    /// Examines the bytes added to `buf` since the last call. `Ok(None)`: need more bytes.
    pub fn poll(&mut self, buf: &[u8], limits: &HeadLimits) -> Result<Option<RequestHead>, HttpError> {
        debug_assert!(self.scanned <= buf.len(), "the buffer only grows while a head is read");
        if self.line_start.is_none() {
            // RFC 9112 §2.2: ignore empty lines (CRLF or LF) received before the request line.
            let skipped = buf[self.scanned..].iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
            self.scanned += skipped;
            if self.scanned < buf.len() {
                self.line_start = Some(self.scanned);
            }
        }
        if let (Some(start), None) = (self.line_start, self.line_end) {
            match buf[self.scanned..].iter().position(|&b| b == b'\n') {
                Some(at) => {
                    let end = self.scanned + at;
                    if end - start > limits.request_line_bytes_max {
                        return Err(uri_too_long());
                    }
                    self.line_end = Some(end);
                    self.scanned = end + 1;
                    self.check_request_line(&buf[start..=end])?;
                }
                None if buf.len() - start > limits.request_line_bytes_max => return Err(uri_too_long()),
                None => self.scanned = buf.len(),
            }
        }
        if let Some(line_end) = self.line_end {
            if let Some(head_len) = self.find_blank_line(buf, line_end) {
                if head_len > limits.header_bytes_max {
                    return Err(header_too_large());
                }
                self.parses += 1;
                return parse_complete(&buf[..head_len], limits).map(Some);
            }
        }
        if buf.len() > limits.header_bytes_max {
            return Err(header_too_large());
        }
        Ok(None)
    }

    /// Looks for the empty line that ends the head in the unexamined bytes; returns the head
    /// length (through that line's `\n`).
    fn find_blank_line(&mut self, buf: &[u8], line_end: usize) -> Option<usize> {
        while let Some(at) = buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let newline = self.scanned + at;
            self.scanned = newline + 1;
            // The line this `\n` ends is empty when the previous line's `\n` comes right
            // before it, or right before a `\r`.
            let empty = buf[newline - 1] == b'\n'
                || (buf[newline - 1] == b'\r' && newline - 2 >= line_end && buf[newline - 2] == b'\n');
            if empty {
                return Some(newline + 1);
            }
        }
        self.scanned = buf.len();
        None
    }

    /// Refuses a malformed request line as soon as it is complete, before its headers arrive.
    fn check_request_line(&mut self, line: &[u8]) -> Result<(), HttpError> {
        self.parses += 1;
        match httparse::Request::new(&mut []).parse(line) {
            Ok(_) | Err(httparse::Error::TooManyHeaders) => Ok(()),
            Err(e) => Err(malformed(e)),
        }
    }
}

/// Parses a head known to be complete (it ends with its blank line).
fn parse_complete(head: &[u8], limits: &HeadLimits) -> Result<RequestHead, HttpError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.headers_count_max];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(head_len)) => build_head(&request, head_len, limits),
        Ok(httparse::Status::Partial) => Err(HttpError::new(StatusCode::BAD_REQUEST, "malformed request head")),
        Err(httparse::Error::TooManyHeaders) => {
            Err(HttpError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too many request headers"))
        }
        Err(e) => Err(malformed(e)),
    }
}

fn malformed(error: httparse::Error) -> HttpError {
    HttpError::new(StatusCode::BAD_REQUEST, format!("malformed request: {error}"))
}

fn build_head(request: &httparse::Request, head_len: usize, limits: &HeadLimits) -> Result<RequestHead, HttpError> {
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| HttpError::new(StatusCode::BAD_REQUEST, "invalid method"))?;
    let target = request.path.unwrap_or("");
    if !target.starts_with('/') {
        return Err(HttpError::new(StatusCode::BAD_REQUEST, "request target must be an absolute path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let version_minor = request.version.unwrap_or(1);
    let headers: Vec<(String, Vec<u8>)> =
        request.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
    let mut content_length: Option<usize> = None;
    let mut keep_alive = version_minor >= 1;
    for (name, value) in &headers {
        match name.as_str() {
            "content-length" => {
                let parsed = std::str::from_utf8(value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok());
                match (parsed, content_length) {
                    (None, _) => return Err(HttpError::new(StatusCode::BAD_REQUEST, "invalid Content-Length")),
                    // RFC 9112 §6.3: differing Content-Length values are unrecoverable.
                    (Some(n), Some(previous)) if n != previous => {
                        return Err(HttpError::new(StatusCode::BAD_REQUEST, "conflicting Content-Length headers"))
                    }
                    (Some(n), _) => content_length = Some(n),
                }
            }
            "transfer-encoding" => {
                return Err(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    "Transfer-Encoding request bodies are not supported; send Content-Length",
                ))
            }
            "connection" => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            _ => {}
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > limits.body_bytes_max {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {content_length} bytes exceeds the limit of {}", limits.body_bytes_max),
        ));
    }
    Ok(RequestHead {
        method,
        path: path.to_string(),
        query: query.to_string(),
        version_minor,
        headers,
        content_length,
        keep_alive,
        head_len,
    })
}

fn uri_too_long() -> HttpError {
    HttpError::new(StatusCode::URI_TOO_LONG, "request line too long")
}

fn header_too_large() -> HttpError {
    HttpError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large")
}

/// A complete response: status line, headers, body.
pub fn response(status: StatusCode, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response_with_headers(status, content_type, "", body, keep_alive)
}

/// A response with more header lines (`extra`: each line ending in CRLF, or empty).
pub fn response_with_headers(
    status: StatusCode,
    content_type: &str,
    extra: &str,
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(128 + body.len());
    let reason = status.canonical_reason().unwrap_or("");
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(
        out,
        "HTTP/1.1 {} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n{extra}\r\n",
        status.as_u16(),
        body.len()
    );
    out.extend_from_slice(body);
    out
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response(status, "application/json", body, keep_alive)
}

/// The JSON error body every error status carries: `{"error":"...","status":N}`.
pub fn error_body(status: StatusCode, reason: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": reason, "status": status.as_u16() }))
        .expect("serializing a JSON value cannot fail")
}

/// A full error response.
pub fn error_response(error: &HttpError, keep_alive: bool) -> Vec<u8> {
    json_response(error.status, &error_body(error.status, &error.reason), keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HeadLimits {
        HeadLimits { request_line_bytes_max: 64, header_bytes_max: 256, headers_count_max: 4, body_bytes_max: 100 }
    }

    fn check(input: &str, expected: Result<Option<(&str, &str, usize, bool)>, u16>) {
        let got = parse_head(input.as_bytes(), &limits())
            .map(|h| h.map(|h| (h.path.clone(), h.query.clone(), h.content_length, h.keep_alive)))
            .map_err(|e| e.status.as_u16());
        let expected = expected.map(|o| o.map(|(p, q, n, k)| (p.to_string(), q.to_string(), n, k)));
        assert_eq!(got, expected, "{input:?}");
    }

    /// Complete and partial heads.
    #[test]
    fn heads() {
        check("GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n", Ok(Some(("/a", "b=1", 0, true))));
        check("POST /a HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n", Ok(Some(("/a", "", 5, false))));
        check("GET /a HTTP/1.0\r\n\r\n", Ok(Some(("/a", "", 0, false))));
        check("GET /a HTTP/1.1\r\nHost:", Ok(None));
        check("GET /a", Ok(None));
    }

    /// Each limit answers its status.
    #[test]
    fn limits_enforced() {
        check(&format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(80)), Err(414));
        check(&format!("GET /{}", "a".repeat(80)), Err(414));
        check(&format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(300)), Err(431));
        check(&format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(300)), Err(431));
        check("GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n", Err(431));
        check("POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", Err(413));
        check("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", Err(400));
        check("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", Err(400));
        check("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", Err(400));
        check("GET\x01 / HTTP/1.1\r\n\r\n", Err(400));
        check("GET * HTTP/1.1\r\n\r\n", Err(400));
    }

    /// Feeds `input` to one reader in pieces ending at `cuts` (then the rest); returns the
    /// first answer that is not "need more" (or the last), and how often httparse ran.
    fn feed(input: &[u8], cuts: &[usize], limits: &HeadLimits) -> (Result<Option<RequestHead>, HttpError>, usize) {
        let mut reader = HeadReader::default();
        for &end in cuts.iter().chain([&input.len()]) {
            match reader.poll(&input[..end], limits) {
                Ok(None) => {}
                done => return (done, reader.parses),
            }
        }
        (Ok(None), reader.parses)
    }

    /// A head split anywhere — in two at every offset, or one byte per read — gives exactly
    /// the answer the whole buffer gives, errors included.
    #[test]
    fn every_split_gives_the_same_result() {
        let inputs: Vec<String> = vec![
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "POST /a HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n".into(),
            "\r\n\nGET /lf HTTP/1.0\nX: 1\n\n".into(),
            "GET /mixed HTTP/1.1\r\nX: 1\n\r\n".into(),
            "GET /a HTTP/1.1\r\nHost:".into(),
            format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(80)),
            format!("GET /{}", "a".repeat(80)),
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(300)),
            format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(300)),
            "GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            "GET\x01 / HTTP/1.1\r\nHost: x\r\n".into(),
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n".into(),
            "GARBAGE\r\n\r\n".into(),
        ];
        for input in &inputs {
            let input = input.as_bytes();
            let whole = parse_head(input, &limits());
            for cut in 0..=input.len() {
                assert_eq!(
                    feed(input, &[cut], &limits()).0,
                    whole,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(input)
                );
            }
            let bytes: Vec<usize> = (1..input.len()).collect();
            assert_eq!(feed(input, &bytes, &limits()).0, whole, "{:?} byte by byte", String::from_utf8_lossy(input));
        }
    }

    /// A 16 KB head arriving one byte per read runs httparse twice (request line, whole head),
    /// not once per read: the cost is linear in the head's length.
    #[test]
    fn head_fed_byte_by_byte_is_parsed_once() {
        let limits = HeadLimits {
            request_line_bytes_max: 8192,
            header_bytes_max: 20_000,
            headers_count_max: 2000,
            body_bytes_max: 0,
        };
        let headers: String = (0..1000).map(|i| format!("X-{i:04}: abcdefgh\r\n")).collect();
        let input = format!("GET /slow HTTP/1.1\r\n{headers}\r\n");
        assert!(input.len() > 16_000);
        let bytes: Vec<usize> = (1..input.len()).collect();
        let (result, parses) = feed(input.as_bytes(), &bytes, &limits);
        assert_eq!(result.unwrap().unwrap().headers.len(), 1000);
        assert_eq!(parses, 2);
    }

    /// Error responses carry a JSON body with the reason.
    #[test]
    fn error_response_shape() {
        let r = error_response(&HttpError::new(StatusCode::NOT_FOUND, "no route"), true);
        let text = String::from_utf8(r).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 33\r\n"),
            "{text}"
        );
        assert!(text.ends_with("{\"error\":\"no route\",\"status\":404}"), "{text}");
    }
}
