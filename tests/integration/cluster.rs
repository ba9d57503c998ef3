//! Cluster mode: the Redis link against a real redis-server that each test starts on a free
//! 127.0.0.1 port (no persistence) and kills when it ends. Needs `redis-server` on PATH
//! (`scripts/redis install`).

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ringwire::cluster::bucket;
use ringwire::cluster::link::{Link, LinkError, LinkOptions, Push, Reply};
use ringwire::cluster::message::{self, Header, Kind, Sender};
use ringwire::cluster::sequence::{BucketId, GapReason};
use ringwire::cluster::supervisor::{Events, Gap, Supervisor, SupervisorOptions};
use ringwire::cluster::NodeIdentity;
use ringwire::metrics::ShardMetrics;

/// A redis-server of the test's own; killed (and reaped) when dropped.
pub struct RedisServer {
    child: Child,
    pub addr: SocketAddr,
    /// The extra arguments it was started with, for `restart`.
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one with no persistence on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts one with extra `--option value` arguments (e.g. `--requirepass`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        // The free port is found by binding port 0 and closing it, so another process can take
        // it before redis-server does: then redis-server exits and we try another.
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            if let Some(child) = spawn_redis(addr, &extra) {
                return RedisServer { child, addr, extra };
            }
        }
        panic!("redis-server did not start");
    }

    /// Starts a new, empty redis-server on the same port (after `kill`), as a restart without
    /// persistence would.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_redis(self.addr, &self.extra).expect("redis-server restarts on its port");
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns redis-server on `addr` and waits until it answers; `None` if it exits first (the
/// port was taken) or does not answer within 10 s.
fn spawn_redis(addr: SocketAddr, extra: &[String]) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string(), "--save", "", "--appendonly", "no"])
        .args(["--dir", std::env::temp_dir().to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs (install it with scripts/redis install)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if answers_ping(addr, child.id()) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Whether the redis-server with process id `pid` answers on `addr`: an inline `INFO server`
/// naming that process (another test's server that took the port first must not pass for
/// ours), or, when a password is required, `-NOAUTH` (then the port was free for ours, whose
/// child is still alive).
fn answers_ping(addr: SocketAddr, pid: u32) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&reply).to_string();
        if text.starts_with("-NOAUTH") {
            return true;
        }
        // A bulk string: `$<length>\r\n<body>\r\n`.
        if let Some((length, body)) = text.strip_prefix('$').and_then(|rest| rest.split_once("\r\n")) {
            if let Ok(length) = length.parse::<usize>() {
                if body.len() >= length {
                    return body.contains(&format!("\r\nprocess_id:{pid}\r\n"));
                }
            }
        }
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => reply.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
}

/// Runs a future on a monoio runtime with timers, on the driver the test run asks for.
/// Runs a future on a monoio runtime of its own thread. Not on the test's thread: io_uring
/// completes work on the thread that submitted it, and a completion left behind by a dropped
/// runtime interrupts that thread's next blocking socket read with EINTR (seen in CI as
/// "Interrupted system call" in a tungstenite read right after a `run`).
pub fn run<F, Fut>(make: F) -> Fut::Output
where
    F: FnOnce() -> Fut + Send,
    Fut: Future,
    Fut::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if std::env::var("RINGWIRE_TEST_DRIVER").as_deref() == Ok("epoll") {
                    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .unwrap()
                        .block_on(make())
                } else {
                    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .enable_timer()
                        .build()
                        .unwrap()
                        .block_on(make())
                }
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

pub fn options() -> LinkOptions {
    LinkOptions {
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        reply_bytes_max: 1 << 20,
        pipeline_bytes_max: 1 << 20,
        username: None,
        password: None,
        db: 0,
    }
}

fn bulk(text: &str) -> Reply {
    Reply::BulkString(Bytes::copy_from_slice(text.as_bytes()))
}

fn simple(text: &str) -> Reply {
    Reply::SimpleString(Bytes::copy_from_slice(text.as_bytes()))
}

/// PING, SET and GET work; a Redis error reply is a value and leaves the link usable.
#[test]
fn link_ping_set_get() {
    let redis = RedisServer::start();
    run(|| async {
        let mut link = Link::connect(redis.addr, &options()).await.unwrap();
        assert_eq!(link.command(&[b"PING"]).await.unwrap(), simple("PONG"));
        assert_eq!(link.command(&[b"SET", b"k", b"v\r\n\0binary"]).await.unwrap(), simple("OK"));
        assert_eq!(link.command(&[b"GET", b"k"]).await.unwrap(), bulk("v\r\n\0binary"));
        assert_eq!(link.command(&[b"GET", b"missing"]).await.unwrap(), Reply::Null);
        match link.command(&[b"INCR", b"k"]).await.unwrap() {
            Reply::Error(message) => assert!(message.starts_with("ERR"), "{message}"),
            other => panic!("INCR of a string answered {other:?}"),
        }
        assert_eq!(link.command(&[b"PING"]).await.unwrap(), simple("PONG"));
    });
}

/// 1000 pipelined commands go out in one write and their replies come back matched in order.
#[test]
fn link_pipelines_1000_commands() {
    let redis = RedisServer::start();
    run(|| async {
        let mut link = Link::connect(redis.addr, &options()).await.unwrap();
        for i in 0..500 {
            let value = i.to_string();
            link.queue(&[b"SET", b"key", value.as_bytes()]).unwrap();
            link.queue(&[b"GET", b"key"]).unwrap();
        }
        assert_eq!(link.queued(), 1000);
        let mut replies = Vec::new();
        link.flush(&mut replies).await.unwrap();
        assert_eq!(replies.len(), 1000);
        for (i, pair) in replies.chunks(2).enumerate() {
            assert_eq!(pair, [simple("OK"), bulk(&i.to_string())]);
        }
        assert_eq!(link.queued(), 0);
        // A second batch on the same link, many arguments (past the inline array).
        let args: Vec<Vec<u8>> = (0..20).map(|i| format!("m{i}").into_bytes()).collect();
        let mut command: Vec<&[u8]> = vec![b"SADD", b"set"];
        command.extend(args.iter().map(|a| a.as_slice()));
        assert_eq!(link.command(&command).await.unwrap(), Reply::Integer(20));
    });
}

/// A message SPUBLISHed on one link arrives on another link's SSUBSCRIBE, after its
/// confirmation; PING on the subscriber answers after the messages queued before it.
#[test]
fn sharded_pubsub_delivers_messages() {
    let redis = RedisServer::start();
    run(|| async {
        let (mut subscriptions, mut pushes) =
            Link::connect(redis.addr, &options()).await.unwrap().into_subscriber().unwrap();
        subscriptions.ssubscribe(&[b"rw:b:1:0"]).await.unwrap();
        let confirmed = pushes.next().await.unwrap();
        assert_eq!(confirmed, Push::Subscribed { channel: Bytes::from_static(b"rw:b:1:0"), count: 1 });

        let mut publisher = Link::connect(redis.addr, &options()).await.unwrap();
        let big = vec![b'x'; 100_000];
        publisher.queue(&[b"SPUBLISH", b"rw:b:1:0", b"hello"]).unwrap();
        publisher.queue(&[b"SPUBLISH", b"rw:b:1:0", &big]).unwrap();
        publisher.queue(&[b"SPUBLISH", b"rw:b:1:1", b"nobody listens"]).unwrap();
        let mut replies = Vec::new();
        publisher.flush(&mut replies).await.unwrap();
        assert_eq!(replies, [Reply::Integer(1), Reply::Integer(1), Reply::Integer(0)]);

        let channel = Bytes::from_static(b"rw:b:1:0");
        let hello = Push::Message { channel: channel.clone(), payload: Bytes::from_static(b"hello") };
        assert_eq!(pushes.next().await.unwrap(), hello);
        assert_eq!(pushes.next().await.unwrap(), Push::Message { channel: channel.clone(), payload: big.into() });
        subscriptions.ping().await.unwrap();
        assert_eq!(pushes.next().await.unwrap(), Push::Pong);
        subscriptions.sunsubscribe(&[b"rw:b:1:0"]).await.unwrap();
        assert_eq!(pushes.next().await.unwrap(), Push::Unsubscribed { channel, count: 0 });
    });
}

/// When redis-server is killed, a command and a waiting subscriber both end with an error
/// (not a hang), and the link then answers `Broken`.
#[test]
fn link_notices_redis_killed() {
    let mut redis = RedisServer::start();
    run(|| async {
        let mut link = Link::connect(redis.addr, &options()).await.unwrap();
        let (mut subscriptions, mut pushes) =
            Link::connect(redis.addr, &options()).await.unwrap().into_subscriber().unwrap();
        subscriptions.ssubscribe(&[b"c"]).await.unwrap();
        assert!(matches!(pushes.next().await.unwrap(), Push::Subscribed { .. }));
        redis.kill();
        // The subscriber is waiting in a read when the server dies: EOF or reset.
        let error = pushes.next().await.unwrap_err();
        assert!(matches!(error, LinkError::Closed | LinkError::Io(_)), "{error:?}");
        let error = link.command(&[b"PING"]).await.unwrap_err();
        assert!(matches!(error, LinkError::Closed | LinkError::Io(_)), "{error:?}");
        assert!(!error.link_usable());
        assert!(matches!(link.command(&[b"PING"]).await.unwrap_err(), LinkError::Broken));
        let error = Link::connect(redis.addr, &options()).await.err().expect("nothing listens");
        assert!(matches!(error, LinkError::Connect { .. }), "{error:?}");
    });
}

/// A reply over `reply_bytes_max` ends the link with `ReplyTooLarge` instead of growing the
/// buffer; a pipeline over `pipeline_bytes_max` is refused and the link stays usable.
#[test]
fn link_limits_reply_and_pipeline_size() {
    let redis = RedisServer::start();
    run(|| async {
        let limits = LinkOptions { reply_bytes_max: 65_536, pipeline_bytes_max: 300_000, ..options() };
        let mut link = Link::connect(redis.addr, &limits).await.unwrap();
        let big = vec![b'y'; 200_000];
        assert_eq!(link.command(&[b"SET", b"big", &big]).await.unwrap(), simple("OK"));
        let error = link.queue(&[b"SET", b"big2", &big]).and(link.queue(&[b"SET", b"big3", &big])).unwrap_err();
        assert!(matches!(error, LinkError::PipelineFull { limit: 300_000 }), "{error:?}");
        assert!(error.link_usable());
        let mut replies = Vec::new();
        link.flush(&mut replies).await.unwrap();
        assert_eq!(replies, [simple("OK")]);
        let error = link.command(&[b"GET", b"big"]).await.unwrap_err();
        assert!(matches!(error, LinkError::ReplyTooLarge { limit: 65_536 }), "{error:?}");
        assert!(matches!(link.command(&[b"PING"]).await.unwrap_err(), LinkError::Broken));
    });
}

/// A peer that accepts but never answers makes `connect` fail with `Timeout` after
/// `command_timeout`, not hang.
#[test]
fn link_times_out_on_a_silent_peer() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let accepter = std::thread::spawn(move || silent.accept().map(|(stream, _)| stream));
    run(|| async {
        let quick = LinkOptions { command_timeout: Duration::from_millis(200), ..options() };
        let error = Link::connect(addr, &quick).await.err().expect("a silent peer is no redis");
        assert!(matches!(error, LinkError::Timeout(_)), "{error:?}");
    });
    drop(accepter.join());
}

/// AUTH and SELECT run at connect; a wrong or missing password is a `Handshake` error.
#[test]
fn link_authenticates_and_selects() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    run(|| async {
        let good = LinkOptions { password: Some("s3cret".into()), db: 3, ..options() };
        let mut link = Link::connect(redis.addr, &good).await.unwrap();
        link.command(&[b"SET", b"in3", b"x"]).await.unwrap();
        let mut db0 = Link::connect(redis.addr, &LinkOptions { db: 0, ..good.clone() }).await.unwrap();
        assert_eq!(db0.command(&[b"GET", b"in3"]).await.unwrap(), Reply::Null);
        for password in [None, Some("wrong".to_string())] {
            let bad = LinkOptions { password, ..options() };
            let error = Link::connect(redis.addr, &bad).await.err().expect("refused");
            assert!(matches!(error, LinkError::Handshake(_)), "{error:?}");
        }
    });
}

/// What a supervisor told its shard, for the test to poll.
#[derive(Default)]
struct Told {
    /// (bucket, sender, sequence, frame) of each delivered message.
    messages: Vec<(BucketId, Sender, u64, Bytes)>,
    gaps: Vec<(BucketId, Gap)>,
    ups: usize,
    downs: usize,
}

struct Recorder(Rc<RefCell<Told>>);

impl Events for Recorder {
    fn message(&mut self, bucket: BucketId, header: &Header<'_>, frame: Bytes) {
        self.0.borrow_mut().messages.push((bucket, header.sender, header.sequence, frame));
    }
    fn gap(&mut self, bucket: BucketId, gap: Gap) {
        self.0.borrow_mut().gaps.push((bucket, gap));
    }
    fn link_up(&mut self) {
        self.0.borrow_mut().ups += 1;
    }
    fn link_down(&mut self, _error: &LinkError) {
        self.0.borrow_mut().downs += 1;
    }
}

const PREFIX: &str = "t";
const APP_ID: &str = "app";
const BUCKETS: u16 = 4;
const CHANNEL: &str = "my-channel";
/// Another node's shard publishing to the bucket.
const OTHER: Sender = Sender { incarnation: 0x77, shard: 1 };

/// A supervisor of shard 0 of 1 for one app, running on the current runtime; its link gauge,
/// and what it tells.
fn start_supervisor(redis: SocketAddr, command_timeout: Duration) -> (Arc<[ShardMetrics]>, Rc<RefCell<Told>>) {
    let metrics: Arc<[ShardMetrics]> = vec![ShardMetrics::default()].into();
    let told = Rc::new(RefCell::new(Told::default()));
    let options = SupervisorOptions {
        address: redis,
        link: LinkOptions { command_timeout, connect_timeout: command_timeout, ..options() },
        prefix: PREFIX.into(),
        apps: vec![(0, APP_ID.into())],
        buckets: BUCKETS,
        shards: 1,
        shard: 0,
        senders_max: 64,
        node: NodeIdentity { node_id: "test".into(), incarnation: 0x99 },
    };
    let supervisor = Supervisor::new(options, Recorder(told.clone()), metrics.clone(), fastrand::Rng::with_seed(7));
    assert_eq!(metrics[0].cluster_link_down.load(Ordering::Relaxed), 1, "down until the first barrier");
    monoio::spawn(supervisor.run());
    (metrics, told)
}

fn link_down(metrics: &[ShardMetrics]) -> bool {
    metrics[0].cluster_link_down.load(Ordering::Relaxed) == 1
}

/// Polls `condition` every 2 ms (yielding to the supervisor) until it holds or `limit` passes.
async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        monoio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

/// Publishes `sequence` of `OTHER` to CHANNEL's bucket as a sending node does: the SPUBLISH
/// and the HSET of its number in one MULTI/EXEC. Returns how many subscribers got it.
async fn publish(link: &mut Link, sequence: u64) -> i64 {
    let number = bucket::of_channel(CHANNEL, BUCKETS);
    let header = Header {
        kind: Kind::Publication,
        sender: OTHER,
        sequence,
        node_id: "other",
        app_id: APP_ID,
        channel: CHANNEL,
        user_id: "",
        exclude: None,
    };
    let mut payload = Vec::new();
    message::encode(&header, format!("frame {sequence}").as_bytes(), &mut payload).unwrap();
    let (mut channel, mut key, mut field) = (String::new(), String::new(), String::new());
    bucket::channel_name(PREFIX, APP_ID, number, &mut channel);
    bucket::sequence_key(PREFIX, APP_ID, number, &mut key);
    bucket::sequence_field(OTHER, &mut field);
    let sequence = sequence.to_string();
    link.queue(&[b"MULTI"]).unwrap();
    link.queue(&[b"SPUBLISH", channel.as_bytes(), &payload]).unwrap();
    link.queue(&[b"HSET", key.as_bytes(), field.as_bytes(), sequence.as_bytes()]).unwrap();
    link.queue(&[b"EXEC"]).unwrap();
    let mut replies = Vec::new();
    link.flush(&mut replies).await.unwrap();
    match &replies[..] {
        [_, _, _, Reply::Array(results)] => match results[0] {
            Reply::Integer(receivers) => receivers,
            _ => panic!("{replies:?}"),
        },
        _ => panic!("{replies:?}"),
    }
}

fn sequences(told: &Rc<RefCell<Told>>) -> Vec<u64> {
    told.borrow().messages.iter().map(|(_, _, sequence, _)| *sequence).collect()
}

fn the_bucket() -> BucketId {
    BucketId { app: 0, number: bucket::of_channel(CHANNEL, BUCKETS) }
}

/// The supervisor delivers bucket messages; when redis-server is killed its link is down
/// within the command timeout; when redis-server comes back empty on the same port it
/// reconnects, re-subscribes (a new SPUBLISH reaches it), and reports that the senders'
/// numbers were lost with Redis (a gap, once), while the sender's stream goes on in order.
#[test]
fn supervisor_survives_a_redis_restart() {
    let mut redis = RedisServer::start();
    run(|| async {
        let timeout = Duration::from_millis(500);
        let (metrics, told) = start_supervisor(redis.addr, timeout);
        wait_until(Duration::from_secs(5), "link up", || !link_down(&metrics)).await;
        assert_eq!(told.borrow().ups, 1);
        let mut publisher = Link::connect(redis.addr, &options()).await.unwrap();
        publish(&mut publisher, 1).await;
        wait_until(Duration::from_secs(5), "message 1", || sequences(&told) == [1]).await;
        let (bucket, sender, _, frame) = told.borrow().messages[0].clone();
        assert_eq!((bucket, sender, &frame[..]), (the_bucket(), OTHER, &b"frame 1"[..]));

        redis.kill();
        let took = wait_until(timeout, "link down after kill", || link_down(&metrics)).await;
        assert!(took < timeout, "{took:?}");
        assert_eq!(told.borrow().downs, 1);

        redis.restart();
        wait_until(Duration::from_secs(10), "link up after restart", || !link_down(&metrics)).await;
        assert_eq!(told.borrow().gaps, [(the_bucket(), Gap::Barrier(GapReason::Lost { sender: OTHER }))]);
        let mut publisher = Link::connect(redis.addr, &options()).await.unwrap();
        publish(&mut publisher, 2).await;
        wait_until(Duration::from_secs(5), "message 2", || sequences(&told) == [1, 2]).await;
        assert_eq!(told.borrow().gaps.len(), 1, "message 2 is in order");
        assert_eq!(told.borrow().ups, 2);
    });
}

/// Messages published while the supervisor's subscriber link was cut off are found by the
/// barrier after it reconnects (the hash is beyond what it saw): a gap in that bucket.
#[test]
fn supervisor_finds_messages_missed_while_cut_off() {
    let redis = RedisServer::start();
    run(|| async {
        let (metrics, told) = start_supervisor(redis.addr, Duration::from_secs(2));
        wait_until(Duration::from_secs(5), "link up", || !link_down(&metrics)).await;
        let mut publisher = Link::connect(redis.addr, &options()).await.unwrap();
        publish(&mut publisher, 1).await;
        wait_until(Duration::from_secs(5), "message 1", || sequences(&told) == [1]).await;
        // Cut the subscriber link and publish before the supervisor's backoff (80 ms at least)
        // lets it reconnect.
        let killed = publisher.command(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]).await.unwrap();
        assert_eq!(killed, Reply::Integer(1));
        assert_eq!(publish(&mut publisher, 2).await, 0, "published while cut off");
        assert_eq!(publish(&mut publisher, 3).await, 0, "published while cut off");
        wait_until(Duration::from_secs(5), "link down", || told.borrow().downs == 1).await;
        wait_until(Duration::from_secs(5), "link up again", || told.borrow().ups == 2).await;
        let missed = GapReason::Missed { sender: OTHER, seen: 1, published: 3 };
        assert_eq!(told.borrow().gaps, [(the_bucket(), Gap::Barrier(missed))]);
        publish(&mut publisher, 4).await;
        wait_until(Duration::from_secs(5), "message 4", || sequences(&told) == [1, 4]).await;
        assert_eq!(told.borrow().gaps.len(), 1, "message 4 is in order");
    });
}

/// A Redis that stops answering without closing (CLIENT PAUSE) is noticed by the heartbeat:
/// the link goes down within about the command timeout, and comes back after the pause.
#[test]
fn supervisor_notices_a_silent_redis() {
    let redis = RedisServer::start();
    run(|| async {
        let timeout = Duration::from_millis(300);
        let (metrics, told) = start_supervisor(redis.addr, timeout);
        wait_until(Duration::from_secs(5), "link up", || !link_down(&metrics)).await;
        let mut admin = Link::connect(redis.addr, &options()).await.unwrap();
        assert_eq!(admin.command(&[b"CLIENT", b"PAUSE", b"1500", b"ALL"]).await.unwrap(), simple("OK"));
        // A ping goes out every quarter timeout and is overdue one timeout later: about 1.25
        // timeouts; 3 allows for timers late on a loaded machine (657 ms was seen under load
        // for 2), while a missing heartbeat would never notice within the 2 s waited.
        let took = wait_until(Duration::from_secs(2), "link down", || link_down(&metrics)).await;
        assert!(took <= timeout * 3, "down after {took:?}");
        wait_until(Duration::from_secs(10), "link up after the pause", || !link_down(&metrics)).await;
        assert_eq!(told.borrow().gaps, [], "nothing was published, so nothing is missed");
    });
}

/// Round-trip latency of the link on this machine (a measurement, not an assertion):
/// `cargo test --release --test integration cluster::latency -- --ignored --nocapture`.
#[test]
#[ignore]
fn latency() {
    let redis = RedisServer::start();
    run(|| async {
        let mut link = Link::connect(redis.addr, &options()).await.unwrap();
        let (mut subscriptions, mut pushes) =
            Link::connect(redis.addr, &options()).await.unwrap().into_subscriber().unwrap();
        subscriptions.ssubscribe(&[b"bench"]).await.unwrap();
        pushes.next().await.unwrap();
        let payload = vec![b'p'; 200];
        let rounds = 20_000;
        let mut ping = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut publish = ping.clone();
        let mut pipelined = ping.clone();
        for _ in 0..rounds {
            let start = Instant::now();
            link.command(&[b"PING"]).await.unwrap();
            ping.record(start.elapsed().as_micros() as u64).unwrap();
        }
        let mut replies = Vec::new();
        for _ in 0..rounds {
            let start = Instant::now();
            link.queue(&[b"SPUBLISH", b"bench", &payload]).unwrap();
            link.flush(&mut replies).await.unwrap();
            assert!(matches!(pushes.next().await.unwrap(), Push::Message { .. }));
            publish.record(start.elapsed().as_micros() as u64).unwrap();
            replies.clear();
        }
        let batch = 100;
        let start = Instant::now();
        for _ in 0..rounds / batch {
            let batch_start = Instant::now();
            for _ in 0..batch {
                link.queue(&[b"SPUBLISH", b"bench", &payload]).unwrap();
            }
            link.flush(&mut replies).await.unwrap();
            for _ in 0..batch {
                assert!(matches!(pushes.next().await.unwrap(), Push::Message { .. }));
            }
            pipelined.record(batch_start.elapsed().as_micros() as u64).unwrap();
            replies.clear();
        }
        let rate = rounds as f64 / start.elapsed().as_secs_f64();
        for (name, h) in [("PING round trip", &ping), ("SPUBLISH -> message", &publish)] {
            println!(
                "{name}: p50 {} us, p99 {} us, max {} us",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
        println!(
            "SPUBLISH batches of {batch} (200 B) -> all messages: p50 {} us, p99 {} us; {rate:.0} messages/s",
            pipelined.value_at_quantile(0.5),
            pipelined.value_at_quantile(0.99)
        );
    });
}
