//! The ceiling: the same fan-out as `loadgen fanout`, with no protocol work, so BENCHMARKS.md
//! can say how close ringwire comes to what this machine can do.
//!
//! `cargo bench --bench ceiling -- [--shards 2] [--bind 127.0.0.1:0]` prints
//! `ceiling listening on ADDR`. It accepts the generator's WebSockets with canned handshake
//! replies, then waits for `POST /start?rate=R&duration_ms=D&channels=C` (sent by
//! `loadgen fanout --ceiling`). From then a plain thread schedules event k at start + k/R on
//! channel k mod C, exactly like the generator's publisher, and hands it to every shard through
//! a lock-free queue; each shard formats the frame once (the intended send time is the only
//! variable part) and writes it to its subscribers with the same batched writev as ringwire.
//! No HTTP API, no JSON parsing, no mesh, no limits: what is left is the kernel and the runtime.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use crossbeam::queue::ArrayQueue;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use ringwire::buf::FrameBatch;
use ringwire::pusher::message::{self, SocketId};
use ringwire::ws::frame;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The run the generator asked for; `started` flips when `/start` arrives.
#[derive(Default)]
struct Run {
    rate: AtomicU64,
    duration_ms: AtomicU64,
    channels: AtomicU64,
    started: AtomicBool,
}

/// Events for one shard: (channel, intended send time in ns).
struct Feed {
    queue: ArrayQueue<(u32, u64)>,
    waker: AtomicWaker,
}

/// One subscriber: frames waiting for its writer.
struct Subscriber {
    queue: RefCell<VecDeque<Bytes>>,
    writer: RefCell<Option<Waker>>,
    dead: Cell<bool>,
}

type Channels = Rc<RefCell<Vec<Vec<Rc<Subscriber>>>>>;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let (mut shards, mut bind) = (2usize, "127.0.0.1:0".to_string());
    while let (Some(flag), Some(value)) = (args.next(), args.next()) {
        match flag.as_str() {
            "--shards" => shards = value.parse().expect("--shards"),
            "--bind" => bind = value,
            other => panic!("unknown option {other}"),
        }
    }
    let bind: SocketAddr = bind.parse().expect("--bind");
    let (listeners, addr) = ringwire::net::listener::bind(bind, shards, 4096).expect("bind");
    let run = Arc::new(Run::default());
    let feeds: Vec<Arc<Feed>> =
        (0..shards).map(|_| Arc::new(Feed { queue: ArrayQueue::new(1 << 16), waker: AtomicWaker::new() })).collect();
    for (index, listener) in listeners.into_iter().enumerate() {
        let (run, feed) = (run.clone(), feeds[index].clone());
        std::thread::spawn(move || {
            let _ = monoio::utils::bind_to_cpu_set([index % num_cpus()]);
            let mut runtime =
                monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().expect("runtime");
            runtime.block_on(shard(listener, feed, run));
        });
    }
    println!("ceiling listening on {addr}");
    let _ = std::io::stdout().flush();
    generate(&run, &feeds);
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// The open-loop schedule, on this (plain) thread: event k at start + k/rate.
fn generate(run: &Run, feeds: &[Arc<Feed>]) {
    loop {
        while !run.started.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let rate = run.rate.load(Ordering::Relaxed).max(1);
        let channels = run.channels.load(Ordering::Relaxed).max(1);
        let total = rate * run.duration_ms.load(Ordering::Relaxed) / 1000;
        let (start, start_ns) = (Instant::now(), now_ns());
        for k in 0..total {
            let due_ns = k * 1_000_000_000 / rate;
            let due = start + Duration::from_nanos(due_ns);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            for feed in feeds {
                while feed.queue.push(((k % channels) as u32, start_ns + due_ns)).is_err() {
                    std::thread::yield_now();
                }
                feed.waker.wake();
            }
        }
        run.started.store(false, Ordering::Release);
    }
}

async fn shard(listener: std::net::TcpListener, feed: Arc<Feed>, run: Arc<Run>) {
    let listener = monoio::net::TcpListener::from_std(listener).expect("listener");
    let channels: Channels = Rc::new(RefCell::new(Vec::new()));
    monoio::spawn(pump(feed, channels.clone()));
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        monoio::spawn(connection(stream, channels.clone(), run.clone()));
    }
}

/// Formats each event once and queues the same bytes on every local subscriber of its channel.
async fn pump(feed: Arc<Feed>, channels: Channels) {
    let pad = "x".repeat(60);
    loop {
        poll_fn(|cx| {
            if !feed.queue.is_empty() {
                return Poll::Ready(());
            }
            feed.waker.register(cx.waker());
            if feed.queue.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        while let Some((channel, intended_ns)) = feed.queue.pop() {
            let payload = format!(
                r#"{{"event":"bench","channel":"bench-{channel}","data":"{{\"t\":{intended_ns},\"pad\":\"{pad}\"}}"}}"#
            );
            let frame = frame::encode_text(payload.as_bytes());
            let channels = channels.borrow();
            for subscriber in channels.get(channel as usize).into_iter().flatten() {
                if subscriber.dead.get() {
                    continue;
                }
                subscriber.queue.borrow_mut().push_back(frame.clone());
                if let Some(waker) = subscriber.writer.borrow_mut().take() {
                    waker.wake();
                }
            }
        }
    }
}

async fn read_more(stream: &mut TcpStream, mut buf: BytesMut) -> (std::io::Result<usize>, BytesMut) {
    buf.reserve(1024);
    let len = buf.len();
    let (result, slice) = stream.read(buf.slice_mut(len..)).await;
    (result, slice.into_inner())
}

/// Handshake with canned replies, learn the channel, then write frames until the peer goes.
async fn connection(mut stream: TcpStream, channels: Channels, run: Arc<Run>) {
    let mut buf = BytesMut::with_capacity(1024);
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let (result, b) = read_more(&mut stream, buf).await;
        buf = b;
        if !matches!(result, Ok(n) if n > 0) {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.advance(head_end);
    if let Some(rest) = head.strip_prefix("POST /start?") {
        let query = rest.split_whitespace().next().unwrap_or("");
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value: u64 = value.parse().unwrap_or(0);
            match key {
                "rate" => run.rate.store(value, Ordering::Relaxed),
                "duration_ms" => run.duration_ms.store(value, Ordering::Relaxed),
                "channels" => run.channels.store(value, Ordering::Relaxed),
                _ => {}
            }
        }
        run.started.store(true, Ordering::Release);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()).await;
        return;
    }
    let key = head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).unwrap_or("").trim().to_string();
    let mut reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    reply.extend_from_slice(&message::connection_established(SocketId { sequence: 1, random: 1 }, 120));
    if stream.write_all(reply).await.0.is_err() {
        return;
    }
    // The subscribe: one small masked frame; its channel is `bench-N`.
    let channel = loop {
        if buf.len() >= 6 && buf.len() >= 6 + (buf[1] & 0x7f) as usize {
            let length = (buf[1] & 0x7f) as usize;
            let mask = [buf[2], buf[3], buf[4], buf[5]];
            let mut payload = buf[6..6 + length].to_vec();
            frame::unmask(&mut payload, mask);
            let text = String::from_utf8_lossy(&payload).to_string();
            let number = text
                .split("bench-")
                .nth(1)
                .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect::<String>());
            break number.and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
        }
        let (result, b) = read_more(&mut stream, buf).await;
        buf = b;
        if !matches!(result, Ok(n) if n > 0) {
            return;
        }
    };
    if stream.write_all(message::subscription_succeeded(&format!("bench-{channel}")).to_vec()).await.0.is_err() {
        return;
    }
    let subscriber = Rc::new(Subscriber {
        queue: RefCell::new(VecDeque::new()),
        writer: RefCell::new(None),
        dead: Cell::new(false),
    });
    {
        let mut channels = channels.borrow_mut();
        if channels.len() <= channel {
            channels.resize_with(channel + 1, Vec::new);
        }
        channels[channel].push(subscriber.clone());
    }
    let (_reader, mut writer) = stream.into_split();
    loop {
        let frames: Vec<Bytes> = poll_fn(|cx| {
            let mut queue = subscriber.queue.borrow_mut();
            if queue.is_empty() {
                *subscriber.writer.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = queue.len().min(64);
            Poll::Ready(queue.drain(..n).collect())
        })
        .await;
        let mut batch = FrameBatch::new(frames);
        loop {
            let (result, returned) = writer.writev(batch).await;
            batch = returned;
            match result {
                Ok(n) if n > 0 => {
                    batch.advance(n);
                    if batch.is_done() {
                        break;
                    }
                }
                _ => {
                    subscriber.dead.set(true);
                    subscriber.queue.borrow_mut().clear();
                    return;
                }
            }
        }
    }
}
