//! One accepted TCP connection: HTTP/1.1 requests (keep-alive) until it either closes or
//! upgrades to a WebSocket, then the WebSocket's reader loop and writer task.
//!
//! Owns socket I/O and timeouts only. Requests go to `http::api`; WebSocket messages go to
//! the shard (`shard::session`); frames come from `ws::frame`.

use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;

use crate::buf::FrameBatch;
use crate::http::parse::{self, HeadLimits, HeadReader, HttpError, RequestHead};
use crate::metrics::ShardMetrics;
use crate::net::stream::{ByteReader, ByteStream, FrameWriter, Transport};
use crate::pusher::auth::{param, parse_query};
use crate::pusher::message;
use crate::shard::router::ConnKey;
use crate::shard::session::RATE_LIMITED;
use crate::shard::{ConnState, Shard};
use crate::ws::frame::{self, close_code, Decoder, FrameLimits, Incoming};
use crate::ws::handshake;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// Free space a WebSocket read asks for: tiny, because most connections mostly listen and
/// the read that waits for their next message pins its buffer (512 bytes here cost about 270
/// more bytes of RSS per idle connection than 64, medians; BENCHMARKS.md). A longer message
/// takes more reads, the buffer doubling as it grows.
const WS_READ_SPARE: usize = 64;
/// An empty WebSocket read buffer with more room than this is freed before the next read, so
/// one large message does not leave a large buffer pinned for the connection's idle life.
/// Not lower: a buffer freed and allocated again after every ordinary message (a subscribe is
/// 70 to 300 bytes) fragments the allocator's pages, which measured worse than keeping it.
const WS_IDLE_BUFFER_MAX: usize = 1024;
/// Free space an HTTP read asks for.
const HTTP_READ_SPARE: usize = 4096;

/// Writes one whole response; false when it failed or did not finish within `timeout` (the
/// caller then closes the connection). Without the bound a client that never reads would hold
/// the connection and the response's buffer forever.
async fn write_response(stream: &mut impl ByteStream, bytes: Vec<u8>, timeout: Duration) -> bool {
    matches!(monoio::time::timeout(timeout, stream.write_whole(bytes)).await, Ok(Ok(())))
}

/// How reading a request ended, when it did not produce one.
enum ReadFailure {
    /// The peer closed or the socket failed: just drop it.
    Closed,
    /// The request is refused with this error, then the connection is closed.
    Refused(HttpError),
}

/// A connection whose request asked for a WebSocket, handed from the HTTP task to its own.
pub struct Upgrade<S> {
    stream: S,
    head: RequestHead,
    buf: BytesMut,
    echo: bool,
}

/// Serves one accepted connection's HTTP requests until it closes, or returns it when it
/// asks for a WebSocket. The caller runs `websocket` in a task of its own, so a long-lived
/// WebSocket does not keep this (much larger) HTTP future's memory.
pub async fn serve<S: Transport>(shard: &Rc<Shard>, mut stream: S) -> Option<Upgrade<S>> {
    let metrics = shard.metrics();
    ShardMetrics::add(&metrics.http_connections, 1);
    // Read once: a reload applies to the connections that start after it.
    let http = shard.config().http.clone();
    let limits = HeadLimits::from(&http);
    let header_timeout = Duration::from_millis(http.header_timeout_ms);
    let keepalive_timeout = Duration::from_millis(http.keepalive_timeout_ms);
    let write_timeout = Duration::from_millis(http.write_timeout_ms);
    let mut buf = BytesMut::with_capacity(HTTP_READ_SPARE);
    let mut first = true;
    loop {
        // An idle keep-alive connection may wait up to keepalive_timeout for its next request;
        // once a request starts, its head and body must arrive within header_timeout.
        if buf.is_empty() && !first {
            match monoio::time::timeout(keepalive_timeout, stream.read_into(buf, HTTP_READ_SPARE)).await {
                Ok((Ok(n), b)) if n > 0 => buf = b,
                _ => break,
            }
        }
        first = false;
        let request = monoio::time::timeout(header_timeout, read_request(&mut stream, buf, &limits)).await;
        let (head, body, rest) = match request {
            Ok((Ok((head, body)), rest)) => (head, body, rest),
            Ok((Err(ReadFailure::Refused(error)), _)) => {
                write_response(&mut stream, parse::error_response(&error, false), write_timeout).await;
                break;
            }
            Ok((Err(ReadFailure::Closed), _)) => break,
            Err(_elapsed) => {
                let error = HttpError::new(StatusCode::REQUEST_TIMEOUT, "request not received in time");
                write_response(&mut stream, parse::error_response(&error, false), write_timeout).await;
                break;
            }
        };
        buf = rest;
        let echo = head.path == "/echo" && shard.config().websocket.echo_enabled;
        if head.path.starts_with("/app/") || echo {
            ShardMetrics::sub(&metrics.http_connections, 1);
            return Some(Upgrade { stream, head, buf, echo });
        }
        ShardMetrics::add(&metrics.http_requests_total, 1);
        let keep_alive = head.keep_alive && !shard.is_shutting_down();
        let response = crate::http::api::handle(shard, &head, &body).await;
        let (status, content_type, extra) = (response.status, response.content_type, &response.extra_headers);
        let bytes = parse::response_with_headers(status, content_type, extra, &response.body, keep_alive);
        if !write_response(&mut stream, bytes, write_timeout).await || !keep_alive {
            break;
        }
    }
    ShardMetrics::sub(&metrics.http_connections, 1);
    None
}

/// Reads one request head and its body. Returns the unconsumed bytes alongside.
async fn read_request(
    stream: &mut impl ByteStream,
    mut buf: BytesMut,
    limits: &HeadLimits,
) -> (Result<(RequestHead, Bytes), ReadFailure>, BytesMut) {
    // One reader per request: it examines only the bytes each read adds.
    let mut reader = HeadReader::default();
    let head = loop {
        if !buf.is_empty() {
            match reader.poll(&buf, limits) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => return (Err(ReadFailure::Refused(e)), buf),
            }
        }
        let (result, b) = stream.read_into(buf, HTTP_READ_SPARE).await;
        buf = b;
        if !matches!(result, Ok(n) if n > 0) {
            return (Err(ReadFailure::Closed), buf);
        }
    };
    let _ = buf.split_to(head.head_len);
    while buf.len() < head.content_length {
        let spare = (head.content_length - buf.len()).max(HTTP_READ_SPARE);
        let (result, b) = stream.read_into(buf, spare).await;
        buf = b;
        if !matches!(result, Ok(n) if n > 0) {
            return (Err(ReadFailure::Closed), buf);
        }
    }
    let body = buf.split_to(head.content_length).freeze();
    (Ok((head, body)), buf)
}

/// Why a WebSocket is refused right after the handshake: Pusher close code and message.
fn pusher_refusal(shard: &Shard, head: &RequestHead) -> Result<crate::apps::AppIndex, (u16, String)> {
    let key = &head.path["/app/".len()..];
    let params = parse_query(&head.query);
    // Pusher Channels protocol ("Connection", pusher.com/docs/channels/library_auth_reference/
    // pusher-websockets-protocol): clients send ?protocol=7; 5 to 7 behave identically here.
    match param(&params, "protocol") {
        None => return Err((4008, "No protocol version supplied".into())),
        Some(p) => match p.parse::<u32>() {
            Ok(5..=7) => {}
            Ok(_) => return Err((4007, format!("Unsupported protocol version {p}; use 5 to 7"))),
            Err(_) => return Err((4006, format!("Invalid protocol version '{p}'"))),
        },
    }
    let apps = shard.apps();
    let Some(app) = apps.by_key(key) else {
        return Err((4001, format!("App key {key} does not exist")));
    };
    if shard.is_shutting_down() {
        return Err((4200, "Server shutting down, reconnect".into()));
    }
    if !app.try_admit() {
        return Err((4004, "Application is over connection quota".into()));
    }
    Ok(app.index)
}

/// A WebSocket connection whose handshake is done: what its long-lived task needs.
pub struct Session<R> {
    key: ConnKey,
    reader: R,
    writer: monoio::task::JoinHandle<()>,
    buf: BytesMut,
}

/// Upgrades a connection (handshake, admission, registration, writer task); `None` when it
/// was refused or failed. Its state is large (request head, response, write futures), so the
/// caller runs the returned session in a task of its own: an idle connection keeps only that.
pub async fn websocket<S: Transport>(shard: &Rc<Shard>, upgrade: Upgrade<S>) -> Option<Session<S::Reader>> {
    let Upgrade { mut stream, head, mut buf, echo } = upgrade;
    let write_timeout = Duration::from_millis(shard.config().http.write_timeout_ms);
    let mut response = match handshake::accept(&head) {
        Ok(response) => response,
        Err(e) => {
            let error = HttpError::new(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.reason);
            let mut bytes = parse::error_response(&error, false);
            if e.status == 426 {
                let at = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                bytes.splice(at..at, b"\r\nSec-WebSocket-Version: 13".iter().copied());
            }
            write_response(&mut stream, bytes, write_timeout).await;
            return None;
        }
    };
    // Cluster mode (docs/cluster.md, "When Redis is unreachable"): a shard that cannot reach
    // Redis would give a new client no other node's messages; 503 sends it elsewhere.
    if !echo && shard.cluster_down() {
        let error = HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable, retry");
        write_response(&mut stream, parse::error_response(&error, false), write_timeout).await;
        return None;
    }
    let checked = if echo { Ok(0) } else { pusher_refusal(shard, &head) };
    let app = match checked {
        Ok(app) => app,
        Err((code, reason)) => {
            // Protocol §1.4: pusher:error, then close with the same code.
            response.extend_from_slice(&message::error(Some(code), &reason, None));
            response.extend_from_slice(&frame::encode_close(code, &reason));
            if write_response(&mut stream, response, write_timeout).await {
                let _ = stream.shutdown().await;
            }
            return None;
        }
    };
    if !write_response(&mut stream, response, write_timeout).await {
        if !echo {
            shard.apps().get(app).release();
        }
        return None;
    }
    // Everything from the request is used up: free its headers before the long read loop.
    drop(head);
    let (key, socket_id) = shard.register(app, echo, stream.raw_fd());
    let (reader, writer) = stream.split_for_upgrade();
    let writer = monoio::spawn(write_loop(shard.clone(), key, writer));
    if !echo {
        let activity_timeout_s = shard.config().websocket.activity_timeout_s;
        shard.send(key, message::connection_established(socket_id, activity_timeout_s));
        // A reload may have removed the app while the handshake answer was being written,
        // after its sweep of this shard's connections.
        if shard.apps().get(app).removed {
            shard.refuse(key, 4001, "Application does not exist");
        }
    }
    // The HTTP buffer is sized for request heads; an idle WebSocket should not keep it.
    buf = BytesMut::from(&buf[..]);
    Some(Session { key, reader, writer, buf })
}

/// Runs an upgraded connection to its end: the read loop, then teardown. By reference, for
/// the reason `read_loop` gives.
pub async fn session<R: ByteReader>(shard: &Rc<Shard>, session: &mut Session<R>) {
    read_loop(shard, session).await;
    let key = session.key;
    shard.begin_teardown(key);
    (&mut session.writer).await;
    shard.finish_teardown(key);
}

/// Reads and dispatches frames until the peer closes, the socket fails, or the close
/// handshake completes.
///
/// Works on the session by reference: an idle connection's task holds this future for its
/// whole life, and every by-value argument of an `async fn` is a copy it keeps (the session
/// task's cell measured 712 bytes by value, 576 by reference: mimalloc's 768 → 640 class).
async fn read_loop(shard: &Rc<Shard>, session: &mut Session<impl ByteReader>) {
    let Session { key, reader, buf, .. } = session;
    let key = *key;
    let limits = {
        // Not kept across the reads: the idle task holds every local that lives past an await.
        let running = shard.config();
        FrameLimits {
            frame_bytes_max: running.websocket.frame_bytes_max,
            message_bytes_max: running.websocket.message_bytes_max,
        }
    };
    let mut decoder = Decoder::default();
    // After a protocol violation nothing more is parsed; bytes are discarded until the peer
    // closes or the close timeout cuts the socket.
    let mut failed = false;
    loop {
        if failed {
            buf.clear();
        }
        while !failed {
            let before = buf.len();
            match decoder.decode(buf, limits) {
                Ok(Some(incoming)) => {
                    if !dispatch(shard, key, incoming).await {
                        return;
                    }
                }
                Ok(None) if buf.len() == before => break,
                Ok(None) => {}
                Err(violation) => {
                    ShardMetrics::add(&shard.metrics().protocol_closes_total, 1);
                    shard.close(key, violation.code, violation.reason);
                    failed = true;
                }
            }
        }
        if buf.is_empty() && buf.capacity() > WS_IDLE_BUFFER_MAX {
            *buf = BytesMut::new();
        }
        let (result, b) = reader.read_into(std::mem::take(buf), WS_READ_SPARE).await;
        *buf = b;
        if !matches!(result, Ok(n) if n > 0) {
            return;
        }
    }
}

/// Handles one complete message; false when the connection is finished.
async fn dispatch(shard: &Rc<Shard>, key: ConnKey, incoming: Incoming) -> bool {
    let metrics = shard.metrics();
    let (state, echo) = {
        let state = shard.state.borrow();
        let conn = &state.connections[key];
        (conn.state, conn.echo)
    };
    match incoming {
        Incoming::Ping(payload) => {
            shard.record_activity(key, 1);
            shard.send(key, frame::encode_pong(&payload));
        }
        Incoming::Pong => {
            shard.record_activity(key, 1);
        }
        Incoming::Close(received) => {
            if state != ConnState::Open {
                // The peer answered our close: the handshake is complete.
                return false;
            }
            // RFC 6455 §5.5.1: answer with a close frame, echoing the code; the handshake is
            // then complete and the server closes the TCP connection once the frame is out.
            let code = received.map(|(code, _)| code).unwrap_or(close_code::NORMAL);
            shard.close(key, code, "");
            return false;
        }
        Incoming::Text(payload) if echo => echo_back(shard, key, OpCode::Data(Data::Text), &payload),
        Incoming::Binary(payload) if echo => echo_back(shard, key, OpCode::Data(Data::Binary), &payload),
        Incoming::Binary(_) => {
            // Protocol: "Binary WebSocket frames are not supported".
            shard.close(key, close_code::UNSUPPORTED_DATA, "binary messages are not supported");
        }
        Incoming::Text(text) => {
            ShardMetrics::add(&metrics.messages_in_total, 1);
            shard.message_received(key);
            ShardMetrics::add(&metrics.bytes_in_total, text.len() as u64);
            if state != ConnState::Open {
                return true;
            }
            if !shard.record_activity(key, 1) {
                ShardMetrics::add(&metrics.rate_limited_total, 1);
                let error = message::error(Some(RATE_LIMITED), "message rate limit exceeded", None);
                shard.send(key, error);
                return true;
            }
            let text = std::str::from_utf8(&text).expect("the decoder validated UTF-8");
            // Boxed: the on_text state (subscribe, auth, client events) is large, and kept inline it
            // would be part of every idle connection's task; inbound messages are few.
            Box::pin(shard.on_text(key, text)).await;
        }
    }
    true
}

/// `/echo`: sends a message straight back, with its own opcode.
fn echo_back(shard: &Shard, key: ConnKey, opcode: OpCode, payload: &[u8]) {
    ShardMetrics::add(&shard.metrics().messages_in_total, 1);
    ShardMetrics::add(&shard.metrics().bytes_in_total, payload.len() as u64);
    shard.record_activity(key, 1);
    shard.send(key, frame::encode(opcode, payload));
}

/// Writes queued frames, one batch at a time (one writev, or one TLS write), until the
/// connection dies or its final close frame is out.
async fn write_loop(shard: Rc<Shard>, key: ConnKey, mut writer: impl FrameWriter) {
    loop {
        let mut frames = Vec::new();
        let Some(last) = shard.next_batch(key, &mut frames).await else {
            break;
        };
        let count = frames.len();
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        let ok = writer.write_frames(FrameBatch::new(frames)).await;
        shard.batch_written(key, count, bytes);
        if !ok {
            break;
        }
        if last {
            // RFC 6455 §7.1.1: after its close frame the server closes the TCP connection
            // first; a FIN lets the client see it.
            writer.shutdown().await;
            break;
        }
    }
    shard.writer_finished(key);
}
