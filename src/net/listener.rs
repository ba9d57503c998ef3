//! Listening sockets: one SO_REUSEPORT socket per shard on the same address, so the kernel
//! spreads new connections across shards; and each shard's accept loop.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::ShardMetrics;
use crate::net::conn;
use crate::net::stream::Transport;
use crate::net::tls::{self, HandshakeError, TlsSettings};
use crate::shard::Shard;

/// Binds `count` listeners to `addr` with SO_REUSEPORT. Port 0 picks a free port once; every
/// shard then binds that same port. Returns the sockets and the bound address.
pub fn bind(addr: SocketAddr, count: usize, backlog: u32) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let mut listeners = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok((listeners, bound))
}

/// Accepts until shutdown. Over `connections_per_shard_max` a new connection is closed at
/// once and counted. Accept errors (EMFILE when the process is out of descriptors) back off
/// for 50 ms rather than spin: the pending connection stays in the backlog until then.
pub async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener, tls: Option<TlsSettings>) {
    loop {
        let accepted = monoio::select! {
            _ = shard.shutdown_requested() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                {
                    // Read per connection: a reload may change it.
                    let limit = shard.config().server.connections_per_shard_max;
                    let mut state = shard.state.borrow_mut();
                    if state.open_sockets >= limit {
                        ShardMetrics::add(&shard.metrics().connections_refused_total, 1);
                        continue;
                    }
                    state.open_sockets += 1;
                }
                // Without it small responses and TLS flights meet delayed ACKs.
                let _ = stream.set_nodelay(true);
                match &tls {
                    None => drop(monoio::spawn(connection(shard.clone(), stream))),
                    Some(settings) => drop(monoio::spawn(tls_connection(shard.clone(), stream, settings.clone()))),
                }
            }
            Err(e) => {
                tracing::warn!(shard = shard.index, error = %e, "accept failed; backing off 50 ms");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A socket's place in `open_sockets` is given back.
fn closed(shard: &Shard) {
    shard.state.borrow_mut().open_sockets -= 1;
}

/// One accepted socket (plain or after its TLS handshake): HTTP, then (for a WebSocket) the
/// upgrade, then the session, each phase in a task of its own, so an idle WebSocket keeps only
/// the session's state (see `conn::serve` and `conn::websocket`).
async fn connection<S: Transport>(shard: Rc<Shard>, stream: S) {
    let Some(upgrade) = conn::serve(&shard, stream).await else { return closed(&shard) };
    monoio::spawn(async move {
        let Some(mut session) = conn::websocket(&shard, upgrade).await else { return closed(&shard) };
        monoio::spawn(async move {
            conn::session(&shard, &mut session).await;
            closed(&shard);
        });
    });
}

/// A socket on the TLS listener: the handshake (bounded by `tls.handshake_timeout_ms`), then
/// the same phases as a plain one. A client that speaks plain HTTP to this port gets one
/// plaintext 400 saying so.
async fn tls_connection(shard: Rc<Shard>, stream: monoio::net::TcpStream, settings: TlsSettings) {
    let metrics = shard.metrics();
    match monoio::time::timeout(settings.handshake_timeout, tls::accept(stream, &settings)).await {
        Ok(Ok(stream)) => {
            ShardMetrics::add(&metrics.tls_handshakes_total, 1);
            return connection(shard, stream).await;
        }
        Ok(Err(HandshakeError::NotTls(mut stream))) => {
            ShardMetrics::add(&metrics.tls_handshake_failures_total, 1);
            let error = crate::http::parse::HttpError::new(
                http::StatusCode::BAD_REQUEST,
                "this port speaks TLS: use https:// or wss://",
            );
            let bytes = crate::http::parse::error_response(&error, false);
            let write = crate::net::stream::ByteStream::write_whole(&mut stream, bytes);
            let _ = monoio::time::timeout(settings.handshake_timeout, write).await;
        }
        Ok(Err(HandshakeError::Failed(reason))) => {
            ShardMetrics::add(&metrics.tls_handshake_failures_total, 1);
            tracing::debug!(shard = shard.index, %reason, "TLS handshake failed");
        }
        Err(_elapsed) => {
            ShardMetrics::add(&metrics.tls_handshake_failures_total, 1);
            tracing::debug!(shard = shard.index, "TLS handshake timed out");
        }
    }
    closed(&shard);
}
