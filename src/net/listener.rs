//! Listening sockets: one SO_REUSEPORT socket per shard on the same address, so the kernel
//! spreads new connections across shards; and each shard's accept loop.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::ShardMetrics;
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
pub async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener) {
    let limit = shard.config.server.connections_per_shard_max;
    loop {
        let accepted = monoio::select! {
            _ = shard.shutdown_requested() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                {
                    let mut state = shard.state.borrow_mut();
                    if state.open_sockets >= limit {
                        ShardMetrics::add(&shard.metrics().connections_refused_total, 1);
                        continue;
                    }
                    state.open_sockets += 1;
                }
                monoio::spawn(connection(shard.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(shard = shard.index, error = %e, "accept failed; backing off 50 ms");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One accepted socket: HTTP, then (for a WebSocket) the upgrade, then the session, each phase
/// in a task of its own, so an idle WebSocket keeps only the session's state (see
/// `conn::serve` and `conn::websocket`).
async fn connection(shard: Rc<Shard>, stream: monoio::net::TcpStream) {
    let closed = |shard: &Shard| shard.state.borrow_mut().open_sockets -= 1;
    let Some(upgrade) = crate::net::conn::serve(&shard, stream).await else { return closed(&shard) };
    monoio::spawn(async move {
        let Some(session) = crate::net::conn::websocket(&shard, upgrade).await else { return closed(&shard) };
        monoio::spawn(async move {
            crate::net::conn::session(&shard, session).await;
            closed(&shard);
        });
    });
}
