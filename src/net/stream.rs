//! What `net::conn` needs of a connection's byte stream, so the same HTTP and WebSocket code
//! serves plain TCP and TLS (`net::tls`): read into a growing buffer, write whole responses,
//! split into a read side and a frame-writing side after the upgrade.
//!
//! The futures are `!Send` on purpose: every connection lives on one shard's thread.
#![allow(async_fn_in_trait)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use bytes::BytesMut;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;

use crate::buf::{read_more, FrameBatch};

/// A whole connection before its WebSocket upgrade: requests in, responses out.
pub trait ByteStream {
    /// Reads more bytes (plaintext), appending to `buf`; `Ok(0)` when the peer closed.
    async fn read_into(&mut self, buf: BytesMut, spare: usize) -> (io::Result<usize>, BytesMut);
    /// Writes all of `bytes`.
    async fn write_whole(&mut self, bytes: Vec<u8>) -> io::Result<()>;
    /// Ends the stream (a FIN; with TLS, `close_notify` first).
    async fn shutdown(&mut self) -> io::Result<()>;
}

/// A connection that can be upgraded: split into a reader task's side and a writer task's.
pub trait Transport: ByteStream + 'static {
    /// The side the WebSocket read loop owns.
    type Reader: ByteReader + 'static;
    /// The side the WebSocket writer task owns.
    type Writer: FrameWriter + 'static;
    /// The socket (for `shutdown(2)` when a peer goes silent).
    fn raw_fd(&self) -> RawFd;
    /// Splits after the upgrade.
    fn split_for_upgrade(self) -> (Self::Reader, Self::Writer);
}

/// The read side of an upgraded connection.
pub trait ByteReader {
    /// Reads more bytes (plaintext), appending to `buf`; `Ok(0)` when the peer closed.
    async fn read_into(&mut self, buf: BytesMut, spare: usize) -> (io::Result<usize>, BytesMut);
}

/// The write side of an upgraded connection.
pub trait FrameWriter {
    /// Writes a batch of frames whole, with as few socket writes as it can (one `writev` on
    /// plain TCP; one encryption pass and one write on TLS); false when the connection broke.
    async fn write_frames(&mut self, batch: FrameBatch) -> bool;
    /// Ends the stream after the last frame (RFC 6455 §7.1.1: the server closes first).
    async fn shutdown(&mut self);
}

impl ByteStream for TcpStream {
    async fn read_into(&mut self, buf: BytesMut, spare: usize) -> (io::Result<usize>, BytesMut) {
        read_more(self, buf, spare).await
    }

    async fn write_whole(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        let (result, _) = AsyncWriteRentExt::write_all(self, bytes).await;
        result.map(|_| ())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        AsyncWriteRent::shutdown(self).await
    }
}

impl Transport for TcpStream {
    type Reader = TcpOwnedReadHalf;
    type Writer = TcpOwnedWriteHalf;

    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn split_for_upgrade(self) -> (TcpOwnedReadHalf, TcpOwnedWriteHalf) {
        Splitable::into_split(self)
    }
}

impl ByteReader for TcpOwnedReadHalf {
    async fn read_into(&mut self, buf: BytesMut, spare: usize) -> (io::Result<usize>, BytesMut) {
        read_more(self, buf, spare).await
    }
}

impl FrameWriter for TcpOwnedWriteHalf {
    async fn write_frames(&mut self, mut batch: FrameBatch) -> bool {
        loop {
            let (result, returned) = self.writev(batch).await;
            batch = returned;
            match result {
                Ok(0) => return false,
                Ok(n) => {
                    batch.advance(n);
                    if batch.is_done() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = AsyncWriteRent::shutdown(self).await;
    }
}
