//! Cluster mode under faults: a node cut off from Redis and back, Redis killed and restarted
//! under a stream of publishes, and a rolling restart. What must hold (docs/cluster.md, "When
//! Redis is unreachable"): a publish answered 200 reaches every subscriber that stays connected,
//! in order; a subscriber that may have missed one is closed with 4200, never left silently
//! behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::cluster::RedisServer;
use crate::support::*;

/// A cluster node on the Redis at `url`. The faults here close or reset connections, which a
/// link notices at once; the command timeout (the heartbeat's bound, for a Redis that goes
/// silent) stays long enough that a loaded test machine's stalls do not take links down.
pub(crate) fn node_on(url: String, prefix: &str) -> TestServer {
    let prefix = prefix.to_string();
    TestServer::start(move |c| {
        c.cluster.redis_url = Some(url);
        c.cluster.prefix = prefix;
        c.cluster.command_timeout_ms = 2000;
        c.cluster.connect_timeout_ms = 500;
    })
}

/// A new subscriber on `on` gets an event published through `via`. A link that went down and
/// came back meanwhile may close it with 4200 first (the contract: never silence); then it
/// subscribes again, as pusher-js would.
fn fresh_subscriber_receives(on: SocketAddr, via: SocketAddr, channel: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        assert!(Instant::now() < deadline, "no event reached a new subscriber on {on}");
        let (mut fresh, _) = connect(on);
        subscribe(&mut fresh, channel);
        let data = (1000 + attempt).to_string();
        if try_publish(via, channel, &data) != 200 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        match drain(&mut fresh, channel, Duration::from_secs(5)) {
            (seen, _) if seen.contains(&(1000 + attempt)) => return,
            (_, Some(4200)) => continue,
            other => panic!("a new subscriber missed an accepted event silently: {other:?}"),
        }
    }
}

/// Polls `/ready` until it answers `status`.
fn wait_ready(addr: SocketAddr, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if try_get(addr, "/ready") == status {
            return;
        }
        assert!(Instant::now() < deadline, "/ready of {addr} never answered {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The status of a GET, 0 when the node cannot be reached.
fn try_get(addr: SocketAddr, path: &str) -> u16 {
    try_request(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
}

/// Publishes `data` on `channel`; the status, 0 when the node cannot be reached (a stopped
/// node refuses the connection or resets it: for the publisher that is one more "not 200").
fn try_publish(addr: SocketAddr, channel: &str, data: &str) -> u16 {
    let body = serde_json::json!({"name": "my-event", "channels": [channel], "data": data}).to_string();
    let path = signed_path("POST", &format!("/apps/{APP_ID}/events"), body.as_bytes(), &[]);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    try_request(addr, request.as_bytes())
}

fn try_request(addr: SocketAddr, request: &[u8]) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr) else { return 0 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut response = Vec::new();
    if stream.write_all(request).is_err() || stream.read_to_end(&mut response).is_err() {
        return 0;
    }
    parse_response(&response).0
}

fn event(channel: &str, data: &str) -> String {
    format!(r#"{{"event":"my-event","channel":"{channel}","data":"{data}"}}"#)
}

/// Reads until `quiet` passes without a message or the server closes: the `data` of each
/// event, and the close code if it closed.
fn drain(ws: &mut Ws, channel: &str, quiet: Duration) -> (Vec<u64>, Option<u16>) {
    ws.get_mut().set_read_timeout(Some(quiet)).unwrap();
    let prefix = format!(r#"{{"event":"my-event","channel":"{channel}","data":""#);
    let mut seen = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let number = text
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(r#""}"#))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected message {text}"));
                seen.push(number);
            }
            Ok(Message::Close(frame)) => return (seen, Some(frame.map_or(1005, |f| u16::from(f.code)))),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                return (seen, None)
            }
            Err(e) => panic!("connection failed without a close frame: {e}"),
        }
    }
}

/// Checks what one subscriber saw against the publishes answered 200 (`accepted`, in order):
/// strictly increasing (in order, none twice), and no accepted event missing between the first
/// and the last it saw, or anywhere when `all` (it stayed subscribed throughout). An event that
/// is not in `accepted` may appear: a publish that was executed but whose answer was lost (a
/// timeout, a node stopping) is not a 200, and the contract allows it to be delivered.
fn check_run(seen: &[u64], accepted: &[u64], all: bool) {
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "out of order or twice: {seen:?}");
    let (Some(&first), Some(&last)) = (seen.first(), seen.last()) else {
        assert!(!all || accepted.is_empty(), "saw nothing of {accepted:?}");
        return;
    };
    let missing: Vec<u64> = accepted
        .iter()
        .copied()
        .filter(|n| (all || (first..=last).contains(n)) && seen.binary_search(n).is_err())
        .collect();
    assert!(missing.is_empty(), "accepted events missing: {missing:?}; saw {seen:?}");
}

/// A TCP proxy in front of Redis for one node: `cut` resets every connection through it and
/// refuses new ones until `heal`, which is how a network partition looks to the node.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub(crate) fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (cut_flag, open_list) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut_flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let mut list = open_list.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                let (client_read, server_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(client_read, server_write));
                std::thread::spawn(move || pipe(server, client));
            }
        });
        Proxy { addr, cut, open }
    }

    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(crate) fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Node B cut off from Redis while node A goes on publishing: B's /ready answers 503 and its
/// API refuses publishes; A's subscriber gets every event. When B is back, its subscriber of
/// the channel that had traffic meanwhile is closed with 4200 right after the last event it
/// did get, while B's subscriber of a channel in a quiet bucket stays and gets what follows.
#[test]
fn partitioned_node_closes_only_what_it_missed() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr);
    let a = node_on(format!("redis://{}", redis.addr), "partition");
    let b = node_on(format!("redis://{}", proxy.addr), "partition");
    wait_ready(a.addr, 200);
    wait_ready(b.addr, 200);
    let quiet_channel = crate::cluster_nodes::other_bucket_channel("busy");
    let (mut on_a, _) = connect(a.addr);
    subscribe(&mut on_a, "busy");
    let (mut on_b, _) = connect(b.addr);
    subscribe(&mut on_b, "busy");
    let (mut quiet_on_b, _) = connect(b.addr);
    subscribe(&mut quiet_on_b, &quiet_channel);

    assert_eq!(try_publish(a.addr, "busy", "1"), 200);
    assert_eq!(recv_text(&mut on_b), event("busy", "1"));
    proxy.cut();
    wait_ready(b.addr, 503);
    assert_eq!(try_publish(b.addr, "busy", "99"), 503, "a cut-off node must not accept a publish");
    for n in 2..=3 {
        assert_eq!(try_publish(a.addr, "busy", &n.to_string()), 200);
    }
    proxy.heal();
    wait_ready(b.addr, 200);

    assert_eq!(drain(&mut on_b, "busy", Duration::from_secs(5)), (vec![], Some(4200)));
    assert_eq!(try_publish(a.addr, "busy", "4"), 200);
    assert_eq!(try_publish(a.addr, &quiet_channel, "5"), 200);
    assert_eq!(drain(&mut on_a, "busy", Duration::from_millis(500)), (vec![1, 2, 3, 4], None));
    assert_eq!(recv_text(&mut quiet_on_b), event(&quiet_channel, "5"));
    let (mut again, _) = connect(b.addr);
    subscribe(&mut again, "busy");
    assert_eq!(try_publish(a.addr, "busy", "6"), 200);
    assert_eq!(recv_text(&mut again), event("busy", "6"));
}

/// Publishes events numbered from 0 one after another, round robin over `nodes`, each after
/// the previous answer, until `done(n, accepted since the first refusal)` or 30 s; returns the
/// events answered 200 (in order) and the number refused.
fn publish_stream(nodes: Vec<SocketAddr>, channel: &'static str, done: impl Fn(u64, usize) -> bool) -> (Vec<u64>, u64) {
    let (mut accepted, mut refused, mut accepted_since_refusal) = (Vec::new(), 0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        if done(n, accepted_since_refusal) || Instant::now() > deadline {
            break;
        }
        if try_publish(nodes[n as usize % nodes.len()], channel, &n.to_string()) == 200 {
            accepted.push(n);
            accepted_since_refusal += usize::from(refused > 0);
        } else {
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    (accepted, refused)
}

/// Redis killed and restarted (empty) while events are published through two nodes: the
/// publishes in the outage are refused (503s, counted), none is answered 200 and lost. Each
/// subscriber either got every accepted event in order, or got a run of them with no hole and
/// was then closed with 4200; after the return, new subscribers get what follows.
#[test]
fn redis_restart_under_publishing() {
    let mut redis = RedisServer::start();
    let nodes = [0, 1].map(|_| node_on(format!("redis://{}", redis.addr), "restart"));
    for node in &nodes {
        wait_ready(node.addr, 200);
    }
    let mut subscribers: Vec<Ws> = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let (mut ws, _) = connect(node.addr);
            subscribe(&mut ws, "stream");
            subscribers.push(ws);
        }
    }
    let addrs = nodes.iter().map(|n| n.addr).collect();
    // Until 100 publishes were accepted after the outage (the links come back with backoff).
    let publisher = std::thread::spawn(move || publish_stream(addrs, "stream", |_, after| after >= 100));
    std::thread::sleep(Duration::from_millis(300));
    redis.kill();
    std::thread::sleep(Duration::from_millis(700));
    redis.restart();
    let (accepted, refused) = publisher.join().unwrap();
    assert!(refused > 0, "the outage refused no publish: it was not observed");
    assert!(accepted.len() >= 100, "the publishes after the outage were not accepted");
    for node in &nodes {
        wait_ready(node.addr, 200);
    }
    for ws in &mut subscribers {
        let (seen, closed) = drain(ws, "stream", Duration::from_secs(2));
        match closed {
            None => check_run(&seen, &accepted, true),
            Some(code) => {
                assert_eq!(code, 4200);
                check_run(&seen, &accepted, false);
            }
        }
    }
    fresh_subscriber_receives(nodes[1].addr, nodes[0].addr, "stream");
}

/// A rolling restart: node C stops gracefully (SIGTERM's path) while events stream through A,
/// B and C. C's clients are closed with 4200 and reconnect to A; A's and B's get every accepted
/// event in order, C's a hole-free run before the close, and after reconnecting every
/// accepted event from their new subscription on.
#[test]
fn rolling_restart_loses_nothing() {
    let redis = RedisServer::start();
    let mut nodes: Vec<Option<TestServer>> =
        (0..3).map(|_| Some(node_on(format!("redis://{}", redis.addr), "rolling"))).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.as_ref().unwrap().addr).collect();
    for &addr in &addrs {
        wait_ready(addr, 200);
    }
    let mut staying: Vec<Ws> = Vec::new();
    let mut moving: Vec<Ws> = Vec::new();
    for (index, &addr) in addrs.iter().enumerate() {
        for _ in 0..2 {
            let (mut ws, _) = connect(addr);
            subscribe(&mut ws, "stream");
            if index == 2 {
                moving.push(ws)
            } else {
                staying.push(ws)
            }
        }
    }
    let publisher = {
        let addrs = addrs.clone();
        std::thread::spawn(move || publish_stream(addrs, "stream", |n, _| n >= 300))
    };
    std::thread::sleep(Duration::from_millis(300));
    drop(nodes[2].take()); // shutdown + join: the close window, then the node is gone
    let mut moved = Vec::new();
    for ws in &mut moving {
        let (before, closed) = drain(ws, "stream", Duration::from_secs(5));
        assert_eq!(closed, Some(4200), "C's clients are closed with 4200");
        let (mut new, _) = connect(addrs[0]);
        subscribe(&mut new, "stream");
        moved.push((before, new));
    }
    let (accepted, refused) = publisher.join().unwrap();
    assert!(refused > 0, "no publish went to the stopped node");
    assert!(accepted.len() >= 150, "only {} of 300 accepted", accepted.len());
    for ws in &mut staying {
        let (seen, closed) = drain(ws, "stream", Duration::from_secs(1));
        assert_eq!(closed, None);
        check_run(&seen, &accepted, true);
    }
    for (before, mut ws) in moved {
        check_run(&before, &accepted, false);
        let (after, closed) = drain(&mut ws, "stream", Duration::from_secs(1));
        assert_eq!(closed, None);
        // Subscribed again: every accepted event from its first one on, to the end.
        let from = after.first().copied().unwrap_or(u64::MAX);
        let rest: Vec<u64> = accepted.iter().copied().filter(|&n| n >= from).collect();
        assert!(!rest.is_empty(), "nothing after reconnecting");
        check_run(&after, &rest, true);
    }
    drop(nodes);
}
