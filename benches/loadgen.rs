//! ringwire's load generator: Pusher-protocol fan-out with open-loop publishing.
//!
//! `cargo bench --bench loadgen -- fanout [options]` (see `--help`).
//!
//! - Subscribers: `--subscribers` WebSocket connections spread over `--channels` channels,
//!   run as monoio tasks on `--threads` runtime threads. Each frame's payload carries the
//!   publisher's *intended* send time; the receiver records `now - intended` into a per-thread
//!   hdrhistogram, merged at the end. Measuring from the intended time (not the actual send)
//!   means a stalled server cannot hide its stall: there is no coordinated omission.
//! - Publisher: open loop at `--rate` events/s through the signed HTTP API over
//!   `--publish-connections` keep-alive connections, round-robin over the channels. It never
//!   waits for the server to catch up before scheduling the next event.
//! - Output: one JSON object on stdout (for scripts/bench), a summary on stderr.
//! - `--tls-addr ADDR --ca FILE`: subscribers connect with TLS (`wss://`, rustls through
//!   monoio-rustls, the CA's certificates as the only roots) while the publisher keeps the plain
//!   HTTP API on `--addr`, so only the fan-out path changes between a ws and a wss run.
//! - `handshakes`: N full TLS handshakes plus WebSocket upgrades with concurrency C (see
//!   `--help`), for handshakes/s; `connections` holds idle subscribed connections, over TLS too.
//!
//! The generator's own cost is reported (`generator_cpu_s`) so a run can show that the
//! generator was not the bottleneck it measured.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Options {
    addr: SocketAddr,
    app_id: String,
    key: String,
    secret: String,
    channels: usize,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    payload: usize,
    threads: usize,
    publish_connections: usize,
    nchan: bool,
    ceiling: bool,
    /// Subscribers use `wss://` on this address (the publisher stays on `addr`).
    tls_addr: Option<SocketAddr>,
    /// `--sub-addrs`: subscribers spread over these servers (cluster nodes) instead of `addr`;
    /// latency is also reported per address.
    sub_addrs: Vec<SocketAddr>,
    /// The client side of TLS: the `--ca` roots and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `--storm N`: N more idle subscribed connections (channels `storm-*`), all dropped and
    /// reconnected at once a third of the way into the publishing.
    storm: usize,
    /// `handshakes`: how many, and how many at once.
    count: u64,
    concurrency: usize,
}

const USAGE: &str = "usage: loadgen fanout [--addr 127.0.0.1:6001] [--app-id 1] [--key K] [--secret S]
  [--channels 10] [--subscribers 1000] [--rate 1000] [--duration 10] [--payload 100]
  [--threads 1] [--publish-connections 4] [--nchan | --ceiling]
  [--tls-addr ADDR --ca FILE [--server-name localhost]] [--sub-addrs A,B,...] [--storm N]
       loadgen handshakes --tls-addr ADDR --ca FILE [--count 2000] [--concurrency 50] [--threads 1]
  [--key K] [--server-name localhost] [--nchan]
       loadgen connections --addr ADDR --count N [--source-ips 4] [--key K] [--ca FILE [--server-name N]] [--nchan]
--nchan speaks nginx+Nchan's pub/sub URLs (/sub/{channel} WebSocket, POST /pub/{channel}) instead of Pusher.
--ceiling drives benches/ceiling.rs, which publishes by itself on the same schedule.
--tls-addr: subscribers connect with TLS to ADDR, trusting only the certificates in --ca.
--storm N: N more idle subscribed connections, all dropped and reconnected at once a third of the way
  into the publishing (a reconnect storm, as after a deploy); reports the time until all are
  subscribed again and the latency of the other channels' events before, during and after it.
--sub-addrs: subscribers connect to these addresses (cluster nodes; the publisher stays on --addr),
  so that every channel's subscribers are spread over all of them; latency is also given per address.
handshakes: full TLS handshakes (no session resumption) each followed by a WebSocket upgrade
  and pusher:connection_established, then a close; prints handshakes/s.
connections: with --ca, ADDR is a TLS listener and every held connection is wss://.";

/// The TLS client settings: the PEM certificates in `ca` as the only roots, no session
/// resumption (every handshake is a full one), ALPN `http/1.1`, ring as the provider.
fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("--server-name {name}: {e}"))
}

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    match args.next().as_deref() {
        Some("fanout" | "handshakes") => {}
        _ => return Err(USAGE.into()),
    }
    let mut options = Options {
        addr: "127.0.0.1:6001".parse().unwrap(),
        app_id: "1".into(),
        key: "ringwire-demo-key".into(),
        secret: "ringwire-demo-secret".into(),
        channels: 10,
        subscribers: 1000,
        rate: 1000,
        duration: Duration::from_secs(10),
        payload: 100,
        threads: 1,
        publish_connections: 4,
        nchan: false,
        ceiling: false,
        tls_addr: None,
        sub_addrs: Vec::new(),
        tls: None,
        storm: 0,
        count: 2000,
        concurrency: 50,
    };
    let (mut ca, mut name) = (None, "localhost".to_string());
    while let Some(flag) = args.next() {
        if flag == "--nchan" {
            options.nchan = true;
            continue;
        }
        if flag == "--ceiling" {
            options.ceiling = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || value.parse::<u64>().map_err(|_| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--addr" => options.addr = value.parse().map_err(|_| format!("--addr: {value}"))?,
            "--app-id" => options.app_id = value.clone(),
            "--key" => options.key = value.clone(),
            "--secret" => options.secret = value.clone(),
            "--channels" => options.channels = number()?.max(1) as usize,
            "--subscribers" => options.subscribers = number()? as usize,
            "--rate" => options.rate = number()?.max(1),
            "--duration" => {
                options.duration =
                    Duration::from_secs_f64(value.parse::<f64>().map_err(|_| format!("--duration: {value}"))?)
            }
            "--payload" => options.payload = number()? as usize,
            "--threads" => options.threads = number()?.max(1) as usize,
            "--publish-connections" => options.publish_connections = number()?.max(1) as usize,
            "--sub-addrs" => {
                options.sub_addrs = value
                    .split(',')
                    .map(|a| a.parse().map_err(|_| format!("--sub-addrs: {a}")))
                    .collect::<Result<_, _>>()?
            }
            "--tls-addr" => options.tls_addr = Some(value.parse().map_err(|_| format!("--tls-addr: {value}"))?),
            "--ca" => ca = Some(std::path::PathBuf::from(&value)),
            "--server-name" => name = value.clone(),
            "--count" => options.count = number()?,
            "--storm" => options.storm = number()? as usize,
            "--concurrency" => options.concurrency = number()?.max(1) as usize,
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    match (options.tls_addr, ca) {
        (Some(_), Some(ca)) => options.tls = Some((TlsConnector::from(client_config(&ca)?), server_name(&name)?)),
        (None, None) => {}
        _ => return Err(format!("--tls-addr and --ca go together\n{USAGE}")),
    }
    if options.tls_addr.is_some() && !options.sub_addrs.is_empty() {
        return Err(format!("--sub-addrs is for plain ws:// only\n{USAGE}"));
    }
    Ok(options)
}

impl Options {
    /// Where subscribers connect: `--sub-addrs`, else `--addr`.
    fn subscriber_addrs(&self) -> Vec<SocketAddr> {
        if self.sub_addrs.is_empty() {
            vec![self.addr]
        } else {
            self.sub_addrs.clone()
        }
    }

    /// The slot in `subscriber_addrs` of subscriber `subscriber`. Subscriber `s` is on channel
    /// `s % channels`, so taking the slot from `s / channels` spreads every channel's
    /// subscribers over every address (`s % slots` would put a channel's all on one when the
    /// channel count is a multiple of the slot count).
    fn slot_of(&self, subscriber: usize) -> usize {
        (subscriber / self.channels) % self.subscriber_addrs().len()
    }
}

/// The reconnect storm's phase, for the latency of the other channels' events: before it,
/// from the drop until every storm connection is subscribed again, after it.
static STORM_PHASE: AtomicU8 = AtomicU8::new(0);
const PHASES: [&str; 3] = ["before", "storm", "after"];

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Totals shared by the subscriber threads (touched once per read batch, not per message).
#[derive(Default)]
struct Totals {
    delivered: AtomicU64,
    subscribed: AtomicU64,
    failed: AtomicU64,
}

fn main() {
    if std::env::args().skip(1).find(|a| a != "--bench").as_deref() == Some("connections") {
        return connections_main();
    }
    let options = match parse_options() {
        Ok(options) => Arc::new(options),
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if std::env::args().skip(1).find(|a| a != "--bench").as_deref() == Some("handshakes") {
        return handshakes_main(options);
    }
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_start = process_cpu_s();
    // Subscribers connect first; the barrier releases the publisher once all are subscribed.
    let storm_thread = usize::from(options.storm > 0);
    let ready = Arc::new(Barrier::new(options.threads + 1 + storm_thread));
    let storm = (options.storm > 0).then(|| {
        let (options, ready) = (options.clone(), ready.clone());
        std::thread::spawn(move || {
            let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
            runtime.block_on(storm_thread_main(options, ready))
        })
    });
    let mut handles = Vec::new();
    for thread in 0..options.threads {
        let (options, totals, stop, ready) = (options.clone(), totals.clone(), stop.clone(), ready.clone());
        handles.push(std::thread::spawn(move || {
            let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
            if options.tls.is_some() {
                runtime.block_on(subscriber_thread::<ClientTlsStream<TcpStream>>(thread, options, totals, stop, ready))
            } else {
                runtime.block_on(subscriber_thread::<TcpStream>(thread, options, totals, stop, ready))
            }
        }));
    }
    ready.wait();
    let subscribed = totals.subscribed.load(Ordering::Relaxed);
    eprintln!(
        "loadgen: {subscribed}/{} subscribed; publishing {} events/s for {:?}",
        options.subscribers, options.rate, options.duration
    );
    let publish_start = Instant::now();
    let published = if options.ceiling { start_ceiling(&options) } else { publisher(options.clone()) };
    let publish_elapsed = publish_start.elapsed();
    // Give in-flight deliveries a moment, then stop the readers.
    let expected = expected_deliveries(&options, &published);
    // Wait for the backlog of a saturated server to arrive: as long as deliveries keep coming
    // (within 1 s of each other), up to 20 s; a server that stalls is cut off after 1 s.
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    let (mut last_count, mut last_progress) = (0, Instant::now());
    loop {
        let delivered = totals.delivered.load(Ordering::Relaxed);
        if delivered >= expected || Instant::now() >= drain_deadline {
            if delivered != last_count {
                last_progress = Instant::now();
            }
            break;
        }
        if delivered != last_count {
            (last_count, last_progress) = (delivered, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    // From the first publish to the last delivery seen (within the 20 ms poll): what a
    // saturated server sustained, where `delivered_per_s` also credits the drained backlog
    // to the publishing window.
    let until_last_delivery = last_progress.saturating_duration_since(publish_start).max(publish_elapsed);
    let addrs = options.subscriber_addrs();
    let mut by_addr = vec![new_histogram(); addrs.len()];
    let mut by_phase = vec![new_histogram(); PHASES.len()];
    for handle in handles {
        let (slots, phases) = handle.join().unwrap();
        for (merged, thread) in by_addr.iter_mut().zip(slots) {
            merged.add(thread).unwrap();
        }
        for (merged, thread) in by_phase.iter_mut().zip(phases) {
            merged.add(thread).unwrap();
        }
    }
    let storm = storm.map(|thread| thread.join().unwrap());
    let phases: serde_json::Map<String, serde_json::Value> = PHASES
        .iter()
        .zip(&by_phase)
        .map(|(name, h)| {
            let summary = serde_json::json!({
                "samples": h.len(),
                "p50": h.value_at_quantile(0.50),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
            });
            (name.to_string(), summary)
        })
        .collect();
    let mut histogram = new_histogram();
    for one in &by_addr {
        histogram.add(one).unwrap();
    }
    let by_sub_addr: Vec<_> = addrs
        .iter()
        .zip(&by_addr)
        .map(|(addr, h)| {
            serde_json::json!({
                "addr": addr.to_string(),
                "samples": h.len(),
                "p50": h.value_at_quantile(0.50),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
            })
        })
        .collect();
    let delivered = totals.delivered.load(Ordering::Relaxed);
    let generator_cpu_s = process_cpu_s() - cpu_start;
    let result = serde_json::json!({
        "scenario": "fanout",
        "target": if options.nchan { "nchan" } else { "pusher" },
        "transport": if options.tls.is_some() { "wss" } else { "ws" },
        "subscribers": options.subscribers,
        "subscribed": subscribed,
        "channels": options.channels,
        "payload_bytes": options.payload,
        "offered_rate": options.rate,
        "duration_s": publish_elapsed.as_secs_f64(),
        "published": published.sent,
        "publish_errors": published.errors,
        "expected_deliveries": expected,
        "delivered": delivered,
        "delivered_per_s": delivered as f64 / publish_elapsed.as_secs_f64(),
        "sustained_per_s": delivered as f64 / until_last_delivery.as_secs_f64(),
        "failed_connections": totals.failed.load(Ordering::Relaxed),
        "latency_us": {
            "p50": histogram.value_at_quantile(0.50),
            "p90": histogram.value_at_quantile(0.90),
            "p99": histogram.value_at_quantile(0.99),
            "p999": histogram.value_at_quantile(0.999),
            "max": histogram.max(),
            "samples": histogram.len(),
        },
        "latency_by_sub_addr_us": by_sub_addr,
        "storm": storm,
        "latency_by_storm_phase_us": if options.storm > 0 { serde_json::Value::Object(phases) } else { serde_json::Value::Null },
        "generator_cpu_s": generator_cpu_s,
    });
    eprintln!(
        "loadgen: published {} ({} errors), delivered {delivered}/{expected}, {:.0} msg/s; latency p50 {} µs p99 {} µs p99.9 {} µs max {} µs; generator CPU {generator_cpu_s:.2} s",
        published.sent,
        published.errors,
        delivered as f64 / publish_elapsed.as_secs_f64(),
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max()
    );
    println!("{result}");
}

/// The reconnect storm (`--storm N`): opens N idle subscribed connections, joins the start
/// barrier, and a third of the way into the publishing drops them all and reconnects every one
/// at once. Returns what it measured, as JSON.
async fn storm_thread_main(options: Arc<Options>, ready: Arc<Barrier>) -> serde_json::Value {
    let channel = |n: usize| format!("storm-{}", n % 100);
    let open = |count: usize| {
        let options = options.clone();
        async move {
            let tasks: Vec<_> =
                (0..count).map(|n| monoio::spawn(subscribe::<TcpStream>(options.clone(), channel(n), 0))).collect();
            let mut held = Vec::with_capacity(count);
            for task in tasks {
                if let Ok((stream, _, _, _)) = task.await {
                    held.push(stream);
                }
            }
            held
        }
    };
    // The crowd connects in slices, as clients arriving over time would.
    let mut crowd = Vec::with_capacity(options.storm);
    while crowd.len() < options.storm {
        let before = crowd.len();
        crowd.extend(open((options.storm - crowd.len()).min(500)).await);
        if crowd.len() == before {
            break;
        }
    }
    let crowd_size = crowd.len();
    eprintln!("loadgen: storm crowd of {crowd_size} subscribed");
    let ready_wait = std::thread::spawn(move || ready.wait());
    while !ready_wait.is_finished() {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    monoio::time::sleep(options.duration / 3).await;
    STORM_PHASE.store(1, Ordering::Relaxed);
    let start = Instant::now();
    drop(crowd);
    let back = open(crowd_size).await.len();
    let recovery = start.elapsed();
    STORM_PHASE.store(2, Ordering::Relaxed);
    eprintln!("loadgen: storm: {back}/{crowd_size} reconnected and subscribed in {:.3} s", recovery.as_secs_f64());
    serde_json::json!({"connections": crowd_size, "reconnected": back, "recovery_s": recovery.as_secs_f64()})
}

/// Subscribers per channel times the events the server accepted for that channel.
fn expected_deliveries(options: &Options, published: &Published) -> u64 {
    (0..options.channels)
        .map(|c| {
            let subscribers = (0..options.subscribers).filter(|s| s % options.channels == c).count() as u64;
            subscribers * published.per_channel[c]
        })
        .sum()
}

fn process_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we pass and touches nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: see above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A subscriber's connection: plain TCP (`ws://`) or TLS over it (`wss://`).
trait Dial: AsyncReadRent + AsyncWriteRent + Sized + 'static {
    /// Connects to the server the subscribers use; also returns the socket's descriptor, so
    /// the end of a run can shut it down under a pending read (see `subscriber_thread`).
    async fn dial(options: &Options, slot: usize) -> io::Result<(Self, RawFd)>;
}

impl Dial for TcpStream {
    async fn dial(options: &Options, slot: usize) -> io::Result<(Self, RawFd)> {
        let stream = TcpStream::connect(options.subscriber_addrs()[slot]).await?;
        stream.set_nodelay(true)?;
        let fd = stream.as_raw_fd();
        Ok((stream, fd))
    }
}

impl Dial for ClientTlsStream<TcpStream> {
    async fn dial(options: &Options, _slot: usize) -> io::Result<(Self, RawFd)> {
        let (Some(addr), Some((connector, name))) = (options.tls_addr, options.tls.as_ref()) else {
            return Err(io::Error::other("TLS needs --tls-addr and --ca"));
        };
        let tcp = TcpStream::connect(addr).await?;
        // Without TCP_NODELAY each handshake flight waits for a delayed ACK (tens of ms).
        tcp.set_nodelay(true)?;
        let fd = tcp.as_raw_fd();
        let stream = connector.connect(name.clone(), tcp).await.map_err(io::Error::other)?;
        Ok((stream, fd))
    }
}

async fn subscriber_thread<S: Dial>(
    thread: usize,
    options: Arc<Options>,
    totals: Arc<Totals>,
    stop: Arc<AtomicBool>,
    ready: Arc<Barrier>,
) -> (Vec<Histogram<u64>>, Vec<Histogram<u64>>) {
    let slots = options.subscriber_addrs().len();
    let histograms = Rc::new(std::cell::RefCell::new(vec![new_histogram(); slots]));
    let phases = Rc::new(std::cell::RefCell::new(vec![new_histogram(); PHASES.len()]));
    let mine: Vec<usize> = (0..options.subscribers).filter(|s| s % options.threads == thread).collect();
    let mut streams = Vec::with_capacity(mine.len());
    for chunk in mine.chunks(100) {
        let mut pending = Vec::new();
        for &subscriber in chunk {
            let channel = format!("bench-{}", subscriber % options.channels);
            let slot = options.slot_of(subscriber);
            pending.push(monoio::spawn(subscribe::<S>(options.clone(), channel, slot)));
        }
        for handle in pending {
            match handle.await {
                Ok(connection) => {
                    totals.subscribed.fetch_add(1, Ordering::Relaxed);
                    streams.push(connection);
                }
                Err(e) => {
                    totals.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("loadgen: subscribe failed: {e}");
                }
            }
        }
    }
    let fds: Vec<RawFd> = streams.iter().map(|(_, fd, _, _)| *fd).collect();
    let mut readers = Vec::new();
    for (stream, _, buf, slot) in streams {
        let recorder = Recorder { histograms: histograms.clone(), slot, phases: phases.clone() };
        readers.push(monoio::spawn(receive(stream, buf, recorder, totals.clone(), stop.clone())));
    }
    // Let this runtime run the readers while other threads finish subscribing and the
    // publisher runs; `stop` comes after the barrier released everyone.
    let ready_wait = std::thread::spawn(move || ready.wait());
    while !stop.load(Ordering::Relaxed) {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = ready_wait.join();
    // Readers end by their pending read returning 0 after shutdown(2), not by dropping the
    // read on a timeout: a dropped read loses what the kernel had just read, and a TLS
    // stream (monoio-rustls) cannot be read again after one of its reads was dropped.
    for fd in fds {
        // SAFETY: every descriptor belongs to a stream that is still open: readers hand their
        // stream back instead of dropping it, and the streams are dropped only below.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    let mut finished = Vec::with_capacity(readers.len());
    for reader in readers {
        finished.push(reader.await);
    }
    drop(finished);
    let take = |rc: Rc<std::cell::RefCell<Vec<Histogram<u64>>>>| {
        Rc::try_unwrap(rc).map(|h| h.into_inner()).unwrap_or_else(|rc| rc.borrow().clone())
    };
    (take(histograms), take(phases))
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// Where one reader records its latencies: its address's histogram of its thread.
struct Recorder {
    histograms: Rc<std::cell::RefCell<Vec<Histogram<u64>>>>,
    slot: usize,
    /// By storm phase (`STORM_PHASE`), all addresses together.
    phases: Rc<std::cell::RefCell<Vec<Histogram<u64>>>>,
}

async fn read_more<S: AsyncReadRent>(stream: &mut S, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let (result, slice) = stream.read(buf.slice_mut(len..)).await;
    (result, slice.into_inner())
}

/// Opens a WebSocket, subscribes, and returns the stream, its socket and any bytes read past
/// the reply.
async fn subscribe<S: Dial>(
    options: Arc<Options>,
    channel: String,
    slot: usize,
) -> io::Result<(S, RawFd, BytesMut, usize)> {
    let (mut stream, fd) = S::dial(&options, slot).await?;
    let path = if options.nchan {
        format!("/sub/{channel}")
    } else {
        format!("/app/{}?protocol=7&client=loadgen", options.key)
    };
    let host = options.tls_addr.unwrap_or(options.subscriber_addrs()[slot]);
    let mut buf = upgrade(&mut stream, &path, host).await?;
    if options.nchan {
        return Ok((stream, fd, buf, slot));
    }
    // connection_established, then subscribe and wait for subscription_succeeded.
    wait_for(&mut stream, &mut buf, b"pusher:connection_established").await?;
    let subscribe = format!(r#"{{"event":"pusher:subscribe","data":{{"auth":"","channel":"{channel}"}}}}"#);
    let (result, _) = stream.write_all(masked_text(subscribe.as_bytes())).await;
    result?;
    wait_for(&mut stream, &mut buf, b"pusher_internal:subscription_succeeded").await?;
    Ok((stream, fd, buf, slot))
}

/// Sends a WebSocket upgrade request for `path` and reads the 101 answer; returns the bytes
/// read past it.
async fn upgrade<S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    path: &str,
    host: SocketAddr,
) -> io::Result<BytesMut> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (result, _) = stream.write_all(request.into_bytes()).await;
    result?;
    let mut buf = BytesMut::with_capacity(4096);
    let head_end = loop {
        let (result, b) = read_more(stream, buf).await;
        buf = b;
        if result? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during handshake"));
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(io::Error::other(format!("handshake refused: {}", String::from_utf8_lossy(&buf[..head_end]))));
    }
    buf.advance(head_end);
    Ok(buf)
}

async fn wait_for<S: AsyncReadRent>(stream: &mut S, buf: &mut BytesMut, needle: &[u8]) -> io::Result<()> {
    loop {
        while let Some((payload, consumed)) = next_frame(buf) {
            let found = payload.windows(needle.len()).any(|w| w == needle);
            buf.advance(consumed);
            if found {
                return Ok(());
            }
        }
        let (result, b) = read_more(stream, std::mem::take(buf)).await;
        *buf = b;
        if result? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before subscription"));
        }
    }
}

/// One unmasked server frame at the front of `buf`: (payload, total length).
fn next_frame(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (length, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= header + length).then(|| (&buf[header..header + length], header + length))
}

/// The intended send time (ns) in a payload: the digits after the `t` key, either escaped
/// inside a double-encoded Pusher data string (`\"t\":`) or plain (`"t":`, Nchan).
fn sent_at(payload: &[u8]) -> Option<u64> {
    let find = |needle: &[u8]| payload.windows(needle.len()).position(|w| w == needle).map(|p| p + needle.len());
    let at = find(br#"\"t\":"#).or_else(|| find(br#""t":"#))?;
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit());
    Some(digits.fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Counts and times deliveries until the run stops; hands the stream back (see
/// `subscriber_thread` for why it is not dropped here).
async fn receive<S: AsyncReadRent>(
    mut stream: S,
    mut buf: BytesMut,
    recorder: Recorder,
    totals: Arc<Totals>,
    stop: Arc<AtomicBool>,
) -> S {
    loop {
        let mut delivered = 0;
        let now = now_ns();
        while let Some((payload, consumed)) = next_frame(&buf) {
            if let Some(sent) = sent_at(payload) {
                let latency_us = now.saturating_sub(sent) / 1000;
                let _ = recorder.histograms.borrow_mut()[recorder.slot].record(latency_us.max(1));
                let phase = usize::from(STORM_PHASE.load(Ordering::Relaxed));
                let _ = recorder.phases.borrow_mut()[phase].record(latency_us.max(1));
                delivered += 1;
            }
            buf.advance(consumed);
        }
        if delivered > 0 {
            totals.delivered.fetch_add(delivered, Ordering::Relaxed);
        }
        if stop.load(Ordering::Relaxed) {
            return stream;
        }
        let (result, b) = read_more(&mut stream, std::mem::take(&mut buf)).await;
        buf = b;
        match result {
            Ok(n) if n > 0 => {}
            _ => return stream,
        }
    }
}

fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

struct Published {
    sent: u64,
    errors: u64,
    /// Events the server accepted per channel (index = channel number).
    per_channel: Vec<u64>,
}

/// Open-loop publisher: event i is due at start + i/rate. Each connection is a plain thread
/// with a blocking socket: `thread::sleep` wakes within tens of microseconds, where a 1 ms
/// runtime timer would add its own lateness to every measured latency. Each event carries
/// its intended time, not the actual send time.
fn publisher(options: Arc<Options>) -> Published {
    let total = (options.rate as f64 * options.duration.as_secs_f64()) as u64;
    let start_ns = now_ns();
    let start = Instant::now();
    let threads: Vec<_> = (0..options.publish_connections)
        .map(|connection| {
            let options = options.clone();
            std::thread::spawn(move || {
                let mut published = Published { sent: 0, errors: 0, per_channel: vec![0; options.channels] };
                let connect = || {
                    let stream = std::net::TcpStream::connect(options.addr).ok()?;
                    let _ = stream.set_nodelay(true);
                    Some(stream)
                };
                let Some(mut stream) = connect() else {
                    published.errors += 1;
                    return published;
                };
                let mut buf = Vec::with_capacity(4096);
                let mut index = connection as u64;
                while index < total {
                    let due_ns = (index as f64 * 1e9 / options.rate as f64) as u64;
                    let due = start + Duration::from_nanos(due_ns);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let request = publish_request(&options, index, start_ns + due_ns);
                    let (ok, close) = if std::io::Write::write_all(&mut stream, &request).is_ok() {
                        read_response(&mut stream, &mut buf)
                    } else {
                        (false, true)
                    };
                    if ok {
                        published.sent += 1;
                        published.per_channel[index as usize % options.channels] += 1;
                    } else {
                        published.errors += 1;
                    }
                    // Some servers answer `Connection: close` (sockudo does on every API call)
                    // or drop keep-alive connections (nginx after keepalive_requests): open a
                    // fresh one for the next event.
                    if close {
                        buf.clear();
                        match connect() {
                            Some(fresh) => stream = fresh,
                            None => return published,
                        }
                    }
                    index += options.publish_connections as u64;
                }
                published
            })
        })
        .collect();
    let mut total = Published { sent: 0, errors: 0, per_channel: vec![0; options.channels] };
    for thread in threads {
        let part = thread.join().unwrap();
        total.sent += part.sent;
        total.errors += part.errors;
        for (sum, n) in total.per_channel.iter_mut().zip(part.per_channel) {
            *sum += n;
        }
    }
    total
}

/// `--ceiling`: the ceiling program publishes by itself on the same schedule; ask it to start
/// and wait out the run. Its events per channel follow from the schedule (event k on k mod C).
fn start_ceiling(options: &Options) -> Published {
    use std::io::{Read, Write};
    let total = (options.rate as f64 * options.duration.as_secs_f64()) as u64;
    let mut per_channel = vec![0u64; options.channels];
    for k in 0..total {
        per_channel[k as usize % options.channels] += 1;
    }
    let request = format!(
        "POST /start?rate={}&duration_ms={}&channels={} HTTP/1.1\r\nHost: bench\r\n\r\n",
        options.rate,
        options.duration.as_millis(),
        options.channels
    );
    let started = std::net::TcpStream::connect(options.addr).and_then(|mut s| {
        s.write_all(request.as_bytes())?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        Ok(reply.starts_with(b"HTTP/1.1 200"))
    });
    if !matches!(started, Ok(true)) {
        return Published { sent: 0, errors: 1, per_channel: vec![0; options.channels] };
    }
    std::thread::sleep(options.duration);
    Published { sent: total, errors: 0, per_channel }
}

fn publish_request(options: &Options, index: u64, intended_ns: u64) -> Vec<u8> {
    let channel = format!("bench-{}", index as usize % options.channels);
    let pad = "x".repeat(options.payload.saturating_sub(40));
    if options.nchan {
        let body = format!(r#"{{"t":{intended_ns},"pad":"{pad}"}}"#);
        return format!("POST /pub/{channel} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes();
    }
    let data = format!(r#"{{\"t\":{intended_ns},\"pad\":\"{pad}\"}}"#);
    let body = format!(r#"{{"name":"bench","channel":"{channel}","data":"{data}"}}"#);
    let path = format!("/apps/{}/events", options.app_id);
    let timestamp = now_ns() / 1_000_000_000;
    let query = ringwire::pusher::auth::signed_query(
        "POST",
        &path,
        &options.key,
        &options.secret,
        body.as_bytes(),
        timestamp,
        &[],
    );
    let mut request = Vec::with_capacity(256 + body.len());
    let _ = write!(request, "POST {path}?{query} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    request
}

/// Reads one response (head + Content-Length body): (2xx, server asked to close).
fn read_response(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> (bool, bool) {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let ok = head.starts_with("http/1.1 2");
                let close = head.lines().any(|l| l.starts_with("connection:") && l.contains("close"));
                buf.drain(..end + 4 + length);
                return (ok, close);
            }
        }
        match std::io::Read::read(stream, &mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (false, true),
        }
    }
}

// ---- handshakes scenario -------------------------------------------------------------------

/// `loadgen handshakes`: `--count` full TLS handshakes, each followed by a WebSocket upgrade and
/// `pusher:connection_established` and then a close (close_notify + FIN), `--concurrency` at a
/// time over `--threads` runtime threads. Prints one JSON line: handshakes/s and the latency
/// of one handshake + upgrade. The server's CPU per handshake is measured by scripts/bench.
fn handshakes_main(options: Arc<Options>) {
    if options.tls.is_none() {
        eprintln!("loadgen: handshakes needs --tls-addr and --ca\n{USAGE}");
        std::process::exit(2);
    }
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu_start = process_cpu_s();
    let start = Instant::now();
    let handles: Vec<_> = (0..options.threads)
        .map(|thread| {
            // This thread's share of the concurrency (the first threads take the remainder).
            let workers =
                options.concurrency / options.threads + usize::from(thread < options.concurrency % options.threads);
            let (options, next, failed) = (options.clone(), next.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
                runtime.block_on(handshake_workers(workers, options, next, failed))
            })
        })
        .collect();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for handle in handles {
        histogram.add(handle.join().unwrap()).unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    let completed = histogram.len();
    let generator_cpu_s = process_cpu_s() - cpu_start;
    let result = serde_json::json!({
        "scenario": "handshakes",
        "count": options.count,
        "completed": completed,
        "failed": failed.load(Ordering::Relaxed),
        "concurrency": options.concurrency,
        "seconds": seconds,
        "handshakes_per_s": completed as f64 / seconds,
        "latency_us": {
            "p50": histogram.value_at_quantile(0.50),
            "p99": histogram.value_at_quantile(0.99),
            "max": histogram.max(),
        },
        "generator_cpu_s": generator_cpu_s,
    });
    eprintln!(
        "loadgen: {completed}/{} TLS handshakes + upgrades in {seconds:.2} s: {:.0}/s at concurrency {}; p50 {} µs p99 {} µs; generator CPU {generator_cpu_s:.2} s",
        options.count,
        completed as f64 / seconds,
        options.concurrency,
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99)
    );
    println!("{result}");
}

/// `workers` tasks taking handshake numbers from `next` until `--count` are taken.
async fn handshake_workers(
    workers: usize,
    options: Arc<Options>,
    next: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> Histogram<u64> {
    let histogram = Rc::new(std::cell::RefCell::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (options, next, failed, histogram) = (options.clone(), next.clone(), failed.clone(), histogram.clone());
            monoio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < options.count {
                    let begun = Instant::now();
                    match one_handshake(&options).await {
                        Ok(()) => {
                            let _ = histogram.borrow_mut().record((begun.elapsed().as_micros() as u64).max(1));
                        }
                        Err(e) => {
                            // The first few reasons are enough to see what went wrong.
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("loadgen: handshake failed: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
    Rc::try_unwrap(histogram).map(|h| h.into_inner()).unwrap_or_else(|rc| rc.borrow().clone())
}

/// One TLS connection: handshake, WebSocket upgrade, `connection_established` (with `--nchan`
/// the 101 answer is the end), close.
async fn one_handshake(options: &Options) -> io::Result<()> {
    let (mut stream, _) = ClientTlsStream::<TcpStream>::dial(options, 0).await?;
    let path = if options.nchan {
        "/sub/bench-handshake".to_string()
    } else {
        format!("/app/{}?protocol=7&client=loadgen", options.key)
    };
    let host = options.tls_addr.unwrap_or(options.addr);
    let mut buf = upgrade(&mut stream, &path, host).await?;
    if !options.nchan {
        wait_for(&mut stream, &mut buf, b"pusher:connection_established").await?;
    }
    let _ = stream.shutdown().await;
    Ok(())
}

// ---- connections scenario ------------------------------------------------------------------

/// `loadgen connections --addr A --count N [--source-ips K] [--key K] [--ca FILE]`: opens N
/// WebSockets (bound round-robin to source addresses 127.0.0.2 … 127.0.0.(K+1), so many
/// connections do not exhaust one address's ports), subscribes each to one of 100 channels,
/// prints one JSON line `{"ready":N,...}` once all are subscribed, then holds them idle until
/// its standard input closes. With `--ca`, `A` is a TLS listener and every connection is
/// `wss://` (a full handshake each). Plain blocking sockets: set-up speed is measured, not the
/// idle phase.
fn connections_main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench").skip(1);
    let (mut addr, mut count, mut source_ips, mut key) =
        ("127.0.0.1:6001".to_string(), 1000usize, 4u8, "ringwire-demo-key".to_string());
    let (mut ca, mut name, mut nchan) = (None, "localhost".to_string(), false);
    while let Some(flag) = args.next() {
        if flag == "--nchan" {
            nchan = true;
            continue;
        }
        let Some(value) = args.next() else {
            eprintln!("{flag} needs a value");
            std::process::exit(2);
        };
        match flag.as_str() {
            "--addr" => addr = value,
            "--count" => count = value.parse().expect("--count"),
            "--source-ips" => source_ips = value.parse::<u8>().expect("--source-ips").clamp(1, 250),
            "--key" => key = value,
            "--ca" => ca = Some(std::path::PathBuf::from(value)),
            "--server-name" => name = value,
            other => {
                eprintln!("unknown option {other}");
                std::process::exit(2);
            }
        }
    }
    let tls = match ca.map(|ca| Ok::<_, String>((client_config(&ca)?, server_name(&name)?))).transpose() {
        Ok(tls) => tls,
        Err(message) => {
            eprintln!("loadgen: {message}");
            std::process::exit(2);
        }
    };
    let addr: SocketAddr = addr.parse().expect("--addr");
    let start = Instant::now();
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::with_capacity(count);
    for i in 0..count {
        let source = SocketAddr::from(([127, 0, 0, 2 + (i % source_ips as usize) as u8], 0));
        match open_idle(addr, source, &key, &format!("idle-{}", i % 100), tls.as_ref(), nchan) {
            Ok(stream) => held.push(stream),
            Err(e) => {
                eprintln!("loadgen: connection {i} failed: {e}");
                break;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"ready": held.len(), "requested": count, "seconds": elapsed, "connects_per_s": held.len() as f64 / elapsed})
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    drop(held);
}

/// One idle, subscribed WebSocket on a blocking socket bound to `source`, over TLS when `tls`
/// is given (rustls's blocking `StreamOwned`).
fn open_idle(
    addr: SocketAddr,
    source: SocketAddr,
    key: &str,
    channel: &str,
    tls: Option<&(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    nchan: bool,
) -> io::Result<Box<dyn std::any::Any>> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&source.into())?;
    socket.connect(&addr.into())?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    match tls {
        None => {
            subscribe_blocking(&mut stream, key, channel, nchan)?;
            Ok(Box::new(stream))
        }
        Some((config, name)) => {
            let connection = rustls::ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(connection, stream);
            subscribe_blocking(&mut stream, key, channel, nchan)?;
            Ok(Box::new(stream))
        }
    }
}

/// Upgrades to a WebSocket and subscribes to `channel`, blocking. With `nchan`, the upgrade
/// to Nchan's `/sub/{channel}` is the subscription.
fn subscribe_blocking<S: io::Read + io::Write>(
    stream: &mut S,
    key: &str,
    channel: &str,
    nchan: bool,
) -> io::Result<()> {
    let path = if nchan { format!("/sub/{channel}") } else { format!("/app/{key}?protocol=7") };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 2048];
    let mut wait_for = |stream: &mut S, needle: &[u8]| -> io::Result<()> {
        while !received.windows(needle.len()).any(|w| w == needle) {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            received.extend_from_slice(&chunk[..n]);
        }
        received.clear();
        Ok(())
    };
    if nchan {
        return wait_for(stream, b"HTTP/1.1 101");
    }
    wait_for(stream, b"connection_established")?;
    let subscribe = format!(r#"{{"event":"pusher:subscribe","data":{{"auth":"","channel":"{channel}"}}}}"#);
    stream.write_all(&masked_text(subscribe.as_bytes()))?;
    stream.flush()?;
    wait_for(stream, b"subscription_succeeded")
}
