//! One TCP connection from a shard's monoio runtime to Redis, speaking RESP2 through the
//! `redis-protocol` codec (no RESP parser of our own).
//!
//! A `Link` sends pipelined commands: `queue` encodes commands into one write buffer, `flush`
//! writes it with one `write_all` and reads exactly as many replies, matched in order. A link
//! turned into a subscriber (`Link::into_subscriber`) splits into `Subscriptions` (write:
//! `SSUBSCRIBE`, `SUNSUBSCRIBE`, `PING`) and `Pushes` (read: messages and confirmations), so one
//! task can wait for pushes while another subscribes.
//!
//! RESP2, not RESP3: RESP3's push type matters only when pushes share a connection with
//! replies, and pushes get a connection of their own here (docs/cluster.md says why).
//!
//! Owns no policy: what to send, when to reconnect and what a Redis error reply means are the
//! caller's. Invariant: after any `LinkError` but `PipelineFull`, or a round trip cut short by a
//! timeout, the link answers `Broken` forever; the caller replaces it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::encode::extend_encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, BytesFrame};

use crate::buf::read_more;
use crate::config::ClusterConfig;

use crate::redis_url::RedisUrl;

/// A Redis reply: bulk strings are slices of the link's read buffer (no copy). A Redis error
/// reply (`-ERR …`) is `Reply::Error`, an answer to one command, not a link failure.
pub type Reply = BytesFrame;

/// Spare room offered to each read.
const READ_BYTES: usize = 16 * 1024;
/// Arguments of a command encoded without a heap allocation.
const INLINE_ARGS: usize = 8;

/// How a link connects and what it bounds.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkOptions {
    /// Time for the TCP connect.
    pub connect_timeout: Duration,
    /// Time for the handshake and for each pipeline round trip (write and every reply).
    pub command_timeout: Duration,
    /// Largest reply or push; over it the link fails with `ReplyTooLarge`.
    pub reply_bytes_max: usize,
    /// Largest batch of queued, unflushed commands; over it `queue` answers `PipelineFull`.
    pub pipeline_bytes_max: usize,
    /// ACL user for `AUTH`, if any.
    pub username: Option<String>,
    /// Password for `AUTH`, if any.
    pub password: Option<String>,
    /// Database to `SELECT` when not 0.
    pub db: u32,
}

impl std::fmt::Debug for LinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("reply_bytes_max", &self.reply_bytes_max)
            .field("pipeline_bytes_max", &self.pipeline_bytes_max)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

impl LinkOptions {
    /// The options `[cluster]` and its `redis_url` describe.
    pub fn new(config: &ClusterConfig, url: &RedisUrl) -> LinkOptions {
        LinkOptions {
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            command_timeout: Duration::from_millis(config.command_timeout_ms),
            reply_bytes_max: config.reply_bytes_max,
            pipeline_bytes_max: config.pipeline_bytes_max,
            username: url.username.clone(),
            password: url.password.clone(),
            db: url.db,
        }
    }
}

/// Why a link failed. Every variant but `PipelineFull` means the link is unusable.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The TCP connect failed (refused, unreachable) or took over `connect_timeout`.
    #[error("cannot connect to redis at {address}: {source}")]
    Connect {
        /// Where.
        address: SocketAddr,
        /// Why (`TimedOut` for the connect timeout).
        source: io::Error,
    },
    /// Redis did not finish a handshake or a round trip within `command_timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis closed the connection.
    #[error("redis closed the connection")]
    Closed,
    /// A read or write failed.
    #[error("redis connection failed: {0}")]
    Io(io::Error),
    /// Redis sent bytes that are not RESP2, or a push this link does not know.
    #[error("redis sent something unexpected: {0}")]
    Protocol(String),
    /// One reply or push was over `reply_bytes_max` (the buffer stops growing there).
    #[error("a redis reply is over the limit of {limit} bytes (cluster.reply_bytes_max)")]
    ReplyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Queuing this command would pass `pipeline_bytes_max`: flush first. The link is fine.
    #[error("queued commands would pass {limit} bytes (cluster.pipeline_bytes_max)")]
    PipelineFull {
        /// The limit.
        limit: usize,
    },
    /// Redis refused `AUTH` or `SELECT`, or did not answer `PING` with `PONG`.
    #[error("redis refused the handshake: {0}")]
    Handshake(String),
    /// The link failed earlier (or a timeout cut a round trip short) and must be replaced.
    #[error("the redis link failed earlier and must be replaced")]
    Broken,
}

impl LinkError {
    /// Whether the link that returned this error can still be used.
    pub fn link_usable(&self) -> bool {
        matches!(self, LinkError::PipelineFull { .. })
    }
}

/// The read side shared by commands and pushes: a buffer that grows up to one reply.
struct Reader {
    stream: OwnedReadHalf<TcpStream>,
    buffer: BytesMut,
    reply_bytes_max: usize,
}

impl Reader {
    /// The next complete frame, reading as needed.
    async fn next_frame(&mut self) -> Result<Reply, LinkError> {
        loop {
            match decode_bytes_mut(&mut self.buffer) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) => {}
                Err(error) => return Err(LinkError::Protocol(error.details().to_string())),
            }
            // Only an incomplete frame is left in the buffer: complete ones were taken above.
            if self.buffer.len() >= self.reply_bytes_max {
                return Err(LinkError::ReplyTooLarge { limit: self.reply_bytes_max });
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), LinkError> {
        let (result, buffer) = read_more(&mut self.stream, std::mem::take(&mut self.buffer), READ_BYTES).await;
        self.buffer = buffer;
        match result {
            Ok(0) => Err(LinkError::Closed),
            Ok(_) => Ok(()),
            Err(error) => Err(LinkError::Io(error)),
        }
    }
}

/// The write side: commands encoded into one reusable buffer, written with one `write_all`.
struct Writer {
    stream: OwnedWriteHalf<TcpStream>,
    out: BytesMut,
    pipeline_bytes_max: usize,
}

impl Writer {
    /// Encodes one command (an array of bulk strings) after the ones already queued.
    fn encode(&mut self, args: &[&[u8]]) -> Result<(), LinkError> {
        if args.len() <= INLINE_ARGS {
            let frames: [BorrowedFrame; INLINE_ARGS] =
                std::array::from_fn(|i| args.get(i).map_or(BorrowedFrame::Null, |a| BorrowedFrame::BulkString(a)));
            self.encode_frame(&BorrowedFrame::Array(&frames[..args.len()]))
        } else {
            let frames: Vec<BorrowedFrame> = args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
            self.encode_frame(&BorrowedFrame::Array(&frames))
        }
    }

    fn encode_frame(&mut self, frame: &BorrowedFrame) -> Result<(), LinkError> {
        if self.out.len() + frame.encode_len(false) > self.pipeline_bytes_max {
            return Err(LinkError::PipelineFull { limit: self.pipeline_bytes_max });
        }
        extend_encode_borrowed(&mut self.out, frame, false).map_err(|e| LinkError::Protocol(e.details().into()))?;
        Ok(())
    }

    /// Writes everything encoded so far; the buffer is kept for the next batch.
    async fn write_out(&mut self) -> Result<(), LinkError> {
        let out = std::mem::take(&mut self.out);
        let (result, mut out) = self.stream.write_all(out).await;
        out.clear();
        self.out = out;
        result.map(|_| ()).map_err(LinkError::Io)
    }
}

/// A command connection: pipelined commands, replies in order.
pub struct Link {
    reader: Reader,
    writer: Writer,
    /// Commands queued and not yet flushed.
    queued: usize,
    command_timeout: Duration,
    /// Set while a round trip runs and left set when it fails or is cut short.
    broken: bool,
}

impl Link {
    /// Connects, authenticates and selects the database if the options say so, and checks
    /// with `PING` that the peer is a Redis that answers.
    pub async fn connect(address: SocketAddr, options: &LinkOptions) -> Result<Link, LinkError> {
        let connect = monoio::time::timeout(options.connect_timeout, TcpStream::connect_addr(address)).await;
        let stream = match connect {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(LinkError::Connect { address, source }),
            Err(_) => {
                let source = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                return Err(LinkError::Connect { address, source });
            }
        };
        // Small pipelines must not wait for Nagle's algorithm.
        stream.set_nodelay(true).map_err(LinkError::Io)?;
        let (read, write) = stream.into_split();
        let mut link = Link {
            reader: Reader { stream: read, buffer: BytesMut::new(), reply_bytes_max: options.reply_bytes_max },
            writer: Writer { stream: write, out: BytesMut::new(), pipeline_bytes_max: options.pipeline_bytes_max },
            queued: 0,
            command_timeout: options.command_timeout,
            broken: false,
        };
        link.handshake(options).await?;
        Ok(link)
    }

    async fn handshake(&mut self, options: &LinkOptions) -> Result<(), LinkError> {
        match (&options.username, &options.password) {
            (Some(user), Some(password)) => self.queue(&[b"AUTH", user.as_bytes(), password.as_bytes()])?,
            (None, Some(password)) => self.queue(&[b"AUTH", password.as_bytes()])?,
            _ => {}
        }
        let db = options.db.to_string();
        if options.db != 0 {
            self.queue(&[b"SELECT", db.as_bytes()])?;
        }
        self.queue(&[b"PING"])?;
        let mut replies = Vec::with_capacity(3);
        self.flush(&mut replies).await?;
        for reply in &replies {
            if let Reply::Error(message) = reply {
                self.broken = true;
                return Err(LinkError::Handshake(message.to_string()));
            }
        }
        match replies.last() {
            Some(Reply::SimpleString(pong)) if &pong[..] == b"PONG" => Ok(()),
            other => {
                self.broken = true;
                Err(LinkError::Handshake(format!("PING answered {other:?}")))
            }
        }
    }

    /// Queues one command (`["SET", key, value]`); nothing is sent before `flush`.
    pub fn queue(&mut self, args: &[&[u8]]) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        assert!(!args.is_empty(), "a redis command has a name");
        self.writer.encode(args)?;
        self.queued += 1;
        Ok(())
    }

    /// Commands queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Sends the queued commands and appends their replies to `replies`, in order, all within
    /// `command_timeout`.
    pub async fn flush(&mut self, replies: &mut Vec<Reply>) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        if self.queued == 0 {
            return Ok(());
        }
        // Stays set if the round trip fails or the timeout drops it halfway: the stream may
        // then hold replies nobody will match, so the link must not be used again.
        self.broken = true;
        match monoio::time::timeout(self.command_timeout, self.round_trip(replies)).await {
            Ok(Ok(())) => {
                self.broken = false;
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(LinkError::Timeout(self.command_timeout)),
        }
    }

    async fn round_trip(&mut self, replies: &mut Vec<Reply>) -> Result<(), LinkError> {
        self.writer.write_out().await?;
        let expected = std::mem::take(&mut self.queued);
        replies.reserve(expected);
        for _ in 0..expected {
            replies.push(self.reader.next_frame().await?);
        }
        Ok(())
    }

    /// One command, one reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Reply, LinkError> {
        assert_eq!(self.queued, 0, "command() would flush commands queued by someone else");
        self.queue(args)?;
        let mut replies = Vec::with_capacity(1);
        self.flush(&mut replies).await?;
        Ok(replies.pop().expect("flush returns one reply per queued command"))
    }

    /// Turns this connection into a subscriber: from now on it only receives pushes.
    pub fn into_subscriber(self) -> Result<(Subscriptions, Pushes), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        assert_eq!(self.queued, 0, "a subscriber must not inherit unanswered commands");
        let subscriptions = Subscriptions { writer: self.writer, command_timeout: self.command_timeout, broken: false };
        Ok((subscriptions, Pushes { reader: self.reader }))
    }
}

/// The write half of a subscriber connection.
pub struct Subscriptions {
    writer: Writer,
    command_timeout: Duration,
    broken: bool,
}

impl Subscriptions {
    /// Subscribes to sharded pub/sub channels; each confirmation arrives as `Push::Subscribed`.
    pub async fn ssubscribe(&mut self, channels: &[&[u8]]) -> Result<(), LinkError> {
        self.send(b"SSUBSCRIBE", channels).await
    }

    /// Unsubscribes; each confirmation arrives as `Push::Unsubscribed`.
    pub async fn sunsubscribe(&mut self, channels: &[&[u8]]) -> Result<(), LinkError> {
        self.send(b"SUNSUBSCRIBE", channels).await
    }

    /// Asks for a `Push::Pong`, which arrives after every push Redis queued before it (the
    /// marker of docs/cluster.md's resync barrier, and a liveness check).
    pub async fn ping(&mut self) -> Result<(), LinkError> {
        self.send(b"PING", &[]).await
    }

    async fn send(&mut self, name: &[u8], channels: &[&[u8]]) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + channels.len());
        args.push(name);
        args.extend_from_slice(channels);
        self.broken = true;
        self.writer.encode(&args)?;
        match monoio::time::timeout(self.command_timeout, self.writer.write_out()).await {
            Ok(Ok(())) => {
                self.broken = false;
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(LinkError::Timeout(self.command_timeout)),
        }
    }
}

/// What a subscriber connection receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A message published with `SPUBLISH`; both are slices of the read buffer.
    Message {
        /// The sharded channel.
        channel: Bytes,
        /// The payload, as published.
        payload: Bytes,
    },
    /// `SSUBSCRIBE` confirmed; `count` is this connection's sharded subscriptions now.
    Subscribed {
        /// The sharded channel.
        channel: Bytes,
        /// Subscriptions of this connection.
        count: i64,
    },
    /// `SUNSUBSCRIBE` confirmed, or Redis dropped the subscription (a slot moved).
    Unsubscribed {
        /// The sharded channel.
        channel: Bytes,
        /// Subscriptions of this connection.
        count: i64,
    },
    /// The answer to `Subscriptions::ping`.
    Pong,
    /// Redis refused a subscription command (an error reply).
    Refused(String),
}

/// The read half of a subscriber connection.
pub struct Pushes {
    reader: Reader,
}

impl Pushes {
    /// The next push. No timeout: silence is normal on a subscriber; `Subscriptions::ping`
    /// (answered by `Push::Pong`) is how a caller checks it is alive.
    pub async fn next(&mut self) -> Result<Push, LinkError> {
        let frame = self.reader.next_frame().await?;
        push_of(frame)
    }
}

/// Classifies a frame received on a subscriber connection (RESP2: pushes are arrays whose
/// first element names their kind).
fn push_of(frame: Reply) -> Result<Push, LinkError> {
    let unexpected = |frame: &Reply| LinkError::Protocol(format!("unexpected push {frame:?}"));
    let parts = match frame {
        Reply::Error(message) => return Ok(Push::Refused(message.to_string())),
        // Before the first subscription, PING is answered like on any connection.
        Reply::SimpleString(ref pong) if &pong[..] == b"PONG" => return Ok(Push::Pong),
        Reply::Array(parts) => parts,
        other => return Err(unexpected(&other)),
    };
    match parts.as_slice() {
        [Reply::BulkString(kind), Reply::BulkString(channel), Reply::BulkString(payload)]
            if &kind[..] == b"smessage" =>
        {
            Ok(Push::Message { channel: channel.clone(), payload: payload.clone() })
        }
        [Reply::BulkString(kind), Reply::BulkString(channel), Reply::Integer(count)] => match &kind[..] {
            b"ssubscribe" => Ok(Push::Subscribed { channel: channel.clone(), count: *count }),
            b"sunsubscribe" => Ok(Push::Unsubscribed { channel: channel.clone(), count: *count }),
            _ => Err(unexpected(&Reply::Array(parts))),
        },
        [Reply::BulkString(kind), Reply::BulkString(_)] if &kind[..] == b"pong" => Ok(Push::Pong),
        _ => Err(unexpected(&Reply::Array(parts))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Reply {
        Reply::BulkString(Bytes::copy_from_slice(text.as_bytes()))
    }

    fn check(frame: Reply, expected: Option<Push>) {
        match (push_of(frame.clone()), expected) {
            (Ok(push), Some(expected)) => assert_eq!(push, expected, "{frame:?}"),
            (Err(LinkError::Protocol(_)), None) => {}
            (other, expected) => panic!("{frame:?}: got {other:?}, expected {expected:?}"),
        }
    }

    /// Every push Redis 7 sends on a RESP2 sharded subscriber is recognised; anything else is
    /// a protocol error, not a panic.
    #[test]
    fn classifies_pushes() {
        let channel = Bytes::from_static(b"ch");
        check(
            Reply::Array(vec![bulk("smessage"), bulk("ch"), bulk("hello")]),
            Some(Push::Message { channel: channel.clone(), payload: Bytes::from_static(b"hello") }),
        );
        check(
            Reply::Array(vec![bulk("ssubscribe"), bulk("ch"), Reply::Integer(1)]),
            Some(Push::Subscribed { channel: channel.clone(), count: 1 }),
        );
        check(
            Reply::Array(vec![bulk("sunsubscribe"), bulk("ch"), Reply::Integer(0)]),
            Some(Push::Unsubscribed { channel, count: 0 }),
        );
        check(Reply::Array(vec![bulk("pong"), bulk("")]), Some(Push::Pong));
        check(Reply::SimpleString(Bytes::from_static(b"PONG")), Some(Push::Pong));
        check(Reply::Error("ERR CROSSSLOT".into()), Some(Push::Refused("ERR CROSSSLOT".into())));
        check(Reply::Array(vec![bulk("message"), bulk("ch"), bulk("x")]), None);
        check(Reply::Array(vec![bulk("subscribe"), bulk("ch"), Reply::Integer(1)]), None);
        check(Reply::Array(vec![]), None);
        check(Reply::Integer(3), None);
        check(Reply::Null, None);
    }
}
